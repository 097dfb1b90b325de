"""A long-running poller's memory: a report that changed nothing last cycle is not worked out again while
its task's row is unwritten; any write to the row, by anyone, brings it back."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.helpers import wait_until
from tests.poller_helpers import PRICE, add_channel, book_problems, submit_charged


@pytest.fixture
def upstream():
    """An upstream whose list-by-condition answers whatever `reports` holds for the ids asked."""
    reports: dict[str, dict] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        ids = json.loads(request.content)["ids"]
        return httpx.Response(200, json=[dict(reports[i]) for i in ids if i in reports])

    return reports, httpx.MockTransport(handler)


@pytest.fixture
def worked_out(monkeypatch):
    """The mj_ids compute_changes is called for, in order."""
    from mjctl import reports

    seen: list[str] = []
    original = reports.compute_changes

    def counting(task, report):
        seen.append(task.mj_id)
        return original(task, report)

    monkeypatch.setattr(reports, "compute_changes", counting)
    return seen


def _task(mj_id: str):
    from mjctl.models import Task

    return Task.get(Task.mj_id == mj_id)


def test_repeated_reports_are_skipped_until_the_row_or_the_report_changes(store, upstream, worked_out):
    from mjctl import accounts
    from mjctl.models import Task
    from mjctl.poller import PollerMemory, poll_once

    reports, transport = upstream
    user, _ = accounts.create_user("alice", quota=10 * PRICE)
    channel = add_channel(store, "mock", "http://mock:1")
    ids = ["m1", "m2", "m3"]
    submit_charged(user.id, channel.id, ids)
    for mj_id in ids:
        reports[mj_id] = {"id": mj_id, "status": "IN_PROGRESS", "progress": "10%", "promptEn": f"en {mj_id}",
                          "properties": {"finalPrompt": f"final {mj_id}"}, "buttons": [{"customId": "x"}]}
    memory = PollerMemory()

    def cycle():
        worked_out.clear()
        return poll_once(store, transport=transport, memory=memory)

    first = cycle()
    assert first.updated == 3 and sorted(worked_out) == ids
    second = cycle()  # nothing changed: every report is worked out once more, and remembered
    assert second.updated == 0 and sorted(worked_out) == ids
    third = cycle()  # the same reports against the same rows: none is worked out
    assert third.updated == 0 and third.checked == 3 and worked_out == []

    # Someone else writes a row (as every writer does, with its version): that report is worked out again,
    # and the upstream's value comes back.
    Task.update(prompt_en="edited", updated_at=time.time()).where(Task.mj_id == "m1").execute()
    fourth = cycle()
    assert worked_out == ["m1"] and fourth.updated == 1 and _task("m1").prompt_en == "en m1"

    # A changed report is worked out and applied; m1, written last cycle, is checked once more (and
    # remembered again); m3 still is not.
    reports["m2"] = dict(reports["m2"], progress="55%")
    fifth = cycle()
    assert sorted(worked_out) == ["m1", "m2"] and fifth.updated == 1 and _task("m2").progress == "55%"

    # Finishing still works from a memo'd state: a failure is refunded once, a success completes.
    reports["m3"] = dict(reports["m3"], status="FAILURE", failReason="banned prompt")
    reports["m1"] = dict(reports["m1"], status="SUCCESS", progress="100%", imageUrl="http://cdn/m1.png")
    sixth = cycle()
    assert sorted(worked_out) == ["m1", "m2", "m3"] and sixth.refunded == 1 and sixth.succeeded == 1
    assert _task("m3").quota == 0 and _task("m1").status == "SUCCESS"
    seventh = cycle()  # only m2 is left unfinished, and its report repeats
    assert seventh.checked == 1 and worked_out == []
    assert book_problems() == []


def test_a_one_shot_cycle_has_no_memory(store, upstream, worked_out):
    from mjctl import accounts
    from mjctl.poller import poll_once

    reports, transport = upstream
    user, _ = accounts.create_user("bob", quota=10 * PRICE)
    channel = add_channel(store, "mock", "http://mock:1")
    submit_charged(user.id, channel.id, ["o1", "o2"])
    reports.update({i: {"id": i, "status": "SUBMITTED", "progress": "0%"} for i in ("o1", "o2")})
    for _ in range(3):
        worked_out.clear()
        poll_once(store, transport=transport)
        assert sorted(worked_out) == ["o1", "o2"]


def test_a_push_between_cycles_voids_the_memo_for_its_task(store, upstream, worked_out):
    """A push moves a task on; the poller's next report (the upstream still says what it said) is checked
    against the new row and, being older, changes nothing and refunds nothing."""
    from mjctl import accounts
    from mjctl import reports as applying
    from mjctl.poller import PollerMemory, poll_once

    reports, transport = upstream
    user, _ = accounts.create_user("carol", quota=10 * PRICE)
    channel = add_channel(store, "mock", "http://mock:1")
    submit_charged(user.id, channel.id, ["p1"])
    reports["p1"] = {"id": "p1", "status": "IN_PROGRESS", "progress": "20%"}
    memory = PollerMemory()
    for _ in range(3):
        poll_once(store, transport=transport, memory=memory)
    applying.apply_report(channel.id, {"id": "p1", "status": "IN_PROGRESS", "progress": "80%"})
    worked_out.clear()
    summary = poll_once(store, transport=transport, memory=memory)
    assert worked_out == ["p1"] and summary.updated == 0 and summary.faults["progress_backwards"] == 1
    assert _task("p1").progress == "80%"
    assert book_problems() == []


def test_the_loop_carries_one_memory_across_its_cycles(store, monkeypatch):
    from mjctl import poller

    memories = []

    def fake_poll_once(settings, **kwargs):
        memories.append(kwargs.get("memory"))
        return poller.CycleSummary()

    monkeypatch.setattr(poller, "poll_once", fake_poll_once)
    stop = threading.Event()
    thread = threading.Thread(target=poller.run_loop, args=(store, stop, 0.02), daemon=True)
    thread.start()
    wait_until(lambda: len(memories) >= 3, timeout=5)
    stop.set()
    thread.join(2)
    assert isinstance(memories[0], poller.PollerMemory) and all(m is memories[0] for m in memories)
