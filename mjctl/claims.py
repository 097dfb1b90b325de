"""Per-channel poll claims: how several pollers share one cycle's work.

Every channel with unfinished tasks has a ``poll_claim`` row. A poller polls a channel only while it holds
that row's claim, so however many pollers run (several ``mjctl serve`` processes, cron on several hosts),
each channel is asked once per round and the cycle's upstream requests are not multiplied.

A poller whose cycle began at ``round_start`` may claim a channel when

- nobody holds the claim: no holder, an expired one, or a process on this host that no longer exists;
- nobody claimed it since ``round_start`` (another poller of the same round already polled it);
- the round of its last poll began at least ``fresh_for`` seconds before ``round_start`` (a looping poller
  passes about one interval: a channel another poller polled less than an interval ago is fresh enough).

Taking a claim is a compare-and-set ``UPDATE … WHERE <those conditions>`` checked by its row count, which
is exact on every database. PostgreSQL and MariaDB ≥ 10.6 / MySQL 8 first pick the candidate with
``FOR UPDATE SKIP LOCKED``, so pollers claiming at the same moment take different channels instead of
queueing on one row. The holder renews its claim as batches complete and releases it when the channel is
done; a holder that dies stops renewing and its claim expires after ``lease_seconds``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import peewee

from mjctl.db import database, is_sqlite, write_tx
from mjctl.models import PollClaim

log = logging.getLogger("mjctl.poller")

CLAIM_ATTEMPTS = 50  # compare-and-set races lost in a row before a poller gives up on this round


def new_holder() -> str:
    """This poller's name in claim rows: host, pid and a random suffix (several pollers per process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_dead(holder: str) -> bool:
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


def supports_skip_locked() -> bool:
    """PostgreSQL, MySQL 8+ and MariaDB 10.6+ have ``FOR UPDATE SKIP LOCKED``; SQLite has no row locks.
    The answer is kept on the database object itself (keyed by id() it once outlived its database: a new
    SQLite store at a freed PostgreSQL one's address was taken for PostgreSQL)."""
    db = database.obj
    known = getattr(db, "_mjctl_skip_locked", None)
    if known is None:
        if is_sqlite(db):
            known = False
        elif isinstance(db, peewee.PostgresqlDatabase):
            known = True
        else:
            version = str(database.execute_sql("SELECT VERSION()").fetchone()[0])
            numbers = [int(n) for n in version.split("-")[0].split(".")[:2] if n.isdigit()]
            major, minor = (numbers + [0, 0])[:2]
            known = (major, minor) >= (10, 6) if "mariadb" in version.lower() else major >= 8
        db._mjctl_skip_locked = known
    return known


class Claims:
    """One cycle's claims: taken channel by channel from any worker thread, renewed, released."""

    def __init__(self, seconds: float, round_start: float, fresh_for: float = 0.0, holder: str | None = None):
        self.seconds = max(float(seconds), 1.0)
        self.round_start = round_start
        self.fresh_for = max(float(fresh_for), 0.0)
        self.holder = holder or new_holder()
        self.taken: list[int] = []
        self.lost: set[int] = set()
        self._renewed: dict[int, float] = {}
        self._lock = threading.Lock()
        self._dead_checked = False

    # -- taking -----------------------------------------------------------------------------------------

    def ensure_rows(self, channel_ids: list[int]) -> None:
        """A claim row for every channel (created free; losing an insert race is fine)."""
        existing = {cid for (cid,) in PollClaim.select(PollClaim.channel_id)
                    .where(PollClaim.channel_id.in_(channel_ids)).tuples()}
        missing = [{"channel_id": cid} for cid in channel_ids if cid not in existing]
        if missing:
            with write_tx():
                PollClaim.insert_many(missing).on_conflict_ignore().execute()

    def _claimable(self, channel_ids: list[int], now: float):
        return ((PollClaim.channel_id.in_(channel_ids))
                & ((PollClaim.holder == "") | (PollClaim.expires_at < now))
                & (PollClaim.polled_at < self.round_start)
                & (PollClaim.round_started_at <= self.round_start - self.fresh_for))

    def claim_next(self, channel_ids: list[int]) -> int | None:
        """Claim the least recently polled claimable channel among channel_ids; None when none is left."""
        if not channel_ids:
            return None
        skip_locked = supports_skip_locked()
        for _ in range(CLAIM_ATTEMPTS):
            now = time.time()
            with write_tx():
                query = (PollClaim.select(PollClaim.channel_id).where(self._claimable(channel_ids, now))
                         .order_by(PollClaim.polled_at, PollClaim.channel_id).limit(1))
                if skip_locked:
                    query = query.for_update("FOR UPDATE SKIP LOCKED")
                row = query.tuples().first()
                taken = 0
                if row is not None:
                    taken = PollClaim.update(holder=self.holder, expires_at=now + self.seconds, polled_at=now,
                                             round_started_at=self.round_start).where(
                        (PollClaim.channel_id == row[0]) & self._claimable([row[0]], now)).execute()
            if taken:
                with self._lock:
                    self.taken.append(row[0])
                    self._renewed[row[0]] = now
                return row[0]
            if row is not None:
                continue  # lost the compare-and-set to another poller: pick again
            if skip_locked and PollClaim.select().where(self._claimable(channel_ids, now)).exists():
                time.sleep(0.002)  # free rows another poller is looking at this very moment
                continue
            if not self._free_dead_holders(channel_ids):
                return None
        log.warning("gave up claiming channels after %d lost races", CLAIM_ATTEMPTS)
        return None

    def _free_dead_holders(self, channel_ids: list[int]) -> bool:
        """Release claims held by processes on this host that no longer exist (once per cycle)."""
        with self._lock:
            if self._dead_checked:
                return False
            self._dead_checked = True
        freed = False
        held = (PollClaim.select(PollClaim.channel_id, PollClaim.holder)
                .where(PollClaim.channel_id.in_(channel_ids) & (PollClaim.holder != "")
                       & (PollClaim.expires_at >= time.time())).tuples())
        for channel_id, holder in list(held):
            if not holder_is_dead(holder):
                continue
            with write_tx():
                n = PollClaim.update(holder="", expires_at=0.0).where(
                    (PollClaim.channel_id == channel_id) & (PollClaim.holder == holder)).execute()
            if n:
                log.warning("taking over channel %s's poll claim from %s, a process that no longer exists",
                            channel_id, holder)
                freed = True
        return freed

    # -- holding ----------------------------------------------------------------------------------------

    def renew_if_due(self, channel_id: int) -> bool:
        """Extend a claim when a third of it has passed; False once it was lost to another poller."""
        with self._lock:
            if channel_id in self.lost:
                return False
            now = time.time()
            if now - self._renewed.get(channel_id, 0.0) < self.seconds / 3:
                return True
        with write_tx():
            kept = PollClaim.update(expires_at=now + self.seconds).where(
                (PollClaim.channel_id == channel_id) & (PollClaim.holder == self.holder)).execute()
        with self._lock:
            if kept:
                self._renewed[channel_id] = now
            else:
                self.lost.add(channel_id)
                log.warning("the poll claim on channel %s was taken over; stopping that channel", channel_id)
        return bool(kept)

    def release(self, channel_id: int) -> None:
        try:
            with write_tx():
                PollClaim.update(holder="", expires_at=0.0).where(
                    (PollClaim.channel_id == channel_id) & (PollClaim.holder == self.holder)).execute()
        except peewee.PeeweeException:
            log.exception("could not release the poll claim on channel %s; it will expire", channel_id)

    # -- explaining -------------------------------------------------------------------------------------

    def why_none(self, channel_ids: list[int]) -> tuple[str, list[str]]:
        """Why nothing was claimable: a message, and the other pollers holding claims."""
        now = time.time()
        held, fresh = [], 0
        rows = PollClaim.select(PollClaim.channel_id, PollClaim.holder, PollClaim.expires_at, PollClaim.polled_at)
        for _channel_id, holder, expires_at, _polled_at in rows.where(PollClaim.channel_id.in_(channel_ids)).tuples():
            if holder and expires_at >= now:
                held.append(f"{holder} until {time.strftime('%H:%M:%S', time.localtime(expires_at))}")
            else:
                fresh += 1
        parts = []
        if held:
            parts.append(f"{len(held)} channel(s) being polled by {', '.join(sorted(set(held)))}")
        if fresh:
            parts.append(f"{fresh} channel(s) already polled in this round")
        return "nothing to claim: " + ("; ".join(parts) or "no channel"), sorted(set(held))
