"""What every command shares: the global options, the settings they yield, and the store they open.

Commands that only read never create anything: not a database (nor its folder), not a schema, not a
server secret. Only the commands that set mjctl up (`init`, `users add`, `channels add`, `serve`, `demo`)
may create the store, and a server secret appears only where the core needs one to write.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from mjctl.errors import MjctlError

#: The package extra that brings each database scheme's driver.
DRIVER_EXTRAS = {"postgresql": "postgres", "postgres": "postgres", "mysql": "mysql", "mariadb": "mysql"}


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

    def open_store(self, *, create: bool = False):
        """Bind the database, bring its schema up to date and return the settings. Without create, a
        database that does not exist yet (a missing SQLite file, a database without mjctl's schema) is an
        error rather than made here: a mistyped URL must not leave a new, empty store behind."""
        settings = self.settings()
        if self._opened:
            return settings
        import peewee

        from mjctl import db

        url = settings.database_url()
        sqlite_path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
        if not create and sqlite_path and sqlite_path != ":memory:":
            if not Path(sqlite_path).is_file():
                raise MjctlError(f"No database at {sqlite_path} — run `mjctl init` or check [database] url.")
            if Path(sqlite_path).stat().st_size == 0:  # opening it would write SQLite's header into it
                raise MjctlError(f"No mjctl database at {sqlite_path} — run `mjctl init` or check [database] url.")
        try:
            db.open_store(settings, migrate_now=False)
        except peewee.ImproperlyConfigured:
            scheme = url.partition(":")[0].lower()
            extra = DRIVER_EXTRAS.get(scheme, scheme)
            raise MjctlError(f"The {scheme} database driver is not installed; run pip install "
                             f"'mjctl[{extra}]'.") from None
        if not create and db.current_version() == 0:
            where = sqlite_path or settings.redacted()["database"]["url"]
            raise MjctlError(f"No mjctl database at {where} — run `mjctl init` or check [database] url.")
        db.migrate()
        self._opened = True
        return settings

    def secret_exists(self) -> bool:
        """Whether a server secret is configured or kept in its file (reading it never creates one)."""
        settings = self.settings()
        return bool(settings.server.secret) or Path(settings.server.secret_file).is_file()

    def require_secret(self, why: str) -> None:
        """Refuse to go on without the server secret: a new one would not open what the old one sealed."""
        if not self.secret_exists():
            raise MjctlError(f"No server secret at {self.settings().server.secret_file}, so {why}; run with the "
                             "server's configuration (MJCTL_CONFIG=…/mjctl.toml) or set [server] secret.")


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
