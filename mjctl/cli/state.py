"""What every command shares: the global options, the settings they yield, and the store they open."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import typer


@dataclass
class CliState:
    config: str | None = None
    database_url: str | None = None
    traceback: bool = False
    overrides: dict[tuple[str, str], Any] = field(default_factory=dict)
    _settings: Any = None
    _opened: bool = False

    def settings(self):
        if self._settings is None:
            from mjctl.config import load_settings

            overrides = dict(self.overrides)
            if self.database_url:
                overrides[("database", "url")] = self.database_url
            self._settings = load_settings(self.config, overrides)
        return self._settings

    def override(self, section: str, key: str, value: Any) -> None:
        """A command-line option that beats the file and the environment."""
        if value is not None:
            self.overrides[(section, key)] = value
            self._settings = None

    def open_store(self):
        """Bind the database (applying migrations) and return the settings."""
        settings = self.settings()
        if not self._opened:
            from mjctl.db import open_store

            open_store(settings)
            self._opened = True
        return settings


def state(ctx: typer.Context) -> CliState:
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj


@dataclass
class Env:
    """The streams and terminal facts output depends on; tests may replace them."""

    stdout_isatty: bool = field(default_factory=lambda: sys.stdout.isatty())
    color: bool = field(default_factory=lambda: "NO_COLOR" not in os.environ)


def env() -> Env:
    return Env()
