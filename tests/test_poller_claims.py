"""Work sharing between pollers: each channel is polled by one of them per round, and a claim
whose holder died expires so its channel is polled again."""

from __future__ import annotations

import contextlib
import math
import threading
import time

import pytest

from tests.books import book_problems
from tests.helpers import make_settings, temp_database, wait_until
from tests.poller_helpers import PRICE, add_channel, sim_submit, submit_charged


def _simulator(**opts):
    from mjctl.sim import run_simulator_in_thread

    handle = run_simulator_in_thread(secret="sim-secret", threads=32, **opts)
    handle.sim.update({"accounts": 50, "concurrency": 50, "queue_size": 10000})
    return handle


def _unfinished_by_channel() -> dict[int, int]:
    from peewee import fn

    from mjctl.models import Task

    query = (Task.select(Task.channel_id, fn.COUNT(Task.id)).where(Task.unfinished == 1)
             .group_by(Task.channel_id).tuples())
    return dict(query)


def _round(settings, sim, pollers: int):
    """Start `pollers` cycles at once (threads with their own connections); returns the upstream
    list-by-condition requests they made, what one poller needs (ceil(unfinished / batch) per channel) and
    their summaries."""
    from mjctl.db import connection
    from mjctl.poller import poll_once

    batch = settings.poller.batch_size
    with connection():
        expected = {cid: math.ceil(n / batch) for cid, n in _unfinished_by_channel().items()}
    before = sim.sim.stats()["list-by-condition"]
    barrier = threading.Barrier(pollers)
    summaries, errors = [], []

    def run():
        try:
            with connection():
                barrier.wait()
                summaries.append(poll_once(settings))
        except BaseException as exc:  # noqa: BLE001 - kept for the main thread to report
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(pollers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    return sim.sim.stats()["list-by-condition"] - before, expected, summaries


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgres", "mysql"])
def test_three_pollers_share_each_round_and_an_expired_claim_is_polled_again(kind, tmp_path):
    from mjctl import accounts
    from mjctl.db import open_store
    from mjctl.models import PollClaim

    # Slow answers (50 ms a request) keep each channel's claim held long enough that the three pollers'
    # cycles overlap as they would in production, whatever the thread scheduling; the lease outlasts a
    # round on a busy machine (a claim that expired mid-round would be taken and polled twice).
    sim = _simulator(step_seconds=1.5, fail_rate=0.3, seed=7, slow_seconds=0.05, faults={"slow": 1.0})
    try:
        sqlite = contextlib.nullcontext(f"sqlite:///{tmp_path}/claims.db")
        with (temp_database(kind) if kind != "sqlite" else sqlite) as url:
            settings = make_settings(tmp_path, url, poller__batch_size=10, poller__concurrency=2,
                                     poller__lease_seconds=10, poller__task_timeout=60, database__pool_size=20)
            open_store(settings)
            users = [accounts.create_user(f"u{i}", quota=100 * PRICE)[0] for i in range(3)]
            channels = [add_channel(settings, f"sim{i}", sim.url) for i in range(2)]
            for n, mj_id in enumerate(sim_submit(sim.url, 100)):
                submit_charged(users[n % 3].id, channels[n % 2].id, [mj_id])

            # Three pollers at once send what one would: each channel once, by one of them.
            requests, expected, summaries = _round(settings, sim, 3)
            assert expected == {channels[0].id: 5, channels[1].id: 5}
            assert requests == 10
            assert sum(s.channels for s in summaries) == 2 and sum(s.checked for s in summaries) == 100
            idle = [s for s in summaries if not s.ran]
            assert all(s.message.startswith("nothing to claim") for s in idle)

            # A poller on another host died holding channel 0's claim: the others leave it alone until it
            # expires, then poll it again.
            left = math.ceil(_unfinished_by_channel()[channels[0].id] / 10)  # (1.5 s steps: most still run)
            dies_at = time.time() + 1.5
            PollClaim.update(holder="otherhost:4242:gone", expires_at=dies_at).where(
                PollClaim.channel_id == channels[0].id).execute()
            requests, expected, summaries = _round(settings, sim, 3)
            assert expected[channels[0].id] == left  # nobody polled channel 0 since
            assert requests == expected.get(channels[1].id, 0)  # (channel 1's may all have finished by now)
            assert sum(s.channels for s in summaries) == len(expected) - 1
            time.sleep(max(0.0, dies_at - time.time()) + 0.1)
            requests, expected, summaries = _round(settings, sim, 3)
            assert expected[channels[0].id] == left
            assert requests == sum(expected.values()) and sum(s.channels for s in summaries) == len(expected)

            # Round after round until every task is finished: never more requests than one poller's.
            def finished():
                sent, wanted, _ = _round(settings, sim, 3)
                assert sent == sum(wanted.values())
                return not _unfinished_by_channel()

            wait_until(finished, timeout=40, interval=0.2, message="every task finished")
            assert book_problems() == []
            assert {c.holder for c in PollClaim.select()} == {""}
    finally:
        sim.stop()
