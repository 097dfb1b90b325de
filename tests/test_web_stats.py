"""The page's Statistics view in Chromium: the figures a user or an admin sees match the API's for the
same period, the tasks chart stacks a bar per day, admins get the top users and channels (names shown as
text whatever they hold), the view is reached by keyboard and kept in the address, and axe-core finds
nothing at all on a phone or a laptop."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import expect

from mjctl.models import Channel, Task, User
from tests.webpage import NOW, axe_violations, by, require_axe, shot, sign_in

pytest_plugins = ["tests.webfixtures"]  # site, browser, page, screen_page
pytestmark = pytest.mark.browser

DAY = 86400
TODAY = NOW // DAY * DAY  # UTC midnight, as the page counts its days
HOSTILE_USER = '<img src=x onerror="window.pwned=1">&amp;'
HOSTILE_CHANNEL = '"><script>window.pwned=2</script>'


def seed_days(site) -> None:
    """alice: 22 tasks a day on the 5 days before today (18 success, 2 failure, 2 cancel) and 3 more 9 days
    back; on day 1 also one running task. bob: 4 on day 2. A user named like markup: 5 on day 1, on the
    channel named like markup."""
    alice, bob = site.users["alice"], site.users["bob"]
    for day in range(1, 6):
        for i in range(22):
            submit = TODAY - day * DAY + 600 * i + 60
            status = "FAILURE" if i % 11 == 3 else "CANCEL" if i % 11 == 7 else "SUCCESS"
            Task.create(user_id=alice, channel_id=1, mj_id=f"d{day}-{i}", status=status, submit_time=submit,
                        start_time=submit + 5 + day, finish_time=submit + 5 + day + 40 + i, progress="100%",
                        quota=100 if status == "SUCCESS" else 0, quota_refunded=0 if status == "SUCCESS" else 100)
    Task.create(user_id=alice, channel_id=1, mj_id="running", status="IN_PROGRESS", progress="40%",
                submit_time=TODAY - DAY + 30, start_time=TODAY - DAY + 40, quota=100, unfinished=1)
    for i in range(3):
        Task.create(user_id=alice, channel_id=1, mj_id=f"old-{i}", status="SUCCESS", progress="100%",
                    submit_time=TODAY - 9 * DAY + i, start_time=TODAY - 9 * DAY + i + 1,
                    finish_time=TODAY - 9 * DAY + i + 61, quota=100)
    for i in range(4):
        Task.create(user_id=bob, channel_id=2, mj_id=f"b2-{i}", status="SUCCESS", progress="100%",
                    submit_time=TODAY - 2 * DAY + i * 60, start_time=TODAY - 2 * DAY + i * 60 + 2,
                    finish_time=TODAY - 2 * DAY + i * 60 + 50, quota=1500)
    from mjctl import accounts

    odd, _token = accounts.create_user("odd-name")
    User.update(name=HOSTILE_USER).where(User.id == odd.id).execute()  # a hand edit, past the name checks
    Channel.update(name=HOSTILE_CHANNEL).where(Channel.id == 2).execute()
    for i in range(5):
        Task.create(user_id=odd.id, channel_id=2, mj_id=f"odd-{i}", status="SUCCESS", progress="100%",
                    submit_time=TODAY - DAY + i, start_time=TODAY - DAY + i + 1, finish_time=TODAY - DAY + i + 30,
                    quota=10)


@pytest.fixture
def stats_site(site):
    seed_days(site)
    return site


def open_stats(page, token: str, path: str = "/?view=stats"):
    """Sign in on the Statistics view; the page's own request for the day charts and their statistics
    (params, the day statistics)."""
    with page.expect_response(day_charts) as info:
        sign_in(page, token, path)
    response = info.value
    assert response.ok
    params = {k: v[0] for k, v in parse_qs(urlparse(response.url).query).items()}
    expect(by(page, "total-tasks")).not_to_have_text("—")
    return params, json.loads(response.body())["data"]["stats"]["day"]


def day_charts(response) -> bool:
    """The page's one request for the day charts (the tasks chart first) and the numbers."""
    return "/api/mj/stats/charts?" in response.url and "tasks" in charts_asked(response.url)


def charts_asked(url: str) -> list[str]:
    return parse_qs(urlparse(url).query).get("charts", [""])[0].split(",")


def expected_tasks(start: int, user: int | None = None) -> int:
    query = Task.select().where(Task.submit_time >= start)
    return (query.where(Task.user_id == user) if user else query).count()


def spent_quota(start: int, user: int) -> int:
    """What the user's tasks since start cost: a refund sets a task's quota to 0."""
    return sum(t.quota for t in Task.select().where(Task.submit_time >= start, Task.user_id == user))


def chart_rate(chart, key: int) -> float:
    return float(chart.locator(f'g[data-by=tasks] > g[data-key="{key}"]').get_attribute("data-rate"))


def percent(rate: float | None) -> str:
    """The page's rule, worked out here in decimals: one decimal, halves rounded up."""
    if rate is None:
        return "—"
    return f"{(Decimal(str(rate)) * 100).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"


def test_a_user_sees_their_own_figures_and_a_stacked_bar_per_day(page, stats_site):
    site = stats_site
    asked = []
    page.on("request", lambda r: asked.append(r.url) if "/api/mj/stats" in r.url else None)
    params, data = open_stats(page, site.tokens["alice"])
    start = int(params["start_timestamp"])
    assert start == TODAY - 6 * DAY  # the last 7 UTC days, today included
    totals = data["totals"]
    assert totals["tasks"] == expected_tasks(start, site.users["alice"]) > 5 * 22  # alice's only, not bob's
    expect(by(page, "total-tasks")).to_have_text(f"{totals['tasks']:,}")
    expect(by(page, "total-success-rate")).to_have_text(percent(totals["success_rate"]))
    expect(by(page, "total-quota")).to_have_text(f"{totals['quota_charged'] - totals['quota_refunded']:,}")
    expect(by(page, "stats-scope")).to_contain_text("Your tasks")

    chart = by(page, "figure-tasks").locator("svg")
    expect(chart).to_have_attribute("role", "img")
    name = chart.evaluate("svg => svg.getAttribute('aria-labelledby').split(' ').map("
                          "id => document.getElementById(id).textContent).join(' ')")
    assert f"{totals['tasks']} tasks: {totals['success']} success" in name
    bars = chart.locator("g[data-part=bars] > g")
    expect(bars).to_have_count(7)
    for group in data["groups"]:
        segments = chart.locator(f'g[data-key="{group["key"]}"] rect')
        shown = {s.get_attribute("data-status"): int(s.get_attribute("data-count")) for s in segments.all()}
        assert shown == {k: group[k] for k in ("success", "failure", "cancel", "unfinished") if group[k]}
    failing = [g for g in data["groups"] if g["failure"]]
    assert len(failing) >= 5 and chart.locator("rect[data-status=failure]").count() == len(failing)
    for figure in ("success_rate", "run_time", "queue_time", "quota"):
        expect(by(page, f"figure-{figure}").locator("svg[role=img]")).to_have_count(1)

    by(page, "days-details").locator("summary").click()
    expect(by(page, "day-row")).to_have_count(7)
    expect(by(page, "day-total").locator("td").first).to_have_text(f"{totals['tasks']:,}")
    yesterday = data["groups"][-2]
    expect(page.locator(f'[data-testid=day-row][data-key="{yesterday["key"]}"] td').nth(5)).to_have_text(
        percent(yesterday["success_rate"]))

    expect(by(page, "top-users")).to_be_hidden()
    expect(by(page, "top-channels")).to_be_hidden()
    assert not [u for u in asked if {"users", "channels"} & set(charts_asked(u)) or "group_by=" in u]
    assert len(asked) == 1  # one request: the day charts and their statistics
    shot(page, "statistics-user")


def test_an_admin_sees_everything_and_the_top_users_and_channels(page, stats_site):
    site = stats_site
    asked = []
    page.on("request", lambda r: asked.append(r.url) if "/api/mj/stats" in r.url else None)
    params, data = open_stats(page, site.tokens["admin"])
    assert data["totals"]["tasks"] == expected_tasks(int(params["start_timestamp"]))
    expect(by(page, "total-tasks")).to_have_text(f"{data['totals']['tasks']:,}")
    expect(by(page, "stats-scope")).to_contain_text("All tasks")

    users = by(page, "figure-users").locator("svg")
    expect(users).to_have_attribute("role", "img")
    by_tasks = users.locator("g[data-by=tasks] > g[data-key]")
    expect(by_tasks.first).to_have_attribute("data-key", str(site.users["alice"]))
    texts = users.locator("text").all_text_contents()
    assert "alice" in texts and "bob" in texts
    assert any(t.startswith('<img src=x onerror="') for t in texts)  # the name, drawn as text (cut to fit)
    channels = by(page, "figure-channels").locator("svg text").all_text_contents()
    assert "fast-lane" in channels and any(t.startswith('"><script>') for t in channels)

    by(page, "users-details").locator("summary").click()
    by(page, "channels-details").locator("summary").click()
    expect(by(page, "users-table").locator("tbody th").first).to_have_text("alice")
    expect(by(page, "users-table").locator("tbody th", has_text="onerror")).to_have_text(HOSTILE_USER)
    expect(by(page, "channels-table").locator("tbody th", has_text="script")).to_have_text(HOSTILE_CHANNEL)
    alice = by(page, "users-table").locator(f'tr[data-key="{site.users["alice"]}"] td')
    expect(alice).to_have_text([f"{expected_tasks(int(params['start_timestamp']), site.users['alice']):,}",
                                percent(chart_rate(users, site.users["alice"])),
                                f"{spent_quota(int(params['start_timestamp']), site.users['alice']):,}"])
    # the tables come from the charts: nobody asked for every user's or channel's statistics
    assert not [u for u in asked if "group_by=user" in u or "group_by=channel" in u]
    assert sorted(charts_asked(u)[0] for u in asked) == ["tasks", "users"]  # the day charts, the top lists
    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("window.pwned") is None
    shot(page, "statistics-admin")


def test_the_view_is_reached_by_keyboard_and_kept_in_the_address(page, stats_site):
    site = stats_site
    sign_in(page, site.tokens["alice"])
    expect(by(page, "task-row").first).to_be_visible()
    page.locator("body").focus()
    for _ in range(12):  # the view switch comes early in the tab order
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.dataset.testid") == "view-stats":
            break
    expect(by(page, "view-stats")).to_be_focused()
    with page.expect_response(day_charts):
        page.keyboard.press("Enter")
    expect(by(page, "stats")).to_be_visible()
    expect(by(page, "tasks")).to_be_hidden()
    expect(by(page, "view-stats")).to_have_attribute("aria-current", "page")
    assert "view=stats" in page.url
    week = by(page, "total-tasks").inner_text()

    by(page, "stats-period").focus()
    with page.expect_response(day_charts) as info:
        by(page, "stats-period").select_option("30")
    assert int(parse_qs(urlparse(info.value.url).query)["start_timestamp"][0]) == TODAY - 29 * DAY
    assert "days=30" in page.url
    month = expected_tasks(TODAY - 29 * DAY, site.users["alice"])
    expect(by(page, "total-tasks")).to_have_text(f"{month:,}")
    assert month == int(week.replace(",", "")) + 3  # the three tasks 9 days back
    expect(by(page, "figure-tasks").locator("g[data-part=bars] > g")).to_have_count(30)

    page.reload()  # the address keeps the view and the period
    expect(by(page, "total-tasks")).to_have_text(f"{month:,}")
    expect(by(page, "stats-period")).to_have_value("30")
    page.go_back()
    expect(by(page, "total-tasks")).to_have_text(week)
    page.go_back()
    expect(by(page, "tasks")).to_be_visible()
    expect(by(page, "stats")).to_be_hidden()
    expect(by(page, "view-tasks")).to_have_attribute("aria-current", "page")


def test_axe_finds_nothing_in_the_statistics_views(screen_page, stats_site):
    require_axe()
    page = screen_page
    site = stats_site
    for who in ("alice", "admin"):
        if who == "admin":
            by(page, "sign-out").click()
            expect(by(page, "total-tasks")).to_have_text("—")  # nothing of alice's figures stays behind
            expect(page.locator("[data-testid=stats] svg")).to_have_count(0)
        open_stats(page, site.tokens[who])
        for details in page.locator("[data-testid=stats] details:visible").all():
            details.locator("summary").click()
        expect(by(page, "day-row").first).to_be_visible()
        found = axe_violations(page, impacts=("minor", "moderate", "serious", "critical"))
        assert not found, f"{who}'s statistics ({page.screen}): " + "; ".join(
            f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes'][:3]]}" for v in found)
        if page.screen == "phone":
            shot(page, f"statistics-{who}-phone")


def test_a_rate_on_an_exact_half_reads_the_same_in_the_table_the_totals_and_the_chart(page, site):
    """13 of 16 finished is 81.25%: rounded the same way everywhere (halves up), not 81.2% in one place
    and 81.3% in another."""
    from mjctl import accounts

    user, token = accounts.create_user("halfway", quota=10_000)
    for i in range(16):
        submit = TODAY - DAY + 600 * i + 60
        status = "SUCCESS" if i < 13 else "FAILURE"
        Task.create(user_id=user.id, channel_id=1, mj_id=f"half-{i}", status=status, submit_time=submit,
                    start_time=submit + 5, finish_time=submit + 50, progress="100%",
                    quota=100 if status == "SUCCESS" else 0, quota_refunded=0 if status == "SUCCESS" else 100)
    _params, data = open_stats(page, token)
    assert data["totals"]["success_rate"] == 0.8125
    expect(by(page, "total-success-rate")).to_have_text("81.3%")
    by(page, "days-details").locator("summary").click()
    key = data["groups"][-2]["key"]
    expect(page.locator(f'[data-testid=day-row][data-key="{key}"] td').nth(5)).to_have_text("81.3%")
    expect(by(page, "figure-success_rate").locator("svg")).to_contain_text(f"{key}: success rate 81.3%")
