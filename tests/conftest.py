"""The fixtures. Every test runs in its own folder with no MJCTL_* settings leaking in from the outside.
Plain functions the tests share are in tests/helpers.py, tests/books.py and tests/relay_helpers.py."""

from __future__ import annotations

import logging
import os

import pytest

from tests.helpers import make_settings, temp_database
from tests.relay_helpers import start_relay


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("MJCTL_") and not name.startswith("MJCTL_TEST_"):
            monkeypatch.delenv(name)
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


@pytest.fixture
def store(settings):
    """A migrated SQLite store bound to the models; yields its settings."""
    from mjctl.db import open_store, unbind

    open_store(settings)
    yield settings
    unbind()


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def any_store(request, tmp_path):
    """The same store on SQLite always, and on PostgreSQL and MariaDB when their test URLs are set."""
    from mjctl.db import open_store, unbind

    if request.param == "sqlite":
        settings = make_settings(tmp_path)
        open_store(settings)
        yield settings
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
