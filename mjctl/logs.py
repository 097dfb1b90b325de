"""Where mjctl's log lines go: one setup shared by the CLI commands and the server's worker processes
(which must not load the CLI's libraries to get it).

Two formats (``[log] format``): ``text``, one line per record with an ISO-8601 timestamp, the level, the
logger, the request's id when there is one, and the message; ``json``, one JSON object per line with
``timestamp``, ``level``, ``logger``, ``message`` and ``request_id`` (null outside a request), plus the
fields a record carries for machines (the access log's method, path, status and duration). In both, every
secret mjctl knows (the server secret, the channel secrets it has used) is replaced by ``***``, and
characters a terminal would act on are escaped, since lines quote request paths and upstream messages.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from mjctl.textsafe import VisibleFormatter, json_visible

__all__ = ["configure_logging", "request_id", "timestamp", "FORMATS"]

FORMATS = ("text", "json")

#: The id of the request this thread (or task) is serving; None outside a request.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mjctl_request_id", default=None)

#: Record attributes the JSON format copies as top-level fields when a record carries them (``extra=``).
JSON_FIELDS = ("method", "path", "status", "duration_ms", "remote_addr")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _scrub(text: str) -> str:
    from mjctl.upstream_text import scrub

    return scrub(text)


def timestamp(created: float) -> str:
    """ISO 8601 in local time with its UTC offset and milliseconds: 2026-11-30T14:03:07.123+01:00."""
    local = time.localtime(created)
    offset = time.strftime("%z", local)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{int(created % 1 * 1000):03d}"
            + (f"{offset[:3]}:{offset[3:]}" if offset else ""))


class TextFormatter(VisibleFormatter):
    """``<timestamp> <LEVEL> <logger> [<request id>]: <message>``, escaped and scrubbed."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s%(request_tag)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        current = getattr(record, "request_id", None) or request_id.get()
        record.request_tag = f" [{current}]" if current else ""
        return timestamp(record.created) + " " + _scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {
            "timestamp": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": _scrub(record.getMessage()),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
        }
        for name in JSON_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = _scrub(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = _scrub(self.formatStack(record.stack_info))
        return json_visible(json.dumps(entry, ensure_ascii=False, default=str))


def configure_logging(level: str, fmt: str = "text") -> None:
    """mjctl's log lines (the access log, poller faults) to stderr at level, in fmt (text or json); stdout
    stays data. Called again, it switches level and format."""
    logger = logging.getLogger("mjctl")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
