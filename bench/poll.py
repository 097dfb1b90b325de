"""Benchmark the poller against the floor of its own upstream traffic.

    python bench/poll.py [--tasks 10000] [--channels 4] [--batch-size 100] [--idle-tasks 1000000]

1. Starts `mjctl simulate` in a separate process and seeds it by submitting the tasks through its API
   (high queue and concurrency settings, a one-hour step so they stay unfinished). The 4 channels are 4
   channel rows pointing at that one simulator, each with its own client and connections.
2. Stores those tasks as unfinished, spread over the channels, in a temp SQLite database.
3. The floor: the same list-by-condition requests (same batches, same parallelism) made by a bare httpx
   loop that parses the JSON and writes nothing.
4. Poll cycles (`poll_once`), each as a ratio to the floor, and their upstream request count against
   ceil(tasks / batch_size): the first (every task moves; run --first-rounds times, each on a store of its
   own seeded alike, against the same upstream: the best of them against the best floor, as the
   unchanged cycles are, and the median of each against the floor measured just before it); one with
   the memo voided by hand (every report worked out, as every cron cycle was before the memo lived in
   the store, and then remembered); and
   cycles in which nothing changed, with the memo in the store (what `mjctl poll` from cron and each
   cycle of a looping poller cost).
   Also the CPU of cleaning the cycle's reports (`upstream_text.clean_report`) as it is, against the field
   by field cleaning that a report with anything unusual in it still takes.
5. `mjctl poll --json` as a whole process over the same store, against `python -c "import httpx"`: the
   process start-up, reported apart from the cycle. Then first cycles run by `mjctl poll` processes on
   fresh stores: one, against two started together that split the channels through their claims (what
   a machine with cores to spare gains by running two from cron).
6. The idle cycle on a seeded store of --idle-tasks finished tasks (bench/seed.py): median of 200.
7. Work sharing: one round of 1 and of 3 pollers started at once over the same unfinished tasks
   (`run_pollers`, also used by bench/scale.py): upstream requests, which must not grow with the pollers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
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


@contextlib.contextmanager
def seeded_upstream(tasks: int, channels: int, prefix: str):
    """A simulator in its own process holding `tasks` unfinished tasks, their ids split over `channels`, and a
    scratch folder; yields (url, ids_by_channel, folder) and removes both at the end."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    sim = start_simulator(port)
    try:
        url = f"http://127.0.0.1:{port}"
        mj_ids = seed_simulator(url, tasks)
        yield url, [mj_ids[c::channels] for c in range(channels)], workdir
    finally:
        sim.terminate()
        sim.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


_tls = None


def _tls_context():
    """One TLS context for every floor client, built outside the timing: httpx.Client() otherwise loads the
    CA bundle for each client (~50 ms of CPU under the GIL), which once inflated the floor by ~200 ms."""
    global _tls
    if _tls is None:
        import ssl

        import certifi

        _tls = ssl.create_default_context(cafile=certifi.where())
    return _tls


def floor(urls: list[str], ids_by_channel: list[list[str]], batch: int) -> tuple[float, int]:
    """The same requests, in parallel per channel, that write nothing."""
    import httpx

    context = _tls_context()

    def channel(args) -> int:
        url, ids = args
        with httpx.Client(base_url=url, headers={"mj-api-secret": SECRET}, timeout=30, verify=context) as client:
            for i in range(0, len(ids), batch):
                answer = client.post("/mj/task/list-by-condition", json={"ids": ids[i:i + batch]}).json()
                assert len(answer) == len(ids[i:i + batch])
        return math.ceil(len(ids) / batch)

    began = time.perf_counter()
    with ThreadPoolExecutor(len(urls)) as pool:
        requests = sum(pool.map(channel, zip(urls, ids_by_channel)))
    return time.perf_counter() - began, requests


def cleaning_cpu(url: str, ids_by_channel: list[list[str]], batch: int) -> dict:
    """CPU seconds (best of 5) of cleaning every report of a cycle: clean_report as the poller calls it,
    and the field by field cleaning alone (what a report that is not already clean takes)."""
    import httpx

    from mjctl import upstream_text

    with httpx.Client(base_url=url, headers={"mj-api-secret": SECRET}, timeout=30) as client:
        reports = [r for ids in ids_by_channel for i in range(0, len(ids), batch)
                   for r in client.post("/mj/task/list-by-condition", json={"ids": ids[i:i + batch]}).json()]

    def field_by_field(report: dict) -> dict:
        head = {"id": upstream_text.task_id(report.get("id")), "status": str(report["status"]).upper()}
        return upstream_text._clean_fields(report, head)

    def best(clean) -> float:
        runs = []
        for _ in range(5):
            began = time.process_time()
            for report in reports:
                clean(report)
            runs.append(time.process_time() - began)
        return min(runs)

    return {"clean_reports": len(reports), "clean_quick_ms": round(best(upstream_text.clean_report) * 1000, 1),
            "clean_field_by_field_ms": round(best(field_by_field) * 1000, 1)}


def store_tasks(settings, urls: list[str], ids_by_channel: list[list[str]]) -> None:
    """A user and one channel row per url, with the simulator's ids as unfinished charged tasks."""
    from mjctl import accounts, channels
    from mjctl.db import write_tx
    from mjctl.models import Task

    user, _ = accounts.create_user("bench", quota=10**12)
    chans = [channels.add_channel(settings, f"sim{c}", url, SECRET) for c, url in enumerate(urls)]
    now = int(time.time())
    with write_tx():
        rows = [{"user_id": user.id, "channel_id": chans[c].id, "mj_id": mj_id, "status": "SUBMITTED",
                 "progress": "0%", "quota": 1000, "unfinished": 1, "submit_time": now}
                for c, ids in enumerate(ids_by_channel) for mj_id in ids]
        for i in range(0, len(rows), 2000):
            Task.insert_many(rows[i:i + 2000]).execute()


def run_pollers(n_pollers: int, *, tasks: int = 10_000, channels: int = 4, batch_size: int = 100,
                database_url: str | None = None) -> dict:
    """One round of n_pollers pollers started together over `tasks` unfinished tasks on `channels`
    channels (a simulator in its own process; pollers are threads with their own connections, sharing
    work through the database's claims exactly as processes would).

    Uses a fresh SQLite file unless database_url names an empty database. Returns the upstream
    list-by-condition requests the round made (the simulator's count), what one poller needs
    (ceil(tasks per channel / batch_size) summed), the round's wall time, tasks checked and how many
    pollers found work.
    """
    import threading

    import httpx

    from mjctl.config import load_settings
    from mjctl.db import connection, open_store, unbind
    from mjctl.poller import poll_once

    with seeded_upstream(tasks, channels, "mjctl-bench-pollers-") as (url, ids_by_channel, workdir):
        settings = load_settings(None, {("database", "url"): database_url or f"sqlite:///{workdir}/pollers.db",
                                        ("server", "secret"): "bench-secret",
                                        ("poller", "batch_size"): batch_size,
                                        ("poller", "concurrency"): channels,
                                        ("poller", "task_timeout"): 86400,
                                        ("database", "pool_size"): 4 * channels * max(n_pollers, 1)})
        open_store(settings)
        store_tasks(settings, [url] * channels, ids_by_channel)
        barrier = threading.Barrier(n_pollers + 1)
        summaries, errors = [], []

        def poller() -> None:
            try:
                with connection():
                    barrier.wait()
                    summaries.append(poll_once(settings))
            except BaseException as exc:  # noqa: BLE001 - kept for the main thread to report
                errors.append(exc)

        threads = [threading.Thread(target=poller) for _ in range(n_pollers)]
        for t in threads:
            t.start()
        before = httpx.get(f"{url}/_sim/stats").json()["list-by-condition"]
        barrier.wait()
        began = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        if errors:
            raise errors[0]
        requests = httpx.get(f"{url}/_sim/stats").json()["list-by-condition"] - before
        unbind()
    return {"pollers": n_pollers, "requests": requests,
            "one_poller_requests": sum(math.ceil(len(ids) / batch_size) for ids in ids_by_channel),
            "wall": round(wall, 3), "checked": sum(s.checked for s in summaries),
            "pollers_with_work": sum(1 for s in summaries if s.ran)}


def process_start(settings, args, workdir: Path) -> dict:
    """`mjctl poll --json` as cron runs it (a whole process, best of 3) over the store just polled, and the
    floor of any Python process that talks HTTP, `python -c "import httpx"` (best of 3)."""
    # The best of 3 runs is kept.
    env = poll_env(settings, args, args.channels)

    def best(command: list[str]) -> tuple[float, str]:
        runs = []
        for _ in range(3):
            began = time.perf_counter()
            out = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=120,
                                 check=True)
            runs.append((time.perf_counter() - began, out.stdout))
        return min(runs)

    process, output = best([sys.executable, "-m", "mjctl", "poll", "--json"])
    summary = json.loads(output)
    assert summary["checked"] == args.tasks and summary["updated"] == 0, summary
    bare, _ = best([sys.executable, "-c", "import httpx"])
    return {"process_ms": round(process * 1000, 1), "import_httpx_ms": round(bare * 1000, 1),
            "process_cycle_ms": summary["duration_ms"], "process_skipped": summary["skipped"]}


def poll_env(settings, args, concurrency: int) -> dict:
    """The environment of a `mjctl poll` process over settings' store, as cron would run it."""
    # Bytecode is cached as an installed package's is (PYTHONDONTWRITEBYTECODE would compile every module in
    # every run).
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    return env | {"MJCTL_DATABASE_URL": settings.database_url(), "MJCTL_SERVER_SECRET": "bench-secret",
                  "MJCTL_POLLER_BATCH_SIZE": str(args.batch_size), "MJCTL_POLLER_CONCURRENCY": str(concurrency),
                  "MJCTL_POLLER_TASK_TIMEOUT": "86400", "MJCTL_LOG_LEVEL": "warning",
                  "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def first_in_processes(fresh_store, args, workdir: Path, rounds: int = 3) -> dict:
    """First cycles run by `mjctl poll --json` processes, each on a fresh store: one process with
    --channels workers, against two started together with half the workers each, which split the channels
    through their claims (each process has its own interpreter lock). Alternated; a round's time runs from
    the first cycle's start to the last one's end, by the processes' own summaries (start-up apart)."""
    from mjctl.db import unbind

    times: dict[int, list[float]] = {1: [], 2: []}
    for k in range(rounds):
        for n in (1, 2) if k % 2 == 0 else (2, 1):
            settings = fresh_store(f"processes{k}-{n}")
            env = poll_env(settings, args, max(1, args.channels // n))
            procs = [subprocess.Popen([sys.executable, "-m", "mjctl", "poll", "--json"], env=env, cwd=workdir,
                                      stdout=subprocess.PIPE, text=True) for _ in range(n)]
            summaries = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
            assert sum(s["updated"] for s in summaries) == args.tasks, summaries
            ran = [s for s in summaries if s["ran"]]
            times[n].append(max(s["started_at"] + s["duration_ms"] / 1000 for s in ran)
                            - min(s["started_at"] for s in ran))
            unbind()
    return {"first_one_process_ms": round(min(times[1]) * 1000, 1),
            "first_two_processes_ms": round(min(times[2]) * 1000, 1),
            "first_processes_rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--idle-tasks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=6,
                        help="cycle/floor pairs (at least 3); the best floor and the best unchanged cycle are kept")
    parser.add_argument("--first-rounds", type=int, default=3,
                        help="first cycles, each on a fresh store seeded alike (the best is kept)")
    parser.add_argument("--skip-pollers", action="store_true", help="skip the 1 vs 3 pollers round")
    args = parser.parse_args()

    import httpx

    from mjctl.config import load_settings
    from mjctl.db import database, open_store, unbind
    from mjctl.models import Task
    from mjctl.poller import poll_once

    results: dict = {}
    with seeded_upstream(args.tasks, args.channels, "mjctl-bench-poll-") as (url, ids_by_channel, workdir):
        urls = [url] * args.channels

        def fresh_store(name: str):
            settings = load_settings(None, {("database", "url"): f"sqlite:///{workdir}/{name}.db",
                                            ("server", "secret"): "bench-secret",
                                            ("poller", "batch_size"): args.batch_size,
                                            ("poller", "concurrency"): args.channels,
                                            ("poller", "task_timeout"): 86400})
            open_store(settings)
            store_tasks(settings, urls, ids_by_channel)
            return settings

        # The poller shares one TLS context per process (mjctl.poller._transport); build it now, as a
        # long-running server has long since done (a cron-run `mjctl poll` pays ~50 ms for it once).
        from mjctl.poller import _transport

        _transport().close()

        # First cycles on stores of their own (the upstream's tasks stay as they are: a one-hour step),
        # each after a floor of its own; the last store goes on to the rounds below, whose round 0 is the
        # last first cycle.
        first_runs = []  # (cycle seconds, floor seconds just before it, cpu seconds)
        for k in range(max(args.first_rounds, 1) - 1):
            settings = fresh_store(f"first{k}")
            floor_s, _ = floor(urls, ids_by_channel, args.batch_size)
            cpu_before = time.process_time()
            summary = poll_once(settings)
            first_runs.append((summary.duration, floor_s, time.process_time() - cpu_before))
            assert summary.updated == args.tasks, summary.to_dict()
            unbind()
        settings = fresh_store("poll")

        # Round 0 writes every task (the first report brings start times, descriptions, properties) and
        # remembers each report with the row it leaves; later rounds find nothing changed. Before round 1
        # the memo is voided by hand, so round 1 works out every report (as every cron cycle did before the
        # memo lived in the store) and remembers it; from round 2 on the memo holds. Floors are measured
        # between cycles, the best one kept.
        cycle_times, floor_times, requests_seen, cpu_times = [], [], [], []
        summary = None
        for n in range(args.rounds):
            floor_s, floor_requests = floor(urls, ids_by_channel, args.batch_size)
            floor_times.append(floor_s)
            if n == 1:
                Task.update(memo_digest="").execute()  # leaves the rows' versions alone
            before = httpx.get(f"{urls[0]}/_sim/stats").json()["list-by-condition"]
            cpu_before = time.process_time()
            summary = poll_once(settings)
            cpu_times.append(time.process_time() - cpu_before)
            requests_seen.append(httpx.get(f"{urls[0]}/_sim/stats").json()["list-by-condition"] - before)
            cycle_times.append((summary.duration, summary.updated))
            assert summary.ran and summary.checked == args.tasks, summary.to_dict()
        first_runs.append((cycle_times[0][0], floor_times[0], cpu_times[0]))
        best_floor = min(floor_times + [f for _, f, _ in first_runs])
        if len(cycle_times) < 3:
            raise SystemExit("--rounds must be at least 3")
        first_updated = cycle_times[0][1]
        first = min(t for t, _, _ in first_runs)
        unremembered = cycle_times[1][0]
        remembered = min(t for t, _ in cycle_times[2:])
        results.update({
            "tasks": args.tasks, "channels": args.channels, "batch_size": args.batch_size,
            "floor_ms": round(best_floor * 1000, 1), "floor_requests": floor_requests,
            "first_cycle_ms": round(first * 1000, 1), "first_cycle_updated": first_updated,
            "first_ratio": round(first / best_floor, 2),
            "first_cycles_ms": [round(t * 1000, 1) for t, _, _ in first_runs],
            "first_pair_ratio_median": round(statistics.median(t / f for t, f, _ in first_runs), 2),
            "first_cpu_ms": [round(c * 1000, 1) for _, _, c in first_runs],
            "unremembered_cycle_ms": round(unremembered * 1000, 1),
            "unremembered_ratio": round(unremembered / best_floor, 2),
            "one_shot_cycle_ms": round(remembered * 1000, 1), "one_shot_ratio": round(remembered / best_floor, 2),
            "target_ratio": 1.5, "cycle_requests": summary.requests, "requests_seen_by_upstream": requests_seen,
            "target_requests": math.ceil(args.tasks / args.batch_size),
            "cycle_cpu_ms": [round(c * 1000, 1) for c in cpu_times],
        })
        unbind()
        results.update(cleaning_cpu(url, ids_by_channel, args.batch_size))
        results.update(process_start(settings, args, workdir))
        results.update(first_in_processes(fresh_store, args, workdir))

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

    print(f"floor (bare httpx, same {results['floor_requests']} requests, no writes): {results['floor_ms']} ms")
    print(f"first cycle ({results['first_cycle_updated']} of {results['tasks']} tasks updated, over "
          f"{results['channels']} channels; best of {len(results['first_cycles_ms'])}, each on a fresh store): "
          f"{results['first_cycle_ms']} ms = {results['first_ratio']}x the floor; each against the floor "
          f"measured just before it, median {results['first_pair_ratio_median']}x (cycles "
          f"{results['first_cycles_ms']} ms, CPU {results['first_cpu_ms']} ms)")
    print(f"unchanged cycle, memo voided (every report worked out, as every cron cycle was without the stored "
          f"memo, then remembered): {results['unremembered_cycle_ms']} ms = {results['unremembered_ratio']}x the floor")
    print(f"unchanged cycle, memo in the store (`mjctl poll` from cron, and a looping poller): "
          f"{results['one_shot_cycle_ms']} ms = {results['one_shot_ratio']}x the floor (target <= 1.5x)")
    print(f"`mjctl poll --json` as a whole process, nothing changed, memo held: {results['process_ms']} ms, of "
          f"which its cycle {results['process_cycle_ms']:.0f} ms (by its summary; lazy imports and TLS set-up "
          f"included): start-up and exit {results['process_ms'] - results['process_cycle_ms']:.0f} ms, against "
          f"{results['import_httpx_ms']} ms for `python -c \"import httpx\"`")
    print(f"first cycle as `mjctl poll` processes (best of {results['first_processes_rounds']}, alternated, from the "
          f"first cycle's start to the last one's end): one with {results['channels']} workers "
          f"{results['first_one_process_ms']} ms; two started together with half the workers each, splitting "
          f"the channels through their claims, {results['first_two_processes_ms']} ms")
    print(f"CPU of this process per cycle, in order (less noisy than wall times on a busy machine): "
          f"{results['cycle_cpu_ms']} ms")
    print(f"cleaning the cycle's {results['clean_reports']} reports (CPU, best of 5): {results['clean_quick_ms']} ms; "
          f"field by field, as a report with anything unusual in it is: {results['clean_field_by_field_ms']} ms")
    print(f"upstream requests per cycle: {results['cycle_requests']} "
          f"(simulator saw {results['requests_seen_by_upstream']}; "
          f"target ceil({results['tasks']}/{results['batch_size']}) = {results['target_requests']})")
    print(f"idle cycle on {results['idle_tasks']} finished tasks: median {results['idle_median_ms']} ms, "
          f"max {results['idle_max_ms']} ms (target < 5 ms)")
    if not args.skip_pollers:
        sharing = {n: run_pollers(n, tasks=args.tasks, channels=args.channels, batch_size=args.batch_size)
                   for n in (1, 3)}
        for n, r in sharing.items():
            print(f"{n} poller(s) started together: {r['requests']} upstream requests (one poller needs "
                  f"{r['one_poller_requests']}), {r['pollers_with_work']} found work, round {r['wall'] * 1000:.0f} ms")
        results["pollers"] = sharing
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("MJCTL_LOG_LEVEL", "warning")
    main()
