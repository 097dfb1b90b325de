"""Every test runs in its own folder with no MJCTL_* settings leaking in from the outside."""

from __future__ import annotations

import logging
import os

import pytest

from tests.helpers import temp_database

pytest_plugins = ["tests.relay_fixtures"]  # relay_env, for every test that asks for it


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


def make_settings(tmp_path, url: str | None = None, **overrides):
    """Settings for a test: a SQLite file in tmp_path unless url is given, a fixed server secret."""
    from mjctl.config import load_settings

    values = {("database", "url"): url or f"sqlite:///{tmp_path}/mjctl.db", ("server", "secret"): "test-secret"}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        values[(section, name)] = value
    return load_settings(None, values)


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
