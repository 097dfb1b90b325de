"""HTTP API throughput and latency on a 1,000,000-task store over 10,000 users (a SQLite file, or any database
bench/seed.py filled, with --url), on mjctl's server and on cheroot in the same run.

    python bench/api.py [--db PATH | --url URL] [--tasks N] [--users N] [--seconds 4] [--rounds 3]
                        [--connections 16] [--loadgen-procs 1] [--servers new,cheroot]

The app (create_app) runs in this process behind each server in turn: mjctl's (granian and the bridge of
mjctl.httpserver, 16 API threads) and cheroot (16 threads, configured as mjctl ran it before; bench/servers.py).
The load generator runs in separate processes (this file with --loadgen: asyncio, raw keep-alive HTTP/1.1,
one request in flight per connection; --loadgen-procs splits the connections over several processes, for
when one process, not the server, is the limit). Every case is also reported as a ratio against a bare
JSON endpoint (GET /_bench/bare, added only here through create_app's `extra` installers) measured by the
same server in the same round: each round measures every case on each server in turn (the floor first),
and the figures printed are the medians over the rounds (a shared machine drifts within a run).

Deep pages (p=2000, 40,000 matches down) are measured twice: as served, from an anchor (mjctl.anchors), and
through GET /_bench/offset, the same listing read with OFFSET.

Targets: the bare floor on the new server >= 3x cheroot's, /api/mj/self >= 2x cheroot's, p99 < 50 ms in
every case, and each deep page no more than 1.3x the latency (p50 and p99) of its filter's page 1. The
access log is switched off for the run (it costs the same for every case, bare included).
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
    does once keep_alive_conn_limit idle connections are parked, unless lifted as bench/servers.py does; any
    server may close an idle keep-alive connection) we reconnect, as a browser would, and the reconnection
    counts in the latency of the next request."""
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
    if spec.get("raw"):
        return {"latencies": latencies, "seconds": spec["seconds"], **counts}
    return summarize([latencies], spec["seconds"], [counts])


def summarize(latency_lists: list[list[float]], seconds: float, counts: list[dict]) -> dict:
    latencies = sorted(x for part in latency_lists for x in part)
    n = len(latencies)
    totals = {key: sum(c[key] for c in counts) for key in ("ok", "errors", "reconnects")}
    if not n:
        return {"rps": 0.0, "p50": float("inf"), "p99": float("inf"), "requests": 0, **totals}
    return {"rps": n / seconds, "p50": latencies[n // 2] * 1000, "p99": latencies[int(n * 0.99)] * 1000,
            "requests": n, **totals}


def loadgen_main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(_load(spec))))


# --- the benchmark ----------------------------------------------------------------------------------


def run_case(url: str, path: str, tokens: list[str | None], args) -> dict:
    """Measure GET `path` on `url`: `args.connections` connections over `args.loadgen_procs` processes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    procs = max(1, min(getattr(args, "loadgen_procs", 1), args.connections))
    specs = []
    for i in range(procs):
        share = args.connections // procs + (1 if i < args.connections % procs else 0)
        mine = [tokens[(i + procs * k) % len(tokens)] for k in range(share)] or tokens
        specs.append({"host": host, "port": int(port), "path": path, "tokens": mine, "connections": share,
                      "seconds": args.seconds, "warmup": args.warmup, "raw": procs > 1})
    running = [subprocess.Popen([sys.executable, __file__, "--loadgen"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in specs]
    outputs = [proc.communicate(json.dumps(spec)) for proc, spec in zip(running, specs)]
    for proc, (_, err) in zip(running, outputs):
        if proc.returncode != 0:
            raise SystemExit(f"the load generator failed on {path}:\n{err}")
    results = [json.loads(out) for out, _ in outputs]
    if procs == 1:
        return results[0]
    return summarize([r["latencies"] for r in results], args.seconds, results)


def install_bare(app, ctx) -> None:
    from mjctl.server.app import ok

    @app.get("/_bench/bare", db=False)
    def bare():
        return ok({"items": [], "total": 0, "page": 1, "page_size": 20})


def install_offset_listing(app, ctx) -> None:
    """GET /_bench/offset: GET /api/mj/ as it is, except that every page is read with OFFSET, never from an
    anchor (mjctl.anchors): the deep-page path without anchors, measured beside the one with them."""
    import bottle

    from mjctl.server.api import read_listing
    from mjctl.server.app import ok
    from mjctl.server.auth import authenticate_request, require_admin
    from mjctl.tasks import list_tasks, page_envelope

    @app.get("/_bench/offset")
    def offset_listing():
        require_admin(authenticate_request(bottle.request))
        filters, page, page_size = read_listing(admin=True)
        listed = list_tasks(filters, page, page_size, anchored=False)
        return ok(page_envelope(listed, admin=True, image_url=ctx.image_url))


#: (deep page, its page 1, the deep page read with OFFSET): the deep-page cases and what they are held to.
DEEP_CASES = (("/api/mj/?p=2000", "/api/mj/ page 1", "/api/mj/?p=2000, OFFSET"),
              ("/api/mj/?channel_id=2&p=2000", "/api/mj/?channel_id=2", "/api/mj/?channel_id=2&p=2000, OFFSET"))
DEEP_TARGET = 1.3


def default_db(tasks: int) -> str:
    name = "1m" if tasks == 1_000_000 else str(tasks)
    return os.path.join(tempfile.gettempdir(), f"mjctl-bench-api-{name}.db")


def open_bench_store(args, overrides: dict | None = None):
    """The seeded store (seeding a SQLite file first when it is missing), opened with bench settings."""
    from mjctl.config import load_settings
    from mjctl.db import open_store

    url = args.url or f"sqlite:///{args.db}"
    if not args.url and not Path(args.db).exists():
        from seed import seed

        print(f"seeding {args.tasks:,} tasks over {args.users:,} users into {args.db} …", file=sys.stderr)
        seed(url, tasks=args.tasks, users=args.users)
    values = {("database", "url"): url, ("server", "secret"): "bench", ("server", "threads"): args.threads}
    values.update(overrides or {})
    settings = load_settings(None, values)
    open_store(settings)
    return settings


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help="default: mjctl-bench-api-<tasks>.db in the temp folder")
    parser.add_argument("--url", default=None,
                        help="a seeded database instead of the SQLite file (bench/seed.py --url URL)")
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--loadgen-procs", type=int, default=1,
                        help="load generator processes sharing the connections")
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--servers", default="new,cheroot", help="which servers, in order (new, cheroot)")
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main()
        return
    args.db = args.db or default_db(args.tasks)

    import servers

    from mjctl import accounts
    from mjctl.server import create_app

    kinds = [k for k in args.servers.split(",") if k]
    settings = open_bench_store(args)
    # Fresh tokens each run (a seeded database keeps only hashes): the admin, and one user per connection.
    admin = [accounts.issue_token("admin")]
    users = [accounts.issue_token(f"user{n}") for n in range(2, 2 + args.connections)]
    now = int(time.time())
    logging.getLogger("mjctl.access").setLevel(logging.WARNING)

    cases = [
        ("bare JSON endpoint (floor)", "/_bench/bare", [None]),
        ("/api/mj/self page 1", "/api/mj/self", users),
        ("/api/mj/self time range (30 d)", f"/api/mj/self?start_timestamp={now - 30 * 86400}&end_timestamp={now}",
         users),
        ("/api/mj/ page 1", "/api/mj/", admin),
        ("/api/mj/?channel_id=2", "/api/mj/?channel_id=2", admin),
        ("/api/mj/?p=2000", "/api/mj/?p=2000", admin),
        ("/api/mj/?p=2000, OFFSET", "/_bench/offset?p=2000", admin),
        ("/api/mj/?channel_id=2&p=2000", "/api/mj/?channel_id=2&p=2000", admin),
        ("/api/mj/?channel_id=2&p=2000, OFFSET", "/_bench/offset?channel_id=2&p=2000", admin),
    ]
    app = create_app(settings, extra=[install_bare, install_offset_listing])
    rounds: list[dict] = []
    running = {}
    try:
        for kind in kinds:  # both up at once (an idle server costs nothing), measured case by case in turn
            running[kind] = servers.start(kind, settings, app)
        for _ in range(args.rounds):
            measured: dict = {kind: {} for kind in kinds}
            for name, path, tokens in cases:
                for kind in kinds:
                    measured[kind][name] = run_case(running[kind].url, path, tokens, args)
            rounds.append(measured)
    finally:
        for server in running.values():
            server.stop()
    floor_name = cases[0][0]

    def median_of(kind: str, name: str, key: str, relative: bool = False) -> float:
        return statistics.median(r[kind][name][key] / (r[kind][floor_name][key] if relative else 1)
                                 for r in rounds)

    def vs_cheroot(name: str) -> float:
        return statistics.median(r["new"][name]["rps"] / r["cheroot"][name]["rps"] for r in rounds)

    backend = args.url.split(":")[0] if args.url else "SQLite"
    print(f"{args.tasks:,} tasks, {args.users:,} users, {backend}; {args.connections} connections from "
          f"{args.loadgen_procs} load generator process(es), {args.threads} server threads, {args.seconds:g} s per "
          f"case, median of {args.rounds} rounds; {os.cpu_count()} CPUs shared by server and load generator")
    header = (f"{'server':8} {'case':40} {'rps':>7} {'x bare':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
              f"{'reconn':>6} {'new/cheroot':>11}")
    print(header)
    print("-" * len(header))
    failures = []
    results: dict = {}
    both = "new" in kinds and "cheroot" in kinds
    for kind in kinds:
        for name, _, _ in cases:
            r = results[kind, name] = {key: median_of(kind, name, key) for key in ("rps", "p50", "p99")}
            errors = sum(rnd[kind][name]["errors"] for rnd in rounds)
            reconnects = sum(rnd[kind][name]["reconnects"] for rnd in rounds)
            ratio = f"{vs_cheroot(name):11.2f}" if both and kind == "new" else ""
            print(f"{kind:8} {name:40} {r['rps']:7.0f} {median_of(kind, name, 'rps', True):7.2f} {r['p50']:7.2f} "
                  f"{r['p99']:7.2f} {errors:6d} {reconnects:6d} {ratio}")
            if kind == "new" and (r["p99"] >= 50 or errors):
                failures.append(f"{name} p99 {r['p99']:.1f} ms, {errors} errors")
    print()
    if "new" in kinds:
        print(f"new: p99 < 50 ms in every case: {'ok' if not any('p99' in f for f in failures) else 'MISSED'}")
        for deep_name, first_name, offset_name in DEEP_CASES:
            first = results["new", first_name]
            ratios = {name: max(results["new", name]["p50"] / first["p50"], results["new", name]["p99"] / first["p99"])
                      for name in (deep_name, offset_name)}
            good = ratios[deep_name] <= DEEP_TARGET
            print(f"new: {deep_name} against page 1, the worse of p50 and p99: {ratios[deep_name]:.2f}x "
                  f"(target <= {DEEP_TARGET:g}x): {'ok' if good else 'MISSED'}; read with OFFSET "
                  f"{ratios[offset_name]:.2f}x")
            if not good:
                failures.append(f"{deep_name} latency {ratios[deep_name]:.2f}x page 1")
    if both:
        for name, target in ((floor_name, 3.0), ("/api/mj/self page 1", 2.0)):
            ratio = vs_cheroot(name)
            good = ratio >= target
            print(f"new/cheroot, {name}: {ratio:.2f}x (target >= {target:g}x): {'ok' if good else 'MISSED'}")
            if not good:
                failures.append(f"{name} {ratio:.2f}x cheroot")
    print("all targets met" if not failures else "missed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
