"""Exporting tasks as CSV or JSON lines: the one iteration behind `mjctl tasks export` and
GET /api/mj/export.

Tasks come newest first in batches of :data:`BATCH`, each batch one keyset query (``id < last id``,
through the same index the listing's filter uses), never an offset: the thousandth batch costs what the
first does, and memory holds one batch whatever the number of matches. Each batch takes a connection
for its own query and gives it back (:func:`mjctl.db.connection`), so a slow reader of a streamed export
holds no database connection between batches. Rows added while an export runs are newer than its first
batch and so not in it; a row changed meanwhile is exported as it is when its batch is read.

Items have the listing's fields (:data:`mjctl.tasks.USER_FIELDS`; for an administrator also
``user_id``, ``channel_id``, ``user_name`` and ``channel_name``). In CSV a text cell that a spreadsheet
would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) gets a
leading ``'``: prompts are written by users, and an administrator opens the file. JSON lines keep every
value exact.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from peewee import JOIN

from mjctl.errors import UsageError
from mjctl.models import Channel, Task, User
from mjctl.tasks import ADMIN_FIELDS, LISTING_COLUMNS, USER_FIELDS, TaskFilter, TaskPage, TaskRow, page_envelope

if TYPE_CHECKING:
    from mjctl.images.urls import ResultLinks

FORMATS = ("csv", "jsonl")
BATCH = 1000
NAME_FIELDS = ("user_name", "channel_name")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}
_FORMULA_START = frozenset("=+-@\t\r")  # a cell's first character that makes a spreadsheet run it


def check_format(value: str | None) -> str:
    fmt = (value or "csv").strip().lower()
    if fmt not in FORMATS:
        raise UsageError(f"The export format must be csv or jsonl, not {fmt[:40]!r}.")
    return fmt


def fields(*, admin: bool) -> tuple[str, ...]:
    return USER_FIELDS + (ADMIN_FIELDS + NAME_FIELDS if admin else ())


def iter_batches(filters: TaskFilter, *, admin: bool, image_url: ResultLinks | None = None,
                 batch: int = BATCH) -> Iterator[list[dict[str, Any]]]:
    """Lists of items (newest first) until every match has been given once."""
    from mjctl.db import connection

    before: int | None = None
    while True:
        with connection():
            rows = _batch(filters, admin, before, batch)
        if not rows:
            return
        width = len(LISTING_COLUMNS)
        page = TaskPage(items=[TaskRow(row[:width]) for row in rows], total=0, page=1, page_size=len(rows))
        items = page_envelope(page, admin=admin, image_url=image_url)["items"]
        if admin:
            for item, row in zip(items, rows):
                item["user_name"], item["channel_name"] = row[width] or "", row[width + 1] or ""
        yield items
        if len(rows) < batch:
            return
        before = rows[-1][0]


def _batch(filters: TaskFilter, admin: bool, before: int | None, size: int) -> list[tuple]:
    columns = [getattr(Task, name) for name in LISTING_COLUMNS]
    query = Task.select(*columns)
    if admin:  # names ride along: outer joins on primary keys, nothing kept between batches
        query = (Task.select(*columns, User.name, Channel.name)
                 .join(User, join_type=JOIN.LEFT_OUTER, on=(User.id == Task.user_id))
                 .join(Channel, join_type=JOIN.LEFT_OUTER, on=(Channel.id == Task.channel_id)))
    query = filters.where(query)
    if before is not None:
        query = query.where(Task.id < before)
    return list(query.order_by(Task.id.desc()).limit(size).tuples())


def encode(batches: Iterator[list[dict[str, Any]]], fmt: str, *, admin: bool) -> Iterator[bytes]:
    """The export as bytes, one chunk per batch (the CSV header first)."""
    if fmt == "jsonl":
        import orjson

        for items in batches:
            yield b"".join(orjson.dumps(item) + b"\n" for item in items)
        return
    names = fields(admin=admin)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(names)
    yield buffer.getvalue().encode("utf-8")
    for items in batches:
        buffer.seek(0)
        buffer.truncate()
        writer.writerows([("'" + value if value.__class__ is str and value[:1] in _FORMULA_START else value)
                          for value in map(item.__getitem__, names)] for item in items)
        yield buffer.getvalue().encode("utf-8")
