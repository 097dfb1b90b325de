"""`mjctl serve`: the HTTP server (and, once the poller exists, the poller in the same process).

The server is cheroot (mjctl.wsgiserver): pure Python, a pool of worker threads so one slow client does
not block the others, and it streams generator responses (image forwarding) without buffering them.
"""

from __future__ import annotations

import sys
import threading
from typing import Optional

import typer

from mjctl.cli.output import configure_logging
from mjctl.cli.state import state


def serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on ([server] host, default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", "-p", help="Port to listen on ([server] port, default 8080; 0 picks a free one)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Worker threads ([server] threads, default 16)."),
    no_poll: bool = typer.Option(False, "--no-poll", help="Do not run the poller in this process."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1,
                                          help="Server processes sharing the port ([server] workers, default 1)."),
) -> None:
    """Serve the HTTP API (and the poller, unless --no-poll) until Ctrl-C or SIGTERM."""
    st = state(ctx)
    st.override("server", "host", host)
    st.override("server", "port", port)
    st.override("server", "threads", threads)
    st.override("server", "workers", workers)
    settings = st.open_store()
    configure_logging(settings.log.level)
    if settings.server.workers > 1:
        _serve_workers(settings, poll=not no_poll and settings.poller.in_server)
        return

    from mjctl.server import create_app
    from mjctl.wsgiserver import serve_forever

    app = create_app(settings)
    stop_event = threading.Event()
    poller = None if no_poll or not settings.poller.in_server else _start_poller(settings, stop_event)

    def announce(url: str) -> None:
        sys.stderr.write(f"mjctl serving on {url} ({settings.server.threads} threads"
                         f"{', poller running' if poller is not None else ', no poller'}). Press Ctrl-C to stop.\n")
        sys.stderr.flush()

    try:
        serve_forever(app, settings.server.host, settings.server.port, settings.server.threads, on_ready=announce)
    except OSError as exc:
        from mjctl.errors import MjctlError

        raise MjctlError(f"Cannot listen on {settings.server.host}:{settings.server.port}: "
                         f"{exc.strerror or exc}") from None
    finally:
        stop_event.set()
        if poller is not None:
            poller.join(timeout=30)
    sys.stderr.write("mjctl server stopped.\n")


def _serve_workers(settings, *, poll: bool) -> None:
    """`--workers N`: N processes accept on one socket bound here; the poller runs in worker 0 only (and
    the database lease keeps it to one cycle at a time across every process and host anyway)."""
    from mjctl import crypto, prefork
    from mjctl.db import open_store, unbind
    from mjctl.errors import MjctlError

    host, port, count = settings.server.host, settings.server.port, settings.server.workers
    try:
        sock = prefork.listen(host, port)
    except OSError as exc:
        raise MjctlError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    crypto.server_secret(settings)  # generate a missing secret once, before the workers would race to
    unbind()  # no database connection may cross the fork
    bound_port = sock.getsockname()[1]
    shown_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    sys.stderr.write(f"mjctl serving on http://{shown_host}:{bound_port} ({count} workers x "
                     f"{settings.server.threads} threads{', poller in worker 0' if poll else ', no poller'}). "
                     "Press Ctrl-C to stop.\n")
    sys.stderr.flush()

    def worker(index: int) -> None:
        from mjctl.server import create_app
        from mjctl.wsgiserver import serve_forever

        open_store(settings, migrate_now=False)
        app = create_app(settings)
        stop_event = threading.Event()
        poller = _start_poller(settings, stop_event) if poll and index == 0 else None
        try:
            serve_forever(app, host, bound_port, settings.server.threads, sock=sock)
        finally:
            stop_event.set()
            if poller is not None:
                poller.join(timeout=30)

    try:
        code = prefork.run_workers(count, worker)
    finally:
        sock.close()
    sys.stderr.write("mjctl server stopped.\n")
    if code:
        raise MjctlError("The server workers kept failing; see the log above")


def _start_poller(settings, stop_event: threading.Event):
    """The polling loop in a background thread that ends when stop_event is set."""
    from mjctl.poller import start_background

    return start_background(settings, stop_event)


