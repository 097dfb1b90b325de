"""What the web page's Statistics view weighs, and what drawing its charts on the server costs.

    python bench/pageweight.py [--tasks 100000] [--rounds 7] [--compare FILE ...]

Seeds a temporary SQLite store (bench/seed.py: tasks over 90 days, 50 users, 4 channels), serves it, and
loads ``/?view=stats`` (7 and 30 days) in Chromium as a user and as an admin, each in a fresh browser
context (nothing cached). Every response the page receives is counted: its body in bytes, and gzipped
(level 6, what a compressing proxy in front would send; mjctl itself sends bodies as they are), grouped
as the page's own files, the JSON statistics and the SVG charts.

Then the server's side, as ratios against a floor measured in the same run: the floor is
``compute_stats`` for the 30 days by day (or by user, for the top-users chart), the measured is the same
plus ``charts.render`` of that same answer, timed separately in each round; medians are printed.

``--compare FILE`` prints the size of other files (a charting library's minified build, say) raw and
gzipped, for setting beside the figures above.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CHROMIUM = "/usr/bin/chromium"


def gz(body: bytes) -> int:
    return len(gzip.compress(body, 6))


def kind(url: str, content_type: str) -> str:
    if "/static/" in url or content_type.startswith("text/html"):
        return "page files"
    if "/api/mj/stats/charts" in url:
        return "charts with their statistics (JSON)"
    if "svg" in content_type:
        return "SVG charts"
    return "JSON"


def load_view(browser, base: str, token: str, days: int) -> list[tuple[str, str, int, int]]:
    """(kind, url, bytes, gzipped bytes) of every response of one cold load of the Statistics view."""
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=base)
    context.add_init_script(f"localStorage.setItem('mjctl.token', {token!r})")
    page = context.new_page()
    seen: list = []
    page.on("response", lambda response: seen.append(response))
    page.goto(f"/?view=stats&days={days}")
    page.wait_for_selector("[data-testid=figure-quota] svg", state="attached")
    if page.locator("[data-testid=top-users]").is_visible():
        page.wait_for_selector("[data-testid=figure-channels] svg", state="attached")
    page.wait_for_load_state("networkidle")
    rows = []
    for response in seen:
        body = response.body()
        rows.append((kind(response.url, response.headers.get("content-type", "")), response.url[len(base):],
                     len(body), gz(body)))
    context.close()
    return rows


def weigh(base: str, tokens: dict[str, str]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        for who in ("user2", "admin"):
            for days in (7, 30):
                rows = load_view(browser, base, tokens[who], days)
                print(f"\n{'admin' if who == 'admin' else 'user'}, last {days} days: {len(rows)} responses")
                groups: dict[str, list[int]] = {}
                for group, url, raw, packed in rows:
                    print(f"  {group:<11} {raw:>8,} B {packed:>7,} B gz  {url[:90]}")
                    totals = groups.setdefault(group, [0, 0, 0])
                    totals[0] += 1
                    totals[1] += raw
                    totals[2] += packed
                for group, (count, raw, packed) in groups.items():
                    print(f"  = {group:<11} {count:>2} responses {raw:>8,} B {packed:>7,} B gz")
                print(f"  = everything     {sum(r[2] for r in rows):>8,} B {sum(r[3] for r in rows):>7,} B gz")
        browser.close()


def render_cost(rounds: int) -> None:
    from mjctl import charts
    from mjctl.stats import compute_stats
    from mjctl.tasks import TaskFilter

    today = int(time.time()) // 86400 * 86400
    filters = TaskFilter(start=today - 29 * 86400)
    print(f"\nserver: compute_stats (floor) against compute_stats + charts.render, 30 days, {rounds} rounds")
    for chart in ("tasks", "run_time", "users"):
        group_by = charts.CHARTS[chart].group_by
        floor, measured = [], []
        for _ in range(rounds):  # each round: the statistics (the floor), then drawing that very answer
            began = time.perf_counter()
            data = compute_stats(filters, group_by)
            floor.append(time.perf_counter() - began)
            began = time.perf_counter()
            svg = charts.render(chart, data)
            measured.append(floor[-1] + time.perf_counter() - began)
        f, m = statistics.median(floor), statistics.median(measured)
        print(f"  {chart:<9} floor {f * 1000:7.1f} ms  with the SVG {m * 1000:7.1f} ms  = {m / f:4.2f}x the floor"
              f"  ({len(svg):,} B SVG)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compare", nargs="*", default=[], metavar="FILE")
    args = parser.parse_args()

    from seed import seed

    from mjctl.config import load_settings
    from mjctl.db import open_store
    from mjctl.httpserver import ServerThread
    from mjctl.server import create_app

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/pageweight.db"
        info = seed(url, tasks=args.tasks, users=50, channels=4)
        settings = load_settings(None, {("database", "url"): url, ("server", "secret"): "bench"})
        open_store(settings)
        server = ServerThread(create_app(settings), threads=4).start()
        try:
            print(f"{args.tasks:,} tasks over 90 days, served at {server.url}")
            weigh(server.url, info["tokens"])
        finally:
            server.stop()
        render_cost(args.rounds)
    for name in args.compare:
        body = Path(name).read_bytes()
        print(f"\n{name}: {len(body):,} B, {gz(body):,} B gz")


if __name__ == "__main__":
    main()
