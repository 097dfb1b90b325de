"""Exactly-once under pressure: racing pollers and pushes, and a poller killed with SIGKILL mid-cycle."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.books import book_problems
from tests.helpers import make_settings, temp_database, wait_until
from tests.poller_helpers import PRICE, add_channel, sim_submit, submit_charged

ROOT = Path(__file__).resolve().parent.parent


def _simulator(**opts):
    from mjctl.sim import run_simulator_in_thread

    handle = run_simulator_in_thread(secret="sim-secret", threads=32, **opts)
    handle.sim.update({"accounts": 50, "concurrency": 20, "queue_size": 10000})
    return handle


def _unfinished() -> int:
    from mjctl.models import Task

    return Task.select().where(Task.unfinished == 1).count()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_four_pollers_and_pushes_racing_over_500_tasks_keep_the_books_exact(kind, tmp_path):
    from mjctl import accounts, reports
    from mjctl.db import connection, open_store
    from mjctl.poller import poll_once
    from mjctl.upstream import UpstreamClient

    sim = _simulator(step_seconds=0.03, fail_rate=0.3, seed=11, faults={"stuck": 0.05, "progress_backwards": 0.3,
                                                                         "drop_ids": 0.05})
    try:
        sqlite = contextlib.nullcontext(f"sqlite:///{tmp_path}/race.db")
        with (temp_database(kind) if kind != "sqlite" else sqlite) as url:
            settings = make_settings(tmp_path, url, poller__task_timeout=3, poller__batch_size=40,
                                     poller__concurrency=2, database__pool_size=40)
            open_store(settings)
            users = [accounts.create_user(f"u{i}", quota=200 * PRICE)[0] for i in range(5)]
            channels = [add_channel(settings, f"sim{i}", sim.url) for i in range(2)]
            placed = []  # (channel_id, mj_id)
            for n, mj_id in enumerate(sim_submit(sim.url, 500)):
                channel = channels[n % 2]
                submit_charged(users[n % 5].id, channel.id, [mj_id])
                placed.append((channel.id, mj_id))
            stop = threading.Event()
            errors: list[BaseException] = []
            cycles = []

            def poller():
                try:
                    with connection():
                        while not stop.is_set():
                            cycles.append(poll_once(settings, take_claims=False))
                except BaseException as exc:  # noqa: BLE001 - kept for the main thread to report
                    errors.append(exc)

            def pusher(seed):
                rng = random.Random(seed)
                seen: list[tuple[int, dict]] = []
                try:
                    with UpstreamClient(sim.url, "sim-secret") as client, connection():
                        while not stop.is_set():
                            sample = rng.sample(placed, 25)
                            for channel_id in {c for c, _ in sample}:
                                ids = [m for c, m in sample if c == channel_id]
                                seen.extend((channel_id, r) for r in client.list_by_condition(ids))
                            batch = rng.sample(seen, min(len(seen), 30))  # old and new, duplicated, shuffled
                            for channel_id, report in batch + batch[:10]:
                                reports.apply_report(channel_id, report)  # a deadlock here would be a lost push
                except BaseException as exc:  # noqa: BLE001 - kept for the main thread to report
                    errors.append(exc)

            threads = [threading.Thread(target=poller) for _ in range(4)]
            threads += [threading.Thread(target=pusher, args=(s,)) for s in range(3)]
            for t in threads:
                t.start()
            try:
                wait_until(lambda: _unfinished() == 0 or errors, timeout=30, interval=0.1)
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
            assert errors == []
            assert _unfinished() == 0
            assert book_problems() == []
            from mjctl.models import Ledger, Task

            statuses = {s for (s,) in Task.select(Task.status).distinct().tuples()}
            assert statuses == {"SUCCESS", "FAILURE"}
            assert Ledger.select().where(Ledger.kind == "refund").count() == \
                Task.select().where(Task.status == "FAILURE").count()
            assert sum(c.timed_out for c in cycles) > 0
            assert sum(c.faults["database_retries"] for c in cycles) == 0  # no deadlocks, no lock timeouts
    finally:
        sim.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "mysql"])
def test_batches_refunding_users_in_opposite_orders_do_not_deadlock(kind, tmp_path):
    """reports locks task rows by id and then user rows by id, so crossing refunds never deadlock."""
    from mjctl import accounts, reports
    from mjctl.db import connection, open_store

    with (temp_database(kind) if kind != "sqlite" else contextlib.nullcontext(f"sqlite:///{tmp_path}/dl.db")) as url:
        settings = make_settings(tmp_path, url, database__pool_size=20)
        open_store(settings)
        users = [accounts.create_user(f"u{i}", quota=1000 * PRICE)[0] for i in range(2)]
        channel = add_channel(settings, "c", "http://c:1")
        ids = [submit_charged(users[n % 2].id, channel.id, [str(n)])[0] for n in range(200)]
        errors: list[BaseException] = []

        def fail(order):
            try:
                with connection():
                    for n in range(0, 200, 4):
                        chunk = order[n:n + 4]
                        reports.apply_reports(channel.id, [{"id": str(ids.index(i)), "status": "FAILURE",
                                                            "failReason": "x"} for i in chunk])
            except BaseException as exc:  # noqa: BLE001 - kept for the main thread to report
                errors.append(exc)

        orders = [ids, ids[::-1], ids[1::2] + ids[::2], ids[::2][::-1] + ids[1::2]]
        threads = [threading.Thread(target=fail, args=(o,)) for o in orders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert book_problems() == []


@pytest.mark.slow
def test_kill_9_of_the_poll_loop_twenty_times_loses_and_duplicates_nothing(tmp_path):
    from mjctl import accounts
    from mjctl.db import open_store
    from mjctl.models import PollClaim

    sim = _simulator(step_seconds=0.3, fail_rate=0.3, seed=3, slow_seconds=0.01,
                     faults={"stuck": 0.1, "slow": 1.0})
    url = f"sqlite:///{tmp_path}/kill.db"
    try:
        settings = make_settings(tmp_path, url)
        open_store(settings)
        user = accounts.create_user("victim", quota=1000 * PRICE)[0]
        channels = [add_channel(settings, f"sim{i}", sim.url) for i in range(2)]
        def more_work(n):  # the relay keeps submitting while pollers die
            for i, mj_id in enumerate(sim_submit(sim.url, n)):
                submit_charged(user.id, channels[i % 2].id, [mj_id])

        more_work(120)
        env = {**os.environ, "MJCTL_DATABASE_URL": url, "MJCTL_SERVER_SECRET": "test-secret",
               "MJCTL_POLLER_BATCH_SIZE": "4", "MJCTL_POLLER_TASK_TIMEOUT": "3", "MJCTL_LOG_LEVEL": "error",
               "PYTHONPATH": str(ROOT)}
        rng = random.Random(9)
        for _ in range(20):
            more_work(12)
            before = sim.sim.stats()["list-by-condition"]
            proc = subprocess.Popen([sys.executable, "-m", "mjctl", "poll", "--every", "1"], env=env, cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: sim.sim.stats()["list-by-condition"] > before + 2 or proc.poll() is not None,  # noqa: B023 - waited for before the loop moves on
                           timeout=20, interval=0.005, message="the poller is in a cycle")
                time.sleep(rng.uniform(0, 0.15))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()

        def clean_poll():
            out = subprocess.run([sys.executable, "-m", "mjctl", "poll", "--json"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        # The last holder was killed: a clean poll takes its claims over at once. Stuck tasks finish by
        # timing out 3 s after submission, so poll until nothing is left.
        assert clean_poll()["ran"] is True
        wait_until(lambda: _unfinished() == 0 or (clean_poll() and False), timeout=20, interval=0.05)
        assert book_problems() == []
        assert [c.holder for c in PollClaim.select()] == ["", ""]  # the dead pollers' claims were taken over
    finally:
        sim.stop()
