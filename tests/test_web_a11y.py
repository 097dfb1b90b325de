"""The task page for every reader, on a 375 px phone and a 1366 px laptop: axe-core finds nothing serious
or critical in any state of the page, the lightbox is a modal dialog that holds and returns the focus,
colours reach WCAG AA, and progress bars have names."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from mjctl.models import Task
from tests.helpers import wait_until
from tests.webpage import axe_violations, by, refresh_once, require_axe, row, shot, sign_in, stop_the_clock

pytest_plugins = ["tests.webfixtures"]  # site, browser, screen_page
pytestmark = pytest.mark.browser


def assert_no_violations(page, where: str) -> None:
    found = axe_violations(page)
    assert not found, f"{where} ({page.screen}): " + "; ".join(
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes'][:3]]}" for v in found)


def test_axe_finds_nothing_serious_in_any_state_of_the_page(screen_page, site):
    require_axe()
    page = screen_page
    Task.create(user_id=site.users["carol"], channel_id=1, mj_id="queued-1", prompt="一只红色的狐狸",
                prompt_en="a red fox", status="SUBMITTED", progress="0%", submit_time=int(time.time()) - 30)
    Task.create(user_id=site.users["carol"], channel_id=1, mj_id="failed-1", prompt="a storm", status="FAILURE",
                fail_reason="任务超时", submit_time=int(time.time()) - 900, finish_time=int(time.time()) - 10)
    page.goto("/")
    expect(by(page, "signin")).to_be_visible()
    assert_no_violations(page, "the sign-in form")

    sign_in(page, "not-a-real-token")
    expect(by(page, "message")).to_contain_text("not accepted")
    assert_no_violations(page, "a refused token")

    sign_in(page, site.tokens["carol"])  # light content: two tasks, one queued, one failed in Chinese
    expect(by(page, "task-row")).to_have_count(2)
    assert_no_violations(page, "a user's short list")
    if page.screen == "phone":
        by(page, "filters-toggle").click()
        expect(by(page, "filters")).to_be_visible()
        assert_no_violations(page, "the unfolded filters")

    by(page, "sign-out").click()
    sign_in(page, site.tokens["alice"])
    expect(by(page, "task-row")).to_have_count(20)
    assert_no_violations(page, "a user's full page")

    row(page, "1750000000").get_by_test_id("thumbnail").click()
    expect(by(page, "lightbox")).to_be_visible()
    assert_no_violations(page, "the lightbox")
    page.keyboard.press("Escape")

    by(page, "sign-out").click()
    sign_in(page, site.tokens["admin"])
    expect(by(page, "task-row")).to_have_count(20)
    expect(by(page, "user").first).not_to_have_text("")
    assert_no_violations(page, "the admin view")
    row(page, "bob-0").get_by_test_id("thumbnail").click()
    expect(by(page, "lightbox")).to_be_visible()
    assert_no_violations(page, "the admin view's lightbox")
    page.keyboard.press("Escape")

    Task.create(user_id=site.users["bob"], channel_id=2, mj_id="video-1", action="VIDEO", prompt="it moves",
                mode="RELAX", status="SUCCESS", progress="100%", image_url=site.image("video-1"),
                video_url=site.video("video-1"),
                submit_time=int(time.time()) - 60, start_time=int(time.time()) - 50, finish_time=int(time.time()))
    page.reload()
    expect(row(page, "video-1").get_by_test_id("action")).to_have_text("VIDEO · relax")
    row(page, "video-1").get_by_test_id("thumbnail").click()
    expect(by(page, "lightbox-video")).to_be_visible()
    assert_no_violations(page, "a video playing in the lightbox")


def test_a_video_task_plays_in_the_lightbox(screen_page, site):
    page = screen_page
    Task.create(user_id=site.users["carol"], channel_id=1, mj_id="video-2", action="VIDEO", prompt="a moving fox",
                status="SUCCESS", progress="100%", image_url=site.image("video-2"), video_url=site.video("video-2"),
                submit_time=int(time.time()) - 60, start_time=int(time.time()) - 50, finish_time=int(time.time()))
    Task.create(user_id=site.users["carol"], channel_id=1, mj_id="video-3", action="VIDEO", prompt="no still",
                status="SUCCESS", progress="100%", video_urls=f'["{site.video("video-3")}"]',
                submit_time=int(time.time()) - 30, start_time=int(time.time()) - 20, finish_time=int(time.time()))
    page.goto("/")
    sign_in(page, site.tokens["carol"])
    thumb = row(page, "video-2").get_by_test_id("thumbnail")
    expect(thumb).to_have_attribute("title", "Play the video")
    thumb.click()
    video = by(page, "lightbox-video")
    expect(video).to_be_visible()
    expect(by(page, "lightbox-image")).to_be_hidden()
    # Chromium has read the MP4 and can show its frames: the clip is a real one, served through the page's CSP.
    wait_until(lambda: video.evaluate("v => v.readyState") >= 2, message="the video's first frame is loaded")
    assert video.evaluate("v => v.duration") > 0.5 and video.evaluate("v => v.poster").endswith("video-2.png")
    expect(by(page, "lightbox-link")).to_have_attribute("href", site.video("video-2"))
    page.keyboard.press("Escape")
    expect(by(page, "lightbox")).to_be_hidden()
    # Closing stops and unloads it, in the dialog's close event (dispatched just after the dialog is hidden).
    wait_until(lambda: video.evaluate("v => v.getAttribute('src')") is None, message="the video unloaded")
    row(page, "video-3").get_by_test_id("thumbnail").click()  # a video without a still: a play button
    expect(video).to_be_visible()
    wait_until(lambda: video.evaluate("v => v.readyState") >= 1, message="the second video's metadata")


def test_the_lightbox_is_a_modal_dialog_that_keeps_and_returns_the_focus(screen_page, site):
    page = screen_page
    # a running task keeps the page refreshing (and rebuilding its rows) while the dialog is open
    Task.create(user_id=site.users["alice"], channel_id=1, mj_id="running-1", prompt="still going",
                status="IN_PROGRESS", progress="20%", submit_time=int(time.time()) - 20)
    stop_the_clock(page)
    sign_in(page, site.tokens["alice"])
    task = row(page, "1750000002")
    thumbnail = task.get_by_test_id("thumbnail")
    thumbnail.focus()
    page.keyboard.press("Enter")
    dialog = by(page, "lightbox")
    expect(dialog).to_be_visible()
    assert dialog.evaluate("d => d.matches(':modal') && d.open")  # a modal <dialog>: the page behind is inert
    expect(page.get_by_role("dialog")).to_have_accessible_name(
        "portrait of an astronaut cat, studio lighting Task 1750000002")
    expect(by(page, "lightbox-prompt")).to_have_text("portrait of an astronaut cat, studio lighting")
    expect(by(page, "lightbox-id")).to_have_text("1750000002")
    expect(by(page, "lightbox-close")).to_be_focused()
    inside = "() => document.querySelector('[data-testid=lightbox]').contains(document.activeElement)"
    for key in ["Tab"] * 5 + ["Shift+Tab"] * 5:
        page.keyboard.press(key)
        assert page.evaluate(inside), f"the focus left the dialog after {key}"
    if page.screen == "desktop":
        shot(page, "lightbox")

    refresh_once(page)  # behind the dialog
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(thumbnail).to_be_focused()  # the same task's thumbnail, even after the rows were rebuilt

    thumbnail.click()
    expect(dialog).to_be_visible()
    by(page, "lightbox-close").click()
    expect(dialog).to_be_hidden()
    expect(thumbnail).to_be_focused()


CONTRAST = """
([selector, property, backgroundOf]) => {
  const channels = (colour) => colour.match(/[\\d.]+/g).map(Number);
  const luminance = (colour) => {
    const [r, g, b] = channels(colour).slice(0, 3).map((v) => {
      const c = v / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const background = (node) => {  // the first opaque background at or above the node
    for (; node; node = node.parentElement) {
      const colour = getComputedStyle(node).backgroundColor;
      const parts = channels(colour);
      if (parts.length < 4 || parts[3] === 1) return colour;
    }
    return "rgb(255, 255, 255)";
  };
  const node = document.querySelector(selector);
  const fore = getComputedStyle(node)[property];
  const back = background(backgroundOf ? node.closest(backgroundOf) : node.parentElement);
  const [a, b] = [luminance(fore), luminance(back)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}
"""


def test_colours_reach_wcag_aa(screen_page, site):
    page = screen_page
    for status in ("NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "SUCCESS", "FAILURE", "CANCEL"):
        Task.create(user_id=site.users["carol"], channel_id=1, mj_id=f"s-{status}", status=status, progress="10%",
                    submit_time=int(time.time()) - 10)
    sign_in(page, site.tokens["carol"])
    expect(by(page, "task-row")).to_have_count(7)

    def ratio(selector, prop="color", background_of=None):
        return page.evaluate(CONTRAST, [selector, prop, background_of])

    for status in ("NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "SUCCESS", "FAILURE", "CANCEL"):
        assert ratio(f".status.s-{status}") >= 4.5, status
    if page.screen == "phone":
        by(page, "filters-toggle").click()
    for selector in ('[data-testid="filter-mj-id"]', '[data-testid="filter-status"]', '[data-testid="page-size"]',
                     '[data-testid="sign-out"]'):
        assert ratio(selector, "borderTopColor") >= 3, selector  # a control's edge against its surroundings
    for selector in ('[data-testid="page-info"]', ".filters label", '[data-testid="balance"]'):
        assert ratio(selector) >= 4.5, selector

    by(page, "sign-out").click()
    sign_in(page, site.tokens["admin"])
    expect(by(page, "role")).to_have_text("Admin · all tasks")
    assert ratio('[data-testid="role"]', background_of='[data-testid="role"]') >= 4.5  # the admin badge


def test_progress_bars_have_names(screen_page, site):
    page = screen_page
    Task.create(user_id=site.users["carol"], channel_id=1, mj_id="p-1", status="IN_PROGRESS", progress="45%",
                submit_time=int(time.time()) - 10)
    sign_in(page, site.tokens["carol"])
    bar = page.get_by_role("progressbar", name="Progress of task p-1")
    expect(bar).to_have_attribute("aria-valuenow", "45")
    expect(bar).to_have_attribute("aria-valuemax", "100")


def test_a_live_refresh_keeps_the_keyboard_focus(screen_page, site):
    page = screen_page
    Task.create(user_id=site.users["alice"], channel_id=1, mj_id="running-1", prompt="still going",
                status="IN_PROGRESS", progress="20%", submit_time=int(time.time()) - 20)
    stop_the_clock(page)
    sign_in(page, site.tokens["alice"])
    copy = row(page, "1750000003").get_by_test_id("copy-id")
    copy.focus()
    refresh_once(page)
    expect(row(page, "running-1").get_by_test_id("progress-label")).to_have_text("20%")
    expect(copy).to_be_focused()  # the rebuilt row's button, not the page's body
