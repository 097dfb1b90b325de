"""Task statistics (mjctl.stats, GET /api/mj/stats, `mjctl stats`): the same matches as the listing, exact
counts and quota, percentiles exact or from a bounded sample, on every database."""

from __future__ import annotations

import json
import statistics
import time

import httpx
import pytest

DAY = 86400
BASE = 1_700_000_000 - 1_700_000_000 % DAY  # a UTC midnight


def make_tasks(n: int = 60):
    """Two users, two channels, n tasks over three days with known statuses, actions and durations; every
    fifth failed task charged and refunded the way reports does it. Returns (alice, bob, channels)."""
    from mjctl import accounts, channels
    from mjctl.db import write_tx
    from mjctl.models import Task

    alice, _ = accounts.create_user("alice", quota=10**9)
    bob, _ = accounts.create_user("bob", role="admin", quota=10**9)
    ch1 = channels.add_channel(None, "one", "http://127.0.0.1:9", "", priority=1)
    ch2 = channels.add_channel(None, "two", "http://127.0.0.1:9", "", priority=0)
    statuses = ["SUCCESS", "SUCCESS", "FAILURE", "CANCEL", "IN_PROGRESS", "SUCCESS"]
    for i in range(n):
        user = alice if i % 3 else bob
        status = statuses[i % len(statuses)]
        submit = BASE + (i % 3) * DAY + i * 60
        start = submit + (i % 7) if status != "IN_PROGRESS" or i % 2 else 0
        finish = start + 10 * (i % 5 + 1) if status in ("SUCCESS", "FAILURE", "CANCEL") and start else 0
        with write_tx():
            task = Task.create(user_id=user.id, channel_id=(ch1 if i % 2 else ch2).id, mj_id=f"t{i}",
                               action="IMAGINE" if i % 4 else "UPSCALE", status=status, submit_time=submit,
                               start_time=start, finish_time=finish, quota=0, unfinished=int(status == "IN_PROGRESS"),
                               mode=MODES[i % len(MODES)])
            accounts.charge(user.id, 100 + i, task_id=task.id, reason="test")
            Task.update(quota=100 + i).where(Task.id == task.id).execute()
            if status == "FAILURE":
                Task.update(quota=0).where(Task.id == task.id).execute()
                accounts.refund(user.id, 100 + i, task_id=task.id, reason="failed")
    return alice, bob, (ch1, ch2)


MODES = ["FAST", "", "RELAX", "", ""]  # the speed each task was submitted for ("" when none was named)

FILTERS = [
    {}, {"status": "SUCCESS"}, {"action": "UPSCALE"}, {"start": BASE + DAY}, {"end": BASE + DAY},
    {"start": BASE + DAY, "end": BASE + 2 * DAY - 1}, {"mj_id": "t7"}, {"status": "NOPE"},
]


def test_totals_equal_the_listing_total_for_any_filter(any_store):
    from mjctl.stats import GROUPS, compute_stats
    from mjctl.tasks import TaskFilter, list_tasks

    alice, _bob, (ch1, _ch2) = make_tasks()
    extra = [{"user_id": alice.id}, {"channel_id": ch1.id}, {"user_id": alice.id, "channel_id": ch1.id,
                                                             "start": BASE + DAY}]
    checked = 0
    for spec in FILTERS + extra:
        total = list_tasks(TaskFilter(**spec)).total
        for group_by in (None,) + GROUPS:
            result = compute_stats(TaskFilter(**spec), group_by)
            assert result["totals"]["tasks"] == total, (spec, group_by)
            if group_by is not None:
                assert sum(g["tasks"] for g in result["groups"]) == total, (spec, group_by)
            checked += total
    assert checked > 0


def test_counts_quota_and_percentiles_match_the_rows(any_store):
    from mjctl.models import Ledger, Task
    from mjctl.stats import compute_stats
    from mjctl.tasks import TaskFilter

    make_tasks()
    result = compute_stats(TaskFilter(), "status")
    totals = result["totals"]
    rows = list(Task.select())
    assert result["percentiles"] == "exact"
    assert totals["tasks"] == len(rows) == 60
    for status in ("success", "failure", "cancel"):
        assert totals[status] == sum(t.status == status.upper() for t in rows)
    assert totals["unfinished"] == sum(t.status == "IN_PROGRESS" for t in rows)
    assert totals["quota_charged"] == -sum(e.amount for e in Ledger.select().where(Ledger.kind == "charge"))
    assert totals["quota_refunded"] == sum(e.amount for e in Ledger.select().where(Ledger.kind == "refund")) > 0
    assert totals["success_rate"] == round(totals["success"] / (totals["success"] + totals["failure"]
                                                                 + totals["cancel"]), 4)
    queue = sorted(t.start_time - t.submit_time for t in rows if t.start_time)
    run = sorted(t.finish_time - t.start_time for t in rows if t.finish_time)
    assert totals["queue_seconds_p50"] == round(statistics.quantiles(queue, n=100, method="inclusive")[49], 1)
    assert totals["queue_seconds_p95"] == round(statistics.quantiles(queue, n=100, method="inclusive")[94], 1)
    assert totals["run_seconds_p50"] == round(statistics.quantiles(run, n=100, method="inclusive")[49], 1)
    assert totals["run_seconds_p95"] == round(statistics.quantiles(run, n=100, method="inclusive")[94], 1)
    in_progress = next(g for g in result["groups"] if g["key"] == "IN_PROGRESS")
    assert in_progress["run_seconds_p50"] is None and in_progress["success_rate"] is None


def test_day_groups_are_utc_days_with_the_empty_ones_listed(store):
    from mjctl.stats import compute_stats
    from mjctl.tasks import TaskFilter

    make_tasks()
    result = compute_stats(TaskFilter(start=BASE - 2 * DAY, end=BASE + 3 * DAY - 1), "day")
    keys = [g["key"] for g in result["groups"]]
    first = time.strftime("%Y-%m-%d", time.gmtime(BASE - 2 * DAY))
    assert keys[0] == first and len(keys) == 5
    assert [g["tasks"] for g in result["groups"]][:2] == [0, 0]
    assert all(g["start"] % DAY == 0 for g in result["groups"])
    hours = compute_stats(TaskFilter(start=BASE, end=BASE + 3599), "hour")["groups"]
    assert [g["key"] for g in hours] == [time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(BASE))]


def test_modes_are_the_submitted_speeds_and_admin_groups_carry_names(any_store):
    from mjctl.stats import compute_stats
    from mjctl.tasks import TaskFilter

    make_tasks()
    mode = {g["key"]: g["tasks"] for g in compute_stats(TaskFilter(), "mode")["groups"]}
    assert mode == {"FAST": 12, "RELAX": 12, "": 36}
    channels = compute_stats(TaskFilter(), "channel")["groups"]
    assert {g["name"] for g in channels} == {"one", "two"}
    users = compute_stats(TaskFilter(), "user")["groups"]
    assert {g["name"] for g in users} == {"alice", "bob"}


def test_a_large_match_is_sampled_evenly_across_a_periodic_pattern(any_store, monkeypatch):
    """Above SAMPLE_LIMIT the percentiles come from evenly spaced row ids; channels taken in turn (a period
    of 2 in the ids) must both be sampled, and the estimates must be near the truth."""
    from mjctl import stats
    from mjctl.stats import compute_stats
    from mjctl.tasks import TaskFilter

    make_tasks(600)
    monkeypatch.setattr(stats, "SAMPLE_LIMIT", 100)
    monkeypatch.setattr(stats, "MIN_SAMPLE", 5)
    result = compute_stats(TaskFilter(), "channel")
    assert result["percentiles"] == "sampled"
    assert result["totals"]["tasks"] == 600
    for group in result["groups"]:
        assert group["run_seconds_p50"] is not None, group
    monkeypatch.setattr(stats, "SAMPLE_LIMIT", 10_000)
    truth = compute_stats(TaskFilter(), None)["totals"]
    assert abs(result["totals"]["run_seconds_p50"] - truth["run_seconds_p50"]) <= 10


def test_refunded_quota_is_backfilled_from_the_ledger_by_migration_10(store):
    """A store whose refunds predate the column (trigger dropped, column zeroed) gets the ledger's sums."""
    from mjctl.db import MIGRATIONS, database, write_tx
    from mjctl.models import Task

    make_tasks()
    before = {t.id: t.quota_refunded for t in Task.select()}
    assert any(before.values())
    database.execute_sql("DROP TRIGGER ledger_refund_tally")
    database.execute_sql("UPDATE task SET quota_refunded = 0")
    with write_tx():
        dict((v, f) for v, _, f in MIGRATIONS)[10](database.obj)
        dict((v, f) for v, _, f in MIGRATIONS)[10](database.obj)  # twice: each step can run again
    assert {t.id: t.quota_refunded for t in Task.select()} == before


# -- the endpoint ----------------------------------------------------------------------------------------


@pytest.fixture
def api(store):
    from mjctl import accounts
    from mjctl.server import create_app

    alice, bob, chans = make_tasks()
    tokens = {"alice": accounts.issue_token("alice"), "bob": accounts.issue_token("bob")}
    client = httpx.Client(transport=httpx.WSGITransport(app=create_app(store)), base_url="http://mjctl")
    yield client, tokens, alice, bob, chans
    client.close()


def get(client, token, path, **params):
    return client.get(path, params=params, headers={"Authorization": f"Bearer {token}"} if token else {})


def test_stats_endpoint_scopes_like_the_listing(api):
    client, tokens, alice, _bob, (ch1, _ch2) = api
    own = get(client, tokens["alice"], "/api/mj/stats", group_by="day", status="SUCCESS", start_timestamp=BASE * 1000)
    listed = get(client, tokens["alice"], "/api/mj/self", status="SUCCESS", start_timestamp=BASE * 1000)
    assert own.status_code == 200 and own.json()["success"] is True
    assert own.json()["data"]["totals"]["tasks"] == listed.json()["data"]["total"] > 0
    # a user's channel_id and user_id are ignored, as on /api/mj/self
    widened = get(client, tokens["alice"], "/api/mj/stats", user_id=1, channel_id=ch1.id)
    own_total = get(client, tokens["alice"], "/api/mj/self").json()["data"]["total"]
    assert widened.json()["data"]["totals"]["tasks"] == own_total
    admin = get(client, tokens["bob"], "/api/mj/stats", user_id=alice.id, channel_id=ch1.id, group_by="user")
    listed = get(client, tokens["bob"], "/api/mj/", channel_id=ch1.id)
    assert admin.status_code == 200
    assert [g["key"] for g in admin.json()["data"]["groups"]] == [alice.id]
    everything = get(client, tokens["bob"], "/api/mj/stats", channel_id=ch1.id)
    assert everything.json()["data"]["totals"]["tasks"] == listed.json()["data"]["total"]


@pytest.mark.parametrize("who,params,status,words", [
    ("alice", {"group_by": "user"}, 400, "administrators"),
    ("alice", {"group_by": "week"}, 400, "group_by must be one of"),
    ("bob", {"start_timestamp": "yesterday"}, 400, "start_timestamp"),
    ("bob", {"user_id": "-1"}, 400, "user_id"),
    (None, {}, 401, "token"),
])
def test_stats_endpoint_refuses_bad_requests_in_one_sentence(api, who, params, status, words):
    client, tokens, *_ = api
    response = get(client, tokens.get(who), "/api/mj/stats", **params)
    assert response.status_code == status
    body = response.json()
    assert body["success"] is False and words in body["message"]


# -- the command -----------------------------------------------------------------------------------------


def test_stats_command_prints_the_api_data_and_a_table(cli, store):
    from mjctl.stats import compute_stats
    from mjctl.tasks import TaskFilter

    make_tasks()
    since = str(BASE)
    result = cli("stats", "--since", since, "--by", "status", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == compute_stats(TaskFilter(start=BASE), "status")
    table = cli("stats", "--since", since, "--by", "action")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["ACTION", "TASKS", "SUCCESS"]
    assert {line.split("\t")[0] for line in lines[1:]} >= {"IMAGINE", "UPSCALE", "total"}
    bad = cli("stats", "--by", "week")
    assert bad.exit_code == 2 and "group_by must be one of" in bad.stderr and "Traceback" not in bad.output


def test_live_stats_answers_match_the_documented_schema(api):
    from tests.test_openapi import check

    client, tokens, *_ = api
    doc = client.get("/api/openapi.json").json()
    for group_by in ("day", "user", "mode", ""):
        response = get(client, tokens["bob"], "/api/mj/stats", group_by=group_by)
        assert response.status_code == 200
        check(doc, response, "/api/mj/stats")
    check(doc, get(client, tokens["alice"], "/api/mj/stats", group_by="user"), "/api/mj/stats")
    check(doc, get(client, None, "/api/mj/stats"), "/api/mj/stats")


@pytest.mark.parametrize(("rate", "shown"), [(0.8125, "81.3"), (0.8124, "81.2"), (0.0005, "0.1"), (0.0004, "0.0"),
                                             (0.0, "0.0"), (1.0, "100.0"), (0.3333, "33.3"), (0.0105, "1.1")])
def test_a_rate_is_shown_with_one_decimal_and_halves_rounded_up(rate, shown):
    from mjctl.charts import percent, rate_text

    assert rate_text(rate) == shown
    assert percent(rate) == f"{shown}%"
    assert percent(None) == "—"
