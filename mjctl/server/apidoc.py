"""docs/api.md from the OpenAPI document: ``python -m mjctl.server.apidoc > docs/api.md``.

:func:`build_spec` makes the document the way a running server does — ``create_app`` on throw-away
settings (defaults only: a SQLite file in a temporary folder, an empty config file, no environment), then
``GET /api/openapi.json`` through the app itself — and :func:`render_markdown` turns it into Markdown:
every path and method with its summary, description, authentication, parameters, request body and
responses, the error envelopes, and every component schema with its fields.

The output depends on the document alone and is deterministic: paths, methods, statuses, tags and schema
names are sorted; parameters and schema properties keep the order the routes declare them in.
tests/test_docs.py regenerates it and fails when docs/api.md differs.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

COMMAND = "python -m mjctl.server.apidoc > docs/api.md"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_REF = "#/components/schemas/"


def build_spec() -> dict:
    """The OpenAPI document as ``GET /api/openapi.json`` serves it, from an app on default settings."""
    from io import BytesIO
    from wsgiref.util import setup_testing_defaults

    from mjctl.config import load_settings
    from mjctl.server import create_app

    with tempfile.TemporaryDirectory(prefix="mjctl-apidoc-") as folder:
        config = Path(folder, "mjctl.toml")
        config.write_text("", encoding="utf-8")
        settings = load_settings(config, {("database", "url"): f"sqlite:///{folder}/apidoc.db",
                                          ("server", "secret"): "apidoc"}, environ={})
        app = create_app(settings)
        environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/openapi.json",
                                   "wsgi.input": BytesIO(b"")}
        setup_testing_defaults(environ)
        seen: list[str] = []
        body = b"".join(app(environ, lambda status, headers, exc_info=None: seen.append(status)))
    if not seen or not seen[0].startswith("200"):
        raise RuntimeError(f"GET /api/openapi.json answered {seen[0] if seen else 'nothing'}: {body[:200]!r}")
    return json.loads(body)


# -- rendering ----------------------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    """Text for a table cell: one line, pipes escaped."""
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _anchor(name: str) -> str:
    return "schema-" + "".join(c for c in name.lower() if c.isalnum() or c in "-_")


def _ref_name(schema: dict) -> str | None:
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    return ref[len(_REF):] if isinstance(ref, str) and ref.startswith(_REF) else None


def _link(name: str) -> str:
    return f"[`{name}`](#{_anchor(name)})"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _constraints(schema: dict) -> list[str]:
    notes = []
    for key, word in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in schema:
            notes.append(f"{word} {schema[key]}")
    for key, text in (("minLength", "at least {} characters"), ("maxLength", "at most {} characters"),
                      ("minItems", "at least {} items"), ("maxItems", "at most {} items")):
        if key in schema:
            notes.append(text.format(schema[key]))
    if "format" in schema:
        notes.append(f"format {schema['format']}")
    if "default" in schema:
        notes.append(f"default `{_json(schema['default'])}`")
    return notes


def type_of(schema: Any) -> str:
    """A schema in a few words: ``integer, ≥ 1, default `1` ``, ``array of [`TaskItem`](…)``, ``string or null``."""
    if not isinstance(schema, dict) or not schema:
        return "any"
    name = _ref_name(schema)
    if name:
        return _link(name)
    if "const" in schema:
        return f"`{_json(schema['const'])}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{_json(v)}`" for v in schema["enum"])
    for combiner, word in (("oneOf", "one of"), ("anyOf", "any of"), ("allOf", "all of")):
        if combiner in schema:
            return f"{word} (" + "; ".join(type_of(s) for s in schema[combiner]) + ")"
    kinds = schema.get("type")
    kinds = list(kinds) if isinstance(kinds, list) else ([kinds] if kinds else [])
    words = []
    for kind in kinds:
        if kind == "array":
            words.append("array of " + type_of(schema.get("items")) if schema.get("items") else "array")
        else:
            words.append(str(kind))
    text = " or ".join(words) if words else ("object" if "properties" in schema else "any")
    notes = _constraints(schema)
    return ", ".join([text, *notes])


def _field_rows(schema: dict, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(field, type, required, description) for each property; inline objects nested as a.b, arrays of
    inline objects as a[].b. Referenced schemas are linked, not expanded."""
    rows = []
    required = set(schema.get("required") or [])
    for name, prop in (schema.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        path = f"{prefix}{name}"
        rows.append((f"`{path}`", type_of(prop), "yes" if name in required else "no", prop.get("description", "")))
        if prop.get("properties") and not _ref_name(prop):
            rows += _field_rows(prop, f"{path}.")
        items = prop.get("items")
        if isinstance(items, dict) and items.get("properties") and not _ref_name(items):
            rows += _field_rows(items, f"{path}[].")
    return rows


def _fields_table(schema: dict) -> list[str]:
    rows = _field_rows(schema)
    if not rows:
        return []
    lines = ["| field | type | required | description |", "|---|---|---|---|"]
    lines += [f"| {_cell(f)} | {_cell(t)} | {r} | {_cell(d)} |" for f, t, r, d in rows]
    extra = schema.get("additionalProperties")
    if extra is False:
        lines += ["", "No other fields."]
    return lines


def shape_of(schema: dict, schemas: dict) -> str:
    """A one-line picture of an object schema: ``{"success": false, "message": string}``."""
    schema = schemas.get(_ref_name(schema) or "", schema)
    props = schema.get("properties") or {}
    parts = []
    for name, prop in props.items():
        prop = prop if isinstance(prop, dict) else {}
        if "const" in prop:
            value = _json(prop["const"])
        else:
            kinds = prop.get("type")
            value = "|".join(kinds) if isinstance(kinds, list) else str(kinds or (_ref_name(prop) or "any"))
        parts.append(f"{_json(name)}: {value}")
    return "{" + ", ".join(parts) + "}"


def _status_key(status: str) -> tuple[int, str]:
    return (int(status), "") if status.isdigit() else (1000, status)


def _body_of(content: dict | None) -> str:
    if not content:
        return "—"
    out = []
    for media in sorted(content):
        schema = (content[media] or {}).get("schema")
        out.append(f"`{media}`: {type_of(schema)}" if schema else f"`{media}`")
    return "; ".join(out)


def _operation_key(op: dict) -> str:
    """What makes two operations the same apart from where they are served and what they are called."""
    return _json({k: v for k, v in op.items() if k not in ("operationId", "summary")})


def _security(op: dict, spec: dict) -> str:
    requirements = op.get("security", spec.get("security"))
    if not requirements:
        return "none"
    schemes = spec.get("components", {}).get("securitySchemes", {})
    words = []
    for requirement in requirements:
        for name in sorted(requirement):
            scheme = schemes.get(name, {})
            if scheme.get("type") == "http" and scheme.get("scheme") == "bearer":
                words.append(f"`Authorization: Bearer <token>` ({name})")
            elif scheme.get("type") == "apiKey":
                words.append(f"`{scheme.get('name')}` in {scheme.get('in')} ({name})")
            else:
                words.append(f"`{name}`")
    return " or ".join(words)


def _render_operation(method: str, path: str, op: dict, spec: dict, aliases: list[tuple[str, str]]) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", "", op.get("summary", "").strip()]
    if op.get("description"):
        lines += ["", op["description"].strip()]
    lines += ["", f"Authentication: {_security(op, spec)}."]
    if aliases:
        lines += ["", "Also served, the same in every other respect, at:", ""]
        lines += [f"- `{method.upper()} {alias}` — {summary.strip()}" for alias, summary in aliases]
    params = op.get("parameters") or []
    if params:
        lines += ["", "Parameters:", "", "| name | in | type | required | description |", "|---|---|---|---|---|"]
        for param in params:
            lines.append(f"| `{_cell(param.get('name'))}` | {param.get('in', '')} "
                         f"| {_cell(type_of(param.get('schema')))} "
                         f"| {'yes' if param.get('required') else 'no'} | {_cell(param.get('description'))} |")
    body = op.get("requestBody")
    if body:
        required = "required" if body.get("required") else "optional"
        lines += ["", f"Request body ({required}): {_body_of(body.get('content'))}."
                  + (f" {body['description'].strip()}" if body.get("description") else "")]
    responses = op.get("responses") or {}
    if responses:
        lines += ["", "Responses:", "", "| status | description | body |", "|---|---|---|"]
        for status in sorted(responses, key=_status_key):
            response = responses[status] or {}
            lines.append(f"| {status} | {_cell(response.get('description'))} "
                         f"| {_cell(_body_of(response.get('content')))} |")
    return lines + [""]


def _error_envelopes(spec: dict) -> dict[str, set[str]]:
    """Component schemas that 4xx/5xx answers carry, each with the tags of the operations using it."""
    found: dict[str, set[str]] = {}
    for ops in spec.get("paths", {}).values():
        for method, op in ops.items():
            if method not in METHODS:
                continue
            for status, response in (op.get("responses") or {}).items():
                if not (status.isdigit() and int(status) >= 400):
                    continue
                for media in (response or {}).get("content", {}).values():
                    name = _ref_name((media or {}).get("schema") or {})
                    if name:
                        found.setdefault(name, set()).update(op.get("tags") or ["other"])
    return found


def render_markdown(spec: dict) -> str:
    """docs/api.md for an OpenAPI 3 document."""
    info = spec.get("info", {})
    schemas = spec.get("components", {}).get("schemas", {})
    lines = [
        f"# The {info.get('title', '')} HTTP API".replace("  ", " "),
        "",
        f"<!-- Generated from the OpenAPI document by `{COMMAND}`; do not edit by hand. -->",
        "",
        f"{(info.get('description') or '').strip()} The server also serves this description as an OpenAPI "
        f"{spec.get('openapi', '3')} document at `GET /api/openapi.json`. This page is generated from that "
        f"document (`{COMMAND}`), and a test fails when the two differ.",
        "",
        "Operations are grouped by tag; a path written `{name}` takes that part of the path as a parameter.",
        "",
    ]

    envelopes = _error_envelopes(spec)
    if envelopes:
        lines += ["## Errors", "", "Every error answer is JSON, in one of these envelopes:", ""]
        for name in sorted(envelopes):
            tags = ", ".join(sorted(envelopes[name]))
            lines.append(f"- {_link(name)} `{shape_of({'$ref': _REF + name}, schemas)}` — on the {tags} routes.")
        lines += [""]
        for name in sorted(envelopes):
            description = (schemas.get(name, {}).get("description") or "").strip()
            if description:
                lines += [f"{_link(name)}: {description}", ""]

    # Group identical operations (the same method, parameters, body and responses on another path).
    groups: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for path in sorted(spec.get("paths", {})):
        for method in sorted(m for m in spec["paths"][path] if m in METHODS):
            op = spec["paths"][path][method]
            groups.setdefault((method, _operation_key(op)), []).append((path, op))
    by_tag: dict[str, list[tuple[str, str, dict, list[tuple[str, str]]]]] = {}
    for (method, _key), members in groups.items():
        members.sort(key=lambda m: (len(m[0]), m[0]))
        (path, op), rest = members[0], members[1:]
        tag = (op.get("tags") or ["other"])[0]
        by_tag.setdefault(tag, []).append((path, method, op, [(p, o.get("summary", "")) for p, o in rest]))

    lines += ["## Endpoints", ""]
    for tag in sorted(by_tag):
        entries = sorted(by_tag[tag], key=lambda e: (e[0], e[1]))
        lines += [f"- {tag}: " + ", ".join(f"`{m.upper()} {p}`" for p, m, _op, _a in entries)]
    lines += [""]
    for tag in sorted(by_tag):
        lines += [f"## {tag}", ""]
        for path, method, op, aliases in sorted(by_tag[tag], key=lambda e: (e[0], e[1])):
            lines += _render_operation(method, path, op, spec, aliases)

    if schemas:
        lines += ["## Schemas", "", "The JSON bodies named above, with their fields.", ""]
        for name in sorted(schemas):
            schema = schemas[name]
            lines += [f'<a id="{_anchor(name)}"></a>', "", f"### {name}", ""]
            if schema.get("description"):
                lines += [schema["description"].strip(), ""]
            table = _fields_table(schema)
            lines += (table if table else [f"Type: {type_of(schema)}."]) + [""]

    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def main() -> None:
    sys.stdout.buffer.write(render_markdown(build_spec()).encode("utf-8"))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
