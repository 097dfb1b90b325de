"""The application factory: one Bottle app per call, its context, JSON errors, the access log and the
per-request database connection.

Route modules live beside this one and each exposes ``install(app, ctx)``; ROUTE_MODULES lists them, so a
new area of the API is one module plus one line here. Every route gets, unless it opts out:

- a database connection for the request (``mjctl.db.connection()``; on SQLite the worker thread's own,
  kept open); a route declares ``db=False`` to skip
  it, and ``db_error="..."`` for the message of the 500 answered when the store fails (``sqlite_gate=False``
  keeps a long read out of the SQLite gate, on a connection of its own); a store that is
  busy or unreachable (a lock, pool or connect timeout) is a 503 instead, after a bounded wait;
- JSON errors: an ``MjctlError`` becomes ``{"success": false, "message": ...}`` with its ``http_status``,
  anything else a logged 500. A route that needs another error envelope (the midjourney-proxy relay) can
  pass ``skip=["mjctl_errors"]`` or catch the errors itself.

Unknown paths (404), wrong methods (405) and crashes (500) are JSON too, and every request is logged once
on the ``mjctl.access`` logger with its method, path (without ``sig`` or ``token`` parameters), status and time,
counted in the HTTP metrics under its route pattern, and answered with an ``X-Request-Id`` header: the
caller's own when it is sane, else a new one; log lines written while serving it carry the same id.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import bottle
import orjson
import peewee

from mjctl import metrics
from mjctl.config import Settings
from mjctl.errors import MjctlError, first_line
from mjctl.logs import request_id
from mjctl.server.openapi import OpenAPI

if TYPE_CHECKING:
    from mjctl.images.urls import ResultLinks

log = logging.getLogger("mjctl.server")
access_log = logging.getLogger("mjctl.access")

#: Modules with an ``install(app, ctx)`` function, installed in this order.
ROUTE_MODULES = [
    "mjctl.server.api",
    "mjctl.server.directory",
    "mjctl.server.relay",
    "mjctl.server.images",
    "mjctl.server.openapi",
    "mjctl.server.web",
    "mjctl.server.console",
]

#: Query parameters left out of the log (their values are secrets).
SECRET_PARAMS = frozenset({"sig", "token"})
MAX_LOGGED_PATH = 300

Installer = Callable[[bottle.Bottle, "AppContext"], None]


@dataclass
class AppContext:
    """What route modules share instead of globals: settings, the server secret, the OpenAPI document
    and caches that live as long as the app."""

    settings: Settings
    openapi: OpenAPI = field(default_factory=OpenAPI)
    cache: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def secret(self) -> bytes:
        """The server secret (configured or generated on first use)."""
        from mjctl import crypto

        return crypto.server_secret(self.settings)

    @cached_property
    def image_url(self) -> ResultLinks | None:
        """The forwarded image URL of a task; None when [images] forward is off."""
        from mjctl.images import image_url_for

        return image_url_for(self.settings)


class ApiError(MjctlError):
    """An expected failure with an HTTP status, answered as a JSON envelope."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.http_status = status
        self.headers = headers or {}


def ok(data: Any) -> dict:
    """The success envelope."""
    return {"success": True, "message": "", "data": data}


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
    """The failure envelope as a response to return or raise."""
    body = json.dumps({"success": False, "message": message})
    return bottle.HTTPResponse(body=body, status=status,
                               headers={"Content-Type": "application/json", **(headers or {})})


class ErrorPlugin:
    """MjctlError -> its status and message as JSON; any other exception -> a logged JSON 500."""

    name = "mjctl_errors"
    api = 2

    def apply(self, callback, route):
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except MjctlError as exc:
                return json_error(exc.http_status, exc.message, getattr(exc, "headers", None))
            except Exception as exc:  # the one place a route's crash becomes a 500
                busy = busy_error(exc)  # a full pool is a ValueError, raised wherever a connection is taken
                if busy is not None:
                    log.error("%s %s: database busy: %s", route.method, route.rule, first_line(exc))
                    return json_error(busy.http_status, busy.message, busy.headers)
                log.exception("unhandled error in %s %s", route.method, route.rule)
                return json_error(500, "Internal server error.")

        return wrapper


class StorePlugin:
    """One database connection per request; a store failure is a JSON 500 with the route's db_error, and
    a busy or unreachable store (``mjctl.db.busy_error``) a JSON 503: the waits behind it are bounded by
    ``[database] busy_timeout``, ``pool_timeout`` and ``connect_timeout``, so the thread is free again
    within seconds."""

    name = "mjctl_store"
    api = 2

    def __init__(self):
        # SQLite work of the API routes runs one thread at a time. Python's sqlite3 gives up the GIL on
        # every step and must win it back; with 16 threads contending, each handoff stalls, and
        # bench/api.py measured ~300 requests/s with the threads free against ~790 with this gate.
        # The routes behind it only read the local store (the relay and images routes have their own).
        self.sqlite_gate = threading.Lock()

    def apply(self, callback, route):
        if not route.config.get("db", True):
            return callback
        message = route.config.get("db_error", "The database failed; try again later.")

        # A read is retried on a fresh connection after a connection error (a database restart).
        idempotent = route.method in ("GET", "HEAD")
        gate = self.sqlite_gate
        gated = route.config.get("sqlite_gate", True)  # a long read (statistics, metrics) must not hold it

        def wrapper(*args, **kwargs):
            from mjctl.db import call_with_connection, is_sqlite, request_connection

            try:
                if is_sqlite() and gated:
                    # the thread's own SQLite connection, kept open between requests
                    with request_connection(), gate:
                        return callback(*args, **kwargs)
                # a pooled server connection, returned to the pool after the request
                return call_with_connection(callback, *args, retry=idempotent, **kwargs)
            except peewee.PeeweeException as exc:
                busy = busy_error(exc)
                if busy is not None:
                    log.error("%s %s: database busy: %s", route.method, route.rule, first_line(exc))
                    return json_error(busy.http_status, busy.message, busy.headers)
                log.error("%s %s: database error: %s", route.method, route.rule, first_line(exc))
                return json_error(500, message)

        return wrapper


def busy_error(exc: BaseException):
    """mjctl.db.busy_error, imported late (the app module loads before any store is bound)."""
    from mjctl.db import busy_error as classify

    return classify(exc)


ERROR_MESSAGES = {
    404: "Not found: there is no endpoint at this path.",
    500: "Internal server error.",
}


class MjctlApp(bottle.Bottle):
    """A Bottle app whose own error pages are JSON and which logs every request once."""

    def __init__(self, ctx: AppContext):
        super().__init__()
        self.ctx = ctx

    def default_error_handler(self, res: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        if res.status_code == 405:
            allowed = res.headers.get("Allow", "")
            message = f"Method not allowed; this endpoint accepts {allowed}." if allowed else "Method not allowed."
        else:
            message = ERROR_MESSAGES.get(res.status_code) or str(res.body or res.status_line)
        if res.status_code >= 500 and res.exception is not None:
            log.error("error %s on %s: %r", res.status_code, bottle.request.path, res.exception)
        return json.dumps({"success": False, "message": message})

    def wsgi(self, environ, start_response):
        began = time.perf_counter()
        rid = request_id_of(environ)
        token = request_id.set(rid)
        seen: list[str] = []

        def recording_start_response(status, headers, exc_info=None):
            seen.append(status)
            return start_response(status, [*headers, ("X-Request-Id", rid)], exc_info)

        try:
            out = super().wsgi(environ, recording_start_response)
            status = seen[0].split(" ", 1)[0] if seen else "-"
            took = time.perf_counter() - began
            route = environ.get("bottle.route")
            metrics.observe_request(route.rule if route is not None else "(unmatched)", status, took)
            if access_log.isEnabledFor(logging.INFO):
                remote, method = environ.get("REMOTE_ADDR", "-"), environ.get("REQUEST_METHOD")
                path = loggable_path(environ)
                access_log.info("%s %s %s %s %.1fms", remote, method, path, status, took * 1000,
                                extra={"remote_addr": remote, "method": method, "path": path,
                                       "status": int(status) if status.isdigit() else None,
                                       "duration_ms": round(took * 1000, 1)})
        finally:
            request_id.reset(token)
        return out


#: A caller's X-Request-Id is kept when it is this (a UUID, a hex or dotted trace id); otherwise one is made.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(environ: dict) -> str:
    """The request's id: the caller's X-Request-Id when it is sane (bounded, safe characters), else new."""
    given = environ.get("HTTP_X_REQUEST_ID", "")
    if given and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def loggable_path(environ: dict) -> str:
    """The request path and query with secret parameter values removed, shortened for the log."""
    path = environ.get("PATH_INFO", "") or "/"
    query = environ.get("QUERY_STRING", "")
    if query:
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() not in SECRET_PARAMS]
        if pairs:
            path = f"{path}?{urlencode(pairs)}"
    if len(path) > MAX_LOGGED_PATH:
        path = path[:MAX_LOGGED_PATH] + "…"
    return path


def create_app(settings: Settings, *, extra: Iterable[Installer] = ()) -> bottle.Bottle:
    """A new WSGI app for these settings: the routes of ROUTE_MODULES, then any extra installers (tests
    and benchmarks add routes this way). The store must already be bound (``mjctl.db.open_store``)."""
    ctx = AppContext(settings=settings)
    app = MjctlApp(ctx)
    metrics.prepare()
    # Routes return dicts; orjson encodes them (a 20-item page: 9 us against json's 100 us).
    app.uninstall(bottle.JSONPlugin)
    app.install(bottle.JSONPlugin(json_dumps=orjson.dumps))
    app.install(ErrorPlugin())
    app.install(StorePlugin())
    for module_name in ROUTE_MODULES:
        importlib.import_module(module_name).install(app, ctx)
    for installer in extra:
        installer(app, ctx)
    return app
