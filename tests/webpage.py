"""What the web page's browser tests share: a real server on a free port over a seeded SQLite store, Debian's
Chromium through playwright, and axe-core for the accessibility checks.

The fixtures (site, browser, page, screen_page) live in tests/webfixtures.py, which a test module loads with
``pytest_plugins = ["tests.webfixtures"]``; the seeded data:
alice has 25 finished tasks of mixed outcomes on channel 1 ("fast-lane"), bob 3 on channel 2
("relax-pool"), carol nothing; admin sees them all. Tasks change the way the poller changes them
(mjctl.reports.apply_report with upstream camelCase fields), so the page can be watched following along.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mjctl.models import Task
from mjctl.sim.png import make_png

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "test-output"
REFRESH_MS = 3000  # app.js refreshes a page showing unfinished tasks this often
SUGGEST_MS = 200  # and asks for user names this long after typing in the user filter stops
COPIED_MS = 1500  # and says "Copied" on a copy button this long
NOW = int(time.time()) - 60  # seeded submit times count back from here; date filters use the same base
#: Where .ci/run installs axe-core (npm install --prefix .cache/npm); $MJCTL_TEST_AXE_JS names another copy.
AXE_JS = Path(os.environ.get("MJCTL_TEST_AXE_JS") or REPO / ".cache/npm/node_modules/axe-core/axe.min.js")
#: The two screens every reader-facing behaviour is checked on: a phone and a laptop.
SCREENS = {"phone": {"width": 375, "height": 812}, "desktop": {"width": 1366, "height": 900}}
CHANNELS = ("fast-lane", "relax-pool")

PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting", "isometric tiny city on a floating island, pastel colours",
    "portrait of an astronaut cat, studio lighting", "foggy pine forest, morning light, 35mm film",
    "a steampunk owl made of brass gears", "minimal poster of a red bicycle, swiss design",
    "underwater temple with glowing jellyfish", "watercolour map of an imaginary archipelago",
]


def static_images(app, ctx):
    """Test images served by the same server, standing in for the upstream's image host."""
    import bottle

    @app.get("/test-images/<name>.png", db=False)
    def image(name):
        return bottle.HTTPResponse(body=make_png(name), headers={"Content-Type": "image/png"})

    @app.get("/test-images/<name>.mp4", db=False)
    def video(name):
        from mjctl.sim.mp4 import make_mp4

        return bottle.HTTPResponse(body=make_mp4(name), headers={"Content-Type": "video/mp4"})


@dataclass
class Site:
    settings: object
    app: object
    server: object
    tokens: dict[str, str]
    users: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def image(self, name: str) -> str:
        return f"{self.url}/test-images/{name}.png"

    def video(self, name: str) -> str:
        return f"{self.url}/test-images/{name}.mp4"

    def restart(self, *, stopped_check=None) -> None:
        from mjctl.httpserver import ServerThread

        port = self.server.port
        self.server.stop()
        if stopped_check is not None:
            stopped_check()
        self.server = ServerThread(self.app, port=port, threads=4).start()


def add_task(user: int, mj_id: str, *, channel: int = 1, age: int = 0, **fields) -> Task:
    submit = NOW - age
    return Task.create(user_id=user, channel_id=channel, mj_id=mj_id, submit_time=submit, **fields)


def seed(site: Site) -> None:
    alice, bob = site.users["alice"], site.users["bob"]
    for n in reversed(range(25)):  # oldest first, so ids grow with submit time
        mj_id = f"17500{n:05d}"
        fields = dict(prompt=PROMPTS[n % len(PROMPTS)], action="IMAGINE" if n % 5 else "UPSCALE", quota=1000)
        if n % 7 == 3:
            fields.update(status="FAILURE", progress="", fail_reason="Banned prompt detected", quota=0,
                          start_time=NOW - n * 600 + 5, finish_time=NOW - n * 600 + 9)
        else:
            fields.update(status="SUCCESS", progress="100%", image_url=site.image(mj_id),
                          start_time=NOW - n * 600 + 4, finish_time=NOW - n * 600 + 58 + n)
        add_task(alice, mj_id, age=n * 600, **fields)
    for n in reversed(range(3)):
        add_task(bob, f"bob-{n}", channel=2, age=n * 60 + 30, prompt=f"bob's picture {n}", status="SUCCESS",
                 progress="100%", image_url=site.image(f"bob-{n}"), start_time=NOW, finish_time=NOW + 50,
                 quota=1500)


def playwright_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need the playwright Python package (pip install playwright)")
    return sync_playwright


def open_tab(browser, site: Site, screen: str = "desktop", **options):
    """A new context and tab at one of SCREENS (a phone is a touch device at twice the pixel density)."""
    if screen == "phone":
        options = {"is_mobile": True, "has_touch": True, "device_scale_factor": 2, **options}
    context = browser.new_context(viewport=SCREENS[screen], base_url=site.url, **options)
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    return tab


def shot(page, name: str) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def by(page, testid: str):
    return page.get_by_test_id(testid)


def row(page, mj_id: str):
    return page.locator(f'[data-testid="task-row"][data-mj-id="{mj_id}"]')


def stop_the_clock(page) -> None:
    """Stop the page's clock before it loads: its timers then fire only when the test runs the clock on
    (page.clock.run_for, refresh_once). The clock's performance object has no entries: a test that
    needs to see requests listens for them."""
    page.clock.install()
    page.clock.pause_at(time.time() + 1)


def refresh_once(page) -> None:
    """Run the stopped clock on to the page's next refresh and wait for the listing it asks for."""
    with page.expect_response(lambda response: "/api/mj/" in response.url):
        page.clock.run_for(REFRESH_MS)


def sign_in(page, token: str, path: str = "/") -> None:
    page.goto(path)
    by(page, "token").fill(token)
    by(page, "sign-in").click()


def require_axe() -> None:
    """Skip the test when axe-core is not installed, saying how to get it; under CI a missing copy fails."""
    if not AXE_JS.exists():
        reason = (f"the accessibility check needs axe-core at {AXE_JS} "
                  "(npm install --prefix .cache/npm axe-core, as .ci/run does; or set $MJCTL_TEST_AXE_JS)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def axe_violations(page, *, impacts=("serious", "critical")) -> list[dict]:
    """axe-core's violations of the page as it stands, of the given impacts: each rule with its nodes.

    axe runs inside the page (evaluated through the DevTools protocol, which the page's CSP does not
    govern)."""
    require_axe()
    if not page.evaluate("typeof window.axe === 'object'"):
        page.evaluate(AXE_JS.read_text(encoding="utf-8"))
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return JSON.stringify(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.map(n => ({target: n.target, summary: n.failureSummary}))})));
    }""")
    return [v for v in json.loads(result) if v["impact"] in impacts]
