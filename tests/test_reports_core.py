"""The one update path: monotonic progress, finished tasks frozen, refunds exactly once."""

from __future__ import annotations

import threading

import peewee
import pytest

from mjctl import accounts, db, reports
from mjctl.models import Ledger, Task, User
from tests.books import assert_books


def charged_task(user, mj_id="1730000000000001", quota=300, channel_id=1):
    with db.write_tx():
        task = Task.create(user_id=user.id, channel_id=channel_id, mj_id=mj_id, status="SUBMITTED", progress="0%",
                           submit_time=1_730_000_000, quota=quota, unfinished=1)
        accounts.charge(user.id, quota, task_id=task.id, reason="imagine")
    return task


def test_progress_and_status_never_go_backwards(any_store):
    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user)
    reports.apply_report(1, {"id": task.mj_id, "status": "IN_PROGRESS", "progress": "46%"})
    stats = reports.apply_report(1, {"id": task.mj_id, "status": "SUBMITTED", "progress": "15%"})
    task = Task.get_by_id(task.id)
    assert (task.status, task.progress) == ("IN_PROGRESS", "46%") and stats.regressions == 1
    reports.apply_report(1, {"id": task.mj_id, "status": "SUCCESS", "progress": "99%", "imageUrl": "http://i/x.png",
                             "finishTime": 1_730_000_060_123, "buttons": [{"customId": "MJ::JOB::upsample::1::u"}]})
    task = Task.get_by_id(task.id)
    assert (task.status, task.progress, task.unfinished, task.finish_time) == ("SUCCESS", "100%", 0, 1_730_000_060)
    assert task.buttons_list()[0]["customId"].startswith("MJ::JOB::upsample")
    late = reports.apply_report(1, {"id": task.mj_id, "status": "FAILURE", "failReason": "late"})
    assert late.ignored == 1 and Task.get_by_id(task.id).status == "SUCCESS"
    assert User.get_by_id(user.id).quota == 700


def test_failure_refunds_exactly_once_however_often_reported(any_store):
    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user)
    first = reports.apply_report(1, {"id": task.mj_id, "status": "FAILURE", "progress": "", "failReason": "任务超时"})
    again = reports.apply_report(1, {"id": task.mj_id, "status": "FAILURE", "failReason": "任务超时"})
    timeout = reports.fail_tasks([task.id], "timed out")
    assert (first.refunded, first.quota_refunded, again.refunded, timeout.refunded) == (1, 300, 0, 0)
    task = Task.get_by_id(task.id)
    assert (task.quota, task.fail_reason) == (0, "任务超时")
    assert Ledger.select().where((Ledger.task_id == task.id) & (Ledger.kind == "refund")).count() == 1
    assert User.get_by_id(user.id).quota == 1000
    assert_books()


def test_cancel_refunds_like_failure_exactly_once_whoever_reports_it(any_store):
    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user)
    free = Task.create(user_id=user.id, channel_id=1, mj_id="1730000000000002", status="SUBMITTED", quota=0)
    first = reports.apply_reports(1, [{"id": task.mj_id, "status": "CANCEL", "progress": ""},
                                      {"id": free.mj_id, "status": "cancel"}])
    assert (first.cancelled, first.finished, first.refunded, first.quota_refunded, first.failed) == (2, 2, 1, 300, 0)
    push = reports.apply_report(1, {"id": task.mj_id, "status": "CANCEL"}, reports.PushScope(task.id))
    failure = reports.apply_report(1, {"id": task.mj_id, "status": "FAILURE", "failReason": "late"})
    timeout = reports.fail_tasks([task.id, free.id], "timed out")
    assert (push.refunded, failure.refunded, timeout.refunded) == (0, 0, 0)
    assert (push.ignored, failure.ignored, timeout.ignored) == (1, 1, 2)
    cancelled = Task.get_by_id(task.id)
    assert (cancelled.status, cancelled.quota, cancelled.unfinished, cancelled.fail_reason) == ("CANCEL", 0, 0, "")
    refunds = list(Ledger.select().where(Ledger.kind == "refund"))
    assert [(r.task_id, r.amount) for r in refunds] == [(task.id, 300)] and "cancelled" in refunds[0].reason
    assert Task.get_by_id(free.id).status == "CANCEL"
    assert User.get_by_id(user.id).quota == 1000
    assert_books()


@pytest.mark.parametrize("ending", ["FAILURE", "CANCEL"])
def test_a_poll_a_push_and_a_timeout_racing_on_one_task_refund_it_once(any_store, monkeypatch, ending):
    """All three have read the task unfinished and worked out a refunding change before any of them writes."""
    from tests.helpers import writers_meet

    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user)
    met = writers_meet(monkeypatch, 3)
    results, errors = {}, []

    def run(name, apply):
        try:
            with db.connection():
                results[name] = apply()
        except BaseException as exc:  # noqa: BLE001 - kept for the main thread to report
            errors.append(exc)

    writers = {
        "poll": lambda: reports.apply_reports(1, [{"id": task.mj_id, "status": ending, "failReason": "poll"}]),
        "push": lambda: reports.apply_report(1, {"id": task.mj_id, "status": ending, "failReason": "push"},
                                             reports.PushScope(task.id)),
        "timeout": lambda: reports.fail_tasks([task.id], "timed out"),
    }
    threads = [threading.Thread(target=run, args=item) for item in writers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and not met.broken
    assert sum(r.refunded for r in results.values()) == 1 and sum(r.updated for r in results.values()) == 1
    assert sum(r.ignored for r in results.values()) == 2
    done = Task.get_by_id(task.id)
    assert done.status in ("FAILURE", "CANCEL") and done.quota == 0 and done.unfinished == 0
    assert Ledger.select().where((Ledger.task_id == task.id) & (Ledger.kind == "refund")).count() == 1
    assert User.get_by_id(user.id).quota == 1000
    assert_books()


def test_a_timeout_planned_against_a_task_that_then_succeeded_changes_nothing(any_store, monkeypatch):
    """Timeouts take the one path: a failure worked out against a stale row is worked out again against the
    row as it is, and a task that succeeded in between stays a success, charged."""
    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user)
    real = reports._read_states_by_id
    reads = []

    def succeed_after_the_first_read(ids, *, lock, **kwargs):
        rows = real(ids, lock=lock, **kwargs)
        reads.append(lock)
        if len(reads) == 1:  # the task succeeds between the timeout's read and its write
            reports.apply_report(1, {"id": task.mj_id, "status": "SUCCESS", "imageUrl": "http://i/x.png"})
        return rows

    monkeypatch.setattr(reports, "_read_states_by_id", succeed_after_the_first_read)
    stats = reports.fail_tasks([task.id], "timed out")
    assert (stats.updated, stats.failed, stats.refunded, stats.ignored) == (0, 0, 0, 1)
    done = Task.get_by_id(task.id)
    assert (done.status, done.quota, done.fail_reason) == ("SUCCESS", 300, "")
    assert Ledger.select().where(Ledger.kind == "refund").count() == 0
    assert_books()


def test_reports_for_other_channels_and_malformed_reports_are_counted(any_store):
    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user, channel_id=1)
    stats = reports.apply_reports(2, [{"id": task.mj_id, "status": "FAILURE"}, {"status": "SUCCESS"}, "junk"])
    assert (stats.unknown, stats.malformed) == (1, 2)
    assert Task.get_by_id(task.id).status == "SUBMITTED"


def test_racing_failures_refund_once(store):
    """Eight threads fail the same tasks at once; each task is refunded exactly once."""
    user, _ = accounts.create_user("alice", quota=100_000)
    tasks = [charged_task(user, mj_id=f"17300000000{i:05d}", quota=100) for i in range(40)]
    ids = [t.id for t in tasks]
    barrier = threading.Barrier(8)

    def worker(n):
        barrier.wait()
        if n % 2:
            reports.fail_tasks(ids, "timed out")
        else:
            reports.apply_reports(1, [{"id": t.mj_id, "status": "FAILURE", "failReason": "boom"} for t in tasks])
        db.database.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refunds = Ledger.select().where(Ledger.kind == "refund")
    assert refunds.count() == 40 and len({r.task_id for r in refunds}) == 40
    assert User.get_by_id(user.id).quota == 100_000
    assert_books()


def test_a_batch_that_changes_nothing_opens_no_write_transaction(any_store, monkeypatch):
    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user)
    report = {"id": task.mj_id, "status": "IN_PROGRESS", "progress": "10%", "properties": {"b": 2, "a": 1}}
    assert reports.apply_report(1, report).updated == 1
    opened = []
    real = reports.write_tx
    monkeypatch.setattr(reports, "write_tx", lambda: opened.append(1) or real())
    again = reports.apply_report(1, {**report, "properties": {"a": 1, "b": 2}})  # same JSON, other key order
    assert (again.updated, again.ignored, opened) == (0, 1, [])


def test_a_row_that_moved_between_the_read_and_the_write_is_recomputed(any_store, monkeypatch):
    """The changes are computed outside the transaction; a task that progressed in between is not moved
    back, and a failure planned against a stale row still refunds exactly once."""
    user, _ = accounts.create_user("alice", quota=1000)
    task, other = charged_task(user), charged_task(user, mj_id="1730000000000002")
    reports.apply_report(1, {"id": task.mj_id, "status": "IN_PROGRESS", "progress": "60%"})
    real = reports._read_states_by_mj_id
    calls = []

    def stale_once(channel_id, mj_ids):
        rows = real(channel_id, mj_ids)
        calls.append(1)
        if len(calls) == 1:  # the first read sees the task before it reached 60%
            rows = [r._replace(status="SUBMITTED", progress="40%") if r.id == task.id else r for r in rows]
        return rows

    monkeypatch.setattr(reports, "_read_states_by_mj_id", stale_once)
    stats = reports.apply_reports(1, [{"id": task.mj_id, "status": "IN_PROGRESS", "progress": "50%"},
                                      {"id": other.mj_id, "status": "FAILURE", "failReason": "boom"}])
    assert Task.get_by_id(task.id).progress == "60%"
    assert len(calls) == (2 if db.is_sqlite() else 1)  # SQLite rolls back and reads again; others re-lock
    assert (stats.failed, stats.refunded) == (1, 1)
    assert Ledger.select().where((Ledger.task_id == other.id) & (Ledger.kind == "refund")).count() == 1
    assert User.get_by_id(user.id).quota == 1000 - 300
    assert_books()


def test_one_moved_row_among_rows_updated_together_stops_none_of_the_others(any_store, monkeypatch):
    """Rows that change the same columns are updated together (one statement where the database has
    UPDATE … FROM); one of them having moved since the read is found, and only that one keeps what it had."""
    user, _ = accounts.create_user("alice", quota=2000)
    tasks = [charged_task(user, mj_id=f"173000000000001{n}") for n in range(4)]
    moved = tasks[2]
    reports.apply_report(1, {"id": moved.mj_id, "status": "IN_PROGRESS", "progress": "60%"})
    real, calls = reports._read_states_by_mj_id, []

    def stale_once(channel_id, mj_ids):
        rows = real(channel_id, mj_ids)
        calls.append(1)
        if len(calls) == 1:  # the first read sees the moved task as it was before
            rows = [r._replace(status="SUBMITTED", progress="0%") if r.id == moved.id else r for r in rows]
        return rows

    reports._sql_text_cache.clear()
    monkeypatch.setattr(reports, "_read_states_by_mj_id", stale_once)
    stats = reports.apply_reports(1, [{"id": t.mj_id, "status": "IN_PROGRESS", "progress": "50%"} for t in tasks])
    assert [Task.get_by_id(t.id).progress for t in tasks] == ["50%", "50%", "60%", "50%"]
    assert stats.updated == 3 and len(calls) == (2 if db.is_sqlite() else 1)
    joined = not isinstance(db.database.obj, peewee.MySQLDatabase)  # SQLite and PostgreSQL: one statement
    assert any(key[0] == "joined" for key in reports._sql_text_cache) == joined
    assert_books()


def test_reports_merge_properties_and_keep_mjctls_own(store):
    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user)
    Task.update(properties='{"notifyHook": "https://caller/hook", "speedPrefix": "/mj-fast"}').where(
        Task.id == task.id).execute()
    reports.apply_report(1, {"id": task.mj_id, "status": "IN_PROGRESS", "progress": "10%",
                             "properties": {"finalPrompt": "a cat --v 6", "notifyHook": "https://mjctl/mj/notify/1?sig=x",
                                            "discordInstanceId": "42"}})
    props = Task.get_by_id(task.id).properties_dict()
    assert props == {"notifyHook": "https://caller/hook", "speedPrefix": "/mj-fast", "finalPrompt": "a cat --v 6",
                     "discordInstanceId": "42"}
    unchanged = reports.apply_report(1, {"id": task.mj_id, "properties": {"finalPrompt": "a cat --v 6"}})
    assert unchanged.updated == 0


def test_a_first_report_never_brings_mjctls_own_properties(store):
    """On a task with no properties yet, the upstream's echo of mjctl's own keys is not stored as the
    task's: a report holding nothing else changes nothing."""
    user, _ = accounts.create_user("alice", quota=1000)
    task = charged_task(user)
    assert Task.get_by_id(task.id).properties == ""
    only_ours = reports.apply_report(1, {"id": task.mj_id, "properties": {
        "notifyHook": "https://mjctl/mj/notify/1?sig=x", "speedPrefix": "/mj-relax"}})
    assert only_ours.updated == 0 and Task.get_by_id(task.id).properties == ""
    reports.apply_report(1, {"id": task.mj_id, "properties": {
        "speedPrefix": "/mj-relax", "finalPrompt": "a cat --v 6", "flags": 0}})
    assert Task.get_by_id(task.id).properties_dict() == {"finalPrompt": "a cat --v 6", "flags": 0}


def test_json_text_takes_what_only_json_takes():
    """mjctl.jsontext uses orjson and falls back to json: NaN in stored text, integers beyond 64 bits."""
    import math

    from mjctl import jsontext

    assert jsontext.loads('{"a": [1, "ü"]}') == {"a": [1, "ü"]}
    assert math.isnan(jsontext.loads('{"x": NaN}')["x"])
    assert jsontext.loads(jsontext.dumps({"big": 2**70, "s": "ü"})) == {"big": 2**70, "s": "ü"}
    assert jsontext.dumps({"s": "ü"}) == '{"s":"ü"}'
    with pytest.raises(ValueError):
        jsontext.loads("{not json")


def test_the_rows_read_on_sqlite_as_one_json_value_are_the_rows_as_stored(store):
    """Every kind of value a state column can hold comes back exactly: the full float of a row version,
    large integers, text JSON must escape; a task of another channel is left out; a value JSON
    cannot hold makes the read fall back to rows one by one."""
    user, _ = accounts.create_user("alice", quota=1000)
    odd = 'quote " back \\ tab \t nul-free \x01 中文 🙂 </script>'
    tasks = [
        Task.create(user_id=user.id, channel_id=1, mj_id="a1", status="IN_PROGRESS", progress="5%", prompt_en=odd,
                    description="", state="", properties='{"k": "v"}', buttons="[]", start_time=0,
                    finish_time=2**40, quota=2**62, unfinished=1, nonce="n1"),
        Task.create(user_id=user.id, channel_id=1, mj_id="a2", status="SUBMITTED", fail_reason=odd * 3, quota=0),
        Task.create(user_id=user.id, channel_id=2, mj_id="a3", status="SUBMITTED", quota=5),
    ]
    db.database.execute_sql("UPDATE task SET updated_at = ? WHERE id = ?", [1796611326.1234567, tasks[0].id])
    db.database.execute_sql("UPDATE task SET updated_at = ? WHERE id = ?", [1e-300, tasks[1].id])
    ids = ["a1", "a2", "a3", "absent"]

    def plain() -> list[reports.TaskState]:
        rows = Task.select(*reports._STATE_COLUMNS).where(Task.mj_id.in_(ids[:2])).order_by(Task.id).tuples()
        return [reports.TaskState._make(r) for r in rows]

    as_json = reports._read_states_as_json(1, ids)
    assert sorted(as_json) == plain() and len(as_json) == 2
    assert as_json == sorted(reports._read_states_by_mj_id(1, ids))
    assert {r.updated_at for r in as_json} == {1796611326.1234567, 1e-300}
    db.database.execute_sql("UPDATE task SET description = X'00ff' WHERE id = ?", [tasks[1].id])
    with pytest.raises(peewee.OperationalError):
        reports._read_states_as_json(1, ids)
    assert len(reports._read_states_by_mj_id(1, ids)) == 2  # read one by one instead


def test_batches_of_one_users_tasks_that_refund_nothing_do_not_wait_for_each_other(any_store):
    """Only a refund needs its user's row: while one batch that moves a task's progress is still open,
    another batch of the same user's tasks goes through (PostgreSQL and MariaDB lock rows; SQLite has one
    writer at a time, so its batches always take turns)."""
    if db.is_sqlite():
        pytest.skip("SQLite has one writer at a time: nothing to lock row by row")
    user, _ = accounts.create_user("alice", quota=1000)
    first, second = charged_task(user, "1730000000000001"), charged_task(user, "1730000000000002")
    held, other_done, waited = threading.Event(), threading.Event(), []

    def open_batch() -> None:
        with db.connection(), db.write_tx():
            reports._read_states_by_id([first.id], lock=True,
                                       reports_by_id={first.id: {"status": "IN_PROGRESS", "progress": "10%"}})
            held.set()
            waited.append(other_done.wait(20))  # False: the other batch was kept waiting until this timed out

    opener = threading.Thread(target=open_batch)
    opener.start()
    assert held.wait(20)
    try:
        stats = reports.apply_report(1, {"id": second.mj_id, "status": "IN_PROGRESS", "progress": "20%"})
    finally:
        other_done.set()
        opener.join(30)
    assert waited == [True] and stats.updated == 1
    assert Task.get_by_id(second.id).progress == "20%"
