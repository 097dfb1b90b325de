"""/api/mj/self under attack: throughput and p99 while 1,000 idle and 1,000 header-dripping connections are
open and 32 relay submissions hang on a slow upstream, against the same measurement quiet.

    python bench/hostile.py [--tasks N] [--seconds 4] [--rounds 3] [--idle 1000] [--drip 1000] [--hang 32]
                            [--drip-every 1] [--slow-seconds 5] [--header-timeout S] [--attack-cheroot]

The measurement is bench/api.py's (its load generator, its seeded store: `--tasks` picks, and seeds when
missing, the same file; a smaller --tasks makes a quick run). The store is copied to a scratch file first,
because the hanging submissions create tasks. The app runs in this process on mjctl's server (granian behind
mjctl.httpserver's bridge, [server] and [relay] limits at their defaults unless given) with a simulated
upstream whose every answer is `--slow-seconds` late. The attack runs in its own process (this file with
--attack, asyncio) so it does not take the measured client's CPU: it keeps `--idle` connections open that
send nothing, `--drip` connections that send one header line every `--drip-every` seconds and never finish,
re-opening whatever the server closes, and `--hang` submissions in flight (each re-sent when answered).

Each round measures quiet, then under attack; printed are the medians over the rounds of throughput, the
ratio hostile/quiet and p99. Targets: >= 0.7 of quiet, p99 < 100 ms. Also printed: the bare endpoint's
requests/s on the new server and on cheroot (bench/servers.py), quiet, in the same run.
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

SIM_SECRET = "bench-sim"


# --- the attack (runs in its own process) ----------------------------------------------------------------


async def _connect(host: str, port: int, stats: dict):
    """A new connection, retried (and counted) until the server accepts one."""
    while True:
        try:
            return await asyncio.open_connection(host, port)
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(0.2)


async def _idle(host: str, port: int, stats: dict) -> None:
    """A connection that never sends a byte; re-opened whenever the server closes it."""
    while True:
        reader, writer = await _connect(host, port, stats)
        stats["idle_opened"] += 1
        try:
            await reader.read(65536)  # returns once the server closes (or sends anything)
            stats["idle_closed_by_server"] += 1
        except ConnectionError:
            stats["idle_closed_by_server"] += 1
        finally:
            writer.close()


async def _drip(host: str, port: int, every: float, stats: dict) -> None:
    """A request whose head never ends: one header line every `every` seconds; re-opened when cut off."""
    while True:
        reader, writer = await _connect(host, port, stats)
        stats["drip_opened"] += 1
        closed = asyncio.ensure_future(reader.read(65536))
        try:
            writer.write(b"GET /api/mj/self HTTP/1.1\r\nHost: bench\r\n")
            n = 0
            while not closed.done():
                await asyncio.wait([closed], timeout=every)
                if closed.done():
                    break
                n += 1
                writer.write(f"X-Drip-{n}: {'d' * 32}\r\n".encode())
                await writer.drain()
                stats["drip_lines"] += 1
            stats["drip_cut_by_server"] += 1
        except ConnectionError:
            stats["drip_cut_by_server"] += 1
        finally:
            closed.cancel()
            writer.close()


async def _hang(host: str, port: int, token: str, stats: dict) -> None:
    """One submission in flight at all times: sent, answered (late), sent again."""
    body = json.dumps({"prompt": "a slow fox"}).encode()
    request = (f"POST /mj/submit/imagine HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    reader = writer = None
    while True:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            stats["submissions_sent"] += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line[15:])
            await reader.readexactly(length)
            stats[f"submissions_answered_{head[9:12].decode()}"] += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError):
            stats["submission_errors"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.2)


async def _attack(spec: dict) -> dict:
    from collections import Counter

    host, port = spec["host"], spec["port"]
    stats: Counter = Counter()
    tasks = [asyncio.ensure_future(_hang(host, port, token, stats)) for token in spec["hang_tokens"]]
    for i in range(max(spec["idle"], spec["drip"])):  # open in batches: the listen queue is finite
        if i < spec["idle"]:
            tasks.append(asyncio.ensure_future(_idle(host, port, stats)))
        if i < spec["drip"]:
            tasks.append(asyncio.ensure_future(_drip(host, port, spec["drip_every"], stats)))
        if i % 100 == 99:
            await asyncio.sleep(0.02)
    while stats["idle_opened"] < spec["idle"] or stats["drip_opened"] < spec["drip"]:
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the benchmark closes our stdin
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return dict(stats)


def attack_main() -> None:
    from servers import raise_fd_limit

    raise_fd_limit()
    spec = json.loads(sys.stdin.readline())
    print(json.dumps(asyncio.run(_attack(spec))), flush=True)


class Attack:
    """The attacking process: started, ready (every connection open), stopped (its counters returned)."""

    def __init__(self, url: str, args, hang_tokens: list[str]):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        spec = {"host": host, "port": int(port), "idle": args.idle, "drip": args.drip, "drip_every": args.drip_every,
                "hang_tokens": hang_tokens}
        self.proc = subprocess.Popen([sys.executable, __file__, "--attack"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"the attack did not start: {line!r}")

    def stop(self) -> dict:
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(timeout=60)
        return json.loads(out.strip().splitlines()[-1])


# --- the benchmark ----------------------------------------------------------------------------------------


def scratch_copy(source: str) -> str:
    """A consistent copy of the seeded SQLite store (the backup API: the WAL included)."""
    import sqlite3

    fd, path = tempfile.mkstemp(prefix="mjctl-bench-hostile-", suffix=".db")
    os.close(fd)
    src, dst = sqlite3.connect(source), sqlite3.connect(path)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return path


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> None:
    import api

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    api.add_common_arguments(parser)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--drip", type=int, default=1000)
    parser.add_argument("--drip-every", type=float, default=1.0)
    parser.add_argument("--hang", type=int, default=32)
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--header-timeout", type=float, default=None,
                        help="[server] header_timeout (default: its default)")
    parser.add_argument("--attack-cheroot", action="store_true", help="also measure cheroot under the same attack")
    parser.add_argument("--attack", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        api.loadgen_main()
        return
    if args.attack:
        attack_main()
        return

    import servers

    from mjctl import accounts, channels
    from mjctl.db import unbind
    from mjctl.server import create_app
    from mjctl.sim import run_simulator_in_thread

    servers.raise_fd_limit()
    args.db = args.db or api.default_db(args.tasks)
    api.open_bench_store(args)  # seeds when missing
    unbind()
    work = scratch_copy(args.db)
    overrides = {("poller", "request_timeout"): max(60.0, args.slow_seconds * 4)}  # submissions hang, not fail
    if args.header_timeout is not None:
        overrides["server", "header_timeout"] = args.header_timeout
    source_db, args.db = args.db, work
    sim = None
    try:
        settings = api.open_bench_store(args, overrides)
        sim = run_simulator_in_thread(threads=args.hang * 2 + 16, secret=SIM_SECRET, step_seconds=1.0,
                                      concurrency=args.hang * 2, queue_size=100_000,
                                      slow_seconds=args.slow_seconds)
        for channel in channels.list_channels():
            channels.set_enabled(channel.id, False)  # the seeded ones point at a closed port
        channels.add_channel(settings, "slow-sim", sim.url, SIM_SECRET, priority=100)
        users = [accounts.issue_token(f"user{n}") for n in range(2, 2 + args.connections)]
        first = 2 + args.connections  # users of their own: the per-user cap is not what is measured here
        hang_tokens = [accounts.issue_token(f"user{n}") for n in range(first, first + args.hang)]
        logging.getLogger("mjctl.access").setLevel(logging.WARNING)
        logging.getLogger("mjctl").setLevel(logging.WARNING)
        app = create_app(settings, extra=[api.install_bare])
        run(args, settings, app, sim, users, hang_tokens, source_db)
    finally:
        if sim is not None:
            sim.stop()
        unbind()
        for suffix in ("", "-wal", "-shm"):
            Path(work + suffix).unlink(missing_ok=True)


def run(args, settings, app, sim, users, hang_tokens, source_db) -> None:
    import api
    import servers

    new = servers.start("new", settings, app)
    cheroot = servers.CherootThread(app, threads=args.threads).start()
    bridge = new.bridge
    rounds = []
    try:
        for _ in range(args.rounds):
            r: dict = {}
            r["bare new"] = api.run_case(new.url, "/_bench/bare", [None], args)
            r["bare cheroot"] = api.run_case(cheroot.url, "/_bench/bare", [None], args)
            r["quiet"] = api.run_case(new.url, "/api/mj/self", users, args)
            sim.sim.update({"slow": 1.0})
            attack = Attack(new.url, args, hang_tokens)
            try:
                wait_for(lambda: bridge.upstream_in_flight >= args.hang, 30, f"{args.hang} submissions in flight")
                r["in flight before"] = bridge.upstream_in_flight
                r["hostile"] = api.run_case(new.url, "/api/mj/self", users, args)
                r["in flight after"] = bridge.upstream_in_flight
            finally:
                r["attack"] = attack.stop()
            if args.attack_cheroot:
                attack = Attack(cheroot.url, args, [])
                try:
                    r["cheroot quiet"] = None
                    r["cheroot hostile"] = api.run_case(cheroot.url, "/api/mj/self", users, args)
                finally:
                    r["cheroot attack"] = attack.stop()
            sim.sim.update({"slow": 0.0})
            rounds.append(r)
    finally:
        new.stop()
        cheroot.stop()
    report(args, rounds, source_db)


def report(args, rounds: list[dict], source_db: str) -> None:
    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in rounds)

    ratio = statistics.median(r["hostile"]["rps"] / r["quiet"]["rps"] for r in rounds)
    bare_ratio = statistics.median(r["bare new"]["rps"] / r["bare cheroot"]["rps"] for r in rounds)
    print(f"{args.tasks:,}-task store ({source_db}, a scratch copy); {args.connections} measured connections from "
          f"{args.loadgen_procs} load generator process(es); {args.seconds:g} s per measurement, median of "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs")
    print(f"attack: {args.idle} idle + {args.drip} header-dripping connections (a line every {args.drip_every:g} s), "
          f"{args.hang} submissions hanging {args.slow_seconds:g} s on the upstream")
    print(f"{'':28} {'rps':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'reconn':>6}")
    for key, label in (("bare new", "bare, new server"), ("bare cheroot", "bare, cheroot"),
                       ("quiet", "/api/mj/self quiet"), ("hostile", "/api/mj/self under attack")):
        print(f"{label:28} {med(key, 'rps'):7.0f} {med(key, 'p50'):7.2f} {med(key, 'p99'):7.2f} "
              f"{sum(r[key]['errors'] for r in rounds):6d} {sum(r[key]['reconnects'] for r in rounds):6d}")
    if args.attack_cheroot:
        key = "cheroot hostile"
        print(f"{'/api/mj/self attack, cheroot':28} {med(key, 'rps'):7.0f} {med(key, 'p50'):7.2f} "
              f"{med(key, 'p99'):7.2f} {sum(r[key]['errors'] for r in rounds):6d}")
    hostile_p99 = med("hostile", "p99")
    print(f"bare endpoint, new server / cheroot: {bare_ratio:.2f}x")
    print(f"under attack / quiet: {ratio:.2f}x (target >= 0.7): {'ok' if ratio >= 0.7 else 'MISSED'}")
    print(f"p99 under attack: {hostile_p99:.1f} ms (target < 100 ms): {'ok' if hostile_p99 < 100 else 'MISSED'}")
    print(f"upstream-bound requests in flight at the start / end of each attacked measurement: "
          f"{[(r['in flight before'], r['in flight after']) for r in rounds]}")
    for i, r in enumerate(rounds, 1):
        a = r["attack"]
        answered = {k.rsplit("_", 1)[1]: v for k, v in sorted(a.items()) if k.startswith("submissions_answered_")}
        print(f"round {i} attack: idle opened {a.get('idle_opened', 0)} (closed by the server "
              f"{a.get('idle_closed_by_server', 0)}), dripping opened {a.get('drip_opened', 0)} (cut off "
              f"{a.get('drip_cut_by_server', 0)}, {a.get('drip_lines', 0)} lines sent), submissions sent "
              f"{a.get('submissions_sent', 0)}, answered {answered or 'none yet'}, connect errors "
              f"{a.get('connect_errors', 0)}")
    good = ratio >= 0.7 and hostile_p99 < 100
    print("all targets met" if good else "missed")


if __name__ == "__main__":
    main()
