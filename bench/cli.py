"""CLI start-up and listing speed on a 1,000,000-task SQLite store.

    python bench/cli.py [--db PATH] [--tasks N] [--runs 7]

Prints the median wall time (including interpreter start-up) of `mjctl tasks list` page 1, filtered by user,
by mj_id and by a time range, against the 0.3 s target; and `mjctl --help` as a ratio against
`python -c "import typer"` measured in the same run (target under 2x).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def wall(cmd: list[str], env: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - began)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode()}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "mjctl-bench-1m.db"))
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    url = f"sqlite:///{args.db}"
    if not Path(args.db).exists():
        from seed import seed

        print(f"seeding {args.tasks} tasks into {args.db} …", file=sys.stderr)
        seed(url, tasks=args.tasks)
    conn = sqlite3.connect(args.db)
    mj_id, submit = conn.execute("SELECT mj_id, submit_time FROM task WHERE id = ?", (args.tasks // 2,)).fetchone()
    conn.close()
    env = {**os.environ, "MJCTL_DATABASE_URL": url, "MJCTL_SERVER_SECRET": "bench"}
    mjctl = [sys.executable, "-m", "mjctl"]
    floor = wall([sys.executable, "-c", "import typer"], env, args.runs)
    help_time = wall(mjctl + ["--help"], env, args.runs)
    cases = {
        "tasks list (page 1)": ["tasks", "list"],
        "tasks list --user user42": ["tasks", "list", "--user", "user42"],
        "tasks list --mj-id": ["tasks", "list", "--mj-id", mj_id],
        "tasks list --since/--until (1 h)": ["tasks", "list", "--since", str(submit), "--until", str(submit + 3600)],
        "tasks list --json (page 1)": ["tasks", "list", "--json"],
    }
    print(f"{'case':40} {'median s':>9} {'target':>8}")
    print(f"{'python -c import typer (floor)':40} {floor:9.3f}")
    print(f"{'mjctl --help':40} {help_time:9.3f} {'<2x':>8}  ratio {help_time / floor:.2f}x")
    worst = 0.0
    for name, extra in cases.items():
        t = wall(mjctl + extra, env, args.runs)
        worst = max(worst, t)
        print(f"{name:40} {t:9.3f} {'<0.300':>8}  {'ok' if t < 0.3 else 'SLOW'}")
    print(f"worst listing {worst:.3f} s; help ratio {help_time / floor:.2f}x")


if __name__ == "__main__":
    main()
