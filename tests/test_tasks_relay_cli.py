"""`mjctl channels test`, `mjctl tasks submit` and `mjctl tasks watch`."""

from __future__ import annotations

import json
import threading

import pytest

from tests.books import assert_books, balance
from tests.helpers import closed_port_url
from tests.relay_helpers import SIM_SECRET


@pytest.fixture
def sim(store):
    from mjctl import accounts, channels
    from mjctl.sim import run_simulator_in_thread

    handle = run_simulator_in_thread(secret=SIM_SECRET, step_seconds=0.02, queue_size=1000)
    channels.add_channel(store, "sim", handle.url, SIM_SECRET)
    accounts.create_user("alice", quota=2500)
    yield handle
    handle.stop()


def test_channels_test_reports_reachability_secret_and_time(cli, sim, store):
    from mjctl import channels

    result = cli("channels", "test", "sim")
    assert result.exit_code == 0, result.output
    assert "reachable, secret accepted" in result.stdout and " ms." in result.stdout

    data = json.loads(cli("channels", "test", "sim", "--json").stdout)
    assert data["reachable"] is True and data["authorized"] is True and data["ok"] is True and data["rtt_ms"] >= 0

    channels.add_channel(store, "wrong", sim.url, "not-the-secret")
    result = cli("channels", "test", "wrong", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["authorized"] is False and "not-the-secret" not in result.output

    channels.add_channel(store, "down", closed_port_url(), "x")
    result = cli("channels", "test", "down")
    assert result.exit_code == 1 and "UNREACHABLE" in result.stdout

    assert cli("channels", "test", "nope").exit_code == 1


def test_tasks_submit_goes_through_the_relay_and_charges(cli, sim):
    result = cli("tasks", "submit", "a quiet harbour", "--user", "alice")
    assert result.exit_code == 0, result.output
    mj_id = result.stdout.strip()
    assert mj_id.isdigit() and sim.sim.stats()["imagine"] == 1

    data = json.loads(cli("tasks", "submit", "second", "--user", "alice", "--json", "--speed", "relax").stdout)
    assert data["code"] in (1, 22) and data["http_status"] == 200
    assert sim.sim.stats()["by_prefix"]["/mj-relax"] == 1

    refused = cli("tasks", "submit", "third", "--user", "alice")  # 500 left, imagine costs 1000
    assert refused.exit_code == 1 and "insufficient quota" in refused.stderr
    assert sim.sim.stats()["imagine"] == 2 and balance("alice") == 500
    from mjctl.models import Task

    assert Task.select().count() == 2
    assert_books()

    from mjctl import accounts

    accounts.topup("alice", 1000)
    banned = cli("tasks", "submit", "a bannedword", "--user", "alice")
    assert banned.exit_code == 1 and "code 24" in banned.stderr and balance("alice") == 1500
    assert cli("tasks", "submit", "x", "--user", "nobody").exit_code == 1


def _task(mj_id, status="SUBMITTED", progress="0%"):
    from mjctl.models import Task

    return Task.create(user_id=1, channel_id=1, mj_id=mj_id, status=status, progress=progress, quota=0)


def _drive(reports, monkeypatch):
    """Apply (mj_id, report) pairs from another thread, as the poller or a push would: each one only after
    the watcher has looked at the store since the previous one, so every change is seen, however slow
    the machine."""
    from mjctl import reports as report_path
    from mjctl.cli import tasks as tasks_cli

    looks = threading.Condition()
    count = [0]
    original = tasks_cli._snapshot

    def counting_snapshot(*args):
        result = original(*args)
        with looks:
            count[0] += 1
            looks.notify_all()
        return result

    monkeypatch.setattr(tasks_cli, "_snapshot", counting_snapshot)

    def run():
        seen = 0
        for mj_id, report in reports:
            with looks:
                assert looks.wait_for(lambda: count[0] > seen, timeout=30), "the watcher never looked"  # noqa: B023 - waited for before the loop moves on
                seen = count[0]
            report_path.apply_report(1, {"id": mj_id, **report})

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_watch_prints_one_line_per_change_and_exits_0_when_all_succeed(cli, store, monkeypatch):
    _task("111")
    _task("222", status="SUCCESS", progress="100%")
    thread = _drive([("111", {"status": "IN_PROGRESS", "progress": "46%"}),
                     ("111", {"status": "SUCCESS", "progress": "100%"})], monkeypatch)
    result = cli("tasks", "watch", "111", "222", "--interval", "0.01")
    thread.join()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == ["111\tSUBMITTED\t0%", "222\tSUCCESS\t100%"]
    assert lines[-1] == "111\tSUCCESS\t100%" and len(lines) == len(set(lines))


def test_watch_exits_1_when_a_task_fails(cli, store, monkeypatch):
    _task("333", status="IN_PROGRESS", progress="15%")
    thread = _drive([("333", {"status": "FAILURE", "progress": "", "failReason": "banned prompt"})], monkeypatch)
    result = cli("tasks", "watch", "333", "--interval", "0.01")
    thread.join()
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1] == "333\tFAILURE\t-\tbanned prompt"
    assert "did not succeed" in result.stderr


def test_watch_unknown_id_is_an_error(cli, store):
    _task("444", status="SUCCESS", progress="100%")
    result = cli("tasks", "watch", "444", "nope")
    assert result.exit_code == 1 and "'nope'" in result.stderr and result.stdout == ""


def test_watch_draws_progress_bars_on_a_terminal(cli, store, monkeypatch):
    from mjctl.cli import state

    monkeypatch.setattr(state, "env", lambda: state.Env(stdout_isatty=True, color=False))
    _task("555", status="IN_PROGRESS", progress="31%")
    thread = _drive([("555", {"status": "SUCCESS", "progress": "100%"})], monkeypatch)
    result = cli("tasks", "watch", "555", "--interval", "0.01")
    thread.join()
    assert result.exit_code == 0, result.output
    assert "555" in result.stdout and "SUCCESS" in result.stdout and "100%" in result.stdout
