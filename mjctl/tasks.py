"""Reading tasks: the one listing function used by the CLI, the HTTP API and the web page, and the one
place that turns a task row into the documented item shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, TypeGuard, cast

import peewee

from mjctl.errors import NotFound, UsageError
from mjctl.models import Task

if TYPE_CHECKING:
    from mjctl.images.urls import ResultLinks

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MILLISECONDS_FROM = 100_000_000_000  # a timestamp this large is in milliseconds
MAX_FILTER_LEN = 256
#: A time range with at least this many tasks submitted after it is read range first (see range_first).
RANGE_FIRST_FROM = 2_000

#: Item fields of GET /api/mj/self, in the document's order.
USER_FIELDS = ("id", "mj_id", "action", "prompt", "prompt_en", "status", "progress", "image_url", "video_url",
               "video_urls", "submit_time", "start_time", "finish_time", "fail_reason", "quota")
#: GET /api/mj/ adds these.
ADMIN_FIELDS = ("user_id", "channel_id", "mode")
#: The columns a listing reads: exactly what an item shows (buttons, properties and the rest stay unread).
LISTING_COLUMNS = USER_FIELDS + ADMIN_FIELDS


@dataclass
class TaskFilter:
    user_id: int | None = None
    channel_id: int | None = None
    mj_id: str | None = None
    status: str | None = None
    action: str | None = None
    start: int | None = None  # submit_time >= start (epoch seconds)
    end: int | None = None  # submit_time <= end
    mode: str | None = None  # FAST, RELAX or TURBO

    def shape(self) -> tuple:
        """Which filters are set (the compiled-query cache key)."""
        return (self.user_id is not None, self.channel_id is not None, bool(self.mj_id), bool(self.status),
                bool(self.action), self.start is not None, self.end is not None, bool(self.mode))

    def params(self) -> list:
        """The filter values in the order where() uses them."""
        values = [self.user_id, self.channel_id, self.mj_id or None, self.status or None, self.action or None,
                  self.start, self.end, self.mode or None]
        return [v for v, used in zip(values, self.shape()) if used]

    def only_ranged(self) -> bool:
        """Whether a time range is the narrowest filter (no user, no upstream id): see range_first."""
        return (self.start is not None or self.end is not None) and self.user_id is None and not self.mj_id

    def where(self, query, table=Task):
        """query narrowed to the matches; table is Task or an alias of it (a subquery's own)."""
        if self.user_id is not None:
            query = query.where(table.user_id == self.user_id)
        if self.channel_id is not None:
            query = query.where(table.channel_id == self.channel_id)
        if self.mj_id:
            query = query.where(table.mj_id == self.mj_id)
        if self.status:
            query = query.where(table.status == self.status)
        if self.action:
            query = query.where(table.action == self.action)
        if self.start is not None:
            query = query.where(table.submit_time >= self.start)
        if self.end is not None:
            query = query.where(table.submit_time <= self.end)
        if self.mode:
            query = query.where(table.mode == self.mode)
        return query


@dataclass
class TaskPage:
    items: list[TaskRow] | list[Task]  # list_tasks reads rows; a page built by hand may hold models
    total: int
    page: int
    page_size: int
    extra: dict = field(default_factory=dict)


def normalize_seconds(value: int) -> int:
    """Epoch seconds; a value >= 100000000000 is taken as milliseconds (what browsers send)."""
    return value // 1000 if value >= MILLISECONDS_FROM else value


def clamp_page(page: int, page_size: int) -> tuple[int, int]:
    """Validate paging: page >= 1, page_size >= 1; a page_size above the maximum is served as the maximum."""
    if page < 1:
        raise UsageError(f"The page must be 1 or more, not {page}.")
    if page_size < 1:
        raise UsageError(f"The page size must be 1 or more, not {page_size}.")
    return page, min(page_size, MAX_PAGE_SIZE)


class TaskRow(tuple):
    """A task as read for a listing: the row tuple of LISTING_COLUMNS, readable as attributes, without a
    Peewee model's cost (building one by setattr per column cost 7 us a row, a third of a page's time)."""

    __slots__ = ()

    if TYPE_CHECKING:  # set below as properties, one per column; the ones code reads by name:
        id: int
        mj_id: str


for _index, _name in enumerate(LISTING_COLUMNS):
    setattr(TaskRow, _name, property(itemgetter(_index), doc=f"The task's {_name} column."))
del _index, _name


def list_tasks(filters: TaskFilter, page: int = 1, page_size: int = DEFAULT_PAGE_SIZE, *,
               anchored: bool = True) -> TaskPage:
    """One page of tasks matching filters, newest first (id descending), with the total of all matches.

    The total rides along with the rows as a scalar subquery of the same statement: one round trip to the
    database instead of two (on PostgreSQL ~15% of an /api/mj/self request). A page with no rows (past
    the end, or nothing matches) asks for the total on its own. Deep pages start from a remembered row near
    them (mjctl.anchors) unless anchored is False; the rows are the same either way."""
    from mjctl import anchors
    from mjctl.db import compiled, database

    page, page_size = clamp_page(page, page_size)
    offset = (page - 1) * page_size
    if anchored and anchors.applies(filters, offset):
        return anchors.deep_page(filters, page, page_size)
    by_range = range_first(filters)
    deferred = offset > 0 or by_range
    count_key, count_params, count_query = _count_query(filters)
    sql, params = compiled(("page", deferred, by_range, count_key) + filters.shape(),
                           lambda: _page_query(filters, page_size, offset, deferred, count_query(), by_range),
                           count_params + filters.params() + [page_size, offset])
    rows = database.execute_sql(sql, params).fetchall()
    if not rows:
        return TaskPage(items=[], total=count_tasks(filters), page=page, page_size=page_size)
    return TaskPage(items=[TaskRow(row[:-1]) for row in rows], total=int(rows[0][-1] or 0), page=page,
                    page_size=page_size)


def range_first(filters: TaskFilter) -> bool:
    """Whether a page is read range first: its matches found through the submit_time index, then the
    newest of them sorted out, rather than by walking the primary key down from the newest task.

    Planners walk the key for ORDER BY id DESC LIMIT 20 under a time range, guessing the range's tasks
    spread evenly over the ids. They do not: tasks are stored as they are submitted, so the walk steps over
    every task submitted after the range first (5 million, 6 s on PostgreSQL, for a day 45 days back in ten
    million). So when at least RANGE_FIRST_FROM tasks were submitted after the range (one index probe,
    counting up to that many), the range is read first, which costs about what counting its matches does;
    otherwise the walk reaches the range at once."""
    if not filters.only_ranged():
        return False
    if filters.end is None:
        return False
    from mjctl.db import compiled, database

    def probe() -> peewee.Query:
        after = Task.alias("after")
        newer = after.select(peewee.SQL("1")).where(after.submit_time > filters.end).limit(RANGE_FIRST_FROM)
        return peewee.Select([newer.alias("newer")], [peewee.fn.COUNT(peewee.SQL("*"))]).bind(database)

    sql, params = compiled(("range-probe",), probe, [filters.end, RANGE_FIRST_FROM])
    return database.execute_sql(sql, params).fetchone()[0] >= RANGE_FIRST_FROM


def _page_query(filters: TaskFilter, limit: int, offset: int, deferred: bool, total: peewee.Query,
                by_range: bool = False, extra: tuple = ()):
    """The rows of one page, each with the total (and then the extra columns) after its own. Past the first
    page the ids are chosen first, from an index alone, and only those rows are read (a "deferred join"):
    skipping 40,000 matches then steps over index entries instead of whole rows, on every backend, with
    the same rows in the same order. by_range: read range first (range_first; deferred only)."""
    columns = [getattr(Task, c) for c in LISTING_COLUMNS] + [total.alias("total"), *extra]
    if not deferred:
        return filters.where(Task.select(*columns)).order_by(Task.id.desc()).limit(limit).offset(offset)
    # id + 0 orders the same, but no planner can walk the primary key for it: the matches come from the
    # range's index and the newest of them are sorted out.
    order = (Task.id + peewee.SQL("0")) if by_range else Task.id
    ids = filters.where(Task.select(Task.id)).order_by(order.desc()).limit(limit).offset(offset).alias("page")
    return Task.select(*columns).join(ids, on=(Task.id == ids.c.id)).order_by(Task.id.desc())


def _count_query(filters: TaskFilter) -> tuple[str, list, Callable[[], peewee.Query]]:
    """How to count the matches: (cache key, parameters, query builder). Unfiltered and per-channel totals
    come from the trigger-kept counters; anything else is a COUNT over the filters' index."""
    only_channel = filters.channel_id is not None and filters.channel_id > 0 and not any(
        (filters.user_id is not None, filters.mj_id, filters.status, filters.action, filters.start is not None,
         filters.end is not None))
    if only_channel or filters == TaskFilter():
        from mjctl.models import TaskCount

        channel = filters.channel_id or 0
        return "task_count", [channel], lambda: TaskCount.select(TaskCount.n).where(TaskCount.channel_id == channel)

    def count() -> peewee.Query:
        counted = Task.alias("counted")
        return filters.where(counted.select(peewee.fn.COUNT(peewee.SQL("*"))), counted)

    return "count", filters.params(), count


def count_tasks(filters: TaskFilter) -> int:
    """Exact number of matches."""
    from mjctl.db import compiled, database

    key, params, query = _count_query(filters)
    sql, params = compiled((key,) + filters.shape(), query, params)
    row = database.execute_sql(sql, params).fetchone()
    return int(row[0] or 0) if row else 0


# -- a task by its upstream id ---------------------------------------------------------------------
#
# mj_id is the upstream's id, and it is unique only on one channel (the store's unique index is
# (channel_id, mj_id)): two upstreams can hand out the same id, and ids are milliseconds plus three
# random digits. A task is its row. Every lookup by mj_id therefore either stays inside one user's tasks,
# or deals with finding several.


def owned_task(user_id: int, mj_id: str) -> Task | None:
    """The caller's task with this upstream id, or None: the one lookup behind "my task by its id" (the
    relay's fetch and image-seed, the image endpoint with a token).

    Only the caller's rows are searched, so another user's task with the same id can never answer for the
    caller's, and it reads exactly like a missing one. A caller holding several tasks with one id (given
    by two channels) gets the newest, as an upstream's own store would answer."""
    return (Task.select().where((Task.mj_id == mj_id) & (Task.user_id == user_id))
            .order_by(Task.id.desc()).first())


def owned_tasks(user_id: int, mj_ids: list[str]) -> list[Task]:
    """The caller's tasks among mj_ids, one per id (the newest, as owned_task answers), newest first."""
    if not mj_ids:
        return []
    seen: set[str] = set()
    out = []
    query = Task.select().where((Task.user_id == user_id) & (Task.mj_id.in_(mj_ids))).order_by(Task.id.desc())
    for task in query:
        if task.mj_id not in seen:
            seen.add(task.mj_id)
            out.append(task)
    return out


def tasks_with_mj_id(mj_id: str, *, limit: int | None = None) -> list[Task]:
    """Every task carrying this upstream id, oldest first (at most limit): what an administrator's lookup
    must show in full rather than pick one of."""
    query = Task.select().where(Task.mj_id == mj_id).order_by(Task.id)
    return list(query.limit(limit) if limit else query)


def sole_task(mj_id: str) -> Task | None:
    """The task with this upstream id when exactly one task has it, and no other ever shared it on its
    channel; else None.

    For what was keyed by mj_id alone before tasks were told apart by their rows (image links signed over
    the id only, image files cached under it): such a key still names a task unambiguously when one task
    has that id, and no task at all when several do. Migration 6 renamed the newer of tasks sharing an id
    on one channel, which leaves the older one alone with the id; it records those ids (shared_id_marker),
    so that a key made for the renamed task is not taken for the older one's."""
    from mjctl.models import Meta_

    found = tasks_with_mj_id(mj_id, limit=2)
    if len(found) != 1:
        return None
    if Meta_.select(Meta_.key).where(Meta_.key == shared_id_marker(mj_id)).exists():
        return None
    return found[0]


def shared_id_marker(mj_id: str) -> str:
    """The mjctl_meta key recording that several tasks of one channel had this upstream id (migration 6)."""
    import hashlib

    return "shared-id:" + hashlib.sha256(mj_id.encode("utf-8")).hexdigest()[:40]


def get_task(mj_id: str, user_id: int | None = None) -> Task:
    """The one task an mj_id names: the user's own (owned_task) when user_id is given, else the only task
    with that id. Raises NotFound, or AmbiguousTaskId when several tasks share the id (the caller should
    show them all, or ask which one is meant)."""
    if user_id is not None:
        task = owned_task(user_id, mj_id)
        if task is None:
            raise NotFound(f"No task with id {mj_id!r}.")
        return task
    found = tasks_with_mj_id(mj_id)
    if not found:
        raise NotFound(f"No task with id {mj_id!r}.")
    if len(found) > 1:
        raise AmbiguousTaskId(mj_id, found)
    return found[0]


def get_task_by_row(task_id: int) -> Task:
    """A task by its row id (what tells apart tasks that share an upstream id). Raises NotFound."""
    task = Task.get_or_none(Task.id == task_id)
    if task is None:
        raise NotFound(f"No task with row id {task_id}.")
    return task


class AmbiguousTaskId(UsageError):
    """Several tasks carry one upstream id (on different channels, or before the store kept it unique per
    channel); naming one needs its row id."""

    http_status = 409

    def __init__(self, mj_id: str, found: list[Task]):
        rows = ", ".join(f"row {t.id} (channel {t.channel_id}, user {t.user_id})" for t in found)
        super().__init__(f"{len(found)} tasks have the id {mj_id!r}: {rows}; choose one by its row id.")
        self.mj_id = mj_id
        self.tasks = found


def task_item(task: Task, *, admin: bool, image_url: ResultLinks | None = None) -> dict:
    """The documented item shape: USER_FIELDS, plus ADMIN_FIELDS when admin. Times in epoch seconds."""
    item = {
        "id": task.id,
        "mj_id": task.mj_id,
        "action": task.action,
        "prompt": task.prompt,
        "prompt_en": task.prompt_en,
        "status": task.status,
        "progress": task.progress,
        "image_url": (image_url(task) if image_url and task.image_url else task.image_url) or "",
        "video_url": task.video_url,
        "video_urls": task.video_urls,
        "submit_time": int(task.submit_time or 0),
        "start_time": int(task.start_time or 0),
        "finish_time": int(task.finish_time or 0),
        "fail_reason": task.fail_reason,
        "quota": int(task.quota),
    }
    if image_url is not None and (task.video_url or task.video_urls):
        item["video_url"], item["video_urls"] = image_url.videos(task.id, task.mj_id, task.video_url,
                                                                 task.video_urls)
    if admin:
        item["user_id"] = task.user_id
        item["channel_id"] = task.channel_id
        item["mode"] = task.mode
    return item


def task_detail(task: Task, *, image_url: ResultLinks | None = None) -> dict:
    """Everything about one task (for `tasks show`)."""
    item = task_item(task, admin=True, image_url=image_url)
    item.update(
        description=task.description,
        state=task.state,
        code=task.code,
        buttons=task.buttons_list(),
        properties=task.properties_dict(),
    )
    return item


def _all_rows(rows: list[TaskRow] | list[Task]) -> TypeGuard[list[TaskRow]]:
    return all(type(row) is TaskRow for row in rows)


def page_envelope(page: TaskPage, *, admin: bool, image_url: ResultLinks | None = None) -> dict:
    rows = page.items
    if rows and _all_rows(rows):
        items = _admin_items(rows) if admin else _user_items(rows)
        if image_url is not None:
            for item, row in zip(items, rows):
                if item["image_url"]:
                    item["image_url"] = image_url(row)
                if item["video_url"] or item["video_urls"]:
                    item["video_url"], item["video_urls"] = image_url.videos(row.id, row.mj_id, item["video_url"],
                                                                             item["video_urls"])
    else:
        models = cast("list[Task]", rows)  # a page that is not all listing rows holds models
        items = [task_item(t, admin=admin, image_url=image_url) for t in models]
    return {"items": items, "total": page.total, "page": page.page, "page_size": page.page_size}


# A listing row holds LISTING_COLUMNS, all NOT NULL, so an item is the row under the fields' names. Spelt
# out (the dict display of an unpacked row) it costs half of dict(zip(...)): ~0.7 us an item instead of 1.5.
# tests/test_api.py checks these against USER_FIELDS, ADMIN_FIELDS and task_item.

def _user_items(rows: list[TaskRow]) -> list[dict]:
    return [
        {"id": id_, "mj_id": mj_id, "action": action, "prompt": prompt, "prompt_en": prompt_en, "status": status,
         "progress": progress, "image_url": image_url, "video_url": video_url, "video_urls": video_urls,
         "submit_time": submit_time, "start_time": start_time, "finish_time": finish_time,
         "fail_reason": fail_reason, "quota": quota}
        for (id_, mj_id, action, prompt, prompt_en, status, progress, image_url, video_url, video_urls,
             submit_time, start_time, finish_time, fail_reason, quota, _user_id, _channel_id, _mode) in rows
    ]


def _admin_items(rows: list[TaskRow]) -> list[dict]:
    return [
        {"id": id_, "mj_id": mj_id, "action": action, "prompt": prompt, "prompt_en": prompt_en, "status": status,
         "progress": progress, "image_url": image_url, "video_url": video_url, "video_urls": video_urls,
         "submit_time": submit_time, "start_time": start_time, "finish_time": finish_time,
         "fail_reason": fail_reason, "quota": quota, "user_id": user_id, "channel_id": channel_id, "mode": mode}
        for (id_, mj_id, action, prompt, prompt_en, status, progress, image_url, video_url, video_urls,
             submit_time, start_time, finish_time, fail_reason, quota, user_id, channel_id, mode) in rows
    ]
