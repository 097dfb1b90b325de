"""The management endpoints of the user's document — GET /api/mj/self and GET /api/mj/ (also /api/mj) —
and GET /healthz.

Parameters (docs/api.md): every malformed value is a 400 naming the parameter, a page_size above
100 is served as 100, timestamps >= 100000000000 are milliseconds. Listing goes through the one listing
function (mjctl.tasks.list_tasks) and the one item shape (page_envelope).
"""

from __future__ import annotations

import logging
import re

import bottle

from mjctl import __version__
from mjctl.errors import UsageError, first_line
from mjctl.protocol import MODES
from mjctl.server.app import ApiError, AppContext, json_error, ok
from mjctl.server.auth import authenticate_request, require_admin
from mjctl.server.openapi import error_responses, json_response, query_param
from mjctl.tasks import (
    ADMIN_FIELDS,
    DEFAULT_PAGE_SIZE,
    MAX_FILTER_LEN,
    MAX_PAGE_SIZE,
    USER_FIELDS,
    TaskFilter,
    clamp_page,
    list_tasks,
    normalize_seconds,
    page_envelope,
)

log = logging.getLogger("mjctl.server")

LIST_FAILED = "Failed to retrieve task list"
MAX_INTEGER = 2**53 - 1  # what every JSON client can hold exactly
MAX_WORD_LEN = 32  # status and action names
_INTEGER = re.compile(r"[+-]?[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _raw(query: bottle.FormsDict, name: str) -> str | None:
    """A query parameter as text; None when absent or empty (an empty form field means "no filter")."""
    if name not in query:
        return None
    value = query.getunicode(name)
    if value is None:
        raise ApiError(400, f"The parameter {name} is not valid UTF-8.")
    return value if value.strip() else None


def _show(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "…")


def query_int(query: bottle.FormsDict, name: str, *, minimum: int, meaning: str) -> int | None:
    """An integer parameter >= minimum, or None when absent; a 400 naming it otherwise."""
    raw = _raw(query, name)
    if raw is None:
        return None
    text = raw.strip()
    if not _INTEGER.fullmatch(text) or len(text) > 20 or not minimum <= int(text) <= MAX_INTEGER:
        raise ApiError(400, f"The parameter {name} must be {meaning}, not {_show(raw)}.")
    return int(text)


def query_text(query: bottle.FormsDict, name: str, *, max_len: int) -> str | None:
    raw = _raw(query, name)
    if raw is None:
        return None
    if len(raw) > max_len:
        raise ApiError(400, f"The parameter {name} is too long (at most {max_len} characters).")
    if _CONTROL.search(raw):
        raise ApiError(400, f"The parameter {name} contains control characters.")
    return raw


def read_listing(*, admin: bool) -> tuple[TaskFilter, int, int]:
    """The filter and paging of a listing request, validated."""
    query = bottle.request.query
    if not query:  # the common request: page 1 of everything
        return TaskFilter(), 1, DEFAULT_PAGE_SIZE
    page = query_int(query, "p", minimum=1, meaning="a whole number of 1 or more")
    page_size = query_int(query, "page_size", minimum=1,
                          meaning=f"a whole number of 1 or more (above {MAX_PAGE_SIZE} is served as {MAX_PAGE_SIZE})")
    stamp = "epoch seconds (or milliseconds), a whole number of 0 or more"
    start = query_int(query, "start_timestamp", minimum=0, meaning=stamp)
    end = query_int(query, "end_timestamp", minimum=0, meaning=stamp)
    status = query_text(query, "status", max_len=MAX_WORD_LEN)
    action = query_text(query, "action", max_len=MAX_WORD_LEN)
    filters = TaskFilter(
        mj_id=query_text(query, "mj_id", max_len=MAX_FILTER_LEN),
        status=status.upper() if status else None,
        action=action.upper() if action else None,
        start=normalize_seconds(start) if start is not None else None,
        end=normalize_seconds(end) if end is not None else None,
    )
    if admin:
        filters.channel_id = query_int(query, "channel_id", minimum=0, meaning="a channel id (a whole number)")
        filters.user_id = query_int(query, "user_id", minimum=0, meaning="a user id (a whole number)")
        mode = query_text(query, "mode", max_len=MAX_WORD_LEN)
        if mode and mode.upper() not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}.")
        filters.mode = mode.upper() if mode else None
    page, page_size = clamp_page(page or 1, page_size or DEFAULT_PAGE_SIZE)
    return filters, page, page_size


def install(app: bottle.Bottle, ctx: AppContext) -> None:
    def listing(*, admin: bool) -> dict:
        user = authenticate_request(bottle.request)
        if admin:
            require_admin(user)
        filters, page, page_size = read_listing(admin=admin)
        if not admin:
            filters.user_id = user.id  # set last: no parameter can widen a user's view
        return ok(page_envelope(list_tasks(filters, page, page_size), admin=admin, image_url=ctx.image_url))

    @app.get("/api/mj/self", db_error=LIST_FAILED)
    def own_tasks():
        return listing(admin=False)

    def all_tasks():
        return listing(admin=True)

    for rule in ("/api/mj/", "/api/mj"):
        app.route(rule, "GET", all_tasks, db_error=LIST_FAILED)

    @app.get("/healthz", db=False)
    def healthz():
        from mjctl.db import connection, database

        try:
            with connection():
                database.execute_sql("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            detail = first_line(exc)
            log.warning("health check: the database is not reachable: %s", detail)
            return json_error(503, "The database is not reachable.")
        return ok({"database": "ok", "version": __version__})

    _document(ctx)


def _document(ctx: AppContext) -> None:
    api = ctx.openapi
    string, integer = {"type": "string"}, {"type": "integer"}
    types = {"id": integer, "submit_time": integer, "start_time": integer, "finish_time": integer,
             "quota": integer, "user_id": integer, "channel_id": integer}
    descriptions = {
        "video_urls": "A JSON array of video URLs encoded as a string; \"\" when none.",
        "progress": "Completion, e.g. \"45%\".",
        "submit_time": "Epoch seconds; 0 when not known.",
        "start_time": "Epoch seconds; 0 when not known.",
        "finish_time": "Epoch seconds; 0 when not known.",
        "quota": "Quota consumed by the task; 0 once refunded.",
        "image_url": "mjctl's forwarded URL when image forwarding is on; \"\" when the task has no image.",
        "video_url": "mjctl's signed /mj/video link when forwarding is on; \"\" when the task has no video.",
        "mode": "The generation speed it was submitted for: FAST, RELAX, TURBO, or \"\" when none was named.",
    }

    def item(fields):
        props = {f: {**types.get(f, string), **({"description": descriptions[f]} if f in descriptions else {})}
                 for f in fields}
        return {"type": "object", "required": list(fields), "properties": props, "additionalProperties": False}

    def envelope(item_ref):
        return {
            "type": "object",
            "required": ["success", "message", "data"],
            "properties": {
                "success": {"const": True},
                "message": string,
                "data": {
                    "type": "object",
                    "required": ["items", "total", "page", "page_size"],
                    "properties": {
                        "items": {"type": "array", "items": item_ref},
                        "total": {"type": "integer", "minimum": 0, "description": "Every match, not just this page."},
                        "page": {"type": "integer", "minimum": 1},
                        "page_size": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
                    },
                },
            },
        }

    user_item = api.schema("TaskItem", item(USER_FIELDS))
    admin_item = api.schema("AdminTaskItem", item(USER_FIELDS + ADMIN_FIELDS))
    api.schema("TaskPage", envelope(user_item))
    api.schema("AdminTaskPage", envelope(admin_item))
    api.schema("Health", {
        "type": "object", "required": ["success", "message", "data"],
        "properties": {"success": {"const": True}, "message": string,
                       "data": {"type": "object", "required": ["database"],
                                "properties": {"database": string, "version": string}}},
    })

    stamp = {"type": "integer", "minimum": 0}
    common = [
        query_param("p", {"type": "integer", "minimum": 1, "default": 1}, "Page number."),
        query_param("page_size", {"type": "integer", "minimum": 1, "default": DEFAULT_PAGE_SIZE},
                    f"Items per page; values above {MAX_PAGE_SIZE} are served as {MAX_PAGE_SIZE}."),
        query_param("mj_id", {"type": "string", "maxLength": MAX_FILTER_LEN}, "Exact task id."),
        query_param("start_timestamp", stamp, "submit_time >= this (epoch seconds; >= 100000000000 is milliseconds)."),
        query_param("end_timestamp", stamp, "submit_time <= this (epoch seconds; >= 100000000000 is milliseconds)."),
        query_param("status", {"type": "string", "maxLength": MAX_WORD_LEN}, "Exact status, e.g. SUCCESS."),
        query_param("action", {"type": "string", "maxLength": MAX_WORD_LEN}, "Exact action, e.g. IMAGINE."),
    ]
    failures = error_responses(400, 401, 403, 500, e500=f"The store failed: \"{LIST_FAILED}\".")
    api.operation("/api/mj/self", "get", summary="The caller's own tasks, newest first.", tags=["tasks"],
                  parameters=common, responses={200: json_response("TaskPage", "One page of tasks."), **failures})
    admin_params = common + [query_param("channel_id", {"type": "integer", "minimum": 0}, "Exact channel id."),
                             query_param("user_id", {"type": "integer", "minimum": 0}, "Exact user id (the owner)."),
                             query_param("mode", {"enum": list(MODES)}, "The generation speed it was submitted for.")]
    for rule in ("/api/mj/", "/api/mj"):
        api.operation(rule, "get", summary="All tasks, newest first (admin and root only).", tags=["tasks"],
                      parameters=admin_params,
                      responses={200: json_response("AdminTaskPage", "One page of tasks."), **failures})
    api.operation("/healthz", "get", summary="Liveness and database reachability.", tags=["meta"], secured=False,
                  responses={200: json_response("Health", "Up, and the database answers."),
                             **error_responses(503, e503="The database is not reachable.")})
