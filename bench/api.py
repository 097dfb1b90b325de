"""HTTP API throughput and latency on a 1,000,000-task SQLite store over 10,000 users.

    python bench/api.py [--db PATH] [--tasks N] [--users N] [--seconds 4] [--rounds 3] [--connections 16]

The server (create_app on cheroot, 16 threads) runs in this process; the load generator runs in a
separate process (this file with --loadgen: asyncio, raw keep-alive HTTP/1.1, one request in flight per
connection). Every case is reported as a ratio against a bare JSON endpoint (GET /_bench/bare, added
only here through create_app's `extra` installers) measured by the same server in the same run: each
round measures the floor and then every case, and the figures printed are the medians over the rounds
of each case's own figures and of its ratio to its round's floor (a shared machine drifts within a run).

Targets: /api/mj/self >= 0.5 of the bare throughput, every admin case >= 0.3, p99 < 50 ms, and p=2000
no more than 3x the latency of page 1. The access log is switched off for the run (it costs the same
for every case, bare included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


# --- the load generator (runs in its own process) -------------------------------------------------


async def _connection(host: str, port: int, request: bytes, warm_until: float, end: float, latencies: list,
                      counts: dict) -> None:
    """One client connection, one request in flight. Should the server answer Connection: close (cheroot
    does once keep_alive_conn_limit idle connections are parked; mjctl.wsgiserver lifts that limit) we
    reconnect, as a browser would, and the reconnection counts in the latency of the next request."""
    reader = writer = None
    try:
        while True:
            began = time.perf_counter()
            if began >= end:
                break
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                reader = writer = None
                counts["reconnects"] += 1
                continue
            length, close = 0, False
            for line in head.split(b"\r\n"):
                low = line.lower()
                if low.startswith(b"content-length:"):
                    length = int(low[15:])
                elif low.startswith(b"connection:") and b"close" in low:
                    close = True
            await reader.readexactly(length)
            done = time.perf_counter()
            if close:
                writer.close()
                reader = writer = None
                counts["reconnects"] += 1
            if began >= warm_until:
                latencies.append(done - began)
                counts["ok" if head[9:12] == b"200" else "errors"] += 1
    finally:
        if writer is not None:
            writer.close()


async def _load(spec: dict) -> dict:
    now = time.perf_counter()
    warm_until, end = now + spec["warmup"], now + spec["warmup"] + spec["seconds"]
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0, "reconnects": 0}
    requests = [
        (f"GET {spec['path']} HTTP/1.1\r\nHost: {spec['host']}:{spec['port']}\r\n"
         + (f"Authorization: Bearer {token}\r\n" if token else "")
         + "Accept: application/json\r\n\r\n").encode()
        for token in spec["tokens"]
    ]
    await asyncio.gather(*(
        _connection(spec["host"], spec["port"], requests[i % len(requests)], warm_until, end, latencies, counts)
        for i in range(spec["connections"])
    ))
    latencies.sort()
    n = len(latencies)
    return {"rps": n / spec["seconds"], "p50": latencies[n // 2] * 1000, "p99": latencies[int(n * 0.99)] * 1000,
            "requests": n, **counts}


def loadgen_main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(_load(spec))))


# --- the benchmark ----------------------------------------------------------------------------------


def run_case(url: str, path: str, tokens: list[str | None], args) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    spec = {"host": host, "port": int(port), "path": path, "tokens": tokens, "connections": args.connections,
            "seconds": args.seconds, "warmup": args.warmup}
    proc = subprocess.run([sys.executable, __file__, "--loadgen"], input=json.dumps(spec), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the load generator failed on {path}:\n{proc.stderr}")
    return json.loads(proc.stdout)


def install_bare(app, ctx) -> None:
    from mjctl.server.app import ok

    @app.get("/_bench/bare", db=False)
    def bare():
        return ok({"items": [], "total": 0, "page": 1, "page_size": 20})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "mjctl-bench-api-1m.db"))
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main()
        return

    from mjctl import accounts
    from mjctl.config import load_settings
    from mjctl.db import open_store
    from mjctl.server import create_app
    from mjctl.wsgiserver import ServerThread

    url = f"sqlite:///{args.db}"
    if not Path(args.db).exists():
        from seed import seed

        print(f"seeding {args.tasks} tasks over {args.users} users into {args.db} …", file=sys.stderr)
        seed(url, tasks=args.tasks, users=args.users)
    settings = load_settings(None, {("database", "url"): url, ("server", "secret"): "bench",
                                    ("server", "threads"): args.threads})
    open_store(settings)
    # Fresh tokens each run (a seeded database keeps only hashes): the admin, and one user per connection.
    admin = [accounts.issue_token("admin")]
    users = [accounts.issue_token(f"user{n}") for n in range(2, 2 + args.connections)]
    now = int(time.time())
    logging.getLogger("mjctl.access").setLevel(logging.WARNING)

    cases = [
        ("bare JSON endpoint (floor)", "/_bench/bare", [None], None),
        ("/api/mj/self page 1", "/api/mj/self", users, 0.5),
        ("/api/mj/self time range (30 d)", f"/api/mj/self?start_timestamp={now - 30 * 86400}&end_timestamp={now}",
         users, 0.5),
        ("/api/mj/ page 1", "/api/mj/", admin, 0.3),
        ("/api/mj/?channel_id=2", "/api/mj/?channel_id=2", admin, 0.3),
        ("/api/mj/?p=2000", "/api/mj/?p=2000", admin, 0.3),
    ]
    app = create_app(settings, extra=[install_bare])
    rounds: list[dict] = []
    with ServerThread(app, threads=args.threads) as server:
        for _ in range(args.rounds):
            rounds.append({name: run_case(server.url, path, tokens, args) for name, path, tokens, _ in cases})
    floor_name = cases[0][0]

    def median_of(name: str, key: str, relative: bool = False) -> float:
        values = [r[name][key] / (r[floor_name][key] if relative else 1) for r in rounds]
        return statistics.median(values)

    print(f"{args.tasks:,} tasks, {args.users:,} users, SQLite; {args.connections} connections, "
          f"{args.threads} server threads, {args.seconds:g} s per case, median of {args.rounds} rounds")
    header = (f"{'case':34} {'rps':>7} {'x bare':>7} {'p50 ms':>7} {'x bare':>7} {'p99 ms':>7} {'x bare':>7} "
              f"{'errors':>6} {'reconn':>6}  target")
    print(header)
    print("-" * len(header))
    failures = []
    results = {}
    for name, _, _, target in cases:
        r = results[name] = {key: median_of(name, key) for key in ("rps", "p50", "p99")}
        ratio = median_of(name, "rps", relative=True)
        errors = sum(rnd[name]["errors"] for rnd in rounds)
        reconnects = sum(rnd[name]["reconnects"] for rnd in rounds)
        verdict = ""
        if target is not None:
            good = ratio >= target and r["p99"] < 50 and errors == 0
            verdict = f">={target} rps, p99<50: {'ok' if good else 'MISSED'}"
            if not good:
                failures.append(name)
        print(f"{name:34} {r['rps']:7.0f} {ratio:7.2f} {r['p50']:7.2f} {median_of(name, 'p50', True):7.2f} "
              f"{r['p99']:7.2f} {median_of(name, 'p99', True):7.2f} {errors:6d} {reconnects:6d}  {verdict}")
    deep, first = results["/api/mj/?p=2000"], results["/api/mj/ page 1"]
    deep_ratio = max(deep["p50"] / first["p50"], deep["p99"] / first["p99"])
    print(f"p=2000 against page 1: p50 {deep['p50'] / first['p50']:.2f}x, p99 {deep['p99'] / first['p99']:.2f}x "
          f"(target <= 3x): {'ok' if deep_ratio <= 3 else 'MISSED'}")
    if deep_ratio > 3:
        failures.append("p=2000 latency")
    print("all targets met" if not failures else "missed: " + ", ".join(failures))


if __name__ == "__main__":
    main()
