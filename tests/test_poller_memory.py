"""The poller's memo, kept on the task rows: a report that changed nothing is skipped — by a one-shot cycle
as by a loop — until its task's row or the report changes; any write to the row, by anyone, brings it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest

from tests.books import book_problems
from tests.helpers import make_settings
from tests.poller_helpers import PRICE, add_channel, sim_submit, submit_charged

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def running(any_store, upstream, worked_out):
    """Three charged tasks running upstream, and cycle(): one poll cycle, each a fresh one-shot poller."""
    from mjctl import accounts
    from mjctl.poller import poll_once

    reports, transport = upstream
    user, _ = accounts.create_user("alice", quota=10 * PRICE)
    channel = add_channel(any_store, "mock", "http://mock:1")
    ids = ["m1", "m2", "m3"]
    submit_charged(user.id, channel.id, ids)
    for mj_id in ids:
        reports[mj_id] = {"id": mj_id, "status": "IN_PROGRESS", "progress": "10%", "promptEn": f"en {mj_id}",
                          "properties": {"finalPrompt": f"final {mj_id}"}, "buttons": [{"customId": "x"}]}

    def cycle():
        worked_out.clear()
        return poll_once(any_store, transport=transport)

    return types.SimpleNamespace(cycle=cycle, ids=ids, reports=reports, channel=channel)


def _task(mj_id: str):
    from mjctl.models import Task

    return Task.get(Task.mj_id == mj_id)


def test_unchanged_reports_are_skipped_until_the_row_or_the_report_changes(running, worked_out):
    from mjctl import reports

    first = running.cycle()  # every task moves, and the report that moved it is remembered with it
    assert first.updated == 3 and sorted(worked_out) == running.ids and first.skipped == 0
    second = running.cycle()  # the same reports against the rows they left: none is read or worked out
    assert (second.updated, second.skipped, second.checked, worked_out) == (0, 3, 3, [])

    # A changed report is worked out and applied, and remembered again; the others still are not.
    running.reports["m2"] = dict(running.reports["m2"], progress="55%")
    third = running.cycle()
    assert worked_out == ["m2"] and third.updated == 1 and _task("m2").progress == "55%"
    assert running.cycle().skipped == 3 and worked_out == []

    # A report that changes nothing without having moved the row is remembered on its own.
    running.reports["m3"] = dict(running.reports["m3"], submitTime=1730000000000)  # a field mjctl does not keep
    fifth = running.cycle()
    assert (worked_out, fifth.updated, fifth.skipped) == (["m3"], 0, 2)
    assert running.cycle().skipped == 3 and worked_out == []

    # A push moves m1 on: the poller's report (the upstream still says 10%) is worked out again against the
    # row as it is now and refused as a step backwards; refused again against the same row, it is remembered
    # too, and counted once.
    reports.apply_report(running.channel.id, {"id": "m1", "status": "IN_PROGRESS", "progress": "80%"})
    summary = running.cycle()
    assert worked_out == ["m1"] and summary.updated == 0 and summary.faults["progress_backwards"] == 1
    summary = running.cycle()
    assert (worked_out, summary.skipped, summary.faults["progress_backwards"]) == ([], 3, 0)
    assert _task("m1").progress == "80%"
    # A report refused in part still brings what it may: m2's goes back to 5% with a new description.
    running.reports["m2"] = dict(running.reports["m2"], progress="5%", description="still going")
    summary = running.cycle()
    assert worked_out == ["m2"] and summary.updated == 1 and summary.faults["progress_backwards"] == 1
    assert (_task("m2").progress, _task("m2").description) == ("55%", "still going")
    assert running.cycle().skipped == 3 and worked_out == []
    # The upstream moving on is a new report: applied as usual.
    running.reports["m1"] = dict(running.reports["m1"], progress="90%")
    assert running.cycle().updated == 1 and worked_out == ["m1"] and _task("m1").progress == "90%"
    assert book_problems() == []


def test_a_hand_edit_brings_the_upstreams_value_back(running, worked_out):
    """An edit in SQL that leaves updated_at alone still moves the row's version (a trigger of migration 8),
    so the memo no longer holds and the upstream's value comes back."""
    from mjctl.db import database

    running.cycle()
    assert running.cycle().skipped == 3
    before = _task("m1").updated_at
    database.execute_sql("UPDATE task SET prompt_en = 'edited by hand' WHERE mj_id = 'm1'")
    database.execute_sql("UPDATE task SET prompt_en = 'edited', updated_at = updated_at WHERE mj_id = 'm2'")
    assert _task("m1").updated_at != before
    summary = running.cycle()
    assert sorted(worked_out) == ["m1", "m2"] and summary.updated == 2 and summary.skipped == 1
    assert (_task("m1").prompt_en, _task("m2").prompt_en) == ("en m1", "en m2")
    assert running.cycle().skipped == 3 and worked_out == []


def test_finishing_and_refunds_are_exact_from_a_remembered_state(running, worked_out):
    from mjctl.models import Ledger, User

    running.cycle()
    assert running.cycle().skipped == 3
    running.reports["m1"] = dict(running.reports["m1"], status="SUCCESS", progress="100%", imageUrl="http://cdn/m1.png")
    running.reports["m2"] = dict(running.reports["m2"], status="FAILURE", failReason="banned prompt")
    running.reports["m3"] = dict(running.reports["m3"], status="CANCEL", progress="")
    done = running.cycle()
    assert sorted(worked_out) == running.ids
    assert (done.succeeded, done.failed, done.cancelled, done.refunded, done.quota_refunded) == (1, 1, 1, 2, 2 * PRICE)
    assert [_task(i).status for i in running.ids] == ["SUCCESS", "FAILURE", "CANCEL"]
    assert [_task(i).quota for i in running.ids] == [PRICE, 0, 0]
    assert running.cycle().checked == 0
    assert Ledger.select().where(Ledger.kind == "refund").count() == 2
    assert User.get(User.name == "alice").quota == 9 * PRICE
    assert book_problems() == []


def test_a_report_is_remembered_only_against_the_version_it_was_checked_against(running, worked_out, monkeypatch):
    """A row written between the read a report was checked against and the memo's write keeps no memo that
    holds: the memo names the version it was checked against, not the one the row has by then."""
    from mjctl import reports
    from mjctl.db import database

    running.cycle()
    running.reports["m1"] = dict(running.reports["m1"], submitTime=1730000000000)  # unchanged, not remembered yet
    real = reports._read_states_by_mj_id

    def edited_after_the_read(channel_id, mj_ids):
        rows = real(channel_id, mj_ids)
        database.execute_sql("UPDATE task SET prompt_en = 'edited by hand' WHERE mj_id = 'm1'")
        return rows

    monkeypatch.setattr(reports, "_read_states_by_mj_id", edited_after_the_read)
    assert running.cycle().skipped == 2 and worked_out == ["m1"]
    monkeypatch.setattr(reports, "_read_states_by_mj_id", real)
    summary = running.cycle()  # no memo was kept for the old version: m1 is worked out and put right
    assert worked_out == ["m1"] and summary.updated == 1 and _task("m1").prompt_en == "en m1"


def test_a_change_planned_against_a_row_written_since_is_worked_out_again(running, worked_out, monkeypatch):
    """A row written between the read a change was worked out from and the change's write, in a column the
    change does not touch, is read again and the change worked out afresh: otherwise the change would be
    remembered as leaving a row the report matches, while the other write had made it differ."""
    from mjctl import reports
    from mjctl.db import database

    running.cycle()
    running.reports["m1"] = dict(running.reports["m1"], progress="20%")  # a change to make
    real, reads = reports._read_states_by_mj_id, []

    def edited_after_the_read(channel_id, mj_ids):
        rows = real(channel_id, mj_ids)
        reads.append(mj_ids)
        if len(reads) == 1:
            database.execute_sql("UPDATE task SET prompt_en = 'edited by hand' WHERE mj_id = 'm1'")
        return rows

    monkeypatch.setattr(reports, "_read_states_by_mj_id", edited_after_the_read)
    summary = running.cycle()
    assert summary.updated == 1 and _task("m1").progress == "20%"
    assert _task("m1").prompt_en == "en m1"  # the report's, worked out against the row as it was written
    monkeypatch.setattr(reports, "_read_states_by_mj_id", real)
    assert running.cycle().skipped == 3 and worked_out == []  # and remembered against that row
    assert book_problems() == []


def test_rows_no_memo_covers_are_read_with_their_channel_and_read_again_only_when_written_since(
        running, monkeypatch):
    """On SQLite the rows of a claimed channel that no memo covers (a first cycle's) are read whole with the
    channel's list, and their batch is worked out from them without a read of its own. A row written after
    that read is found by the write, which compares each row's version, and the batch is read again and
    worked out afresh: the change, and the memo recorded with it, are those of the row as written."""
    from mjctl import reports
    from mjctl.db import database, is_sqlite

    real_read, batch_reads = reports._read_states_by_mj_id, []

    def counted(channel_id, mj_ids):
        batch_reads.append(sorted(mj_ids))
        return real_read(channel_id, mj_ids)

    monkeypatch.setattr(reports, "_read_states_by_mj_id", counted)
    assert running.cycle().updated == 3
    assert batch_reads == ([] if is_sqlite() else [running.ids])  # elsewhere each batch reads its own rows

    # Every memo voided by hand (the versions stay), and a change to make: the rows are read whole again,
    # and m2 is edited by hand just after that read.
    database.execute_sql("UPDATE task SET memo_digest = ''")
    for mj_id in running.ids:
        running.reports[mj_id] = dict(running.reports[mj_id], progress="20%")
    real_whole = reports.unremembered_states

    def edited_after_the_read(channel_id):
        states = real_whole(channel_id)
        database.execute_sql("UPDATE task SET prompt_en = 'edited by hand' WHERE mj_id = 'm2'")
        return states

    monkeypatch.setattr(reports, "unremembered_states", edited_after_the_read)
    batch_reads.clear()
    assert running.cycle().updated == 3
    assert batch_reads == [running.ids]  # SQLite: read again once the write found m2 moved
    assert [(_task(m).progress, _task(m).prompt_en) for m in running.ids] == [
        ("20%", "en m1"), ("20%", "en m2"), ("20%", "en m3")]
    monkeypatch.setattr(reports, "unremembered_states", real_whole)
    assert running.cycle().skipped == 3  # remembered against the rows as written
    assert book_problems() == []


def test_a_channel_with_more_rows_to_work_out_than_the_bound_reads_them_batch_by_batch(running, monkeypatch):
    from mjctl import poller, reports

    real_read, batch_reads = reports._read_states_by_mj_id, []

    def counted(channel_id, mj_ids):
        batch_reads.append(sorted(mj_ids))
        return real_read(channel_id, mj_ids)

    monkeypatch.setattr(reports, "_read_states_by_mj_id", counted)
    monkeypatch.setattr(poller, "PREREAD_ROWS", len(running.ids) - 1)
    assert running.cycle().updated == 3 and batch_reads == [running.ids]
    assert [_task(m).prompt_en for m in running.ids] == ["en m1", "en m2", "en m3"]


def test_a_report_that_cannot_be_remembered_is_worked_out_every_time(running, worked_out):
    deep: list = []
    for _ in range(300):  # read by the client, but deeper than orjson writes: the report has no digest
        deep = [deep]
    running.reports["m1"] = dict(running.reports["m1"], extra=deep)
    running.cycle()
    for _ in range(2):
        assert running.cycle().skipped == 2 and worked_out == ["m1"]


def test_queued_tasks_the_upstream_reports_behind_their_rows_are_remembered_too(any_store):
    """More tasks than the upstream runs at once: the queued ones report NOT_START, behind the SUBMITTED
    their rows hold (a status refused as a step backwards). The second cycle skips every report, queued or
    running, and the books hold."""
    from mjctl import accounts
    from mjctl.poller import poll_once
    from mjctl.sim import run_simulator_in_thread

    with run_simulator_in_thread(secret="sim-secret", step_seconds=3600) as sim:
        sim.sim.update({"accounts": 1, "concurrency": 2, "queue_size": 100})  # 2 run, the rest wait
        user, _ = accounts.create_user("queued", quota=10 * PRICE)
        channel = add_channel(any_store, "sim", sim.url)
        submit_charged(user.id, channel.id, sim_submit(sim.url, 7))
        first = poll_once(any_store)
        second = poll_once(any_store)
    assert (first.checked, first.updated, first.skipped, first.faults["progress_backwards"]) == (7, 7, 0, 5)
    assert (second.checked, second.updated, second.skipped) == (7, 0, 7)
    assert "progress_backwards" not in second.faults
    assert book_problems() == []


def test_one_shot_mjctl_poll_processes_skip_what_an_earlier_one_remembered(tmp_path):
    """Cron runs `mjctl poll` as a new process each time; nothing is carried over but the store."""
    from mjctl import accounts
    from mjctl.db import open_store
    from mjctl.sim import run_simulator_in_thread
    url = f"sqlite:///{tmp_path}/cron.db"
    settings = make_settings(tmp_path, url)
    open_store(settings)
    with run_simulator_in_thread(secret="sim-secret", step_seconds=3600) as sim:
        sim.sim.update({"accounts": 4, "concurrency": 10})
        user, _ = accounts.create_user("cron", quota=10 * PRICE)
        channel = add_channel(settings, "sim", sim.url)
        submit_charged(user.id, channel.id, sim_submit(sim.url, 4))
        env = {**os.environ, "MJCTL_DATABASE_URL": url, "MJCTL_SERVER_SECRET": "test-secret",
               "MJCTL_LOG_LEVEL": "error", "PYTHONPATH": str(ROOT)}

        def poll() -> dict:
            out = subprocess.run([sys.executable, "-m", "mjctl", "poll", "--json"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        first, second = poll(), poll()
    assert (first["checked"], first["updated"], first["skipped"]) == (4, 4, 0)
    assert (second["checked"], second["updated"], second["skipped"]) == (4, 0, 4)
    assert book_problems() == []


def test_the_memo_columns_and_trigger_come_with_migration_8(any_store):
    """Upgrading a store of version 7: the columns arrive with their defaults on every row, and from then
    on an update that moves neither updated_at nor the memo moves updated_at."""
    import peewee

    from mjctl import db
    from mjctl.models import SchemaVersion, Task

    database = db.database
    task = Task.create(user_id=1, channel_id=1, mj_id="1", status="SUBMITTED", updated_at=100.0)
    if db.is_sqlite():
        database.execute_sql("DROP TRIGGER task_version")
    elif isinstance(database.obj, peewee.PostgresqlDatabase):
        database.execute_sql("DROP TRIGGER task_version ON task")
    else:
        database.execute_sql("DROP TRIGGER task_version")
    for column in ("memo_digest", "memo_version"):
        database.execute_sql(f"ALTER TABLE task DROP COLUMN {column}")
    SchemaVersion.delete().where(SchemaVersion.version >= 8).execute()
    assert db.migrate(upto=8) == [8] and db.migrate(upto=8) == []
    stored = Task.get_by_id(task.id)
    assert (stored.memo_digest, stored.memo_version, stored.updated_at) == ("", 0.0, 100.0)
    database.execute_sql(f"UPDATE task SET memo_digest = 'd', memo_version = 100 WHERE id = {task.id}")
    assert Task.get_by_id(task.id).updated_at == 100.0  # writing the memo leaves the version alone
    database.execute_sql(f"UPDATE task SET progress = 'half' WHERE id = {task.id}")
    assert time.time() + 1 > Task.get_by_id(task.id).updated_at > time.time() - 60
    database.execute_sql(f"UPDATE task SET updated_at = 200 WHERE id = {task.id}")
    assert Task.get_by_id(task.id).updated_at == 200.0  # a writer that sets it is taken at its word


def test_the_claim_time_read_is_the_same_in_one_step_as_row_by_row(store, monkeypatch):
    """On SQLite with JSON a channel's unfinished tasks are read as one value: the same tasks, in id order,
    with the same start of their timeout and the same memo (held only at the row's exact version)."""
    from mjctl import poller
    from mjctl.models import Task

    version = 1_700_000_000.123456
    rows = [  # (mj_id, submit_time, updated_at, memo_digest, memo_version, channel_id, unfinished)
        ("held", 1_700_000_000, version, "d1", version, 1, 1),
        ("moved since", 1_700_000_001, version, "d2", version - 0.000001, 1, 1),
        ("no memo", 1_700_000_002, version, "", 0.0, 1, 1),
        ("no submit time", 0, 1_700_000_123.9, "d3", 1_700_000_123.9, 1, 1),
        ("", 1_700_000_003, version, "", 0.0, 1, 1),
        ("finished", 1_700_000_004, version, "d4", version, 1, 0),
        ("other channel", 1_700_000_005, version, "d5", version, 2, 1),
    ]
    for mj_id, submit_time, updated_at, digest, memo_version, channel_id, unfinished in reversed(rows):
        Task.create(user_id=1, channel_id=channel_id, mj_id=mj_id, status="SUBMITTED", submit_time=submit_time,
                    unfinished=unfinished, updated_at=updated_at, memo_digest=digest, memo_version=memo_version)
    one_step = poller._unfinished_of(1)
    monkeypatch.setattr(poller, "sqlite_json_reads", lambda: False)
    row_by_row = poller._unfinished_of(1)
    assert one_step == row_by_row
    assert [(p.mj_id, p.since, p.memo) for p in one_step] == [
        ("", 1_700_000_003, ""), ("no submit time", 1_700_000_123, "d3"), ("no memo", 1_700_000_002, ""),
        ("moved since", 1_700_000_001, ""), ("held", 1_700_000_000, "d1")]
    assert [p.id for p in one_step] == sorted(p.id for p in one_step)


def test_a_row_json_cannot_hold_is_read_row_by_row(store):
    """A value put in by hand that JSON cannot hold (a BLOB) sends the claim-time read back to row by row."""
    from mjctl import poller
    from mjctl.db import database
    from mjctl.models import Task

    task = Task.create(user_id=1, channel_id=1, mj_id="blob", status="SUBMITTED", submit_time=1_700_000_000)
    database.execute_sql("UPDATE task SET memo_digest = x'00ff', memo_version = updated_at WHERE id = ?",
                         [task.id])
    assert [(p.id, p.mj_id, p.since) for p in poller._unfinished_of(1)] == [(task.id, "blob", 1_700_000_000)]
