"""JSON text for the hot paths: orjson where it can (several times faster than json on task lists,
buttons and properties), json for the few values only json handles (NaN and Infinity in text; integers
beyond 64 bits in values)."""

from __future__ import annotations

import json
from typing import Any

import orjson

_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False) builds one per call


def loads(text: str | bytes) -> Any:
    """A JSON document as a value; ValueError when it is not JSON."""
    try:
        return orjson.loads(text)
    except ValueError:
        return json.loads(text)


def dumps(value: Any) -> str:
    """value as compact JSON text, non-ASCII kept as is."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _ENCODER.encode(value)
