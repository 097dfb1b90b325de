"""Write-ahead records of submissions in flight, and finishing the ones a dead process left behind.

The relay writes a :class:`~mjctl.models.PendingSubmission` in the transaction that reserves the quota,
before the upstream is asked, and turns it into the task (charged once) in the transaction that records
the answer. A process killed in between leaves the row; the poller (:func:`adopt`) then asks the channels
it was sent to for their recent tasks (``GET /mj/task/list``) and finds the one carrying the row's nonce —
upstreams echo the submission's ``state`` (mjctl forwards ``mjctl:<nonce>`` in place of the user's state,
which mjctl keeps) and its ``notifyHook`` (whose path ends in the nonce). Found, it becomes the task and
is charged exactly once; not found once the reservation has expired, the row is dropped uncharged.

Exactly-once: whoever deletes the pending row (the submitter recording its answer, or a poller adopting
or dropping it) does so in the transaction that writes the outcome, and only the one whose DELETE
removed the row writes one.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import peewee

from mjctl import accounts, upstream_text
from mjctl.db import is_sqlite, write_tx
from mjctl.errors import InsufficientQuota
from mjctl.models import PendingSubmission, Reservation, Task, User

log = logging.getLogger("mjctl.pending")

STATE_PREFIX = "mjctl:"  # the state forwarded upstream: this prefix and the submission's nonce
ADOPT_BATCH = 100  # pending rows looked at per cycle


def new_nonce() -> str:
    """16 random bytes, URL-safe: the secret part of a submission's notify link."""
    return secrets.token_urlsafe(16)


def upstream_state(nonce: str) -> str:
    return STATE_PREFIX + nonce


def nonce_of(report: Mapping[str, Any]) -> str | None:
    """The nonce an upstream task report carries back: in its echoed state, or its notifyHook's path."""
    state = report.get("state")
    if isinstance(state, str) and state.startswith(STATE_PREFIX):
        return state[len(STATE_PREFIX):] or None
    properties = report.get("properties")
    hook = properties.get("notifyHook") if isinstance(properties, dict) else None
    if isinstance(hook, str) and "/mj/notify/" in hook:
        parts = urlsplit(hook).path.rstrip("/").split("/")  # …/mj/notify/<channel id>/<nonce>
        if len(parts) >= 4 and parts[-3] == "notify" and parts[-2].isdigit():
            return parts[-1] or None
    return None


# --- the submitter's side --------------------------------------------------------------------------

def write_ahead(user_id: int, price: int, ttl: float, fields: dict[str, Any],
                refuse: Callable[[str], Exception]) -> PendingSubmission:
    """In one write transaction: hold price of the user's quota for ttl seconds (when price > 0) and write
    the pending record naming that reservation. Raises refuse(reason) when the quota does not cover it.

    The user's row is locked on PostgreSQL/MySQL so concurrent reservations of one user queue up; SQLite's
    IMMEDIATE transaction serialises writers anyway."""
    now = time.time()
    with write_tx():
        query = User.select(User.id, User.quota).where(User.id == user_id)
        if not is_sqlite():
            query = query.for_update()
        user = query.first()
        if user is None:
            raise refuse("unknown user")
        reservation_id = None
        if price > 0:
            expired = (Reservation.user_id == user_id) & (Reservation.expires_at <= now)
            if Reservation.select(Reservation.id).where(expired).exists():  # a DELETE would take range locks every time
                Reservation.delete().where(expired).execute()
            available = int(user.quota) - held(user_id, now)
            if available < price:
                raise refuse(f"insufficient quota: this costs {price}, {max(available, 0)} available")
            reservation_id = Reservation.create(user_id=user_id, amount=price, expires_at=now + ttl).id
        return PendingSubmission.create(user_id=user_id, price=price, reservation_id=reservation_id,
                                        created_at=now, expires_at=now + ttl, **fields)


def held(user_id: int, now: float) -> int:
    """The quota the user's live reservations hold."""
    total = (Reservation.select(peewee.fn.COALESCE(peewee.fn.SUM(Reservation.amount), 0))
             .where((Reservation.user_id == user_id) & (Reservation.expires_at > now)).scalar())
    return int(total or 0)


def note_channel(pending: PendingSubmission, channel_id: int) -> None:
    """Add a channel about to be tried (a failover) to the record, so adoption asks it too."""
    tried = pending.channel_list()
    if channel_id in tried:
        return
    pending.channel_ids = ",".join(str(c) for c in [*tried, channel_id])
    with write_tx():
        PendingSubmission.update(channel_ids=pending.channel_ids).where(
            PendingSubmission.id == pending.id).execute()


def claim(pending: PendingSubmission) -> bool:
    """Inside the caller's write transaction: delete the pending record and release its reservation.
    True when this call removed the record, i.e. the caller is the one to write the outcome."""
    if pending.reservation_id is not None:
        Reservation.delete().where(Reservation.id == pending.reservation_id).execute()
    return PendingSubmission.delete().where(PendingSubmission.id == pending.id).execute() == 1


def drop(pending: PendingSubmission) -> bool:
    """Give the submission up uncharged, in a transaction of its own."""
    with write_tx():
        return claim(pending)


def id_taken(channel_id: int, mj_id: str) -> bool:
    """Whether a task of this channel already has this upstream id (a colliding answer)."""
    return Task.select(Task.id).where((Task.mj_id == mj_id) & (Task.channel_id == channel_id)).exists()


def recorded(channel_id: int, mj_id: str, nonce: str) -> Task | None:
    """The task this submission became, when another process recorded it first."""
    for task in Task.select().where((Task.mj_id == mj_id) & (Task.channel_id == channel_id)):
        if task.nonce == nonce:
            return task
    return None


def create_task(pending: PendingSubmission, channel_id: int, mj_id: str, *, status: str, code: int,
                description: str, properties: Mapping[str, Any], prompt_en: str = "") -> Task:
    """Inside the caller's write transaction (after :func:`claim`): the accepted task, charged."""
    stored = json.loads(pending.properties) if pending.properties else {}
    merged = {k: v for k, v in properties.items() if k != "notifyHook"}  # mjctl's own hook is not kept
    merged.update(stored)  # the caller's hook and the speed prefix are mjctl's to keep
    task = Task.create(
        mj_id=mj_id, user_id=pending.user_id, channel_id=channel_id, action=pending.action, code=code,
        description=description[:1000], state=pending.state, prompt=pending.prompt, prompt_en=prompt_en,
        properties=json.dumps(merged, ensure_ascii=False), submit_time=int(pending.created_at),
        status=status, progress="0%" if status == "SUBMITTED" else "", quota=pending.price, unfinished=1,
        nonce=pending.nonce, mode=pending.mode)
    charge(task, pending.price)
    return task


def charge(task: Task, price: int) -> None:
    """Charge an accepted task inside the caller's transaction (one ledger entry)."""
    if price <= 0:
        return
    try:
        accounts.charge(task.user_id, price, task_id=task.id, reason=f"{task.action} {task.mj_id}")
    except InsufficientQuota:
        # The balance was lowered by hand while the upstream was being asked (reservations cannot stop
        # that), or an adopted task's reservation had expired: the task runs, uncharged, rather than the
        # balance going negative.
        log.warning("task %s accepted but the balance no longer covers %s; not charged", task.mj_id, price)
        Task.update(quota=Task.quota - price, updated_at=time.time()).where(Task.id == task.id).execute()


# --- the poller's side -----------------------------------------------------------------------------

@dataclass
class AdoptStats:
    adopted: int = 0  # became tasks (charged)
    dropped: int = 0  # given up uncharged: the upstream has no such task
    collided: int = 0  # the upstream's id belongs to another task of the channel: given up uncharged
    asked: int = 0  # GET /mj/task/list requests
    errors: list[str] = field(default_factory=list)
    reports: dict[int, list[dict]] = field(default_factory=dict)  # per channel: the adopted tasks' reports


def due(now: float, calls_over_after: float) -> list[PendingSubmission]:
    """Pending records whose submitter is no longer calling upstreams (one seek on expires_at): only
    those may belong to a dead process. calls_over_after is how long before its expiry a record's calls
    are over (the relay's RESERVATION_SLACK)."""
    return list(PendingSubmission.select().where(PendingSubmission.expires_at <= now + calls_over_after)
                .order_by(PendingSubmission.expires_at).limit(ADOPT_BATCH))


def adopt(now: float, calls_over_after: float, give_up_after: float,
          list_tasks: Callable[[int], list[dict]]) -> AdoptStats:
    """Finish what dead submitters left: each due pending record becomes its upstream task, charged once,
    or — once its reservation has expired and no channel it was sent to knows it — is dropped uncharged.

    list_tasks(channel_id) answers ``GET /mj/task/list`` of a channel (raising on an upstream failure; a
    channel that cannot be asked is asked again next cycle, until give_up_after seconds after the
    submission). Modal continuations are never adopted: the task they continue is tracked anyway, so its
    result is not lost; only their price is forgone."""
    stats = AdoptStats()
    rows = due(now, calls_over_after)
    if not rows:
        return stats
    answers: dict[int, dict[str, dict] | None] = {}

    def known(channel_id: int) -> dict[str, dict] | None:
        if channel_id not in answers:
            stats.asked += 1
            try:
                listed = list_tasks(channel_id)
            except Exception as exc:  # noqa: BLE001 - any failure means "could not ask", retried next cycle
                log.warning("channel %s: cannot list its tasks to adopt interrupted submissions: %s", channel_id, exc)
                stats.errors.append(str(channel_id))
                answers[channel_id] = None
            else:
                answers[channel_id] = {n: t for t in listed if isinstance(t, dict) and (n := nonce_of(t))}
        return answers[channel_id]

    for pending in rows:
        found, unanswered = None, False
        if pending.parent_task_id is None:
            for channel_id in pending.channel_list():
                tasks = known(channel_id)
                if tasks is None:
                    unanswered = True
                elif pending.nonce in tasks:
                    found = (channel_id, tasks[pending.nonce])
                    break
        if found is not None:
            _adopt_one(pending, *found, stats)
        elif now >= pending.expires_at and (not unanswered or now >= pending.created_at + give_up_after):
            if drop(pending):
                stats.dropped += 1
                log.warning("submission %s of user %s was interrupted and no upstream has it: dropped, "
                            "uncharged", pending.nonce, pending.user_id)
    return stats


def _adopt_one(pending: PendingSubmission, channel_id: int, report: dict, stats: AdoptStats) -> None:
    try:
        mj_id = upstream_text.task_id(report.get("id"))
    except upstream_text.UpstreamTextError:
        mj_id = ""  # not an id at all: dropped below like a colliding one

    def collided() -> None:
        stats.collided += 1
        log.error("interrupted submission %s: the upstream's id %r is unusable or belongs to another task "
                  "of channel %s; dropped, uncharged", pending.nonce, mj_id, channel_id)

    try:
        with write_tx():
            if not claim(pending):
                return  # the submitter recorded it after all, or another poller got here first
            if not mj_id or id_taken(channel_id, mj_id):
                collided()
                return
            task = create_task(pending, channel_id, mj_id, status="SUBMITTED", code=1,
                               description="recorded after an interrupted submission", properties={})
    except peewee.IntegrityError:  # a unique (channel, id) index caught a collision the check missed
        if drop(pending):
            collided()
        return
    stats.adopted += 1
    stats.reports.setdefault(channel_id, []).append(report)
    log.warning("interrupted submission %s adopted as task %s (channel %s, user %s)", pending.nonce, task.mj_id,
                channel_id, pending.user_id)
