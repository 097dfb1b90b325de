"""Charts of the statistics (mjctl.charts, GET /api/mj/stats/chart): well-formed SVG whose shapes are
proportional to the numbers, names from the store escaped whatever they hold, a name and a description for
screen readers, the page's colours; the route scoped and validated like GET /api/mj/stats."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import httpx
import pytest

from mjctl import charts
from tests.test_stats import BASE, make_tasks

NS = {"svg": charts.SVG_NS}
HOSTILE = ['<script>alert(1)</script>', 'a "quoted" name', "Tom & Jerry's </text><svg>", "bell\x07\x1b[31mred",
           "\u202eevil\u202c", "lone \ud800 surrogate", "non-character \uffff", "]]><!--"]


def summary(**counts) -> dict:
    s = {"tasks": 0, "success": 0, "failure": 0, "cancel": 0, "unfinished": 0, "success_rate": None,
         "quota_charged": 0, "quota_refunded": 0, "queue_seconds_p50": None, "queue_seconds_p95": None,
         "run_seconds_p50": None, "run_seconds_p95": None}
    s.update(counts)
    s["tasks"] = s["success"] + s["failure"] + s["cancel"] + s["unfinished"]
    finished = s["success"] + s["failure"] + s["cancel"]
    s["success_rate"] = round(s["success"] / finished, 4) if finished else None
    return s


def days(*rows: dict) -> dict:
    groups = [{"key": f"2026-11-{i + 1:02d}", "start": 0, **row} for i, row in enumerate(rows)]
    totals = summary(**{name: sum(g[name] for g in groups)
                        for name in ("success", "failure", "cancel", "unfinished", "quota_charged", "quota_refunded")})
    return {"group_by": "day", "percentiles": "exact", "totals": totals, "groups": groups}


SAMPLE = days(summary(success=4, failure=1, cancel=0, unfinished=0, quota_charged=500, quota_refunded=100,
                      run_seconds_p50=60.0, run_seconds_p95=90.0, queue_seconds_p50=2.0, queue_seconds_p95=8.0),
              summary(),
              summary(success=10, failure=2, cancel=3, unfinished=1, quota_charged=1600, quota_refunded=500,
                      run_seconds_p50=45.0, run_seconds_p95=300.0),
              summary(success=1, unfinished=7, quota_charged=800))


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    assert root.tag == f"{{{charts.SVG_NS}}}svg"
    return root


def test_every_chart_is_well_formed_and_names_itself():
    for chart in charts.CHARTS:
        for data in (SAMPLE, days(), days(summary())):
            if charts.CHARTS[chart].group_by != "day":
                data = {**data, "groups": [{**g, "key": i + 1, "name": f"u{i}"} for i, g in enumerate(data["groups"])]}
            for width in (charts.MIN_WIDTH, 640, charts.MAX_WIDTH):
                root = parse(charts.render(chart, data, width=width))
                assert root.get("role") == "img" and root.get("viewBox").startswith(f"0 0 {width} ")
                ids = root.get("aria-labelledby").split()
                named = {node.get("id"): node.text for node in root.iter() if node.get("id")}
                assert all(named.get(i) for i in ids), (chart, ids)  # the title and desc it points at say something
                assert all(i.startswith(f"mjc-{chart}-") for i in named)  # ids no other chart on a page uses
                assert not [node for node in root.iter() if node.get("style") is not None]  # CSP: no style attributes
                assert not root.findall(".//svg:script", NS)


def test_the_stacked_bars_are_proportional_and_stack_in_status_order():
    root = parse(charts.render("tasks", SAMPLE, width=800))
    bars = root.findall(".//svg:g[@data-part='bars']/svg:g", NS)
    assert [b.get("data-key") for b in bars] == [g["key"] for g in SAMPLE["groups"]]
    per_task = set()
    for bar, group in zip(bars, SAMPLE["groups"], strict=True):
        rects = bar.findall("svg:rect", NS)
        assert [r.get("data-status") for r in rects] == [s for s in ("success", "failure", "cancel", "unfinished")
                                                         if group[s]]
        bottom = None
        for rect in rects:
            count, y, height = int(rect.get("data-count")), float(rect.get("y")), float(rect.get("height"))
            assert count == group[rect.get("data-status")]
            per_task.add(round(height / count, 1))
            if bottom is not None:
                assert y + height == pytest.approx(bottom, abs=0.11)  # each segment sits on the one below
            bottom = y
    assert len(per_task) == 1  # one scale for every segment of every day: heights proportional to counts
    assert root.find("svg:desc", NS).text == "29 tasks: 15 success, 3 failure, 3 cancel, 8 unfinished."
    legend = [t.text for t in root.findall(".//svg:g[@data-part='legend']/svg:text", NS)]
    assert legend == ["Success 15", "Failure 3", "Cancel 3", "Unfinished 8"]  # colour is not the only cue


def test_quota_bars_show_charged_minus_refunded():
    root = parse(charts.render("quota", SAMPLE))
    rects = root.findall(".//svg:g[@data-part='bars']/svg:rect", NS)
    assert [(r.get("data-key"), int(r.get("data-count"))) for r in rects] == [
        ("2026-11-01", 400), ("2026-11-03", 1100), ("2026-11-04", 800)]
    scale = {round(float(r.get("height")) / int(r.get("data-count")), 4) for r in rects}
    assert len(scale) == 1
    assert "Quota spent over the period: 2,300 (charged 2,900, refunded 600)." == root.find("svg:desc", NS).text


def test_lines_leave_gaps_where_a_day_has_no_value():
    root = parse(charts.render("run_time", SAMPLE))
    p50 = root.find(".//svg:g[@data-field='run_seconds_p50']", NS)
    assert [m.get("data-key") for m in p50.findall("svg:circle", NS)] == ["2026-11-01", "2026-11-03"]
    assert p50.findall("svg:polyline", NS) == []  # two days with a gap between: no line joins them
    rate = parse(charts.render("success_rate", SAMPLE))
    marks = rate.findall(".//svg:g[@data-field='success_rate']/svg:circle", NS)
    assert [float(m.get("data-value")) for m in marks] == [0.8, 0.6667, 1.0]
    ys = [float(m.get("cy")) for m in marks]
    assert ys[2] < ys[0] < ys[1]  # higher rate, higher on the chart


@pytest.mark.parametrize("name", HOSTILE)
def test_names_from_the_store_are_text_whatever_they_hold(name):
    data = {"group_by": "user", "percentiles": "exact", "totals": summary(success=3, quota_charged=30),
            "groups": [{"key": 7, "name": name, **summary(success=3, quota_charged=30)}]}
    svg = charts.render("users", data)
    root = parse(svg)
    assert [n.tag for n in root.iter() if n.tag.endswith(("script", "foreignObject"))] == []
    assert len(root.findall(".//svg:svg", NS)) == 0
    texts = [t.text for t in root.findall(".//svg:g[@data-key='7']/svg:text", NS)]
    assert texts[0] == charts.short(charts.clean(name))
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\u202a-\u202e\ud800-\udfff\ufffe\uffff]", svg)
    assert charts.clean(name) in root.find("svg:desc", NS).text
    row = root.find(".//svg:g[@data-key='7']", NS)
    assert row.get("data-name") == charts.clean(name)  # the figures a page lists beside the chart
    assert (row.get("data-tasks"), row.get("data-spent"), row.get("data-rate")) == ("3", "30", "1.0")


def test_the_palette_reaches_wcag_aa_on_white():
    def luminance(colour: str) -> float:
        channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    def ratio(colour: str) -> float:
        return 1.05 / (luminance(colour) + 0.05)

    assert ratio(charts.TEXT) >= 4.5 and ratio(charts.MUTED) >= 4.5  # labels and ticks
    for colour in (charts.OK, charts.FAIL, charts.RUN, charts.WARN, charts.ACCENT, charts.AXIS,
                   *(c for _n, _l, c, _p in charts.STATUSES)):
        assert ratio(colour) >= 3, colour  # shapes


def test_axis_scales_are_round():
    assert charts.axis_scale(7, integer=True) == (8, 2)
    assert charts.axis_scale(1, integer=True) == (1, 1)
    assert charts.axis_scale(0, integer=True) == (4, 1)
    assert charts.axis_scale(10) == (10, 2.5)
    assert charts.axis_scale(90, steps=charts.DURATION_STEPS) == (90, 30)
    assert charts.axis_scale(100, steps=charts.DURATION_STEPS) == (120, 30)
    assert charts.axis_scale(4000, steps=charts.DURATION_STEPS) == (5400, 1800)


# -- the route --------------------------------------------------------------------------------------------


@pytest.fixture
def api(store):
    from mjctl import accounts
    from mjctl.server import create_app

    alice, bob, chans = make_tasks()
    tokens = {"alice": accounts.issue_token("alice"), "bob": accounts.issue_token("bob")}
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(store)), base_url="http://mjctl") as client:
        yield client, tokens, alice, bob, chans


def get(client, token, **params):
    return client.get("/api/mj/stats/chart", params=params,
                      headers={"Authorization": f"Bearer {token}"} if token else {})


def desc(response) -> str:
    return parse(response.text).find("svg:desc", NS).text


def test_the_chart_route_draws_the_callers_statistics(api):
    client, tokens, alice, bob, (ch1, _ch2) = api
    since = {"start_timestamp": BASE}
    response = get(client, tokens["alice"], chart="tasks", **since)
    assert response.status_code == 200
    assert response.headers["content-type"] == charts.MEDIA_TYPE
    assert "default-src 'none'" in response.headers["content-security-policy"]
    own = client.get("/api/mj/stats", params={**since, "group_by": "day"},
                     headers={"Authorization": f"Bearer {tokens['alice']}"}).json()["data"]
    assert response.text == charts.render("tasks", own)  # the same computation, drawn
    assert desc(response).startswith(f"{own['totals']['tasks']} tasks: ")
    # a user's user_id and channel_id are ignored: only their own tasks, as on /api/mj/stats
    widened = get(client, tokens["alice"], chart="tasks", user_id=bob.id, channel_id=ch1.id, **since)
    assert widened.text == response.text
    everything = get(client, tokens["bob"], chart="tasks", **since)
    assert desc(everything) != desc(response)
    narrowed = get(client, tokens["bob"], chart="tasks", user_id=alice.id, **since)
    assert narrowed.text == response.text  # an admin narrowed to alice sees what alice sees
    users = get(client, tokens["bob"], chart="users", width=300)
    assert users.status_code == 200 and 'viewBox="0 0 300 ' in users.text
    assert {t.text for t in parse(users.text).iter(f"{{{charts.SVG_NS}}}text")} >= {"alice", "bob"}
    channels = get(client, tokens["bob"], chart="channels", channel_id=ch1.id)
    names = {t.text for t in parse(channels.text).iter(f"{{{charts.SVG_NS}}}text")}
    assert "one" in names and "two" not in names


def test_hostile_names_in_the_store_reach_the_chart_as_text(api):
    from mjctl.models import Channel, User

    client, tokens, alice, _bob, (ch1, _ch2) = api
    User.update(name=HOSTILE[0]).where(User.id == alice.id).execute()  # a hand edit, past the name checks
    Channel.update(name=HOSTILE[2]).where(Channel.id == ch1.id).execute()
    for chart, name in (("users", HOSTILE[0]), ("channels", HOSTILE[2])):
        response = get(client, tokens["bob"], chart=chart)
        assert response.status_code == 200
        assert "<script" not in response.text and "</text><svg>" not in response.text
        assert name in desc(response)


@pytest.mark.parametrize("who,params,status,words", [
    ("alice", {"chart": "users"}, 400, "administrators"),
    ("alice", {"chart": "channels"}, 400, "administrators"),
    ("bob", {"chart": "pie"}, 400, "chart must be one of"),
    ("bob", {}, 400, "chart must be one of"),
    ("bob", {"chart": "tasks", "width": "wide"}, 400, "width"),
    ("bob", {"chart": "tasks", "width": "100"}, 400, "width"),
    ("bob", {"chart": "tasks", "width": "99999"}, 400, "width"),
    ("bob", {"chart": "tasks", "start_timestamp": "yesterday"}, 400, "start_timestamp"),
    ("bob", {"chart": "tasks", "user_id": "-1"}, 400, "user_id"),
    ("alice", {"chart": "tasks\x00"}, 400, "control characters"),
    (None, {"chart": "tasks"}, 401, "token"),
])
def test_the_chart_route_refuses_bad_requests_in_json(api, who, params, status, words):
    from tests.test_openapi import check

    client, tokens, *_ = api
    response = get(client, tokens.get(who), **params)
    assert response.status_code == status
    body = response.json()
    assert body["success"] is False and words in body["message"]
    check(client.get("/api/openapi.json").json(), response, "/api/mj/stats/chart")


def test_the_chart_route_is_documented_with_its_choices(api):
    client, *_ = api
    op = client.get("/api/openapi.json").json()["paths"]["/api/mj/stats/chart"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert params["chart"]["schema"]["enum"] == list(charts.CHARTS) and params["chart"]["required"] is True
    assert {"start_timestamp", "end_timestamp", "user_id", "channel_id", "width"} <= set(params)
    assert "image/svg+xml" in op["responses"]["200"]["content"]


def test_several_charts_come_from_one_computation_per_grouping(api, monkeypatch):
    from mjctl import stats
    from tests.test_openapi import check

    client, tokens, alice, _bob, _chans = api
    since = {"start_timestamp": BASE}
    computed: list = []
    real = stats.compute_stats
    monkeypatch.setattr(stats, "compute_stats", lambda filters, group_by=None: computed.append(group_by) or real(
        filters, group_by))
    names = "tasks,success_rate,run_time,queue_time,quota,users,channels"
    answer = client.get("/api/mj/stats/charts", params={**since, "charts": names, "width": 500},
                        headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert answer.status_code == 200, answer.text
    check(client.get("/api/openapi.json").json(), answer, "/api/mj/stats/charts")
    data = answer.json()["data"]
    assert sorted(computed) == ["channel", "day", "user"] and set(data["stats"]) == {"day", "user", "channel"}
    computed.clear()
    for name in names.split(","):  # each is the chart its own route draws
        assert data["charts"][name] == get(client, tokens["bob"], chart=name, width=500, **since).text
    assert data["stats"]["day"] == client.get("/api/mj/stats", params={**since, "group_by": "day"},
                                              headers={"Authorization": f"Bearer {tokens['bob']}"}).json()["data"]

    # A user's charts are their own tasks, whatever user_id they name.
    own = client.get("/api/mj/stats/charts", params={**since, "charts": "tasks,quota", "user_id": 999},
                     headers={"Authorization": f"Bearer {tokens['alice']}"}).json()["data"]
    assert own["charts"]["tasks"] == get(client, tokens["alice"], chart="tasks", **since).text
    assert set(own["charts"]) == {"tasks", "quota"} and set(own["stats"]) == {"day"}


@pytest.mark.parametrize("who,charts_param,words", [
    ("alice", "tasks,users", "administrators"),
    ("bob", "tasks,tasks", "twice"),
    ("bob", "", "at least one"),
    ("bob", ",,", "at least one"),
    ("bob", "tasks,pie", "chart must be one of"),
    ("bob", "x" * 201, "too long"),
])
def test_the_charts_route_refuses_bad_lists_in_json(api, who, charts_param, words):
    from tests.test_openapi import check

    client, tokens, *_ = api
    response = client.get("/api/mj/stats/charts", params={"charts": charts_param},
                          headers={"Authorization": f"Bearer {tokens[who]}"})
    assert response.status_code == 400
    assert response.json()["success"] is False and words in response.json()["message"]
    check(client.get("/api/openapi.json").json(), response, "/api/mj/stats/charts")
