"""The CLI in process: exact output for the happy paths, one sentence and the right exit code for mistakes."""

from __future__ import annotations

import json

import pytest

from mjctl.models import Ledger, Task, User


def out_json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_error(result, code, *words):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0]


def test_version(cli):
    from mjctl import __version__

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"mjctl {__version__}"


def test_init_creates_root_once(cli):
    first = out_json(cli("init", "--json"))
    assert first["root_user"] == "root" and first["token"].startswith("mjk-")
    second = out_json(cli("init", "--json"))
    assert "token" not in second and second["schema_version"] == first["schema_version"]


def test_users_lifecycle(cli):
    added = out_json(cli("users", "add", "alice", "--quota", "500", "--json"))
    assert added["quota"] == 500 and added["role"] == "user" and added["token"]
    assert out_json(cli("users", "topup", "alice", "250", "--json"))["quota"] == 750
    shown = out_json(cli("users", "show", "alice", "--json"))
    assert (shown["quota"], shown["used_quota"], shown["tokens"]) == (750, 0, 1)
    assert [e["kind"] for e in shown["ledger"]] == ["topup", "topup"]
    changed = out_json(cli("users", "set", "alice", "--role", "admin", "--disable", "--json"))
    assert changed["role"] == "admin" and changed["enabled"] is False
    token = out_json(cli("users", "token", "alice", "--json"))["token"]
    assert token.startswith("mjk-")
    assert out_json(cli("users", "token", "alice", "--revoke", "--json"))["revoked"] == 2
    listed = out_json(cli("users", "list", "--json"))
    assert [u["name"] for u in listed["items"]] == ["alice"]


def test_users_list_plain_when_piped(cli):
    cli("users", "add", "alice", "--quota", "5")
    result = cli("users", "list")
    assert result.stdout.splitlines() == ["ID\tNAME\tROLE\tENABLED\tQUOTA\tUSED", "1\talice\tuser\tyes\t5\t0"]


@pytest.mark.parametrize("args, code, word", [
    (["users", "add", "alice"], 1, "already exists"),
    (["users", "add", "bob", "--quota", "-3"], 2, "quota"),
    (["users", "add", "bob", "--quota", "ten"], 2, "quota"),
    (["users", "add", "bob", "--role", "king"], 2, "role"),
    (["users", "add", "bad name"], 2, "name"),
    (["users", "show", "nobody"], 1, "nobody"),
    (["users", "topup", "alice", "0"], 2, "amount"),
    (["users", "topup", "alice", "1e3"], 2, "amount"),
    (["users", "topup", "nobody", "5"], 1, "nobody"),
    (["users", "set", "alice"], 2, "Nothing to change"),
    (["channels", "add", "c1", "--base-url", "ftp://nowhere"], 2, "Base URL"),
    (["channels", "show", "nope"], 1, "nope"),
    (["channels", "remove", "nope"], 1, "nope"),
    (["tasks", "list", "--page", "0"], 2, "page"),
    (["tasks", "list", "--page-size", "0"], 2, "page size"),
    (["tasks", "list", "--since", "last tuesday"], 2, "--since"),
    (["tasks", "list", "--user", "nobody"], 1, "nobody"),
    (["tasks", "list", "--mine"], 2, "MJCTL_TOKEN"),
    (["tasks", "show", "123"], 1, "123"),
    (["--database", "oracle://x/y", "tasks", "list"], 2, "unknown scheme"),
    (["--database", "postgresql://postgres@127.0.0.1:1/none", "tasks", "list"], 1, "Cannot connect"),
    (["users", "frobnicate"], 2, "frobnicate"),
])
def test_bad_input_is_one_sentence_and_changes_nothing(cli, args, code, word):
    cli("users", "add", "alice", "--quota", "10")
    before = (User.select().count(), Ledger.select().count())
    assert_error(cli(*args), code, word)
    from mjctl.db import bind

    bind(f"sqlite:///{__import__('os').getcwd()}/mjctl.db")
    assert (User.select().count(), Ledger.select().count()) == before


def test_config_errors_name_file_key_and_problem(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[poller]\ninterval = "soon"\n')
    assert_error(cli("--config", str(bad), "config", "show"), 2, str(bad), "interval")
    bad.write_text("[poller\n")
    assert_error(cli("--config", str(bad), "config", "show"), 2, str(bad), "TOML")
    bad.write_text("[poller]\nspeed = 3\n")
    assert_error(cli("--config", str(bad), "config", "show"), 2, "speed")
    assert_error(cli("config", "show", env={"MJCTL_POLLER_BATCH_SIZE": "many"}), 2, "MJCTL_POLLER_BATCH_SIZE")
    assert_error(cli("--config", str(tmp_path / "missing.toml"), "config", "show"), 2, "does not exist")


def test_config_show_sources_and_redaction(cli, tmp_path):
    conf = tmp_path / "mjctl.toml"
    conf.write_text('[server]\nport = 9000\nsecret = "hunter2"\n[database]\nurl = "sqlite:///data/x.db"\n')
    result = cli("--config", str(conf), "config", "show", "--json",
                 env={"MJCTL_POLLER_INTERVAL": "5", "MJCTL_DATABASE_URL": "", "MJCTL_SERVER_SECRET": ""})
    data = out_json(result)
    assert data["settings"]["server"]["port"] == 9000
    assert data["sources"]["server.port"] == f"file {conf}"
    assert data["settings"]["poller"]["interval"] == 5.0
    assert data["sources"]["poller.interval"] == "env MJCTL_POLLER_INTERVAL"
    assert "hunter2" not in result.stdout
    assert data["settings"]["images"]["cache_dir"].startswith(str(tmp_path))


def test_relative_paths_follow_the_config_file(tmp_path, monkeypatch):
    from mjctl.config import load_settings

    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "mjctl.toml").write_text('[database]\nurl = "sqlite:///state/m.db"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(folder / "mjctl.toml", environ={})
    assert settings.database_url() == f"sqlite:///{folder}/state/m.db"
    assert settings.images.cache_dir == str(folder / "state" / "images")
    env_settings = load_settings(None, environ={"MJCTL_CONFIG": str(folder / "mjctl.toml"), "MJCTL_SERVER_PORT": "81"})
    assert env_settings.server.port == 81 and env_settings.config_path == folder / "mjctl.toml"
    beaten = load_settings(None, {("server", "port"): 82}, environ={"MJCTL_SERVER_PORT": "81"})
    assert beaten.server.port == 82 and beaten.sources[("server", "port")] == "option"


def test_channels_commands(cli):
    added = out_json(cli("channels", "add", "up1", "--base-url", "http://127.0.0.1:9", "--secret", "zzz-secret",
                         "--priority", "3", "--json"))
    assert added["has_secret"] and added["priority"] == 3
    assert out_json(cli("channels", "disable", "up1", "--json"))["enabled"] is False
    assert out_json(cli("channels", "enable", "1", "--json"))["enabled"] is True
    shown = cli("channels", "show", "up1", "--json")
    assert "zzz-secret" not in shown.stdout and out_json(shown)["unfinished_tasks"] == 0
    assert_error(cli("channels", "add", "up1", "--base-url", "http://x"), 1, "already exists")
    assert out_json(cli("channels", "remove", "up1", "--json"))["removed"]["name"] == "up1"
    assert out_json(cli("channels", "list", "--json"))["total"] == 0


def _seed_tasks(cli):
    alice = out_json(cli("users", "add", "alice", "--quota", "10", "--json"))
    bob = out_json(cli("users", "add", "bob", "--json"))
    for i in range(3):
        Task.create(user_id=alice["id"], channel_id=1, mj_id=f"17000000000{i}", prompt=f"cat {i}", status="SUCCESS",
                    progress="100%", submit_time=1_700_000_000 + i, quota=5, unfinished=0)
    Task.create(user_id=bob["id"], channel_id=2, mj_id="bob-1", prompt="dog", status="IN_PROGRESS", progress="40%",
                submit_time=1_700_000_100, quota=5)
    return alice, bob


def test_tasks_list_json_matches_the_api_envelope(cli):
    alice, _ = _seed_tasks(cli)
    data = out_json(cli("tasks", "list", "--json"))
    assert set(data) == {"items", "total", "page", "page_size"}
    assert data["total"] == 4 and data["items"][0]["mj_id"] == "bob-1" and "user_id" in data["items"][0]
    mine = out_json(cli("tasks", "list", "--mine", "--json", env={"MJCTL_TOKEN": alice["token"]}))
    assert mine["total"] == 3 and "user_id" not in mine["items"][0]
    assert out_json(cli("tasks", "list", "--user", "bob", "--json"))["total"] == 1
    assert out_json(cli("tasks", "list", "--channel", "2", "--json"))["total"] == 1
    assert out_json(cli("tasks", "list", "--status", "success", "--json"))["total"] == 3
    ranged = out_json(cli("tasks", "list", "--since", "1700000001", "--until", "1700000002", "--json"))
    assert [i["mj_id"] for i in ranged["items"]] == ["170000000002", "170000000001"]
    paged = out_json(cli("tasks", "list", "--page", "2", "--page-size", "3", "--json"))
    assert paged["total"] == 4 and len(paged["items"]) == 1
    assert out_json(cli("tasks", "list", "--page-size", "500", "--json"))["page_size"] == 100
    assert_error(cli("tasks", "list", "--mine", env={"MJCTL_TOKEN": "mjk-wrong"}), 2, "not valid")


def test_tasks_list_plain_lines_when_piped(cli):
    _seed_tasks(cli)
    lines = cli("tasks", "list", "--user", "bob").stdout.splitlines()
    assert lines[0].split("\t") == ["ID", "MJ_ID", "USER", "CHANNEL", "ACTION", "STATUS", "PROGRESS", "SUBMITTED",
                                    "QUOTA", "PROMPT"]
    # USER and CHANNEL are names; channel 2 does not exist (any more), so its id is shown
    assert lines[1].split("\t") == ["4", "bob-1", "bob", "2", "IMAGINE", "IN_PROGRESS", "40%", "1700000100", "5",
                                    "dog"]


def test_tasks_list_table_on_a_terminal(cli, monkeypatch):
    from mjctl.cli import state

    _seed_tasks(cli)
    monkeypatch.setattr(state, "env", lambda: state.Env(stdout_isatty=True, color=False))
    result = cli("tasks", "list", "--user", "bob", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "IN_PROGRESS" in result.stdout and "████░░░░░░  40%" in result.stdout
    assert "2023-11-14" in result.stdout  # 1700000100 as a date
    assert "1-1 of 1" in result.stderr


def test_tasks_show(cli):
    _seed_tasks(cli)
    data = out_json(cli("tasks", "show", "bob-1", "--json"))
    assert data["mj_id"] == "bob-1" and data["buttons"] == [] and data["properties"] == {}


def test_every_command_has_help():
    from typer.main import get_command

    from mjctl.cli import app

    root = get_command(app)
    missing = []

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            if not (sub.help or "").strip():
                missing.append(" ".join(path + [name]))
            walk(sub, path + [name])

    walk(root, [])
    assert not missing, f"commands without help: {missing}"
    without_example = []

    def examples(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            if getattr(sub, "commands", None):
                examples(sub, path + [name])
            elif "mjctl " + " ".join(path + [name]) not in (sub.epilog or ""):
                without_example.append(" ".join(path + [name]))

    examples(root, [])
    assert not without_example, f"commands whose --help has no example: {without_example}"
    assert {"init", "users", "channels", "tasks", "config"} <= set(root.commands)
