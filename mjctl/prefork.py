"""Several server processes on one port: bind once, fork workers that share the listening socket, supervise.

The parent binds and listens before forking (so a busy port is one error, and port 0 means one free port
for all), then forks ``workers`` children that each accept on the inherited socket. The kernel hands
every new connection to one of them. The parent only supervises: SIGTERM or SIGINT is forwarded to every
worker and waited for; a worker that dies unexpectedly is replaced (unless workers keep dying at once,
which means something is wrong that a restart will not fix). POSIX only (``os.fork``).

Database connections must not cross a fork: the caller closes its own before :func:`run_workers`, and each
worker opens its own (``mjctl.db.unbind`` then ``open_store``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

log = logging.getLogger("mjctl.prefork")

STOP_GRACE_SECONDS = 40.0  # a worker finishes its requests and its poller's current cycle first
RESPAWN_WINDOW = 10.0  # more than RESPAWN_LIMIT deaths within this many seconds: give up
RESPAWN_LIMIT = 5


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one), inheritable by forked children."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    last: OSError | None = None
    for family, socktype, proto, _name, addr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted connections inherit this (cheroot sets it when it binds itself). Without it a
            # response written as headers then body waits on the client's delayed ACK: ~40 ms a request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(addr)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        # Non-blocking: the workers all wait on it, and the ones that lose the race for a connection
        # must get EAGAIN at once instead of blocking their accept loop (and their keep-alive clients).
        sock.setblocking(False)
        return sock
    raise last or OSError(f"cannot listen on {host}:{port}")


def run_workers(workers: int, worker_main: Callable[[int], int | None]) -> int:
    """Fork ``workers`` processes running ``worker_main(index)`` and supervise them until SIGTERM/SIGINT.

    ``worker_main`` serves until it is signalled and returns an exit code (None = 0); it runs in the child
    with default signal handlers. Returns the parent's exit code: 0 after a requested stop, 1 when workers
    kept dying.
    """
    if not hasattr(os, "fork"):
        raise OSError("several worker processes need os.fork (POSIX)")
    stopping = False
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        nonlocal stopping
        stopping = True
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    children: dict[int, int] = {}  # pid -> worker index
    deaths: list[float] = []
    code = 0
    try:
        for index in range(workers):
            children[_spawn(index, worker_main, previous)] = index
        while not stopping:
            pid, status = _reap(block_for=0.2)
            if pid == 0 or pid not in children:
                continue
            index = children.pop(pid)
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESPAWN_WINDOW] + [now]
            log.warning("worker %d (pid %d) %s; starting another", index, pid, _describe(status))
            if len(deaths) > RESPAWN_LIMIT:
                log.error("workers keep dying (%d in %.0f s); stopping", len(deaths), RESPAWN_WINDOW)
                code = 1
                break
            children[_spawn(index, worker_main, previous)] = index
    finally:
        _stop_all(children, signal.SIGTERM)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _spawn(index: int, worker_main: Callable[[int], int | None], handlers: dict) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        result = worker_main(index)
        code = 0 if result is None else int(result)
    except KeyboardInterrupt:
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a worker's crash is logged here; the parent replaces the worker
        log.exception("worker %d crashed", index)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never run the parent's cleanup (atexit, the CLI's exit path) in a child
    return 0  # unreachable


def _reap(block_for: float) -> tuple[int, int]:
    """One finished child (pid, status), or (0, 0) after waiting block_for seconds for one."""
    deadline = time.monotonic() + block_for
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid or time.monotonic() >= deadline:
            return pid, status
        time.sleep(0.02)


def _stop_all(children: dict[int, int], sig: int) -> None:
    for pid in children:
        _signal(pid, sig)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while children and time.monotonic() < deadline:
        pid, _status = _reap(block_for=0.1)
        children.pop(pid, None)
    for pid in list(children):
        log.warning("worker pid %d did not stop in %.0f s; killing it", pid, STOP_GRACE_SECONDS)
        _signal(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        children.pop(pid, None)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"
