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


def examples(*lines: str) -> str:
    """A command's epilog: example command lines, printed as written below its options."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


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


def render_tasks(envelope: dict, *, admin: bool, names: dict[str, dict[int, str]] | None = None) -> None:
    """The task list: a table fitted to the terminal's width, or tab-separated lines in a pipe.

    names maps "user" and "channel" to {id: name}; an id without a name is shown as the id. On a terminal
    the upstream id and the status are never cut: the prompt gives way first (one line, with an ellipsis),
    then the progress bar and the date become shorter, then the least needed columns are hidden, which
    the line on stderr says."""
    from mjctl.cli.state import env

    items = envelope["items"]
    users, channels = (names or {}).get("user", {}), (names or {}).get("channel", {})
    cells = []
    for item in items:
        action = f"{item['action']}/{item['mode'].lower()}" if item.get("mode") else item["action"]
        cell = {"ID": str(item["id"]), "MJ_ID": item["mj_id"], "ACTION": action, "STATUS": item["status"],
                "PROGRESS": item["progress"], "SUBMITTED": item["submit_time"], "QUOTA": str(item["quota"]),
                "PROMPT": item["prompt"]}
        if admin:
            cell["USER"] = users.get(item.get("user_id"), item.get("user_id", ""))
            cell["CHANNEL"] = channels.get(item.get("channel_id"), item.get("channel_id", ""))
        cells.append(cell)
    columns = ["ID", "MJ_ID", "USER", "CHANNEL", "ACTION", "STATUS", "PROGRESS", "SUBMITTED", "QUOTA", "PROMPT"]
    if not admin:
        columns = [c for c in columns if c not in ("USER", "CHANNEL")]
    if not env().stdout_isatty:
        table(columns, [[cell[c] for c in columns] for cell in cells])
        return
    hidden = _task_table(columns, cells)
    start = (envelope["page"] - 1) * envelope["page_size"] + (1 if items else 0)
    end = start + len(items) - (1 if items else 0)
    note = f"; not shown at this width: {', '.join(hidden)}" if hidden else ""
    info(f"{start}-{end} of {envelope['total']} (page {envelope['page']}, {envelope['page_size']} per page){note}")


#: The task table's ways of fitting a narrower terminal, tried in order: (short progress and date, hidden).
TASK_LAYOUTS = (
    (False, ()),
    (True, ()),
    (True, ("QUOTA",)),
    (True, ("QUOTA", "ACTION")),
    (True, ("QUOTA", "ACTION", "CHANNEL")),
    (True, ("QUOTA", "ACTION", "CHANNEL", "SUBMITTED")),
    (True, ("QUOTA", "ACTION", "CHANNEL", "SUBMITTED", "USER")),
)
NAME_WIDTH = 16  # user and channel names longer than this end in an ellipsis
PROMPT_MIN_WIDTH = 16
COLUMN_GAP = 2


def _task_table(columns: list[str], cells: list[dict]) -> list[str]:
    """Print the task table in the first layout that fits the console; returns the columns it hid."""
    from rich import box
    from rich.cells import cell_len
    from rich.table import Table
    from rich.text import Text

    out = console()

    def shown(column: str, value, short: bool) -> str:
        if column == "PROGRESS":
            return _percent_text(value) if short else progress_bar(value)
        if column == "SUBMITTED":
            return (time.strftime("%m-%d %H:%M", time.localtime(int(value))) if value else "-") if short \
                else human_time(value)
        text = _plain(value)
        if column in ("USER", "CHANNEL") and cell_len(text) > NAME_WIDTH:
            text = text[: NAME_WIDTH - 1] + "…"
        return text

    for short, hidden in TASK_LAYOUTS:
        visible_columns = [c for c in columns if c not in hidden]
        rows = [[shown(c, cell[c], short) for c in visible_columns] for cell in cells]
        widths = [max([cell_len(c)] + [cell_len(row[i]) for row in rows]) for i, c in enumerate(visible_columns)]
        fixed = sum(widths[:-1]) + COLUMN_GAP * (len(widths) - 1)
        prompt_width = min(widths[-1], max(PROMPT_MIN_WIDTH, out.width - fixed))
        if fixed + prompt_width <= out.width:
            break
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True,
              header_style="bold")
    for column, width in zip(visible_columns, widths):
        if column == "PROMPT":
            t.add_column(Text(column), width=max(1, min(prompt_width, out.width - fixed)), no_wrap=True,
                         overflow="ellipsis")
        else:
            t.add_column(Text(column), width=width, no_wrap=True)
    status_at = visible_columns.index("STATUS")
    for row in rows:
        t.add_row(*[Text(value, style=STATUS_STYLES.get(value, "") if i == status_at else "")
                    for i, value in enumerate(row)])
    out.print(t)
    return list(hidden)


def _percent_text(progress: str) -> str:
    try:
        return f"{max(0, min(100, int(float((progress or '0').rstrip('%')))))}%"
    except ValueError:
        return _plain(progress)


def abort(message: str, code: int = 1) -> None:
    error(message)
    raise typer.Exit(code)
