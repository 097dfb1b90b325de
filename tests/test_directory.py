"""GET /api/user/self, /api/admin/users and /api/admin/channels, and the admin listing's user_id filter,
in process through the WSGI app."""

from __future__ import annotations

import httpx
import pytest

from mjctl import accounts
from mjctl.channels import add_channel, set_enabled
from mjctl.models import Task
from mjctl.tasks import ADMIN_FIELDS, USER_FIELDS


@pytest.fixture
def client(store):
    from mjctl.server import create_app

    tokens = {}
    for name, role, quota in (("alice", "user", 700), ("alina", "user", 0), ("bob", "user", 5), ("admin", "admin", 0),
                              ("root", "root", 0)):
        _, tokens[name] = accounts.create_user(name, role=role, quota=quota)
    add_channel(store, "relax-pool", "http://127.0.0.1:9", "secret-one")
    add_channel(store, "fast-lane", "http://127.0.0.1:9", "secret-two")
    set_enabled("relax-pool", False)
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(store)), base_url="http://mjctl") as http:
        http.tokens = tokens
        yield http


def get(client, path: str, who: str | None, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {client.tokens[who]}"} if who else {}
    return client.get(path, params=params, headers=headers)


def test_the_callers_account_and_balance(client):
    accounts.topup("alice", 300)
    body = get(client, "/api/user/self", "alice").json()
    assert body == {"success": True, "message": "",
                    "data": {"id": accounts.get_user("alice").id, "name": "alice", "role": "user", "quota": 1000,
                             "used_quota": 0}}
    assert get(client, "/api/user/self", "root").json()["data"]["role"] == "root"


@pytest.mark.parametrize("who, status", [(None, 401), ("alice", 403)])
def test_admin_look_ups_refuse_others(client, who, status):
    for path in ("/api/admin/users?q=a", "/api/admin/channels"):
        answer = get(client, path, who)
        assert answer.status_code == status and answer.json()["success"] is False
    assert get(client, "/api/user/self", None).status_code == 401


def test_user_names_by_id_and_by_prefix(client):
    ids = {name: accounts.get_user(name).id for name in ("alice", "alina", "bob")}
    found = get(client, "/api/admin/users", "admin", ids=f"{ids['bob']}, {ids['alice']},999").json()["data"]["items"]
    assert found == [{"id": ids["alice"], "name": "alice"}, {"id": ids["bob"], "name": "bob"}]
    assert get(client, "/api/admin/users", "admin", q="AL").json()["data"]["items"] == [
        {"id": ids["alice"], "name": "alice"}, {"id": ids["alina"], "name": "alina"}]
    assert get(client, "/api/admin/users", "root", q="a_").json()["data"]["items"] == []  # _ is no wildcard
    assert get(client, "/api/admin/users", "admin", ids="").status_code == 400  # empty means absent: neither given
    assert get(client, "/api/admin/users", "admin", ids=",").json()["data"]["items"] == []


@pytest.mark.parametrize("params, words", [
    ({}, "Give ids"),
    ({"ids": "1,x"}, "whole numbers"),
    ({"ids": "-1"}, "whole numbers"),
    ({"ids": ",".join(["1"] * 101)}, "more than 100"),
    ({"q": "a" * 65}, "too long"),
    ({"q": "a\x01"}, "control characters"),
])
def test_user_look_ups_refuse_bad_parameters(client, params, words):
    answer = get(client, "/api/admin/users", "admin", **params)
    assert answer.status_code == 400
    assert answer.json()["success"] is False and words in answer.json()["message"]


def test_channel_names_without_urls_or_secrets(client):
    body = get(client, "/api/admin/channels", "admin").json()
    assert body["data"]["items"] == [{"id": 2, "name": "fast-lane", "enabled": True},
                                     {"id": 1, "name": "relax-pool", "enabled": False}]
    assert "secret" not in str(body) and "127.0.0.1" not in str(body)


def test_the_admin_listing_filters_by_user_and_keeps_its_fields(client):
    alice, bob = accounts.get_user("alice").id, accounts.get_user("bob").id
    for n, owner in enumerate((alice, bob, bob)):
        Task.create(user_id=owner, channel_id=1, mj_id=f"t{n}", submit_time=1_700_000_000 + n)
    items = get(client, "/api/mj/", "admin", user_id=bob).json()["data"]["items"]
    assert [item["mj_id"] for item in items] == ["t2", "t1"]
    assert all(list(item) == list(USER_FIELDS + ADMIN_FIELDS) for item in items)
    mine = get(client, "/api/mj/self", "alice", user_id=bob).json()["data"]["items"]  # not a user's parameter
    assert [item["mj_id"] for item in mine] == ["t0"] and all(list(item) == list(USER_FIELDS) for item in mine)
    bad = get(client, "/api/mj/", "admin", user_id="bob")
    assert bad.status_code == 400 and "user_id" in bad.json()["message"]
