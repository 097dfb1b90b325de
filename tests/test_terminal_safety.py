"""Text from users and upstreams never acts on a terminal: control characters, bidi overrides and Rich markup
in a prompt, a failReason, a description, a button label or a log line are shown, not obeyed; --json keeps
them exact."""

from __future__ import annotations

import json
import logging

import pytest

from mjctl.models import Ledger, Task
from mjctl.textsafe import VisibleFormatter, json_visible, visible

# Colour, a window title (OSC … BEL), a C1 CSI, a carriage return that would overwrite the line, a bidi
# override, a tab and a newline that would break a TSV row, and Rich markup that must stay literal.
HOSTILE = "\x1b[31mred \x1b]0;pwned\x07 \x9b2J \rover \u202eevil\ttab\nline [bold red]markup[/]"
SHOWN = ["\\x1b[31mred", "\\x1b]0;pwned\\x07", "\\x9b2J", "\\rover", "\\u202eevil", "\\ttab", "\\nline",
         "[bold red]markup[/]"]
RAW = ["\x1b", "\x07", "\x9b", "\r", "\u202e", "\x08", "\x7f"]


def assert_no_raw(text: str) -> None:
    found = [repr(c) for c in RAW if c in text]
    assert not found, f"raw {found} in {text!r}"


def assert_shown(text: str, shown=SHOWN) -> None:
    missing = [s for s in shown if s not in text]
    assert not missing, f"{missing} not shown in {text!r}"


@pytest.fixture
def hostile_task(cli):
    """A failed task whose every free-text field, a button and a property carry the hostile text."""
    added = cli("users", "add", "alice", "--quota", "10", "--json")
    assert added.exit_code == 0, added.stderr
    user_id = json.loads(added.stdout)["id"]
    Task.create(user_id=user_id, channel_id=1, mj_id="evil-1", prompt=HOSTILE, prompt_en=HOSTILE,
                description=HOSTILE, fail_reason=HOSTILE, status="FAILURE", progress="0%",
                submit_time=1_700_000_000, quota=0, unfinished=0,
                buttons=json.dumps([{"customId": "MJ::JOB::upsample::1", "label": HOSTILE}]),
                properties=json.dumps({"note": HOSTILE}))
    return "evil-1"


def on_a_terminal(monkeypatch):
    from mjctl.cli import state

    monkeypatch.setattr(state, "env", lambda: state.Env(stdout_isatty=True, color=False))


def test_tasks_list_in_a_pipe_is_one_escaped_row_per_task(cli, hostile_task):
    result = cli("tasks", "list")
    assert result.exit_code == 0, result.stderr
    assert_no_raw(result.stdout + result.stderr)
    lines = result.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 3, lines  # header, one row: the newline in the prompt is escaped
    header, row = lines[0].split("\t"), lines[1].split("\t")
    assert len(row) == len(header)  # the tab in the prompt did not add a column
    assert row[header.index("PROMPT")] == visible(HOSTILE)
    assert_shown(row[header.index("PROMPT")])


def test_tasks_list_table_on_a_terminal(cli, hostile_task, monkeypatch):
    on_a_terminal(monkeypatch)
    result = cli("tasks", "list", env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.stderr
    assert_no_raw(result.stdout + result.stderr)
    assert "FAILURE" in result.stdout
    assert_shown(result.stdout, ["\\x1b[31mred", "\\x1b]0;pwned\\x07", "\\x9b2J", "\\rover", "\\u202eevil"])


def test_tasks_show_every_field_escaped_and_markup_literal(cli, hostile_task, monkeypatch):
    piped = cli("tasks", "show", hostile_task)
    assert piped.exit_code == 0, piped.stderr
    assert_no_raw(piped.stdout + piped.stderr)
    fields = dict(line.split("\t") for line in piped.stdout.splitlines()[1:])
    for key in ("prompt", "prompt_en", "description", "fail_reason", "buttons"):
        assert fields[key] == visible(HOSTILE), key
    assert fields["properties"] == "note=" + visible(HOSTILE)

    on_a_terminal(monkeypatch)
    table = cli("tasks", "show", hostile_task, env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.stderr
    assert_no_raw(table.stdout + table.stderr)
    for line in table.stdout.splitlines():
        if any(f" {key} " in line for key in ("prompt", "description", "fail_reason", "buttons")):
            assert_shown(line)  # "[bold red]markup[/]" printed as written, not as red "markup"
    assert table.stdout.count("[bold red]markup[/]") == 6  # prompt, prompt_en, description, reason, button, property


def test_json_is_exact_and_carries_no_raw_control_characters(cli, hostile_task):
    listed = cli("tasks", "list", "--json")
    shown = cli("tasks", "show", hostile_task, "--json")
    for result in (listed, shown):
        assert result.exit_code == 0, result.stderr
        assert_no_raw(result.stdout)
    item = json.loads(listed.stdout)["items"][0]
    assert item["prompt"] == item["prompt_en"] == item["fail_reason"] == HOSTILE
    detail = json.loads(shown.stdout)
    assert detail["description"] == detail["buttons"][0]["label"] == detail["properties"]["note"] == HOSTILE
    assert "\\u202e" in listed.stdout and "\\u009b" in listed.stdout  # JSON escapes, which parse back exactly


def test_tasks_watch_lines_are_escaped(cli, hostile_task):
    result = cli("tasks", "watch", hostile_task, "--interval", "0.01")
    assert result.exit_code == 1  # the task failed
    assert_no_raw(result.stdout + result.stderr)
    (line,) = result.stdout.splitlines()
    assert line.split("\t") == [hostile_task, "FAILURE", "0%", visible(HOSTILE)]


def test_tasks_watch_bars_escape_the_id(cli, hostile_task, monkeypatch):
    evil_id = "w\x1b]0;pwned\x07[bold]x[/]"
    Task.create(user_id=1, channel_id=1, mj_id=evil_id, prompt="p", status="SUCCESS", progress="100%",
                submit_time=1_700_000_001, quota=0, unfinished=0)
    on_a_terminal(monkeypatch)
    result = cli("tasks", "watch", evil_id, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    assert_no_raw(result.stdout + result.stderr)
    assert "w\\x1b]0;pwned\\x07[bold]x[/]" in result.stdout


def test_users_and_channels_tables_are_escaped(cli, monkeypatch):
    assert cli("users", "add", "alice").exit_code == 0
    assert cli("users", "topup", "alice", "5", "--reason", HOSTILE).exit_code == 0
    added = cli("channels", "add", "up1", "--base-url", "http://127.0.0.1:9/\x1b]0;pwned\x07")
    assert added.exit_code == 0, added.stderr
    assert_no_raw(added.stdout) and "\\x1b]0;pwned\\x07" in added.stdout
    assert Ledger.select().where(Ledger.reason == HOSTILE).count() == 1
    for args in (["users", "show", "alice"], ["channels", "list"], ["channels", "show", "up1"]):
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
        assert_no_raw(result.stdout)
        assert "\\x1b]0;pwned\\x07" in result.stdout, args
    on_a_terminal(monkeypatch)
    result = cli("users", "show", "alice", env={"COLUMNS": "300"})
    assert_no_raw(result.stdout)
    assert_shown(result.stdout, ["\\x1b[31mred", "[bold red]markup[/]"])


def test_log_lines_are_escaped_one_line_per_record(capsys):
    from mjctl.cli.output import configure_logging

    configure_logging("info")
    logging.getLogger("mjctl.access").info("%s %s", "GET", "/api/\x1b]0;pwned\x07\n2026-01-01 INFO forged \u202e")
    try:
        raise ValueError("upstream said \x1b[2J")
    except ValueError:
        logging.getLogger("mjctl.poller").exception("poll failed: %s", "\x9b6n")
    err = capsys.readouterr().err
    assert_no_raw(err)
    lines = err.splitlines()
    assert lines[0].endswith("mjctl.access: GET /api/\\x1b]0;pwned\\x07\\n2026-01-01 INFO forged \\u202e")
    assert lines[1].endswith("mjctl.poller: poll failed: \\x9b6n")
    assert lines[2] == "Traceback (most recent call last):"  # a traceback keeps its lines
    assert lines[-1] == "ValueError: upstream said \\x1b[2J"


def test_the_formatter_alone():
    record = logging.LogRecord("mjctl.relay", logging.WARNING, __file__, 1, "upstream: %s", ("a\x07b\r\nc",), None)
    assert VisibleFormatter("%(message)s").format(record) == "upstream: a\\x07b\\r\\nc"


@pytest.mark.parametrize("text, shown", [
    ("", ""),
    ("a red fox, 中文, émigré 👨‍👩‍👧 --ar 16:9", "a red fox, 中文, émigré 👨‍👩‍👧 --ar 16:9"),  # ZWJ emoji kept
    ("\x00\x08\x1b\x7f\x85\x9b", "\\x00\\x08\\x1b\\x7f\\x85\\x9b"),
    ("\t\n\r", "\\t\\n\\r"),
    ("\u200b\u200e\u200f\u2028\u2029\u202a\u202e\u2066\u2069\u2060\ufeff\u061c", "\\u200b\\u200e\\u200f\\u2028"
     "\\u2029\\u202a\\u202e\\u2066\\u2069\\u2060\\ufeff\\u061c"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),  # would make writing to a UTF-8 stream raise
])
def test_visible(text, shown):
    assert visible(text) == shown
    assert_no_raw(visible(text))
    assert json.loads(json_visible(json.dumps(text, ensure_ascii=False))) == text


def test_visible_keeps_newlines_only_when_asked_and_returns_clean_text_as_is():
    assert visible("a\nb\x1b", newlines=True) == "a\nb\\x1b"
    clean = "a red fox in the snow " * 10
    assert visible(clean) is clean


def test_every_escaped_character_is_non_printable():
    """visible() returns printable text untouched without looking further: that is only right if no character
    it escapes is printable."""
    from mjctl.textsafe import _UNSAFE

    everything = "".join(map(chr, range(0x110000)))
    escaped = _UNSAFE.findall(everything)
    assert len(escaped) > 2100 and not [c for c in escaped if c.isprintable()]
