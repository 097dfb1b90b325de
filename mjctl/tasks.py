"""Reading tasks: the one listing function used by the CLI, the HTTP API and the web page, and the one
place that turns a task row into the documented item shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable

import peewee

from mjctl.errors import NotFound, UsageError
from mjctl.models import Task

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MILLISECONDS_FROM = 100_000_000_000  # a timestamp this large is in milliseconds
MAX_FILTER_LEN = 256

#: Item fields of GET /api/mj/self, in the document's order.
USER_FIELDS = ("id", "mj_id", "action", "prompt", "prompt_en", "status", "progress", "image_url", "video_url",
               "video_urls", "submit_time", "start_time", "finish_time", "fail_reason", "quota")
#: GET /api/mj/ adds these.
ADMIN_FIELDS = ("user_id", "channel_id")
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

    def shape(self) -> tuple:
        """Which filters are set (the compiled-query cache key)."""
        return (self.user_id is not None, self.channel_id is not None, bool(self.mj_id), bool(self.status),
                bool(self.action), self.start is not None, self.end is not None)

    def params(self) -> list:
        """The filter values in the order where() uses them."""
        values = [self.user_id, self.channel_id, self.mj_id or None, self.status or None, self.action or None,
                  self.start, self.end]
        return [v for v, used in zip(values, self.shape()) if used]

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
        return query


@dataclass
class TaskPage:
    items: list[Task]
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


for _index, _name in enumerate(LISTING_COLUMNS):
    setattr(TaskRow, _name, property(itemgetter(_index), doc=f"The task's {_name} column."))
del _index, _name


def list_tasks(filters: TaskFilter, page: int = 1, page_size: int = DEFAULT_PAGE_SIZE) -> TaskPage:
    """One page of tasks matching filters, newest first (id descending), with the total of all matches.

    The total rides along with the rows as a scalar subquery of the same statement: one round trip to the
    database instead of two (on PostgreSQL ~15% of an /api/mj/self request). A page with no rows (past
    the end, or nothing matches) asks for the total on its own."""
    from mjctl.db import compiled, database

    page, page_size = clamp_page(page, page_size)
    offset = (page - 1) * page_size
    deferred = offset > 0
    count_key, count_params, count_query = _count_query(filters)
    sql, params = compiled(("page", deferred, count_key) + filters.shape(),
                           lambda: _page_query(filters, page_size, offset, deferred, count_query()),
                           count_params + filters.params() + [page_size, offset])
    rows = database.execute_sql(sql, params).fetchall()
    if not rows:
        return TaskPage(items=[], total=count_tasks(filters), page=page, page_size=page_size)
    return TaskPage(items=[TaskRow(row[:-1]) for row in rows], total=int(rows[0][-1] or 0), page=page,
                    page_size=page_size)


def _page_query(filters: TaskFilter, limit: int, offset: int, deferred: bool, total: peewee.Query):
    """The rows of one page, each with the total as its last column. Past the first page the ids are chosen
    first, from an index alone, and only those rows are read (a "deferred join"): skipping 40,000 matches
    then steps over index entries instead of whole rows, on every backend, with the same rows in the same
    order."""
    columns = [getattr(Task, c) for c in LISTING_COLUMNS] + [total.alias("total")]
    if not deferred:
        return filters.where(Task.select(*columns)).order_by(Task.id.desc()).limit(limit).offset(offset)
    ids = filters.where(Task.select(Task.id)).order_by(Task.id.desc()).limit(limit).offset(offset).alias("page")
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
        return filters.where(counted.select(peewee.fn.COUNT(counted.id)), counted)

    return "count", filters.params(), count


def count_tasks(filters: TaskFilter) -> int:
    """Exact number of matches."""
    from mjctl.db import compiled, database

    key, params, query = _count_query(filters)
    sql, params = compiled((key,) + filters.shape(), query, params)
    row = database.execute_sql(sql, params).fetchone()
    return int(row[0] or 0) if row else 0


def get_task(mj_id: str, user_id: int | None = None) -> Task:
    query = Task.select().where(Task.mj_id == mj_id)
    if user_id is not None:
        query = query.where(Task.user_id == user_id)
    task = query.order_by(Task.id.desc()).first()
    if task is None:
        raise NotFound(f"No task with id {mj_id!r}.")
    return task


def task_item(task: Task, *, admin: bool, image_url: Callable[[Task], str] | None = None) -> dict:
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
    if admin:
        item["user_id"] = task.user_id
        item["channel_id"] = task.channel_id
    return item


def task_detail(task: Task, *, image_url: Callable[[Task], str] | None = None) -> dict:
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


def page_envelope(page: TaskPage, *, admin: bool, image_url: Callable[[Task], str] | None = None) -> dict:
    rows = page.items
    if rows and all(type(row) is TaskRow for row in rows):
        items = _admin_items(rows) if admin else _user_items(rows)
        if image_url is not None:
            for item, row in zip(items, rows):
                if item["image_url"]:
                    item["image_url"] = image_url(row)
    else:
        items = [task_item(t, admin=admin, image_url=image_url) for t in rows]
    return {"items": items, "total": page.total, "page": page.page, "page_size": page.page_size}


# A listing row holds LISTING_COLUMNS, all NOT NULL, so an item is the row under the fields' names. Spelt
# out (the dict display of an unpacked row) it costs half of dict(zip(...)): ~0.7 us an item instead of 1.5.
# tests/test_tasks.py checks these against USER_FIELDS, ADMIN_FIELDS and task_item.

def _user_items(rows: list[TaskRow]) -> list[dict]:
    return [
        {"id": id_, "mj_id": mj_id, "action": action, "prompt": prompt, "prompt_en": prompt_en, "status": status,
         "progress": progress, "image_url": image_url, "video_url": video_url, "video_urls": video_urls,
         "submit_time": submit_time, "start_time": start_time, "finish_time": finish_time,
         "fail_reason": fail_reason, "quota": quota}
        for (id_, mj_id, action, prompt, prompt_en, status, progress, image_url, video_url, video_urls,
             submit_time, start_time, finish_time, fail_reason, quota, _user_id, _channel_id) in rows
    ]


def _admin_items(rows: list[TaskRow]) -> list[dict]:
    return [
        {"id": id_, "mj_id": mj_id, "action": action, "prompt": prompt, "prompt_en": prompt_en, "status": status,
         "progress": progress, "image_url": image_url, "video_url": video_url, "video_urls": video_urls,
         "submit_time": submit_time, "start_time": start_time, "finish_time": finish_time,
         "fail_reason": fail_reason, "quota": quota, "user_id": user_id, "channel_id": channel_id}
        for (id_, mj_id, action, prompt, prompt_en, status, progress, image_url, video_url, video_urls,
             submit_time, start_time, finish_time, fail_reason, quota, user_id, channel_id) in rows
    ]
