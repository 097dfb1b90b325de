"""Exporting tasks (mjctl.export, GET /api/mj/export, `mjctl tasks export`): every match once, newest first,
in the listing's item shape, streamed in keyset batches."""

from __future__ import annotations

import csv
import io
import json

import httpx
import pytest

from tests.test_stats import BASE, make_tasks


def test_batches_give_every_match_once_newest_first(any_store):
    from mjctl import export
    from mjctl.tasks import TaskFilter, list_tasks, page_envelope

    alice, _bob, _ = make_tasks(45)
    for spec in ({}, {"user_id": alice.id}, {"status": "SUCCESS", "start": BASE + 3600}):
        filters = TaskFilter(**spec)
        batches = list(export.iter_batches(filters, admin=True, batch=7))
        items = [item for batch in batches for item in batch]
        listed = page_envelope(list_tasks(filters, 1, 100), admin=True)["items"]
        assert [i["id"] for i in items] == [i["id"] for i in listed]
        assert all(len(b) <= 7 for b in batches)
        for item, expected in zip(items, listed):
            assert {k: item[k] for k in expected} == expected
            assert item["user_name"] in ("alice", "bob") and item["channel_name"] in ("one", "two")


def test_csv_has_a_header_defuses_formulas_and_keeps_the_rest(store):
    from mjctl import export
    from mjctl.models import Task
    from mjctl.tasks import TaskFilter

    make_tasks(3)
    Task.update(prompt='=HYPERLINK("http://evil")').where(Task.mj_id == "t1").execute()
    Task.update(prompt='a "quoted", comma\nnewline 猫').where(Task.mj_id == "t2").execute()
    data = b"".join(export.encode(export.iter_batches(TaskFilter(), admin=False), "csv", admin=False))
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    assert list(rows[0]) == list(export.fields(admin=False))
    by_id = {r["mj_id"]: r for r in rows}
    assert by_id["t1"]["prompt"] == "'=HYPERLINK(\"http://evil\")"
    assert by_id["t2"]["prompt"] == 'a "quoted", comma\nnewline 猫'
    assert "user_id" not in rows[0]


@pytest.fixture
def api(store):
    from mjctl import accounts
    from mjctl.server import create_app

    alice, bob, chans = make_tasks(30)
    tokens = {"alice": accounts.issue_token("alice"), "bob": accounts.issue_token("bob")}
    client = httpx.Client(transport=httpx.WSGITransport(app=create_app(store)), base_url="http://mjctl")
    yield client, tokens, alice
    client.close()


def test_export_endpoint_scopes_and_formats(api):
    client, tokens, alice = api
    alice_auth = {"Authorization": f"Bearer {tokens['alice']}"}
    own = client.get("/api/mj/export", params={"format": "jsonl"}, headers=alice_auth)
    assert own.status_code == 200 and own.headers["content-type"] == "application/x-ndjson"
    assert "attachment" in own.headers["content-disposition"]
    items = [json.loads(line) for line in own.text.splitlines()]
    listed = client.get("/api/mj/self", params={"page_size": 100},
                        headers={"Authorization": f"Bearer {tokens['alice']}"}).json()["data"]
    assert [i["id"] for i in items] == [i["id"] for i in listed["items"]] and len(items) == listed["total"]
    assert all("user_id" not in i for i in items)
    admin = client.get("/api/mj/export", params={"user_id": alice.id, "status": "SUCCESS"},
                       headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert admin.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(admin.text)))
    assert rows and {r["user_name"] for r in rows} == {"alice"} and {r["status"] for r in rows} == {"SUCCESS"}


@pytest.mark.parametrize("params,status", [({"format": "xml"}, 400), ({"p": "x"}, 400), ({"channel_id": "a"}, 400)])
def test_export_endpoint_refuses_bad_requests_as_json(api, params, status):
    client, tokens, _ = api
    response = client.get("/api/mj/export", params=params, headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert response.status_code == status and response.json()["success"] is False


def test_export_endpoint_streams_through_the_real_server(store):
    """Through granian and the bridge: a body of many batches arrives whole, chunk by chunk."""
    from mjctl import accounts, export
    from mjctl.httpserver import ServerThread
    from mjctl.server import make_bridge

    make_tasks(2500)  # three batches of 1000
    token = accounts.issue_token("bob")
    with ServerThread(make_bridge(store)) as server:
        chunks = 0
        with httpx.stream("GET", server.url + "/api/mj/export", params={"format": "jsonl"},
                          headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status_code == 200 and response.headers.get("x-request-id")
            lines = []
            for chunk in response.iter_bytes():
                chunks += 1
                lines.append(chunk)
        body = b"".join(lines).splitlines()
    assert len(body) == 2500 and export.BATCH == 1000
    ids = [json.loads(line)["id"] for line in body]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 2500


def test_tasks_export_command_writes_a_file_or_stdout(cli, store, tmp_path):
    make_tasks(12)
    out = tmp_path / "tasks.jsonl"
    result = cli("tasks", "export", "--format", "jsonl", "-o", str(out), "--status", "SUCCESS")
    assert result.exit_code == 0, result.output
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert items and {i["status"] for i in items} == {"SUCCESS"} and "channel_name" in items[0]
    printed = cli("tasks", "export")
    assert printed.exit_code == 0
    assert printed.stdout.splitlines()[0].startswith("id,mj_id,action,")
    assert len(list(csv.DictReader(io.StringIO(printed.stdout)))) == 12
    bad = cli("tasks", "export", "--format", "xml")
    assert bad.exit_code == 2 and "csv or jsonl" in bad.stderr


def test_tasks_export_and_stats_read_a_remote_server(cli, store):
    from mjctl import accounts
    from mjctl.httpserver import ServerThread
    from mjctl.server import make_bridge

    make_tasks(20)
    token = accounts.issue_token("alice")
    with ServerThread(make_bridge(store)) as server:
        env = {"MJCTL_TOKEN": token}
        exported = cli("tasks", "export", "--format", "jsonl", "--server", server.url, env=env)
        stats = cli("stats", "--since", "0", "--by", "status", "--json", "--server", server.url, env=env)
        refused = cli("stats", "--server", server.url, env={"MJCTL_TOKEN": "nope"})
    assert exported.exit_code == 0, exported.output
    items = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(items) == json.loads(stats.stdout)["totals"]["tasks"] > 0
    assert all("user_id" not in i for i in items)
    assert refused.exit_code == 1 and "rejected the token" in refused.stderr
