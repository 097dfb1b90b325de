"""The poller: one cycle that asks every channel about its unfinished tasks, and the loop that repeats it.

A cycle (the task lifecycle and what upstreams get wrong: docs/upstream.md, "Lifecycle"):

1. "Is anything unfinished?" is one seek on the ``(unfinished, channel_id)`` index; an idle store of a
   million finished tasks costs that lookup and nothing else (no claim, no write).
2. Several pollers share the work instead of repeating it: each channel with unfinished tasks is polled
   by the one poller holding its claim (:mod:`mjctl.claims`: a compare-and-set on the channel's
   ``poll_claim`` row, picked with ``FOR UPDATE SKIP LOCKED`` where the database has it, renewed as
   batches complete, released when the channel is done, expiring if its holder dies). A poller takes
   unclaimed channels until none is left; one that finds nothing to claim says so and does nothing.
3. Claimed channels are polled in parallel (``concurrency`` threads, each with its own database
   connection) with ``POST /mj/task/list-by-condition`` in batches of ``batch_size`` ids, and each batch's
   answer is written by :func:`mjctl.reports.apply_reports` in one transaction — the one path every change
   to a task takes (pushes and timeouts too), which makes every refund exactly-once. On SQLite those
   writes go through one :class:`_StoreLane` (one thread, one connection) while the workers fetch on.
   The poller's memo lives on the task rows (``memo_digest``, ``memo_version``): the digest of the last
   report worked out against the row that left it unfinished, which the same report would not change
   again (what it set is set; what it asked backwards is refused again), with the row version it met. A
   report its task's memo holds, while the row is still at that version, is skipped unread — so a one-shot
   ``mjctl poll`` from cron skips unchanged reports as a looping poller does. Every write of a task moves
   its version (a database trigger sees to writers that do not), so no write leaves a memo standing; a
   write during a cycle counts from the next cycle, as the versions are read when a channel is claimed.
4. Tasks still unfinished ``task_timeout`` seconds after submission fail (and are refunded) with a reason
   that says why: still running, no longer reported, channel failing. A removed channel's tasks fail at
   once; a disabled channel's tasks keep being polled until they finish or time out.
5. Upstream faults are logged and counted per kind; they end that channel's work for this cycle at most,
   never the cycle or the other channels. A report refused in part (``progress_backwards``) is counted
   when it comes, not again in each cycle that brings it unchanged: the memo holds it like any other.

Before all that, every cycle finishes the submissions a dead process left in flight
(:func:`mjctl.pending.adopt`): one seek on the pending records' expiry index, nothing more when there
are none; otherwise the channels they were sent to are asked for their recent tasks
(``GET /mj/task/list``) and each record becomes its task (charged once) or is dropped uncharged.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import orjson
import peewee

from mjctl import metrics, reports, upstream_text
from mjctl.claims import Claims
from mjctl.config import Settings
from mjctl.db import (
    compiled,
    connection,
    database,
    end_unit_of_work,
    is_sqlite,
    json_rows,
    retry_transaction,
    sqlite_json_reads,
)
from mjctl.models import FINISHED_STATUSES, Channel, Task

log = logging.getLogger("mjctl.poller")

T = TypeVar("T")

#: Reports a worker may have waiting in the store lane (SQLite), in whole answers (at least one), before it
#: waits for its oldest to be written: it fetches on meanwhile, and the upstream is kept busy. A waiting
#: answer holds ~1.7 KB a report (simulator reports, parsed, with their digests): ~1.4 MB a worker.
#: Against 2 answers of 100, 8 made a first cycle over 10,000 tasks and 4 channels ~10% faster (6
#: alternated runs of 4 cycles each); 16 and 32 gained nothing more.
LANE_REPORTS = 800
#: On SQLite, the most rows of a claimed channel whose memo does not hold (a first cycle's, say) that the
#: store lane reads whole, in one step, before the channel's first answer, instead of batch by batch: each
#: batch's read handed the interpreter lock to the workers and waited to get it back. Read in the lane,
#: not when the channel is claimed, so that the workers start asking the upstream at once and SQLite
#: builds the rows while they do. A row read so is held at about 0.8 KB until its channel is done, and the
#: read peaks at about 5 KB a row (measured on simulator reports), so the bound keeps a channel to ~4 MB
#: held and ~25 MB at the read; past it, batches read their own rows.
PREREAD_ROWS = 5_000
DB_ATTEMPTS = 4  # a batch's transaction is retried on a deadlock or a lock timeout


@dataclass
class CycleSummary(reports.ApplyStats):
    """What one cycle did: what applying its reports did (the ApplyStats it adds up), and the cycle's own
    facts. ``ran`` is False when other pollers held or had just polled every channel with work
    (``claim_holders``: the claims held, each with its holder and expiry)."""

    ran: bool = True
    message: str = ""
    claim_holders: list[str] = field(default_factory=list)
    started_at: float = 0.0
    duration: float = 0.0
    checked: int = 0
    skipped: int = 0  # reports the memo held: unchanged, not worked out
    timed_out: int = 0
    channels: int = 0
    channels_with_errors: list[str] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    requests: int = 0

    def add_stats(self, stats: reports.ApplyStats) -> None:
        self.add(stats)
        for name, value in (("unknown_ids", stats.unknown), ("malformed_reports", stats.malformed),
                            ("progress_backwards", stats.regressions)):
            if value:
                self.faults[name] += value

    def merge(self, other: CycleSummary) -> None:
        self.add(other)
        for name in ("checked", "skipped", "timed_out", "requests", "channels"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.channels_with_errors.extend(other.channels_with_errors)
        self.faults.update(other.faults)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "message": self.message,
            "claim_holders": self.claim_holders,
            "started_at": round(self.started_at, 3),
            "duration_ms": round(self.duration * 1000, 2),
            "checked": self.checked,
            "skipped": self.skipped,
            "updated": self.updated,
            "finished": self.finished,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "timed_out": self.timed_out,
            "refunded": self.refunded,
            "quota_refunded": self.quota_refunded,
            "channels": self.channels,
            "channels_with_errors": sorted(set(self.channels_with_errors)),
            "faults": dict(sorted(self.faults.items())),
            "requests": self.requests,
        }


# --- one cycle -----------------------------------------------------------------------------------------


class _Pending(NamedTuple):
    """An unfinished task as read when its channel was claimed (a tuple: a cycle makes one per task)."""

    id: int
    mj_id: str
    since: int  # submit time (seconds), the start of its timeout
    memo: str  # the poller's memo digest while it holds (its version is the row's, as read), else ""


def _has_unfinished() -> bool:
    """The idle check: one seek on the (unfinished, channel_id) index. Asked in that index's order, so no
    planner scans the table instead: with statistics taken while many tasks were unfinished, PostgreSQL
    expects a plain ``LIMIT 1`` to meet one at once and reads every row of a store whose tasks have all
    finished since (0.4-0.7 s at a million tasks, every idle cycle until the next ANALYZE)."""
    sql, params = compiled(("poller_has_unfinished",), lambda: (
        Task.select(Task.channel_id).where(Task.unfinished == 1).order_by(Task.channel_id).limit(1)), [1, 1])
    return database.execute_sql(sql, params).fetchone() is not None


def _channels_with_unfinished() -> list[int]:
    """The channels that have unfinished tasks (a walk of the (unfinished, channel_id) index)."""
    sql, params = compiled(("poller_channels",), lambda: (
        Task.select(Task.channel_id).where(Task.unfinished == 1).distinct()), [1])
    return sorted(cid for (cid,) in database.execute_sql(sql, params).fetchall())


_SQLITE_READS = threading.Lock()  # the claim-time reads of one process's pollers, on SQLite


def _unfinished_of(channel_id: int) -> list[_Pending]:
    """One channel's unfinished tasks, read when its claim is taken. Whether a task's memo holds (it was
    recorded at the row's current version) is decided by the database, on the floats as stored.

    On SQLite the cycle's workers read one at a time: fetching a row steps SQLite without the interpreter
    lock, and four threads stepping at once hand the lock back and forth at every row (an unchanged cycle
    over 10,000 tasks spent about a third more CPU so). Where SQLite has JSON the read is one step, the
    rows as one JSON value: stepping row by row, a worker waited for the lock at every row while the others
    parsed answers, and the last of 4 channels of 2,500 tasks began asking its upstream 30 to 100 ms into
    a first cycle instead of a few."""
    if sqlite_json_reads():
        try:
            return _unfinished_as_json(channel_id)
        except peewee.OperationalError as exc:  # a value JSON cannot hold (a BLOB put in by hand)
            log.debug("channel %s: unfinished tasks read row by row: %s", channel_id, exc)
    memo = peewee.Case(None, [(Task.memo_version == Task.updated_at, Task.memo_digest)], peewee.SQL("''"))
    sql, params = compiled(("poller_unfinished_of",), lambda: (
        Task.select(Task.id, Task.mj_id, Task.submit_time, Task.updated_at, memo)
        .where((Task.unfinished == 1) & (Task.channel_id == channel_id)).order_by(Task.id)), [1, channel_id])
    with _SQLITE_READS if is_sqlite() else contextlib.nullcontext():
        rows = database.execute_sql(sql, params).fetchall()
    return [_Pending(task_id, mj_id or "", int(submit_time or updated_at or 0), digest or "")
            for task_id, mj_id, submit_time, updated_at, digest in rows]


def _unfinished_as_json(channel_id: int) -> list[_Pending]:
    """:func:`_unfinished_of` on SQLite with JSON: the same values, worked out by SQLite in one step."""
    sql = ('SELECT json_group_array(json_array("id", COALESCE("mj_id", \'\'), '
           'CAST(COALESCE(NULLIF("submit_time", 0), "updated_at", 0) AS INTEGER), '
           'CASE WHEN "memo_version" = "updated_at" THEN COALESCE("memo_digest", \'\') ELSE \'\' END)) '
           f'FROM "{Task._meta.table_name}" WHERE "unfinished" = 1 AND "channel_id" = ?')
    rows = json_rows(sql, [channel_id])  # one step: the workers read side by side
    rows.sort()  # by id, as the rows come in the (unfinished, channel_id) index's order anyway
    return [_Pending._make(row) for row in rows]


def _fault_kind(exc: Exception) -> str:
    from mjctl.upstream import (
        UpstreamProtocolError,
        UpstreamRateLimited,
        UpstreamUnauthorized,
    )

    if isinstance(exc, UpstreamUnauthorized):
        return "unauthorized"
    if isinstance(exc, UpstreamRateLimited):
        return "rate_limited"
    if isinstance(exc, UpstreamProtocolError):
        return "malformed_answer"
    status = getattr(exc, "status", None)
    if status is not None and status >= 500:
        return "http_5xx"
    if "timed out" in str(exc):
        return "timeout"
    return "unreachable"


def _with_db_retries(what: str, fn: Callable[[], reports.ApplyStats], summary: CycleSummary) -> reports.ApplyStats:
    """One batch's transaction through db.retry_transaction, counting each conflict in the summary."""
    def count() -> None:
        summary.faults["database_retries"] += 1

    return retry_transaction(fn, attempts=DB_ATTEMPTS, what=what, on_conflict=count)


_BLAKE2B_128 = hashlib.blake2b(digest_size=16)  # never updated: only copied


def report_digest(report: dict) -> str:
    """The memo digest of a report as the upstream sent it (128 bits of BLAKE2b over its JSON; key order
    counts, so a reordered report is only a miss), or "" when it has no JSON form: never remembered."""
    try:
        digest = _BLAKE2B_128.copy()  # a copy of one made once: cheaper than passing the size each time
        digest.update(orjson.dumps(report))
        return digest.hexdigest()
    except TypeError:  # orjson.JSONEncodeError: nesting deeper than orjson writes, an integer beyond 64 bits
        return ""


def _remembered(report: Any, tasks: Mapping[str, _Pending], digests: Mapping[str, str]) -> bool:
    """Whether report is the one its task's memo holds, and the row is still at the version the memo was
    checked against: it changed nothing then and so changes nothing now."""
    if not isinstance(report, dict):
        return False
    mj_id = str(report.get("id"))
    task = tasks.get(mj_id)
    return task is not None and task.memo != "" and task.memo == digests.get(mj_id)


class _StoreLane:
    """SQLite's writer for one cycle: a thread with its own connection that runs every worker's database
    work in the order it is handed over, while the workers go on with their upstream requests.

    SQLite lets one connection write at a time. With each worker writing on its own connection, the others
    wait in SQLite's busy handler (which sleeps, 1 ms and more, even when the lock comes free sooner), and
    every commit on one connection empties the page cache of the others, whose next reads start cold."""

    def __init__(self) -> None:
        self._ident = 0
        self._used = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mjctl-poll-store",
                                        initializer=self._start)

    def _start(self) -> None:
        self._ident = threading.get_ident()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """fn to run in the lane (which starts with the first, and connects when it is not connected)."""
        self._used = True
        return self._pool.submit(_connected, fn)

    def run(self, fn: Callable[[], T]) -> T:
        """fn's result, run in the lane (at once when called from the lane itself)."""
        if threading.get_ident() == self._ident:
            return fn()
        return self.submit(fn).result()

    def close(self) -> None:
        """Return the lane's connection, if it ever made one, and end its thread."""
        if self._used:  # a cycle whose reports were all remembered never started it
            self._pool.submit(end_unit_of_work, close=True).result()
        self._pool.shutdown(wait=True)


def _read_whole(channel_id: int, known: dict[str, reports.TaskState]) -> CycleSummary:
    """In the store lane, before a channel's first answer: its rows whose memo does not hold, read whole in
    one step into known, for its batches to be worked out from (a batch whose rows are not all there reads
    its own). The lane runs jobs in order, so every batch of the channel finds them read."""
    known.update(reports.unremembered_states(channel_id) or {})
    return CycleSummary(channels=0)


def _connected(fn: Callable[[], T]) -> T:
    database.connect(reuse_if_open=True)
    return fn()


def _collect(handed: deque[Future[CycleSummary]], summary: CycleSummary, keep: int) -> None:
    """Merge into summary the oldest answers handed to the lane until at most keep are outstanding. With
    keep 0 it waits for every one, even after one failed, and then raises the first failure."""
    failure: BaseException | None = None
    while len(handed) > keep:
        try:
            summary.merge(handed.popleft().result())
        except BaseException as exc:  # noqa: BLE001 - re-raised once the lane holds nothing of this channel
            if keep:
                raise
            failure = failure or exc
    if failure is not None:
        raise failure


class _Cycle:
    def __init__(self, settings: Settings, claims: Claims | None, now: float | None,
                 clients: Mapping[int, Any] | None, transport: Any):
        poller = settings.poller
        self.settings = settings
        self.claims = claims
        self.fixed_now = now
        self.clients = clients or {}
        self.transport = transport
        self.batch_size = max(int(poller.batch_size), 1)
        self.lane_depth = max(1, LANE_REPORTS // self.batch_size)  # answers, see LANE_REPORTS
        self.task_timeout = int(poller.task_timeout)
        self.request_timeout = float(poller.request_timeout)
        self.prefetch = _prefetch_hook(settings)
        self.lane: _StoreLane | None = None  # set for the claimed channels' work on SQLite

    def in_store(self, fn: Callable[[], T]) -> T:
        """fn's result, run where the cycle writes: in the store lane on SQLite, here elsewhere."""
        return fn() if self.lane is None else self.lane.run(fn)

    def now(self) -> float:
        return self.fixed_now if self.fixed_now is not None else time.time()

    def fail(self, ids_by_reason: Mapping[str, list[int]], summary: CycleSummary, *, timed_out: bool) -> None:
        for reason, ids in ids_by_reason.items():
            if not ids:
                continue
            stats = self.in_store(functools.partial(
                _with_db_retries, "failing tasks", functools.partial(reports.fail_tasks, ids, reason), summary))
            summary.add_stats(stats)
            if timed_out:
                summary.timed_out += stats.failed

    def _client(self, channel: Channel):
        if channel.id in self.clients:
            return self.clients[channel.id], False
        from mjctl.channels import client_for

        transport = self.transport if self.transport is not None else _transport()
        client = client_for(self.settings, channel, timeout=self.request_timeout, transport=transport)
        return client, True

    def poll_channel(self, channel: Channel, tasks: list[_Pending]) -> CycleSummary:
        """Every batch of one channel, in the calling worker thread (which holds the channel's claim)."""
        summary = CycleSummary(checked=len(tasks), channels=1)
        client, owned = self._client(channel)
        try:
            self._poll_batches(channel, client, tasks, summary)
        finally:
            if owned:
                client.close()
        return summary

    def _poll_batches(self, channel: Channel, client: Any, tasks: list[_Pending], summary: CycleSummary) -> None:
        label = f"channel {channel.name}" + ("" if channel.enabled else " (disabled)")
        untracked = [t for t in tasks if not t.mj_id]
        tracked = [t for t in tasks if t.mj_id]
        if untracked:
            self._time_out(untracked, {}, summary, f"it has no upstream id on {label}")
        batches = [tracked[i:i + self.batch_size] for i in range(0, len(tracked), self.batch_size)]
        self._poll_each(channel, client, batches, summary, label)

    def _poll_each(self, channel: Channel, client: Any, batches: list[list[_Pending]], summary: CycleSummary,
                   label: str) -> None:
        from mjctl.upstream import UpstreamError

        handed: deque[Future] = deque()  # answers handed to the store lane, not yet written
        known: dict[str, reports.TaskState] = {}  # rows read whole by the lane, by mj_id (see _read_whole)
        if self.lane is not None and 0 < sum(1 for b in batches for t in b if not t.memo) <= PREREAD_ROWS:
            handed.append(self.lane.submit(functools.partial(_read_whole, channel.id, known)))
        try:
            for index, batch in enumerate(batches):
                if self.claims is not None and not self.claims.renew_if_due(channel.id):
                    summary.faults["claim_lost"] += 1
                    return
                summary.requests += 1
                try:
                    answer = client.list_by_condition([t.mj_id for t in batch])
                except UpstreamError as exc:
                    kind = _fault_kind(exc)
                    summary.faults[kind] += 1
                    summary.channels_with_errors.append(channel.name)
                    log.warning("%s: %s (%s)", label, exc, kind)
                    if kind == "malformed_answer":
                        self._time_out(batch, {}, summary, f"{label} keeps answering malformed lists ({exc})")
                        continue
                    # A channel that is down, refusing us or rate limiting gets no more requests this cycle.
                    rest = [t for b in batches[index:] for t in b]
                    self._time_out(rest, {}, summary, f"{label} keeps failing ({kind}: {exc})")
                    return
                requested = {t.mj_id: t for t in batch}
                by_id = {str(r.get("id")): r for r in answer if isinstance(r, dict)}
                missing = requested.keys() - by_id.keys()
                if missing:
                    summary.faults["missing_ids"] += len(missing)
                # A report its task's memo holds, against a row nobody has written since (its version as read
                # when the channel was claimed), changes nothing: it is not read against the row or worked out.
                digests = {mj_id: report_digest(report) for mj_id, report in by_id.items()}
                fresh = [r for r in answer if not _remembered(r, requested, digests)] if any(
                    t.memo for t in batch) else answer
                skipped = len(answer) - len(fresh)
                summary.skipped += skipped
                work = functools.partial(self._apply_answer, channel, batch, by_id, fresh, skipped, digests, label,
                                         known)
                if self.lane is None or not fresh:
                    summary.merge(work())
                    continue
                handed.append(self.lane.submit(work))
                _collect(handed, summary, self.lane_depth)
        finally:
            _collect(handed, summary, 0)

    def _apply_answer(self, channel: Channel, batch: list[_Pending], answered: Mapping[str, dict],
                      fresh: list, skipped: int, digests: Mapping[str, str], label: str,
                      known: Mapping[str, reports.TaskState]) -> CycleSummary:
        """Write the fresh reports of one batch's answer, then fail its overdue tasks (in the store lane on
        SQLite): what that did, to merge into the channel's summary. known: rows read earlier, by mj_id."""
        summary = CycleSummary(channels=0)
        stats = reports.ApplyStats()
        if fresh:
            stats = _with_db_retries(label, functools.partial(reports.apply_reports, channel.id, fresh,
                                                              digests=digests, known=known), summary)
        stats.ignored += skipped
        summary.add_stats(stats)
        if stats.succeeded_ids:
            self._prefetch(stats.succeeded_ids)
        self._time_out(batch, answered, summary, None, label=label)
        return summary

    def _time_out(self, tasks: list[_Pending], answered: Mapping[str, dict], summary: CycleSummary,
                  why: str | None, *, label: str = "") -> None:
        """Fail the overdue ones among tasks, with a reason saying why they never finished."""
        grouped: dict[str, list[int]] = defaultdict(list)
        timeout = self.task_timeout
        deadline = self.now() - timeout  # overdue: submitted at or before this
        for task in tasks:
            if task.since > deadline:
                continue
            report = answered.get(task.mj_id)
            if report is not None and str(report.get("status") or "").upper() in FINISHED_STATUSES:
                continue
            if why is not None:
                reason = f"Timed out: unfinished {timeout} s after submission and {why}."
            elif report is None:
                reason = (f"Timed out: unfinished {timeout} s after submission and no longer reported by "
                          f"the upstream ({label}).")
            else:
                status = (upstream_text.clean_text(report.get("status"), 32) or "unknown").upper()
                reason = f"Timed out: still {status} {timeout} s after submission ({label})."
            grouped[reason].append(task.id)
        self.fail(grouped, summary, timed_out=True)

    def _prefetch(self, task_ids: list[int]) -> None:
        if self.prefetch is None:
            return
        try:
            for task in Task.select().where(Task.id.in_(task_ids)):
                self.prefetch(task)
        except Exception:
            log.exception("image prefetch hook failed")


def _transport():
    """A transport on the one shared TLS context (upstream.shared_ssl_context): building one per client
    costs ~90 ms of certificate loading, which would otherwise be paid by every channel in every cycle."""
    import httpx

    from mjctl.upstream import shared_ssl_context

    return httpx.HTTPTransport(verify=shared_ssl_context())


def _prefetch_hook(settings: Settings) -> Callable[[Task], None] | None:
    """The image forwarder's hook for tasks that reached SUCCESS, when that module is present."""
    import importlib

    try:
        images = importlib.import_module("mjctl.images")
    except ModuleNotFoundError as exc:
        if exc.name != "mjctl.images":
            raise
        return None
    factory = getattr(images, "prefetch_hook", None)
    if factory is None:
        return None
    try:
        return factory(settings)
    except Exception:
        log.exception("cannot set up image prefetching; polling without it")
        return None


def drain_prefetch(settings: Settings, timeout: float | None = None) -> bool:
    """Wait (at most ``timeout``, default ``[images] timeout`` seconds) until the image prefetcher has
    handled every image queued so far. A one-shot ``mjctl poll`` calls it before exiting, so the images of
    tasks that just succeeded are cached even when cron runs the poller; the loop never waits.
    Returns False when the queue was still busy at the deadline."""
    hook = _prefetch_hook(settings)
    prefetcher = getattr(hook, "prefetcher", None)
    if prefetcher is None:
        return True
    return bool(prefetcher.wait_idle(float(timeout if timeout is not None else settings.images.timeout)))


#: Allocations between young-generation collections while a cycle runs (Python's default is 700).
CYCLE_GC_THRESHOLD = 50_000
_gc_lock = threading.Lock()
_gc_cycles = 0  # cycles running in this process
_gc_saved: tuple[int, ...] = ()  # the thresholds to restore when the last one ends


@contextlib.contextmanager
def _collections_spaced() -> Iterator[None]:
    """Space the cyclic garbage collector's young collections out while a cycle runs, process-wide.

    A first cycle allocates a dozen containers per report (the parsed answer, the cleaned report, the row
    read, its changes). At the default threshold the collector ran ~200 young collections and a full one
    per cycle over 10,000 reports, walking the answers still in flight each time: a fifth of the cycle's
    interpreter time. Collections still run, every CYCLE_GC_THRESHOLD allocations, so a long cycle
    in a server never stops collecting what its request threads leave. Cycles running together share one
    setting; the last to end restores what was there before (a higher threshold set by the operator is
    kept)."""
    global _gc_cycles, _gc_saved
    with _gc_lock:
        if _gc_cycles == 0:
            _gc_saved = gc.get_threshold()
            if _gc_saved[0] < CYCLE_GC_THRESHOLD:
                gc.set_threshold(CYCLE_GC_THRESHOLD, *_gc_saved[1:])
        _gc_cycles += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_cycles -= 1
            if _gc_cycles == 0:
                gc.set_threshold(*_gc_saved)


def poll_once(settings: Settings, *, clients: Mapping[int, Any] | None = None, now: float | None = None,
              transport: Any = None, take_claims: bool = True, fresh_for: float = 0.0) -> CycleSummary:
    """Run one polling cycle over the channels this poller can claim, and return what it did.

    ``clients`` maps channel ids to ready clients (anything with ``list_by_condition``); other channels
    get an :class:`~mjctl.upstream.UpstreamClient`, over ``transport`` when given (tests pass an
    ``httpx.MockTransport``). ``now`` fixes the clock used for timeouts. ``fresh_for`` skips channels
    another poller polled in a round that began less than that many seconds before this one (the loop
    passes most of its interval). ``take_claims=False`` polls every channel without claiming it (tests that
    race pollers over the same tasks on purpose).
    """
    started = time.perf_counter()
    summary = CycleSummary(started_at=time.time())
    _adopt_interrupted(settings, summary, now, clients, transport)
    if not _has_unfinished():
        summary.message = "nothing unfinished"
        summary.duration = time.perf_counter() - started
        return summary
    claims = Claims(settings.poller.lease_seconds, summary.started_at, fresh_for) if take_claims else None
    with _collections_spaced():
        _run_cycle(settings, summary, claims, now, clients, transport)
    if claims is not None and claims.lost:
        summary.message = "a claim was lost during the cycle; that channel stopped early"
    summary.duration = time.perf_counter() - started
    return summary


def _adopt_interrupted(settings: Settings, summary: CycleSummary, now: float | None,
                       clients: Mapping[int, Any] | None, transport: Any) -> None:
    """The cycle's first step: submissions whose process died between forwarding and recording become
    their tasks (charged once, then brought up to date by the report that found them) or are dropped
    uncharged. A failure here is counted and never stops the polling that follows."""
    from mjctl import pending
    from mjctl.relay import RESERVATION_SLACK

    cycle_now = now if now is not None else time.time()
    opened: list[Any] = []

    def list_tasks(channel_id: int) -> list[dict]:
        if clients and channel_id in clients:
            return clients[channel_id].list_tasks()
        channel = Channel.get_or_none(Channel.id == channel_id)
        if channel is None:
            return []  # a removed channel has nothing to adopt
        client, _ = _Cycle(settings, None, now, None, transport)._client(channel)
        opened.append(client)
        return client.list_tasks()

    try:
        stats = pending.adopt(cycle_now, RESERVATION_SLACK, settings.poller.task_timeout, list_tasks)
    except Exception as exc:
        log.exception("adopting interrupted submissions failed")
        summary.faults[f"adopt_error_{type(exc).__name__}"] += 1
        return
    finally:
        for client in opened:
            client.close()
    summary.requests += stats.asked
    for name, value in (("interrupted_adopted", stats.adopted), ("interrupted_dropped", stats.dropped),
                        ("interrupted_collided", stats.collided), ("interrupted_unlisted", len(stats.errors))):
        if value:
            summary.faults[name] += value
    for channel_id, found in stats.reports.items():
        applied = _with_db_retries(f"adopted tasks of channel {channel_id}",
                                   lambda: reports.apply_reports(channel_id, found), summary)  # noqa: B023 - called before the loop moves on
        summary.add_stats(applied)


def _run_cycle(settings: Settings, summary: CycleSummary, claims: Claims | None, now: float | None,
               clients: Mapping[int, Any] | None, transport: Any) -> None:
    cycle = _Cycle(settings, claims, now, clients, transport)
    channel_ids = _channels_with_unfinished()
    channels = {c.id: c for c in Channel.select().where(Channel.id.in_(channel_ids))}
    removed = [cid for cid in channel_ids if cid not in channels]
    for channel_id in removed:  # no upstream to ask: any poller fails them, exactly once (reports)
        tasks = _unfinished_of(channel_id)
        summary.checked += len(tasks)
        summary.faults["removed_channel_tasks"] += len(tasks)
        reason = f"Channel {channel_id} was removed, so this task can no longer be tracked."
        cycle.fail({reason: [t.id for t in tasks]}, summary, timed_out=False)
    work = [cid for cid in channel_ids if cid in channels]
    if not work:
        return
    if claims is not None:
        claims.ensure_rows(work)

        # Taking and giving back a claim is a write transaction: on SQLite it runs in the store lane with
        # the cycle's other writes. Four workers claiming at once on connections of their own waited for
        # each other in SQLite's busy handler, which sleeps 1, 2, 5, 10 ms… however soon the lock comes
        # free: the last channel of a first cycle began 7 ms and more after the first.
        def next_channel() -> int | None:
            return cycle.in_store(functools.partial(claims.claim_next, work))

        def release(channel_id: int) -> None:
            cycle.in_store(functools.partial(claims.release, channel_id))
    else:
        queue, queue_lock = list(reversed(work)), threading.Lock()

        def next_channel() -> int | None:
            with queue_lock:
                return queue.pop() if queue else None

    def worker() -> list[CycleSummary]:
        """Claim a channel, poll it, release it; until no channel is left to claim."""
        results = []
        with connection():
            while (channel_id := next_channel()) is not None:
                try:
                    results.append(_guarded(cycle, channels[channel_id]))
                finally:
                    if claims is not None:
                        release(channel_id)
        return results

    workers = max(1, min(settings.poller.concurrency, len(work)))
    cycle.lane = _StoreLane() if is_sqlite() and database.obj.database != ":memory:" else None  # a file's
    try:
        if workers == 1:
            results = worker()
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mjctl-poll") as pool:
                futures = [pool.submit(worker) for _ in range(workers)]
                results = [r for f in futures for r in f.result()]
    finally:
        if cycle.lane is not None:
            cycle.lane.close()
    for result in results:
        summary.merge(result)
    if claims is not None and not claims.taken and not removed:
        summary.ran = False
        summary.message, summary.claim_holders = claims.why_none(work)


def _guarded(cycle: _Cycle, channel: Channel) -> CycleSummary:
    """A claimed channel's work; an unexpected error is counted for that channel and never ends the cycle."""
    tasks: list[_Pending] = []
    try:
        tasks = _unfinished_of(channel.id)
        return cycle.poll_channel(channel, tasks)
    except Exception as exc:
        log.exception("channel %s: polling failed", channel.name)
        failed = CycleSummary(checked=len(tasks), channels=1, channels_with_errors=[channel.name])
        failed.faults[f"error_{type(exc).__name__}"] += 1
        return failed


# --- the loop ------------------------------------------------------------------------------------------


def run_loop(settings: Settings, stop_event: threading.Event, every: float | None = None,
             on_cycle: Callable[[CycleSummary], None] | None = None) -> None:
    """Run a cycle at once and then every ``every`` seconds ([poller] interval) until stop_event is set.

    A cycle in progress always completes; an exception in one is logged and the loop goes on.
    """
    import schedule

    interval = float(every if every is not None else settings.poller.interval)
    metrics.prepare()
    scheduler = schedule.Scheduler()

    def job() -> None:
        if stop_event.is_set():
            return
        try:
            with connection():
                # A channel another poller polled less than ~an interval ago counts as polled this round.
                summary = poll_once(settings, fresh_for=interval * 0.9)
            metrics.observe_poll_cycle(summary)
            if on_cycle is not None:
                on_cycle(summary)
        except Exception:
            log.exception("poll cycle failed")

    scheduler.every(interval).seconds.do(job)  # type: ignore[arg-type]  # schedule's stub says int; floats work
    job()
    while not stop_event.is_set():
        scheduler.run_pending()
        idle = scheduler.idle_seconds
        stop_event.wait(min(max(idle if idle is not None else interval, 0.01), interval))


def start_background(settings: Settings, stop_event: threading.Event) -> threading.Thread:
    """Start the polling loop in a daemon thread that ends when stop_event is set; returns the thread."""
    thread = threading.Thread(target=run_loop, args=(settings, stop_event), name="mjctl-poller", daemon=True)
    thread.start()
    return thread
