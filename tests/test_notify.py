"""Push notifications: signed notifyHook callbacks applied through the one report path."""

from __future__ import annotations

import threading
import time

import httpx

from tests.books import assert_books, balance
from tests.helpers import wait_until, writers_meet


def hook(env, channel_id=None) -> str:
    from mjctl.relay import notify_hook_url

    env.push_here()
    return notify_hook_url(env.settings, channel_id or env.channel.id)


def local_task(env, mj_id="1730000000000001", quota=1000):
    from mjctl import accounts
    from mjctl.db import write_tx
    from mjctl.models import Task, User

    user = User.get(User.name == "alice")
    with write_tx():
        task = Task.create(user_id=user.id, channel_id=env.channel.id, mj_id=mj_id, status="SUBMITTED",
                           progress="0%", quota=quota, submit_time=1730000000)
        accounts.charge(user.id, quota, task_id=task.id, reason="test")
    return task


def report(mj_id="1730000000000001", **fields):
    return {"id": mj_id, "action": "IMAGINE", **fields}


def current(task):
    from mjctl.models import Task

    return Task.get_by_id(task.id)


def test_signed_pushes_apply_monotonically_and_finished_tasks_stay_finished(relay_env):
    env = relay_env
    task = local_task(env)
    url = hook(env)
    with env.client(None) as c:
        def push(**fields):
            response = c.post(url, json=report(**fields))
            assert response.status_code == 200, response.text
            return response.json()

        assert push(status="IN_PROGRESS", progress="31%")["description"] == "applied"
        assert (current(task).status, current(task).progress) == ("IN_PROGRESS", "31%")
        push(status="IN_PROGRESS", progress="15%")  # out of order
        push(status="SUBMITTED", progress="0%")  # older still
        assert (current(task).status, current(task).progress) == ("IN_PROGRESS", "31%")
        assert push(status="IN_PROGRESS", progress="31%")["description"].startswith("nothing")  # duplicate
        push(status="SUCCESS", progress="100%", imageUrl="https://cdn.example/x.png", finishTime=1730000050000,
             buttons=[{"customId": "MJ::JOB::upsample::1::abc", "label": "U1"}])
        done = current(task)
        assert (done.status, done.progress, done.unfinished, done.finish_time) == ("SUCCESS", "100%", 0, 1730000050)
        push(status="FAILURE", progress="", failReason="late")  # after the end: ignored, no refund
        push(status="SUCCESS", progress="100%")  # duplicate final push
    after = current(task)
    assert (after.status, after.quota, after.fail_reason) == ("SUCCESS", 1000, "")
    assert balance("alice") == 9000
    assert_books()


def test_a_failure_push_refunds_exactly_once(relay_env):
    env = relay_env
    task = local_task(env)
    url = hook(env)
    with env.client(None) as c:
        for _ in range(3):
            assert c.post(url, json=report(status="FAILURE", progress="", failReason="banned")).status_code == 200
    failed = current(task)
    assert (failed.status, failed.quota, failed.fail_reason) == ("FAILURE", 0, "banned")
    assert balance("alice") == 10_000
    assert_books()


def test_unsigned_or_wrongly_signed_pushes_are_refused(relay_env):
    env = relay_env
    task = local_task(env)
    good = hook(env)
    other_channel = hook(env, env.channel.id + 1).split("?")[1]
    with env.client(None) as c:
        for path in (f"/mj/notify/{env.channel.id}", f"/mj/notify/{env.channel.id}?sig=",
                     f"/mj/notify/{env.channel.id}?sig=AAAAAAAAAAAAAAAAAAAAAAAA",
                     f"/mj/notify/{env.channel.id}?{other_channel}"):
            response = c.post(path, json=report(status="SUCCESS", progress="100%"))
            assert response.status_code == 403 and response.json()["code"] == 4, path
        assert c.post(good.replace("?", "x?"), json={}).status_code == 404
    assert current(task).status == "SUBMITTED"


def test_unknown_tasks_and_bad_bodies(relay_env):
    env = relay_env
    url = hook(env)
    with env.client(None) as c:
        unknown = c.post(url, json=report("999", status="SUCCESS"))
        assert unknown.status_code == 200 and "unknown task" in unknown.json()["description"]
        assert c.post(url, content=b"{oops", headers={"Content-Type": "application/json"}).status_code == 400
        assert c.post(url, json={"status": "SUCCESS"}).status_code == 400
        assert c.post(url, json=[1]).status_code == 400


def test_simulator_pushes_with_duplicates_and_reordering_drive_tasks_to_the_end(relay_env):
    env = relay_env
    env.push_here()
    env.sim.sim.update({"push_duplicate": 1.0, "push_out_of_order": 1.0})
    ok = env.submit("imagine", {"prompt": "pushed"}).json()["result"]
    env.sim.sim.update({"fail_rate": 1.0})
    bad = env.submit("imagine", {"prompt": "doomed"}).json()["result"]
    from mjctl.models import Task

    def finished():
        rows = {t.mj_id: t for t in Task.select().where(Task.mj_id.in_([ok, bad]))}
        return all(r.unfinished == 0 for r in rows.values()) and rows

    rows = wait_until(finished, timeout=15, message="both tasks finish by push")
    assert rows[ok].status == "SUCCESS" and rows[ok].image_url and rows[ok].quota == 1000
    assert rows[bad].status == "FAILURE" and rows[bad].quota == 0 and rows[bad].fail_reason
    pushes = env.sim.sim.stats()["pushes"]
    assert pushes["push_duplicated"] > 0 and pushes["push_out_of_order"] > 0
    # Only repeats that arrive after a task finished are refused: its link is dead by then.
    assert pushes["push_failed"] <= pushes["push_duplicated"] + pushes["push_out_of_order"]
    assert balance("alice") == 9000
    assert_books()


def _race(env, monkeypatch, push_fields: dict, upstream_says: dict, now: float | None = None):
    """A poll cycle (the upstream answering upstream_says) and a push of push_fields through the task's link,
    both holding a change worked out against the unfinished task before either writes it."""
    from mjctl.db import connection
    from mjctl.poller import poll_once
    task = local_task(env)
    url = hook(env)
    met = writers_meet(monkeypatch, 2)
    upstream = httpx.MockTransport(lambda request: httpx.Response(200, json=[report(**upstream_says)]))
    cycles = []

    def poll():
        with connection():
            cycles.append(poll_once(env.settings, transport=upstream, now=now))

    poller = threading.Thread(target=poll)
    poller.start()
    pushed = httpx.post(url, json=report(**push_fields), timeout=30)
    poller.join(30)
    assert pushed.status_code == 200 and len(cycles) == 1 and not met.broken
    return current(task), cycles[0], pushed.json()["description"]


def test_a_push_and_a_poll_report_racing_on_one_task_refund_it_once(relay_env, monkeypatch):
    done, cycle, pushed = _race(relay_env, monkeypatch, dict(status="CANCEL", progress=""),
                                dict(status="FAILURE", progress="", failReason="banned"))
    assert (done.status, done.quota, done.unfinished) == ("CANCEL" if pushed == "applied" else "FAILURE", 0, 0)
    assert cycle.refunded + (pushed == "applied") == 1 and cycle.updated + (pushed == "applied") == 1
    assert balance("alice") == 10_000
    assert_books()


def test_a_timeout_and_a_success_push_racing_on_one_task_end_it_once(relay_env, monkeypatch):
    """The poller times the task out (the upstream still reports it as stored) while a push says it
    succeeded: whichever writes first wins, and the task is refunded only when it ends as a failure."""
    from mjctl.models import Ledger

    late = time.time() + relay_env.settings.poller.task_timeout + 1
    done, cycle, pushed = _race(relay_env, monkeypatch, dict(status="SUCCESS", imageUrl="https://cdn.example/x.png"),
                                dict(status="SUBMITTED", progress="0%"), now=late)
    refunds = Ledger.select().where((Ledger.task_id == done.id) & (Ledger.kind == "refund")).count()
    if pushed == "applied":
        assert (done.status, done.quota, cycle.timed_out, cycle.refunded, refunds) == ("SUCCESS", 1000, 0, 0, 0)
    else:
        assert (done.status, done.quota, cycle.timed_out, cycle.refunded, refunds) == ("FAILURE", 0, 1, 1, 1)
        assert done.fail_reason.startswith("Timed out: still SUBMITTED")
    assert_books()
