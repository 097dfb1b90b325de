"""`mjctl serve`: the HTTP server's worker processes, and the in-server poller beside them.

The server is granian (see mjctl.httpserver): connections live in its Rust event loop, so idle or slow
clients hold no Python thread. This process supervises ``[server] workers`` worker processes (fresh
interpreters, each with its own database connections; a worker that dies is replaced) and runs the one
in-server poller of this ``serve``, however many workers answer requests. The server, the poller and the
core are imported inside the command, so that `mjctl --help` does not load them.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Annotated

import typer

from mjctl.cli.output import configure_logging, examples
from mjctl.cli.state import state
from mjctl.errors import MjctlError

app = typer.Typer()


@app.command("serve", epilog=examples('mjctl serve --port 8080 --workers 2', 'mjctl serve --no-poll'))
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(
        "--host", help="Address to listen on ([server] host, default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", "-p", help="Port to listen on ([server] port, default 8080; 0 picks a free one).")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="API threads per worker ([server] threads, default 16).")] = None,
    no_poll: Annotated[bool, typer.Option("--no-poll", help="Do not run the poller in this process.")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", "-w", min=1, help="Server processes sharing the port ([server] workers, default 1).")] = None,
) -> None:
    """Serve the HTTP API (and the poller, unless --no-poll) until Ctrl-C or SIGTERM."""
    st = state(ctx)
    st.override("server", "host", host)
    st.override("server", "port", port)
    st.override("server", "threads", threads)
    st.override("server", "workers", workers)
    settings = st.open_store(create=True)
    configure_logging(settings.log.level, settings.log.format)

    from mjctl import crypto, metrics
    from mjctl.httpserver import Limits, probe_port, serve_processes, url_for
    from mjctl.server import load_worker

    host_, count = settings.server.host, settings.server.workers
    try:
        bound = probe_port(host_, settings.server.port)
    except OSError as exc:
        raise MjctlError(f"Cannot listen on {host_}:{settings.server.port}: {exc.strerror or exc}") from None
    # Workers must agree on one port and one secret: fix both here, before any worker starts.
    settings.server = dataclasses.replace(settings.server, port=bound)
    crypto.server_secret(settings)
    poll = not no_poll and settings.poller.in_server
    per_worker = f"{settings.server.threads} threads"
    shape = f"{count} workers x {per_worker}" if count > 1 else per_worker
    stop_event = threading.Event()
    _announce_when_listening(host_, bound, stop_event, f"mjctl serving on {url_for(host_, bound)} ({shape}"
                             f"{', poller running' if poll else ', no poller'}). Press Ctrl-C to stop.\n")
    metrics_dir = metrics.use_run_directory()  # before the poller and the workers make any metric
    poller = _start_poller(settings, stop_event) if poll else None
    try:
        serve_processes(settings, load_worker, host=host_, port=bound, workers=count,
                        limits=Limits.from_settings(settings))
    except OSError as exc:
        raise MjctlError(f"Cannot listen on {host_}:{bound}: {exc.strerror or exc}") from None
    finally:
        stop_event.set()
        if poller is not None:
            poller.join(timeout=30)
        metrics.remove_run_directory(metrics_dir)
    sys.stderr.write("mjctl server stopped.\n")


def _announce_when_listening(host: str, port: int, stop_event: threading.Event, line: str) -> None:
    """Write line to stderr once the workers accept connections on the port (they bind after they start),
    so that whoever waits for it can connect at once."""
    from mjctl.httpserver import wait_accepting

    def wait_then_write() -> None:
        if wait_accepting(host, port, timeout=120, keep_waiting=lambda: not stop_event.is_set(),
                          pause=stop_event.wait):
            sys.stderr.write(line)
            sys.stderr.flush()

    threading.Thread(target=wait_then_write, name="mjctl-announce", daemon=True).start()


def _start_poller(settings, stop_event: threading.Event):
    """The polling loop in a background thread that ends when stop_event is set."""
    from mjctl.poller import start_background

    return start_background(settings, stop_event)
