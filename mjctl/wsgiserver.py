"""A threaded WSGI server (cheroot) shared by the simulator, ``mjctl serve`` and the tests.

``ServerThread`` runs an app in a daemon thread on a given or free port; ``serve_forever`` runs one in
the foreground until SIGTERM or SIGINT. cheroot writes every chunk an app yields straight to the socket,
so generator responses stream without being buffered whole.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from cheroot import wsgi

__all__ = ["ServerThread", "serve_forever"]


class _InheritedSocketServer(wsgi.Server):
    """A cheroot server that accepts on a socket bound and listening already (shared by forked workers)."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any):
        super().__init__(sock.getsockname()[:2], *args, **kwargs)
        self._inherited = sock

    def bind(self, family, type, proto=0):  # cheroot's signature
        self.socket = self._inherited
        self.bind_addr = self._inherited.getsockname()[:2]
        return self.socket


class ServerThread:
    """Serve ``app`` from a background daemon thread; ``start()`` returns once connections are accepted.

    With ``sock`` (a listening socket, see ``mjctl.prefork.listen``) it accepts there instead of binding.
    """

    def __init__(self, app: Callable[..., Any], host: str = "127.0.0.1", port: int = 0, threads: int = 16,
                 sock: socket.socket | None = None):
        self.app = app
        self.host = host
        self._requested_port = port if sock is None else sock.getsockname()[1]
        self._sock = sock
        self.threads = threads
        self._server: wsgi.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server is not started")
        host = self._connect_host()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _connect_host(self) -> str:
        """The address a local client uses to reach a server bound to ``self.host``."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    def start(self) -> ServerThread:
        if self._server is not None:
            raise RuntimeError("server already started")
        server_class, first = ((wsgi.Server, (self.host, self._requested_port)) if self._sock is None
                               else (_InheritedSocketServer, self._sock))
        server = server_class(
            first,
            self.app,
            numthreads=self.threads,
            # Short waits keep stop() quick; the defaults (5 s, 10 s) make shutdown crawl.
            shutdown_timeout=2,
            timeout=30,
            request_queue_size=128,
        )
        # The serve loop only notices a stop request between select() calls: poll briskly so stop()
        # takes milliseconds, not cheroot's default half second.
        server.expiration_interval = 0.05
        # cheroot answers "Connection: close" once 10 idle keep-alive connections are parked (its default),
        # so a client with more connections than that reconnects on most requests, and checking the count
        # takes the selector's lock on every response. No limit: idle connections still close after
        # `timeout` seconds, and accepting new ones was never limited by this setting anyway.
        server.keep_alive_conn_limit = None
        self._server = server
        ready = threading.Event()
        failure: list[BaseException] = []
        # prepare() runs in the daemon thread so that cheroot's worker threads inherit daemon status
        # and a server somebody forgot to stop cannot keep the interpreter alive.
        self._thread = threading.Thread(
            target=self._serve, args=(ready, failure), name="wsgi-server", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._server = None
            self._thread.join()
            self._thread = None
            raise failure[0]
        self.port = server.bind_addr[1]
        self._wait_accepting()
        return self

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        server = self._server
        assert server is not None
        try:
            server.prepare()  # binds and listens: a connect() from now on is queued, not refused
            if self._sock is not None:
                server.socket.setblocking(False)  # prepare() made it blocking; see prefork.listen
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            server.serve()
        except Exception:  # noqa: BLE001 - the server thread must never die noisily
            pass

    def _wait_accepting(self, timeout: float = 5.0) -> None:
        with socket.create_connection((self._connect_host(), self.port), timeout=timeout):
            pass

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.stop()
        if thread is not None:
            thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_forever(
    app: Callable[..., Any],
    host: str,
    port: int,
    threads: int,
    on_ready: Callable[[str], None] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop cleanly (no traceback).

    Must be called from the main thread (signal handlers can only be installed there).
    """
    stop_event = threading.Event()

    def _handle(signum: int, frame: object) -> None:
        stop_event.set()

    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = ServerThread(app, host=host, port=port, threads=threads, sock=sock)
    try:
        server.start()
        if on_ready is not None:
            on_ready(server.url)
        while not stop_event.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
