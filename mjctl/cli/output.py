"""Rendering for the terminal (Rich tables), for pipes (tab-separated lines) and for programs (--json)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from mjctl.logs import configure_logging  # noqa: F401 - the commands import it from here
from mjctl.textsafe import json_visible, visible

#: The --json flag every command that prints data takes.
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON.")]

STATUS_STYLES = {
    "SUCCESS": "green",
    "FAILURE": "red",
    "CANCEL": "magenta",
    "IN_PROGRESS": "cyan",
    "SUBMITTED": "blue",
    "NOT_START": "yellow",
    "MODAL": "yellow",
}


def print_json(data: Any) -> None:
    """Exact values for programs: json.dumps, never a Rich console (which would read `[...]` as markup).
    Characters a terminal would act on are JSON escapes, so the document parses to the same data."""
    sys.stdout.write(json_visible(json.dumps(data, ensure_ascii=False, indent=2)) + "\n")


def error(message: str) -> None:
    """One sentence on stderr; it may quote a name or an upstream's message, so it is shown escaped."""
    sys.stderr.write(f"Error: {visible(message)}\n")


def info(message: str) -> None:
    """A note for the person at the terminal; goes to stderr so stdout stays data."""
    sys.stderr.write(visible(message) + "\n")


def console():
    from rich.console import Console

    from mjctl.cli.state import env

    e = env()
    return Console(no_color=not e.color, highlight=False, soft_wrap=False)


class Group(TyperGroup):
    """A command group whose listing shows each command's first sentence whole, wrapped rather than cut."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None and not command.short_help and command.help:
            command.short_help = first_sentence(command.help)
        return command


def first_sentence(text: str) -> str:
    """The first sentence of a help text (up to the first period followed by a space or the end)."""
    flat = " ".join(text.split())
    end = flat.find(". ")
    return flat if end < 0 else flat[: end + 1]


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"


def human_time(epoch: int | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(epoch)))


def progress_bar(progress: str, width: int = 10) -> str:
    try:
        pct = max(0, min(100, int(float((progress or "0").rstrip("%")))))
    except ValueError:
        return progress or ""
    filled = round(width * pct / 100)
    return "█" * filled + "░" * (width - filled) + f" {pct:>3}%"


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
          styles: dict[int, Any] | None = None) -> None:
    """A Rich table on a terminal, tab-separated lines (with a header) in a pipe.

    Every value is shown through visible() in both: control characters from a prompt or an upstream would
    otherwise act on the terminal, or on whoever later views the saved lines, and a tab or newline inside a
    value would break the tab-separated format. Cells are Text, never markup, so `[bold]` in data is shown
    as written."""
    from mjctl.cli.state import env

    rows = list(rows)
    if not env().stdout_isatty:
        sys.stdout.write("\t".join(columns) + "\n")
        for row in rows:
            sys.stdout.write("\t".join(_plain(v) for v in row) + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(visible(title)) if title else None, header_style="bold")
    for col in columns:
        t.add_column(Text(col))
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            style = styles.get(i) if styles else None
            if callable(style):
                style = style(value)
            cells.append(Text(_plain(value), style=style or ""))
        t.add_row(*cells)
    console().print(t)


def _plain(value: Any) -> str:
    """A value as one line of visible text (tabs and newlines escaped too: see table())."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return visible(str(value))


def render_tasks(envelope: dict, *, admin: bool) -> None:
    """The task list: status coloured with its word, progress as a bar, times human-readable."""
    items = envelope["items"]
    from mjctl.cli.state import env

    tty = env().stdout_isatty
    columns = ["ID", "MJ_ID", "ACTION", "STATUS", "PROGRESS", "SUBMITTED", "QUOTA", "PROMPT"]
    if admin:
        columns[2:2] = ["USER", "CHANNEL"]
    rows = []
    for item in items:
        row = [item["id"], item["mj_id"], item["action"], item["status"],
               progress_bar(item["progress"]) if tty else item["progress"],
               human_time(item["submit_time"]) if tty else item["submit_time"],
               item["quota"], _shorten(item["prompt"], 48) if tty else item["prompt"]]
        if admin:
            row[2:2] = [item.get("user_id", ""), item.get("channel_id", "")]
        rows.append(row)
    status_col = columns.index("STATUS")
    table(columns, rows, styles={status_col: lambda v: STATUS_STYLES.get(str(v), "")})
    if tty:
        start = (envelope["page"] - 1) * envelope["page_size"] + (1 if items else 0)
        end = start + len(items) - (1 if items else 0)
        info(f"{start}-{end} of {envelope['total']} (page {envelope['page']}, {envelope['page_size']} per page)")


def _shorten(text: str, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def abort(message: str, code: int = 1) -> None:
    error(message)
    raise typer.Exit(code)
