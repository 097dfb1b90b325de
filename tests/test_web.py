"""The web page at GET /: its static files over HTTP, and the page itself driven in Debian's Chromium.

Browser tests run a real server on a free port over a seeded SQLite store, and change tasks the way the
poller does (mjctl.reports.apply_report with upstream camelCase fields) to watch the page follow without
reloading. Screenshots land in test-output/; the README's docs/screenshot.png is written when missing or
when MJCTL_UPDATE_SCREENSHOT=1 (so ordinary runs do not churn a committed file).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from mjctl import accounts
from mjctl.models import Task
from mjctl.reports import apply_report
from mjctl.sim.png import make_png
from tests.conftest import make_settings
from tests.helpers import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "test-output"
NOW = int(time.time()) - 60  # seeded submit times count back from here; date filters use the same base

PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting", "isometric tiny city on a floating island, pastel colours",
    "portrait of an astronaut cat, studio lighting", "foggy pine forest, morning light, 35mm film",
    "a steampunk owl made of brass gears", "minimal poster of a red bicycle, swiss design",
    "underwater temple with glowing jellyfish", "watercolour map of an imaginary archipelago",
]


def _static_app(app, ctx):
    """Test images served by the same server, standing in for the upstream's image host."""
    import bottle

    @app.get("/test-images/<name>.png", db=False)
    def image(name):
        return bottle.HTTPResponse(body=make_png(name), headers={"Content-Type": "image/png"})


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

    def restart(self, *, stopped_check=None) -> None:
        from mjctl.httpserver import ServerThread

        port = self.server.port
        self.server.stop()
        if stopped_check is not None:
            stopped_check()
        self.server = ServerThread(self.app, port=port, threads=4).start()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def add_task(user: int, mj_id: str, *, channel: int = 1, age: int = 0, **fields) -> Task:
    submit = NOW - age
    return Task.create(user_id=user, channel_id=channel, mj_id=mj_id, submit_time=submit, **fields)


def seed(site: Site) -> None:
    """alice: 25 finished tasks of mixed outcomes; bob: 3 on channel 2; carol: nothing yet."""
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
                 progress="100%", image_url=site.image(f"bob-{n}"), start_time=NOW, finish_time=NOW + 50)


@pytest.fixture
def site(tmp_path):
    from mjctl.db import open_store
    from mjctl.httpserver import ServerThread
    from mjctl.server import create_app

    settings = make_settings(tmp_path, images__forward=False)
    open_store(settings)
    tokens, users = {}, {}
    for name, role in (("alice", "user"), ("bob", "user"), ("carol", "user"), ("admin", "admin")):
        user, tokens[name] = accounts.create_user(name, role=role, quota=100_000)
        users[name] = user.id
    app = create_app(settings, extra=[_static_app])
    # An explicit port, not 0: cheroot sets SO_REUSEADDR only then, and the restart test rebinds it.
    server = ServerThread(app, port=free_port(), threads=4).start()
    site = Site(settings, app, server, tokens, users)
    seed(site)
    yield site
    site.server.stop()


# --- the static files, over plain HTTP ---------------------------------------------------------------


def test_serves_the_page_and_its_files_with_their_types(site):
    with httpx.Client(base_url=site.url) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert 'src="static/app.js"' in page.text and "http" not in page.text.split("<body>")[0]
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            response = client.get(f"/static/{name}")
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
            assert response.headers["cache-control"] == "no-cache"
            again = client.get(f"/static/{name}", headers={"If-None-Match": response.headers["etag"]})
            assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fweb.py", "/static/../web.py",
                                  "/static/%2e%2e%2fapi.py", "/static/", "/static/index.html/x"])
def test_serves_only_its_own_files(site, path):
    response = httpx.get(site.url + path)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")


def test_the_page_needs_no_database(tmp_path):
    """The page loads (and can say the server is unhappy) even when the store is down."""
    from mjctl.httpserver import ServerThread
    from mjctl.server import create_app

    settings = make_settings(tmp_path, database__url="sqlite:////nonexistent/dir/x.db")
    with ServerThread(create_app(settings), threads=2) as server:
        assert httpx.get(server.url + "/").status_code == 200
        assert httpx.get(server.url + "/static/app.js").status_code == 200


# --- in the browser ----------------------------------------------------------------------------------


def _playwright():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need the playwright Python package (pip install playwright)")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=site.url)
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    yield tab
    context.close()


def shot(page, name: str) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def by(page, testid: str):
    return page.get_by_test_id(testid)


def sign_in(page, token: str) -> None:
    page.goto("/")
    by(page, "token").fill(token)
    by(page, "sign-in").click()


browser_test = pytest.mark.browser


@browser_test
def test_a_user_signs_in_sees_own_tasks_and_signs_out(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.tokens["alice"])
    expect(by(page, "role")).to_have_text("User · your tasks")
    expect(by(page, "task-row")).to_have_count(20)
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 25 tasks")
    expect(by(page, "channel-header")).to_be_hidden()
    expect(by(page, "channel")).to_have_count(0)
    first = by(page, "task-row").first
    expect(first.get_by_test_id("mj-id")).to_have_text("1750000000")
    expect(first.get_by_test_id("status")).to_have_text("SUCCESS")
    expect(first.get_by_test_id("progress-label")).to_have_text("100%")
    expect(first.get_by_test_id("thumbnail")).to_be_visible()
    failed = page.locator('[data-testid="task-row"][data-mj-id="1750000003"]')
    expect(failed.get_by_test_id("status")).to_have_text("FAILURE")
    expect(failed.get_by_test_id("fail-reason")).to_have_text("Banned prompt detected")
    assert page.evaluate("getComputedStyle(document.querySelector('.s-FAILURE')).color") != \
        page.evaluate("getComputedStyle(document.querySelector('.s-SUCCESS')).color")
    expect(by(page, "live")).to_be_hidden()  # everything shown is finished
    shot(page, "user-desktop")

    page.reload()  # the token is remembered
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 25 tasks")
    by(page, "sign-out").click()
    expect(by(page, "signin")).to_be_visible()
    assert page.evaluate("localStorage.getItem('mjctl.token')") is None
    page.reload()
    expect(by(page, "signin")).to_be_visible()


@browser_test
def test_an_admin_sees_every_task_and_the_channel_column(page, site):
    from playwright.sync_api import expect

    # one task in flight, as a realistic picture for the README
    add_task(site.users["carol"], "1750009999", channel=2, age=-50, prompt=PROMPTS[6], status="IN_PROGRESS",
             progress="45%", start_time=NOW + 40)
    sign_in(page, site.tokens["admin"])
    expect(by(page, "role")).to_have_text("Admin · all tasks")
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 29 tasks")
    expect(by(page, "channel-header")).to_be_visible()
    expect(by(page, "channel")).to_have_count(20)
    expect(by(page, "live")).to_be_visible()
    expect(by(page, "task-row").first.get_by_test_id("progress-label")).to_have_text("45%")
    # Polled from here, not with page.wait_for_function: its in-page polling compiles the predicate with
    # eval, which the page's CSP (script-src 'self') refuses whenever the first check comes out false.
    wait_until(lambda: page.evaluate("[...document.querySelectorAll('[data-testid=thumbnail] img')]"
                                     ".slice(0, 6).every(i => i.complete && i.naturalWidth > 0)"),
               timeout=10, message="the first six thumbnails loaded")
    shot(page, "admin-desktop")
    readme_shot = REPO / "docs" / "screenshot.png"
    if os.environ.get("MJCTL_UPDATE_SCREENSHOT") or not readme_shot.exists():  # committed; refresh on demand
        readme_shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(readme_shot))

    by(page, "filter-channel").fill("2")
    by(page, "apply-filters").click()
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 4 tasks")
    expect(by(page, "channel")).to_have_text(["2", "2", "2", "2"])


@browser_test
def test_filters_narrow_the_list(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.tokens["alice"])
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 25 tasks")

    by(page, "filter-status").select_option("FAILURE")
    by(page, "apply-filters").click()
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 4 tasks")
    expect(by(page, "status")).to_have_text(["FAILURE"] * 4)

    by(page, "filter-status").select_option("")
    by(page, "filter-action").select_option("UPSCALE")
    by(page, "apply-filters").click()
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 5 tasks")

    by(page, "filter-action").select_option("")
    by(page, "filter-mj-id").fill("1750000012")
    by(page, "apply-filters").click()
    expect(by(page, "mj-id")).to_have_text(["1750000012"])

    # the date range: tasks 2..4 were submitted 1200..2400 s before NOW (local time in the browser)
    by(page, "filter-mj-id").fill("")
    start, end = page.evaluate(
        """([a, b]) => [a, b].map(s => { const d = new Date(s * 1000), p = n => String(n).padStart(2, '0');
             return `${d.getFullYear()}-${p(d.getMonth()+1)}-${p(d.getDate())}T${p(d.getHours())}:`
                  + `${p(d.getMinutes())}:${p(d.getSeconds())}`; })""", [NOW - 2400, NOW - 1200])
    by(page, "filter-start").fill(start)
    by(page, "filter-end").fill(end)
    by(page, "apply-filters").click()
    expect(by(page, "mj-id")).to_have_text(["1750000002", "1750000003", "1750000004"])

    by(page, "filter-mj-id").fill("no-such-task")
    by(page, "apply-filters").click()
    expect(by(page, "empty")).to_have_text("No tasks match these filters.")
    expect(by(page, "message")).to_contain_text("No tasks match")
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 0 tasks")

    by(page, "reset-filters").click()
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 25 tasks")
    expect(by(page, "message")).to_be_hidden()


@browser_test
def test_pages_and_page_sizes(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.tokens["alice"])
    expect(by(page, "prev")).to_be_disabled()
    by(page, "page-size").select_option("10")
    expect(by(page, "page-info")).to_have_text("Page 1 of 3 · 25 tasks")
    expect(by(page, "task-row")).to_have_count(10)
    by(page, "next").click()
    expect(by(page, "page-info")).to_have_text("Page 2 of 3 · 25 tasks")
    expect(by(page, "mj-id").first).to_have_text("1750000010")
    by(page, "next").click()
    expect(by(page, "task-row")).to_have_count(5)
    expect(by(page, "next")).to_be_disabled()
    by(page, "prev").click()
    expect(by(page, "page-info")).to_have_text("Page 2 of 3 · 25 tasks")
    for size, pages in (("50", 1), ("100", 1), ("20", 2)):
        by(page, "page-size").select_option(size)
        expect(by(page, "page-info")).to_have_text(f"Page 1 of {pages} · 25 tasks")
    page.reload()  # the page size is remembered
    expect(by(page, "page-size")).to_have_value("20")


@browser_test
def test_a_running_task_progresses_to_its_thumbnail_without_reloading(page, site):
    from playwright.sync_api import expect

    add_task(site.users["carol"], "live-1", prompt="a slow sunrise", status="SUBMITTED", progress="0%")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/api/mj/" in r.url else None)
    sign_in(page, site.tokens["carol"])
    row = page.locator('[data-testid="task-row"][data-mj-id="live-1"]')
    expect(row.get_by_test_id("progress-label")).to_have_text("0%")
    expect(by(page, "live")).to_be_visible()
    expect(row.get_by_test_id("thumbnail")).to_have_count(0)
    navigations = page.evaluate("performance.getEntriesByType('navigation').length")

    for progress in ("12%", "57%", "88%"):
        apply_report(1, {"id": "live-1", "status": "IN_PROGRESS", "progress": progress})
        expect(row.get_by_test_id("progress-label")).to_have_text(progress)
        expect(row.get_by_test_id("status")).to_have_text("IN_PROGRESS")
    width = row.locator(".bar").evaluate("b => b.style.width")
    assert width == "88%"
    apply_report(1, {"id": "live-1", "status": "SUCCESS", "progress": "100%", "imageUrl": site.image("live-1"),
                     "finishTime": int(time.time() * 1000)})
    expect(row.get_by_test_id("status")).to_have_text("SUCCESS")
    expect(row.get_by_test_id("progress-label")).to_have_text("100%")
    thumb = row.get_by_test_id("thumbnail")
    expect(thumb).to_be_visible()
    thumb.locator("img").evaluate("i => i.complete ? true : new Promise(r => i.onload = r)")
    assert thumb.locator("img").evaluate("i => i.naturalWidth") > 0
    assert page.evaluate("performance.getEntriesByType('navigation').length") == navigations  # no reload
    expect(by(page, "live")).to_be_hidden()

    # nothing unfinished is shown: the page stops asking
    settled = len(requests)
    page.wait_for_timeout(4000)
    assert len(requests) == settled

    thumb.click()
    expect(by(page, "lightbox")).to_be_visible()
    expect(by(page, "lightbox-link")).to_have_attribute("href", site.image("live-1"))
    shot(page, "lightbox")
    page.keyboard.press("Escape")
    expect(by(page, "lightbox")).to_be_hidden()


@browser_test
def test_a_bad_token_is_refused_with_a_clear_message(page, site):
    from playwright.sync_api import expect

    sign_in(page, "not-a-real-token")
    expect(by(page, "message")).to_contain_text("Your token was not accepted (401)")
    expect(by(page, "signin")).to_be_visible()
    expect(by(page, "tasks")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('mjctl.token')") is None
    shot(page, "bad-token")

    sign_in(page, site.tokens["alice"])  # a good token afterwards works
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 25 tasks")


@browser_test
def test_an_empty_list_says_so(page, site):
    from playwright.sync_api import expect

    sign_in(page, site.tokens["carol"])
    expect(by(page, "empty")).to_have_text("No tasks yet.")
    expect(by(page, "message")).to_contain_text("There are no tasks yet")


@browser_test
def test_task_text_is_shown_as_text(page, site):
    from playwright.sync_api import expect

    evil = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    add_task(site.users["carol"], "<i>x</i>", prompt=evil, status="FAILURE", fail_reason="<script>x()</script>",
             image_url="javascript:window.__pwned=2")
    sign_in(page, site.tokens["carol"])
    row = by(page, "task-row")
    expect(row.get_by_test_id("prompt")).to_have_text(evil)
    expect(row.get_by_test_id("mj-id")).to_have_text("<i>x</i>")
    expect(row.get_by_test_id("fail-reason")).to_have_text("<script>x()</script>")
    expect(row.get_by_test_id("thumbnail")).to_have_count(0)  # not an http(s) URL: no image, no link
    assert row.locator("img, b, i, script").count() == 0
    assert page.evaluate("window.__pwned") is None


@browser_test
def test_works_on_a_375_pixel_wide_phone(browser, site):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 375, "height": 812}, base_url=site.url, is_mobile=True,
                                  has_touch=True, device_scale_factor=2)
    page = context.new_page()
    try:
        sign_in(page, site.tokens["admin"])
        expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 28 tasks")
        # the page itself never scrolls sideways; the table does, inside its frame
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        wrap = by(page, "table-wrap")
        assert wrap.evaluate("w => w.scrollWidth > w.clientWidth")
        for testid in ("filter-mj-id", "filter-status", "apply-filters", "next", "page-size", "sign-out"):
            box = by(page, testid).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, testid
        wrap.evaluate("w => w.scrollLeft = w.scrollWidth")
        expect(by(page, "fail-reason").first).to_be_in_viewport()
        wrap.evaluate("w => w.scrollLeft = 0")
        by(page, "next").click()
        expect(by(page, "page-info")).to_have_text("Page 2 of 2 · 28 tasks")
        shot(page, "phone-375")
    finally:
        context.close()


@browser_test
def test_survives_a_server_restart(page, site):
    from playwright.sync_api import expect

    add_task(site.users["carol"], "restart-1", prompt="keeps running", status="IN_PROGRESS", progress="30%")
    sign_in(page, site.tokens["carol"])
    row = page.locator('[data-testid="task-row"][data-mj-id="restart-1"]')
    expect(row.get_by_test_id("progress-label")).to_have_text("30%")

    def the_page_notices():
        expect(by(page, "message")).to_contain_text("Cannot reach the mjctl server")
        expect(by(page, "message")).to_have_attribute("data-kind", "error")
        shot(page, "server-down")

    site.restart(stopped_check=the_page_notices)
    apply_report(1, {"id": "restart-1", "status": "IN_PROGRESS", "progress": "70%"})
    expect(by(page, "message")).to_be_hidden()
    expect(row.get_by_test_id("progress-label")).to_have_text("70%")
    expect(by(page, "tasks")).to_be_visible()
