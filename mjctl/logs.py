"""Where mjctl's log lines go: one setup shared by the CLI commands and the server's worker processes
(which must not load the CLI's libraries to get it)."""

from __future__ import annotations

import logging
import sys

from mjctl.textsafe import VisibleFormatter

__all__ = ["configure_logging"]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: str) -> None:
    """mjctl's log lines (the access log, poller faults) to stderr at level; stdout stays data. The lines
    quote request paths and upstream messages, so they are escaped (VisibleFormatter)."""
    logger = logging.getLogger("mjctl")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(VisibleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
