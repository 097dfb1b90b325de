"""The OpenAPI 3.1 document of every JSON endpoint, built from what the route modules register.

Each route module documents its own operations when it installs them::

    ctx.openapi.operation("/api/mj/self", "get", summary="…", tags=["tasks"],
                          parameters=[query_param("p", {"type": "integer", "minimum": 1}, "Page number.")],
                          responses={200: json_response("TaskPage", "One page."), **error_responses(400, 401)})

Bottle rules (``/mj/task/<id>/fetch``) may be given as they are; they are written as OpenAPI paths
(``/mj/task/{id}/fetch``) with their path parameters declared. ``GET /api/openapi.json`` serves the result.
A route that does not answer JSON (the web page) declares ``openapi=False`` in its route config, e.g.
``app.route("/", "GET", page, openapi=False)``; tests/test_openapi.py checks every other route is documented.
"""

from __future__ import annotations

import re
from typing import Any

from mjctl import __version__

_RULE_PARAM = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[^>]*)?>")

ERROR_DESCRIPTIONS = {
    400: "A malformed parameter; the message names it.",
    401: "A missing or unknown token.",
    403: "A disabled user, or a caller without the needed role.",
    404: "Not found.",
    405: "Method not allowed.",
    500: "The server or its store failed.",
    502: "The upstream failed.",
    503: "Unavailable.",
}


def openapi_path(rule: str) -> str:
    """A Bottle rule as an OpenAPI path: <name> and <name:filter> become {name}."""
    return _RULE_PARAM.sub(lambda m: "{" + m.group(1) + "}", rule)


def query_param(name: str, schema: dict, description: str, *, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def header_param(name: str, description: str) -> dict:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}


def json_response(schema: str | dict, description: str) -> dict:
    """A JSON response whose schema is a component name or an inline schema."""
    if isinstance(schema, str):
        schema = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error_responses(*statuses: int, **descriptions: str) -> dict:
    """The JSON error envelope for each status; descriptions override by name, e.g. e500="…"."""
    return {str(s): json_response("Error", descriptions.get(f"e{s}", ERROR_DESCRIPTIONS.get(s, "Error.")))
            for s in statuses}


class OpenAPI:
    """Operations and component schemas registered by the route modules of one app."""

    def __init__(self, title: str = "mjctl", version: str = __version__):
        self.title = title
        self.version = version
        self.paths: dict[str, dict[str, dict]] = {}
        self.schemas: dict[str, dict] = {
            "Error": {
                "type": "object",
                "required": ["success", "message"],
                "properties": {"success": {"const": False}, "message": {"type": "string"}},
            },
        }
        self.security_schemes: dict[str, dict] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An mjctl access token."},
        }

    def schema(self, name: str, schema: dict) -> dict:
        """Register a component schema; returns a $ref to it."""
        self.schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    def operation(self, rule: str, method: str, *, summary: str, responses: dict, description: str = "",
                  tags: list[str] | None = None, parameters: list[dict] | None = None, secured: bool = True,
                  request_body: dict | None = None, operation_id: str | None = None) -> None:
        """Document one operation. Path parameters of the rule are declared automatically."""
        path = openapi_path(rule)
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _RULE_PARAM.findall(rule)]
        params += parameters or []
        op: dict[str, Any] = {"summary": summary, "responses": {str(k): v for k, v in responses.items()}}
        if description:
            op["description"] = description
        if tags:
            op["tags"] = tags
        if params:
            op["parameters"] = params
        if request_body:
            op["requestBody"] = request_body
        op["operationId"] = operation_id or _operation_id(method, path)
        op["security"] = [{"bearer": []}] if secured else []
        self.paths.setdefault(path, {})[method.lower()] = op

    def document(self) -> dict:
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version,
                     "description": "Midjourney task management behind midjourney-proxy upstreams."},
            "paths": {p: dict(ops) for p, ops in sorted(self.paths.items())},
            "components": {"schemas": dict(self.schemas), "securitySchemes": dict(self.security_schemes)},
        }


def _operation_id(method: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path) or ["root"]
    return method.lower() + "".join(w.capitalize() for w in words) + ("Slash" if path.endswith("/") else "")


def install(app, ctx) -> None:
    """Serve the document at /api/openapi.json (built once, after every module has registered)."""
    import bottle

    ctx.openapi.operation(
        "/api/openapi.json", "get", summary="This OpenAPI document.", tags=["meta"], secured=False,
        responses={200: json_response({"type": "object", "required": ["openapi", "paths"]}, "The document.")},
    )

    @app.get("/api/openapi.json", db=False)
    def openapi_document():
        doc = ctx.cache.get("openapi")
        if doc is None:
            doc = ctx.cache["openapi"] = ctx.openapi.document()
        bottle.response.set_header("Cache-Control", "no-cache")
        return doc
