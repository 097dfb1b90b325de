"""What the task_change triggers (migration 11, guarding the deep-page anchors of mjctl.anchors) cost writes.

    python bench/writes.py [--rows 5000] [--rounds 5] [--pg-url URL] [--mysql-url URL]

On a fresh database of each kind (SQLite always; PostgreSQL and MariaDB when their server URLs are given, or
$MJCTL_TEST_POSTGRES_URL / $MJCTL_TEST_MYSQL_URL are set; a database of its own, dropped at the end), --rows
tasks are inserted one statement each, then each one's status and progress updated (what the poller
writes), then each one's upstream id (what fires the update trigger), then each one deleted; 500 statements
a transaction, so that commits do not drown the statements. The same work is timed without the triggers
(dropped, then made again by running the migration's function), before or after in turn: that is the
floor, and each figure is printed as microseconds a row with and without, and their ratio (medians over
the rounds). Plain SQL statements, so that the database's work is what is timed: through peewee each
statement costs some 50 us more, the same with and without. On PostgreSQL each trigger's own time is also
read from EXPLAIN ANALYZE (one statement over all the rows, rolled back), beside the task_count and
task_version triggers of earlier steps: on a shared machine the wall clock wavers by more than a trigger.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse, urlunparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OPERATIONS = ("insert", "status update", "mj_id update", "delete")
CHUNK = 500


@contextlib.contextmanager
def scratch_database(kind: str, server_url: str) -> Iterator[str]:
    """A new database on the server of server_url, dropped afterwards."""
    name = f"mjctl_bench_writes_{uuid.uuid4().hex[:8]}"
    parts = urlparse(server_url)
    if kind == "postgresql":
        import psycopg2

        admin = psycopg2.connect(host=parts.hostname, port=parts.port or 5432, user=parts.username or "postgres",
                                 password=parts.password, dbname=parts.path.lstrip("/") or "postgres")
        admin.autocommit = True
        create, drop = f'CREATE DATABASE "{name}"', f'DROP DATABASE IF EXISTS "{name}"'
    else:
        import pymysql

        admin = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                                password=parts.password or "", autocommit=True)
        create, drop = f"CREATE DATABASE `{name}`", f"DROP DATABASE IF EXISTS `{name}`"
    admin.cursor().execute(create)
    try:
        yield urlunparse(parts._replace(path="/" + name))
    finally:
        from mjctl.db import unbind

        unbind()
        admin.cursor().execute(drop)
        admin.close()


def timed_rows(rows: int) -> dict[str, float]:
    """Microseconds a row for each operation, on the bound store: plain SQL statements, so that what is
    timed is the database's work (peewee would add ~50 us of its own to each)."""
    from seed import COLUMNS, task_rows

    from mjctl.db import database, write_tx

    first = (database.execute_sql("SELECT MAX(id) FROM task").fetchone()[0] or 0) + 1
    ids = range(first, first + rows)  # given explicitly: a sequence need not start where MAX(id) ends
    seeded = iter(task_rows(rows, users=50, channels=4, unfinished=rows))
    p = database.obj.param
    statements = {
        "insert": (f"INSERT INTO task (id, {', '.join(COLUMNS)}) VALUES ({', '.join([p] * (len(COLUMNS) + 1))})",
                   lambda i: (i, *next(seeded))),
        "status update": (f"UPDATE task SET status = {p}, progress = {p}, updated_at = {p} WHERE id = {p}",
                          lambda i: ("SUCCESS", "100%", time.time(), i)),
        "mj_id update": (f"UPDATE task SET mj_id = {p} WHERE id = {p}", lambda i: (f"x{i}", i)),
        "delete": (f"DELETE FROM task WHERE id = {p}", lambda i: (i,)),
    }
    out = {}
    for op, (sql, values) in statements.items():
        began = time.perf_counter()
        for start in range(0, rows, CHUNK):
            with write_tx():
                for row_id in ids[start:start + CHUNK]:
                    database.execute_sql(sql, values(row_id))
        out[op] = (time.perf_counter() - began) / rows * 1e6
    return out


def drop_triggers() -> None:
    from mjctl.db import database, is_sqlite

    on = "" if is_sqlite() or "MySQL" in type(database.obj).__name__ else " ON task"
    for trigger in ("task_change_delete", "task_change_update"):
        database.execute_sql(f"DROP TRIGGER IF EXISTS {trigger}{on}")


def measure(url: str, rows: int, rounds: int) -> dict[str, dict[str, float]]:
    from mjctl.config import load_settings
    from mjctl.db import database, open_store, unbind
    from mjctl.migrations import _m11_task_change

    open_store(load_settings(None, {("database", "url"): url}))
    try:
        with_triggers, without = [], []
        timed_rows(rows)  # warm up: caches, the table's first pages
        for n in range(rounds):  # which goes first alternates: a run's first half is not its second
            for triggers in ((True, False) if n % 2 else (False, True)):
                if not triggers:
                    drop_triggers()
                (with_triggers if triggers else without).append(timed_rows(rows))
                if not triggers:
                    _m11_task_change(database.obj)
        return {op: {"with": statistics.median(r[op] for r in with_triggers),
                     "without": statistics.median(r[op] for r in without)} for op in OPERATIONS}
    finally:
        unbind()


def postgres_trigger_times(url: str, rows: int) -> dict[str, float]:
    """PostgreSQL's own account (EXPLAIN ANALYZE) of the microseconds a row each trigger took, for one
    statement over `rows` rows of each kind, rolled back: exact where the wall clock of a shared machine
    is not."""
    from seed import COLUMNS, task_rows

    from mjctl.config import load_settings
    from mjctl.db import database, open_store, unbind

    open_store(load_settings(None, {("database", "url"): url}))
    try:
        p = database.obj.param
        with database.atomic():
            for row in task_rows(rows, users=50, channels=4, unfinished=0):
                database.execute_sql(f"INSERT INTO task ({', '.join(COLUMNS)}) VALUES "
                                     f"({', '.join([p] * len(COLUMNS))})", row)
        out: dict[str, float] = {}
        for op, sql in (("status update", "UPDATE task SET status = 'CANCEL', progress = ''"),
                        ("mj_id update", "UPDATE task SET mj_id = mj_id || 'x'"), ("delete", "DELETE FROM task")):
            with database.atomic() as tx:
                plan = [line for (line,) in database.execute_sql("EXPLAIN (ANALYZE) " + sql).fetchall()]
                tx.rollback()
            for line in plan:
                if line.startswith("Trigger "):
                    name, rest = line[len("Trigger "):].split(": ", 1)
                    took = float(rest.split("time=")[1].split()[0])
                    out[f"{op}: {name}"] = took * 1000 / rows
        return out
    finally:
        unbind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pg-url", default=os.environ.get("MJCTL_TEST_POSTGRES_URL"))
    parser.add_argument("--mysql-url", default=os.environ.get("MJCTL_TEST_MYSQL_URL"))
    args = parser.parse_args()
    os.environ.setdefault("MJCTL_LOG_LEVEL", "warning")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["SQLite"] = measure(f"sqlite:///{tmp}/writes.db", args.rows, args.rounds)
    for kind, label, server in (("postgresql", "PostgreSQL", args.pg_url), ("mysql", "MariaDB", args.mysql_url)):
        if server:
            with scratch_database(kind, server) as url:
                results[label] = measure(url, args.rows, args.rounds)

    print(f"{args.rows:,} rows, one statement each, {CHUNK} a transaction; median of {args.rounds} rounds; "
          f"us a row with the task_change triggers / without (the floor)")
    header = f"{'database':12}" + "".join(f"{op:>26}" for op in OPERATIONS)
    print(header)
    print("-" * len(header))
    for label, ops in results.items():
        cells = "".join(f"{o['with']:9.1f} / {o['without']:6.1f} {o['with'] / o['without']:5.2f}x"
                        for o in (ops[op] for op in OPERATIONS))
        print(f"{label:12}{cells}")
    if args.pg_url:
        with scratch_database("postgresql", args.pg_url) as url:
            times = postgres_trigger_times(url, args.rows)
        print(f"\nPostgreSQL's own timing (EXPLAIN ANALYZE), one statement over {args.rows:,} rows, us a row:")
        for what, us in times.items():
            print(f"  {what:45} {us:8.2f}")


if __name__ == "__main__":
    main()
