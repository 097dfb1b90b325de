"""Task statistics on a 1,000,000-task store, against the one SQL aggregate they need, in the same run.

    python bench/stats.py [--url sqlite:///PATH] [--url postgresql://…] [--tasks N] [--rounds 7]

For each database (seeded by bench/seed.py when it holds no tasks: 1M tasks over 90 days, so the last 30
days hold about 333,000):

1. floor: the single SQL aggregate a 30-day statistics-by-day needs, written by hand (per day: count,
   success, failure, cancel, quota, quota refunded), fetched;
2. measured: ``mjctl.stats.compute_stats`` for the same 30 days, by day (the aggregate with the sampled
   durations, the quantiles, the empty-day filling, the JSON shape);
3. the same pair over every task (the 1M rows);
4. on PostgreSQL, the floor with exact ``percentile_cont`` of both durations added, the alternative to the
   sample.

Rounds alternate floor and measured; medians are printed with the ratio (target <= 1.5x, and under 1 s
absolute on SQLite). Then the write cost of what migration 10 added: a refund's transaction with the
ledger trigger against the same transaction with the trigger dropped, in alternating blocks. (PostgreSQL's
statistics on the day and hour buckets cost writes nothing; SQLite and MariaDB get no new index.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def floor_sql(mysql: bool) -> str:
    bucket = "submit_time DIV 86400" if mysql else "submit_time / 86400"
    return (f"SELECT {bucket} AS k, COUNT(id), SUM(CASE WHEN status = 'SUCCESS' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN status = 'FAILURE' THEN 1 ELSE 0 END), SUM(CASE WHEN status = 'CANCEL' THEN 1 ELSE 0 END), "
            f"SUM(quota), SUM(quota_refunded) FROM task WHERE submit_time >= {{start}} GROUP BY {bucket}")


def bind(url: str, tasks: int) -> None:
    from mjctl.config import load_settings
    from mjctl.db import open_store, unbind
    from mjctl.models import Task

    unbind()
    settings = load_settings(None, {("database", "url"): url, ("server", "secret"): "bench"})
    open_store(settings)
    if not Task.select().exists():
        from seed import seed

        print(f"seeding {tasks} tasks into {url} …", file=sys.stderr)
        seed(url, tasks=tasks)
        unbind()
        open_store(settings)


def compare(label: str, start: int, rounds: int) -> dict:
    import peewee

    from mjctl.db import database
    from mjctl.stats import compute_stats
    from mjctl.tasks import TaskFilter

    postgres = isinstance(database.obj, peewee.PostgresqlDatabase)
    sql = floor_sql(isinstance(database.obj, peewee.MySQLDatabase)).format(start=int(start))
    floors, measured, exact = [], [], []
    result = None
    for _ in range(rounds):
        began = time.perf_counter()
        database.execute_sql(sql).fetchall()
        floors.append(time.perf_counter() - began)
        began = time.perf_counter()
        result = compute_stats(TaskFilter(start=start), "day")
        measured.append(time.perf_counter() - began)
        if postgres:  # the road not taken: exact percentiles in the same statement
            began = time.perf_counter()
            database.execute_sql(sql.replace(" FROM task", EXACT_PERCENTILES + " FROM task")).fetchall()
            exact.append(time.perf_counter() - began)
    floor, took = statistics.median(floors), statistics.median(measured)
    assert result is not None
    row = {"case": label, "tasks": result["totals"]["tasks"], "groups": len(result["groups"]),
           "percentiles": result["percentiles"], "floor_ms": round(floor * 1000, 1),
           "stats_ms": round(took * 1000, 1), "ratio": round(took / floor, 2)}
    if exact:
        row["exact_sql_percentiles_ratio"] = round(statistics.median(exact) / floor, 2)
    return row


#: PostgreSQL's exact percentiles of both durations, added to the floor's aggregate.
EXACT_PERCENTILES = (
    ", percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY start_time - submit_time) "
    "FILTER (WHERE submit_time > 0 AND start_time >= submit_time), "
    "percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY finish_time - start_time) "
    "FILTER (WHERE start_time > 0 AND finish_time >= start_time)")


def refund_cost(url: str, n: int) -> dict:
    """Median time of a refund transaction (as reports makes it: fail the task, refund it) with and
    without the ledger trigger, on tasks of a user made for it (removed afterwards, with its ledger)."""
    import peewee

    from mjctl import accounts
    from mjctl.db import database, write_tx
    from mjctl.models import Task, User

    user = User.create(name=f"refund-bench-{time.time_ns()}", quota=10**9)
    rows = [Task.create(user_id=user.id, channel_id=999, mj_id=f"rb{time.time_ns()}{i}", status="IN_PROGRESS",
                        quota=1000, submit_time=1) for i in range(2 * n)]

    def one(task) -> float:
        began = time.perf_counter()
        with write_tx():
            Task.update(status="FAILURE", quota=0, unfinished=0).where(Task.id == task.id).execute()
            accounts.refund(user.id, 1000, task_id=task.id, reason="bench")
        return time.perf_counter() - began

    db = database.obj
    postgres = isinstance(db, peewee.PostgresqlDatabase)

    def trigger(on: bool) -> None:
        if postgres:
            database.execute_sql(f"ALTER TABLE ledger {'ENABLE' if on else 'DISABLE'} TRIGGER ledger_refund_tally")
        elif on:
            from mjctl.db import MIGRATIONS

            dict((v, f) for v, _, f in MIGRATIONS)[10](db)  # puts the trigger back (idempotent)
        else:
            database.execute_sql("DROP TRIGGER ledger_refund_tally")

    # blocks alternate, so that warming up and the machine's other load fall on both sides alike
    with_trigger: list[float] = []
    without: list[float] = []
    block = max(1, n // 10)
    try:
        for start in range(0, 2 * n, 2 * block):
            with_trigger += [one(t) for t in rows[start:start + block]]
            trigger(False)
            without += [one(t) for t in rows[start + block:start + 2 * block]]
            trigger(True)
    finally:
        trigger(True)
    from mjctl.models import Ledger

    Ledger.delete().where(Ledger.user_id == user.id).execute()
    Task.delete().where(Task.user_id == user.id).execute()
    user.delete_instance()
    a, b = statistics.median(with_trigger), statistics.median(without)
    return {"refund_tx_with_trigger_us": round(a * 1e6, 1), "refund_tx_without_us": round(b * 1e6, 1),
            "ratio": round(a / b, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", action="append",
                        help="database URL (repeatable); default a SQLite file in the temp folder, plus "
                             "$MJCTL_TEST_POSTGRES_URL's server when set (database mjctl_bench_stats)")
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--refunds", type=int, default=300, help="refund transactions timed each way")
    args = parser.parse_args()
    urls = args.url or [f"sqlite:///{os.path.join(tempfile.gettempdir(), 'mjctl-bench-1m.db')}"]
    if not args.url and os.environ.get("MJCTL_TEST_POSTGRES_URL"):
        base = os.environ["MJCTL_TEST_POSTGRES_URL"].rsplit("/", 1)[0]
        _ensure_postgres_database(os.environ["MJCTL_TEST_POSTGRES_URL"], "mjctl_bench_stats")
        urls.append(f"{base}/mjctl_bench_stats")
    results = []
    now = int(time.time())
    for url in urls:
        bind(url, args.tasks)
        kind = url.split(":", 1)[0]
        thirty = compare("30 days by day", now - 30 * 86400, args.rounds)
        everything = compare("every task by day", 0, max(3, args.rounds // 2))
        cost = refund_cost(url, args.refunds)
        for row in (thirty, everything):
            row["database"] = kind
            results.append(row)
            exact = (f"; exact SQL percentiles would be {row['exact_sql_percentiles_ratio']:.2f}x"
                     if "exact_sql_percentiles_ratio" in row else "")
            print(f"{kind:10} {row['case']:18} {row['tasks']:>8} tasks: floor {row['floor_ms']:7.1f} ms, "
                  f"stats {row['stats_ms']:7.1f} ms = {row['ratio']:.2f}x ({row['percentiles']} percentiles){exact}")
        print(f"{kind:10} refund transaction: {cost['refund_tx_with_trigger_us']} us with the ledger trigger, "
              f"{cost['refund_tx_without_us']} us without = {cost['ratio']:.2f}x")
        results.append({"database": kind, "case": "refund write cost", **cost})
    print(json.dumps(results, indent=2))


def _ensure_postgres_database(admin_url: str, name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(f"CREATE DATABASE {name}")
    conn.close()


if __name__ == "__main__":
    main()
