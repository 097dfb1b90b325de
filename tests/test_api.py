"""GET /api/mj/self, GET /api/mj/ and /healthz: the app in process (tests/helpers.py app_client). The same
routes through a real server are in test_hostile_clients.py, test_remote_cli.py and the browser tests."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import httpx
import pytest

from mjctl import accounts
from mjctl.models import Task
from mjctl.tasks import ADMIN_FIELDS, USER_FIELDS
from tests.helpers import app_client


@dataclass
class Live:
    client: httpx.Client
    tokens: dict[str, str]

    def get(self, path: str, who: str | None = None, **params) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return self.client.get(path, params=params, headers=headers)


def client_of(settings, extra=()) -> httpx.Client:
    from mjctl.server import create_app

    return app_client(create_app(settings, extra=extra), timeout=10)


def add_task(user_id: int, mj_id: str, *, channel_id: int = 1, submit_time: int = 1_700_000_000, **fields) -> Task:
    return Task.create(user_id=user_id, channel_id=channel_id, mj_id=mj_id, submit_time=submit_time, **fields)


def make_people() -> dict[str, str]:
    tokens = {}
    for name, role in (("alice", "user"), ("bob", "user"), ("admin", "admin"), ("root", "root")):
        _, tokens[name] = accounts.create_user(name, role=role)
    return tokens


@pytest.fixture
def live(store):
    tokens = make_people()
    with client_of(store) as client:
        yield Live(client, tokens)


def user_id(name: str) -> int:
    return accounts.get_user(name).id


# --- the listing ------------------------------------------------------------------------------------


def test_self_lists_own_tasks_newest_first_in_the_documents_shape(live):
    alice, bob = user_id("alice"), user_id("bob")
    add_task(alice, "a1", prompt="a cat", status="SUCCESS", progress="100%", image_url="http://up/a1.png",
             video_urls=json.dumps(["http://up/v1.mp4"]), start_time=1_700_000_010, finish_time=1_700_000_060,
             quota=1000)
    add_task(bob, "b1")
    add_task(alice, "a2", status="IN_PROGRESS", progress="45%")

    body = live.get("/api/mj/self", "alice").json()

    assert body["success"] is True and body["message"] == ""
    data = body["data"]
    assert (data["total"], data["page"], data["page_size"]) == (2, 1, 20)
    assert [i["mj_id"] for i in data["items"]] == ["a2", "a1"]
    for item in data["items"]:
        assert list(item) == list(USER_FIELDS)
    newest, first = data["items"]
    assert newest["progress"] == "45%" and newest["finish_time"] == 0 and newest["video_urls"] == ""
    # The video is handed out as mjctl's own signed link, still in a JSON-array string.
    (video,) = json.loads(first["video_urls"])
    assert video.startswith("http://") and "/mj/video/a1?t=" in video and "&i=0&sig=" in video
    assert first["video_url"] == ""
    assert (first["submit_time"], first["start_time"], first["finish_time"]) == (1_700_000_000, 1_700_000_010,
                                                                                   1_700_000_060)
    assert first["quota"] == 1000 and first["prompt"] == "a cat"


@pytest.mark.parametrize("path", ["/api/mj/", "/api/mj"])
def test_admin_sees_every_task_with_user_and_channel(live, path):
    add_task(user_id("alice"), "a1", channel_id=2)
    add_task(user_id("bob"), "b1", channel_id=3)

    data = live.get(path, "admin").json()["data"]

    assert data["total"] == 2
    assert [(i["mj_id"], i["user_id"], i["channel_id"]) for i in data["items"]] == [
        ("b1", user_id("bob"), 3), ("a1", user_id("alice"), 2)]
    assert list(data["items"][0]) == list(USER_FIELDS + ADMIN_FIELDS)


def test_admin_filters_combine(live):
    alice = user_id("alice")
    add_task(alice, "x1", channel_id=1, status="SUCCESS", action="IMAGINE", submit_time=100)
    add_task(alice, "x2", channel_id=2, status="SUCCESS", action="UPSCALE", submit_time=200)
    add_task(alice, "x3", channel_id=2, status="FAILURE", action="UPSCALE", submit_time=300)

    def ids(**params):
        return [i["mj_id"] for i in live.get("/api/mj/", "admin", **params).json()["data"]["items"]]

    assert ids(channel_id=2) == ["x3", "x2"]
    assert ids(channel_id=2, status="success") == ["x2"]
    assert ids(action="IMAGINE") == ["x1"]
    assert ids(start_timestamp=200, end_timestamp=300) == ["x3", "x2"]  # inclusive bounds
    assert ids(start_timestamp=200_000, end_timestamp=250_000) == []
    assert ids(mj_id="x2", channel_id=1) == []
    assert ids(channel_id=9) == []


def test_millisecond_timestamps_are_read_as_milliseconds(live):
    alice = user_id("alice")
    add_task(alice, "early", submit_time=1_640_908_800)
    add_task(alice, "late", submit_time=1_640_995_300)

    data = live.get("/api/mj/self", "alice", start_timestamp=1_640_908_800_000, end_timestamp=1_640_995_200_000
                    ).json()["data"]

    assert [i["mj_id"] for i in data["items"]] == ["early"]


def test_page_size_above_the_maximum_is_served_and_reported_as_100(live):
    alice = user_id("alice")
    Task.insert_many([{"user_id": alice, "channel_id": 1, "mj_id": f"t{i}"} for i in range(120)]).execute()

    data = live.get("/api/mj/self", "alice", page_size=1_000_000).json()["data"]

    assert (data["page_size"], len(data["items"]), data["total"]) == (100, 100, 120)


def test_total_and_paging_agree_at_the_edges(live):
    alice = user_id("alice")
    Task.insert_many([{"user_id": alice, "channel_id": 1, "mj_id": f"t{i:02d}"} for i in range(45)]).execute()
    add_task(user_id("bob"), "other")

    pages = [live.get("/api/mj/self", "alice", p=p, page_size=20).json()["data"] for p in (1, 2, 3, 4, 1000)]

    assert [d["total"] for d in pages] == [45] * 5
    assert [len(d["items"]) for d in pages] == [20, 20, 5, 0, 0]
    assert [d["page"] for d in pages] == [1, 2, 3, 4, 1000]
    seen = [i["mj_id"] for d in pages for i in d["items"]]
    assert seen == [f"t{i:02d}" for i in range(44, -1, -1)]  # disjoint, complete, newest first
    exact = live.get("/api/mj/self", "alice", p=9, page_size=5).json()["data"]
    assert [i["mj_id"] for i in exact["items"]] == ["t04", "t03", "t02", "t01", "t00"]
    assert live.get("/api/mj/self", "alice", p=10, page_size=5).json()["data"]["items"] == []


def test_a_user_never_sees_another_users_task_whatever_the_filters(live):
    alice, bob = user_id("alice"), user_id("bob")
    add_task(alice, "mine", channel_id=1, submit_time=1000)
    secret = add_task(bob, "bobs", channel_id=2, status="SUCCESS", action="IMAGINE", submit_time=2000)
    attempts = [
        {}, {"mj_id": "bobs"}, {"channel_id": 2}, {"status": "SUCCESS"}, {"action": "IMAGINE"},
        {"start_timestamp": 0, "end_timestamp": 10**12}, {"user_id": bob}, {"user": "bob"},
        {"p": 1, "page_size": 100, "mj_id": "bobs", "channel_id": 2}, {"mj_id": "bobs' OR '1'='1"},
    ]
    for params in attempts:
        response = live.get("/api/mj/self", "alice", **params)
        assert response.status_code == 200, params
        items = response.json()["data"]["items"]
        assert all(i["mj_id"] == "mine" for i in items), params
        assert secret.mj_id not in response.text
        assert all("user_id" not in i and "channel_id" not in i for i in items)


def test_channel_id_is_ignored_on_self(live):
    add_task(user_id("alice"), "mine", channel_id=1)

    data = live.get("/api/mj/self", "alice", channel_id="x").json()["data"]

    assert [i["mj_id"] for i in data["items"]] == ["mine"]


@pytest.mark.parametrize("mj_id", ["it's", 'say "hi"', "a;DROP TABLE task;--", "猫の画像✨", "%00", "\\", "x" * 256])
def test_odd_mj_ids_are_safe_and_match_exactly(live, mj_id):
    add_task(user_id("alice"), mj_id)
    add_task(user_id("alice"), "plain")

    for who, path in (("alice", "/api/mj/self"), ("admin", "/api/mj/")):
        response = live.get(path, who, mj_id=mj_id)
        assert response.status_code == 200
        assert [i["mj_id"] for i in response.json()["data"]["items"]] == [mj_id]


# --- bad parameters -----------------------------------------------------------------------------------


BAD = [
    ("p", "0"), ("p", "-1"), ("p", "abc"), ("p", "1.5"), ("p", "1e3"), ("p", "9" * 30), ("p", "١"),
    ("page_size", "0"), ("page_size", "-5"), ("page_size", "abc"), ("page_size", "0x10"),
    ("start_timestamp", "abc"), ("start_timestamp", "-1"), ("start_timestamp", "2024-01-01"),
    ("end_timestamp", "abc"), ("end_timestamp", "1" * 40),
    ("mj_id", "x" * 10_240), ("mj_id", "nul\x00byte"), ("status", "S" * 100), ("action", "tab\there"),
]


@pytest.mark.parametrize("name,value", BAD)
@pytest.mark.parametrize("path,who", [("/api/mj/self", "alice"), ("/api/mj/", "admin")])
def test_bad_parameters_are_400_naming_the_parameter(live, path, who, name, value):
    response = live.get(path, who, **{name: value})

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["success"] is False and name in body["message"]


@pytest.mark.parametrize("value", ["x", "1.0", "-1", "1;2", "9" * 30])
def test_bad_channel_id_is_400_on_the_admin_endpoint(live, value):
    response = live.get("/api/mj/", "admin", channel_id=value)

    assert response.status_code == 400
    assert "channel_id" in response.json()["message"]


def test_invalid_utf8_in_a_parameter_is_400(live):
    response = live.client.get("/api/mj/self?mj_id=%ff%fe", headers={"Authorization": f"Bearer {live.tokens['alice']}"})

    assert response.status_code == 400 and "mj_id" in response.json()["message"]


def test_empty_parameters_mean_defaults(live):
    add_task(user_id("alice"), "mine")

    response = live.client.get("/api/mj/self?p=&page_size=&mj_id=&start_timestamp=&end_timestamp=",
                               headers={"Authorization": f"Bearer {live.tokens['alice']}"})

    assert response.status_code == 200
    assert response.json()["data"]["total"] == 1


# --- authentication --------------------------------------------------------------------------------


def _auth_cases(tokens):
    return {
        "no header": ({}, 401),
        "Bearer alone": ({"Authorization": "Bearer"}, 401),
        "empty header": ({"Authorization": ""}, 401),
        "wrong token": ({"Authorization": "Bearer mjk-not-a-real-token"}, 401),
        "other scheme": ({"Authorization": f"Basic {tokens['alice']}"}, 401),
    }


@pytest.mark.parametrize("path", ["/api/mj/self", "/api/mj/", "/api/mj"])
def test_requests_without_a_valid_token_are_401(live, path):
    for label, (headers, status) in _auth_cases(live.tokens).items():
        response = live.client.get(path, headers=headers)
        assert response.status_code == status, label
        assert response.json()["success"] is False, label
        assert response.headers.get("www-authenticate") == "Bearer"


def test_revoked_token_is_401_and_a_new_one_works(live):
    old = live.tokens["alice"]
    accounts.revoke_tokens("alice")

    assert live.client.get("/api/mj/self", headers={"Authorization": f"Bearer {old}"}).status_code == 401
    new = accounts.issue_token("alice")
    assert live.client.get("/api/mj/self", headers={"Authorization": f"Bearer {new}"}).status_code == 200


def test_a_disabled_user_is_403_at_once(live):
    assert live.get("/api/mj/self", "alice").status_code == 200
    accounts.set_user("alice", enabled=False)
    accounts.set_user("admin", enabled=False)

    assert live.get("/api/mj/self", "alice").status_code == 403
    response = live.get("/api/mj/", "admin")
    assert response.status_code == 403 and "disabled" in response.json()["message"]


def test_a_user_on_the_admin_endpoint_is_403(live):
    for path in ("/api/mj/", "/api/mj"):
        response = live.get(path, "alice")
        assert response.status_code == 403
        assert response.json() == {
            "success": False, "message": "This endpoint needs an admin token; use /api/mj/self for your own tasks."}


def test_admin_and_root_may_use_both_endpoints(live):
    for who in ("admin", "root"):
        for path in ("/api/mj/self", "/api/mj/", "/api/mj"):
            assert live.get(path, who).status_code == 200, (who, path)


def test_a_bare_token_and_mj_api_secret_are_accepted(live):
    token = live.tokens["alice"]

    assert live.client.get("/api/mj/self", headers={"Authorization": token}).status_code == 200
    assert live.client.get("/api/mj/self", headers={"mj-api-secret": token}).status_code == 200
    assert live.client.get("/api/mj/self", headers={"Authorization": f"bearer {token}"}).status_code == 200


# --- failures and the rest -------------------------------------------------------------------------


def test_store_failure_is_500_failed_to_retrieve_task_list(live):
    add_task(user_id("alice"), "mine")
    Task.drop_table()

    for who, path in (("alice", "/api/mj/self"), ("admin", "/api/mj/")):
        response = live.get(path, who)
        assert response.status_code == 500
        assert response.json() == {"success": False, "message": "Failed to retrieve task list"}


def test_unknown_paths_and_methods_are_json(live):
    response = live.client.get("/api/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["success"] is False

    response = live.client.post("/api/mj/self", headers={"Authorization": f"Bearer {live.tokens['alice']}"})
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.json()["success"] is False

    assert live.client.delete("/api/mj/").status_code == 405
    assert live.client.get("/api/mj/self/").status_code == 404


def test_a_crash_is_a_json_500_without_a_traceback(store, caplog):
    def boom(app, ctx):
        @app.get("/boom", db=False)
        def explode():
            raise RuntimeError("kaput")

    with client_of(store, extra=[boom]) as client, caplog.at_level(logging.ERROR, logger="mjctl.server"):
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"success": False, "message": "Internal server error."}
    assert "Traceback" not in response.text
    assert any("kaput" in (r.exc_text or "") or "kaput" in str(r.exc_info) for r in caplog.records)


def test_healthz_reports_the_database(live):
    response = live.client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["success"] is True and response.json()["data"]["database"] == "ok"


def test_each_request_is_logged_once_without_secrets(live, caplog):
    with caplog.at_level(logging.INFO, logger="mjctl.access"):
        live.client.get("/api/mj/self", params={"p": 2, "token": "hunter2", "sig": "s3cr3t"},
                        headers={"Authorization": f"Bearer {live.tokens['alice']}"})
        live.client.get("/nowhere")
    lines = [r.getMessage() for r in caplog.records if r.name == "mjctl.access"]
    assert len(lines) == 2
    assert "GET /api/mj/self?p=2 200 " in lines[0] and lines[0].endswith("ms")
    assert "GET /nowhere 404 " in lines[1]
    assert not any("hunter2" in line or "s3cr3t" in line or live.tokens["alice"] in line for line in lines)


def test_listing_on_every_database(any_store):
    """The core listing through the server on SQLite, and on PostgreSQL/MariaDB when configured."""
    tokens = make_people()
    alice, bob = user_id("alice"), user_id("bob")
    for i in range(25):
        add_task(alice if i % 2 else bob, f"t{i:02d}", channel_id=1 + i % 3, submit_time=1000 + i)
    with client_of(any_store) as client:
        def get(path, who, **params):
            return client.get(path, params=params, headers={"Authorization": f"Bearer {tokens[who]}"})

        mine = get("/api/mj/self", "alice", page_size=5, p=2).json()["data"]
        assert mine["total"] == 12 and [i["mj_id"] for i in mine["items"]] == ["t13", "t11", "t09", "t07", "t05"]
        everything = get("/api/mj/", "admin", channel_id=2, start_timestamp=1005).json()["data"]
        assert [i["mj_id"] for i in everything["items"]] == ["t22", "t19", "t16", "t13", "t10", "t07"]
        assert get("/api/mj/", "admin", p=2).json()["data"]["total"] == 25
        assert get("/api/mj/", "admin", mj_id="x" * 300).status_code == 400
        assert get("/api/mj/self", "bob", mj_id="t13").json()["data"]["items"] == []
