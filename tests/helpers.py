"""Plain functions shared by the test modules: settings, waiting on conditions, ports, throw-away databases.

Fixtures live in conftest.py; the books check is in tests/books.py, a running relay in tests/relay_helpers.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlparse, urlunparse

import httpx
import pytest

POSTGRES_ENV = "MJCTL_TEST_POSTGRES_URL"
MYSQL_ENV = "MJCTL_TEST_MYSQL_URL"


def make_settings(tmp_path, url: str | None = None, **overrides):
    """Settings for a test: a SQLite file in tmp_path unless url is given, a fixed server secret.
    Overrides are SECTION__KEY=value (``poller__batch_size=10``)."""
    from mjctl.config import load_settings

    values = {("database", "url"): url or f"sqlite:///{tmp_path}/mjctl.db", ("server", "secret"): "test-secret"}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        values[(section, name)] = value
    return load_settings(None, values)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def closed_port_url() -> str:
    """The URL of a port nothing listens on: connecting to it is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def app_client(app, base_url: str = "http://mjctl", **options) -> httpx.Client:
    """An httpx client calling a WSGI app in process: no socket, no server thread, the request runs in the
    calling thread. For tests of routes, auth, listings and answers. The server's own work (connection
    handling, the body limit and read deadlines, the thread pools and their 429) is not on this path;
    tests of it use a real server. base_url is the Host the app sees (a real server's URL keeps the
    links it builds pointing at that server)."""
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url=base_url, **options)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Poll predicate until it returns something truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {message or predicate}")
        time.sleep(interval)


def _with_database(url: str, name: str) -> str:
    parts = urlparse(url)
    return urlunparse(parts._replace(path="/" + name))


@contextlib.contextmanager
def temp_database(kind: str) -> Iterator[str]:
    """A fresh database on the server named by $MJCTL_TEST_POSTGRES_URL / $MJCTL_TEST_MYSQL_URL, dropped
    afterwards. Skips the test, saying why, when the variable is not set."""
    env = POSTGRES_ENV if kind == "postgres" else MYSQL_ENV
    example = "postgresql://postgres@127.0.0.1:5432/postgres" if kind == "postgres" else "mysql://root@127.0.0.1:3306/mysql"
    server_url = os.environ.get(env)
    if not server_url:
        pytest.skip(f"{kind} tests need ${env} (a server URL such as {example}); it is not set")
    name = f"mjctl_test_{uuid.uuid4().hex[:10]}"
    if kind == "postgres":
        import psycopg2

        parts = urlparse(server_url)
        admin = psycopg2.connect(host=parts.hostname, port=parts.port or 5432, user=parts.username or "postgres",
                                 password=parts.password, dbname=(parts.path.lstrip("/") or "postgres"))
        admin.autocommit = True
        admin.cursor().execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_database(server_url, name)
        finally:
            from mjctl.db import unbind

            unbind()
            cur = admin.cursor()
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            admin.close()
    else:
        import pymysql

        parts = urlparse(server_url)
        admin = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                                password=parts.password or "", autocommit=True)
        admin.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        try:
            yield _with_database(server_url, name)
        finally:
            from mjctl.db import unbind

            unbind()
            admin.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
            admin.close()


def writers_meet(monkeypatch, parties: int) -> threading.Barrier:
    """Hold each of the next `parties` writers of task changes (mjctl.reports) after it has worked out its
    changes and before it opens its write transaction, until all of them have: they then race on rows each
    of them read unfinished. Returns the barrier (broken, if a writer never came, after 10 s)."""
    from mjctl import reports

    barrier = threading.Barrier(parties, timeout=10)
    waited: set[int] = set()
    lock = threading.Lock()
    real = reports.write_tx

    def write_tx_when_all_have_planned():
        with lock:
            first = threading.get_ident() not in waited and len(waited) < parties
            waited.add(threading.get_ident())
        if first:
            barrier.wait()
        return real()

    monkeypatch.setattr(reports, "write_tx", write_tx_when_all_have_planned)
    return barrier
