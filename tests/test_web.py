"""The web page at GET /: its static files over HTTP, and the page itself driven in Debian's Chromium.

Browser tests run a real server on a free port over a seeded SQLite store, and change tasks the way the
poller does (mjctl.reports.apply_report with upstream camelCase fields) to watch the page follow without
reloading. Screenshots land in test-output/; the README's docs/screenshot.png is written when missing or
when MJCTL_TEST_UPDATE_SCREENSHOT=1 (so ordinary runs do not churn a committed file).
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from mjctl.reports import apply_report
from tests.helpers import app_client, make_settings, wait_until
from tests.webpage import NOW, PROMPTS, REFRESH_MS, REPO, add_task, by, refresh_once, shot, sign_in, stop_the_clock

pytest_plugins = ["tests.webfixtures"]  # the site, browser and page fixtures

# --- the static files: the app in process, and the paths that try to leave the folder over the socket ----


def test_serves_the_page_and_its_files_with_their_types(site):
    with app_client(site.app, base_url=site.url) as client:
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
    from mjctl.server import create_app

    settings = make_settings(tmp_path, database__url="sqlite:////nonexistent/dir/x.db")
    with app_client(create_app(settings)) as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200


# --- in the browser ----------------------------------------------------------------------------------


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

    # a realistic picture for the README: one task in flight, one queued with a Chinese prompt, one that
    # timed out upstream after a long wait
    now = int(time.time())
    add_task(site.users["carol"], "1750009997", age=NOW - now + 1500, prompt="a storm over a harbour, 35mm",
             status="FAILURE", progress="", fail_reason="任务超时", start_time=now - 1400, finish_time=now - 800)
    add_task(site.users["carol"], "1750009998", channel=2, age=NOW - now + 41, prompt="一只红色的狐狸，油画风格",
             prompt_en="a red fox, oil painting style", status="SUBMITTED", progress="0%")
    add_task(site.users["carol"], "1750009999", channel=2, age=NOW - now + 95, prompt=PROMPTS[6],
             status="IN_PROGRESS", progress="45%", start_time=now - 22, quota=1000)
    sign_in(page, site.tokens["admin"])
    expect(by(page, "role")).to_have_text("Admin · all tasks")
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 31 tasks")
    expect(by(page, "channel-header")).to_be_visible()
    expect(by(page, "channel")).to_have_count(20)
    expect(by(page, "live")).to_be_visible()
    expect(by(page, "task-row").first.get_by_test_id("progress-label")).to_have_text("45%")
    expect(by(page, "task-row").nth(2).get_by_test_id("fail-reason")).to_have_text("Task timed out")
    # Polled from here, not with page.wait_for_function: its in-page polling compiles the predicate with
    # eval, which the page's CSP (script-src 'self') refuses whenever the first check comes out false.
    wait_until(lambda: page.evaluate("[...document.querySelectorAll('[data-testid=thumbnail] img')]"
                                     ".slice(0, 6).every(i => i.complete && i.naturalWidth > 0)"),
               timeout=10, message="the first six thumbnails loaded")
    shot(page, "admin-desktop")
    readme_shot = REPO / "docs" / "screenshot.png"
    if os.environ.get("MJCTL_TEST_UPDATE_SCREENSHOT") or not readme_shot.exists():  # committed; refresh on demand
        readme_shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(readme_shot))

    by(page, "filter-channel").select_option(label="relax-pool")
    by(page, "apply-filters").click()
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 5 tasks")
    expect(by(page, "channel")).to_have_text(["relax-pool"] * 5)


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
    stop_the_clock(page)
    sign_in(page, site.tokens["carol"])
    row = page.locator('[data-testid="task-row"][data-mj-id="live-1"]')
    expect(row.get_by_test_id("progress-label")).to_have_text("0%")
    expect(by(page, "live")).to_be_visible()
    expect(row.get_by_test_id("thumbnail")).to_have_count(0)
    page.evaluate("window.mjctlTestMark = 'same page'")  # a reload would lose it

    for progress in ("12%", "57%", "88%"):
        apply_report(1, {"id": "live-1", "status": "IN_PROGRESS", "progress": progress})
        refresh_once(page)
        expect(row.get_by_test_id("progress-label")).to_have_text(progress)
        expect(row.get_by_test_id("status")).to_have_text("IN_PROGRESS")
    width = row.locator(".bar").evaluate("b => b.style.width")
    assert width == "88%"
    apply_report(1, {"id": "live-1", "status": "SUCCESS", "progress": "100%", "imageUrl": site.image("live-1"),
                     "finishTime": int(time.time() * 1000)})
    refresh_once(page)
    expect(row.get_by_test_id("status")).to_have_text("SUCCESS")
    expect(row.get_by_test_id("progress-label")).to_have_text("100%")
    thumb = row.get_by_test_id("thumbnail")
    expect(thumb).to_be_visible()
    thumb.locator("img").evaluate("i => i.complete ? true : new Promise(r => i.onload = r)")
    assert thumb.locator("img").evaluate("i => i.naturalWidth") > 0
    assert page.evaluate("window.mjctlTestMark") == "same page"  # no reload
    expect(by(page, "live")).to_be_hidden()

    # nothing unfinished is shown: a minute passes and the page does not ask again. The Refresh button's
    # request comes after any the page would have made on its own.
    settled = len(requests)
    page.clock.run_for(60_000)
    with page.expect_request(lambda r: "/api/mj/" in r.url):
        page.locator('[data-testid="refresh"]:visible').click()  # one in the filters, one beside them on phones
    assert len(requests) == settled + 1

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
def test_survives_a_server_restart(page, site):
    from playwright.sync_api import expect

    add_task(site.users["carol"], "restart-1", prompt="keeps running", status="IN_PROGRESS", progress="30%")
    stop_the_clock(page)
    sign_in(page, site.tokens["carol"])
    row = page.locator('[data-testid="task-row"][data-mj-id="restart-1"]')
    expect(row.get_by_test_id("progress-label")).to_have_text("30%")

    def the_page_notices():
        page.clock.run_for(REFRESH_MS)
        expect(by(page, "message")).to_contain_text("Cannot reach the mjctl server")
        expect(by(page, "message")).to_have_attribute("data-kind", "error")
        shot(page, "server-down")

    site.restart(stopped_check=the_page_notices)
    apply_report(1, {"id": "restart-1", "status": "IN_PROGRESS", "progress": "70%"})
    refresh_once(page)
    expect(by(page, "message")).to_be_hidden()
    expect(row.get_by_test_id("progress-label")).to_have_text("70%")
    expect(by(page, "tasks")).to_be_visible()
