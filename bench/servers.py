"""The servers the benchmarks compare: mjctl's own (granian behind mjctl.httpserver's bridge) and cheroot, the
thread-per-connection server mjctl used before, configured as mjctl.wsgiserver configured it (16 threads,
30 s socket timeout, no cap on parked keep-alive connections, a brisk expiration interval).

cheroot is a benchmark dependency only: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import resource
import socket
import threading
from typing import Any


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit towards `wanted` (up to the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class CherootThread:
    """A cheroot WSGI server on a free port in a daemon thread, as mjctl ran it until the granian switch."""

    def __init__(self, app: Any, host: str = "127.0.0.1", threads: int = 16):
        self.app = app
        self.host = host
        self.threads = threads
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> CherootThread:
        from cheroot import wsgi

        server = wsgi.Server((self.host, 0), self.app, numthreads=self.threads, shutdown_timeout=2, timeout=30,
                             request_queue_size=128)
        server.expiration_interval = 0.05
        server.keep_alive_conn_limit = None  # else clients beyond 10 parked connections are told to close
        server.prepare()
        self.port = server.bind_addr[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve, name="cheroot", daemon=True)
        self._thread.start()
        with socket.create_connection((self.host, self.port), timeout=5):
            pass
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            if self._thread is not None:
                self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> CherootThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def mjctl_server(settings, app) -> Any:
    """mjctl's server for `app`: the bridge with the limits of `settings`, in this process (not started)."""
    from mjctl.httpserver import ServerThread
    from mjctl.server import make_bridge

    return ServerThread(make_bridge(settings, app))


SERVERS = ("new", "cheroot")


def start(kind: str, settings, app) -> Any:
    """A started server of `kind` ("new" or "cheroot") for `app`; stop() it when done."""
    if kind == "new":
        return mjctl_server(settings, app).start()
    if kind == "cheroot":
        return CherootThread(app, threads=settings.server.threads).start()
    raise ValueError(kind)
