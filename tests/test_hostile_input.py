"""Hostile JSON bodies and oversized fields: every JSON route answers a clear 400 and changes nothing.

Refusals happen before any reservation, task row or upstream call, so most cases run in process against a
channel whose upstream is a closed port (any call to it would turn the 400 into a 503). The accepted edge
cases and the upstream's call count use the real simulator behind a real server (relay_env).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import pytest

from tests.books import assert_books, balance, ledger_total
from tests.helpers import closed_port_url, make_settings
from tests.relay_helpers import SIM_SECRET

DEEP = 50_000
HOSTILE = {
    "deep array": b"[" * DEEP + b"]" * DEEP,
    "deep object": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "65 levels inside an object": b'{"prompt": "cat", "x": ' + b"[" * 64 + b"]" * 64 + b"}",
    "NaN": b'{"prompt": "cat", "seed": NaN}',
    "Infinity": b'{"prompt": "cat", "seed": Infinity}',
    "-Infinity": b'{"prompt": "cat", "seed": -Infinity}',
    "lone high surrogate": b'{"prompt": "cat \\ud800"}',
    "lone low surrogate": b'{"prompt": "\\udc00 cat"}',
    "invalid UTF-8": b'{"prompt": "cat \xff\xfe"}',
    "encoded surrogate": b'{"prompt": "cat \xed\xa0\x80"}',
    "empty": b"",
    "array": b"[1, 2]",
    "string": b'"cat"',
    "number": b"1",
    "null": b"null",
}
EXPECTED = {  # words the description must carry
    "deep array": "deeper than 64", "deep object": "deeper than 64", "65 levels inside an object": "deeper than 64",
    "NaN": "NaN and Infinity", "Infinity": "NaN and Infinity", "-Infinity": "NaN and Infinity",
    "lone high surrogate": "surrogate", "lone low surrogate": "surrogate",
    "invalid UTF-8": "UTF-8", "encoded surrogate": "UTF-8", "empty": "empty",
    "array": "JSON object", "string": "JSON object", "number": "JSON object", "null": "JSON object",
}


@pytest.fixture
def env(store):
    """The app in process, alice with 10,000 quota and a task of hers, one channel that cannot be reached."""
    from mjctl import accounts, channels, crypto
    from mjctl.db import write_tx
    from mjctl.models import Task
    from mjctl.server.app import create_app

    channel = channels.add_channel(store, "dead", closed_port_url(), SIM_SECRET)
    user, token = accounts.create_user("alice", quota=10_000)
    with write_tx():
        task = Task.create(user_id=user.id, channel_id=channel.id, mj_id="1730000000000001", status="SUBMITTED",
                           progress="0%", quota=0, submit_time=1730000000, prompt="a cat")
    client = httpx.Client(transport=httpx.WSGITransport(app=create_app(store)), base_url="http://mjctl",
                          headers={"Authorization": f"Bearer {token}"})
    sig = crypto.sign(crypto.server_secret(store), "notify", str(channel.id))
    with client:
        yield SimpleNamespace(settings=store, client=client, channel=channel, task=task,
                              notify=f"/mj/notify/{channel.id}?sig={sig}")


def books() -> tuple:
    """Everything a request could have changed: tasks, reservations, alice's balance and ledger."""
    from mjctl.models import Reservation, Task, User

    tasks = [(t.mj_id, t.status, t.progress, t.prompt, t.state, t.quota, t.updated_at, t.properties)
             for t in Task.select().order_by(Task.id)]
    user = User.get(User.name == "alice")
    return tasks, Reservation.select().count(), user.quota, user.used_quota, ledger_total("alice")


def post_raw(client: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def assert_refused(response: httpx.Response, *words: str) -> str:
    """A 400 in the upstream's envelope, code 4, with words in its description."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"code", "description", "result", "properties"} and body["code"] == 4, body
    for word in words:
        assert word in body["description"], body
    return body["description"]


JSON_ROUTES = ["/mj/submit/imagine", "/mj-fast/mj/submit/imagine", "/mj/submit/action", "/mj/submit/blend",
               "/mj/task/list-by-condition", "/mj-relax/mj/task/list-by-condition", "notify"]


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_hostile_json_is_a_400_that_changes_nothing(env, route):
    path = env.notify if route == "notify" else route
    before = books()
    for name, raw in HOSTILE.items():
        began = time.perf_counter()
        response = post_raw(env.client, path, raw)
        assert_refused(response, EXPECTED[name])
        assert time.perf_counter() - began < 1.0, name  # the 50,000-deep bodies are no slower than the rest
    assert books() == before
    assert_books()


SUBMIT_REFUSALS = [
    ("imagine", {"prompt": 5}, ("prompt", "string")),
    ("imagine", {"prompt": {"text": "cat"}}, ("prompt", "string")),
    ("imagine", {"prompt": ["cat"]}, ("prompt", "string")),
    ("imagine", {"prompt": "x" * 8001}, ("prompt is longer than 8000 characters",)),
    ("imagine", {"prompt": "cat", "state": "s" * 1025}, ("state is longer than 1024 characters",)),
    ("imagine", {"prompt": "cat", "state": {"order": 7}}, ("state", "string")),
    ("imagine", {"prompt": "cat", "state": 7}, ("state", "string")),
    ("imagine", {"prompt": "cat", "notifyHook": 1}, ("notifyHook", "string")),
    ("imagine", {"prompt": "cat", "notifyHook": "https://x.example/" + "h" * 2048}, ("notifyHook", "2048")),
    ("imagine", {"prompt": "cat", "botType": "B" * 33}, ("botType", "32")),
    ("imagine", {"prompt": "cat", "botType": ["MID_JOURNEY"]}, ("botType", "string")),
    ("imagine", {"prompt": "cat", "base64Array": "aGk="}, ("base64Array", "list of strings")),
    ("blend", {"base64Array": ["aGk=", 5], "dimensions": "SQUARE"}, ("base64Array", "list of strings")),
    ("blend", {"base64Array": ["aGk=", "aGk="], "dimensions": "S" * 33}, ("dimensions", "32")),
    ("describe", {"base64": {"data": "aGk="}}, ("base64", "string")),
    ("action", {"taskId": "1730000000000001", "customId": {"id": "x"}}, ("customId", "string")),
    ("action", {"taskId": "1730000000000001", "customId": "MJ::" + "x" * 253}, ("customId", "256")),
    ("action", {"taskId": "1" * 65, "customId": "MJ::JOB::upsample::1::x"}, ("taskId", "64")),
    ("action", {"taskId": {"id": 1}, "customId": "MJ::JOB::upsample::1::x"}, ("taskId", "string")),
    ("action", {"taskId": True, "customId": "MJ::JOB::upsample::1::x"}, ("taskId", "string")),
    ("change", {"taskId": "1730000000000001", "action": 5, "index": 1}, ("action", "string")),
    ("change", {"taskId": "1730000000000001", "action": "U" * 33, "index": 1}, ("action", "32")),
    ("simple-change", {"content": ["1730000000000001 U1"]}, ("content", "string")),
    ("simple-change", {"content": "1730000000000001 U1" + " " * 200}, ("content", "128")),
    ("modal", {"taskId": "1730000000000001", "prompt": "x" * 8001}, ("prompt", "8000")),
    ("modal", {"taskId": "1730000000000001", "maskBase64": 7}, ("maskBase64", "string")),
    ("shorten", {"prompt": 1.5}, ("prompt", "string")),
]


@pytest.mark.parametrize("prefix", ["", "/mj-turbo"])
def test_wrong_types_and_long_fields_are_refused_before_anything_is_held(env, prefix):
    before = books()
    for kind, body, words in SUBMIT_REFUSALS:
        response = env.client.post(f"{prefix}/mj/submit/{kind}", json=body)
        assert_refused(response, *words)
    assert books() == before


def test_other_json_routes_check_their_fields(env):
    before = books()
    for ids in ("1730000000000001", {"a": 1}, 5, None):
        assert_refused(env.client.post("/mj/task/list-by-condition", json={"ids": ids}), "ids")
    for report in ({"id": 5, "status": "SUCCESS"}, {"id": {"a": 1}, "status": "SUCCESS"},
                   {"id": "1" * 65, "status": "SUCCESS"}, {"id": ["1730000000000001"], "status": "SUCCESS"}):
        assert_refused(env.client.post(env.notify, json=report), "id must be a string of at most 64 characters")
    assert_refused(env.client.post(env.notify, json={"status": "SUCCESS"}), "no id")
    assert books() == before


def test_limits_are_inclusive_and_the_prompt_limit_is_a_setting(tmp_path):
    from mjctl import relay
    settings = make_settings(tmp_path)
    relay.check_fields(settings, {"prompt": "x" * 8000, "state": "s" * 1024, "taskId": "1" * 64,
                                  "customId": "c" * 256, "notifyHook": "h" * 2048,
                                  "base64Array": ["aGk="], "state2": {"free": "fields are forwarded"}})
    relay.check_fields(settings, {"prompt": None, "state": None, "taskId": 1730000000000001})
    small = make_settings(tmp_path, relay__max_prompt_chars=100)
    relay.check_fields(small, {"prompt": "x" * 100})
    with pytest.raises(relay._Refusal, match="prompt is longer than 100 characters"):
        relay.check_fields(small, {"prompt": "x" * 101})


def test_strict_reader():
    from mjctl import jsontext

    assert jsontext.loads_strict(b"[" * 64 + b"]" * 64) is not None
    assert jsontext.loads_strict('{"a": "\\ud83d\\ude00 \u00e9"}'.encode()) == {"a": "\U0001F600 \u00e9"}
    assert jsontext.loads_strict(b'{"a": "NaN", "b": [1e308]}') == {"a": "NaN", "b": [1e308]}
    for name, raw in HOSTILE.items():
        if EXPECTED[name] == "JSON object":
            continue  # JSON, just not an object: the routes refuse those
        began = time.perf_counter()
        with pytest.raises(ValueError, match=EXPECTED[name]):
            jsontext.loads_strict(raw)
        assert time.perf_counter() - began < 0.1, name
    with pytest.raises(jsontext.StrictJSONError, match="deeper than 3"):
        jsontext.loads_strict(b'{"a": [{"b": []}]}', max_depth=3)
    assert jsontext.loads_strict(b'{"a": [{"b": 1}]}', max_depth=3)
    assert jsontext.loads(b"[NaN]")[0] != jsontext.loads(b"[NaN]")[0]  # the lenient reader is unchanged


def test_upstream_is_never_called_and_the_edges_are_accepted(relay_env):
    """End to end: refusals never reach the simulator; a prompt of exactly the limit and a state of exactly
    1,024 characters are relayed, stored and charged."""
    from mjctl.models import Task

    env = relay_env
    before = (balance("alice"), ledger_total("alice"), Task.select().count())
    with env.client() as c:
        for raw in (HOSTILE["deep array"], HOSTILE["NaN"], HOSTILE["lone high surrogate"], HOSTILE["invalid UTF-8"]):
            assert_refused(post_raw(c, "/mj/submit/imagine", raw))
        assert_refused(c.post("/mj/submit/imagine", json={"prompt": "x" * 8001}), "8000")
        assert_refused(c.post("/mj/submit/imagine", json={"prompt": "cat", "state": "s" * 1025}), "1024")
    assert env.sim.sim.stats()["total"] == 0
    assert (balance("alice"), ledger_total("alice"), Task.select().count()) == before

    prompt, state = "猫" * 10 + "p" * 7990, "s" * 1024  # characters, not bytes
    assert len(prompt) == 8000
    response = env.submit("imagine", {"prompt": prompt, "state": state})
    assert response.status_code == 200 and response.json()["code"] == 1, response.text
    task = Task.get(Task.mj_id == response.json()["result"])
    assert (task.prompt, task.state) == (prompt, state)
    assert env.sim.sim.stats()["total"] == 1
    assert balance("alice") == before[0] - 1000
    assert_books()
