"""`mjctl tasks submit` (through the relay, charged like any submission) and `mjctl tasks watch`."""

from __future__ import annotations

import sys
import time

import typer

from mjctl.cli import state as cli_state
from mjctl.cli.state import state
from mjctl.textsafe import visible

SPEEDS = {"fast": "/mj-fast", "relax": "/mj-relax", "turbo": "/mj-turbo"}
FINISHED = ("SUCCESS", "FAILURE", "CANCEL")


def submit(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="The imagine prompt."),
    user: str = typer.Option(..., "--user", "-u", help="The user who submits (and pays)."),
    speed: str | None = typer.Option(None, "--speed", help="fast, relax or turbo: the upstream's speed prefix."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Submit an imagine task for a user through the relay (the user is charged). Exit 1 when refused."""
    from mjctl import accounts, relay
    from mjctl.cli.output import print_json
    from mjctl.errors import UsageError

    if speed is not None and speed.lower() not in SPEEDS:
        raise UsageError(f"Unknown speed {speed!r}; use fast, relax or turbo.")
    settings = state(ctx).open_store()
    owner = accounts.get_user(user)
    if not owner.enabled:
        raise UsageError(f"User {user!r} is disabled.")
    status, answer = relay.submit(settings, owner, "imagine", {"prompt": prompt},
                                  SPEEDS[speed.lower()] if speed else "")
    accepted = status == 200 and answer.get("code") in (1, 21, 22)
    if json_out:
        print_json({"http_status": status, **answer})
    elif accepted:  # the result and description are the upstream's words: shown escaped
        balance = accounts.get_user(user).quota
        sys.stdout.write(f"{visible(str(answer['result']))}\n")
        sys.stderr.write(visible(f"Submitted task {answer['result']} for {user} (code {answer['code']}: "
                                 f"{answer['description']}); balance now {balance}.") + "\n")
    else:
        sys.stderr.write(visible(f"Error: not submitted (code {answer.get('code')}): {answer.get('description')}")
                         + "\n")
    if not accepted:
        raise typer.Exit(1)


def _snapshot(mj_ids: list[str], rows: dict[str, list[int]] | None = None) -> dict[str, tuple[str, str, str]]:
    """mj_id -> (status, progress, fail_reason) of the task with each id; rows, when given, collects the
    row ids found per id (watch refuses an id several tasks share rather than follow one of them)."""
    from mjctl.models import Task

    out: dict[str, tuple[str, str, str]] = {}
    for task in Task.select().where(Task.mj_id.in_(mj_ids)).order_by(Task.id):
        out[task.mj_id] = (task.status, task.progress or "", task.fail_reason or "")
        if rows is not None:
            rows.setdefault(task.mj_id, []).append(task.id)
    return out


def _percent(status: str, progress: str) -> float:
    if status == "SUCCESS":
        return 100.0
    try:
        return max(0.0, min(100.0, float(progress.rstrip("%"))))
    except ValueError:
        return 0.0


def watch(
    ctx: typer.Context,
    mj_ids: list[str] = typer.Argument(..., help="Task ids to watch."),
    interval: float = typer.Option(1.0, "--interval", min=0.01, help="Seconds between looks at the store."),
) -> None:
    """Follow tasks until every one is finished: progress bars on a terminal, one line per change otherwise.
    Exit 1 if any failed."""
    from mjctl.db import connection
    from mjctl.errors import NotFound, UsageError

    state(ctx).open_store()
    ids = list(dict.fromkeys(mj_ids))
    rows: dict[str, list[int]] = {}
    with connection():
        current = _snapshot(ids, rows)
    missing = [i for i in ids if i not in current]
    if missing:
        raise NotFound(f"No task with id {missing[0]!r}." if len(missing) == 1
                       else f"No tasks with ids {', '.join(repr(i) for i in missing)}.")
    shared = {i: r for i, r in rows.items() if len(r) > 1}
    if shared:  # upstreams on different channels gave one id to several tasks: following one would mislead
        mj_id, found = next(iter(shared.items()))
        raise UsageError(f"{len(found)} tasks have the id {mj_id!r} (rows {', '.join(map(str, found))}); "
                         f"watch cannot tell them apart: see them with `mjctl tasks show {mj_id}`.")

    def poll():
        time.sleep(interval)
        with connection():
            return _snapshot(ids)

    if cli_state.env().stdout_isatty:
        final = _watch_bars(ids, current, poll)
    else:
        final = _watch_lines(ids, current, poll)
    failed = [i for i in ids if final[i][0] != "SUCCESS"]
    if failed:
        sys.stderr.write(f"Error: {len(failed)} of {len(ids)} task(s) did not succeed: {', '.join(failed)}.\n")
        raise typer.Exit(1)


def _line(mj_id: str, snap: tuple[str, str, str]) -> str:
    """One tab-separated line; each field escaped, as the upstream wrote the status, progress and reason."""
    status, progress, reason = snap
    text = f"{visible(mj_id)}\t{visible(status)}\t{visible(progress or '-')}"
    return text + (f"\t{visible(reason)}" if status == "FAILURE" and reason else "")


def _watch_lines(ids, current, poll):
    for mj_id in ids:
        sys.stdout.write(_line(mj_id, current[mj_id]) + "\n")
    sys.stdout.flush()
    while not all(current[i][0] in FINISHED for i in ids):
        fresh = poll()
        for mj_id in ids:
            if fresh.get(mj_id, current[mj_id]) != current[mj_id]:
                current[mj_id] = fresh[mj_id]
                sys.stdout.write(_line(mj_id, current[mj_id]) + "\n")
        sys.stdout.flush()
    return current


def _watch_bars(ids, current, poll):
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn

    from mjctl.cli.output import STATUS_STYLES, console

    def describe(mj_id):  # a markup string: the data in it is escaped for the terminal and for markup
        status = current[mj_id][0]
        return f"{escape(visible(mj_id))} [{STATUS_STYLES.get(status, 'white')}]{escape(visible(status))}[/]"

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=console(), transient=False) as bars:
        handles = {i: bars.add_task(describe(i), total=100, completed=_percent(*current[i][:2])) for i in ids}
        while not all(current[i][0] in FINISHED for i in ids):
            fresh = poll()
            for mj_id in ids:
                current[mj_id] = fresh.get(mj_id, current[mj_id])
                bars.update(handles[mj_id], description=describe(mj_id),
                            completed=_percent(*current[mj_id][:2]))
    return current
