"""The one path that changes a task after submission: upstream reports and failing tasks.

Every such change goes through :func:`_apply`: a list-by-condition answer of the poller
(:func:`apply_reports`), a push through a notify link (:func:`apply_report`, scoped by
:func:`push_target` and :class:`PushScope` to the one task the link was made for), a report found while
adopting an interrupted submission, and a timeout or a removed channel (:func:`fail_tasks`, a FAILURE
report of mjctl's own). A CANCEL status is a report like any other.

Rules (docs/upstream.md, "Lifecycle"):
- a finished task (SUCCESS, FAILURE, CANCEL) is never changed again;
- status never moves backwards (an out-of-order push cannot turn IN_PROGRESS into SUBMITTED) and progress
  never goes down while the task runs; SUCCESS always reads "100%";
- every transition of a charged task to FAILURE or CANCEL refunds its quota exactly once, in the same
  transaction, with a ledger entry, and the task's quota then reads 0.

Exactly-once comes from compare-and-set updates: a row is only updated WHERE it still has the version,
status, progress and quota the change was computed from and is still unfinished, so of two racing writers (two
pollers, a push and a poll, a timeout and a report) only one changes the row, and only that one refunds.
Inside a write transaction rows are locked in one order on PostgreSQL/MariaDB: tasks by id, then the
users a refund may touch, by id (:func:`_read_states_by_id`).

Given the poller's report digests, the path also keeps the poller's memo on each row it reads
(:mod:`mjctl.poller`): a report that leaves its task unfinished is remembered with the version of the row
it leaves behind — whatever of it was refused is refused again, so it changes nothing when it comes again.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple

import peewee

from mjctl import accounts, jsontext, upstream_text
from mjctl.crypto import same
from mjctl.db import compiled, database, is_sqlite, json_rows, sqlite_json_reads, write_tx
from mjctl.models import FINISHED_STATUSES, PendingSubmission, Task, User
from mjctl.tasks import normalize_seconds

log = logging.getLogger("mjctl.reports")

STATUS_RANK = {"NOT_START": 0, "MODAL": 0, "SUBMITTED": 1, "IN_PROGRESS": 2}
TERMINAL_RANK = 3
REFUNDED_STATUSES = ("FAILURE", "CANCEL")  # a charged task reaching one of these gets its quota back
MAX_ATTEMPTS = 3  # planned outside the write transaction this many times at most, the last one inside it

_COUNTED = ("updated", "finished", "succeeded", "failed", "cancelled", "refunded", "quota_refunded", "ignored",
            "unknown", "malformed", "regressions")


@dataclass
class ApplyStats:
    """What applying reports did; the poller adds these up into its cycle summary."""

    updated: int = 0
    finished: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    refunded: int = 0
    quota_refunded: int = 0
    ignored: int = 0  # duplicate, late (task already finished) or stale reports
    unknown: int = 0  # no local task with that id on that channel
    malformed: int = 0
    regressions: int = 0  # progress or status that would have gone backwards
    succeeded_ids: list[int] = field(default_factory=list)

    def add(self, other: ApplyStats) -> None:
        for name in _COUNTED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.succeeded_ids.extend(other.succeeded_ids)


class TaskState(NamedTuple):
    """The columns of a task that applying a report reads, as a plain row (no model instance)."""

    id: int
    user_id: int
    mj_id: str
    status: str
    progress: str
    prompt_en: str
    description: str
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


# --- working out a report's changes ---------------------------------------------------------------------


def _percent(progress: str | None) -> int | None:
    if not progress:
        return None
    text = str(progress).strip().rstrip("%")
    try:
        return int(float(text))
    except ValueError:
        return None


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


def _reported_status(report: Mapping[str, Any]) -> str:
    """The status a report asks for, upper-cased ("" for none): what compute_changes works out from, and
    what decides, before the write, whose user a refund may touch."""
    return str(report.get("status") or "").upper()


def compute_changes(task: TaskState, report: dict) -> tuple[dict, list[str]]:
    """The field changes a report asks of a task, after the monotonicity rules; and notes on what was refused.

    Written in the order of the common case (a report that repeats what is stored) because the poller
    calls it for every unfinished task in every cycle.
    """
    notes: list[str] = []
    get = report.get
    old_status = status = task.status
    reported = get("status")
    if reported and reported != old_status:  # a cleaned report's status is upper-case already
        reported = _reported_status(report)
        if reported != old_status:
            if _rank(reported) >= _rank(old_status):
                status = reported
            else:
                notes.append(f"status {old_status}->{reported} refused")
    changes: dict[str, Any] = {}
    if status != old_status:
        changes["status"] = status

    old_progress = task.progress
    new_progress = get("progress")
    if status == "SUCCESS":
        progress = "100%"
    elif status in FINISHED_STATUSES:
        progress = "" if new_progress is None else str(new_progress)
    elif new_progress is None or new_progress == "" or new_progress == old_progress:
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

    for name, key, index in _SIMPLE_FIELDS:
        value = get(key)
        if value is not None:
            text = value if type(value) is str else str(value)
            if text != task[index]:
                changes[name] = text
    reported_urls = get("videoUrls")
    if reported_urls:
        video_urls = _video_urls(reported_urls)
        if video_urls and video_urls != task.video_urls:
            changes["video_urls"] = video_urls
    buttons = get("buttons")
    if buttons and not _same_json(task.buttons, buttons):
        changes["buttons"] = jsontext.dumps(buttons)
    reported_properties = get("properties")
    if reported_properties and isinstance(reported_properties, dict):
        properties = _merged_properties(task.properties, reported_properties)
        if properties is not None:
            changes["properties"] = properties
    for name, key, index in _TIME_FIELDS:
        value = get(key)
        if value:
            seconds = normalize_seconds(int(value))
            if seconds and seconds != task[index]:
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
_SIMPLE_FIELDS = tuple((name, key, TaskState._fields.index(name)) for name, key in (
    ("prompt_en", "promptEn"), ("description", "description"), ("image_url", "imageUrl"),
    ("video_url", "videoUrl"), ("fail_reason", "failReason")))
_TIME_FIELDS = tuple((name, key, TaskState._fields.index(name))
                     for name, key in (("start_time", "startTime"), ("finish_time", "finishTime")))


def _same_json(stored: str, value: Any) -> bool:
    """Whether the stored JSON text holds value: decoding and comparing is cheaper than encoding value, and
    an equal value stored with its keys in another order is not a change."""
    if not stored:
        return False
    try:
        return jsontext.loads(stored) == value
    except ValueError:
        return False


def _changes_for(row: TaskState, report: dict, stats: ApplyStats) -> tuple[dict, bool]:
    """The changes a report asks of a task after the monotonicity rules (none for a finished task), and
    whether the same report, coming again, would change nothing: true while the task stays unfinished.
    Working a report out against the row it left gives no change: what it set, it finds set; what was
    refused (a status or a progress going backwards) is refused again, as the row still holds what
    refused it. Counts refusals, and reports with nothing to write."""
    if row.unfinished == 0 or row.status in FINISHED_STATUSES:
        stats.ignored += 1
        return {}, False
    changes, notes = compute_changes(row, report)
    if notes:
        stats.regressions += 1
        log.info("task %s: %s", row.mj_id, "; ".join(notes))
    if not changes:
        stats.ignored += 1
    return changes, changes.get("unfinished") != 0


def _refund_of(row: TaskState, changes: dict) -> int:
    """The quota a change gives back: all of it when it finishes a charged task as FAILURE or CANCEL."""
    finishing = changes.get("unfinished") == 0
    return row.quota if finishing and changes.get("status", row.status) in REFUNDED_STATUSES else 0


# --- the one apply path ---------------------------------------------------------------------------------

#: A read of the rows to change, each with the report to apply to it (see :func:`_apply`); a report whose
#: task is not there comes with None and counts as unknown.
Targets = Callable[[], list[tuple[TaskState | None, dict]]]


class _Planned(NamedTuple):
    row: TaskState  # as read before the write transaction
    report: dict
    changes: dict
    digest: str  # the report's memo digest when it is to be remembered with the change, else ""


def _apply(read: Targets, stats: ApplyStats, digests: Mapping[str, str] | None = None,
           first_read: Targets | None = None) -> ApplyStats:
    """Apply reports to the rows read() returns, and add what happened to stats.

    The changes are worked out from a plain read outside any transaction (first_read, when given, for the
    first attempt: rows read earlier still); a read with nothing to write opens no write transaction at
    all. The write transaction then checks each row against that read: PostgreSQL/MariaDB lock the rows
    again (tasks by id, then the users a refund touches, by id) and work out again any row that moved in
    between; on SQLite, whose IMMEDIATE transaction excludes every other writer, the compare-and-set of a
    row that moved matches nothing and :class:`_LostRace` rolls the batch back for a fresh read. The last
    attempt on SQLite reads inside the transaction, where nothing can move.

    digests (mj_id -> digest of the report as the upstream sent it) are recorded in the poller's memo of
    each report that leaves its task unfinished: with the change it makes, or on its own when it changes
    nothing (or only asks what the monotonicity rules refuse).
    """
    digests = digests or {}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        planning = ApplyStats()
        planned: list[_Planned] = []
        memos: list[tuple] = []
        for row, report in (first_read if attempt == 1 and first_read is not None else read)():
            if row is None:
                planning.unknown += 1
                continue
            changes, whole = _changes_for(row, report, planning)
            digest = digests.get(row.mj_id, "") if whole else ""
            if changes:
                planned.append(_Planned(row, report, changes, digest))
            elif digest:  # the parameters of _memo_sql
                memos.append((digest, row.updated_at, row.id, row.updated_at, digest))
        if not planned and not memos:
            stats.add(planning)
            return stats
        reread = attempt == MAX_ATTEMPTS or not is_sqlite()
        try:
            with write_tx():
                applied = _write(planned, reread) if planned else ApplyStats()
                _remember(memos)
        except _LostRace:
            if reread:
                raise
            continue  # rolled back: read and plan again
        stats.add(planning)
        stats.add(applied)
        return stats
    raise AssertionError("unreachable: the last attempt cannot lose a race")


def _remember(memos: list[tuple]) -> None:
    """Record reports that changed nothing in their rows' memo, each against the version it was checked
    against (a row written since is left alone), without moving the row's version."""
    if not memos:
        return
    # one row's params: digest, the version it was checked against, id (the version compared twice)
    if _joined(_MEMO_SETS, _MEMO_WHERE, [(d, v, i, v) for d, v, i, _, _ in memos],
               _unless_memo_held("v.column1")) is None:
        database.cursor().executemany(_memo_sql(), memos)


class _LostRace(Exception):
    """A compare-and-set matched fewer rows than planned; the transaction is rolled back."""


def _write(planned: list[_Planned], reread: bool) -> ApplyStats:
    """Inside the write transaction: the rows to change.

    reread: read the rows again (locked, on PostgreSQL/MariaDB) and work out again any that moved.
    Updates go out grouped by the columns they set (:func:`_update_rows`), each a compare-and-set on the
    state its changes were worked out from; a refund's ledger entry follows its row's update.
    """
    stats = ApplyStats()
    fresh = (_read_states_by_id(sorted(p.row.id for p in planned), lock=not is_sqlite(),
                                reports_by_id={p.row.id: p.report for p in planned}) if reread else None)
    by_id = {row.id: row for row in fresh} if fresh is not None else None
    now = time.time()
    groups: dict[tuple[str, ...], list[tuple]] = {}
    refunds: list[tuple[TaskState, dict, int]] = []
    for seen, report, changes, digest in planned:
        row = by_id.get(seen.id) if by_id is not None else seen
        if row is None:
            stats.unknown += 1
            continue
        if row is not seen and row != seen:
            changes, whole = _changes_for(row, report, ApplyStats())
            digest = digest if whole else ""
        if not changes:
            stats.ignored += 1
            continue
        # changes is this plan's own dict (worked out for this attempt): completed in place.
        if digest:  # the same report against the version written now changes nothing again
            changes["memo_digest"] = digest
            changes["memo_version"] = now
        finishing = changes.get("unfinished") == 0
        refund = _refund_of(row, changes) if finishing else 0
        if refund:
            changes["quota"] = 0
            refunds.append((row, changes, refund))
        # compute_changes adds keys in one fixed order: the same keys make the same tuple
        params = groups.get(columns := tuple(changes))
        if params is None:
            params = groups[columns] = []
        params.append((*changes.values(), now, row.id, row.updated_at, row.status, row.progress, row.quota))
        stats.updated += 1
        if finishing:
            _count_finished(stats, row, changes, refund)
    for columns, params in groups.items():
        _update_rows(columns, params)
    for row, changes, refund in refunds:
        status = changes.get("status", row.status)
        reason = changes.get("fail_reason") or row.fail_reason
        what = "failed" if status == "FAILURE" else "was cancelled"
        accounts.refund(row.user_id, refund, task_id=row.id,
                        reason=(f"task {row.mj_id} {what}" + (f": {reason}" if reason else ""))[:500])
    return stats


def _count_finished(stats: ApplyStats, row: TaskState, changes: dict, refund: int) -> None:
    stats.finished += 1
    status = changes.get("status", row.status)
    if status == "SUCCESS":
        stats.succeeded += 1
        stats.succeeded_ids.append(row.id)
    elif status == "FAILURE":
        stats.failed += 1
    elif status == "CANCEL":
        stats.cancelled += 1
    if refund:
        stats.refunded += 1
        stats.quota_refunded += refund


_sql_text_cache: dict[tuple, str] = {}  # SQL written here rather than by peewee, by shape and database kind


def _quoted(name: str) -> str:
    """A table or column name quoted for the bound database."""
    quote = database.obj.quote
    return f"{quote[0]}{name}{quote[1]}"


def _update_sql(sets: tuple[str, ...], where: tuple[str, ...], also: str = "") -> str:
    """UPDATE task SET <sets> WHERE unfinished = 1 AND <where> (each a parameter) <also>, for executemany.

    ``unfinished`` is compared as an expression (``+ 0``) so that no planner reaches these one-row updates
    through the (unfinished, channel_id) index: with statistics taken when few tasks were unfinished,
    PostgreSQL costs that index and the primary key alike at one row, takes the smaller index and then
    walks every unfinished task for each update (164 ms a row among 100,000 unfinished, against 0.1 ms).
    Every database then finds the row by its id."""
    db = database.obj
    key = (type(db).__name__, sets, where, also)
    sql = _sql_text_cache.get(key)
    if sql is None:
        q, p = _quoted, db.param
        sql = (f"UPDATE {q(Task._meta.table_name)} SET {', '.join(f'{q(c)} = {p}' for c in sets)} "
               f"WHERE {q('unfinished')} + 0 = 1" + "".join(f" AND {q(c)} = {p}" for c in where) + also)
        _sql_text_cache[key] = sql
    return sql


def _update_rows(columns: tuple[str, ...], params: list[tuple]) -> None:
    """The compare-and-set updates of rows that change the same columns (each row's params: the new values,
    updated_at, then _CHANGE_WHERE as read); _LostRace when any row had moved."""
    sets = (*columns, "updated_at")
    updated = _joined(sets, _CHANGE_WHERE, params)
    if updated is None:
        cursor = database.cursor()
        cursor.executemany(_grouped_update_sql(columns), params)
        updated = cursor.rowcount
    if updated != len(params):
        raise _LostRace(f"{updated} of {len(params)} rows updated")


#: Rows per joined update: 200 rows of the widest change stay far below SQLite's 32,766 parameters.
JOINED_ROWS = 200


def _joined(sets: tuple[str, ...], where: tuple[str, ...], params: list[tuple], also: str = "") -> int | None:
    """Rows updated as one ``UPDATE … FROM (VALUES …)`` per JOINED_ROWS rows, where the store has it
    (PostgreSQL; SQLite 3.33 and later), else None for ``executemany``. Each row's params are the values
    of sets, then those compared in where; also is added to the WHERE clause as it is, with ``v.columnN``
    naming the Nth param of a row.

    ``executemany`` is one statement per row: on PostgreSQL a round trip each, and on SQLite a step each
    that hands Python's interpreter lock to the poller's other threads and waits to get it back."""
    if len(params) < 2 or not _has_joined_updates():
        return None
    cursor, updated = database.cursor(), 0
    for start in range(0, len(params), JOINED_ROWS):
        chunk = params[start:start + JOINED_ROWS]
        cursor.execute(_joined_sql(sets, where, also, len(chunk)), list(chain.from_iterable(chunk)))
        updated += cursor.rowcount
    return updated


def _has_joined_updates() -> bool:
    if is_sqlite():
        return sqlite3.sqlite_version_info >= (3, 33)
    return isinstance(database.obj, peewee.PostgresqlDatabase)


def _joined_sql(sets: tuple[str, ...], where: tuple[str, ...], also: str, rows: int) -> str:
    """UPDATE task SET <sets> FROM (VALUES <rows>) AS v WHERE unfinished = 1 AND <where> <also>: each
    VALUES row names the row to update by id, and the state it must still hold (see _update_sql)."""
    db = database.obj
    key = ("joined", type(db).__name__, sets, where, also, rows)
    sql = _sql_text_cache.get(key)
    if sql is None:
        q = _quoted
        table = q(Task._meta.table_name)
        assign = ", ".join(f"{q(c)} = v.column{i + 1}" for i, c in enumerate(sets))
        match = "".join(f" AND {table}.{q(c)} = v.column{len(sets) + i + 1}" for i, c in enumerate(where))
        row = "(" + ", ".join([db.param] * (len(sets) + len(where))) + ")"
        sql = (f"UPDATE {table} SET {assign} FROM (VALUES {', '.join([row] * rows)}) AS v "
               f"WHERE {table}.{q('unfinished')} + 0 = 1{match}{also}")
        _sql_text_cache[key] = sql
    return sql


def _grouped_update_sql(columns: tuple[str, ...]) -> str:
    """The compare-and-set update of a change: its columns and updated_at, where the row still holds the
    state the change was worked out from."""
    return _update_sql((*columns, "updated_at"), _CHANGE_WHERE)


#: What a change's row must still hold: the version it was worked out from (every writer moves it, so a
#: write to any column since is found, as a memo written with the change must be checked against the row
#: it leaves), and the status, progress and quota a refund and the monotonicity rules were decided on.
_CHANGE_WHERE = ("id", "updated_at", "status", "progress", "quota")


_MEMO_SETS = ("memo_digest", "memo_version")
_MEMO_WHERE = ("id", "updated_at")


def _unless_memo_held(digest: str) -> str:
    """The end of a memo update's WHERE clause: unless the row holds that memo already (a write that moved
    neither the memo nor updated_at would make the database move the version: migration 8). digest names
    the new digest in the statement (a parameter, or a column of a joined VALUES row)."""
    table, q = _quoted(Task._meta.table_name), _quoted
    return (f" AND ({table}.{q('memo_digest')} <> {digest}"
            f" OR {table}.{q('memo_version')} <> {table}.{q('updated_at')})")


def _memo_sql() -> str:
    """The memo update of a row still at the version checked, one row per statement."""
    return _update_sql(_MEMO_SETS, _MEMO_WHERE, _unless_memo_held(database.obj.param))


_STATE_COLUMNS = [getattr(Task, name) for name in TaskState._fields]
_CHANNEL = len(TaskState._fields)  # the extra column of the read by mj_id, to filter by channel


def _read_states_by_mj_id(channel_id: int, mj_ids: list[str]) -> list[TaskState]:
    """The channel's tasks among mj_ids. The query names only mj_id, so every database seeks the mj_id
    index (with the channel in the WHERE clause SQLite prefers (channel_id, id) and scans the channel's
    every task, finished ones included); the rare same id on another channel is dropped here."""
    if sqlite_json_reads():
        try:
            return _read_states_as_json(channel_id, mj_ids)
        except peewee.OperationalError as exc:  # a value JSON cannot hold (a BLOB put in by hand)
            log.debug("channel %s: rows read one by one: %s", channel_id, exc)
    sql, params = compiled(("report_states", len(mj_ids)),
                           lambda: Task.select(*_STATE_COLUMNS, Task.channel_id).where(Task.mj_id.in_(mj_ids)),
                           list(mj_ids))
    rows = database.execute_sql(sql, params).fetchall()
    return [TaskState._make(r[:_CHANNEL]) for r in rows if r[_CHANNEL] == channel_id]


#: The state columns that hold floats: JSON would render them with 15 digits, quote() with all of them.
_FLOAT_STATE = frozenset(i for i, c in enumerate(_STATE_COLUMNS) if isinstance(c, peewee.FloatField))
_VERSION = TaskState._fields.index("updated_at")
assert _FLOAT_STATE == {_VERSION}, "_state_of_json converts the row version only"


def _read_states_as_json(channel_id: int, mj_ids: list[str]) -> list[TaskState]:
    """The same read on SQLite as one value: the rows as a JSON array, built in one step.

    Fetching a row steps SQLite without the interpreter lock; in a poll cycle the store lane's reads then
    gave the lock to a fetching worker at every row and waited to get it back. One step per read (and one
    orjson decode) cost 10% less CPU over a first cycle of 10,000 tasks. Floats travel as quote()'s text,
    which keeps every digit: the row version is compared exactly when the row is written."""
    key = ("json", type(database.obj).__name__, len(mj_ids))
    sql = _sql_text_cache.get(key)
    if sql is None:
        table = _quoted(Task._meta.table_name)
        values = ", ".join(f"quote({_quoted(c.column_name)})" if i in _FLOAT_STATE else _quoted(c.column_name)
                           for i, c in enumerate(_STATE_COLUMNS))
        sql = _sql_text_cache[key] = (
            f"SELECT json_group_array(json_array({values}, {_quoted('channel_id')})) FROM {table} "
            f"WHERE {_quoted('mj_id')} IN ({', '.join(['?'] * len(mj_ids))})")
    return [_state_of_json(row) for row in json_rows(sql, mj_ids) if row.pop() == channel_id]


def unremembered_states(channel_id: int) -> dict[str, TaskState] | None:
    """The channel's unfinished tasks whose memo does not hold, by mj_id: the rows a poll cycle will work out,
    read in one step (SQLite with JSON, as :func:`_read_states_as_json`); None where that read is not to be
    had (another database, an older SQLite, a value JSON cannot hold)."""
    if not sqlite_json_reads():
        return None
    key = ("json_unremembered", type(database.obj).__name__)
    sql = _sql_text_cache.get(key)
    if sql is None:
        q = _quoted
        values = ", ".join(f"quote({q(c.column_name)})" if i in _FLOAT_STATE else q(c.column_name)
                           for i, c in enumerate(_STATE_COLUMNS))
        sql = _sql_text_cache[key] = (
            f"SELECT json_group_array(json_array({values})) FROM {q(Task._meta.table_name)} "
            f"WHERE {q('unfinished')} = 1 AND {q('channel_id')} = ? "
            f"AND NOT ({q('memo_version')} = {q('updated_at')} AND {q('memo_digest')} <> '')")
    try:
        rows = json_rows(sql, [channel_id])
    except peewee.OperationalError as exc:
        log.debug("channel %s: rows read batch by batch: %s", channel_id, exc)
        return None
    return {state.mj_id: state for state in map(_state_of_json, rows)}


def _state_of_json(row: list) -> TaskState:
    """A row of a one-step read as a TaskState: its float (the version) back from quote()'s text, every
    digit kept."""
    row[_VERSION] = float(row[_VERSION])
    return TaskState._make(row)


def _read_states_by_id(ids: list[int], *, lock: bool,
                       reports_by_id: Mapping[int, dict] | None = None) -> list[TaskState]:
    """The rows of ids. lock (PostgreSQL/MariaDB, inside the write transaction): locked in id order, then
    the users a refund may touch, by id — the one lock order of every writer here. Without it two batches
    (or a batch and a push) that refund different users lock task and user rows in opposite orders and
    deadlock (PostgreSQL then stalls one and aborts the other).

    A refund may touch the user of a charged unfinished row whose report (reports_by_id) or own status
    says FAILURE or CANCEL: nothing else finishes a task with its quota back. Only those users are locked;
    locking the user of every charged row in the batch made every batch of one user's tasks wait for the
    one before it to commit (a first cycle over 10,000 tasks of one user on PostgreSQL, 4 workers: the
    workers took turns)."""
    def build():
        query = Task.select(*_STATE_COLUMNS).where(Task.id.in_(ids))
        return query.order_by(Task.id).for_update() if lock else query

    sql, params = compiled(("report_states_by_id", lock, len(ids)), build, list(ids))
    rows = [TaskState._make(r) for r in database.execute_sql(sql, params).fetchall()]
    if lock:
        asked = reports_by_id or {}

        def may_refund(row: TaskState) -> bool:  # a row given no report is taken as one it may fail
            report = asked.get(row.id)
            return row.status in REFUNDED_STATUSES or report is None or _reported_status(report) in REFUNDED_STATUSES

        user_ids = sorted({r.user_id for r in rows if r.unfinished and r.quota > 0 and may_refund(r)})
        if user_ids:
            list(User.select(User.id).where(User.id.in_(user_ids)).order_by(User.id).for_update().tuples())
    return rows


# --- the callers' entry points --------------------------------------------------------------------------


def apply_reports(channel_id: int, reports: Iterable[dict], *, scope: PushScope | None = None,
                  digests: Mapping[str, str] | None = None, known: Mapping[str, TaskState] | None = None
                  ) -> ApplyStats:
    """Apply upstream task reports from one channel, in one transaction. Reports for ids this channel has
    no task for, and reports without an id, are counted and skipped. With a scope (a push through a notify
    link) only the tasks that link may change are considered; the others count as unknown. digests (the
    poller's, by id) are remembered on the rows of the reports that leave their tasks unfinished (see
    :func:`_apply`). known (the poller's rows by mj_id, read when it claimed the channel) stands in for the
    first read when it holds every report's row: the write checks each row's version against it, so a row
    written since sends the batch back for a fresh read like any row that moved."""
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

    def read() -> list[tuple[TaskState | None, dict]]:
        rows = _read_states_by_mj_id(channel_id, list(by_id))
        if scope is not None:
            rows = [row for row in rows if scope.allows(row.id, row.nonce or "")]
        found = {row.mj_id: row for row in rows}
        return [(found.get(mj_id), report) for mj_id, report in by_id.items()]

    first_read = None
    if known and scope is None and known.keys() >= by_id.keys():
        def first_read() -> list[tuple[TaskState | None, dict]]:  # rows read earlier: see known
            return [(known[mj_id], report) for mj_id, report in by_id.items()]

    return _apply(read, stats, digests, first_read)


def apply_report(channel_id: int, report: dict, scope: PushScope | None = None) -> ApplyStats:
    """Apply one report (a push notification), to the tasks scope allows."""
    return apply_reports(channel_id, [report], scope=scope)


def fail_tasks(task_ids: Iterable[int], reason: str) -> ApplyStats:
    """Fail unfinished tasks (timeouts, removed channels) with a reason, refunding each exactly once."""
    ids = sorted(set(task_ids))
    if not ids:
        return ApplyStats()
    report = {"status": "FAILURE", "failReason": reason, "progress": ""}
    return _apply(lambda: [(row, report) for row in _read_states_by_id(ids, lock=False)], ApplyStats())


# --- pushes ---------------------------------------------------------------------------------------------


class PushScope(NamedTuple):
    """The tasks a push may change: the one task of a per-task notify link (task_id), or, through the old
    per-channel link (task_id None), only tasks submitted before links were per task (no nonce)."""

    task_id: int | None

    def allows(self, task_id: int, nonce: str) -> bool:
        return task_id == self.task_id if self.task_id is not None else not nonce


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
