"""The task page as its readers meet it, each behaviour checked on a 375 px phone and a 1366 px laptop
(``screen_page``): cards on phones and filters behind a button, names for admins' users and channels,
durations counted from submission, upstream messages in English, the address keeping filters and page,
copying ids, the balance and each task's cost, the English prompt, and Chinese text in a font that has it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import httpx
import pytest
from playwright.sync_api import expect

from mjctl import accounts
from mjctl.models import Task
from mjctl.reports import apply_report
from tests.webpage import COPIED_MS, PROMPTS, SUGGEST_MS, by, refresh_once, row, shot, sign_in, stop_the_clock

pytest_plugins = ["tests.webfixtures"]  # site, browser, screen_page
pytestmark = pytest.mark.browser


def open_filters(page) -> None:
    """On a phone the filters sit behind their button: open them (a no-op on wide screens)."""
    toggle = by(page, "filters-toggle")
    if toggle.is_visible() and toggle.get_attribute("aria-expanded") != "true":
        toggle.click()
    expect(by(page, "filters")).to_be_visible()


def seconds_of(text: str) -> int:
    """ "1h 02m", "3m 07s", "slow 12m 00s" as seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])\b", text))


def carol_task(site, mj_id: str, **fields) -> Task:
    fields.setdefault("submit_time", int(time.time()) - 30)
    return Task.create(user_id=site.users["carol"], channel_id=1, mj_id=mj_id, **fields)


# --- 1. a card per task on a phone, the filters folded away ------------------------------------------


def test_phones_get_a_card_per_task_and_folded_filters(screen_page, site):
    page = screen_page
    sign_in(page, site.tokens["admin"])
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 28 tasks")
    width = page.viewport_size["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # the page never scrolls sideways
    first = by(page, "task-row").first
    if page.screen == "phone":
        # the filters wait behind their button; the first card is on the first screen
        expect(by(page, "filters")).to_be_hidden()
        expect(by(page, "filters-toggle")).to_have_attribute("aria-expanded", "false")
        expect(first).to_be_in_viewport()
        wrap = by(page, "table-wrap")
        assert wrap.evaluate("w => w.scrollWidth <= w.clientWidth")  # nothing hidden to the side
        for testid in ("status", "mj-id", "copy-id", "prompt", "duration", "cost", "user", "channel", "thumbnail"):
            box = first.get_by_test_id(testid).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, testid
        card = first.bounding_box()
        assert card["width"] <= width and card["height"] < 400
        # a card is a box of its own, labelled fields and not table columns
        assert first.evaluate("r => getComputedStyle(r).display") == "grid"
        expect(first.locator("td.duration")).to_have_attribute("data-label", "Duration")
        by(page, "filters-toggle").click()
        expect(by(page, "filters")).to_be_visible()
        expect(by(page, "filters-toggle")).to_have_attribute("aria-expanded", "true")
        by(page, "filter-status").select_option("SUCCESS")
        by(page, "apply-filters").click()
        expect(by(page, "filters")).to_be_hidden()  # folded again, the results in view
        expect(by(page, "filters-toggle")).to_have_text("Filters (1)")
        expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 24 tasks")
        shot(page, "phone-375")
    else:
        expect(by(page, "filters-toggle")).to_be_hidden()
        expect(by(page, "filters")).to_be_visible()
        expect(by(page, "task-table").locator("thead")).to_be_visible()
        assert first.evaluate("r => getComputedStyle(r).display") == "table-row"
        wrap = by(page, "table-wrap")
        assert wrap.evaluate("w => w.scrollWidth <= w.clientWidth")  # every column fits at 1366 px
    for testid in ("filters-toggle", "next", "page-size", "sign-out", "balance"):
        box = by(page, testid).bounding_box()
        if box:
            assert box["x"] >= 0 and box["x"] + box["width"] <= width, testid


# --- 2. admins: users and channels by name -----------------------------------------------------------


def test_admins_see_and_filter_by_user_and_channel_names(screen_page, site):
    page = screen_page
    carol_task(site, "running-1", prompt="keeps the page refreshing", status="IN_PROGRESS", progress="5%")
    stop_the_clock(page)
    sign_in(page, site.tokens["admin"])
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 29 tasks")
    expect(row(page, "bob-0").get_by_test_id("user")).to_have_text("bob")
    expect(row(page, "bob-0").get_by_test_id("channel")).to_have_text("relax-pool")
    expect(row(page, "1750000000").get_by_test_id("user")).to_have_text("alice")
    expect(row(page, "1750000000").get_by_test_id("channel")).to_have_text("fast-lane")
    open_filters(page)
    channel = by(page, "filter-channel")
    assert channel.evaluate("s => [...s.options].map(o => o.textContent)") == ["any", "fast-lane", "relax-pool"]

    user = by(page, "filter-user")
    user.fill("bo")  # suggestions come from the names on the server
    page.clock.run_for(SUGGEST_MS)
    expect(by(page, "user-suggestions").locator("option")).to_have_count(1)
    assert by(page, "user-suggestions").locator("option").get_attribute("value") == "bob"
    by(page, "filter-status").focus()  # typed, not applied: a live refresh leaves it alone
    refresh_once(page)
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 29 tasks")
    expect(user).to_have_value("bo")
    user.fill("bob")
    by(page, "apply-filters").click()
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 3 tasks")
    expect(by(page, "user")).to_have_text(["bob"] * 3)
    assert "user_id=" in page.url

    open_filters(page)
    user.fill("")
    channel.select_option(label="fast-lane")
    by(page, "apply-filters").click()
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 26 tasks")
    expect(by(page, "channel").first).to_have_text("fast-lane")

    open_filters(page)
    user.fill("nobody")
    by(page, "apply-filters").click()
    expect(by(page, "user-error")).to_have_text('No user is named "nobody".')
    expect(user).to_have_attribute("aria-invalid", "true")
    expect(user).to_be_focused()
    refresh_once(page)
    expect(by(page, "user-error")).to_be_visible()  # it stays until the field changes
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 26 tasks")  # the list stays as it was
    user.fill("")
    expect(by(page, "user-error")).to_be_hidden()

    page.reload()  # the filters survive, shown by name
    open_filters(page)
    expect(by(page, "filter-channel").locator("option:checked")).to_have_text("fast-lane")
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 26 tasks")


def test_users_see_no_admin_columns_or_filters(screen_page, site):
    page = screen_page
    sign_in(page, site.tokens["alice"])
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 25 tasks")
    open_filters(page)
    for testid in ("filter-user", "filter-channel", "user-header", "channel-header"):
        expect(by(page, testid)).to_be_hidden()
    expect(by(page, "user")).to_have_count(0)
    expect(by(page, "channel")).to_have_count(0)


# --- 4. durations count from submission --------------------------------------------------------------


def test_durations_count_from_submission_and_never_jump_back(screen_page, site):
    page = screen_page
    submitted = int(time.time()) - 69
    carol_task(site, "queued-1", prompt="a slow queue", status="SUBMITTED", progress="0%", submit_time=submitted)
    carol_task(site, "long-1", prompt="took ages", status="SUCCESS", progress="100%", submit_time=submitted - 900,
               start_time=submitted - 300, finish_time=submitted - 180)
    carol_task(site, "quick-1", prompt="quick", status="SUCCESS", progress="100%", submit_time=submitted - 100,
               start_time=submitted - 95, finish_time=submitted - 40)
    stop_the_clock(page)
    sign_in(page, site.tokens["carol"])
    queued = row(page, "queued-1")
    expect(queued.get_by_test_id("duration")).to_have_text(re.compile(r"^1m \d\ds$"))
    assert seconds_of(queued.get_by_test_id("duration").inner_text()) >= 69
    expect(queued.get_by_test_id("duration-cell")).to_have_attribute("title", re.compile(r"^queued for 1m \d\ds$"))

    started = int(time.time() * 1000)
    apply_report(1, {"id": "queued-1", "status": "IN_PROGRESS", "progress": "10%", "startTime": started})
    refresh_once(page)
    expect(queued.get_by_test_id("status")).to_have_text("IN_PROGRESS")
    assert seconds_of(queued.get_by_test_id("duration").inner_text()) >= 69  # still from submission
    expect(queued.get_by_test_id("duration-cell")).to_have_attribute(
        "title", re.compile(r"^queued 1m \d\ds, running for \d+s$"))

    finish = submitted + 100
    apply_report(1, {"id": "queued-1", "status": "SUCCESS", "progress": "100%", "finishTime": finish * 1000})
    refresh_once(page)
    expect(queued.get_by_test_id("status")).to_have_text("SUCCESS")
    expect(queued.get_by_test_id("duration")).to_have_text("1m 40s")  # finish - submit
    expect(queued.get_by_test_id("duration-cell")).to_have_attribute("title",
                                                                      re.compile(r"^queued 1m \d\ds, ran \d+s$"))

    long = row(page, "long-1")
    expect(long.get_by_test_id("duration")).to_have_text("slow 12m 00s")
    expect(long.get_by_test_id("duration-cell")).to_have_attribute("title", "queued 10m 00s, ran 2m 00s")
    expect(long.get_by_test_id("duration-cell")).to_have_attribute("data-long", "true")
    expect(row(page, "quick-1").get_by_test_id("duration")).to_have_text("1m 00s")
    expect(row(page, "quick-1").get_by_test_id("duration-cell")).not_to_have_attribute("data-long", "true")
    detail = long.get_by_test_id("duration-detail")
    if page.screen == "phone":  # no hover on a phone: the parts are written out in the card
        expect(detail).to_be_visible()
        expect(detail).to_have_text("queued 10m 00s, ran 2m 00s")
    else:
        expect(detail).to_be_hidden()


# --- 5. upstream messages in English -----------------------------------------------------------------


MESSAGES = {
    "timeout": ("任务超时", "Task timed out"),
    "queued": ("排队中，前面还有6个任务", "Queued, 6 tasks ahead"),
    "full": ("队列已满", "Queue full"),
    "minutes": ("执行超时 5 分钟", "Timed out after 5 minutes"),
    "unknown": ("未知的错误", "未知的错误"),
    "english": ("Banned prompt detected", "Banned prompt detected"),
}


def test_upstream_messages_are_shown_in_english_with_the_original_on_hover(screen_page, site):
    page = screen_page
    for name, (original, _) in MESSAGES.items():
        carol_task(site, f"msg-{name}", prompt=name, status="FAILURE", fail_reason=original)
    sign_in(page, site.tokens["carol"])
    for name, (original, english) in MESSAGES.items():
        task = row(page, f"msg-{name}")
        expect(task.get_by_test_id("fail-reason")).to_have_text(english)
        reason = task.locator("td.reason")
        if original != english:
            expect(reason).to_have_attribute("title", original)
            source = task.get_by_test_id("fail-reason-original")
            expect(source).to_have_text(original)
            if page.screen == "phone":
                expect(source).to_be_visible()
            else:
                expect(source).to_be_hidden()
        else:
            expect(task.get_by_test_id("fail-reason-original")).to_have_count(0)
            assert reason.get_attribute("title") in (None, "")
    # the API keeps the upstream's words
    items = httpx.get(f"{site.url}/api/mj/self?page_size=100",
                      headers={"Authorization": f"Bearer {site.tokens['carol']}"}).json()["data"]["items"]
    assert {item["mj_id"]: item["fail_reason"] for item in items} == {
        f"msg-{name}": original for name, (original, _) in MESSAGES.items()}


# --- 6. the address, copying, balance, cost, the English prompt ---------------------------------------


def test_filters_and_page_live_in_the_address(screen_page, site):
    page = screen_page
    sign_in(page, site.tokens["alice"])
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 25 tasks")
    by(page, "next").click()
    expect(by(page, "page-info")).to_have_text("Page 2 of 2 · 25 tasks")
    assert page.url.endswith("/?p=2")
    open_filters(page)
    by(page, "filter-status").select_option("FAILURE")
    by(page, "apply-filters").click()
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 4 tasks")
    assert page.url.endswith("/?status=FAILURE")

    page.reload()  # filters and page survive a reload
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 4 tasks")
    open_filters(page)
    expect(by(page, "filter-status")).to_have_value("FAILURE")

    page.go_back()  # back to page 2 of everything
    expect(by(page, "page-info")).to_have_text("Page 2 of 2 · 25 tasks")
    expect(by(page, "filter-status")).to_have_value("")
    page.go_back()
    expect(by(page, "page-info")).to_have_text("Page 1 of 2 · 25 tasks")
    page.go_forward()
    page.go_forward()
    expect(by(page, "page-info")).to_have_text("Page 1 of 1 · 4 tasks")
    expect(by(page, "status")).to_have_text(["FAILURE"] * 4)

    page.goto("/?mj_id=1750000012&page_size=10")  # a shared link opens on its filters
    expect(by(page, "mj-id")).to_have_text(["1750000012"])
    expect(by(page, "page-size")).to_have_value("10")


def test_copy_a_task_id(screen_page, site):
    page = screen_page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.url)
    stop_the_clock(page)
    sign_in(page, site.tokens["alice"])
    button = row(page, "1750000004").get_by_test_id("copy-id")
    expect(button).to_have_accessible_name("Copy task id 1750000004")
    button.click()
    expect(by(page, "announce")).to_have_text("Copied task id 1750000004")
    expect(button).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "1750000004"
    page.clock.run_for(COPIED_MS)
    expect(button).to_have_text("Copy")


def test_balance_cost_and_english_prompt(screen_page, site):
    page = screen_page
    carol_task(site, "cjk-1", prompt="一只红色的狐狸 --ar 16:9", prompt_en="a red fox --ar 16:9", status="SUCCESS",
               progress="100%", quota=1500, finish_time=int(time.time()))
    carol_task(site, "same-1", prompt=PROMPTS[0], prompt_en=PROMPTS[0], status="FAILURE", fail_reason="x", quota=0)
    sign_in(page, site.tokens["carol"])
    expect(by(page, "balance")).to_have_text("Balance 100,000")
    expect(by(page, "balance")).to_be_in_viewport()
    expect(by(page, "account-name")).to_have_text("carol")
    fox = row(page, "cjk-1")
    expect(fox.get_by_test_id("cost")).to_have_text("1,500")
    expect(fox.get_by_test_id("prompt")).to_have_text("一只红色的狐狸 --ar 16:9")
    expect(fox.get_by_test_id("prompt-en")).to_have_text("a red fox --ar 16:9")
    expect(fox.get_by_test_id("prompt-en")).to_be_visible()
    expect(row(page, "same-1").get_by_test_id("cost")).to_have_text("0")
    expect(row(page, "same-1").get_by_test_id("prompt-en")).to_have_text("same")

    accounts.topup("carol", 2345)
    page.locator('[data-testid="refresh"]:visible').click()  # one in the filters, one beside them on phones
    expect(by(page, "balance")).to_have_text("Balance 102,345")


# --- 7. Chinese text in a font that has it -----------------------------------------------------------


def cjk_fonts_installed() -> bool:
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(out.strip())


def test_chinese_text_is_drawn_with_a_cjk_font(screen_page, site):
    page = screen_page
    page.goto("/")
    stack = page.evaluate("getComputedStyle(document.documentElement).fontFamily")
    for family in ("Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", "WenQuanYi Micro Hei"):
        assert family in stack, family
    if not cjk_fonts_installed():
        reason = "no font with Chinese glyphs is installed (apt-get install fonts-wqy-microhei, as .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    carol_task(site, "cjk-2", prompt="一只红色的狐狸", status="FAILURE", fail_reason="未知的错误")
    sign_in(page, site.tokens["carol"])
    expect(row(page, "cjk-2").get_by_test_id("prompt")).to_have_text("一只红色的狐狸")
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument")["root"]["nodeId"]
    for selector in ('[data-mj-id="cjk-2"] [data-testid="prompt"]', '[data-mj-id="cjk-2"] [data-testid="fail-reason"]'):
        node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
        # every glyph comes from one of the stack's CJK fonts: none is left to a box
        assert fonts and all(font["familyName"] in stack for font in fonts), fonts
        assert sum(font["glyphCount"] for font in fonts) >= 5, fonts
