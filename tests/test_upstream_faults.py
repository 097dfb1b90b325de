"""Faults around mjctl rather than in it: upstreams that hang or trickle their answers, a database locked
by another process, and the server's own disk failing under the image cache. Each must cost a bounded
time, answer in the route's JSON envelope, and leave the books exact."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import pytest

from mjctl import crypto, images
from mjctl.sim import run_simulator_in_thread
from mjctl.upstream import UpstreamClient, UpstreamUnavailable
from tests.books import assert_books, balance, ledger_total
from tests.helpers import make_settings, temp_database, wait_until
from tests.relay_helpers import SIM_SECRET, start_relay

DEADLINE = 0.6  # the client's deadline under test; the default [poller] request_timeout is 15 s
RELAY_DEADLINE = 1.5  # the relay's: it starts no upstream call with less than a second left
SLACK = 1.0  # what the test allows past a deadline: scheduling, the last chunk, the JSON answer


@pytest.fixture
def trickling_sim():
    """A simulator whose every answer (API and images) comes one byte every 0.3 s."""
    handle = run_simulator_in_thread(secret=SIM_SECRET, step_seconds=0.02)
    handle.sim.update({"trickle_seconds": 0.3})
    yield handle
    handle.stop()


def timed(fn):
    began = time.monotonic()
    try:
        return fn(), time.monotonic() - began
    except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
        return exc, time.monotonic() - began


# -- the upstream client ------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["submit", "fetch", "list_by_condition", "image_seed", "probe"])
def test_every_client_call_ends_at_its_deadline_when_the_upstream_trickles(trickling_sim, call):
    with UpstreamClient(trickling_sim.url, SIM_SECRET) as setup:
        task_id = setup.submit("imagine", {"prompt": "a fox"}).task_id  # a task: answers worth trickling
    trickling_sim.sim.update({"trickle": 1.0})
    with UpstreamClient(trickling_sim.url, SIM_SECRET, timeout=DEADLINE) as client:
        calls = {
            "submit": lambda: client.submit("imagine", {"prompt": "a slow fox"}),
            "fetch": lambda: client.fetch(task_id),
            "list_by_condition": lambda: client.list_by_condition([task_id]),
            "image_seed": lambda: client.image_seed(task_id, timeout=DEADLINE),
            "probe": client.probe,
        }
        if call == "probe":  # its answer is "[]": two bytes, so a longer pause between them
            trickling_sim.sim.update({"trickle_seconds": DEADLINE + 1})
        outcome, took = timed(calls[call])
    if call == "probe":
        assert outcome.reachable is False and "within" in outcome.message
    else:
        assert isinstance(outcome, UpstreamUnavailable), outcome
        assert f"no complete answer within {DEADLINE:g} s" in outcome.message
    assert DEADLINE - 0.1 <= took <= DEADLINE + SLACK


def test_a_hanging_upstream_is_cut_at_the_deadline(trickling_sim):
    trickling_sim.sim.update({"hang": 1.0, "hang_seconds": 30})
    with UpstreamClient(trickling_sim.url, SIM_SECRET, timeout=DEADLINE) as client:
        outcome, took = timed(lambda: client.submit("imagine", {"prompt": "a fox"}))
    assert isinstance(outcome, UpstreamUnavailable)
    assert took <= DEADLINE + SLACK


def test_a_trickle_that_ends_within_the_deadline_is_a_normal_answer(trickling_sim):
    trickling_sim.sim.update({"trickle": 1.0, "trickle_seconds": 0.001})
    with UpstreamClient(trickling_sim.url, SIM_SECRET, timeout=10) as client:
        assert client.submit("imagine", {"prompt": "a fox"}).accepted


# -- the relay: a trickling upstream never yields a free task -------------------------------------------


@pytest.fixture
def short_relay(store):
    store.poller = replace(store.poller, request_timeout=RELAY_DEADLINE)
    env = start_relay(store, users=(("alice", 1000),))
    env.sim.sim.update({"trickle_seconds": 0.3})
    yield env
    env.server.stop()
    env.sim.stop()


def test_a_trickling_upstream_costs_nothing_and_holds_the_quota_until_it_is_cut(short_relay):
    from mjctl.models import Reservation, Task

    env = short_relay
    env.sim.sim.update({"trickle": 1.0})
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(r=env.submit("imagine", {"prompt": "slow"})))
    began = time.monotonic()
    worker.start()
    wait_until(lambda: Reservation.select().count() == 1, message="the first submission holds the quota")
    reservation = Reservation.get()
    # The reservation outlives the call it covers, by the slack, whatever the upstream does.
    assert reservation.expires_at >= time.time() + RELAY_DEADLINE + 30
    # Meanwhile the same user cannot spend the held quota a second time (refused before any upstream call).
    second = env.submit("imagine", {"prompt": "second"})
    assert second.status_code == 403 and second.json()["code"] == 4
    worker.join(30)
    took = time.monotonic() - began
    answer = first["r"]
    assert answer.status_code == 503 and answer.json()["code"] == 9
    assert took <= RELAY_DEADLINE + SLACK + 1
    # Not charged, no task, nothing held: the books are as before.
    assert balance("alice") == 1000 and ledger_total("alice") == (1, 1000)
    assert Task.select().count() == 0 and Reservation.select().count() == 0
    assert_books()
    # Once the upstream behaves the quota buys exactly one task.
    env.sim.sim.update({"trickle": 0.0})
    ok = env.submit("imagine", {"prompt": "now"})
    assert ok.status_code == 200 and ok.json()["code"] == 1
    again = env.submit("imagine", {"prompt": "one more"})
    assert again.status_code == 403
    assert balance("alice") == 0 and ledger_total("alice") == (2, 0)
    assert Task.select().count() == 1
    assert_books()


def test_the_reservation_lifetime_covers_every_channel_deadline(store):
    from mjctl import relay

    store.poller = replace(store.poller, request_timeout=20.0)
    assert relay.reservation_ttl(store, 3) == 3 * 20.0 + relay.RESERVATION_SLACK
    assert relay.submit_deadline(store) == 20.0


# -- a locked database ------------------------------------------------------------------------------------

BUSY_TIMEOUT = 1.0  # [database] busy_timeout: how long a write waits for the lock (5 s by default)

LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
conn.execute("UPDATE user SET quota = quota")
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_locked_sqlite_file_answers_503_within_seconds_and_changes_nothing(tmp_path, new_store):
    from mjctl.models import Ledger, Reservation, Task

    store = new_store(make_settings(tmp_path, database__busy_timeout=BUSY_TIMEOUT))
    env = start_relay(store, users=(("alice", 5000),))
    db_path = store.database_url()[len("sqlite:///"):]
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, db_path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        with env.client() as c:
            answer, took = timed(lambda: c.post("/mj/submit/imagine", json={"prompt": "a fox"}))
            assert answer.status_code == 503, answer.text
            assert answer.json() == {"code": 9, "description": "the database is busy; try again shortly",
                                     "result": None, "properties": {}}
            assert took < BUSY_TIMEOUT + 1.5
            # Readers are not blocked by a writer in WAL mode: listings still answer, at once.
            listing, took = timed(lambda: c.get("/mj/task/list"))
            assert listing.status_code == 200 and listing.json() == [] and took < 1.5
            listing, took = timed(lambda: c.get("/api/mj/self"))
            assert listing.status_code == 200 and listing.json()["success"] is True and took < 1.5
    finally:
        locker.stdin.close()
        locker.wait(10)
        env.server.stop()
        env.sim.stop()
    assert Task.select().count() == 0 and Reservation.select().count() == 0
    assert balance("alice") == 5000 and Ledger.select().count() == 1
    assert_books()


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_a_locked_server_database_answers_listings_503_within_seconds(tmp_path, kind):
    """On PostgreSQL and MariaDB a table lock blocks readers too; without a lock timeout they waited
    forever (PostgreSQL) or a day (MariaDB's metadata-lock wait)."""
    from mjctl.db import open_store
    with temp_database(kind) as url:
        settings = make_settings(tmp_path, url)
        open_store(settings)
        env = start_relay(settings, users=(("alice", 5000),))
        lock = _table_locker(kind, url)
        try:
            with env.client() as c:
                listing, took = timed(lambda: c.get("/api/mj/self"))
                assert listing.status_code == 503, listing.text
                assert listing.json() == {"success": False, "message": "The database is busy; try again shortly."}
                assert listing.headers["Retry-After"]
                assert took < 7.5
                listing, took = timed(lambda: c.get("/mj/task/list"))
                assert listing.status_code == 503
                assert listing.json()["code"] == 9 and "busy" in listing.json()["description"]
                assert took < 7.5
        finally:
            lock.close()
            env.server.stop()
            env.sim.stop()
        assert balance("alice") == 5000
        assert_books()


def _table_locker(kind: str, url: str):
    from urllib.parse import urlparse

    parts = urlparse(url)
    if kind == "postgres":
        import psycopg2

        conn = psycopg2.connect(host=parts.hostname, port=parts.port or 5432, user=parts.username or "postgres",
                                dbname=parts.path.lstrip("/"))
        conn.cursor().execute("LOCK TABLE task IN ACCESS EXCLUSIVE MODE")  # held until the connection closes
        return conn
    import pymysql

    conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                           password=parts.password or "", database=parts.path.lstrip("/"))
    conn.cursor().execute("LOCK TABLES task WRITE")
    return conn


# -- images: deadlines and the server's own disk -----------------------------------------------------------


def _finished_image(sim) -> tuple[str, str]:
    headers = {"mj-api-secret": SIM_SECRET}
    task_id = httpx.post(f"{sim.url}/mj/submit/imagine", json={"prompt": "a fox"}, headers=headers).json()["result"]

    def done():
        task = httpx.get(f"{sim.url}/mj/task/{task_id}/fetch", headers=headers).json()
        return task if task["status"] == "SUCCESS" else None

    return task_id, wait_until(done, message="simulated task finishes")["imageUrl"]


def test_a_trickled_image_is_cut_at_its_allowance_and_never_cached(tmp_path, trickling_sim):
    from mjctl.images import ImageForwarder, ImageSource, ImageUnavailable
    settings = make_settings(tmp_path, images__timeout=1.0, images__cache_dir=str(tmp_path / "cache"))
    mj_id, url = _finished_image(trickling_sim)
    trickling_sim.sim.update({"trickle": 1.0})
    with ImageForwarder(settings) as forwarder:
        source = ImageSource(mj_id, url, True, channel="sim", channel_url=trickling_sim.url)  # its own origin
        outcome, took = timed(lambda: forwarder.fetch_to_cache(source))
    assert isinstance(outcome, ImageUnavailable) and "too slowly" in outcome.message
    assert took <= 1.0 + SLACK
    assert forwarder.store.find(mj_id) is None


def test_a_hanging_image_upstream_is_a_502_within_the_timeout(store, tmp_path):
    store.images = replace(store.images, timeout=1.0)
    env = start_relay(store)
    try:
        mj_id, url = _finished_image(env.sim)
        _add_task(mj_id, url)
        env.sim.sim.update({"hang": 1.0, "hang_seconds": 30})
        with env.client(None) as c:
            answer, took = timed(lambda: c.get(f"/mj/image/{mj_id}", params={"sig": _sig(store, mj_id)}))
        assert answer.status_code == 502 and answer.json()["success"] is False
        assert took <= 1.0 + SLACK
    finally:
        env.server.stop()
        env.sim.stop()


def _add_task(mj_id: str, url: str):
    from mjctl.models import Task, User

    alice = User.get(User.name == "alice")
    return Task.create(user_id=alice.id, channel_id=1, mj_id=mj_id, status="SUCCESS", image_url=url, unfinished=0)


def _sig(settings, mj_id: str) -> str:
    return images.sign_image(crypto.server_secret(settings), mj_id)


@pytest.mark.parametrize("fault, fails", [("full", "at close"), ("full", "on write"), ("not_a_folder", "")])
def test_a_failing_cache_disk_is_one_log_line_and_the_image_is_still_served(store, tmp_path, monkeypatch, caplog,
                                                                          capfd, fault, fails):
    """A buffered temp file meets the full disk only when it is closed (the image fits its buffer), an
    unbuffered one on the first write."""
    from mjctl.images.cache import ImageCache

    if fault == "full":
        # A real ENOSPC: the cache's temp file is /dev/full (through a link, so removing it removes the link).
        full = tmp_path / "full.part"

        def temp_file(self):
            full.symlink_to("/dev/full")  # anew each time: the failed download removes it
            return open(full, "wb", buffering=(1 << 20) if fails == "at close" else 0), full

        monkeypatch.setattr(ImageCache, "temp_file", temp_file)
    else:
        (tmp_path / "cache").write_text("a file where the cache folder should be")
    store.images = replace(store.images, cache_dir=str(tmp_path / "cache"))
    env = start_relay(store)
    try:
        mj_id, url = _finished_image(env.sim)
        expected = httpx.get(url).content
        _add_task(mj_id, url)
        caplog.set_level(logging.INFO)
        caplog.clear()
        with env.client(None) as c:
            answer = c.get(f"/mj/image/{mj_id}", params={"sig": _sig(store, mj_id)})
            assert answer.status_code == 200
            assert answer.content == expected and answer.headers["X-Cache"] == "MISS"
            # The next request finds no cache entry and is served from the upstream again.
            again = c.get(f"/mj/image/{mj_id}", params={"sig": _sig(store, mj_id)})
            assert again.content == expected
        # The cache file is closed when the response is over, after the client has its last byte.
        wait_until(lambda: len([r for r in caplog.records if r.levelno >= logging.WARNING]) >= 2,
                   message="both requests are over")
    finally:
        env.server.stop()
        env.sim.stop()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one line per request
    assert all(r.name == "mjctl.images" for r in warnings)
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err
    if fault == "full":
        assert "No space left on device" in warnings[0].getMessage()
        assert ("cannot store" if fails == "at close" else "cannot write") in warnings[0].getMessage()
        assert not full.exists()  # the link is gone: nothing left behind
