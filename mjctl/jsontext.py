"""JSON text for the hot paths: orjson where it can (several times faster than json on task lists,
buttons and properties), json for the few values only json handles (NaN and Infinity in text; integers
beyond 64 bits in values).

Client bodies go through :func:`loads_strict` instead, which has no json fallback: what orjson refuses
(NaN, Infinity, unpaired surrogate escapes, invalid UTF-8) stays refused, and nesting is capped well below
what a recursive walk of the value could choke on."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False) builds one per call

MAX_DEPTH = 64  # arrays and objects; no midjourney-proxy body nests more than a few levels
_NOT_A_NUMBER = re.compile(r"-?(?:NaN|Infinity)")


class StrictJSONError(ValueError):
    """A document loads_strict refuses. Its text completes "the body is …", e.g. "not valid JSON: NaN and
    Infinity are not JSON numbers", so a route can answer it to the client as is."""


def loads(text: str | bytes) -> Any:
    """A JSON document as a value; ValueError when it is not JSON."""
    try:
        return orjson.loads(text)
    except ValueError:
        return json.loads(text)


def loads_strict(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """A client's JSON document as a value; StrictJSONError when it is not strictly JSON.

    orjson parses without Python recursion and refuses NaN, Infinity, unpaired UTF-16 surrogate escapes,
    invalid UTF-8 and nesting beyond 1024 on its own, in microseconds even for a 50,000-deep ``[[[…``; the
    parsed value is then walked without recursion for the tighter max_depth (at most 1024)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StrictJSONError(_refusal(exc, max_depth)) from None
    if isinstance(value, (dict, list)) and _deeper_than(value, max_depth):
        raise StrictJSONError(f"nested deeper than {max_depth} levels of arrays and objects")
    return value


def _refusal(exc: orjson.JSONDecodeError, max_depth: int) -> str:
    reason = exc.msg
    if "depth limit" in reason:
        return f"nested deeper than {max_depth} levels of arrays and objects"
    if "UTF-8" in reason:
        return "not valid UTF-8"
    if "surrogate" in reason:
        return f"not valid JSON: an unpaired UTF-16 surrogate escape (line {exc.lineno} column {exc.colno})"
    if _NOT_A_NUMBER.match(exc.doc, max(exc.pos - 1, 0)) or _NOT_A_NUMBER.match(exc.doc, exc.pos):
        return f"not valid JSON: NaN and Infinity are not JSON numbers (line {exc.lineno} column {exc.colno})"
    if not exc.doc.strip():
        return "not valid JSON: it is empty"
    return f"not valid JSON: {reason} (line {exc.lineno} column {exc.colno})"


def _deeper_than(value: dict | list, max_depth: int) -> bool:
    """Whether value nests more than max_depth arrays and objects (value itself is level 1)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return True
        for child in (item.values() if isinstance(item, dict) else item):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def dumps(value: Any) -> str:
    """value as compact JSON text, non-ASCII kept as is."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _ENCODER.encode(value)
