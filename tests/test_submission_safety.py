"""What a submission is safe from: leaked notify links, ids that collide, and a process killed mid-way.

Every submission is forwarded with its own signed notify link; a push through it changes that one
unfinished task and nothing else. A submission is written down before it is forwarded, so a server killed
between the upstream accepting it and mjctl recording it leaves a record the poller finishes: the task is
adopted and charged once, or dropped uncharged when the upstream never got it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.books import assert_books, balance, ledger_total
from tests.helpers import free_port, make_settings, temp_database, wait_until
from tests.relay_helpers import SIM_SECRET


def upstream_task(env, mj_id: str) -> dict:
    from mjctl.upstream import UpstreamClient

    with UpstreamClient(env.sim.url, SIM_SECRET) as client:
        return client.fetch(mj_id)


def local(mj_id: str):
    from mjctl.models import Task

    return Task.get(Task.mj_id == mj_id)


def row(mj_id: str) -> dict:
    """Every column of a task except its version stamp, to tell "untouched" exactly."""
    data = dict(local(mj_id).__data__)
    data.pop("updated_at")
    return data


def running(env, user: str, prompt: str) -> str:
    response = env.submit("imagine", {"prompt": prompt, "state": f"{user}'s own"}, user=user)
    assert response.status_code == 200 and response.json()["code"] == 1, response.text
    mj_id = response.json()["result"]
    if env.settings.server.public_url:  # the upstream's first push (SUBMITTED) lands before anyone looks
        wait_until(lambda: local(mj_id).prompt_en, message="the first push arrives")
    return mj_id


def leaked_link(env, mj_id: str) -> str:
    """The notify link the upstream holds for a task, as anyone reading the upstream's task sees it."""
    hook = upstream_task(env, mj_id)["properties"]["notifyHook"]
    assert hook and "/mj/notify/" in hook
    return hook


# --- the notify link ------------------------------------------------------------------------------------


def test_a_tasks_link_cannot_push_about_another_users_task(relay_env):
    env = relay_env
    env.push_here()
    env.sim.sim.update({"step_seconds": 30})  # both tasks stay running
    mine, theirs = running(env, "alice", "a fox"), running(env, "bob", "a hen")
    before, bob_books = row(theirs), (balance("bob"), ledger_total("bob"))
    attack = {"id": theirs, "status": "FAILURE", "progress": "", "failReason": "cancelled by alice",
              "imageUrl": "http://169.254.169.254/latest/meta-data/"}
    answer = env.sim.sim.push_as(leaked_link(env, mine), attack)
    assert answer["status"] == 403 and answer["body"]["code"] == 4, answer
    assert row(theirs) == before
    assert (balance("bob"), ledger_total("bob")) == bob_books and local(theirs).quota == 1000

    # Another nonce under the same signature, or the link of a task with the channel id changed: refused.
    link = leaked_link(env, mine)
    nonce = local(mine).nonce
    forged = link.replace(nonce, "A" * len(nonce))
    assert env.sim.sim.push_as(forged, attack)["status"] == 403
    assert env.sim.sim.push_as(link.replace(f"/{env.channel.id}/", f"/{env.channel.id + 1}/"), attack)["status"] == 403
    assert row(theirs) == before

    # The link does work for its own task: that is all a leaked link allows.
    own = env.sim.sim.push_as(link, {"id": mine, "status": "IN_PROGRESS", "progress": "46%"})
    assert own["status"] == 200 and own["body"]["description"] == "applied"
    assert (local(mine).status, local(mine).progress, local(mine).state) == ("IN_PROGRESS", "46%", "alice's own")
    assert_books()


def test_a_finished_tasks_link_is_dead(relay_env):
    env = relay_env
    env.push_here()
    mj_id = running(env, "alice", "a quick fox")
    link = leaked_link(env, mj_id)
    wait_until(lambda: local(mj_id).status == "SUCCESS", message="the pushes finish the task")
    before = row(mj_id)
    for late in ({"id": mj_id, "status": "FAILURE", "progress": "", "failReason": "late"},
                 {"id": mj_id, "status": "SUCCESS", "imageUrl": "http://10.0.0.1/internal.png"}):
        answer = env.sim.sim.push_as(link, late)
        assert answer["status"] == 410 and answer["body"]["code"] == 4, answer
    assert row(mj_id) == before and before["quota"] == 1000
    assert balance("alice") == 9000
    assert_books()


def test_the_old_per_channel_link_reaches_only_tasks_submitted_before_per_task_links(relay_env):
    from mjctl import accounts
    from mjctl.db import write_tx
    from mjctl.models import Task, User
    from mjctl.relay import notify_hook_url

    env = relay_env
    env.push_here()
    env.sim.sim.update({"step_seconds": 30})
    alice = User.get(User.name == "alice")
    with write_tx():  # a task as stored before the upgrade: no nonce
        old = Task.create(user_id=alice.id, channel_id=env.channel.id, mj_id="1730000000000001", status="SUBMITTED",
                          progress="0%", quota=1000, submit_time=1730000000)
        accounts.charge(alice.id, 1000, task_id=old.id, reason="before the upgrade")
    assert old.nonce == ""
    new = running(env, "alice", "a new fox")
    old_link = notify_hook_url(env.settings, env.channel.id)
    assert old_link.endswith(f"/mj/notify/{env.channel.id}?sig=" + old_link.split("sig=")[1])

    applied = env.sim.sim.push_as(old_link, {"id": old.mj_id, "status": "IN_PROGRESS", "progress": "31%"})
    assert applied["status"] == 200 and applied["body"]["description"] == "applied"
    assert Task.get_by_id(old.id).progress == "31%"

    before = row(new)
    refused = env.sim.sim.push_as(old_link, {"id": new, "status": "FAILURE", "failReason": "via the old link"})
    assert refused["status"] == 403 and refused["body"]["code"] == 4
    assert row(new) == before

    env.sim.sim.push_as(old_link, {"id": old.mj_id, "status": "FAILURE", "progress": "", "failReason": "ended"})
    assert Task.get_by_id(old.id).quota == 0  # refunded once
    after = env.sim.sim.push_as(old_link, {"id": old.mj_id, "status": "SUCCESS", "imageUrl": "http://10.0.0.1/x"})
    assert after["status"] == 200 and after["body"]["description"].startswith("nothing")
    assert Task.get_by_id(old.id).status == "FAILURE" and not Task.get_by_id(old.id).image_url
    assert balance("alice") == 9000
    assert_books()


# --- colliding ids --------------------------------------------------------------------------------------


def assert_nothing_held(user: str, books: tuple) -> None:
    from mjctl.models import PendingSubmission, Reservation

    assert (balance(user), ledger_total(user)) == books
    assert Reservation.select().count() == 0 and PendingSubmission.select().count() == 0
    assert_books()


def test_an_accepted_id_another_task_has_is_an_uncharged_protocol_failure(relay_env):
    from mjctl.models import Task

    env = relay_env
    env.sim.sim.update({"step_seconds": 30})
    older = running(env, "bob", "bob's fox")
    before, books, tasks = row(older), (balance("alice"), ledger_total("alice")), Task.select().count()
    env.sim.sim.update({"next_ids": [older]})  # the upstream hands out bob's id again
    response = env.submit("imagine", {"prompt": "alice's fox"})
    assert response.status_code == 502 and response.json()["code"] == 9, response.text
    assert older not in response.text
    assert Task.select().count() == tasks  # not recorded
    assert row(older) == before
    assert_nothing_held("alice", books)


def test_a_unique_index_catching_the_collision_ends_the_same_way(relay_env, monkeypatch):
    """The check before the insert can lose a race; a unique (channel, id) index then refuses the insert
    and the outcome is the same: nothing recorded, nothing charged, the older task untouched."""
    from mjctl import pending
    from mjctl.db import database
    from mjctl.models import Task

    env = relay_env
    env.sim.sim.update({"step_seconds": 30})
    database.execute_sql("CREATE UNIQUE INDEX IF NOT EXISTS test_task_identity ON task (channel_id, mj_id)")
    older = running(env, "bob", "bob's fox")
    before, books, tasks = row(older), (balance("alice"), ledger_total("alice")), Task.select().count()
    monkeypatch.setattr(pending, "id_taken", lambda channel_id, mj_id: False)
    env.sim.sim.update({"next_ids": [older]})
    response = env.submit("imagine", {"prompt": "alice's fox"})
    assert response.status_code == 502 and response.json()["code"] == 9, response.text
    assert Task.select().count() == tasks and row(older) == before
    assert_nothing_held("alice", books)


# --- write-ahead and adoption -----------------------------------------------------------------------------


def test_adoption_finds_the_task_by_its_notify_link_when_the_state_is_not_echoed(relay_env):
    """An upstream that does not echo state still echoes the notify hook, whose path ends in the nonce."""
    from mjctl import pending, relay
    from mjctl.models import PendingSubmission, Task, User
    from mjctl.poller import poll_once
    from mjctl.upstream import UpstreamClient

    env = relay_env
    env.push_here()
    alice = User.get(User.name == "alice")
    record = relay._write_ahead(alice.id, 1000, relay.reservation_ttl(env.settings, 1), dict(
        nonce=pending.new_nonce(), kind="imagine", action="IMAGINE", channel_ids=str(env.channel.id),
        state="alice's own", prompt="a fox"))
    hook = relay.notify_hook_url(env.settings, env.channel.id, record.nonce)
    with UpstreamClient(env.sim.url, SIM_SECRET) as client:  # forwarded, and then the process died
        accepted = client.submit("imagine", {"prompt": "a fox", "state": "not a tag", "notifyHook": hook})
    assert pending.nonce_of(upstream_task(env, accepted.result)) == record.nonce

    summary = poll_once(env.settings, now=time.time() + relay.submit_deadline(env.settings) + 1)
    assert summary.faults["interrupted_adopted"] == 1
    task = Task.get(Task.nonce == record.nonce)
    assert (task.mj_id, task.user_id, task.quota, task.state) == (accepted.result, alice.id, 1000, "alice's own")
    assert PendingSubmission.select().count() == 0
    assert balance("alice") == 9000 and ledger_total("alice")[0] == 2
    assert_books()


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def database_url(request, tmp_path):
    """A database URL that a server subprocess and this test share; the server ones skip, saying why,
    without their test URLs."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/shared.db"
        return
    with temp_database(request.param) as url:
        yield url


@pytest.mark.parametrize("upstream", ["keeps the task", "forgets the task"])
def test_a_server_killed_between_forwarding_and_recording_leaves_nothing_lost_or_charged_twice(
        tmp_path, database_url, upstream):
    from mjctl import accounts, channels
    from mjctl.db import open_store
    from mjctl.models import PendingSubmission, Reservation, Task
    from mjctl.poller import poll_once
    from mjctl.relay import available_quota, reservation_ttl
    from mjctl.sim import run_simulator_in_thread

    settings = make_settings(tmp_path, database_url)
    open_store(settings)
    sim = run_simulator_in_thread(secret=SIM_SECRET, step_seconds=0.02, queue_size=1000)
    proc = None
    try:
        channels.add_channel(settings, "sim", sim.url, SIM_SECRET)
        alice, token = accounts.create_user("alice", quota=10_000)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MJCTL_DATABASE_URL": database_url, "MJCTL_SERVER_SECRET": "test-secret",
               "MJCTL_SERVER_PUBLIC_URL": url, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "mjctl", "serve", "--port", str(port), "--threads", "4",
                                 "--no-poll"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: healthy(url) or proc.poll() is not None, timeout=30, message="server up")
        assert proc.poll() is None

        sim.sim.update({"hang": 1.0})  # the upstream takes the task, then holds its answer
        caller = threading.Thread(target=lambda: _submit_ignoring_the_end(url, token), daemon=True)
        caller.start()
        wait_until(lambda: sim.sim.stats()["tasks"] == 1, message="the upstream has the submission")
        record = PendingSubmission.get()
        assert (record.user_id, record.price, Task.select().count()) == (alice.id, 1000, 0)
        assert available_quota(alice.id) == 9000  # held while in flight

        os.killpg(proc.pid, signal.SIGKILL)  # the whole server, workers included
        proc.wait(timeout=15)
        caller.join(timeout=15)
        sim.sim.update({"hang": 0.0})
        if upstream == "forgets the task":
            sim.sim.restart()

        calls_over = time.time() + reservation_ttl(settings, 1) - 59
        expired = time.time() + reservation_ttl(settings, 1) + 1
        first = poll_once(settings, now=calls_over)
        if upstream == "keeps the task":
            assert first.faults["interrupted_adopted"] == 1
            task = Task.get()
            assert (task.nonce, task.user_id, task.quota, task.state) == (record.nonce, alice.id, 1000, "mine")
            for _ in range(2):  # later cycles, past the reservation's expiry too, charge nothing more
                assert "interrupted_adopted" not in poll_once(settings, now=expired).faults
            wait_until(lambda: poll_once(settings) and Task.get().status == "SUCCESS", timeout=20,
                       message="the adopted task is polled to its end")
            assert Task.get().image_url and Task.get().quota == 1000
            assert balance("alice") == 9000 and ledger_total("alice") == (2, 9000)
        else:
            assert "interrupted_dropped" not in first.faults  # not before the reservation expires
            assert PendingSubmission.select().count() == 1
            assert poll_once(settings, now=expired).faults["interrupted_dropped"] == 1
            assert Task.select().count() == 0
            assert balance("alice") == 10_000 and ledger_total("alice") == (1, 10_000)
        assert PendingSubmission.select().count() == 0 and Reservation.select().count() == 0
        assert available_quota(alice.id) == balance("alice")
        assert_books()
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        sim.stop()


def _submit_ignoring_the_end(url: str, token: str) -> None:
    """The caller of a submission whose server is killed: its connection just breaks."""
    try:
        httpx.post(url + "/mj/submit/imagine", json={"prompt": "a fox", "state": "mine"},
                   headers={"Authorization": f"Bearer {token}"}, timeout=60)
    except httpx.HTTPError:
        pass


def test_a_submission_adopted_while_its_answer_was_on_the_way_is_charged_once(relay_env, monkeypatch):
    """A slow answer can arrive after a poller adopted the submission (it outlived its calls' deadline):
    the submitter then finds its record gone and the task recorded, and answers with it, charging nothing."""
    from mjctl import relay
    from mjctl.models import PendingSubmission, Task
    from mjctl.poller import poll_once

    env = relay_env
    real_forward = relay._forward
    adopted = []

    def forward_then_adopt(*args, **kwargs):
        answer = real_forward(*args, **kwargs)
        adopted.append(poll_once(env.settings, now=time.time() + relay.submit_deadline(env.settings) + 1))
        return answer

    monkeypatch.setattr(relay, "_forward", forward_then_adopt)
    response = env.submit("imagine", {"prompt": "a slow fox", "state": "mine"})
    assert response.status_code == 200 and response.json()["code"] == 1
    assert adopted[0].faults["interrupted_adopted"] == 1
    task = Task.get()
    assert (task.mj_id, task.quota, task.state) == (response.json()["result"], 1000, "mine")
    assert PendingSubmission.select().count() == 0
    assert balance("alice") == 9000 and ledger_total("alice")[0] == 2
    assert_books()
