"""The poller: one cycle that asks every channel about its unfinished tasks, and the loop that repeats it.

A cycle (CONTRACT §5, UPSTREAM.md §6):

1. "Is anything unfinished?" is one seek on the ``(unfinished, channel_id)`` index; an idle store of a
   million finished tasks costs that lookup and nothing else (no lease, no write).
2. Only one cycle runs at a time across every process sharing the database: a compare-and-set on the
   ``Lease`` row ``poller`` (``expires_at`` = now + ``lease_seconds``), renewed as batches complete and
   released at the end. A holder that died stops renewing and its lease expires; one that died on this
   very host is recognised at once by its pid.
3. Unfinished tasks are grouped by channel; channels are polled in parallel (``concurrency`` threads, each
   with its own database connection) with ``POST /mj/task/list-by-condition`` in batches of
   ``batch_size`` ids, and each batch's answer is written by :func:`mjctl.reports.apply_reports` in one
   transaction — the same path push notifications use, which makes every refund exactly-once.
4. Tasks still unfinished ``task_timeout`` seconds after submission fail (and are refunded) with a reason
   that says why: still running, no longer reported, channel failing. A removed channel's tasks fail at
   once; a disabled channel's tasks keep being polled until they finish or time out.
5. Upstream faults are logged and counted per kind; they end that channel's work for this cycle at most,
   never the cycle or the other channels.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import peewee

from mjctl import reports
from mjctl.config import Settings
from mjctl.db import compiled, connection, database, write_tx
from mjctl.models import FINISHED_STATUSES, Channel, Lease, Task

log = logging.getLogger("mjctl.poller")

LEASE_NAME = "poller"
DB_ATTEMPTS = 4  # a batch's transaction is retried on a deadlock or a lock timeout


@dataclass
class CycleSummary:
    """What one cycle did. ``ran`` is False when another process held the lease (``lease_holder``)."""

    ran: bool = True
    message: str = ""
    lease_holder: str = ""
    started_at: float = 0.0
    duration: float = 0.0
    checked: int = 0
    updated: int = 0
    finished: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    refunded: int = 0
    quota_refunded: int = 0
    channels: int = 0
    channels_with_errors: list[str] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    requests: int = 0

    def add_stats(self, stats: reports.ApplyStats) -> None:
        self.updated += stats.updated
        self.finished += stats.finished
        self.succeeded += stats.succeeded
        self.failed += stats.failed
        self.refunded += stats.refunded
        self.quota_refunded += stats.quota_refunded
        for name, value in (("unknown_ids", stats.unknown), ("malformed_reports", stats.malformed),
                            ("progress_backwards", stats.regressions)):
            if value:
                self.faults[name] += value

    def merge(self, other: CycleSummary) -> None:
        for name in ("checked", "updated", "finished", "succeeded", "failed", "timed_out", "refunded",
                     "quota_refunded", "requests"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.channels_with_errors.extend(other.channels_with_errors)
        self.faults.update(other.faults)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "message": self.message,
            "lease_holder": self.lease_holder,
            "started_at": round(self.started_at, 3),
            "duration_ms": round(self.duration * 1000, 2),
            "checked": self.checked,
            "updated": self.updated,
            "finished": self.finished,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "refunded": self.refunded,
            "quota_refunded": self.quota_refunded,
            "channels": self.channels,
            "channels_with_errors": sorted(set(self.channels_with_errors)),
            "faults": dict(sorted(self.faults.items())),
            "requests": self.requests,
        }


# --- the lease -----------------------------------------------------------------------------------------


def _new_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_is_dead(holder: str) -> bool:
    """True only when the holder is a process on this host that no longer exists."""
    parts = holder.split(":")
    if len(parts) < 3:
        return False
    host, pid_text = ":".join(parts[:-2]), parts[-2]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # another thread of this process: alive by definition
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class _Lease:
    """This cycle's hold on the ``Lease`` row; renewed from any worker thread, at most every third."""

    def __init__(self, name: str, seconds: float):
        self.name = name
        self.seconds = max(float(seconds), 1.0)
        self.holder = _new_holder()
        self.lost = False
        self._renewed = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> str | None:
        """Take the lease; returns None on success, or the current holder's description."""
        for _ in range(2):
            now = time.time()
            with write_tx():
                taken = Lease.update(holder=self.holder, expires_at=now + self.seconds).where(
                    (Lease.name == self.name) & ((Lease.expires_at < now) | (Lease.holder == ""))
                ).execute()
                row = None if taken else Lease.get_or_none(Lease.name == self.name)
                if row is not None and _holder_is_dead(row.holder):
                    log.warning("taking over the poller lease of %s, a process that no longer exists", row.holder)
                    taken = Lease.update(holder=self.holder, expires_at=now + self.seconds).where(
                        (Lease.name == self.name) & (Lease.holder == row.holder)).execute()
            if taken:
                self._renewed = now
                return None
            if row is not None:
                return f"{row.holder} until {time.strftime('%H:%M:%S', time.localtime(row.expires_at))}"
            Lease.insert(name=self.name, holder="", expires_at=0.0).on_conflict_ignore().execute()
        return "another poller"

    def renew_if_due(self) -> bool:
        """Extend the lease when a third of it has passed; False once it was lost to someone else."""
        with self._lock:
            if self.lost:
                return False
            now = time.time()
            if now - self._renewed < self.seconds / 3:
                return True
            with write_tx():
                kept = Lease.update(expires_at=now + self.seconds).where(
                    (Lease.name == self.name) & (Lease.holder == self.holder)).execute()
            if kept:
                self._renewed = now
            else:
                self.lost = True
                log.warning("the poller lease was taken over; this cycle stops early")
            return bool(kept)

    def release(self) -> None:
        with write_tx():
            Lease.update(holder="", expires_at=0.0).where(
                (Lease.name == self.name) & (Lease.holder == self.holder)).execute()


# --- one cycle -----------------------------------------------------------------------------------------


@dataclass
class _Pending:
    id: int
    mj_id: str
    since: int  # submit time (seconds), the start of its timeout


def _has_unfinished() -> bool:
    """The idle check: one seek on the (unfinished, channel_id) index."""
    return Task.select(Task.id).where(Task.unfinished == 1).limit(1).exists()


def _unfinished_by_channel() -> dict[int, list[_Pending]]:
    groups: dict[int, list[_Pending]] = defaultdict(list)
    sql, params = compiled(("poller_unfinished",), lambda: (
        Task.select(Task.id, Task.channel_id, Task.mj_id, Task.submit_time, Task.updated_at)
        .where(Task.unfinished == 1).order_by(Task.channel_id, Task.id)), [1])
    for task_id, channel_id, mj_id, submit_time, updated_at in database.execute_sql(sql, params).fetchall():
        groups[channel_id].append(_Pending(task_id, mj_id or "", int(submit_time or updated_at or 0)))
    return groups


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
    """Run one transaction, again after a deadlock or lock timeout (its changes were rolled back)."""
    for attempt in range(1, DB_ATTEMPTS + 1):
        try:
            return fn()
        except (peewee.OperationalError, peewee.InternalError) as exc:
            summary.faults["database_retries"] += 1
            if attempt == DB_ATTEMPTS:
                raise
            log.info("%s: database conflict (%s); retrying", what, str(exc).strip().splitlines()[0] if str(exc) else exc)
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


class _Cycle:
    def __init__(self, settings: Settings, lease: _Lease | None, now: float | None,
                 clients: Mapping[int, Any] | None, transport: Any):
        poller = settings.poller
        self.settings = settings
        self.lease = lease
        self.fixed_now = now
        self.clients = clients or {}
        self.transport = transport
        self.batch_size = max(int(poller.batch_size), 1)
        self.task_timeout = int(poller.task_timeout)
        self.request_timeout = float(poller.request_timeout)
        self.prefetch = _prefetch_hook(settings)

    def now(self) -> float:
        return self.fixed_now if self.fixed_now is not None else time.time()

    def overdue(self, task: _Pending) -> bool:
        return task.since + self.task_timeout <= self.now()

    def fail(self, ids_by_reason: Mapping[str, list[int]], summary: CycleSummary, *, timed_out: bool) -> None:
        for reason, ids in ids_by_reason.items():
            if not ids:
                continue
            stats = _with_db_retries("failing tasks", lambda: reports.fail_tasks(ids, reason), summary)
            summary.add_stats(stats)
            if timed_out:
                summary.timed_out += stats.failed

    def _client(self, channel: Channel):
        if channel.id in self.clients:
            return self.clients[channel.id], False
        from mjctl.channels import channel_secret
        from mjctl.upstream import UpstreamClient

        transport = self.transport if self.transport is not None else _transport()
        client = UpstreamClient(channel.base_url, channel_secret(self.settings, channel),
                                timeout=self.request_timeout, connect_timeout=min(self.request_timeout, 5.0),
                                transport=transport)
        return client, True

    def poll_channel(self, channel: Channel, tasks: list[_Pending]) -> CycleSummary:
        """Every batch of one channel; runs in a worker thread with its own database connection."""
        summary = CycleSummary(checked=len(tasks))
        with connection():
            client, owned = self._client(channel)
            try:
                self._poll_batches(channel, client, tasks, summary)
            finally:
                if owned:
                    client.close()
        return summary

    def _poll_batches(self, channel: Channel, client: Any, tasks: list[_Pending], summary: CycleSummary) -> None:
        from mjctl.upstream import UpstreamError

        label = f"channel {channel.name}" + ("" if channel.enabled else " (disabled)")
        untracked = [t for t in tasks if not t.mj_id]
        tracked = [t for t in tasks if t.mj_id]
        if untracked:
            self._time_out(untracked, {}, summary, f"it has no upstream id on {label}")
        batches = [tracked[i:i + self.batch_size] for i in range(0, len(tracked), self.batch_size)]
        for index, batch in enumerate(batches):
            if self.lease is not None and not self.lease.renew_if_due():
                summary.faults["lease_lost"] += 1
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
            requested = {t.mj_id for t in batch}
            by_id = {str(r.get("id")): r for r in answer if isinstance(r, dict)}
            missing = requested - by_id.keys()
            if missing:
                summary.faults["missing_ids"] += len(missing)
            stats = _with_db_retries(label, lambda: reports.apply_reports(channel.id, answer), summary)
            summary.add_stats(stats)
            if stats.succeeded_ids:
                self._prefetch(stats.succeeded_ids)
            self._time_out(batch, by_id, summary, None, label=label)

    def _time_out(self, tasks: list[_Pending], answered: Mapping[str, dict], summary: CycleSummary,
                  why: str | None, *, label: str = "") -> None:
        """Fail the overdue ones among tasks, with a reason saying why they never finished."""
        grouped: dict[str, list[int]] = defaultdict(list)
        timeout = self.task_timeout
        for task in tasks:
            if not self.overdue(task):
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
                status = str(report.get("status") or "unknown").upper()
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


_ssl_context = None
_ssl_lock = threading.Lock()


def _transport():
    """A transport sharing one TLS context: building one per client costs ~90 ms of certificate loading,
    which would otherwise be paid by every channel in every cycle."""
    import ssl

    import certifi
    import httpx

    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            _ssl_context = ssl.create_default_context(cafile=certifi.where())
    return httpx.HTTPTransport(verify=_ssl_context)


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


def poll_once(settings: Settings, *, clients: Mapping[int, Any] | None = None, now: float | None = None,
              transport: Any = None, use_lease: bool = True) -> CycleSummary:
    """Run one polling cycle and return what it did.

    ``clients`` maps channel ids to ready clients (anything with ``list_by_condition``); other channels
    get an :class:`~mjctl.upstream.UpstreamClient`, over ``transport`` when given (tests pass an
    ``httpx.MockTransport``). ``now`` fixes the clock used for timeouts. ``use_lease=False`` skips the
    one-cycle-at-a-time lease (tests that race pollers on purpose).
    """
    started = time.perf_counter()
    summary = CycleSummary(started_at=time.time())
    if not _has_unfinished():
        summary.message = "nothing unfinished"
        summary.duration = time.perf_counter() - started
        return summary
    lease = _Lease(LEASE_NAME, settings.poller.lease_seconds) if use_lease else None
    if lease is not None:
        holder = lease.acquire()
        if holder is not None:
            summary.ran = False
            summary.lease_holder = holder
            summary.message = f"lease held by {holder}"
            summary.duration = time.perf_counter() - started
            return summary
    try:
        _run_cycle(settings, summary, lease, now, clients, transport)
    finally:
        if lease is not None:
            try:
                lease.release()
            except peewee.PeeweeException:
                log.exception("could not release the poller lease; it will expire")
    if lease is not None and lease.lost:
        summary.message = "lease lost during the cycle; stopped early"
    summary.duration = time.perf_counter() - started
    return summary


def _run_cycle(settings: Settings, summary: CycleSummary, lease: _Lease | None, now: float | None,
               clients: Mapping[int, Any] | None, transport: Any) -> None:
    cycle = _Cycle(settings, lease, now, clients, transport)
    groups = _unfinished_by_channel()
    channels = {c.id: c for c in Channel.select().where(Channel.id.in_(list(groups)))}
    removed = {cid: tasks for cid, tasks in groups.items() if cid not in channels}
    for channel_id, tasks in removed.items():
        summary.checked += len(tasks)
        summary.faults["removed_channel_tasks"] += len(tasks)
        reason = f"Channel {channel_id} was removed, so this task can no longer be tracked."
        cycle.fail({reason: [t.id for t in tasks]}, summary, timed_out=False)
    work = [(channels[cid], tasks) for cid, tasks in groups.items() if cid in channels]
    summary.channels = len(work)
    if not work:
        return
    workers = max(1, min(int(settings.poller.concurrency), len(work)))
    if workers == 1:
        results = [cycle.poll_channel(channel, tasks) for channel, tasks in work]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mjctl-poll") as pool:
            futures = [pool.submit(_guarded, cycle, channel, tasks) for channel, tasks in work]
            results = [f.result() for f in futures]
    for result in results:
        summary.merge(result)


def _guarded(cycle: _Cycle, channel: Channel, tasks: list[_Pending]) -> CycleSummary:
    """A channel's work; an unexpected error is counted for that channel and never ends the cycle."""
    try:
        return cycle.poll_channel(channel, tasks)
    except Exception as exc:
        log.exception("channel %s: polling failed", channel.name)
        failed = CycleSummary(checked=len(tasks), channels_with_errors=[channel.name])
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
    scheduler = schedule.Scheduler()

    def job() -> None:
        if stop_event.is_set():
            return
        try:
            with connection():
                summary = poll_once(settings)
            if on_cycle is not None:
                on_cycle(summary)
        except Exception:
            log.exception("poll cycle failed")

    scheduler.every(interval).seconds.do(job)
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
