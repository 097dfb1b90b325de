"""Benchmark the poller against the floor of its own upstream traffic.

    python bench/poll.py [--tasks 10000] [--channels 4] [--batch-size 100] [--idle-tasks 1000000]

1. Starts `mjctl simulate` in a separate process and seeds it by submitting the tasks through its API
   (high queue and concurrency settings, a one-hour step so they stay unfinished). The 4 channels are 4
   channel rows pointing at that one simulator, each with its own client and connections.
2. Stores those tasks as unfinished, spread over the channels, in a temp SQLite database.
3. The floor: the same list-by-condition requests (same batches, same parallelism) made by a bare httpx
   loop that parses the JSON and writes nothing.
4. One poll cycle (`poll_once`): wall time as a ratio to the floor, and its upstream request count
   against ceil(tasks / batch_size).
5. The idle cycle on a seeded store of --idle-tasks finished tasks (bench/seed.py): median of 200.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SECRET = "sim-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_simulator(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mjctl", "simulate", "--port", str(port), "--secret", SECRET,
         "--step-seconds", "3600", "--accounts", "100", "--concurrency", "100", "--queue-size", "100000",
         "--threads", "32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/_sim/stats", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the simulator did not start")


def seed_simulator(url: str, n: int) -> list[str]:
    import httpx

    def submit(chunk: range) -> list[str]:
        ids = []
        with httpx.Client(base_url=url, headers={"mj-api-secret": SECRET}, timeout=30) as client:
            for i in chunk:
                body = client.post("/mj/submit/imagine", json={"prompt": f"bench {i}"}).json()
                assert body["code"] in (1, 22), body
                ids.append(body["result"])
        return ids

    step = math.ceil(n / 8)
    with ThreadPoolExecutor(8) as pool:
        parts = pool.map(submit, [range(i, min(i + step, n)) for i in range(0, n, step)])
    return [i for part in parts for i in part]


def floor(urls: list[str], ids_by_channel: list[list[str]], batch: int) -> tuple[float, int]:
    """The same requests, in parallel per channel, that write nothing."""
    import httpx

    def channel(args) -> int:
        url, ids = args
        with httpx.Client(base_url=url, headers={"mj-api-secret": SECRET}, timeout=30) as client:
            for i in range(0, len(ids), batch):
                answer = client.post("/mj/task/list-by-condition", json={"ids": ids[i:i + batch]}).json()
                assert len(answer) == len(ids[i:i + batch])
        return math.ceil(len(ids) / batch)

    began = time.perf_counter()
    with ThreadPoolExecutor(len(urls)) as pool:
        requests = sum(pool.map(channel, zip(urls, ids_by_channel)))
    return time.perf_counter() - began, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--idle-tasks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="cycle/floor pairs; the best of each is kept")
    args = parser.parse_args()

    import httpx

    from mjctl import accounts, channels
    from mjctl.config import load_settings
    from mjctl.db import database, open_store, unbind, write_tx
    from mjctl.models import Task
    from mjctl.poller import poll_once

    workdir = Path(tempfile.mkdtemp(prefix="mjctl-bench-poll-"))
    port = free_port()
    sim = start_simulator(port)
    results: dict = {}
    try:
        urls = [f"http://127.0.0.1:{port}"] * args.channels
        mj_ids = seed_simulator(urls[0], args.tasks)
        ids_by_channel = [mj_ids[c::args.channels] for c in range(args.channels)]

        settings = load_settings(None, {("database", "url"): f"sqlite:///{workdir}/poll.db",
                                        ("server", "secret"): "bench-secret",
                                        ("poller", "batch_size"): args.batch_size,
                                        ("poller", "concurrency"): args.channels,
                                        ("poller", "task_timeout"): 86400})
        open_store(settings)
        user, _ = accounts.create_user("bench", quota=10**12)
        chans = [channels.add_channel(settings, f"sim{c}", urls[c], SECRET) for c in range(args.channels)]
        now = int(time.time())
        with write_tx():
            rows = [{"user_id": user.id, "channel_id": chans[c].id, "mj_id": mj_id, "status": "SUBMITTED",
                     "progress": "0%", "quota": 1000, "unfinished": 1, "submit_time": now}
                    for c, ids in enumerate(ids_by_channel) for mj_id in ids]
            for i in range(0, len(rows), 2000):
                Task.insert_many(rows[i:i + 2000]).execute()

        # Round 0 writes every task (the first report brings start times, descriptions, properties);
        # later rounds find nothing changed. Floors are measured between cycles, the best one kept.
        cycle_times, floor_times, requests_seen, cpu_times = [], [], [], []
        summary = None
        for _ in range(args.rounds):
            floor_s, floor_requests = floor(urls, ids_by_channel, args.batch_size)
            floor_times.append(floor_s)
            before = httpx.get(f"{urls[0]}/_sim/stats").json()["list-by-condition"]
            cpu_before = time.process_time()
            summary = poll_once(settings)
            cpu_times.append(time.process_time() - cpu_before)
            requests_seen.append(httpx.get(f"{urls[0]}/_sim/stats").json()["list-by-condition"] - before)
            cycle_times.append((summary.duration, summary.updated))
            assert summary.ran and summary.checked == args.tasks, summary.to_dict()
        best_floor = min(floor_times)
        first, first_updated = cycle_times[0]
        steady = min(t for t, _ in cycle_times[1:]) if len(cycle_times) > 1 else first
        results.update({
            "tasks": args.tasks, "channels": args.channels, "batch_size": args.batch_size,
            "floor_ms": round(best_floor * 1000, 1), "floor_requests": floor_requests,
            "first_cycle_ms": round(first * 1000, 1), "first_cycle_updated": first_updated,
            "first_ratio": round(first / best_floor, 2),
            "steady_cycle_ms": round(steady * 1000, 1), "steady_ratio": round(steady / best_floor, 2),
            "target_ratio": 1.5, "cycle_requests": summary.requests, "requests_seen_by_upstream": requests_seen,
            "target_requests": math.ceil(args.tasks / args.batch_size),
            "cycle_cpu_ms": [round(c * 1000, 1) for c in cpu_times],
        })
        unbind()

        # The idle cycle on a million finished tasks.
        from bench.seed import seed

        idle_url = f"sqlite:///{workdir}/idle.db"
        seed(idle_url, tasks=args.idle_tasks, users=1000, channels=args.channels, unfinished=0)
        idle_settings = load_settings(None, {("database", "url"): idle_url, ("server", "secret"): "bench-secret"})
        open_store(idle_settings)
        database.connect(reuse_if_open=True)
        idle = []
        for _ in range(200):
            began = time.perf_counter()
            s = poll_once(idle_settings)
            idle.append(time.perf_counter() - began)
            assert s.message == "nothing unfinished"
        results.update({"idle_tasks": args.idle_tasks, "idle_median_ms": round(statistics.median(idle) * 1000, 3),
                        "idle_max_ms": round(max(idle) * 1000, 3), "idle_target_ms": 5})
        unbind()
    finally:
        sim.terminate()
        sim.wait(10)
        for f in workdir.iterdir():
            f.unlink()
        workdir.rmdir()

    print(f"floor (bare httpx, same {results['floor_requests']} requests, no writes): {results['floor_ms']} ms")
    print(f"first cycle ({results['first_cycle_updated']} of {results['tasks']} tasks updated, over "
          f"{results['channels']} channels): {results['first_cycle_ms']} ms = {results['first_ratio']}x the floor")
    print(f"steady cycle (nothing changed): {results['steady_cycle_ms']} ms = {results['steady_ratio']}x the floor "
          f"(target <= 1.5x)")
    print(f"upstream requests per cycle: {results['cycle_requests']} (simulator saw {results['requests_seen_by_upstream']}; "
          f"target ceil({results['tasks']}/{results['batch_size']}) = {results['target_requests']})")
    print(f"idle cycle on {results['idle_tasks']} finished tasks: median {results['idle_median_ms']} ms, "
          f"max {results['idle_max_ms']} ms (target < 5 ms)")
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("MJCTL_LOG_LEVEL", "warning")
    main()
