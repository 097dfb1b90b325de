"""The HTTP server: ``create_app(settings)`` builds the Bottle app (see mjctl.server.app);
``make_bridge(settings)`` puts it behind mjctl.httpserver with the limits of [server] and [relay]."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mjctl.server.app import AppContext, create_app

if TYPE_CHECKING:
    from mjctl.config import Settings
    from mjctl.httpserver import Answer, WSGIBridge

__all__ = ["AppContext", "create_app", "make_bridge", "load_worker"]


def overloaded(path: str) -> Answer:
    """The answer to a request refused because its pool is full (the upstream-bound routes', or the image and
    video answers'): HTTP 429, and on the relay routes the midjourney-proxy "queue full" envelope (code 23)
    its clients already handle."""
    import orjson

    from mjctl.relay import envelope

    headers = [("content-type", "application/json"), ("retry-after", "1")]
    if path.startswith("/mj/image/") or path.startswith("/mj/video/"):
        body = {"success": False, "message": "Too many downloads in progress; try again shortly."}
    else:
        body = envelope(23, "queue full: too many submissions in progress, try again shortly")
    return 429, headers, orjson.dumps(body)


def make_bridge(settings: Settings, app=None, *, multiprocess: bool = False) -> WSGIBridge:
    """The app (create_app(settings) unless given) behind the request limits and the thread pools of
    the upstream-bound routes, the image and video answers, and the rest."""
    from mjctl.httpserver import MEDIA_ROUTES, UPSTREAM_BOUND, Limits, WSGIBridge

    return WSGIBridge(app if app is not None else create_app(settings), Limits.from_settings(settings),
                      overloaded=overloaded, upstream_routes=UPSTREAM_BOUND, media_routes=MEDIA_ROUTES,
                      multiprocess=multiprocess)


def load_worker(settings: Settings) -> WSGIBridge:
    """One `mjctl serve` worker process: logging, its own database connections, the app behind its bridge."""
    from mjctl.db import open_store
    from mjctl.logs import configure_logging

    _die_with_parent()
    _end_without_finalizing()
    configure_logging(settings.log.level, settings.log.format)
    open_store(settings, migrate_now=False)
    return make_bridge(settings, multiprocess=settings.server.workers > 1)


def _die_with_parent() -> None:
    """Linux: end this worker when the supervising `mjctl serve` dies, even by SIGKILL, instead of serving
    on as an orphan nobody will stop."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _end_without_finalizing() -> None:
    """End the worker with os._exit once its own shutdown is done: a spawned worker otherwise finalizes the
    interpreter while granian's Rust threads still run, which aborts now and then with a Rust panic.
    Registered first, so it runs after every other exit handler; logs are flushed and the store closed."""
    import atexit
    import logging
    import os
    import sys

    def end() -> None:
        try:
            from mjctl.db import database

            database.close()
        except Exception:  # noqa: BLE001 - the process ends either way
            pass
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - as above
                pass
        os._exit(0)

    atexit.register(end)
