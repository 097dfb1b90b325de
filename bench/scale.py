"""Scale: the listings on PostgreSQL with 1 and 2 worker processes, against SQLite in one process, up to ten
million tasks; and the poller on that store.

    python bench/scale.py [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--tasks 1000000]
                          [--pg-database NAME] [--drop] [--no-sqlite] [--workers 1,2] [--seconds 5] [--rounds 3]
                          [--connections 16] [--threads 16] [--unfinished 100000] [--poll-tasks 10000]
    python bench/scale.py --poll-only [--unfinished 100000] [--poll-rounds 5] [--no-sqlite]

1. Seeds --tasks tasks over 10,000 users (bench/seed.py, COPY on PostgreSQL: ten million in about 4.5
   minutes) into a SQLite file (unless --no-sqlite) and into the PostgreSQL database --pg-database
   (default mjctl_bench_scale, or mjctl_bench_scale_<N> for N other than a million) on the server of
   --pg-url; both are kept and reused by later runs, unless --drop drops the database at the end.
2. Runs `mjctl serve --no-poll` as a real process for each store (SQLite with 1 worker, PostgreSQL with
   each of --workers; same threads; pool_size = threads) and drives each case with bench/api.py's load
   generator (a separate process, one request in flight per connection): GET /healthz (the floor: one
   round trip to the database), GET /api/mj/self for 16 users, and on PostgreSQL the admin listings of
   one channel, of one day (the newest, and one 45 days back), of one upstream id, of all three at once,
   and p=2000.
3. Prints each case's throughput and latency, as ratios against the floor and against SQLite's
   /api/mj/self measured in the same run; checks every listing's total against a COUNT of its own.
4. The poller on the PostgreSQL store (--unfinished > 0): the idle cycle (nothing unfinished, median of
   200), then --unfinished tasks held by a simulator in its own process (bench/poll.py), stored
   unfinished over 4 channels and the seeded users (no ANALYZE, as right after a burst of submissions)
   and polled: the steady cycle (nothing changed, the memo of unchanged reports held) against the floor
   of the same upstream requests made by a bare httpx loop (best of each over --poll-rounds). Those tasks
   are deleted again afterwards.
5. Work sharing: one round of 1 and of 3 pollers over --poll-tasks unfinished tasks on a fresh SQLite file
   (bench/poll.py's run_pollers): upstream requests, which must not grow with the pollers.

--poll-only runs step 4 alone, without the seeded millions (the store's size is not what a cycle costs: a
channel's unfinished tasks are one index range): on a fresh PostgreSQL database (mjctl_bench_poll, dropped
at the end) and, unless --no-sqlite, a fresh SQLite file, each holding --users users and nothing else.

Targets at ten million tasks: /api/mj/self p99 < 50 ms; channel, one day and upstream id together p99
< 100 ms; every total exact; the steady poll cycle <= 1.5x its floor; the idle cycle
< 5 ms. The access log is off in every case (it costs the same everywhere).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse, urlunparse

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

DAY = 86400


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_database_url(server_url: str, name: str) -> str:
    return urlunparse(urlparse(server_url)._replace(path="/" + name))


def _pg_admin(server_url: str):
    import psycopg2

    parts = urlparse(server_url)
    admin = psycopg2.connect(host=parts.hostname, port=parts.port or 5432, user=parts.username or "postgres",
                             password=parts.password, dbname=parts.path.lstrip("/") or "postgres")
    admin.autocommit = True
    return admin


def ensure_pg_database(server_url: str, name: str) -> bool:
    """Create the bench database when missing; True when it already exists."""
    admin = _pg_admin(server_url)
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        exists = cur.fetchone() is not None
        if not exists:
            cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return exists


def drop_pg_database(server_url: str, name: str) -> None:
    admin = _pg_admin(server_url)
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@contextlib.contextmanager
def opened(url: str) -> Iterator[None]:
    """The store at url, bound to the models for the with block."""
    from mjctl.config import load_settings
    from mjctl.db import open_store, unbind

    open_store(load_settings(None, {("database", "url"): url}))
    try:
        yield
    finally:
        unbind()


def seeded_count(url: str) -> int:
    from mjctl.models import TaskCount

    with opened(url):
        row = TaskCount.get_or_none(TaskCount.channel_id == 0)
        return row.n if row else 0


def prepare(url: str, tasks: int, users: int, exists: bool) -> None:
    from seed import seed

    if exists and seeded_count(url) == tasks:
        return
    if exists:
        raise SystemExit(f"{url} holds another data set; drop it (or pass another --tasks) and run again")
    print(f"seeding {tasks:,} tasks over {users:,} users into {url} …", file=sys.stderr)
    began = time.perf_counter()
    seed(url, tasks=tasks, users=users)
    print(f"  seeded in {time.perf_counter() - began:.0f} s", file=sys.stderr)


def tokens_for(url: str, n: int) -> tuple[list[str], list[str]]:
    """Fresh tokens (a seeded database keeps only hashes): the admin's, and one for each of n users."""
    from mjctl import accounts

    with opened(url):
        return [accounts.issue_token("admin")], [accounts.issue_token(f"user{i}") for i in range(2, 2 + n)]


def admin_cases(url: str) -> list[tuple[str, str, dict]]:
    """(name, path, query) of the admin listings, built from what the store holds: a task 45 days back
    gives the older day, its channel and its upstream id."""
    from mjctl.models import Task

    with opened(url):
        newest = Task.select(Task.id, Task.submit_time).order_by(Task.id.desc()).first()
        back = newest.submit_time - 45 * DAY
        task = Task.select().where(Task.submit_time <= back).order_by(Task.submit_time.desc()).first()
    day = {"start_timestamp": task.submit_time - DAY // 2, "end_timestamp": task.submit_time + DAY // 2}
    return [
        ("/api/mj/?channel_id", "/api/mj/", {"channel_id": task.channel_id}),
        ("/api/mj/ one day, the newest", "/api/mj/",
         {"start_timestamp": newest.submit_time - DAY, "end_timestamp": newest.submit_time}),
        ("/api/mj/ one day, 45 days back", "/api/mj/", day),
        ("/api/mj/?mj_id", "/api/mj/", {"mj_id": task.mj_id}),
        ("/api/mj/ channel, day, mj_id", "/api/mj/", {"channel_id": task.channel_id, "mj_id": task.mj_id, **day}),
        ("/api/mj/?p=2000", "/api/mj/", {"p": 2000}),
    ]


def expected_total(url: str, query: dict, user: str | None = None) -> int:
    """The matches of a listing's query, counted by a plain COUNT(*) of their own."""
    from mjctl.models import Task, User

    with opened(url):
        where = []
        if user is not None:
            where.append(Task.user_id == User.get(User.name == user).id)
        if "channel_id" in query:
            where.append(Task.channel_id == query["channel_id"])
        if "mj_id" in query:
            where.append(Task.mj_id == query["mj_id"])
        if "start_timestamp" in query:
            where.append(Task.submit_time >= query["start_timestamp"])
        if "end_timestamp" in query:
            where.append(Task.submit_time <= query["end_timestamp"])
        counted = Task.select()
        for condition in where:
            counted = counted.where(condition)
        return counted.count()


def serve(url: str, workers: int, threads: int, tmp: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MJCTL_DATABASE_URL": url, "MJCTL_SERVER_SECRET": "bench", "MJCTL_LOG_LEVEL": "warning",
           "MJCTL_DATABASE_POOL_SIZE": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "mjctl", "serve", "--no-poll", "--port", str(port),
                             "--threads", str(threads), "--workers", str(workers)], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mjctl serve failed:\n{proc.stderr.read()}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("mjctl serve did not start")


def measure(url: str, workers: int, cases: list[tuple], args) -> dict:
    """Each case against one `mjctl serve` of the store at url, every case in turn in each of args.rounds
    rounds (medians of rps, p50 and p99 over them: a shared machine drifts); also checks each total."""
    from urllib.parse import urlencode

    from api import run_case

    rounds: list[dict] = []
    totals = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = serve(url, workers, args.threads, tmp)
        try:
            for _ in range(args.rounds):
                rounds.append({name: run_case(base, path + ("?" + urlencode(query) if query else ""), tokens, args)
                               for name, path, query, tokens, _ in cases})
            for name, path, query, tokens, total in cases:
                if total is not None:
                    answer = httpx.get(base + path, params=query, headers={"Authorization": f"Bearer {tokens[0]}"},
                                       timeout=60)
                    totals[name] = answer.json()["data"]["total"] == total
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {name: {**{key: statistics.median(r[name][key] for r in rounds) for key in ("rps", "p50", "p99")},
                   "errors": sum(r[name]["errors"] for r in rounds), "total_ok": totals.get(name)}
            for name, *_ in cases}


def store_unfinished(settings, sim: str, ids_by_channel: list[list[str]], users: int) -> list[int]:
    """A channel row per list of ids, all pointing at the simulator, and its ids as unfinished charged tasks
    spread over the seeded users; returns the channel ids."""
    from poll import SECRET

    from mjctl import channels
    from mjctl.db import connection, write_tx
    from mjctl.models import Task

    with connection():
        added = [channels.add_channel(settings, f"scale-sim{c}", sim, SECRET).id for c in range(len(ids_by_channel))]
        now = int(time.time())
        rows = [{"user_id": 2 + n % (users - 1), "channel_id": added[c], "mj_id": mj_id, "status": "SUBMITTED",
                 "progress": "0%", "quota": 1000, "unfinished": 1, "submit_time": now}
                for c, ids in enumerate(ids_by_channel) for n, mj_id in enumerate(ids)]
        # A transaction per 2,000 rows: the count trigger bumps one counter row per task, and within one
        # transaction PostgreSQL walks all of that row's versions for each bump (100,000 rows took minutes).
        for i in range(0, len(rows), 2000):
            with write_tx():
                Task.insert_many(rows[i:i + 2000]).execute()
    return added


def remove_unfinished(channel_ids: list[int]) -> None:
    """Delete the channels store_unfinished added, and their tasks, 2,000 a transaction (the count trigger,
    as in store_unfinished); then VACUUM ANALYZE on PostgreSQL, or the dead rows stay at the newest end of
    the indexes, where every listing begins, until autovacuum comes (after 2 million at ten million)."""
    from mjctl.db import database, is_sqlite, write_tx
    from mjctl.models import Channel, Task

    ids = [i for (i,) in Task.select(Task.id).where(Task.channel_id.in_(channel_ids)).tuples()]
    for i in range(0, len(ids), 2000):
        with write_tx():
            Task.delete().where(Task.id.in_(ids[i:i + 2000])).execute()
    with write_tx():
        Channel.delete().where(Channel.id.in_(channel_ids)).execute()
    if not is_sqlite():
        database.execute_sql("VACUUM ANALYZE task")


def poll_at_scale(url: str, args, upstream: tuple[str, list[list[str]]] | None = None) -> dict:
    """The idle cycle on the seeded store, then one poller over args.unfinished tasks held by a
    simulator (upstream: its URL and ids by channel, else one is started and seeded here): steady cycles
    against the floor of the same requests. The tasks are deleted afterwards."""
    from poll import floor, seeded_upstream

    from mjctl.config import load_settings
    from mjctl.db import connection, open_store, unbind
    from mjctl.poller import poll_once

    channels = 4
    settings = load_settings(None, {("database", "url"): url, ("server", "secret"): "bench-secret",
                                    ("poller", "batch_size"): args.batch_size, ("poller", "concurrency"): channels,
                                    ("poller", "task_timeout"): 86400})
    open_store(settings)
    out: dict = {}
    try:
        with connection():
            idle = []
            for _ in range(200):
                began = time.perf_counter()
                assert poll_once(settings).message == "nothing unfinished"
                idle.append(time.perf_counter() - began)
        out["idle_ms"] = statistics.median(idle) * 1000
        print(f"storing {args.unfinished:,} unfinished tasks held by a simulator …", file=sys.stderr)
        held = (contextlib.nullcontext((*upstream, None)) if upstream is not None
                else seeded_upstream(args.unfinished, channels, "mjctl-bench-scale-"))
        with held as (sim, ids_by_channel, _):
            # No ANALYZE: the statistics are those of a store where nothing was unfinished, as right after a
            # burst of submissions (the apply path's updates find their rows by id all the same).
            added = store_unfinished(settings, sim, ids_by_channel, args.users)
            try:
                floors, cycles, skipped, cpu = [], [], [], []
                for _ in range(args.poll_rounds):
                    floors.append(floor([sim] * channels, ids_by_channel, args.batch_size)[0])
                    cpu_before = time.process_time()
                    with connection():
                        summary = poll_once(settings)
                    cpu.append(time.process_time() - cpu_before)
                    assert summary.checked == args.unfinished, summary.to_dict()
                    cycles.append(summary.duration)
                    skipped.append(summary.skipped)
            finally:
                if upstream is None:  # poll_only drops its stores whole
                    with connection():
                        remove_unfinished(added)
        out.update(floor_ms=min(floors) * 1000, first_ms=cycles[0] * 1000, steady_ms=min(cycles[2:]) * 1000,
                   floors_ms=[round(f * 1000) for f in floors], cycles_ms=[round(c * 1000) for c in cycles],
                   skipped=skipped, cpu_ms=[round(c * 1000) for c in cpu])
    finally:
        unbind()
    return out


def print_poll(polled: dict, unfinished: int, among: str) -> bool:
    """Print the poll figures of poll_at_scale; True when both targets are met."""
    ratio = polled["steady_ms"] / polled["floor_ms"]
    print(f"idle poll cycle on {among}: median {polled['idle_ms']:.2f} ms (target < 5 ms): "
          f"{'ok' if polled['idle_ms'] < 5 else 'MISSED'}")
    print(f"poll cycle over {unfinished:,} unfinished tasks among {among}: floor (bare httpx, same "
          f"requests) {polled['floor_ms']:.0f} ms; first cycle (writes every task) {polled['first_ms']:.0f} ms; "
          f"steady cycle {polled['steady_ms']:.0f} ms = {ratio:.2f}x the floor (target <= 1.5x): "
          f"{'ok' if ratio <= 1.5 else 'MISSED'}")
    print(f"  floors {polled['floors_ms']} ms; cycles {polled['cycles_ms']} ms (CPU {polled['cpu_ms']} ms); "
          f"reports skipped by the memo {polled['skipped']}")
    return polled["idle_ms"] < 5 and ratio <= 1.5


def poll_only(args) -> None:
    """The poll cycle over args.unfinished tasks on fresh stores holding only args.users users."""
    from poll import seeded_upstream
    from seed import seed

    name = "mjctl_bench_poll"
    stores = [("PostgreSQL", pg_database_url(args.pg_url, name))]
    workdir = tempfile.mkdtemp(prefix="mjctl-bench-poll-only-")
    if not args.no_sqlite:
        stores.append(("SQLite", f"sqlite:///{workdir}/poll.db"))
    failures = []
    try:
        drop_pg_database(args.pg_url, name)
        ensure_pg_database(args.pg_url, name)
        print(f"seeding a simulator with {args.unfinished:,} tasks …", file=sys.stderr)
        with seeded_upstream(args.unfinished, 4, "mjctl-bench-scale-") as (sim, ids_by_channel, _):
            for store, url in stores:
                seed(url, tasks=0, users=args.users, token_users=0)
                polled = poll_at_scale(url, args, (sim, ids_by_channel))
                print(f"\n{store}:")
                if not print_poll(polled, args.unfinished, "a store of nothing else"):
                    failures.append(store)
    finally:
        drop_pg_database(args.pg_url, name)
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    print("all targets met" if not failures else "missed: " + "; ".join(failures))


def sharing_section(args) -> None:
    from poll import run_pollers

    print()
    results = {n: run_pollers(n, tasks=args.poll_tasks) for n in (1, 3)}
    for n, r in results.items():
        print(f"poll cycle, {args.poll_tasks:,} unfinished tasks, {n} poller(s): {r['requests']} upstream requests "
              f"(one poller needs {r['one_poller_requests']}), {r['pollers_with_work']} found work, "
              f"round {r['wall'] * 1000:.0f} ms")
    one, three = results[1], results[3]
    verdict = "ok" if three["requests"] <= one["requests"] else "MISSED"
    print(f"upstream requests, 3 pollers vs 1: {three['requests']} vs {one['requests']} (target <=): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg-url", default=os.environ.get("MJCTL_TEST_POSTGRES_URL",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--pg-database", default=None,
                        help="default: mjctl_bench_scale, or mjctl_bench_scale_<tasks> for other sizes")
    parser.add_argument("--drop", action="store_true", help="drop the PostgreSQL database at the end")
    parser.add_argument("--sqlite", default=os.path.join(tempfile.gettempdir(), "mjctl-bench-api-1m.db"))
    parser.add_argument("--no-sqlite", action="store_true", help="no SQLite case (it needs its own seeded file)")
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--workers", default="1,2", help="PostgreSQL worker processes to measure, e.g. 1,2")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--unfinished", type=int, default=0,
                        help="unfinished tasks for the poll cycle on the PostgreSQL store (0: skip)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--poll-rounds", type=int, default=5, help="floor/cycle pairs (at least 3)")
    parser.add_argument("--poll-tasks", type=int, default=10_000)
    parser.add_argument("--skip-poll", action="store_true", help="skip the 1 vs 3 pollers round")
    parser.add_argument("--poll-only", action="store_true",
                        help="only the poll cycle over --unfinished tasks (default 100,000), on fresh stores")
    args = parser.parse_args()
    if (args.unfinished or args.poll_only) and args.poll_rounds < 3:
        raise SystemExit("--poll-rounds must be at least 3")
    if args.poll_only:
        args.unfinished = args.unfinished or 100_000
        args.users = min(args.users, 1000)
        poll_only(args)
        return

    name = args.pg_database or ("mjctl_bench_scale" if args.tasks == 1_000_000 else f"mjctl_bench_scale_{args.tasks}")
    pg_url = pg_database_url(args.pg_url, name)
    prepare(pg_url, args.tasks, args.users, ensure_pg_database(args.pg_url, name))
    sqlite_url = None if args.no_sqlite else f"sqlite:///{args.sqlite}"
    if sqlite_url:
        prepare(sqlite_url, args.tasks, args.users, Path(args.sqlite).exists())
    load = SimpleNamespace(connections=args.connections, seconds=args.seconds, warmup=args.warmup,
                           threads=args.threads, rounds=args.rounds)

    def cases_for(url: str, admin_too: bool) -> list:
        admin, users = tokens_for(url, args.connections)
        cases = [("GET /healthz (floor)", "/healthz", {}, [admin[0]], None),
                 ("/api/mj/self", "/api/mj/self", {}, users, expected_total(url, {}, user="user2"))]
        if admin_too:
            cases += [(case, path, query, admin, expected_total(url, query)) for case, path, query in admin_cases(url)]
        return cases

    stores = ([("SQLite, 1 process", sqlite_url, 1)] if sqlite_url else []) + [
        (f"PostgreSQL, {n} worker{'s' if n > 1 else ''}", pg_url, n) for n in map(int, args.workers.split(","))]
    results = {}
    for store, url, workers in stores:
        pg = url == pg_url
        cases = cases_for(url, admin_too=pg and workers == 1)
        # /api/mj/self's total is that of user2, the first connection's user: the check reads as that user.
        results[store] = (cases, measure(url, workers, cases, load))

    reference = results[stores[0][0]][1]["/api/mj/self"]
    print(f"{args.tasks:,} tasks, {args.users:,} users; {args.connections} connections, {args.threads} threads per "
          f"worker, {args.seconds:g} s per case, medians of {args.rounds} rounds; {os.cpu_count()} CPUs shared by "
          f"the database, the server and the load generator; x self: /api/mj/self on {stores[0][0]}")
    header = (f"{'store':22} {'case':32} {'rps':>7} {'x floor':>7} {'x self':>7} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'errors':>6} {'total':>6}")
    print(header)
    print("-" * len(header))
    failures = []
    for store, _, _ in stores:
        cases, measured = results[store]
        floor_rps = measured[cases[0][0]]["rps"]
        for case, *_ in cases:
            r = measured[case]
            total = {True: "exact", False: "WRONG"}.get(r.get("total_ok"), "")
            print(f"{store:22} {case:32} {r['rps']:7.0f} {r['rps'] / floor_rps:7.2f} "
                  f"{r['rps'] / reference['rps']:7.2f} {r['p50']:7.2f} {r['p99']:7.2f} {r['errors']:6d} {total:>6}")
            if r.get("total_ok") is False or r["errors"]:
                failures.append(f"{store} {case}: total {total}, {r['errors']} errors")
    pg_one = results.get("PostgreSQL, 1 worker", ([], {}))[1]
    print()
    for case, limit in (("/api/mj/self", 50), ("/api/mj/ channel, day, mj_id", 100)):
        if case in pg_one:
            p99 = pg_one[case]["p99"]
            print(f"PostgreSQL, 1 worker, {case}: p99 {p99:.1f} ms (target < {limit} ms): "
                  f"{'ok' if p99 < limit else 'MISSED'}")
            if p99 >= limit:
                failures.append(f"{case} p99 {p99:.1f} ms")

    if args.unfinished:
        print()
        if not print_poll(poll_at_scale(pg_url, args), args.unfinished, f"{args.tasks:,} tasks"):
            failures.append("poll cycle")
    if not args.skip_poll:
        sharing_section(args)
    if args.drop:
        drop_pg_database(args.pg_url, name)
        print(f"\ndropped the PostgreSQL database {name}")
    print("all targets met" if not failures else "missed: " + "; ".join(failures))


if __name__ == "__main__":
    os.environ.setdefault("MJCTL_LOG_LEVEL", "warning")
    main()
