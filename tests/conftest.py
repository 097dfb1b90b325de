"""The fixtures. Every test runs in its own folder with no MJCTL_* settings leaking in from the outside.
Plain functions the tests share are in tests/helpers.py, tests/books.py and tests/relay_helpers.py."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.helpers import make_settings, temp_database
from tests.relay_helpers import start_relay


def _without_mjctl_settings(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("MJCTL_") and not name.startswith("MJCTL_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    _without_mjctl_settings(monkeypatch)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.chdir(tmp_path)
    loggers = [logging.getLogger(), logging.getLogger("mjctl")]
    saved = [(lg, lg.handlers[:], lg.level) for lg in loggers]
    yield
    for lg, handlers, level in saved:  # commands run in process configure logging; undo it
        lg.handlers[:] = handlers
        lg.setLevel(level)
    from mjctl.db import unbind

    unbind()


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path:
    """A SQLite file with every migration applied, made once a session. A test's store starts as a copy of
    it: copying takes a millisecond, migrating a new file tens of them."""
    from mjctl.db import open_store, unbind

    folder = tmp_path_factory.mktemp("migrated")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _without_mjctl_settings(monkeypatch)
        open_store(make_settings(folder))
    unbind()
    path = folder / "mjctl.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # everything in the main file, for a plain copy
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def _open_store(settings, template: Path):
    """open_store(settings); a SQLite file that does not exist yet starts as a copy of the migrated template."""
    from mjctl.db import open_store

    url = settings.database_url()
    path = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
    if path is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
    open_store(settings)  # brings the copy up to date: nothing left to migrate
    return settings


@pytest.fixture
def new_store(migrated_sqlite):
    """open_store for a test's own settings (new_store(make_settings(tmp_path, ...))); returns the settings.
    The isolated fixture unbinds the store after the test."""
    return lambda settings: _open_store(settings, migrated_sqlite)


@pytest.fixture
def store(settings, migrated_sqlite):
    """A migrated SQLite store bound to the models; yields its settings."""
    from mjctl.db import unbind

    yield _open_store(settings, migrated_sqlite)
    unbind()


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def any_store(request, tmp_path, migrated_sqlite):
    """The same store on SQLite always, and on PostgreSQL and MariaDB when their test URLs are set."""
    from mjctl.db import open_store, unbind

    if request.param == "sqlite":
        yield _open_store(make_settings(tmp_path), migrated_sqlite)
        unbind()
        return
    with temp_database(request.param) as url:
        settings = make_settings(tmp_path, url)
        open_store(settings)
        yield settings
        unbind()


@pytest.fixture
def cli(tmp_path):
    """Run `mjctl …` in process against the test folder's database; returns the Result."""
    from typer.testing import CliRunner

    from mjctl.cli import app

    runner = CliRunner()
    db_url = f"sqlite:///{tmp_path}/mjctl.db"

    def run(*args: str, env: dict | None = None, input: str | None = None):
        full_env = {"MJCTL_DATABASE_URL": db_url, "MJCTL_SERVER_SECRET": "test-secret", **(env or {})}
        return runner.invoke(app, list(args), env=full_env, input=input)

    return run


@pytest.fixture
def relay_env(store):
    """A running relay (tests/relay_helpers.py) over the test's store."""
    env = start_relay(store)
    yield env
    env.server.stop()
    env.sim.stop()
