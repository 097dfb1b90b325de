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
from mjctl.cli import stats as stats_cli
from mjctl.cli.output import (
    STATUS_STYLES,
    Group,
    JsonOut,
    console,
    examples,
    human_size,
    human_time,
    info,
    print_json,
    render_tasks,
    table,
)
from mjctl.cli.state import state
from mjctl.errors import NotFound, UsageError
from mjctl.messages import to_english
from mjctl.protocol import ACCEPTED_CODES, FINISHED_STATUSES, MODES, STATUSES
from mjctl.textsafe import visible

app = typer.Typer(cls=Group, no_args_is_help=True, help="List, show, submit, watch and save tasks.")

SPEEDS = {"fast": "/mj-fast", "relax": "/mj-relax", "turbo": "/mj-turbo"}
TaskId = Annotated[str, typer.Argument(help="The task's upstream id (mj_id), or its row id.")]
Raw = Annotated[bool, typer.Option("--raw", help="Show the upstream's messages as sent, untranslated.")]
Row = Annotated[int | None, typer.Option("--row", min=1, help="The task's row id (the id column of tasks list "
                                         "--json), to choose one of several tasks that share MJ_ID.")]


def build_filter(*, mine: bool, user: str | None, channel: str | None, mj_id: str | None, status: str | None,
                 action: str | None, start: int | None, end: int | None, token: str | None, mode: str | None = None):
    """The TaskFilter for these options, resolved against the local store. Returns (filter, admin_view)."""
    from mjctl import accounts, channels
    from mjctl.tasks import TaskFilter

    f = TaskFilter(mj_id=mj_id or None, status=status.upper() if status else None,
                   action=action.upper() if action else None, start=start, end=end, mode=mode)
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


@app.command("list", epilog=examples(
    'mjctl tasks list --status FAILURE --since 2h',
    'mjctl tasks list --mode relax --action IMAGINE',
    'mjctl tasks list --user alice --channel up1 --page 2',
    'MJCTL_TOKEN=mjk-… mjctl tasks list --mine --server https://mj.example.com',
))
def list_(
    ctx: typer.Context,
    mine: Annotated[bool, typer.Option("--mine", help="Only the tasks of the user whose token is in "
                                       "$MJCTL_TOKEN.")] = False,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's tasks.")] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="Only this channel's tasks (id or name).")] = None,
    mj_id: Annotated[str | None, typer.Option("--mj-id", help="Exact task id.")] = None,
    status: Annotated[str | None, typer.Option("--status", help="Exact status, e.g. SUCCESS.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="Exact action, e.g. IMAGINE.")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="Submitted for this speed: fast, relax or turbo.")] = None,
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
    """List tasks, newest first, as a table (or tab-separated lines in a pipe, or --json). USER and CHANNEL
    show names (--json has their ids); an unknown status, a range that ends before it starts and a page
    past the end are errors, not empty lists."""
    from mjctl.tasks import clamp_page
    from mjctl.timeparse import parse_time

    st = state(ctx)
    st.override("client", "server", server)
    page, page_size = clamp_page(page, page_size)
    if status and status.upper() not in STATUSES:
        raise UsageError(f"Unknown status {status!r}; use one of {', '.join(sorted(STATUSES))}.")
    if mode and mode.upper() not in MODES:
        raise UsageError(f"Unknown mode {mode!r}; use one of {', '.join(m.lower() for m in MODES)}.")
    mode = mode.upper() if mode else None
    start = parse_time(since, option="--since") if since else None
    end = parse_time(until, option="--until") if until else None
    if start is not None and end is not None and start > end:
        raise UsageError(f"--since {since} is later than --until {until}; no task can match.")
    settings = st.settings()
    names = None
    if settings.client.server:
        from mjctl.cli.remote import remote_list

        envelope, admin = remote_list(settings, mine=mine, user=user, channel=channel, mj_id=mj_id, status=status,
                                      action=action, start=start, end=end, page=page, page_size=page_size,
                                      mode=mode)
    else:
        from mjctl.tasks import list_tasks, page_envelope

        settings = st.open_store()
        f, admin = build_filter(mine=mine, user=user, channel=channel, mj_id=mj_id, status=status, action=action,
                                start=start, end=end, token=settings.client.token, mode=mode)
        envelope = page_envelope(list_tasks(f, page, page_size), admin=admin, image_url=image_links(st))
        names = _names(envelope["items"]) if admin and not json_out else None
    if page > 1 and not envelope["items"]:
        total = envelope["total"]
        pages = -(-total // page_size)
        raise UsageError(f"Page {page} is past the end: no task matches." if not total else
                         f"Page {page} is past the end: {total} task(s) make {pages} page(s) of {page_size}.")
    if json_out:
        print_json(envelope)
        return
    render_tasks(envelope, admin=admin, names=names)


def _names(items: list[dict]) -> dict[str, dict[int, str]]:
    """The names of the users and channels of these items, by id."""
    from mjctl.models import Channel, User

    def lookup(model, ids: set) -> dict[int, str]:
        return dict(model.select(model.id, model.name).where(model.id.in_(list(ids))).tuples()) if ids else {}

    return {"user": lookup(User, {i["user_id"] for i in items}),
            "channel": lookup(Channel, {i["channel_id"] for i in items})}


def image_links(st):
    """The forwarded image URL of a task (None when [images] forward is off). Reading tasks never creates a
    server secret: without one, links are left out (one made here would not be the server's)."""
    from mjctl.images import image_url_for

    settings = st.settings()
    if settings.images.forward and not st.secret_exists():
        info(f"No server secret at {settings.server.secret_file}: image links are left out (run with the "
             "server's configuration, MJCTL_CONFIG=…/mjctl.toml, or set [server] secret).")
        return lambda _task: ""
    return image_url_for(settings)


def tasks_named(ref: str, row: int | None) -> list:
    """The tasks REF names: every task with that upstream id (one per channel may share it), oldest first,
    or with --row only that row; else, when REF is a number no upstream id matches, the task with that row
    id. Raises NotFound when there is none."""
    from mjctl.models import Task
    from mjctl.tasks import get_task_by_row, tasks_with_mj_id

    if row is not None:
        task = get_task_by_row(row)
        if task.mj_id != ref:
            raise NotFound(f"Row {row} is task {task.mj_id!r}, not {ref!r}.")
        return [task]
    found = tasks_with_mj_id(ref)
    if not found and ref.isdigit():
        found = list(Task.select().where(Task.id == int(ref)))
    if not found:
        raise NotFound(f"No task with the upstream id or row id {ref!r}.")
    return found


@app.command("show", epilog=examples('mjctl tasks show 1730000000000123', 'mjctl tasks show 42 --raw'))
def show(ctx: typer.Context, mj_id: TaskId, row: Row = None, raw: Raw = False, json_out: JsonOut = False) -> None:
    """One task in full: every field, buttons and properties. When several tasks share the id (upstreams
    on different channels can give the same one), each of them, with a note saying so. The upstream's
    description and failure reason are shown in English (--raw: as sent; --json: always as sent)."""
    from mjctl.tasks import task_detail

    st = state(ctx)
    st.open_store()
    image_url = image_links(st)
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
            elif key in ("description", "fail_reason") and not raw:
                value = to_english(value)
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


@app.command("submit", epilog=examples(
    'mjctl tasks submit "a red fox in the snow" --user alice --speed relax',
))
def submit(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The imagine prompt.")],
    user: Annotated[str, typer.Option("--user", "-u", help="The user who submits (and pays).")],
    speed: Annotated[str | None, typer.Option("--speed", help="fast, relax or turbo: the upstream's speed "
                                              "prefix.")] = None,
    raw: Raw = False,
    json_out: JsonOut = False,
) -> None:
    """Submit an imagine task for a user through the relay (the user is charged). Exit 1 when refused."""
    from mjctl import accounts, relay

    if speed is not None and speed.lower() not in SPEEDS:
        raise UsageError(f"Unknown speed {speed!r}; use fast, relax or turbo.")
    st = state(ctx)
    settings = st.open_store()
    st.require_secret("the channels' secrets cannot be opened and the upstream's pushes could not be checked")
    owner = accounts.get_user(user)
    if not owner.enabled:
        raise UsageError(f"User {user!r} is disabled.")
    status, answer = relay.submit(settings, owner, "imagine", {"prompt": prompt},
                                  SPEEDS[speed.lower()] if speed else "")
    accepted = status == 200 and answer.get("code") in ACCEPTED_CODES
    description = answer.get("description") if raw else to_english(answer.get("description") or "")
    if json_out:
        print_json({"http_status": status, **answer})
    elif accepted:  # the result and description are the upstream's words: shown escaped
        balance = accounts.get_user(owner.name).quota
        sys.stdout.write(f"{visible(str(answer['result']))}\n")
        sys.stderr.write(visible(f"Submitted task {answer['result']} for {owner.name} (code {answer['code']}: "
                                 f"{description}); balance now {balance}.") + "\n")
    else:
        sys.stderr.write(visible(f"Error: not submitted (code {answer.get('code')}): {description}") + "\n")
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


@app.command("watch", epilog=examples('mjctl tasks watch 1730000000000123 1730000000000124'))
def watch(
    ctx: typer.Context,
    mj_ids: Annotated[list[str], typer.Argument(help="Task ids to watch.")],
    interval: Annotated[float, typer.Option("--interval", min=0.01, help="Seconds between looks at the "
                                            "store.")] = 1.0,
    raw: Raw = False,
) -> None:
    """Follow tasks until every one is finished: progress bars on a terminal, one line per change otherwise.
    Exit 1 if any failed. A failure reason is shown in English (--raw: as the upstream sent it)."""
    from mjctl.db import connection

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
        _watch_lines(ids, current, poll, finished, raw)
    failed = [i for i in ids if current[i][0] != "SUCCESS"]
    if failed:
        sys.stderr.write(f"Error: {len(failed)} of {len(ids)} task(s) did not succeed: {', '.join(failed)}.\n")
        raise typer.Exit(1)


def _line(mj_id: str, snap: tuple[str, str, str], raw: bool) -> str:
    """One tab-separated line; each field escaped, as the upstream wrote the status, progress and reason."""
    status, progress, reason = snap
    text = f"{visible(mj_id)}\t{visible(status)}\t{visible(progress or '-')}"
    return text + (f"\t{visible(reason if raw else to_english(reason))}" if status == "FAILURE" and reason else "")


def _watch_lines(ids, current, poll, finished, raw: bool) -> None:
    for mj_id in ids:
        sys.stdout.write(_line(mj_id, current[mj_id], raw) + "\n")
    sys.stdout.flush()
    while not finished():
        fresh = poll()
        for mj_id in ids:
            if fresh.get(mj_id, current[mj_id]) != current[mj_id]:
                current[mj_id] = fresh[mj_id]
                sys.stdout.write(_line(mj_id, current[mj_id], raw) + "\n")
        sys.stdout.flush()


def _watch_bars(ids, current, poll, finished) -> None:
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn

    def describe(mj_id):  # a markup string: the data in it is escaped for the terminal and for markup
        status = current[mj_id][0]
        return f"{escape(visible(mj_id))} [{STATUS_STYLES.get(status, 'white')}]{escape(visible(status))}[/]"

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=console(), transient=False) as bars:
        handles = {i: bars.add_task(describe(i), total=100, completed=int(_percent(*current[i][:2]))) for i in ids}
        while not finished():
            fresh = poll()
            for mj_id in ids:
                current[mj_id] = fresh.get(mj_id, current[mj_id])
                bars.update(handles[mj_id], description=describe(mj_id),
                            completed=_percent(*current[mj_id][:2]))


@app.command("image", epilog=examples(
    'mjctl tasks image 1730000000000123 -o fox.png',
    'mjctl tasks image 42 -o - | display',
    'mjctl tasks image 1730000000000456 --video -o clip.mp4',
))
def image(
    ctx: typer.Context,
    mj_id: TaskId,
    row: Row = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="File to write (default: MJ_ID.<ext> "
                                               "here; - for stdout).")] = None,
    video: Annotated[bool, typer.Option("--video", help="The task's video instead of its image.")] = False,
    index: Annotated[int, typer.Option("--index", min=0, help="Which of the task's videos, with --video "
                                       "(0 = video_url).")] = 0,
    json_out: JsonOut = False,
) -> None:
    """Save a task's image (or with --video its video), from the store or fetched from its upstream (and kept
    when the task succeeded). When several tasks share the id (upstreams on different channels can give the
    same one), --row says which."""
    from mjctl.images import EXTENSIONS, ImageForwarder, ImageSource
    from mjctl.images.cache import claim_legacy_file

    settings = state(ctx).open_store()
    found = tasks_named(mj_id, row)
    if len(found) > 1:
        rows = ", ".join(f"{t.id} (channel {t.channel_id}, user {t.user_id})" for t in found)
        raise UsageError(f"{len(found)} tasks have the id {mj_id!r}: rows {rows}; choose one with --row.")
    task = found[0]
    if video:
        source = ImageSource.from_task(task, index)
        if not source.url:
            raise NotFound(f"Task {mj_id} has no video {index} (status {task.status}).")
    elif not task.image_url:
        raise NotFound(f"Task {mj_id} has no image (status {task.status}).")
    else:
        source = ImageSource.from_task(task)
    if output == "-" and json_out:
        raise UsageError("--json cannot be combined with -o - (both write to stdout).")
    if output and output != "-" and not Path(output).parent.is_dir():
        raise UsageError(f"Cannot write {output}: the folder {Path(output).parent} does not exist.")
    with ImageForwarder(settings) as forwarder:
        claim_legacy_file(forwarder.store, source)  # a file cached under the bare id by an earlier version
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


# `tasks export` lives beside `mjctl stats` (mjctl.cli.stats): the same filters, the same remote reading.
app.command("export", epilog=examples(
    'mjctl tasks export --format csv -o tasks.csv --since 30d',
    'mjctl tasks export --format jsonl --status FAILURE | jq .fail_reason',
))(stats_cli.export_tasks)
