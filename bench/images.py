"""Image forwarding throughput and memory: mjctl's /mj/image proxy against downloading from the upstream.

    python bench/images.py [--big-mb 50] [--small-mb 6.5] [--concurrency 16] [--rounds 3]

The simulator (`mjctl simulate`) and the server (`mjctl serve --no-poll`) each run in a process of their
own; this process is the client (httpx, streaming, bytes discarded). Every case is timed in the same run
as its floor: the same files downloaded straight from the simulator. Rounds interleave direct, uncached
and cached downloads; each figure is the best of --rounds.

- one 50 MB image: direct, through mjctl uncached (cache emptied before each round), and from the cache;
- 16 concurrent downloads of 16 different 6.5 MB images: the same three ways;
- the server's peak RSS growth while it proxies the 50 MB image uncached (sampled from /proc/<pid>/status
  every 5 ms, and VmHWM).

Targets: uncached >= 0.5 of direct, cached >= 1.0, RSS growth < 16 MB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECRET = "bench-sim"


def start(cmd: list[str], env: dict, pattern: str, stream: str) -> tuple[subprocess.Popen, str]:
    """Start a process and wait for the line announcing its URL."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = pipe.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            # keep draining so the child never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in pipe], daemon=True).start()
            return proc, match.group(1)
    proc.kill()
    raise SystemExit(f"{cmd[3] if len(cmd) > 3 else cmd} did not start: "
                     f"{proc.stderr.read() if stream == 'stdout' else ''}")


def rss_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def download(client: httpx.Client, url: str) -> int:
    n = 0
    with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise SystemExit(f"GET {url} answered {response.status_code}: {response.read()[:200]!r}")
        for chunk in response.iter_raw(1024 * 1024):
            n += len(chunk)
    return n


def timed(urls: list[str], concurrency: int) -> tuple[float, int]:
    """Seconds to download every url (concurrency at once) and the bytes received."""
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        began = time.perf_counter()
        if concurrency == 1:
            total = sum(download(client, u) for u in urls)
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                total = sum(pool.map(lambda u: download(client, u), urls))
        return time.perf_counter() - began, total


def empty_cache(cache_dir: Path) -> None:
    if cache_dir.exists():
        shutil.rmtree(cache_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=float, default=50.0)
    parser.add_argument("--small-mb", type=float, default=6.5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    big, small = int(args.big_mb * 1024 * 1024), int(args.small_mb * 1024 * 1024)

    work = Path(tempfile.mkdtemp(prefix="mjctl-bench-images-"))
    cache_dir = work / "images"
    env = {**os.environ, "MJCTL_DATABASE_URL": f"sqlite:///{work}/mjctl.db", "MJCTL_SERVER_SECRET": "bench",
           "MJCTL_IMAGES_CACHE_DIR": str(cache_dir), "MJCTL_IMAGES_MAX_BYTES": str(200 * 1024 * 1024),
           "MJCTL_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)}
    for name in list(env):
        if name.startswith("MJCTL_") and name not in ("MJCTL_DATABASE_URL", "MJCTL_SERVER_SECRET",
                                                      "MJCTL_IMAGES_CACHE_DIR", "MJCTL_IMAGES_MAX_BYTES",
                                                      "MJCTL_LOG_LEVEL"):
            del env[name]
    procs: list[subprocess.Popen] = []
    try:
        sim, sim_url = start([sys.executable, "-m", "mjctl", "simulate", "--port", "0", "--secret", SECRET,
                              "--step-seconds", "0.02", "--accounts", "8", "--threads", "32"],
                             env, r"listening on (http://\S+)", "stdout")
        procs.append(sim)
        api = httpx.Client(base_url=sim_url, headers={"mj-api-secret": SECRET}, timeout=30)

        def finished_task(image_bytes: int | None) -> tuple[str, str]:
            api.post("/_sim/faults", json={"image_bytes": image_bytes}).raise_for_status()
            task_id = api.post("/mj/submit/imagine", json={"prompt": "bench"}).json()["result"]
            while True:
                task = api.get(f"/mj/task/{task_id}/fetch").json()
                if task["status"] == "SUCCESS":
                    break
                time.sleep(0.02)
            with httpx.Client(timeout=120) as c:
                download(c, task["imageUrl"])  # the simulator builds (and keeps) the PNG on first request
            return task_id, task["imageUrl"]

        warm = finished_task(None)
        big_task = finished_task(big)
        small_tasks = [finished_task(small) for _ in range(args.concurrency)]

        from mjctl import accounts  # noqa: F401 - the store for the task rows
        from mjctl.config import load_settings
        from mjctl.db import open_store
        from mjctl.images import image_url_for
        from mjctl.models import Task

        settings = load_settings(None, {("database", "url"): env["MJCTL_DATABASE_URL"], ("server", "secret"): "bench",
                                        ("images", "cache_dir"): str(cache_dir)})
        open_store(settings)
        rows = {task_id: Task.create(user_id=1, channel_id=1, mj_id=task_id, status="SUCCESS", image_url=url,
                                     unfinished=0) for task_id, url in [warm, big_task, *small_tasks]}

        server, server_url = start([sys.executable, "-m", "mjctl", "serve", "--port", "0", "--no-poll",
                                    "--threads", "32"], env, r"serving on (http://\S+)", "stderr")
        procs.append(server)
        forwarded = image_url_for(settings)

        def proxied(task_id: str) -> str:
            url = forwarded(rows[task_id])  # links name the task's row
            return server_url + url[url.index("/mj/image/"):]

        timed([proxied(warm[0])], 1)  # imports, the forwarder's client, a first connection

        # Memory: the first proxying of the 50 MB image, sampled while it runs.
        empty_cache(cache_dir)
        before, hwm_before = rss_kb(server.pid), rss_kb(server.pid, "VmHWM")
        peak = before
        running = threading.Event()
        running.set()

        def sample() -> None:
            nonlocal peak
            while running.is_set():
                peak = max(peak, rss_kb(server.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timed([proxied(big_task[0])], 1)
        running.clear()
        sampler.join()
        hwm_after = rss_kb(server.pid, "VmHWM")
        growth_mb = (peak - before) / 1024
        hwm_growth_mb = max(0, hwm_after - max(hwm_before, before)) / 1024

        def rate(urls: list[str], concurrency: int) -> float:
            seconds, nbytes = timed(urls, concurrency)
            return nbytes / seconds / 1024 / 1024

        # Rounds interleave the three ways so that load from elsewhere on the machine hits them alike;
        # each figure is the best round.
        conc = args.concurrency
        cases = {
            "big": ([big_task[1]], [proxied(big_task[0])], 1),
            "small": ([url for _, url in small_tasks], [proxied(task_id) for task_id, _ in small_tasks], conc),
        }
        results = {}
        for key, (direct_urls, proxy_urls, concurrency) in cases.items():
            direct, uncached, cached = [], [], []
            for _ in range(args.rounds):
                direct.append(rate(direct_urls, concurrency))
                empty_cache(cache_dir)
                uncached.append(rate(proxy_urls, concurrency))
                cached.append(rate(proxy_urls, concurrency))  # the uncached pass filled the cache
            results[key] = (max(direct), max(uncached), max(cached))

        print(f"image forwarding: simulator and mjctl serve in separate processes, best of {args.rounds} rounds")
        header = f"{'case':38} {'direct MB/s':>11} {'uncached':>9} {'ratio':>6} {'cached':>9} {'ratio':>6}"
        print(header)
        print("-" * len(header))
        failures = []
        for key, label in (("big", f"1 x {args.big_mb:g} MB"), ("small", f"{conc} concurrent x {args.small_mb:g} MB")):
            direct, uncached, cached = results[key]
            r_un, r_ca = uncached / direct, cached / direct
            print(f"{label:38} {direct:11.0f} {uncached:9.0f} {r_un:6.2f} {cached:9.0f} {r_ca:6.2f}")
            if r_un < 0.5:
                failures.append(f"{label} uncached {r_un:.2f} < 0.5")
            if r_ca < 1.0:
                failures.append(f"{label} cached {r_ca:.2f} < 1.0")
        print(f"server RSS while proxying {args.big_mb:g} MB uncached: {before / 1024:.1f} MB before, "
              f"peak growth {growth_mb:.1f} MB (VmHWM growth {hwm_growth_mb:.1f} MB); target < 16 MB")
        if max(growth_mb, hwm_growth_mb) >= 16:
            failures.append("memory growth")
        print("all targets met" if not failures else "missed: " + "; ".join(failures))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
