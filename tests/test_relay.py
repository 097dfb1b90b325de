"""The midjourney-proxy relay against the simulator: every kind and code, failover, refusals, exact charging."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import httpx
import pytest

from tests.books import assert_books, balance, ledger_total
from tests.helpers import closed_port_url, make_settings, temp_database, wait_until
from tests.relay_helpers import SIM_SECRET, start_relay

PNG = ("data:image/png;base64,"
       "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def upstream_task(env, mj_id: str) -> dict:
    from mjctl.upstream import UpstreamClient

    with UpstreamClient(env.sim.url, SIM_SECRET) as client:
        return client.fetch(mj_id)


def upstream_success(env, mj_id: str) -> dict:
    """Wait for the upstream to finish the task, then poll once so mjctl's row says SUCCESS too (a
    follow-up needs its parent finished in mjctl's store, not only upstream)."""
    from mjctl.poller import poll_once

    task = wait_until(lambda: (t := upstream_task(env, mj_id)) and t["status"] == "SUCCESS" and t,
                      message=f"upstream task {mj_id} succeeds")
    poll_once(env.settings)
    return task


def local(mj_id: str):
    from mjctl.models import Task

    return Task.select().where(Task.mj_id == mj_id).order_by(Task.id.desc()).first()


def button(task: dict, fragment: str) -> str:
    return next(b["customId"] for b in task["buttons"] if fragment in b["customId"])


def test_imagine_is_accepted_stored_and_charged_in_one_go(relay_env):
    env = relay_env
    response = env.submit("imagine", {"prompt": "a red cat", "state": "mine"})
    assert response.status_code == 200
    answer = response.json()
    assert answer["code"] == 1 and answer["result"]
    task = local(answer["result"])
    assert (task.status, task.action, task.quota, task.unfinished, task.channel_id) == (
        "SUBMITTED", "IMAGINE", 1000, 1, env.channel.id)
    assert task.prompt == "a red cat" and task.state == "mine" and task.submit_time > 0
    assert balance("alice") == 9000
    from mjctl.models import Ledger

    (entry,) = Ledger.select().where(Ledger.kind == "charge")
    assert (entry.task_id, entry.amount, entry.balance_after) == (task.id, -1000, 9000)
    assert_books()

    with env.client() as c:
        shown = c.get(f"/mj/task/{answer['result']}/fetch").json()
    assert shown["id"] == answer["result"] and shown["action"] == "IMAGINE" and shown["status"] == "SUBMITTED"
    assert shown["submitTime"] == task.submit_time * 1000 and shown["finishTime"] is None
    assert shown["state"] == "mine" and isinstance(shown["buttons"], list) and isinstance(shown["properties"], dict)


def test_every_submit_kind_reaches_the_upstream_and_is_priced(relay_env):
    env = relay_env
    parent_id = env.submit("imagine", {"prompt": "grid"}).json()["result"]
    parent = upstream_success(env, parent_id)
    answers = {
        "action": env.submit("action", {"taskId": parent_id, "customId": button(parent, "upsample::1")}),
        "change": env.submit("change", {"taskId": parent_id, "action": "VARIATION", "index": 2}),
        "simple-change": env.submit("simple-change", {"content": f"{parent_id} U3"}),
        "describe": env.submit("describe", {"link": "https://example.com/cat.png"}),
        "blend": env.submit("blend", {"base64Array": [PNG, PNG], "dimensions": "SQUARE"}),
        "shorten": env.submit("shorten", {"prompt": "a very long prompt about a cat on a mat"}),
    }
    for kind, response in answers.items():
        assert response.status_code == 200 and response.json()["code"] in (1, 22), (kind, response.text)
    actions = {kind: local(r.json()["result"]).action for kind, r in answers.items()}
    assert actions == {"action": "UPSCALE", "change": "VARIATION", "simple-change": "UPSCALE",
                       "describe": "DESCRIBE", "blend": "BLEND", "shorten": "SHORTEN"}
    # imagine 1000, upscale 500 x2, variation 1000, describe 500, blend 1000, shorten 500
    assert balance("alice") == 10_000 - 1000 - 500 - 1000 - 500 - 500 - 1000 - 500
    stats = env.sim.sim.stats()
    assert all(stats[kind] == 1 for kind in answers)

    # modal: a Custom Zoom on the upscale answers 21 and parks in MODAL; the modal continues the same row
    upscale = upstream_success(env, answers["action"].json()["result"])
    zoom = env.submit("action", {"taskId": upscale["id"], "customId": button(upscale, "CustomZoom")}).json()
    assert zoom["code"] == 21
    parked = local(zoom["result"])
    assert (parked.status, parked.action, parked.quota) == ("MODAL", "ZOOM", 1000)
    before = balance("alice")
    modal = env.submit("modal", {"taskId": zoom["result"], "prompt": "zoomed --zoom 2"})
    # 1, or 22 when the account the zoom is pinned to still has every slot busy (a matter of timing)
    assert modal.status_code == 200 and modal.json()["code"] in (1, 22), modal.text
    assert modal.json()["result"] == zoom["result"]
    from mjctl.models import Task

    rows = list(Task.select().where(Task.mj_id == zoom["result"]))
    queued = modal.json()["code"] == 22
    assert len(rows) == 1 and rows[0].status == ("NOT_START" if queued else "SUBMITTED")
    assert rows[0].prompt == "zoomed --zoom 2"
    assert balance("alice") == before  # [prices] MODAL is 0: the action was charged
    assert stats["modal"] == 0 and env.sim.sim.stats()["modal"] == 1
    assert_books()


def test_image_seed_of_own_task(relay_env):
    env = relay_env
    mj_id = env.submit("imagine", {"prompt": "seed me"}).json()["result"]
    upstream_success(env, mj_id)
    with env.client() as c:
        answer = c.get(f"/mj/task/{mj_id}/image-seed")
        assert answer.status_code == 200 and answer.json()["code"] == 1 and answer.json()["result"].isdigit()
    with env.client("bob") as c:
        assert c.get(f"/mj/task/{mj_id}/image-seed").json()["code"] == 3


@pytest.mark.parametrize("case", ["banned", "invalid", "queue_full"])
def test_upstream_rejections_are_recorded_as_failures_and_charge_nothing(relay_env, case):
    env = relay_env
    body = {"prompt": "a bannedword here"} if case == "banned" else {"prompt": "" if case == "invalid" else "x"}
    if case == "queue_full":
        env.sim.sim.update({"queue_size": 0, "concurrency": 1, "step_seconds": 5})
        assert env.submit("imagine", {"prompt": "occupies the only slot"}).json()["code"] == 1
    rows_before = ledger_total("alice")
    quota_before = balance("alice")
    response = env.submit("imagine", body)
    answer = response.json()
    assert response.status_code == 200
    assert answer["code"] == {"banned": 24, "invalid": 4, "queue_full": 23}[case]
    assert ledger_total("alice") == rows_before and balance("alice") == quota_before
    from mjctl.models import Reservation, Task

    failed = Task.select().where(Task.status == "FAILURE").get()
    assert failed.quota == 0 and failed.unfinished == 0 and failed.fail_reason == answer["description"]
    assert failed.mj_id and Reservation.select().count() == 0
    with env.client() as c:
        shown = c.get(f"/mj/task/{failed.mj_id}/fetch").json()
    assert shown["status"] == "FAILURE" and shown["failReason"] == answer["description"]


def test_queued_code_22_is_accepted_and_charged(relay_env):
    env = relay_env
    env.sim.sim.update({"concurrency": 1, "step_seconds": 5})
    assert env.submit("imagine", {"prompt": "first"}).json()["code"] == 1
    queued = env.submit("imagine", {"prompt": "second"}).json()
    assert queued["code"] == 22 and queued["properties"]["numberOfQueues"] >= 1
    assert local(queued["result"]).status == "NOT_START" and local(queued["result"]).quota == 1000
    assert balance("alice") == 8000


def test_upstream_401_is_a_502_and_charges_nothing(relay_env):
    from mjctl import crypto
    from mjctl.models import Channel, Reservation, Task

    env = relay_env
    Channel.update(secret_sealed=crypto.seal(crypto.server_secret(env.settings), "wrong")).execute()
    response = env.submit("imagine", {"prompt": "cat"})
    assert response.status_code == 502 and response.json()["code"] == 9
    assert "wrong" not in response.text
    assert balance("alice") == 10_000 and ledger_total("alice")[0] == 1
    assert Task.select().count() == 0 and Reservation.select().count() == 0


def test_rate_limited_upstream_is_a_429(relay_env):
    env = relay_env
    env.sim.sim.update({"rate_limit": 1.0})
    response = env.submit("imagine", {"prompt": "cat"})
    assert response.status_code == 429 and response.json()["code"] == 9
    assert balance("alice") == 10_000


def test_failover_to_the_next_channel_when_the_first_is_down(relay_env):
    from mjctl import channels

    env = relay_env
    dead = channels.add_channel(env.settings, "dead", closed_port_url(), "x", priority=10)
    answer = env.submit("imagine", {"prompt": "cat"}).json()
    assert answer["code"] == 1
    assert local(answer["result"]).channel_id == env.channel.id != dead.id
    assert balance("alice") == 9000


def test_every_channel_down_is_a_503_and_charges_nothing(relay_env):
    from mjctl.models import Channel

    env = relay_env
    Channel.update(base_url=closed_port_url()).execute()
    response = env.submit("imagine", {"prompt": "cat"})
    assert response.status_code == 503 and response.json()["code"] == 9
    assert balance("alice") == 10_000 and ledger_total("alice")[0] == 1


def test_a_balance_too_small_is_refused_before_the_upstream_is_called(relay_env):
    from mjctl import accounts

    env = relay_env
    accounts.set_user("alice", quota=999)
    rows = ledger_total("alice")
    response = env.submit("imagine", {"prompt": "cat"})
    assert response.status_code == 403 and response.json()["code"] == 4
    assert "insufficient quota" in response.json()["description"]
    assert env.sim.sim.stats()["imagine"] == 0
    assert ledger_total("alice") == rows and balance("alice") == 999


def test_an_action_on_someone_elses_task_is_refused(relay_env):
    env = relay_env
    mj_id = env.submit("imagine", {"prompt": "alice's"}).json()["result"]
    parent = upstream_success(env, mj_id)
    for kind, body in (("action", {"taskId": mj_id, "customId": button(parent, "upsample::1")}),
                       ("change", {"taskId": mj_id, "action": "UPSCALE", "index": 1}),
                       ("simple-change", {"content": f"{mj_id} U1"}),
                       ("modal", {"taskId": mj_id})):
        response = env.submit(kind, body, user="bob")
        assert response.status_code == 404 and response.json()["code"] == 3, kind
    assert env.sim.sim.stats()["action"] == 0 and balance("bob") == 10_000 and ledger_total("bob")[0] == 1
    with env.client("bob") as c:
        assert c.get(f"/mj/task/{mj_id}/fetch").status_code == 404
        assert c.post("/mj/task/list-by-condition", json={"ids": [mj_id]}).json() == []
        assert c.get("/mj/task/list").json() == []


def test_malformed_bodies_and_unknown_ids(relay_env):
    env = relay_env
    with env.client() as c:
        for raw in (b"{not json", b"[1, 2]", b""):
            response = c.post("/mj/submit/imagine", content=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == 400 and response.json()["code"] == 4
        assert c.post("/mj/task/list-by-condition", json={"ids": "x"}).status_code == 400
        unknown = c.get("/mj/task/1730000000000123/fetch")
        assert unknown.status_code == 404 and unknown.json() == {
            "code": 3, "description": "task not found", "result": None, "properties": {}}
        assert c.post("/mj/submit/paint", json={}).json()["code"] == 3
        assert c.post("/mj/submit/action", json={"customId": "x"}).json()["code"] == 4
    assert env.sim.sim.stats()["total"] == 0 and ledger_total("alice")[0] == 1


def test_authentication_headers(relay_env):
    from mjctl import accounts

    env = relay_env
    token = env.tokens["alice"]
    for headers in ({"Authorization": f"Bearer {token}"}, {"Authorization": token}, {"mj-api-secret": token}):
        with env.client(**headers) as c:
            assert c.get("/mj/task/list").status_code == 200
    with env.client(**{"mj-api-secret": "nope"}) as c:
        response = c.post("/mj/submit/imagine", json={"prompt": "x"})
        assert response.status_code == 401 and response.json()["code"] == 4
    with env.client(None) as c:
        assert c.get("/mj/task/list").status_code == 401
    accounts.set_user("alice", enabled=False)
    response = env.submit("imagine", {"prompt": "x"})
    assert response.status_code == 403 and env.sim.sim.stats()["imagine"] == 0


def test_speed_prefixes_are_forwarded(relay_env):
    env = relay_env
    for prefix in ("/mj-fast", "/mj-relax", "/mj-turbo"):
        answer = env.submit("imagine", {"prompt": "fast"}, prefix=prefix).json()
        assert answer["code"] == 1
        with env.client() as c:
            assert c.get(f"{prefix}/mj/task/{answer['result']}/fetch").json()["id"] == answer["result"]
    assert env.sim.sim.stats()["by_prefix"] == {"/mj": 0, "/mj-fast": 1, "/mj-relax": 1, "/mj-turbo": 1}


def test_list_and_list_by_condition_are_the_callers(relay_env):
    env = relay_env
    mine = [env.submit("imagine", {"prompt": f"a{i}"}).json()["result"] for i in range(3)]
    theirs = env.submit("imagine", {"prompt": "b"}, user="bob").json()["result"]
    with env.client() as c:
        listed = c.get("/mj/task/list").json()
        assert [t["id"] for t in listed] == mine[::-1]
        found = c.post("/mj/task/list-by-condition", json={"ids": [mine[0], theirs, "nope", mine[2]]}).json()
        assert sorted(t["id"] for t in found) == sorted([mine[0], mine[2]])


def test_caller_hook_is_kept_not_forwarded_and_mjctl_hook_is_signed(relay_env):
    from mjctl import crypto

    env = relay_env
    plain = env.submit("imagine", {"prompt": "hooked", "notifyHook": "https://caller.example/hook"}).json()
    assert upstream_task(env, plain["result"])["properties"]["notifyHook"] is None  # not forwarded
    assert local(plain["result"]).properties_dict()["notifyHook"] == "https://caller.example/hook"

    env.push_here()
    answer = env.submit("imagine", {"prompt": "pushed", "notifyHook": "https://caller.example/hook"}).json()
    hook = upstream_task(env, answer["result"])["properties"]["notifyHook"]
    nonce = local(answer["result"]).nonce
    sig = crypto.sign(crypto.server_secret(env.settings), "notify-task", f"{env.channel.id}/{nonce}")
    assert len(nonce) >= 16 and hook == f"{env.url}/mj/notify/{env.channel.id}/{nonce}?sig={sig}"
    wait_until(lambda: local(answer["result"]).status == "SUCCESS", message="pushes arrive")
    with env.client() as c:
        shown = c.get(f"/mj/task/{answer['result']}/fetch").json()
    assert "sig=" not in str(shown["properties"])  # mjctl's signed hook is never shown to the caller


def test_expired_reservations_count_for_nothing(relay_env):
    from mjctl.models import Reservation, User
    from mjctl.relay import available_quota

    env = relay_env
    uid = User.get(User.name == "alice").id
    Reservation.create(user_id=uid, amount=10_000, expires_at=time.time() - 1)
    assert available_quota(uid) == 10_000
    assert env.submit("imagine", {"prompt": "x"}).json()["code"] == 1
    assert Reservation.select().count() == 0


def _parallel_submissions(env, n: int) -> list[httpx.Response]:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i):
        with env.client() as c:
            barrier.wait()
            results[i] = c.post("/mj/submit/imagine", json={"prompt": f"race {i}"})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _check_exact_charging(env) -> None:
    from mjctl.models import Reservation, Task

    responses = _parallel_submissions(env, 50)
    accepted = [r for r in responses if r.status_code == 200 and r.json()["code"] in (1, 22)]
    refused = [r for r in responses if r.status_code == 403]
    assert len(accepted) == 30 and len(refused) == 20, [r.status_code for r in responses]
    assert all(r.json()["code"] == 4 for r in refused)
    assert env.sim.sim.stats()["imagine"] == 30
    assert balance("alice") == 0
    assert Task.select().where(Task.quota == 1000).count() == 30 and Reservation.select().count() == 0
    assert_books()


def test_fifty_parallel_submissions_with_a_balance_for_thirty(store):
    store.relay = replace(store.relay, max_in_flight_per_user=64)  # one user's 50 at once; that cap is tested elsewhere
    env = start_relay(store, users=(("alice", 30_000),))
    try:
        _check_exact_charging(env)
    finally:
        env.server.stop()
        env.sim.stop()


def test_fifty_parallel_submissions_on_postgresql(tmp_path):
    from mjctl.db import open_store
    with temp_database("postgres") as url:
        settings = make_settings(tmp_path, url, relay__max_in_flight_per_user=64)
        open_store(settings)
        env = start_relay(settings, users=(("alice", 30_000),))
        try:
            _check_exact_charging(env)
        finally:
            env.server.stop()
            env.sim.stop()


def test_a_midjourney_proxy_client_written_from_upstream_md(relay_env):
    """Only what docs/upstream.md says: mj-api-secret, submit imagine, poll fetch until a terminal status."""
    env = relay_env
    env.push_here()  # the simulator's notifyHook pushes keep mjctl's copy of the task current
    with env.client(**{"mj-api-secret": env.tokens["alice"]}) as mj:
        submitted = mj.post("/mj/submit/imagine", json={"prompt": "a lighthouse at dusk", "state": "s1"}).json()
        assert submitted["code"] in (1, 22)
        task_id = submitted["result"]
        seen = []

        def finished():
            response = mj.get(f"/mj/task/{task_id}/fetch")
            assert response.status_code == 200
            task = response.json()
            seen.append(task["progress"])
            return task if task["status"] in ("SUCCESS", "FAILURE", "CANCEL") else None

        task = wait_until(finished, timeout=15, message="the relayed task finishes")
    assert task["status"] == "SUCCESS" and task["progress"] == "100%" and task["imageUrl"]
    assert task["finishTime"] >= task["submitTime"] and len(task["buttons"]) == 9
    assert task["state"] == "s1" and task["id"] == task_id


def test_openapi_documents_the_relay(relay_env):
    with relay_env.client(None) as c:
        paths = c.get("/api/openapi.json").json()["paths"]
    for prefix in ("", "/mj-fast", "/mj-relax", "/mj-turbo"):
        for path in ("/mj/submit/{kind}", "/mj/task/{mj_id}/fetch", "/mj/task/list-by-condition", "/mj/task/list",
                     "/mj/task/{mj_id}/image-seed"):
            assert prefix + path in paths
    assert "404" in paths["/mj/task/{mj_id}/fetch"]["get"]["responses"]
    assert "/mj/notify/{channel_id}" in paths
