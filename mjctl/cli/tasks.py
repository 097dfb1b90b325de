"""`mjctl tasks …`: list and show tasks (submit and watch join with the relay)."""

from __future__ import annotations

import sys

import typer

from mjctl.cli.state import state

app = typer.Typer(no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON.")


def build_filter(*, mine: bool, user: str | None, channel: str | None, mj_id: str | None, status: str | None,
                 action: str | None, since: str | None, until: str | None, token: str | None):
    """The TaskFilter for these options, resolved against the local store. Returns (filter, admin_view)."""
    from mjctl import accounts, channels
    from mjctl.errors import UsageError
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
    mine: bool = typer.Option(False, "--mine", help="Only the tasks of the user whose token is in $MJCTL_TOKEN."),
    user: str | None = typer.Option(None, "--user", help="Only this user's tasks."),
    channel: str | None = typer.Option(None, "--channel", help="Only this channel's tasks (id or name)."),
    mj_id: str | None = typer.Option(None, "--mj-id", help="Exact task id."),
    status: str | None = typer.Option(None, "--status", help="Exact status, e.g. SUCCESS."),
    action: str | None = typer.Option(None, "--action", help="Exact action, e.g. IMAGINE."),
    since: str | None = typer.Option(None, "--since",
                                     help="Submitted at or after: epoch, ISO-8601, or an age like 2h."),
    until: str | None = typer.Option(None, "--until", help="Submitted at or before: epoch, ISO-8601, or an age."),
    page: int = typer.Option(1, "--page", "-p", help="Page number, from 1."),
    page_size: int = typer.Option(20, "--page-size", "-n", help="Tasks per page (at most 100)."),
    server: str | None = typer.Option(None, "--server", help="Read a remote mjctl over HTTP ($MJCTL_SERVER)."),
    json_out: bool = JSON,
) -> None:
    """List tasks, newest first, as a table (or tab-separated lines in a pipe, or --json)."""
    from mjctl.cli.output import print_json, render_tasks
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


ROW = typer.Option(None, "--row", min=1, help="The task's row id (the id column of tasks list --json), to "
                   "choose one of several tasks that share MJ_ID.")


def tasks_named(mj_id: str, row: int | None) -> list:
    """The tasks MJ_ID names: every task with that upstream id (one per channel may share it), oldest
    first, or with --row only that row. Raises NotFound when there is none."""
    from mjctl.errors import NotFound
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
def show(ctx: typer.Context, mj_id: str = typer.Argument(..., help="The task id."),
         row: int | None = ROW, json_out: bool = JSON) -> None:
    """One task in full: every field, buttons and properties. When several tasks share the id (upstreams
    on different channels can give the same one), each of them, with a note saying so."""
    from mjctl.cli.output import human_time, info, print_json, table
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


def _register_extra_commands() -> None:
    """Commands that live beside the code they need: submit and watch (the relay), image (images)."""
    from mjctl.cli import images, tasks_relay

    app.command("submit")(tasks_relay.submit)
    app.command("watch")(tasks_relay.watch)
    app.command("image")(images.task_image)


_register_extra_commands()
