"""`mjctl tasks list --server URL`: the remote listing over HTTP, against a real server on a free port."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from mjctl import accounts
from mjctl.httpserver import ServerThread
from mjctl.models import Task
from mjctl.server import create_app


@pytest.fixture
def remote(store):
    _, alice = accounts.create_user("alice")
    _, bob = accounts.create_user("bob")
    _, admin = accounts.create_user("admin", role="admin")
    a, b = accounts.get_user("alice").id, accounts.get_user("bob").id
    for i in range(30):
        Task.create(user_id=a if i % 3 else b, channel_id=1 + i % 2, mj_id=f"t{i:02d}", submit_time=1000 + i,
                    status="SUCCESS" if i % 5 else "FAILURE", prompt=f"prompt [bold]{i}[/bold]")
    with ServerThread(create_app(store), threads=4) as server:
        yield server.url, {"alice": alice, "bob": bob, "admin": admin}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mine_reads_api_mj_self_and_prints_the_servers_envelope(cli, remote):
    url, tokens = remote

    result = cli("tasks", "list", "--mine", "--server", url, "--json", "--page-size", "5", "--page", "2",
                 env={"MJCTL_TOKEN": tokens["alice"]})

    assert result.exit_code == 0, result.output
    served = httpx.get(url + "/api/mj/self", params={"p": 2, "page_size": 5},
                       headers={"Authorization": f"Bearer {tokens['alice']}"}).json()["data"]
    assert json.loads(result.stdout) == served
    assert served["total"] == 20 and len(served["items"]) == 5


def test_without_mine_an_admin_reads_every_task_with_filters(cli, remote):
    url, tokens = remote

    result = cli("tasks", "list", "--json", "--channel", "2", "--status", "failure", "--since", "1010",
                 "--until", "1029", env={"MJCTL_TOKEN": tokens["admin"], "MJCTL_SERVER": url})

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [i["mj_id"] for i in data["items"]] == ["t25", "t15"]
    assert {"user_id", "channel_id"} <= set(data["items"][0])


def test_the_table_is_the_same_as_local_mode(cli, remote):
    url, tokens = remote

    remote_out = cli("tasks", "list", "--server", url, env={"MJCTL_TOKEN": tokens["admin"]})
    local_out = cli("tasks", "list")

    assert remote_out.exit_code == 0, remote_out.output
    remote_rows = [line.split("\t") for line in remote_out.stdout.splitlines()]
    local_rows = [line.split("\t") for line in local_out.stdout.splitlines()]
    assert remote_rows[0][:4] == ["ID", "MJ_ID", "USER", "CHANNEL"]
    # the same rows, except that a remote listing has no user names to show: its USER column has the ids
    assert [r[:2] + r[3:] for r in remote_rows] == [r[:2] + r[3:] for r in local_rows]
    names = {str(accounts.get_user(name).id): name for name in ("alice", "bob", "admin")}
    assert [names[r[2]] for r in remote_rows[1:]] == [r[2] for r in local_rows[1:]]


@pytest.mark.parametrize("who,args,fragment", [
    ("nobody", ["--mine"], "rejected the token"),
    ("alice", [], "needs an admin token"),
    ("alice", [], "add --mine to list your own tasks"),
])
def test_refusals_are_one_sentence_and_exit_1(cli, remote, who, args, fragment):
    url, tokens = remote
    token = tokens.get(who, "mjk-unknown")

    result = cli("tasks", "list", "--server", url, *args, env={"MJCTL_TOKEN": token})

    assert result.exit_code == 1
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert token not in result.stderr


def test_disabled_user_is_refused(cli, remote):
    url, tokens = remote
    accounts.set_user("alice", enabled=False)

    result = cli("tasks", "list", "--mine", "--server", url, env={"MJCTL_TOKEN": tokens["alice"]})

    assert result.exit_code == 1 and "disabled" in result.stderr


def test_an_unreachable_server_is_one_sentence(cli):
    url = f"http://127.0.0.1:{free_port()}"

    result = cli("tasks", "list", "--mine", "--server", url, env={"MJCTL_TOKEN": "mjk-x"})

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Cannot reach the mjctl server at " + url)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,fragment", [
    (["--user", "bob"], "--user is not supported"),
    (["--channel", "main"], "--channel must be a channel id"),
    (["--mine", "--channel", "1"], "--channel cannot be combined with --mine"),
    (["--since", "yesterday-ish"], "--since"),
])
def test_options_remote_mode_cannot_honour_are_usage_errors(cli, remote, args, fragment):
    url, tokens = remote

    result = cli("tasks", "list", "--server", url, *args, env={"MJCTL_TOKEN": tokens["admin"]})

    assert result.exit_code == 2
    assert fragment in result.stderr


def test_no_token_is_a_usage_error(cli, remote):
    url, _ = remote

    result = cli("tasks", "list", "--server", url)

    assert result.exit_code == 2 and "MJCTL_TOKEN" in result.stderr
