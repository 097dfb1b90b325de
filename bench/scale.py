"""Scaling out: /api/mj/self on PostgreSQL with 1 and 2 worker processes, against SQLite in one process.

    python bench/scale.py [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--tasks 1000000]
                          [--seconds 5] [--connections 16] [--threads 16]

1. Seeds 1,000,000 tasks over 10,000 users (bench/seed.py) into a SQLite file and into a PostgreSQL
   database `mjctl_bench_scale` on the server of --pg-url; both are kept and reused by later runs.
2. Runs `mjctl serve --no-poll` as a real process for each case (SQLite with 1 worker, PostgreSQL with
   --workers 1 and --workers 2; same threads; pool_size = threads) and drives GET /api/mj/self with
   bench/api.py's load generator (a separate process, one request in flight per connection, 16 users).
3. Prints each case's throughput and latency, and the ratios against the SQLite single-process figure
   measured in the same run.
4. The poll cycle for 10,000 unfinished tasks with 1 and 3 pollers (upstream requests and wall time),
   through bench/poll.py's run_pollers.

The access log is off in every case (it costs the same everywhere).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse, urlunparse

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PG_DATABASE = "mjctl_bench_scale"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_database_url(server_url: str) -> str:
    return urlunparse(urlparse(server_url)._replace(path="/" + PG_DATABASE))


def ensure_pg_database(server_url: str) -> bool:
    """Create the bench database when missing; True when it already exists."""
    import psycopg2

    parts = urlparse(server_url)
    admin = psycopg2.connect(host=parts.hostname, port=parts.port or 5432, user=parts.username or "postgres",
                             password=parts.password, dbname=parts.path.lstrip("/") or "postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,))
        exists = cur.fetchone() is not None
        if not exists:
            cur.execute(f'CREATE DATABASE "{PG_DATABASE}"')
    admin.close()
    return exists


def seeded_count(url: str) -> int:
    from mjctl.config import load_settings
    from mjctl.db import open_store, unbind
    from mjctl.models import TaskCount

    open_store(load_settings(None, {("database", "url"): url}))
    try:
        row = TaskCount.get_or_none(TaskCount.channel_id == 0)
        return row.n if row else 0
    finally:
        unbind()


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


def tokens_for(url: str, n: int) -> list[str]:
    """Fresh tokens for n users (a seeded database keeps only hashes)."""
    from mjctl import accounts
    from mjctl.config import load_settings
    from mjctl.db import open_store, unbind

    open_store(load_settings(None, {("database", "url"): url}))
    try:
        return [accounts.issue_token(f"user{i}") for i in range(2, 2 + n)]
    finally:
        unbind()


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


def measure(url: str, workers: int, tokens: list[str], args) -> dict:
    from api import run_case

    with tempfile.TemporaryDirectory() as tmp:
        proc, base = serve(url, workers, args.threads, tmp)
        try:
            return run_case(base, "/api/mj/self", tokens, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def poll_section(args) -> None:
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
    parser.add_argument("--sqlite", default=os.path.join(tempfile.gettempdir(), "mjctl-bench-api-1m.db"))
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--poll-tasks", type=int, default=10_000)
    parser.add_argument("--skip-poll", action="store_true")
    args = parser.parse_args()

    sqlite_url = f"sqlite:///{args.sqlite}"
    prepare(sqlite_url, args.tasks, args.users, Path(args.sqlite).exists())
    pg_url = pg_database_url(args.pg_url)
    prepare(pg_url, args.tasks, args.users, ensure_pg_database(args.pg_url))
    load = SimpleNamespace(connections=args.connections, seconds=args.seconds, warmup=args.warmup,
                           threads=args.threads)

    cases = [("SQLite, 1 process (floor)", sqlite_url, 1), ("PostgreSQL, 1 worker", pg_url, 1),
             ("PostgreSQL, 2 workers", pg_url, 2)]
    results = {}
    for name, url, workers in cases:
        results[name] = measure(url, workers, tokens_for(url, args.connections), load)
    floor = results[cases[0][0]]
    print(f"GET /api/mj/self, {args.tasks:,} tasks, {args.users:,} users; {args.connections} connections, "
          f"{args.threads} threads per worker, {args.seconds:g} s per case, {os.cpu_count()} CPUs")
    header = f"{'case':28} {'rps':>7} {'x SQLite':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
    print(header)
    print("-" * len(header))
    for name, _, _ in cases:
        r = results[name]
        print(f"{name:28} {r['rps']:7.0f} {r['rps'] / floor['rps']:8.2f} {r['p50']:7.2f} {r['p99']:7.2f} "
              f"{r['errors']:6d}")
    if not args.skip_poll:
        poll_section(args)


if __name__ == "__main__":
    main()
