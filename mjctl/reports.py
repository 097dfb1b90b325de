"""The one path that changes a task after submission: applying an upstream report, and failing a task.

Used by the poller (list-by-condition answers), by push notifications (notifyHook) and by timeouts.

Rules (CONTRACT §5):
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
from dataclasses import dataclass, field
from typing import Any, Iterable

from mjctl import accounts
from mjctl.db import is_sqlite, write_tx
from mjctl.models import FINISHED_STATUSES, Task, User

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

    def add(self, other: "ApplyStats") -> None:
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


def compute_changes(task: Task, report: dict) -> tuple[dict, list[str]]:
    """The field changes a report asks for, after the monotonicity rules; and notes on what was refused."""
    notes: list[str] = []
    reported = str(report.get("status") or "").upper() or task.status
    status = task.status
    if _rank(reported) >= _rank(task.status):
        status = reported
    else:
        notes.append(f"status {task.status}->{reported} refused")
    changes: dict[str, Any] = {}
    if status != task.status:
        changes["status"] = status

    old_pct = _percent(task.progress)
    new_progress = report.get("progress")
    if status == "SUCCESS":
        progress = "100%"
    elif status in FINISHED_STATUSES:
        progress = "" if new_progress is None else str(new_progress)
    else:
        new_pct = _percent(new_progress)
        if new_progress is None or new_progress == "":
            progress = task.progress
        elif new_pct is not None and old_pct is not None and new_pct < old_pct:
            progress = task.progress
            notes.append(f"progress {task.progress}->{new_progress} refused")
        else:
            progress = str(new_progress)[:32]
    if progress != task.progress:
        changes["progress"] = progress

    simple = {
        "prompt_en": report.get("promptEn"),
        "description": report.get("description"),
        "state": report.get("state"),
        "image_url": report.get("imageUrl"),
        "video_url": report.get("videoUrl"),
        "fail_reason": report.get("failReason"),
    }
    for name, value in simple.items():
        if value is not None and str(value) != getattr(task, name):
            changes[name] = str(value)
    video_urls = _video_urls(report.get("videoUrls"))
    if video_urls and video_urls != task.video_urls:
        changes["video_urls"] = video_urls
    for name, key in (("buttons", "buttons"), ("properties", "properties")):
        value = report.get(key)
        if value:
            encoded = json.dumps(value, ensure_ascii=False)
            if encoded != getattr(task, name):
                changes[name] = encoded
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


def _apply_one(task: Task, report: dict, stats: ApplyStats) -> None:
    """Apply one report to one task inside the caller's transaction, retrying on a lost race."""
    for _ in range(MAX_RETRIES):
        if task.unfinished == 0 or task.status in FINISHED_STATUSES:
            stats.ignored += 1
            return
        changes, notes = compute_changes(task, report)
        if notes:
            stats.regressions += 1
            log.info("task %s: %s", task.mj_id, "; ".join(notes))
        if not changes:
            stats.ignored += 1
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


def apply_reports(channel_id: int, reports: Iterable[dict]) -> ApplyStats:
    """Apply upstream task reports from one channel in one transaction. Reports for ids this channel has no
    task for, and reports without an id, are counted and skipped."""
    stats = ApplyStats()
    by_id: dict[str, dict] = {}
    for report in reports:
        if not isinstance(report, dict) or not report.get("id"):
            stats.malformed += 1
            continue
        by_id[str(report["id"])] = report
    if not by_id:
        return stats
    with write_tx():
        tasks = {t.mj_id: t for t in _locked(Task.select().where((Task.channel_id == channel_id)
                                                                 & (Task.mj_id.in_(list(by_id)))))}
        for mj_id, report in by_id.items():
            task = tasks.get(mj_id)
            if task is None:
                stats.unknown += 1
                continue
            _apply_one(task, report, stats)
    return stats


def apply_report(channel_id: int, report: dict) -> ApplyStats:
    """Apply one report (a push notification)."""
    return apply_reports(channel_id, [report])


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
