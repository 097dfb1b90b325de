"""`mjctl tasks …`: list, show, submit, watch and save tasks.

The core (peewee underneath), the relay and the upstream client (httpx) are imported inside each
command, so that `mjctl --help` does not load them.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from mjctl.cli import state as cli_state
from mjctl.cli.output import (
    STATUS_STYLES,
    Group,
    JsonOut,
    console,
    human_size,
    human_time,
    info,
    print_json,
    render_tasks,
    table,
)
from mjctl.cli.state import state
from mjctl.errors import NotFound, UsageError
from mjctl.protocol import ACCEPTED_CODES
from mjctl.textsafe import visible

app = typer.Typer(cls=Group, no_args_is_help=True, help="List, show, submit, watch and save tasks.")

SPEEDS = {"fast": "/mj-fast", "relax": "/mj-relax", "turbo": "/mj-turbo"}
TaskId = Annotated[str, typer.Argument(help="The task id.")]
Row = Annotated[int | None, typer.Option("--row", min=1, help="The task's row id (the id column of tasks list "
                                         "--json), to choose one of several tasks that share MJ_ID.")]


def build_filter(*, mine: bool, user: str | None, channel: str | None, mj_id: str | None, status: str | None,
                 action: str | None, since: str | None, until: str | None, token: str | None):
    """The TaskFilter for these options, resolved against the local store. Returns (filter, admin_view)."""
    from mjctl import accounts, channels
    from mjctl.tasks import TaskFilter
    from mjctl.timeparse import parse_time

    f = TaskFilter(mj_id=mj_id or None, status=status.upper() if status else None,
                   action=action.upper() if action else None)
    if since:
        f.start = parse_time(since, option="--since")
    if until:
        f.end = parse_time(until, option="--until")
    if mine:
        if not token:
            raise UsageError("--mine needs your token in $MJCTL_TOKEN or [client] token.")
        me = accounts.authenticate(token)
        if me is None:
            raise UsageError("The token in $MJCTL_TOKEN or [client] token is not valid here.")
        if not me.enabled:
            raise UsageError(f"User {me.name!r} is disabled.")
        f.user_id = me.id
    if user:
        f.user_id = accounts.get_user(user).id if not mine else f.user_id
    if channel:
        f.channel_id = channels.get_channel(channel).id if not channel.isdigit() else int(channel)
    return f, not mine


@app.command("list")
def list_(
    ctx: typer.Context,
    mine: Annotated[bool, typer.Option("--mine", help="Only the tasks of the user whose token is in "
                                       "$MJCTL_TOKEN.")] = False,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's tasks.")] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="Only this channel's tasks (id or name).")] = None,
    mj_id: Annotated[str | None, typer.Option("--mj-id", help="Exact task id.")] = None,
    status: Annotated[str | None, typer.Option("--status", help="Exact status, e.g. SUCCESS.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="Exact action, e.g. IMAGINE.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Submitted at or after: epoch, ISO-8601, or an age "
                                              "like 2h.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Submitted at or before: epoch, ISO-8601, or an "
                                              "age.")] = None,
    page: Annotated[int, typer.Option("--page", "-p", help="Page number, from 1.")] = 1,
    page_size: Annotated[int, typer.Option("--page-size", "-n", help="Tasks per page (at most 100).")] = 20,
    server: Annotated[str | None, typer.Option("--server", help="Read a remote mjctl over HTTP "
                                               "($MJCTL_SERVER).")] = None,
    json_out: JsonOut = False,
) -> None:
    """List tasks, newest first, as a table (or tab-separated lines in a pipe, or --json)."""
    from mjctl.tasks import clamp_page

    st = state(ctx)
    st.override("client", "server", server)
    page, page_size = clamp_page(page, page_size)
    settings = st.settings()
    if settings.client.server:
        from mjctl.cli.remote import remote_list

        envelope, admin = remote_list(settings, mine=mine, user=user, channel=channel, mj_id=mj_id, status=status,
                                      action=action, since=since, until=until, page=page, page_size=page_size)
    else:
        from mjctl.tasks import list_tasks, page_envelope

        settings = st.open_store()
        f, admin = build_filter(mine=mine, user=user, channel=channel, mj_id=mj_id, status=status, action=action,
                                since=since, until=until, token=settings.client.token)
        envelope = page_envelope(list_tasks(f, page, page_size), admin=admin, image_url=_image_url(settings))
    if json_out:
        print_json(envelope)
        return
    render_tasks(envelope, admin=admin)


def _image_url(settings):
    """The forwarded image URL of a task (None when [images] forward is off)."""
    from mjctl.images import image_url_for

    return image_url_for(settings)


def tasks_named(mj_id: str, row: int | None) -> list:
    """The tasks MJ_ID names: every task with that upstream id (one per channel may share it), oldest
    first, or with --row only that row. Raises NotFound when there is none."""
    from mjctl.tasks import get_task_by_row, tasks_with_mj_id

    if row is not None:
        task = get_task_by_row(row)
        if task.mj_id != mj_id:
            raise NotFound(f"Row {row} is task {task.mj_id!r}, not {mj_id!r}.")
        return [task]
    found = tasks_with_mj_id(mj_id)
    if not found:
        raise NotFound(f"No task with id {mj_id!r}.")
    return found


@app.command("show")
def show(ctx: typer.Context, mj_id: TaskId, row: Row = None, json_out: JsonOut = False) -> None:
    """One task in full: every field, buttons and properties. When several tasks share the id (upstreams
    on different channels can give the same one), each of them, with a note saying so."""
    from mjctl.tasks import task_detail

    settings = state(ctx).open_store()
    image_url = _image_url(settings)
    details = [task_detail(task, image_url=image_url) for task in tasks_named(mj_id, row)]
    _hide_push_links(details)
    if json_out:  # one task: its object, as always; several: a list of them, never one picked silently
        print_json(details[0] if len(details) == 1 else details)
        return
    if len(details) > 1:
        info(f"{len(details)} tasks have the id {mj_id} (rows {', '.join(str(d['id']) for d in details)}); "
             f"showing each. Choose one with --row.")
    for detail in details:
        rows = []
        for key, value in detail.items():
            if key.endswith("_time"):
                value = human_time(value)
            elif key == "buttons":
                value = " ".join(_button_text(b) for b in value) if isinstance(value, list) else str(value)
                value = value or "-"
            elif key == "properties":
                value = (", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict)
                         else str(value)) or "-"
            rows.append((key, value))
        # every value is shown escaped there: they come from users and upstreams
        table(["FIELD", "VALUE"], rows, title=f"row {detail['id']}" if len(details) > 1 else None)
    sys.stdout.flush()


def _hide_push_links(details: list[dict]) -> None:
    """A stored notifyHook is a push link (mjctl's own signed one, or the caller's): shown nowhere, as in
    the relay's answers (mjctl.relay.relay_properties)."""
    from mjctl.relay import relay_properties

    for detail in details:
        if isinstance(detail.get("properties"), dict):
            detail["properties"] = relay_properties(detail["properties"])


def _button_text(button) -> str:
    """A button as its label, emoji or custom id. Buttons are whatever the upstream sent, so a value that is
    not a dict of strings is shown as text rather than failing the whole `tasks show`."""
    if not isinstance(button, dict):
        return str(button)
    return str(button.get("label") or button.get("emoji") or button.get("customId") or "")


@app.command("submit")
def submit(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The imagine prompt.")],
    user: Annotated[str, typer.Option("--user", "-u", help="The user who submits (and pays).")],
    speed: Annotated[str | None, typer.Option("--speed", help="fast, relax or turbo: the upstream's speed "
                                              "prefix.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Submit an imagine task for a user through the relay (the user is charged). Exit 1 when refused."""
    from mjctl import accounts, relay

    if speed is not None and speed.lower() not in SPEEDS:
        raise UsageError(f"Unknown speed {speed!r}; use fast, relax or turbo.")
    settings = state(ctx).open_store()
    owner = accounts.get_user(user)
    if not owner.enabled:
        raise UsageError(f"User {user!r} is disabled.")
    status, answer = relay.submit(settings, owner, "imagine", {"prompt": prompt},
                                  SPEEDS[speed.lower()] if speed else "")
    accepted = status == 200 and answer.get("code") in ACCEPTED_CODES
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


@app.command("watch")
def watch(
    ctx: typer.Context,
    mj_ids: Annotated[list[str], typer.Argument(help="Task ids to watch.")],
    interval: Annotated[float, typer.Option("--interval", min=0.01, help="Seconds between looks at the "
                                            "store.")] = 1.0,
) -> None:
    """Follow tasks until every one is finished: progress bars on a terminal, one line per change otherwise.
    Exit 1 if any failed."""
    from mjctl.db import connection
    from mjctl.protocol import FINISHED_STATUSES

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

    def finished() -> bool:
        return all(current[i][0] in FINISHED_STATUSES for i in ids)

    if cli_state.env().stdout_isatty:
        _watch_bars(ids, current, poll, finished)
    else:
        _watch_lines(ids, current, poll, finished)
    failed = [i for i in ids if current[i][0] != "SUCCESS"]
    if failed:
        sys.stderr.write(f"Error: {len(failed)} of {len(ids)} task(s) did not succeed: {', '.join(failed)}.\n")
        raise typer.Exit(1)


def _line(mj_id: str, snap: tuple[str, str, str]) -> str:
    """One tab-separated line; each field escaped, as the upstream wrote the status, progress and reason."""
    status, progress, reason = snap
    text = f"{visible(mj_id)}\t{visible(status)}\t{visible(progress or '-')}"
    return text + (f"\t{visible(reason)}" if status == "FAILURE" and reason else "")


def _watch_lines(ids, current, poll, finished) -> None:
    for mj_id in ids:
        sys.stdout.write(_line(mj_id, current[mj_id]) + "\n")
    sys.stdout.flush()
    while not finished():
        fresh = poll()
        for mj_id in ids:
            if fresh.get(mj_id, current[mj_id]) != current[mj_id]:
                current[mj_id] = fresh[mj_id]
                sys.stdout.write(_line(mj_id, current[mj_id]) + "\n")
        sys.stdout.flush()


def _watch_bars(ids, current, poll, finished) -> None:
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn

    def describe(mj_id):  # a markup string: the data in it is escaped for the terminal and for markup
        status = current[mj_id][0]
        return f"{escape(visible(mj_id))} [{STATUS_STYLES.get(status, 'white')}]{escape(visible(status))}[/]"

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=console(), transient=False) as bars:
        handles = {i: bars.add_task(describe(i), total=100, completed=_percent(*current[i][:2])) for i in ids}
        while not finished():
            fresh = poll()
            for mj_id in ids:
                current[mj_id] = fresh.get(mj_id, current[mj_id])
                bars.update(handles[mj_id], description=describe(mj_id),
                            completed=_percent(*current[mj_id][:2]))


@app.command("image")
def image(
    ctx: typer.Context,
    mj_id: TaskId,
    row: Row = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="File to write (default: MJ_ID.<ext> "
                                               "here; - for stdout).")] = None,
    json_out: JsonOut = False,
) -> None:
    """Save a task's image, from the cache or fetched from its upstream (and cached when the task succeeded).
    When several tasks share the id (upstreams on different channels can give the same one), --row says
    which."""
    from mjctl.images import EXTENSIONS, ImageForwarder, ImageSource
    from mjctl.images.cache import claim_legacy_file

    settings = state(ctx).open_store()
    found = tasks_named(mj_id, row)
    if len(found) > 1:
        rows = ", ".join(f"{t.id} (channel {t.channel_id}, user {t.user_id})" for t in found)
        raise UsageError(f"{len(found)} tasks have the id {mj_id!r}: rows {rows}; choose one with --row.")
    task = found[0]
    if not task.image_url:
        raise NotFound(f"Task {mj_id} has no image (status {task.status}).")
    if output == "-" and json_out:
        raise UsageError("--json cannot be combined with -o - (both write to stdout).")
    source = ImageSource.from_task(task)
    with ImageForwarder(settings) as forwarder:
        claim_legacy_file(forwarder.cache, source)  # a file cached under the bare id by an earlier version
        if output == "-":
            forwarder.save(source, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        stream = forwarder.open(source)
        try:
            safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in mj_id)
            ext = EXTENSIONS.get(stream.content_type.split(";")[0], ".img")
            path = Path(output) if output else Path(f"{safe_id}{ext}")
            if path.is_dir():
                raise UsageError(f"{path} is a folder; give a file name with -o.")
            part = path.with_name(path.name + ".part")
            written = 0
            try:
                with open(part, "wb") as fh:
                    for chunk in stream:
                        fh.write(chunk)
                        written += len(chunk)
                os.replace(part, path)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        finally:
            stream.close()
    result = {"mj_id": mj_id, "row": task.id, "path": str(path), "bytes": written,
              "content_type": stream.content_type, "from_cache": stream.cached}
    if json_out:
        print_json(result)
        return
    info(f"Saved the image of task {mj_id} ({human_size(written)}, {stream.content_type}"
         f"{', from the cache' if stream.cached else ''}) to {path}.")
