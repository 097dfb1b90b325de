"""PostgreSQL and MariaDB connections under the threaded server: a database that kills every connection
mid-traffic (as a restart does) costs no failed read, and nothing leaves a transaction open."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlparse

import httpx
import peewee
import pytest

from tests.helpers import make_settings, temp_database

BACKENDS = ["postgres", "mysql"]


@pytest.fixture(params=BACKENDS)
def server_store(request, tmp_path):
    from mjctl.db import open_store

    with temp_database(request.param) as url:
        settings = make_settings(tmp_path, url, database__pool_size=4)
        open_store(settings)
        yield request.param, url, settings


def kill_connections(kind: str, url: str) -> int:
    """Terminate every server-side connection to the test database, from outside mjctl."""
    parts = urlparse(url)
    name = parts.path.lstrip("/")
    if kind == "postgres":
        import psycopg2

        admin = psycopg2.connect(host=parts.hostname, port=parts.port or 5432, user=parts.username, dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            killed = cur.fetchone()[0]
        admin.close()
        return killed
    import pymysql

    admin = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                            password=parts.password or "", autocommit=True)
    killed = 0
    with admin.cursor() as cur:
        cur.execute("SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()", (name,))
        for (conn_id,) in cur.fetchall():
            try:
                cur.execute(f"KILL {int(conn_id)}")
                killed += 1
            except pymysql.err.OperationalError:
                pass  # it ended by itself meanwhile
    admin.close()
    return killed


@pytest.mark.parametrize("path", ["/api/mj/self", "/mj/task/list"])
def test_killing_every_connection_mid_traffic_fails_no_read(server_store, path):
    """Reads of the management API and of the relay both survive their connections being killed."""
    from mjctl import accounts
    from mjctl.httpserver import ServerThread
    from mjctl.server import create_app

    kind, url, settings = server_store
    _, token = accounts.create_user("alice", quota=100)
    server = ServerThread(create_app(settings), threads=6).start()
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=20,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            while not stop.is_set():
                statuses.append(client.get(path).status_code)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        killed = 0
        for _ in range(5):
            time.sleep(0.4)
            killed += kill_connections(kind, url)
        time.sleep(0.4)
    finally:
        stop.set()
        for w in workers:
            w.join()
    try:
        assert killed >= 5, "the test killed no connection at all"
        assert len(statuses) > 50
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/healthz").json()["success"] is True
    finally:
        server.stop()


def test_a_write_is_never_retried_and_the_next_one_works(server_store):
    from mjctl.db import call_with_connection, database, write_tx
    from mjctl.models import User

    kind, url, _ = server_store
    accounts_made = []

    def create(name: str) -> None:
        with write_tx():
            accounts_made.append(name)
            database.execute_sql("SELECT 1")
            if name == "doomed":
                kill_connections(kind, url)
                database.execute_sql("SELECT 1")
            User.create(name=name, role=1, quota=0)

    with pytest.raises((peewee.OperationalError, peewee.InterfaceError)):
        call_with_connection(create, "doomed", retry=False)
    assert accounts_made == ["doomed"]  # ran once, not retried
    call_with_connection(create, "fine", retry=False)
    assert [u.name for u in call_with_connection(lambda: list(User.select()))] == ["fine"]
    assert database.is_closed() and not database.in_transaction()


def test_a_transaction_left_open_is_rolled_back_at_the_end_of_the_unit_of_work(server_store):
    from mjctl.db import connection, database
    from mjctl.models import User

    with connection():
        database.begin()
        database.push_transaction(object())  # what an atomic() that never exited leaves behind
        User.create(name="ghost", role=1, quota=0)
    assert database.is_closed() and not database.in_transaction()
    with connection():
        assert not User.select().where(User.name == "ghost").exists()
