"""The CLI as a newcomer meets it: nothing created by a command that only reads, names and ids alike, tables
that fit the terminal, help everywhere, errors instead of silent empties, the upstream's words in English."""

from __future__ import annotations

import json
import os
import re

import pytest

from mjctl.models import Ledger, Task, User


def assert_error(result, code, *words):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def on_a_terminal(monkeypatch):
    from mjctl.cli import state

    monkeypatch.setattr(state, "env", lambda: state.Env(stdout_isatty=True, color=False))


@pytest.fixture
def seeded(cli):
    """alice (id 1) and bob, channel up1 (id 1), and tasks with long upstream ids and prompts."""
    for name in ("alice", "bob"):
        assert cli("users", "add", name, "--quota", "5000").exit_code == 0
    assert cli("channels", "add", "up1", "--base-url", "http://127.0.0.1:9", "--secret", "s").exit_code == 0
    for i, status in enumerate(["IN_PROGRESS", "SUCCESS", "NOT_START", "FAILURE"]):
        Task.create(user_id=1 + i % 2, channel_id=1, mj_id=f"17300000000001234{i:02d}", status=status,
                    progress="40%", submit_time=1_700_000_000 + i, quota=1000, action="VARIATION",
                    prompt=f"prompt {i}: a very long description of a lighthouse on a cliff at dusk, oil painting",
                    image_url="http://127.0.0.1:9/img.png" if status == "SUCCESS" else "",
                    fail_reason="任务超时" if status == "FAILURE" else "")
    return cli


# 2. Commands that only read create nothing.

def test_reading_an_empty_folder_creates_no_database(cli, tmp_path):
    for args in (["users", "list"], ["tasks", "list"], ["channels", "list"], ["tasks", "show", "1"]):
        assert_error(cli(*args), 1, f"No database at {tmp_path}/mjctl.db", "mjctl init")
    assert not (tmp_path / "mjctl.db").exists()
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    assert_error(cli("--database", f"sqlite:///{missing}", "tasks", "list"), 1, str(missing))
    assert not (tmp_path / "nonexistent").exists()
    assert cli("init").exit_code == 0 and (tmp_path / "mjctl.db").exists()  # the command that creates it
    assert cli("users", "list").exit_code == 0


def test_an_empty_file_is_not_a_database_either(cli, tmp_path):
    (tmp_path / "mjctl.db").write_bytes(b"")
    assert_error(cli("users", "list"), 1, "No mjctl database", "mjctl init")
    assert (tmp_path / "mjctl.db").stat().st_size == 0


def test_reading_never_creates_a_server_secret(seeded, tmp_path):
    no_secret = {"MJCTL_SERVER_SECRET": "", "MJCTL_SERVER_SECRET_FILE": str(tmp_path / "elsewhere.secret")}
    listed = seeded("tasks", "list", "--json", env=no_secret)
    assert listed.exit_code == 0, listed.stderr
    assert all(item["image_url"] == "" for item in json.loads(listed.stdout)["items"])
    assert "image links are left out" in listed.stderr
    assert_error(seeded("channels", "test", "up1", env=no_secret), 1, "No server secret", "'up1'", "MJCTL_CONFIG")
    assert_error(seeded("tasks", "submit", "a fox", "--user", "alice", env=no_secret), 1, "No server secret")
    assert not (tmp_path / "elsewhere.secret").exists()


def test_a_missing_driver_names_the_extra_to_install(cli, monkeypatch):
    import peewee

    monkeypatch.setattr(peewee, "psycopg2", None)
    monkeypatch.setattr(peewee, "psycopg", None, raising=False)
    assert_error(cli("--database", "postgresql://u@127.0.0.1:1/db", "users", "list"), 1,
                 "pip install 'mjctl[postgres]'")


# 3. Names and ids.

def test_user_and_channel_by_name_or_id_and_a_task_by_row_or_upstream_id(seeded):
    by_name = json.loads(seeded("tasks", "list", "--user", "bob", "--channel", "up1", "--json").stdout)
    by_id = json.loads(seeded("tasks", "list", "--user", "2", "--channel", "1", "--json").stdout)
    assert by_name == by_id and by_name["total"] == 2
    assert json.loads(seeded("users", "show", "2", "--json").stdout)["name"] == "bob"
    assert_error(seeded("tasks", "list", "--user", "99"), 1, "No user with name or id '99'")
    by_row = json.loads(seeded("tasks", "show", "3", "--json").stdout)
    assert by_row["mj_id"] == "1730000000000123402"
    assert json.loads(seeded("tasks", "show", "1730000000000123402", "--json").stdout) == by_row
    lines = seeded("tasks", "list").stdout.splitlines()
    assert lines[1].split("\t")[2:4] == ["bob", "up1"]  # USER and CHANNEL as names


# 4. The table fits the terminal; ids and statuses are never cut.

@pytest.mark.parametrize("width", [80, 150])
def test_the_task_table_fits_the_terminal_and_cuts_only_the_prompt(seeded, monkeypatch, width):
    on_a_terminal(monkeypatch)
    result = seeded("tasks", "list", env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.rstrip("\n").splitlines()
    assert len(lines) == 2 + 4  # header, rule, one line per task
    assert all(len(line.rstrip()) <= width for line in lines), lines
    for task in Task.select():
        row = next(line for line in lines if task.mj_id in line)  # the whole upstream id
        assert re.search(rf"\b{task.status}\b", row), row  # and the whole status
        assert "…" in row and "oil painting" not in row  # the prompt gave way
    if width == 150:
        assert "QUOTA" in lines[0] and "VARIATION" in result.stdout and "████" in result.stdout
        assert "not shown" not in result.stderr
    else:
        assert "not shown at this width: QUOTA" in result.stderr


# 5. A group without a command prints its help.

@pytest.mark.parametrize("args", [[], ["tasks"], ["users"], ["channels"]])
def test_a_bare_group_prints_its_help_and_exits_0(cli, args):
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Usage: ") and "Commands:" in result.stdout


def test_group_help_shows_whole_first_sentences_and_offers_completion(cli):
    import subprocess
    import sys

    wide = subprocess.run([sys.executable, "-m", "mjctl", "tasks", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "150"}, timeout=60)  # the test runner forces 80 columns
    assert "List tasks, newest first, as a table (or tab-separated lines in a pipe, or --json)." in wide.stdout
    root = cli("--help")
    assert "--install-completion" in root.stdout and "--show-completion" in root.stdout
    assert "Examples:" in cli("tasks", "list", "--help").stdout


# 6. Silent empties are errors.

@pytest.mark.parametrize("args, words", [
    (["--status", "BOGUS"], ["'BOGUS'", "SUCCESS", "IN_PROGRESS"]),
    (["--since", "2h", "--until", "3h"], ["--since 2h is later than --until 3h"]),
    (["--page", "99"], ["Page 99 is past the end", "4 task(s) make 1 page(s) of 20"]),
    (["--page", "3", "--page-size", "2"], ["2 page(s) of 2"]),
])
def test_options_that_can_match_nothing_are_errors(seeded, args, words):
    assert_error(seeded("tasks", "list", *args), 2, *words)


def test_a_page_past_the_end_of_nothing(cli):
    cli("init")
    assert cli("tasks", "list").exit_code == 0  # page 1 of nothing is an empty list
    assert_error(cli("tasks", "list", "--page", "2"), 2, "no task matches")


# 7. Paths, amounts, dates.

def test_tasks_image_names_a_path_it_cannot_write(seeded, tmp_path):
    target = tmp_path / "missing" / "dir" / "x.png"
    assert_error(seeded("tasks", "image", "1730000000000123401", "-o", str(target)), 2, str(target))


def test_a_negative_top_up_is_a_deduction_and_cannot_overdraw(seeded):
    result = seeded("users", "topup", "alice", "-500", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["quota"] == 4500
    entry = Ledger.select().order_by(Ledger.id.desc()).get()
    assert (entry.kind, entry.amount, entry.reason) == ("adjust", -500, "deduction")
    assert_error(seeded("users", "topup", "alice", "-9999"), 1, "balance is too small")
    assert User.get(User.name == "alice").quota == 4500


def test_channels_show_prints_dates(seeded):
    fields = dict(line.split("\t") for line in seeded("channels", "show", "up1").stdout.splitlines()[1:])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", fields["created_at"]), fields["created_at"]
    assert isinstance(json.loads(seeded("channels", "show", "up1", "--json").stdout)["created_at"], int)


# 8. The upstream's Chinese, in English, with the original a flag away.

@pytest.mark.parametrize("text, english", [
    ("任务超时", "Task timed out."),
    ("排队中，前面还有6个任务", "In the queue, 6 task(s) ahead."),
    ("队列已满", "The queue is full."),
    ("队列已满，请稍后尝试", "The queue is full; try again later."),
    ("无可用的账号实例", "No account is available."),
    ("提交成功", "Submitted."),
    (" 已存在 ", "Already exists."),
    ("执行超时 5 分钟", "Timed out after 5 minute(s) of work."),
    ("customId参数错误", "Invalid customId."),
    ("base64或link不能为空", "base64 or link must not be empty."),
    ("[Banned prompt detected] cat", "[Banned prompt detected] cat"),  # already English: unchanged
    ("未知的错误", "未知的错误"),  # unknown: unchanged
    ("", ""),
])
def test_to_english(text, english):
    from mjctl.messages import to_english

    assert to_english(text) == english


def test_tasks_show_translates_and_raw_keeps_the_original(seeded):
    shown = dict(line.split("\t") for line in seeded("tasks", "show", "4").stdout.splitlines()[1:])
    assert shown["fail_reason"] == "Task timed out."
    raw = dict(line.split("\t") for line in seeded("tasks", "show", "4", "--raw").stdout.splitlines()[1:])
    assert raw["fail_reason"] == "任务超时"
    assert json.loads(seeded("tasks", "show", "4", "--json").stdout)["fail_reason"] == "任务超时"


def test_tasks_watch_translates_the_failure_reason(seeded):
    assert seeded("tasks", "watch", "1730000000000123403").stdout.split("\t")[-1].strip() == "Task timed out."
    raw = seeded("tasks", "watch", "1730000000000123403", "--raw")
    assert raw.stdout.split("\t")[-1].strip() == "任务超时"


def test_nothing_is_left_in_the_working_folder_by_reads(seeded, tmp_path):
    before = sorted(os.listdir(tmp_path))
    for args in (["tasks", "list"], ["users", "list"], ["channels", "list"], ["tasks", "show", "1"]):
        assert seeded(*args).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == before
