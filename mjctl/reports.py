"""The one path that changes a task after submission: applying an upstream report, and failing a task.

Used by the poller (list-by-condition answers), by push notifications (notifyHook) and by timeouts. A push
comes through a notify link made for one task, and changes that task only (:func:`push_target`,
:class:`PushScope`).

Rules (docs/upstream.md, "Lifecycle"):
- a finished task (SUCCESS, FAILURE, CANCEL) is never changed again;
- status never moves backwards (an out-of-order push cannot turn IN_PROGRESS into SUBMITTED) and progress
  never goes down while the task runs; SUCCESS always reads "100%";
- every transition to FAILURE of a charged task refunds its quota exactly once, in the same transaction,
  with a ledger entry, and the task's quota then reads 0.

Exactly-once comes from compare-and-set updates: a row is only updated WHERE it still has the state the
change was computed from (and `unfinished = 1` for a finishing change), so of two racing writers (two
pollers, a push and a poll) only one changes the row, and only that one refunds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mjctl import accounts, jsontext, upstream_text
from mjctl.crypto import same
from mjctl.db import compiled, database, is_sqlite, write_tx
from mjctl.models import FINISHED_STATUSES, PendingSubmission, Task, User

log = logging.getLogger("mjctl.reports")

STATUS_RANK = {"NOT_START": 0, "MODAL": 0, "SUBMITTED": 1, "IN_PROGRESS": 2}
TERMINAL_RANK = 3
MAX_RETRIES = 3


@dataclass
class ApplyStats:
    """What applying reports did; the poller adds these up into its cycle summary."""

    updated: int = 0
    finished: int = 0
    succeeded: int = 0
    failed: int = 0
    refunded: int = 0
    quota_refunded: int = 0
    ignored: int = 0  # duplicate, late (task already finished) or stale reports
    unknown: int = 0  # no local task with that id on that channel
    malformed: int = 0
    regressions: int = 0  # progress or status that would have gone backwards
    succeeded_ids: list[int] = field(default_factory=list)

    def add(self, other: ApplyStats) -> None:
        for name in ("updated", "finished", "succeeded", "failed", "refunded", "quota_refunded", "ignored",
                     "unknown", "malformed", "regressions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.succeeded_ids.extend(other.succeeded_ids)


def _percent(progress: str | None) -> int | None:
    if not progress:
        return None
    text = str(progress).strip().rstrip("%")
    try:
        return int(float(text))
    except ValueError:
        return None


def _seconds(ms: Any) -> int:
    """Upstream times are epoch milliseconds (or null); ours are seconds (0 when unknown)."""
    if ms in (None, "", 0):
        return 0
    try:
        value = int(float(ms))
    except (TypeError, ValueError):
        return 0
    return value // 1000 if value >= 100_000_000_000 else value


def _video_urls(value: Any) -> str:
    if not value:
        return ""
    urls = []
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, dict) and entry.get("url"):
            urls.append(str(entry["url"]))
        elif isinstance(entry, str) and entry:
            urls.append(entry)
    return json.dumps(urls) if urls else ""


def _rank(status: str) -> int:
    return TERMINAL_RANK if status in FINISHED_STATUSES else STATUS_RANK.get(status, 1)


def compute_changes(task: Task | TaskState, report: dict) -> tuple[dict, list[str]]:
    """The field changes a report asks for, after the monotonicity rules; and notes on what was refused.

    ``task`` is a Task or a :class:`TaskState` row. Written in the order of the common case (a report that
    repeats what is stored) because the poller calls it for every unfinished task in every cycle.
    """
    notes: list[str] = []
    old_status = task.status
    reported = str(report.get("status") or "").upper() or old_status
    status = old_status
    if reported != old_status:
        if _rank(reported) >= _rank(old_status):
            status = reported
        else:
            notes.append(f"status {old_status}->{reported} refused")
    changes: dict[str, Any] = {}
    if status != old_status:
        changes["status"] = status

    old_progress = task.progress
    new_progress = report.get("progress")
    if status == "SUCCESS":
        progress = "100%"
    elif status in FINISHED_STATUSES:
        progress = "" if new_progress is None else str(new_progress)
    elif new_progress is None or new_progress == "":
        progress = old_progress
    else:
        progress = str(new_progress)[:32]
        if progress != old_progress:
            new_pct, old_pct = _percent(new_progress), _percent(old_progress)
            if new_pct is not None and old_pct is not None and new_pct < old_pct:
                progress = old_progress
                notes.append(f"progress {old_progress}->{new_progress} refused")
    if progress != old_progress:
        changes["progress"] = progress

    for name, key in _SIMPLE_FIELDS:
        value = report.get(key)
        if value is not None:
            text = value if type(value) is str else str(value)
            if text != getattr(task, name):
                changes[name] = text
    video_urls = _video_urls(report.get("videoUrls"))
    if video_urls and video_urls != task.video_urls:
        changes["video_urls"] = video_urls
    buttons = report.get("buttons")
    if buttons and not _same_json(task.buttons, buttons):
        changes["buttons"] = jsontext.dumps(buttons)
    reported = report.get("properties")
    if reported and isinstance(reported, dict):
        properties = _merged_properties(task.properties, reported)
        if properties is not None:
            changes["properties"] = properties
    for name, key in (("start_time", "startTime"), ("finish_time", "finishTime")):
        seconds = _seconds(report.get(key))
        if seconds and seconds != getattr(task, name):
            changes[name] = seconds
    if status in FINISHED_STATUSES:
        changes["unfinished"] = 0
        if not changes.get("finish_time") and not task.finish_time:
            changes["finish_time"] = int(time.time())
        if status == "FAILURE" and not (changes.get("fail_reason") or task.fail_reason):
            changes["fail_reason"] = "The upstream reported a failure without a reason."
    return changes, notes


#: Properties mjctl itself keeps on a task (the caller's own hook, the speed prefix): a report never
#: overwrites them (the upstream echoes mjctl's signed hook as its notifyHook).
LOCAL_PROPERTIES = ("notifyHook", "speedPrefix")


def _merged_properties(stored: str, reported: dict) -> str | None:
    """The stored properties updated with the reported ones (mjctl's own keys kept); None when unchanged."""
    try:
        current = jsontext.loads(stored) if stored else {}
    except ValueError:
        current = {}
    if not isinstance(current, dict):
        current = {}
    merged = {**current, **reported}
    for key in LOCAL_PROPERTIES:
        if key in current:
            merged[key] = current[key]
        else:
            merged.pop(key, None)
    return None if merged == current else jsontext.dumps(merged)


#: The report fields copied as they are. Not ``state``: it is the caller's, kept by mjctl, and what the
#: upstream echoes is the tag mjctl forwarded in its place (mjctl.pending.upstream_state).
_SIMPLE_FIELDS = (("prompt_en", "promptEn"), ("description", "description"),
                  ("image_url", "imageUrl"), ("video_url", "videoUrl"), ("fail_reason", "failReason"))
def _same_json(stored: str, value: Any) -> bool:
    """Whether the stored JSON text holds value: decoding and comparing is cheaper than encoding value, and
    an equal value stored with its keys in another order is not a change."""
    if not stored:
        return False
    try:
        return jsontext.loads(stored) == value
    except ValueError:
        return False


def _compare_and_set(task: Task, changes: dict) -> bool:
    """Write changes only if the row still has the status and progress they were computed from."""
    values = dict(changes, updated_at=time.time())
    finishing = values.get("unfinished") == 0
    refund = finishing and values.get("status", task.status) == "FAILURE" and task.quota > 0
    if refund:
        values["quota"] = 0
    query = Task.update(**values).where(
        (Task.id == task.id) & (Task.unfinished == 1) & (Task.status == task.status)
        & (Task.progress == task.progress) & (Task.quota == task.quota)
    )
    if query.execute() != 1:
        return False
    if refund:
        accounts.refund(task.user_id, task.quota, task_id=task.id,
                        reason=f"task {task.mj_id} failed: {values.get('fail_reason') or task.fail_reason}"[:500])
    return True


def _changes_for(task, report: dict, stats: ApplyStats) -> dict | None:
    """The changes a report asks of a task, or None (counted) when there is nothing to write: the task
    is finished, or the report changes nothing after the monotonicity rules."""
    if task.unfinished == 0 or task.status in FINISHED_STATUSES:
        stats.ignored += 1
        return None
    changes, notes = compute_changes(task, report)
    if notes:
        stats.regressions += 1
        log.info("task %s: %s", task.mj_id, "; ".join(notes))
    if not changes:
        stats.ignored += 1
        return None
    return changes


def _apply_one(task: Task, report: dict, stats: ApplyStats) -> None:
    """Apply one report to one task inside the caller's transaction, retrying on a lost race."""
    for _ in range(MAX_RETRIES):
        changes = _changes_for(task, report, stats)
        if changes is None:
            return
        quota_before = task.quota
        if _compare_and_set(task, changes):
            stats.updated += 1
            if changes.get("unfinished") == 0:
                stats.finished += 1
                status = changes.get("status", task.status)
                if status == "SUCCESS":
                    stats.succeeded += 1
                    stats.succeeded_ids.append(task.id)
                elif status == "FAILURE":
                    stats.failed += 1
                    if quota_before > 0:
                        stats.refunded += 1
                        stats.quota_refunded += quota_before
            return
        fresh = Task.get_or_none(Task.id == task.id)
        if fresh is None:
            stats.unknown += 1
            return
        task = fresh
    stats.ignored += 1


def _locked(query) -> list[Task]:
    """The tasks of query, row-locked on PostgreSQL/MariaDB in one global order: tasks by id, then the users
    a refund may touch, by id. Without it two batches (or a batch and a push) that refund different users
    lock task and user rows in opposite orders and deadlock (PostgreSQL then stalls a second and aborts
    one). SQLite's IMMEDIATE transaction already serialises writers."""
    if is_sqlite():
        return list(query)
    tasks = list(query.order_by(Task.id).for_update())
    user_ids = sorted({t.user_id for t in tasks if t.unfinished and t.quota > 0})
    if user_ids:
        list(User.select(User.id).where(User.id.in_(user_ids)).order_by(User.id).for_update())
    return tasks


def apply_reports(channel_id: int, reports: Iterable[dict], memo: ReportMemo | None = None, *,
                  scope: PushScope | None = None) -> ApplyStats:
    """Apply upstream task reports from one channel in one transaction. Reports for ids this channel has no
    task for, and reports without an id, are counted and skipped. With a scope (a push through a notify
    link) only the tasks that link may change are considered; the others count as unknown.

    The changes are computed from a plain read outside any transaction; a batch with nothing to change
    opens no write transaction at all. Otherwise the changed rows are read again inside the transaction
    (row-locked by id, then the refunded users, on PostgreSQL/MariaDB), changes are recomputed for any row
    that moved in between, plain updates go out grouped by shape with ``executemany`` and every refunding
    FAILURE transition is applied on its own by :func:`_compare_and_set` with its ledger entry.
    """
    stats = ApplyStats()
    by_id: dict[str, dict] = {}
    for report in reports:
        try:  # upstream text is data: typed, bounded and scrubbed before it can become row values
            report = upstream_text.clean_report(report)
        except upstream_text.UpstreamTextError as exc:
            stats.malformed += 1
            log.debug("channel %s: report ignored: %s", channel_id, exc)
            continue
        by_id[report["id"]] = report
    if not by_id:
        return stats
    for _ in range(MAX_RETRIES):
        planning, planned = _plan(channel_id, by_id, memo, scope)
        if not planned:
            stats.add(planning)
            return stats
        try:
            with write_tx():
                applied = _apply_planned(planned)
        except _LostRace:
            continue  # rolled back: read again and plan again
        stats.add(planning)
        stats.add(applied)
        return stats
    # Writers kept racing us between the read and the write: fall back to one row at a time.
    with write_tx():
        rows = _locked(Task.select().where(Task.id.in_([row.id for row, _, _ in planned])))
        reports_by_id = {row.id: report for row, report, _ in planned}
        stats.add(planning)
        for task in rows:
            _apply_one(task, reports_by_id[task.id], stats)
    return stats


def _plan(channel_id: int, by_id: dict[str, dict], memo: ReportMemo | None = None,
          scope: PushScope | None = None) -> tuple[ApplyStats, list[tuple[TaskState, dict, dict]]]:
    """Outside any transaction: read the tasks of by_id and work out each one's changes. Returns what was
    skipped (unknown, finished, unchanged, refused regressions) and the (row, report, changes) to write.
    Reports that change nothing (and refuse nothing) are remembered in memo with the row version they met."""
    stats = ApplyStats()
    rows = _read_states_by_mj_id(channel_id, list(by_id))
    if scope is not None:
        rows = [row for row in rows if scope.allows(row.id, row.nonce or "")]
    snapshot = {row.mj_id: row for row in rows}
    planned: list[tuple[TaskState, dict, dict]] = []
    for mj_id, report in by_id.items():
        row = snapshot.get(mj_id)
        if row is None:
            stats.unknown += 1
            continue
        regressions = stats.regressions
        changes = _changes_for(row, report, stats)
        if changes is not None:
            planned.append((row, report, changes))
        elif memo is not None and stats.regressions == regressions and row.unfinished:
            memo.remember(mj_id, report, row.updated_at)
    return stats, planned


class ReportMemo:
    """The reports of one channel that changed nothing, each with the row version (``updated_at``) it was
    checked against. A poller keeps one per channel across its cycles: the same report against the same
    row version changes nothing again, so it need not be read against the row or worked out again — and
    most reports of a cycle repeat the last one (a task in the queue or at the same progress). Any write to
    the row, by anyone, changes its version and so voids the entry. Entries not met again in a cycle are
    dropped at its end."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[dict, float]] = {}
        self._next: dict[str, tuple[dict, float]] = {}

    def unchanged(self, mj_id: str, report: dict, version: float | None) -> bool:
        hit = self._seen.get(mj_id)
        if hit is not None and hit[1] == version and hit[0] == report:
            self._next[mj_id] = hit
            return True
        return False

    def remember(self, mj_id: str, report: dict, version: float) -> None:
        # As the upstream sent it (a cleaned report keeps that in raw): the next cycle's raw answers are
        # compared with it.
        self._next[mj_id] = (getattr(report, "raw", report), version)

    def end_cycle(self) -> None:
        self._seen, self._next = self._next, {}


class TaskState(NamedTuple):
    """The columns of a task that applying a report reads, as a plain row (no model instance)."""

    id: int
    user_id: int
    mj_id: str
    status: str
    progress: str
    prompt_en: str
    description: str
    state: str
    image_url: str
    video_url: str
    video_urls: str
    fail_reason: str
    buttons: str
    properties: str
    start_time: int
    finish_time: int
    quota: int
    unfinished: int
    updated_at: float  # the row's version: every writer of a task sets it
    nonce: str  # the task's notify link (PushScope); never changes


_STATE_COLUMNS = [getattr(Task, name) for name in TaskState._fields] + [Task.channel_id]
_CHANNEL = len(TaskState._fields)  # the extra column, read to filter by channel


class PushScope(NamedTuple):
    """The tasks a push may change: the one task of a per-task notify link (task_id), or, through the old
    per-channel link (task_id None), only tasks submitted before links were per task (no nonce)."""

    task_id: int | None

    def allows(self, task_id: int, nonce: str) -> bool:
        return task_id == self.task_id if self.task_id is not None else not nonce


class _LostRace(Exception):
    """A grouped compare-and-set matched fewer rows than it should have; the transaction is rolled back."""


def _read_states_by_mj_id(channel_id: int, mj_ids: list[str]) -> list[TaskState]:
    """The channel's tasks among mj_ids. The query names only mj_id, so every database seeks the mj_id
    index (with the channel in the WHERE clause SQLite prefers (channel_id, id) and scans the channel's
    every task, finished ones included); the rare same id on another channel is dropped here."""
    sql, params = compiled(("report_states", len(mj_ids)),
                           lambda: Task.select(*_STATE_COLUMNS).where(Task.mj_id.in_(mj_ids)), list(mj_ids))
    rows = database.execute_sql(sql, params).fetchall()
    return [TaskState._make(r[:_CHANNEL]) for r in rows if r[_CHANNEL] == channel_id]


def _lock_states(ids: list[int]) -> dict[int, TaskState]:
    """PostgreSQL/MariaDB: the rows by id, read again and locked in id order inside the write transaction,
    then the users a refund may touch, by id — the one global lock order (see :func:`_locked`)."""
    sql, params = compiled(("report_states_locked", len(ids)),
                           lambda: Task.select(*_STATE_COLUMNS).where(Task.id.in_(ids)).order_by(Task.id).for_update(),
                           list(ids))
    rows = {r[0]: TaskState._make(r[:_CHANNEL]) for r in database.execute_sql(sql, params).fetchall()}
    user_ids = sorted({r.user_id for r in rows.values() if r.unfinished and r.quota > 0})
    if user_ids:
        list(User.select(User.id).where(User.id.in_(user_ids)).order_by(User.id).for_update().tuples())
    return rows


def _apply_planned(planned: list[tuple[TaskState, dict, dict]]) -> ApplyStats:
    """Inside the write transaction: planned (row read before, report, changes).

    On PostgreSQL/MariaDB the rows are read again under row locks and the changes recomputed for any row
    that moved since it was read. SQLite's IMMEDIATE transaction already excludes every other writer, so
    the rows read before stand in for fresh ones: if one moved in between, the compare-and-set matches
    fewer rows than planned and :class:`_LostRace` rolls the whole batch back for a fresh read.
    """
    stats = ApplyStats()
    if is_sqlite():
        fresh = {row.id: row for row, _, _ in planned}
    else:
        fresh = _lock_states(sorted(row.id for row, _, _ in planned))
    now = time.time()
    groups: dict[tuple[str, ...], list[tuple]] = {}
    refunds: list[tuple[TaskState, dict]] = []
    for seen, report, changes in planned:  # (PostgreSQL/MariaDB rows are already locked, in id order)
        row = fresh.get(seen.id)
        if row is None:
            stats.unknown += 1
            continue
        if row.unfinished == 0 or row.status in FINISHED_STATUSES:
            stats.ignored += 1
            continue
        if row != seen:
            changes = compute_changes(row, report)[0]
        if not changes:
            stats.ignored += 1
            continue
        finishing = changes.get("unfinished") == 0
        status = changes.get("status", row.status)
        if finishing and status == "FAILURE" and row.quota > 0:
            refunds.append((row, changes))
            continue
        columns = tuple(changes)  # compute_changes adds keys in one fixed order: same keys, same tuple
        groups.setdefault(columns, []).append(
            tuple(changes[c] for c in columns) + (now, row.id, row.status, row.progress, row.quota))
        stats.updated += 1
        if finishing:
            stats.finished += 1
            if status == "SUCCESS":
                stats.succeeded += 1
                stats.succeeded_ids.append(row.id)
            elif status == "FAILURE":
                stats.failed += 1
    for columns, params in groups.items():
        cursor = database.cursor()
        cursor.executemany(_grouped_update_sql(columns), params)
        if cursor.rowcount != len(params):
            raise _LostRace(f"{cursor.rowcount} of {len(params)} rows updated")
    for row, changes in refunds:
        if not _compare_and_set(row, changes):
            raise _LostRace(f"task {row.id} changed since it was read")
        stats.updated += 1
        stats.finished += 1
        stats.failed += 1
        stats.refunded += 1
        stats.quota_refunded += row.quota
    return stats


_update_sql_cache: dict[tuple, str] = {}


def _grouped_update_sql(columns: tuple[str, ...]) -> str:
    """UPDATE task SET <columns>, updated_at WHERE id and the compare-and-set state, for executemany."""
    db = database.obj
    key = (type(db).__name__, columns)
    sql = _update_sql_cache.get(key)
    if sql is None:
        def q(name: str) -> str:
            return f"{db.quote[0]}{name}{db.quote[1]}"

        p = db.param
        sets = ", ".join(f"{q(c)} = {p}" for c in (*columns, "updated_at"))
        sql = (f"UPDATE {q(Task._meta.table_name)} SET {sets} WHERE {q('id')} = {p} AND {q('unfinished')} = 1 "
               f"AND {q('status')} = {p} AND {q('progress')} = {p} AND {q('quota')} = {p}")
        _update_sql_cache[key] = sql
    return sql


def apply_report(channel_id: int, report: dict, scope: PushScope | None = None) -> ApplyStats:
    """Apply one report (a push notification), to the tasks scope allows."""
    return apply_reports(channel_id, [report], scope=scope)


class PushTarget(NamedTuple):
    """What a push through a notify link may do. verdict: ``apply`` (to scope), ``refused`` (the report
    names a task the link is not for), ``finished`` (the link's task is finished: the link is dead),
    ``pending`` (the link's submission is not recorded yet: nothing to apply to, but no abuse either) or
    ``unknown`` (an old per-channel link naming no task of the channel)."""

    verdict: str
    scope: PushScope | None = None


def push_target(channel_id: int, mj_id: str, nonce: str | None) -> PushTarget:
    """Match a push to the task its link was made for: by the report's id on the link's channel (the mj_id
    index), then the nonce. nonce None is the old per-channel link: it reaches tasks without a nonce only.

    The verdict only shapes the answer; applying goes through :func:`apply_report` with the scope, which
    checks the same rule again on the rows it writes."""
    rows = list(Task.select(Task.id, Task.nonce, Task.unfinished)
                .where((Task.mj_id == mj_id) & (Task.channel_id == channel_id)).tuples())
    if nonce is None:
        if any(not row_nonce for _, row_nonce, _ in rows):
            return PushTarget("apply", PushScope(None))
        return PushTarget("refused" if rows else "unknown")
    mine = [(task_id, unfinished) for task_id, row_nonce, unfinished in rows if row_nonce and same(row_nonce, nonce)]
    if mine:
        task_id, unfinished = mine[0]
        return PushTarget("apply", PushScope(task_id)) if unfinished else PushTarget("finished")
    if PendingSubmission.select(PendingSubmission.id).where(PendingSubmission.nonce == nonce).exists():
        return PushTarget("pending")
    return PushTarget("refused")


def fail_tasks(task_ids: Iterable[int], reason: str) -> ApplyStats:
    """Fail unfinished tasks (timeouts, removed channels) with a reason, refunding each exactly once."""
    stats = ApplyStats()
    ids = list(task_ids)
    if not ids:
        return stats
    report = {"status": "FAILURE", "failReason": reason, "progress": ""}
    with write_tx():
        for task in _locked(Task.select().where(Task.id.in_(ids))):
            _apply_one(task, report, stats)
    return stats
