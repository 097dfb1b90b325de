"""Who and what the task listings refer to: the caller's own account, and for admins the names behind the
user and channel ids of GET /api/mj/.

- GET /api/user/self — the caller: id, name, role and balance (the web page's header).
- GET /api/admin/users — ids and names of users: ``ids=3,7,12`` for those ids (at most 100, the largest
  page), ``q=ali`` for the names starting with it (case-insensitive, at most 20, by name).
- GET /api/admin/channels — every channel's id, name and enabled flag; never its URL or secret.

The listings keep the fields of their own documents; the page joins names to ids itself.
"""

from __future__ import annotations

import bottle

from mjctl.models import Channel, User
from mjctl.server.api import MAX_INTEGER, query_text
from mjctl.server.app import ApiError, AppContext, ok
from mjctl.server.auth import authenticate_request, require_admin
from mjctl.server.openapi import error_responses, json_response, query_param
from mjctl.tasks import MAX_PAGE_SIZE

MAX_NAME_MATCHES = 20
MAX_QUERY_LEN = 64  # the longest user name


def read_ids(query: bottle.FormsDict, name: str) -> list[int] | None:
    """A comma-separated list of ids (at most MAX_PAGE_SIZE), or None when absent; a 400 naming it otherwise."""
    raw = query_text(query, name, max_len=MAX_PAGE_SIZE * 21)
    if raw is None:
        return None
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if len(parts) > MAX_PAGE_SIZE:
        raise ApiError(400, f"The parameter {name} lists more than {MAX_PAGE_SIZE} ids.")
    if not all(part.isascii() and part.isdigit() and len(part) <= 16 and int(part) <= MAX_INTEGER for part in parts):
        raise ApiError(400, f"The parameter {name} must be whole numbers separated by commas.")
    return sorted({int(part) for part in parts})


def install(app: bottle.Bottle, ctx: AppContext) -> None:
    @app.get("/api/user/self")
    def own_account():
        user = authenticate_request(bottle.request)
        return ok({"id": user.id, "name": user.name, "role": user.role_name, "quota": int(user.quota),
                   "used_quota": int(user.used_quota)})

    @app.get("/api/admin/users")
    def user_names():
        require_admin(authenticate_request(bottle.request))
        query = bottle.request.query
        ids = read_ids(query, "ids")
        prefix = query_text(query, "q", max_len=MAX_QUERY_LEN)
        if ids is None and prefix is None:
            raise ApiError(400, "Give ids (comma-separated user ids) or q (the start of a user name).")
        if ids == []:
            return ok({"items": []})
        rows = User.select(User.id, User.name)
        if ids is not None:
            rows = rows.where(User.id.in_(ids))
        if prefix is not None:
            rows = rows.where(User.name.startswith(prefix)).order_by(User.name).limit(MAX_NAME_MATCHES)
        return ok({"items": [{"id": user.id, "name": user.name} for user in rows]})

    @app.get("/api/admin/channels")
    def channel_names():
        require_admin(authenticate_request(bottle.request))
        rows = Channel.select(Channel.id, Channel.name, Channel.enabled).order_by(Channel.name)
        return ok({"items": [{"id": c.id, "name": c.name, "enabled": bool(c.enabled)} for c in rows]})

    _document(ctx)


def _document(ctx: AppContext) -> None:
    api = ctx.openapi
    integer, string = {"type": "integer"}, {"type": "string"}

    def envelope(data: dict) -> dict:
        return {"type": "object", "required": ["success", "message", "data"],
                "properties": {"success": {"const": True}, "message": string, "data": data}}

    def items(props: dict) -> dict:
        item = {"type": "object", "required": list(props), "properties": props, "additionalProperties": False}
        return envelope({"type": "object", "required": ["items"],
                         "properties": {"items": {"type": "array", "items": item}}})

    api.schema("Account", envelope({
        "type": "object", "required": ["id", "name", "role", "quota", "used_quota"], "additionalProperties": False,
        "properties": {"id": integer, "name": string,
                       "role": {"type": "string", "description": "user, admin or root."},
                       "quota": {"type": "integer", "description": "The balance: quota left to spend."},
                       "used_quota": {"type": "integer", "description": "Quota charged minus refunds."}},
    }))
    api.schema("UserNames", items({"id": integer, "name": string}))
    api.schema("ChannelNames", items({"id": integer, "name": string, "enabled": {"type": "boolean"}}))
    api.operation("/api/user/self", "get", summary="The caller's account and balance.", tags=["accounts"],
                  responses={200: json_response("Account", "The caller."), **error_responses(401, 403, 500)})
    api.operation(
        "/api/admin/users", "get", summary="Names of users, by id or by the start of the name (admin and root only).",
        tags=["accounts"],
        parameters=[
            query_param("ids", {"type": "string", "pattern": "^[0-9, ]*$"},
                        f"Comma-separated user ids (at most {MAX_PAGE_SIZE}); unknown ids are left out."),
            query_param("q", {"type": "string", "maxLength": MAX_QUERY_LEN},
                        f"The start of a name, case-insensitive; at most {MAX_NAME_MATCHES} matches, by name."),
        ],
        responses={200: json_response("UserNames", "The users found; one of ids or q is required."),
                   **error_responses(400, 401, 403, 500)})
    api.operation("/api/admin/channels", "get", summary="Every channel's id and name (admin and root only).",
                  tags=["channels"],
                  responses={200: json_response("ChannelNames", "The channels, by name."),
                             **error_responses(401, 403, 500)})
