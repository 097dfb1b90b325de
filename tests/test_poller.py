"""The poller: lifecycles against the simulator, exact fault shapes, claims, the loop and the CLI."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import types
from dataclasses import replace

import httpx
import pytest

from tests.books import book_problems
from tests.helpers import wait_until
from tests.poller_helpers import PRICE, add_channel, sim_submit, submit_charged


@pytest.fixture
def sim():
    from mjctl.sim import run_simulator_in_thread

    handle = run_simulator_in_thread(secret="sim-secret", step_seconds=0.01, seed=5)
    handle.sim.update({"accounts": 4, "concurrency": 10, "queue_size": 1000})
    yield handle
    handle.stop()


@pytest.fixture
def world(store, sim):
    """A user with quota, one channel on the simulator."""
    from mjctl import accounts

    user, _ = accounts.create_user("alice", quota=100 * PRICE)
    channel = add_channel(store, "sim", sim.url)
    return types.SimpleNamespace(settings=store, sim=sim, user=user, channel=channel)


def _tasks(ids):
    from mjctl.models import Task

    return {t.id: t for t in Task.select().where(Task.id.in_(ids))}


def _poll_until_finished(settings, ids, **kwargs):
    from mjctl.poller import poll_once

    def done():
        poll_once(settings, **kwargs)
        return all(t.is_finished for t in _tasks(ids).values())

    wait_until(done, timeout=10, interval=0.02, message="every task finished")
    return _tasks(ids)


def _refunds(task_id):
    from mjctl.models import Ledger

    return Ledger.select().where((Ledger.task_id == task_id) & (Ledger.kind == "refund")).count()


# --- lifecycles against the simulator ---------------------------------------------------------------


def test_task_reaches_success_with_image_buttons_and_finish_time(world):
    ids = submit_charged(world.user.id, world.channel.id, sim_submit(world.sim.url, 3))
    tasks = _poll_until_finished(world.settings, ids)
    for task in tasks.values():
        assert task.status == "SUCCESS" and task.progress == "100%"
        assert task.image_url.startswith(world.sim.url)
        assert [b["label"] for b in task.buttons_list()][:4] == ["U1", "U2", "U3", "U4"]
        assert task.finish_time >= task.start_time > 0
        assert task.quota == PRICE and _refunds(task.id) == 0
    assert book_problems() == []


def test_upstream_failure_is_refunded_once(world):
    from mjctl import reports
    from mjctl.models import User
    from mjctl.poller import poll_once

    world.sim.sim.update({"fail_rate": 1.0})
    ids = submit_charged(world.user.id, world.channel.id, sim_submit(world.sim.url, 2))
    tasks = _poll_until_finished(world.settings, ids)
    for task in tasks.values():
        assert task.status == "FAILURE" and task.quota == 0 and task.fail_reason
        assert _refunds(task.id) == 1
    # Late and duplicate reports, and more cycles, refund nothing more.
    for task in tasks.values():
        reports.apply_report(world.channel.id, {"id": task.mj_id, "status": "FAILURE", "failReason": "again"})
        reports.apply_report(world.channel.id, {"id": task.mj_id, "status": "SUCCESS", "progress": "100%"})
    assert poll_once(world.settings).checked == 0
    assert all(_refunds(i) == 1 for i in ids)
    assert User.get_by_id(world.user.id).quota == 100 * PRICE
    assert book_problems() == []


def test_stuck_task_times_out_and_is_refunded_once(world):
    from mjctl.poller import poll_once

    world.sim.sim.update({"stuck": 1.0})
    [task_id] = submit_charged(world.user.id, world.channel.id, sim_submit(world.sim.url, 1))
    first = poll_once(world.settings)
    assert first.checked == 1 and first.timed_out == 0
    late = time.time() + world.settings.poller.task_timeout + 1
    summary = poll_once(world.settings, now=late)
    assert (summary.timed_out, summary.refunded, summary.quota_refunded) == (1, 1, PRICE)
    task = _tasks([task_id])[task_id]
    assert task.status == "FAILURE" and task.quota == 0
    assert task.fail_reason.startswith("Timed out: still ") and "after submission" in task.fail_reason
    assert poll_once(world.settings, now=late + 100).checked == 0
    assert _refunds(task_id) == 1 and book_problems() == []


def test_task_the_upstream_no_longer_reports_times_out(world):
    from mjctl.poller import poll_once

    [task_id] = submit_charged(world.user.id, world.channel.id, ["1700000000000123"])
    summary = poll_once(world.settings)
    assert summary.faults["missing_ids"] == 1 and summary.failed == 0
    summary = poll_once(world.settings, now=time.time() + world.settings.poller.task_timeout + 1)
    assert summary.timed_out == 1
    task = _tasks([task_id])[task_id]
    assert "no longer reported by the upstream" in task.fail_reason and _refunds(task_id) == 1


def test_task_on_removed_channel_fails_at_once_and_is_refunded(world):
    from mjctl import channels
    from mjctl.poller import poll_once

    [task_id] = submit_charged(world.user.id, world.channel.id, sim_submit(world.sim.url, 1))
    channels.remove_channel("sim")
    summary = poll_once(world.settings)
    assert (summary.failed, summary.refunded, summary.requests) == (1, 1, 0)
    task = _tasks([task_id])[task_id]
    assert task.status == "FAILURE" and "was removed" in task.fail_reason and task.quota == 0
    assert _refunds(task_id) == 1 and book_problems() == []


def test_disabled_channel_keeps_being_polled_until_its_tasks_finish(world):
    from mjctl import channels

    ids = submit_charged(world.user.id, world.channel.id, sim_submit(world.sim.url, 2))
    channels.set_enabled("sim", False)
    tasks = _poll_until_finished(world.settings, ids)
    assert {t.status for t in tasks.values()} == {"SUCCESS"}


def test_succeeded_tasks_go_to_the_image_prefetch_hook(world, monkeypatch):
    seen = []
    fake = types.ModuleType("mjctl.images")
    fake.prefetch_hook = lambda settings: (lambda task: seen.append(task.mj_id))
    monkeypatch.setitem(sys.modules, "mjctl.images", fake)
    mj_ids = sim_submit(world.sim.url, 2)
    _poll_until_finished(world.settings, submit_charged(world.user.id, world.channel.id, mj_ids))
    assert sorted(seen) == sorted(mj_ids)


# --- exact fault shapes -------------------------------------------------------------------------------


def _fault_transport(progress_by_id: dict[str, str]):
    """One host per fault; host ok answers with an unknown id, leaves one id out and goes backwards."""

    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if host == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        if host == "five":
            return httpx.Response(502, text="<html>Bad Gateway</html>")
        if host == "unauth":
            return httpx.Response(401)
        if host == "limited":
            return httpx.Response(429, headers={"Retry-After": "3"})
        if host == "garbled":
            return httpx.Response(200, content=b'[{"id": "1", "status": ')
        ids = json.loads(request.content)["ids"]
        answer = [{"id": "9999999999999999", "status": "SUCCESS"}]
        for mj_id in ids[1:]:
            answer.append({"id": mj_id, "status": "IN_PROGRESS", "progress": progress_by_id.get(mj_id, "50%")})
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handler)


def test_each_fault_is_counted_and_never_stops_the_other_channels(store):
    from mjctl import accounts, reports
    from mjctl.poller import poll_once

    user, _ = accounts.create_user("bob", quota=100 * PRICE)
    hosts = ["timeout", "refused", "five", "unauth", "limited", "garbled", "ok"]
    channel_ids = {h: add_channel(store, h, f"http://{h}:80").id for h in hosts}
    tasks = {h: submit_charged(user.id, channel_ids[h], [f"17000000000001{i}{n:02d}" for n in range(3)])
             for i, h in enumerate(hosts)}
    ok_ids = [f"170000000000016{n:02d}" for n in range(3)]
    reports.apply_report(channel_ids["ok"], {"id": ok_ids[2], "status": "IN_PROGRESS", "progress": "62%"})
    store.poller = replace(store.poller, concurrency=3)
    summary = poll_once(store, transport=_fault_transport({ok_ids[1]: "31%", ok_ids[2]: "15%"}))
    faults = summary.faults
    assert (faults["timeout"], faults["unreachable"], faults["http_5xx"], faults["unauthorized"],
            faults["rate_limited"], faults["malformed_answer"]) == (1, 1, 1, 1, 1, 1)
    assert (faults["unknown_ids"], faults["missing_ids"], faults["progress_backwards"]) == (1, 1, 1)
    assert sorted(summary.channels_with_errors) == sorted(hosts[:-1])
    assert summary.checked == 21 and summary.requests == 7 and summary.failed == 0
    ok = _tasks(tasks["ok"])
    assert [ok[i].progress for i in tasks["ok"]] == ["0%", "31%", "62%"]
    # Past the timeout, every channel's tasks fail with a reason naming what went wrong, refunded once.
    later = poll_once(store, now=time.time() + store.poller.task_timeout + 1,
                      transport=_fault_transport({}))
    assert later.timed_out == 21 and later.refunded == 21
    reasons = {h: _tasks(tasks[h])[tasks[h][0]].fail_reason for h in hosts}
    assert "channel unauth keeps failing (unauthorized" in reasons["unauth"]
    assert "keeps answering malformed lists" in reasons["garbled"]
    assert "no longer reported" in reasons["ok"]
    assert book_problems() == []


def test_a_crash_on_one_channel_is_counted_and_the_rest_goes_on(store):
    from mjctl import accounts
    from mjctl.poller import poll_once

    class Exploding:
        def list_by_condition(self, ids):
            raise RuntimeError("boom")

    user, _ = accounts.create_user("carol", quota=10 * PRICE)
    bad, good = add_channel(store, "bad", "http://bad:1"), add_channel(store, "good", "http://good:1")
    submit_charged(user.id, bad.id, ["1"])
    [good_task] = submit_charged(user.id, good.id, ["2"])
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=[{"id": "2", "status": "SUCCESS"}]))
    summary = poll_once(store, clients={bad.id: Exploding()}, transport=transport)
    assert summary.faults["error_RuntimeError"] == 1 and summary.succeeded == 1
    assert _tasks([good_task])[good_task].status == "SUCCESS"


def test_a_cycle_spaces_young_collections_out_and_restores_the_thresholds_even_after_a_crash(store):
    """While a cycle runs the collector's young collections are spaced out (process-wide, so cycles that
    overlap share it); when the last cycle ends, the thresholds are what they were, a crash included."""
    import gc

    from mjctl import accounts
    from mjctl.poller import CYCLE_GC_THRESHOLD, poll_once

    seen = []

    class Recording:
        def __init__(self, *, fail=False, nested=None):
            self.fail, self.nested = fail, nested

        def list_by_condition(self, ids):
            seen.append(gc.get_threshold())
            if self.fail:
                raise RuntimeError("boom")
            if self.nested is not None:  # another cycle runs and ends inside this one
                inner.append(poll_once(store, clients=self.nested, take_claims=False))
                seen.append(gc.get_threshold())
            return [{"id": i, "status": "IN_PROGRESS", "progress": "5%"} for i in ids]

    user, _ = accounts.create_user("gina", quota=10 * PRICE)
    ok, bad = add_channel(store, "ok", "http://ok:1"), add_channel(store, "bad", "http://bad:1")
    submit_charged(user.id, ok.id, ["1"])
    submit_charged(user.id, bad.id, ["2"])
    leaves = {ok.id: Recording(), bad.id: Recording()}
    before = gc.get_threshold()
    inner = []
    try:
        gc.set_threshold(900, 11, 12)
        summary = poll_once(store, clients={ok.id: Recording(nested=leaves), bad.id: Recording(fail=True)},
                            take_claims=False)
        after = gc.get_threshold()
        gc.set_threshold(80_000, 11, 12)  # an operator's higher threshold is kept
        poll_once(store, clients={ok.id: Recording(), bad.id: Recording(fail=True)}, take_claims=False)
        kept = gc.get_threshold()
    finally:
        gc.set_threshold(*before)
    assert summary.faults["error_RuntimeError"] == 1 and inner[0].checked == 2 and inner[0].updated == 2
    assert len(seen) == 7 and all(t == (CYCLE_GC_THRESHOLD, 11, 12) for t in seen[:5]), seen
    assert after == (900, 11, 12)
    assert all(t == (80_000, 11, 12) for t in seen[5:]) and kept == (80_000, 11, 12), seen


def test_on_sqlite_every_write_of_a_cycle_goes_through_one_connection(store, monkeypatch):
    """Workers fetch in parallel; their answers and their claims are written by one store thread, each
    channel's answers before its claim is released, and a write that fails is that channel's fault alone."""
    from mjctl import accounts, reports
    from mjctl.claims import Claims
    from mjctl.poller import poll_once

    user, _ = accounts.create_user("dora", quota=100 * PRICE)
    channels = [add_channel(store, f"c{n}", f"http://c{n}:1") for n in range(4)]
    tasks = {c.id: submit_charged(user.id, c.id, [f"{c.id}00{n}" for n in range(6)]) for c in channels}
    broken = channels[3].id
    events: list[tuple[str, int, int]] = []
    apply_reports, release, claim_next = reports.apply_reports, Claims.release, Claims.claim_next

    def recorded_apply(channel_id, answer, **kwargs):
        events.append(("write", channel_id, threading.get_ident()))
        if channel_id == broken:
            raise RuntimeError("disk full")
        return apply_reports(channel_id, answer, **kwargs)

    def recorded_release(self, channel_id):
        events.append(("release", channel_id, threading.get_ident()))
        return release(self, channel_id)

    def recorded_claim(self, channel_ids):
        channel_id = claim_next(self, channel_ids)
        events.append(("claim", channel_id or 0, threading.get_ident()))
        return channel_id

    monkeypatch.setattr(reports, "apply_reports", recorded_apply)
    monkeypatch.setattr(Claims, "release", recorded_release)
    monkeypatch.setattr(Claims, "claim_next", recorded_claim)
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=[
        {"id": mj_id, "status": "IN_PROGRESS", "progress": "40%"} for mj_id in json.loads(r.content)["ids"]]))
    store.poller = replace(store.poller, concurrency=4, batch_size=2)
    summary = poll_once(store, transport=transport)

    writers = {ident for _, _, ident in events}  # answers, claims taken and claims given back
    assert len(writers) == 1 and threading.get_ident() not in writers
    for channel in channels:
        mine = [kind for kind, cid, _ in events if cid == channel.id]
        # the broken channel stops at its first failed write, with at most the batches handed over by then
        assert mine[0] == "claim" and mine[-1] == "release" and (
            1 <= mine.count("write") <= 3 if channel.id == broken else mine.count("write") == 3), mine
    assert summary.faults["error_RuntimeError"] == 1 and summary.updated == 18
    for channel in channels:
        progress = {t.progress for t in _tasks(tasks[channel.id]).values()}
        assert progress == ({"0%"} if channel.id == broken else {"40%"})
    assert not [t for t in threading.enumerate() if t.name.startswith("mjctl-poll")]
    assert book_problems() == []


@pytest.mark.parametrize(("lane_reports", "depth"), [(6, 3), (1, 1)])
def test_a_worker_fetches_at_most_its_bound_ahead_of_the_store_lane(store, monkeypatch, lane_reports, depth):
    """A worker hands its answers to the store lane and fetches on, with at most LANE_REPORTS reports waiting
    there, in whole answers (at least one): past that it waits for its oldest to be written."""
    from mjctl import accounts, poller
    from mjctl.poller import poll_once

    class Unwritten:  # an answer handed over, written only when the worker waits for it
        def __init__(self, fn):
            self.fn, self.done, self.value = fn, False, None

        def result(self):
            if not self.done:
                self.value, self.done = self.fn(), True
            return self.value

    handed: list[Unwritten] = []
    waiting: list[int] = []  # as each job is handed over: the jobs handed and not yet run, itself included

    class IdleLane:  # runs a job only when it is waited for, so nothing is written unless the worker waits
        def submit(self, fn):
            handed.append(job := Unwritten(fn))
            waiting.append(sum(not j.done for j in handed))
            return job

        def run(self, fn):
            return fn()

        def close(self):
            pass

    monkeypatch.setattr(poller, "_StoreLane", IdleLane)
    monkeypatch.setattr(poller, "LANE_REPORTS", lane_reports)
    user, _ = accounts.create_user("erin", quota=100 * PRICE)
    channel = add_channel(store, "lane", "http://lane:1")
    submit_charged(user.id, channel.id, [f"l{n:02d}" for n in range(20)])
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=[
        {"id": mj_id, "status": "IN_PROGRESS", "progress": "40%"} for mj_id in json.loads(r.content)["ids"]]))
    store.poller = replace(store.poller, concurrency=1, batch_size=2)
    summary = poll_once(store, transport=transport)

    assert summary.updated == 20 and all(job.done for job in handed)
    assert len(handed) == 1 + 10  # the channel's rows read whole, then its 10 answers
    assert max(waiting) == depth + 1  # its bound of answers waiting, and the one just handed over
    assert book_problems() == []


# --- claims and idle cost -----------------------------------------------------------------------------


def test_second_cycle_while_one_runs_says_nothing_is_left_to_claim(store):
    from mjctl import accounts
    from mjctl.models import PollClaim
    from mjctl.poller import poll_once

    user, _ = accounts.create_user("dave", quota=10 * PRICE)
    channel = add_channel(store, "slow", "http://slow:1")
    submit_charged(user.id, channel.id, ["1"])
    entered, release = threading.Event(), threading.Event()

    def handler(request):
        entered.set()
        release.wait(10)
        return httpx.Response(200, json=[])

    results = []
    first = threading.Thread(target=lambda: results.append(poll_once(store, transport=httpx.MockTransport(handler))))
    first.start()
    assert entered.wait(10)
    second = poll_once(store, transport=httpx.MockTransport(handler))
    release.set()
    first.join(10)
    assert not second.ran and second.message.startswith("nothing to claim: 1 channel(s) being polled by ")
    assert socket.gethostname() in " ".join(second.claim_holders) and second.requests == 0
    assert results[0].ran and results[0].requests == 1
    assert PollClaim.get_by_id(channel.id).holder == ""  # released


@pytest.mark.parametrize("holder, expires_in, runs", [
    ("otherhost:123:abcd", 60, False),   # a live claim elsewhere is respected
    ("otherhost:123:abcd", -1, True),    # an expired one is taken over
    (f"{socket.gethostname()}:999999:dead", 60, True),  # a dead process on this host: at once
])
def test_claim_expiry_and_dead_holders(store, holder, expires_in, runs):
    from mjctl import accounts
    from mjctl.models import PollClaim
    from mjctl.poller import poll_once

    user, _ = accounts.create_user("erin", quota=10 * PRICE)
    channel = add_channel(store, "c", "http://c:1")
    submit_charged(user.id, channel.id, ["1"])
    PollClaim.create(channel_id=channel.id, holder=holder, expires_at=time.time() + expires_in, polled_at=1.0)
    summary = poll_once(store, transport=httpx.MockTransport(lambda r: httpx.Response(200, json=[])))
    assert summary.ran is runs and summary.requests == (1 if runs else 0)
    assert any(holder in held for held in summary.claim_holders) is (not runs)


def test_a_channel_polled_in_this_round_or_recently_is_not_polled_again(store):
    """A poller skips a channel claimed after its own cycle began (another poller of the same round did
    it), and a looping poller one polled in a round that began less than fresh_for seconds ago."""
    from mjctl import accounts
    from mjctl.models import PollClaim
    from mjctl.poller import poll_once

    user, _ = accounts.create_user("fay", quota=10 * PRICE)
    channel = add_channel(store, "c", "http://c:1")
    submit_charged(user.id, channel.id, ["1"])
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=[]))
    assert poll_once(store, transport=transport).requests == 1
    claim = PollClaim.get_by_id(channel.id)
    assert claim.holder == "" and claim.polled_at >= claim.round_started_at > 0
    PollClaim.update(polled_at=time.time() + 5).execute()  # as if claimed after the next cycle began
    assert poll_once(store, transport=transport).ran is False
    PollClaim.update(polled_at=time.time() - 5, round_started_at=time.time() - 5).execute()
    assert poll_once(store, transport=transport, fresh_for=10).ran is False
    assert poll_once(store, transport=transport, fresh_for=3).requests == 1


def test_idle_cycle_is_one_indexed_lookup(store):
    from mjctl.db import database
    from mjctl.models import PollClaim, Task
    from mjctl.poller import _has_unfinished, poll_once

    Task.insert_many([{"user_id": 1, "channel_id": 1, "mj_id": str(i), "status": "SUCCESS", "unfinished": 0}
                      for i in range(200)]).execute()
    statements = []
    real_execute = database.obj.execute_sql

    def spy(sql, params=None, *args, **kwargs):
        statements.append(sql)
        return real_execute(sql, params, *args, **kwargs)

    database.obj.execute_sql = spy
    try:
        summary = poll_once(store)
    finally:
        database.obj.execute_sql = real_execute
    assert summary.message == "nothing unfinished" and summary.requests == 0
    # Two seeks: submissions a dead process left in flight (none), then unfinished tasks (none).
    assert len(statements) == 2 and "pending_submission" in statements[0] and "unfinished" in statements[1]
    assert PollClaim.select().count() == 0
    plan = " ".join(str(r) for r in database.execute_sql("EXPLAIN QUERY PLAN " + statements[1], [1, 1]).fetchall())
    assert "INDEX task_unfinished_channel_id" in plan and "TEMP B-TREE" not in plan, plan
    plan = " ".join(str(r) for r in database.execute_sql("EXPLAIN QUERY PLAN " + statements[0], [1e12, 100]).fetchall())
    assert "INDEX pendingsubmission_expires_at" in plan or "INDEX pending_submission_expires_at" in plan, plan
    assert _has_unfinished() is False


# --- the loop and the CLI -----------------------------------------------------------------------------


def test_loop_runs_at_once_survives_a_failing_cycle_and_stops_on_the_event(store, monkeypatch):
    from mjctl import poller

    calls = []

    def fake_poll_once(settings, **kwargs):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("first cycle explodes")
        return poller.CycleSummary()

    monkeypatch.setattr(poller, "poll_once", fake_poll_once)
    stop = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=poller.run_loop, args=(store, stop, 0.05), daemon=True)
    thread.start()
    wait_until(lambda: len(calls) >= 3, timeout=5)
    assert calls[0] - started < 0.5
    stop.set()
    thread.join(2)
    assert not thread.is_alive()


def test_start_background_polls_until_stopped(world):
    from mjctl import poller

    world.settings.poller = replace(world.settings.poller, interval=0.05)
    ids = submit_charged(world.user.id, world.channel.id, sim_submit(world.sim.url, 2))
    stop = threading.Event()
    thread = poller.start_background(world.settings, stop)
    assert thread.daemon and thread.is_alive()
    wait_until(lambda: all(t.is_finished for t in _tasks(ids).values()), timeout=10)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_cli_poll_prints_a_summary_plain_and_json(cli, tmp_path):
    assert cli("init").exit_code == 0
    result = cli("poll", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ran"] is True and data["checked"] == 0 and data["message"] == "nothing unfinished"
    plain = cli("poll")  # one line, fit for a cron log: its date and time, then the counts
    assert plain.exit_code == 0
    assert len(plain.stdout.splitlines()) == 1
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\S* tasks checked 0; ", plain.stdout)
    verbose = cli("poll", "--verbose")
    assert "tasks checked\t0" in verbose.stdout and "upstream requests\t0" in verbose.stdout


def test_cli_poll_exits_zero_when_nothing_is_left_to_claim(cli, tmp_path):
    assert cli("init").exit_code == 0
    from mjctl.config import load_settings
    from mjctl.db import open_store
    from mjctl.models import Channel, PollClaim, Task

    open_store(load_settings(None, {("database", "url"): f"sqlite:///{tmp_path}/mjctl.db"}))
    channel = Channel.create(name="c", base_url="http://c:1")
    Task.create(user_id=1, channel_id=channel.id, mj_id="1", status="SUBMITTED", unfinished=1)
    PollClaim.create(channel_id=channel.id, holder="elsewhere:1:abc", expires_at=time.time() + 60)
    result = cli("poll")
    assert result.exit_code == 0
    assert "skipped: nothing to claim: 1 channel(s) being polled by elsewhere:1:abc" in result.stdout
    assert "nothing to claim" in cli("poll", "--verbose").stderr
    result = cli("poll", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["ran"] is False and data["claim_holders"][0].startswith("elsewhere:1:abc until ")


def test_one_shot_cli_poll_waits_for_the_image_prefetcher_to_drain(cli, monkeypatch):
    """Cron-run polls must not exit before the images of tasks that just succeeded are cached."""
    from mjctl import poller

    waits = []

    class Prefetcher:
        def wait_idle(self, timeout):
            waits.append(timeout)
            return True

    fake = types.ModuleType("mjctl.images")

    def prefetch_hook(settings):
        def hook(task):
            return None

        hook.prefetcher = Prefetcher()
        return hook

    fake.prefetch_hook = prefetch_hook
    monkeypatch.setitem(sys.modules, "mjctl.images", fake)
    assert cli("init").exit_code == 0
    monkeypatch.setattr(poller, "poll_once", lambda settings: poller.CycleSummary(checked=1, succeeded=1))
    result = cli("poll", env={"MJCTL_IMAGES_TIMEOUT": "7"})
    assert result.exit_code == 0, result.output
    assert waits == [7.0]
    monkeypatch.setattr(poller, "poll_once", lambda settings: poller.CycleSummary(checked=1))
    assert cli("poll").exit_code == 0 and waits == [7.0]  # nothing succeeded: no wait
