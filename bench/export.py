"""Exporting 1,000,000 tasks: peak memory (target under 100 MB RSS) and speed against a bare floor.

    python bench/export.py [--db PATH] [--tasks N]

On a SQLite store seeded by bench/seed.py (reused when the file exists):

1. floor: a bare Python process (sqlite3 and csv only) that reads every task's listing columns newest
   first and writes them as CSV: its wall time and peak RSS;
2. `mjctl tasks export --format csv -o FILE` and `--format jsonl`: wall time and peak RSS of the process
   (from wait4), as ratios to the floor;
3. `GET /api/mj/export` from `mjctl serve --no-poll`, read to the end by a client: wall time, and the
   serving worker's peak RSS (VmHWM) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

FLOOR = """
import csv, sqlite3, sys
columns = sys.argv[2].split(",")
conn = sqlite3.connect(sys.argv[1])
with open(sys.argv[3], "w", newline="") as out:
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows(conn.execute(f"SELECT {', '.join(columns)} FROM task ORDER BY id DESC"))
"""


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - began
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode() if proc.stderr else status}")
    return took, usage.ru_maxrss / 1024


def high_water_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_pids(parent: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "mjctl-bench-1m.db"))
    parser.add_argument("--tasks", type=int, default=1_000_000)
    args = parser.parse_args()
    url = f"sqlite:///{args.db}"
    if not Path(args.db).exists():  # in a child, for the reason below
        print(f"seeding {args.tasks} tasks into {args.db} …", file=sys.stderr)
        subprocess.run([sys.executable, str(HERE / "seed.py"), "--url", url, "--tasks", str(args.tasks)], check=True,
                       stdout=subprocess.DEVNULL)
    from mjctl.tasks import LISTING_COLUMNS

    # The exports run before this process opens the store: a child's peak RSS starts from its parent's at
    # the fork, and reading the store through SQLite's memory map would lend this process hundreds of MB.
    env = {**os.environ, "MJCTL_DATABASE_URL": url, "MJCTL_SERVER_SECRET": "bench", "PYTHONPATH": str(HERE.parent)}
    out = Path(tempfile.mkdtemp(prefix="mjctl-export-bench-"))
    results: dict = {"parent_rss_mb": round(high_water_mb(os.getpid()), 1)}
    floor_time, floor_rss = run([sys.executable, "-c", FLOOR, args.db, ",".join(LISTING_COLUMNS), str(out / "f.csv")],
                                env)
    results["floor"] = {"seconds": round(floor_time, 2), "peak_rss_mb": round(floor_rss, 1)}
    for fmt in ("csv", "jsonl"):
        took, rss = run([sys.executable, "-m", "mjctl", "tasks", "export", "--format", fmt, "-o",
                         str(out / f"e.{fmt}")], env)
        results[f"cli_{fmt}"] = {"seconds": round(took, 2), "peak_rss_mb": round(rss, 1),
                                 "time_ratio": round(took / floor_time, 2), "rss_ratio": round(rss / floor_rss, 2)}
    from mjctl import accounts
    from mjctl.config import load_settings
    from mjctl.db import open_store
    from mjctl.models import Task

    settings = load_settings(None, {("database", "url"): url, ("server", "secret"): "bench"})
    open_store(settings)
    total = results["tasks"] = Task.select().count()
    _user, token = accounts.create_user(f"export-bench-{time.time_ns()}", role="admin")
    lines = sum(1 for _ in open(out / "e.jsonl", "rb"))
    assert lines == total, (lines, total)

    import httpx

    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "mjctl", "serve", "--no-poll", "--port", str(port)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        workers = worker_pids(serve.pid)
        before = max(high_water_mb(pid) for pid in workers)
        began = time.perf_counter()
        received = 0
        with httpx.stream("GET", base + "/api/mj/export", params={"format": "csv"}, timeout=600,
                          headers={"Authorization": f"Bearer {token}"}) as response:
            for chunk in response.iter_bytes():
                received += len(chunk)
        took = time.perf_counter() - began
        after = max(high_water_mb(pid) for pid in workers)
        results["server_csv"] = {"seconds": round(took, 2), "bytes": received,
                                 "worker_peak_rss_mb_before": round(before, 1), "worker_peak_rss_mb": round(after, 1),
                                 "time_ratio": round(took / floor_time, 2)}
    finally:
        serve.terminate()
        serve.wait(30)
    for name in ("cli_csv", "cli_jsonl"):
        r = results[name]
        print(f"{name}: {r['seconds']} s ({r['time_ratio']}x the floor's {results['floor']['seconds']} s), "
              f"peak RSS {r['peak_rss_mb']} MB (floor {results['floor']['peak_rss_mb']} MB; target < 100 MB)")
    r = results["server_csv"]
    print(f"server csv: {r['seconds']} s ({r['time_ratio']}x), worker peak RSS {r['worker_peak_rss_mb_before']} MB "
          f"before, {r['worker_peak_rss_mb']} MB after")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
