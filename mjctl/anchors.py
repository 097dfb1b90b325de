"""Deep listing pages without stepping over every match above them: remembered rows ("anchors") behind the
offset.

Page p of a listing holds the matches from position (p - 1) * page_size + 1, counted from the newest. Read
with OFFSET, the database steps over every match above it, one index entry at a time: 40,000 of them at
p=2000 with 20 a page, which cost more than the whole of page 1. This module remembers, per filter, rows
where deep pages began, each with its rank counted from the other end: rank 1 is the oldest match. New
tasks arrive at the newest end, so a rank counted from the oldest stays put while they do. The page whose
first row has rank total - offset is then read by seeking to the nearest remembered row and stepping over
the few matches between (at most REACH).

A remembered row is used only when the statement that reads the page proves, in its own snapshot, that no
match at or below the remembered rows has come or gone since they were counted:

- the task_change counter (kept by triggers, migration 11) has not moved: no task was deleted, and no
  task's id, user, channel, upstream id, action, submit time or mode changed;
- the number of matches equals the number then plus the matches above the highest task id then: every
  match that arrived since is newer than all the remembered rows. An insert that commits after newer
  ones (PostgreSQL and MariaDB allow it) breaks this, and so is caught.

When the proof fails the filter's anchors are dropped and the page is read with OFFSET, which records
fresh ones; when only newer matches arrived, the ranks still hold and the page is read again for the new
total. Listings filtered by status never use anchors (a task's status changes as it runs), nor do shallow
pages (below ANCHOR_FROM matches, skipping costs less than proving). The anchors live in the process
(each server worker has its own), at most MAX_ANCHORS for each of MAX_FILTERS filters.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import peewee

from mjctl.models import Task, TaskChange

#: Offsets below this are read with OFFSET: stepping over fewer matches costs less than the proof.
ANCHOR_FROM = 2_000
#: An anchor further than this many matches from a page's first row is not used for it.
REACH = 1_000
#: Matches newer than the anchors are counted up to this many; more, and the anchors are rebuilt.
FRESH_CAP = 5_000
MAX_ANCHORS = 512
MAX_FILTERS = 256
ATTEMPTS = 3  # anchored reads of one page before falling back to OFFSET, while new matches keep arriving
_ABOVE_EVERY_ID = 2**62  # the highest id "then" when there are no anchors yet: nothing is above it

#: What happened to deep-page reads in this process: "anchored" pages, "offset" pages (no anchor near
#: enough, recorded one), "dropped" anchor sets whose proof failed, "moved" re-reads after new matches.
stats: Counter = Counter()


def applies(filters, offset: int) -> bool:
    """Whether a page at this offset under these filters is read through anchors."""
    return offset >= ANCHOR_FROM and not filters.status


@dataclass
class _Anchors:
    """The remembered rows of one filter, each (rank, id) with rank 1 the oldest match. Valid in any
    snapshot where task_change still reads `changes` and the matches number `total` plus those above
    `high_id` (the highest task id when they were last confirmed)."""

    changes: int
    total: int
    high_id: int
    ranks: list[int] = field(default_factory=list)  # ascending
    ids: list[int] = field(default_factory=list)

    def add(self, rank: int, row_id: int) -> None:
        i = bisect.bisect_left(self.ranks, rank)
        if i < len(self.ranks) and self.ranks[i] == rank:
            return
        if len(self.ranks) >= MAX_ANCHORS:
            drop = random.randrange(len(self.ranks))
            del self.ranks[drop], self.ids[drop]
            i = bisect.bisect_left(self.ranks, rank)
        self.ranks.insert(i, rank)
        self.ids.insert(i, row_id)


@dataclass(slots=True)
class _Plan:
    """One anchored read: the anchor set as it stood (its counter, total and highest id), the rank of the
    page's first row under that total, and the anchor chosen for it."""

    anchors: _Anchors
    changes: int
    total: int
    high_id: int
    rank: int
    anchor_rank: int
    anchor_id: int

    def holds(self, changes, total: int, fresh: int) -> bool:
        """Whether the anchors' ranks are still true in a snapshot that read these checks."""
        return changes == self.changes and fresh < FRESH_CAP and total == self.total + fresh


class _Cache:
    """The anchor sets of one database, least recently used dropped first; every method holds the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sets: OrderedDict[tuple, _Anchors] = OrderedDict()

    def plan(self, key: tuple, offset: int) -> _Plan | None:
        with self.lock:
            anchors = self.sets.get(key)
            if anchors is None:
                return None
            self.sets.move_to_end(key)
            rank = anchors.total - offset
            i = bisect.bisect_left(anchors.ranks, rank)
            near = [j for j in (i - 1, i) if 0 <= j < len(anchors.ranks)]
            if rank < 1 or not near:
                return None
            j = min(near, key=lambda k: abs(anchors.ranks[k] - rank))
            if abs(anchors.ranks[j] - rank) > REACH:
                return None
            return _Plan(anchors, anchors.changes, anchors.total, anchors.high_id, rank, anchors.ranks[j],
                         anchors.ids[j])

    def base(self, key: tuple) -> _Plan | None:
        """The anchor set as it stands, for a read that will confirm or replace it (no anchor chosen)."""
        with self.lock:
            anchors = self.sets.get(key)
            if anchors is None:
                return None
            return _Plan(anchors, anchors.changes, anchors.total, anchors.high_id, 0, 0, 0)

    def confirm(self, key: tuple, plan: _Plan, total: int, high_id: int, first: tuple[int, int] | None) -> None:
        """The plan's anchors held in a snapshot with this total and highest id: count from there on, and
        remember first (rank, id) too. Nothing changes when another read moved the set meanwhile."""
        with self.lock:
            anchors = self.sets.get(key)
            if anchors is not plan.anchors or (anchors.total, anchors.high_id) != (plan.total, plan.high_id):
                return
            anchors.total, anchors.high_id = total, high_id
            if first is not None:
                anchors.add(*first)

    def replace(self, key: tuple, anchors: _Anchors) -> None:
        with self.lock:
            self.sets[key] = anchors
            self.sets.move_to_end(key)
            while len(self.sets) > MAX_FILTERS:
                self.sets.popitem(last=False)

    def drop(self, key: tuple, plan: _Plan) -> None:
        with self.lock:
            if self.sets.get(key) is plan.anchors:
                del self.sets[key]


_caches_lock = threading.Lock()


def _cache() -> _Cache:
    """This process's anchors for the database the models are bound to (tests bind several in turn): kept
    on the database object, so they go with it."""
    from mjctl.db import database

    db = database.obj
    cache = getattr(db, "_mjctl_anchors", None)
    if cache is None:
        with _caches_lock:
            cache = getattr(db, "_mjctl_anchors", None)
            if cache is None:
                cache = db._mjctl_anchors = _Cache()
    return cache


def _key(filters) -> tuple:
    """Every filter's value: anchors belong to exactly one set of matches."""
    return dataclasses.astuple(filters)


def deep_page(filters, page: int, page_size: int):
    """Page `page` of the matches of filters (no status filter), newest first, with their exact total: the
    same rows as reading it with OFFSET, read from an anchor when one is near and still provably right."""
    from mjctl.tasks import TaskPage, TaskRow, count_tasks

    offset = (page - 1) * page_size
    cache = _cache()
    key = _key(filters)
    for _ in range(ATTEMPTS):
        plan = cache.plan(key, offset)
        if plan is None:
            break
        rows = _run(_anchored_statement(filters, page_size, plan))
        if rows and _changes_and_total(rows[0]) == (plan.changes, plan.total):
            # Nothing deleted or moved, no match added: the anchors' snapshot, as far as these rows go.
            if plan.anchor_rank != plan.rank:
                cache.confirm(key, plan, plan.total, plan.high_id, (plan.rank, rows[0][0]))
            stats["anchored"] += 1
            return TaskPage(items=[TaskRow(row[:-2]) for row in rows], total=plan.total, page=page,
                            page_size=page_size)
        # Something changed: only newer matches (the ranks hold, the page moved), or worse. One snapshot says.
        total, changes, fresh, high_id = _checks_of(_run(_check_statement(filters, plan.high_id))[0])
        if high_id is None or not plan.holds(changes, total, fresh):
            cache.drop(key, plan)
            stats["dropped"] += 1
            break
        cache.confirm(key, plan, total, high_id, None)
        stats["moved"] += 1

    base = cache.base(key)
    rows = _run(_offset_statement(filters, page_size, offset, base.high_id if base else _ABOVE_EVERY_ID))
    stats["offset"] += 1
    if not rows:
        return TaskPage(items=[], total=count_tasks(filters), page=page, page_size=page_size)
    total, changes, fresh, high_id = _checks_of(rows[0])
    first = (total - offset, rows[0][0])
    if high_id is None or changes is None:  # no task_change row: nothing can be proven, so nothing is kept
        pass
    elif base is not None and base.holds(changes, total, fresh):
        cache.confirm(key, base, total, high_id, first)
    else:
        anchors = _Anchors(int(changes), total, int(high_id))
        anchors.add(*first)
        cache.replace(key, anchors)
    return TaskPage(items=[TaskRow(row[:-4]) for row in rows], total=total, page=page, page_size=page_size)


def _run(statement: tuple[str, list]) -> list[tuple]:
    from mjctl.db import database

    return database.execute_sql(*statement).fetchall()


def _changes_and_total(row: tuple) -> tuple:
    """(task_change counter, total) of an anchored page's row."""
    total, changes = row[-2:]
    return changes, int(total or 0)


def _checks_of(row: tuple) -> tuple[int, int | None, int, int | None]:
    """(total, task_change counter, matches above the highest id then, highest id now) of a checked row."""
    total, changes, fresh, high_id = row[-4:]
    return int(total or 0), changes, int(fresh or 0), high_id


def _checks(filters, total: peewee.Query, high_id_then: int | None) -> list:
    """The columns that prove anchors in a statement's own snapshot: the total and the change counter, and
    unless high_id_then is None, the matches above it (counted up to FRESH_CAP) and the highest task id."""
    changes = TaskChange.select(TaskChange.n).where(TaskChange.id == 1)
    if high_id_then is None:
        return [total.alias("total"), changes.alias("changes")]
    fresh = Task.alias("fresh")
    newer = filters.where(fresh.select(fresh.id), fresh).where(fresh.id > high_id_then).limit(FRESH_CAP)
    top = Task.alias("top")
    return [total.alias("total"), changes.alias("changes"),
            peewee.Select([newer.alias("newer")], [peewee.fn.COUNT(peewee.SQL("*"))]).alias("fresh"),
            top.select(peewee.fn.MAX(top.id)).alias("high_id")]


def _check_params(filters, count_params: list, high_id_then: int | None) -> list:
    if high_id_then is None:
        return count_params + [1]
    return count_params + [1] + filters.params() + [high_id_then, FRESH_CAP]


def _anchored_statement(filters, limit: int, plan: _Plan) -> tuple[str, list]:
    """The page from plan's anchor, with the total and the change counter: its first row is `skip` matches
    below the anchor (or the anchor), or, when the anchor lies below the page, the (skip + 1)-th match
    above it."""
    from mjctl.db import compiled
    from mjctl.tasks import LISTING_COLUMNS, _count_query

    count_key, count_params, count_query = _count_query(filters)
    below = plan.anchor_rank >= plan.rank
    skip = plan.anchor_rank - plan.rank if below else plan.rank - plan.anchor_rank - 1

    def build() -> peewee.Query:
        columns = [getattr(Task, c) for c in LISTING_COLUMNS] + _checks(filters, count_query(), None)
        query = filters.where(Task.select(*columns))
        if below:
            return query.where(Task.id <= plan.anchor_id).order_by(Task.id.desc()).limit(limit).offset(skip)
        above = Task.alias("above")
        start = (filters.where(above.select(above.id), above).where(above.id > plan.anchor_id)
                 .order_by(above.id).limit(1).offset(skip))
        return query.where(Task.id <= start).order_by(Task.id.desc()).limit(limit)

    params = _check_params(filters, count_params, None) + filters.params()
    params += [plan.anchor_id, limit, skip] if below else filters.params() + [plan.anchor_id, 1, skip, limit]
    return compiled(("anchored", below, count_key) + filters.shape(), build, params)


def _check_statement(filters, high_id_then: int) -> tuple[str, list]:
    """The four checks alone, in one snapshot."""
    from mjctl.db import compiled, database
    from mjctl.tasks import _count_query

    count_key, count_params, count_query = _count_query(filters)
    return compiled(("anchor-check", count_key) + filters.shape(),
                    lambda: peewee.Select(columns=_checks(filters, count_query(), high_id_then)).bind(database),
                    _check_params(filters, count_params, high_id_then))


def _offset_statement(filters, limit: int, offset: int, high_id_then: int) -> tuple[str, list]:
    """The page read with OFFSET (tasks._page_query's deferred join), with the checks that record anchors."""
    from mjctl.db import compiled
    from mjctl.tasks import _count_query, _page_query, range_first

    count_key, count_params, count_query = _count_query(filters)
    by_range = range_first(filters)

    def build() -> peewee.Query:
        checks = _checks(filters, count_query(), high_id_then)
        return _page_query(filters, limit, offset, True, checks[0], by_range, tuple(checks[1:]))

    params = _check_params(filters, count_params, high_id_then) + filters.params() + [limit, offset]
    return compiled(("anchor-offset", by_range, count_key) + filters.shape(), build, params)
