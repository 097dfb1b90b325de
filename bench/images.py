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

With ``--store s3`` (or ``both``, the default) the same runs against an S3 store: moto's S3 server in a
process of its own, a second mjctl server with ``[images] store = "s3://…"`` (boto3 and moto[server]
needed: ``pip install -e '.[test]'``). The floor there is a direct download from the same bucket (httpx
on a presigned link) and the cases are:

- the 50 MB image and 16 concurrent 6.5 MB images served from the bucket through mjctl;
- the server's RSS growth while it proxies the 50 MB image from the upstream into the bucket, and while it
  serves it from the bucket.

Targets: local uncached >= 0.5 of direct, cached >= 1.0; served from the bucket >= 0.8 of direct; RSS
growth < 16 MB everywhere.
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
from collections.abc import Callable
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
    """The memory figure of pid and its child processes together (`mjctl serve` answers in a worker)."""
    total = 0
    for one in [pid, *children(pid)]:
        try:
            with open(f"/proc/{one}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith(key + ":")), 0)
        except OSError:  # it ended meanwhile
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of pid and its child processes so far."""
    total = 0
    for one in [pid, *children(pid)]:
        try:
            with open(f"/proc/{one}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(c) for c in fh.read().split()]
    except OSError:
        return []
    return found + [grandchild for child in found for grandchild in children(child)]


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


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    """Wait until a server that announced itself answers /healthz (its workers bind after the announcement)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"the server at {url} did not come up")


def peak_growth(pid: int, work: Callable[[], object]) -> float:
    """The largest RSS growth (MB) of process pid while work() runs: sampled every 5 ms, and VmHWM."""
    before, hwm_before = rss_kb(pid), rss_kb(pid, "VmHWM")
    peak = before
    running = threading.Event()
    running.set()

    def sample() -> None:
        nonlocal peak
        while running.is_set():
            peak = max(peak, rss_kb(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        running.clear()
        sampler.join()
    hwm_growth = max(0, rss_kb(pid, "VmHWM") - max(hwm_before, before))
    return max(peak - before, hwm_growth) / 1024


def rate(urls: list[str], concurrency: int) -> float:
    seconds, nbytes = timed(urls, concurrency)
    return nbytes / seconds / 1024 / 1024


def heading(title: str, header: str) -> None:
    print(title)
    print(header)
    print("-" * len(header))


def labels(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The two cases, by key and as printed."""
    return ("big", f"1 x {args.big_mb:g} MB"), ("small", f"{args.concurrency} concurrent x {args.small_mb:g} MB")


def empty_cache(cache_dir: Path) -> None:
    if cache_dir.exists():
        shutil.rmtree(cache_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=float, default=50.0)
    parser.add_argument("--small-mb", type=float, default=6.5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--store", choices=("local", "s3", "both"), default="both")
    args = parser.parse_args()
    big, small = int(args.big_mb * 1024 * 1024), int(args.small_mb * 1024 * 1024)

    work = Path(tempfile.mkdtemp(prefix="mjctl-bench-images-"))
    cache_dir = work / "images"
    env = {name: value for name, value in os.environ.items() if not name.startswith("MJCTL_")}
    env.update({"MJCTL_DATABASE_URL": f"sqlite:///{work}/mjctl.db", "MJCTL_SERVER_SECRET": "bench",
                "MJCTL_IMAGES_CACHE_DIR": str(cache_dir), "MJCTL_IMAGES_MAX_BYTES": str(200 * 1024 * 1024),
                "MJCTL_IMAGES_ALLOW_HOSTS": "127.0.0.1",  # the simulator's images are on loopback
                "MJCTL_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)})
    procs: list[subprocess.Popen] = []
    stoppers: list[Callable[[], None]] = []
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

        def finished_video(video_bytes: int) -> tuple[str, str]:
            """A finished VIDEO task of video_bytes (the C# flavour has the route)."""
            api.post("/_sim/faults", json={"flavor": "csharp", "video_bytes": video_bytes}).raise_for_status()
            task_id = api.post("/mj/submit/video", json={"imageUrl": "https://example.com/a.png"}).json()["result"]
            while (task := api.get(f"/mj/task/{task_id}/fetch").json())["status"] != "SUCCESS":
                time.sleep(0.02)
            api.post("/_sim/faults", json={"flavor": "java"}).raise_for_status()
            with httpx.Client(timeout=120) as c:
                download(c, task["videoUrl"])
            return task_id, task["videoUrl"]

        warm = finished_task(None)
        big_task = finished_task(big)
        small_tasks = [finished_task(small) for _ in range(args.concurrency)]
        video_task = finished_video(big)

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
        rows[video_task[0]] = Task.create(user_id=1, channel_id=1, mj_id=video_task[0], status="SUCCESS",
                                          video_url=video_task[1], unfinished=0, action="VIDEO")
        forwarded = image_url_for(settings)

        def serve(server_env: dict) -> Callable[[str], str]:
            """Start `mjctl serve` with server_env; the function giving a task's image URL on it."""
            server, server_url = start([sys.executable, "-m", "mjctl", "serve", "--port", "0", "--no-poll",
                                        "--threads", "32"], server_env, r"serving on (http://\S+)", "stderr")
            procs.append(server)
            wait_ready(server_url, server)

            def proxied(task_id: str) -> str:
                row = rows[task_id]  # links name the task's row
                url = forwarded.video(row.id, row.mj_id, 0) if row.action == "VIDEO" else forwarded(row)
                return server_url + url[url.index("/mj/"):]

            proxied.pid = server.pid  # type: ignore[attr-defined]
            timed([proxied(warm[0])], 1)  # imports, the forwarder's client, a first connection
            return proxied

        tasks = Tasks(big_task, small_tasks, rows, video_task)
        failures: list[str] = []
        if args.store in ("local", "both"):
            failures += local_part(args, serve(env), tasks, cache_dir)
        if args.store in ("s3", "both"):
            failures += s3_part(args, env, serve, tasks, work, stoppers)
        print("all targets met" if not failures else "missed: " + "; ".join(failures))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for stop in stoppers:
            stop()
        shutil.rmtree(work, ignore_errors=True)


class Tasks:
    """The finished tasks of the runs: one big image, the small ones, and their rows."""

    def __init__(self, big_task: tuple[str, str], small_tasks: list[tuple[str, str]], rows: dict,
                 video: tuple[str, str]):
        self.big = big_task
        self.small = small_tasks
        self.rows = rows
        self.video = video


def local_part(args: argparse.Namespace, proxied: Callable[[str], str], tasks: Tasks, cache_dir: Path) -> list[str]:
    """The local folder: direct, uncached and cached rates, and memory while proxying uncached."""
    empty_cache(cache_dir)  # memory: the first proxying of the 50 MB image, sampled while it runs
    growth_mb = peak_growth(proxied.pid, lambda: timed([proxied(tasks.big[0])], 1))  # type: ignore[attr-defined]

    # Rounds interleave the three ways so that load from elsewhere on the machine hits them alike;
    # each figure is the best round.
    conc = args.concurrency
    cases = {
        "big": ([tasks.big[1]], [proxied(tasks.big[0])], 1),
        "small": ([url for _, url in tasks.small], [proxied(task_id) for task_id, _ in tasks.small], conc),
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

    heading(f"image forwarding, local store: simulator and mjctl serve in separate processes, best of {args.rounds}",
            f"{'case':38} {'direct MB/s':>11} {'uncached':>9} {'ratio':>6} {'cached':>9} {'ratio':>6}")
    failures = []
    for key, label in labels(args):
        direct, uncached, cached = results[key]
        r_un, r_ca = uncached / direct, cached / direct
        print(f"{label:38} {direct:11.0f} {uncached:9.0f} {r_un:6.2f} {cached:9.0f} {r_ca:6.2f}")
        if r_un < 0.5:
            failures.append(f"local {label} uncached {r_un:.2f} < 0.5")
        if r_ca < 1.0:
            failures.append(f"local {label} cached {r_ca:.2f} < 1.0")
    print(f"server RSS growth while proxying {args.big_mb:g} MB uncached: {growth_mb:.1f} MB; target < 16 MB")
    if growth_mb >= 16:
        failures.append("local memory growth")
    # A video goes the same way as an image: streamed from the upstream into the store, then from the store.
    empty_cache(cache_dir)
    video_growth = peak_growth(proxied.pid, lambda: timed([proxied(tasks.video[0])], 1))  # type: ignore[attr-defined]
    direct, via = rate([tasks.video[1]], 1), rate([proxied(tasks.video[0])], 1)
    print(f"a {args.big_mb:g} MB video: server RSS growth {video_growth:.1f} MB (target < 16 MB); from the store "
          f"{via:.0f} MB/s against {direct:.0f} MB/s direct ({via / direct:.2f}x)\n")
    if video_growth >= 16:
        failures.append("local video memory growth")
    return failures


def s3_part(args: argparse.Namespace, env: dict, serve: Callable[[dict], Callable[[str], str]], tasks: Tasks,
            work: Path, stoppers: list[Callable[[], None]]) -> list[str]:
    """An S3 store on moto: serving from the bucket against downloading from it directly, and memory."""
    from mjctl.config import load_settings
    from mjctl.images import ImageSource, result_store
    from tests.s3_helpers import CREDENTIALS, MotoServer

    moto = MotoServer()
    stoppers.append(moto.stop)
    moto.create_bucket("bench-images")
    s3_env = {**env, **CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true", "MJCTL_IMAGES_STORE": "s3://bench-images/mjctl",
              "MJCTL_IMAGES_S3_ENDPOINT_URL": moto.url, "MJCTL_IMAGES_S3_REGION": "us-east-1",
              "MJCTL_IMAGES_CACHE_DIR": str(work / "s3-spool")}
    proxied = serve(s3_env)
    pid = proxied.pid  # type: ignore[attr-defined]
    os.environ.update({name: value for name, value in s3_env.items() if name.startswith("AWS_")})
    settings = load_settings(None, {("images", "store"): s3_env["MJCTL_IMAGES_STORE"],
                                    ("images", "s3_endpoint_url"): moto.url, ("images", "s3_region"): "us-east-1",
                                    ("images", "cache_dir"): s3_env["MJCTL_IMAGES_CACHE_DIR"]})
    store = result_store(settings)

    uncached_mb = peak_growth(pid, lambda: timed([proxied(tasks.big[0])], 1))  # upstream -> client and bucket
    cached_mb = peak_growth(pid, lambda: timed([proxied(tasks.big[0])], 1))  # bucket -> client
    timed([proxied(task_id) for task_id, _ in tasks.small], args.concurrency)  # the small ones into the bucket

    def presigned(task_id: str) -> str:
        deadline = time.monotonic() + 30  # each upload ends just after the client had its last byte
        while (link := store.presign(ImageSource.from_task(tasks.rows[task_id]), 3600)) is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"the image of {task_id} did not reach the bucket")
            time.sleep(0.05)
        return link

    conc = args.concurrency
    cases = {
        "big": ([presigned(tasks.big[0])], [proxied(tasks.big[0])], 1),
        "small": ([presigned(t) for t, _ in tasks.small], [proxied(t) for t, _ in tasks.small], conc),
    }
    heading(f"image forwarding, S3 store on moto: served from the bucket through mjctl against a direct download "
            f"from the bucket, best of {args.rounds}", f"{'case':38} {'direct MB/s':>11} {'via mjctl':>9} {'ratio':>6}")
    failures = []
    for key, label in labels(args):
        direct_urls, proxy_urls, concurrency = cases[key]
        direct, served = [], []
        cpu = {"direct": [0.0, 0.0, 0.0], "via mjctl": [0.0, 0.0, 0.0]}  # moto, mjctl, this client
        for _ in range(args.rounds):
            for way, urls, rates in (("direct", direct_urls, direct), ("via mjctl", proxy_urls, served)):
                began = (cpu_seconds(moto.proc.pid), cpu_seconds(pid), sum(os.times()[:2]))
                rates.append(rate(urls, concurrency))
                ended = (cpu_seconds(moto.proc.pid), cpu_seconds(pid), sum(os.times()[:2]))
                cpu[way] = [total + e - b for total, b, e in zip(cpu[way], began, ended)]
        ratio = max(served) / max(direct)
        print(f"{label:38} {max(direct):11.0f} {max(served):9.0f} {ratio:6.2f}")
        gigabytes = args.rounds * (args.big_mb if key == "big" else args.small_mb * conc) / 1024
        print("  CPU s per GB (moto, mjctl, client): " + "; ".join(
            f"{way} {' + '.join(f'{c / gigabytes:.1f}' for c in spent)}" for way, spent in cpu.items()))
        if ratio < 0.8:
            failures.append(f"S3 {label} {ratio:.2f} < 0.8")
    print(f"server RSS growth with {args.big_mb:g} MB: {uncached_mb:.1f} MB proxied from the upstream into the "
          f"bucket, {cached_mb:.1f} MB served from the bucket; target < 16 MB")
    if max(uncached_mb, cached_mb) >= 16:
        failures.append("S3 memory growth")
    return failures


if __name__ == "__main__":
    main()
