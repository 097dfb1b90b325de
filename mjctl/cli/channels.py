"""`mjctl channels …`: the upstream midjourney-proxy deployments."""

from __future__ import annotations

import sys

import typer

from mjctl.cli.state import state
from mjctl.textsafe import visible

app = typer.Typer(no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON.")
COLUMNS = ["ID", "NAME", "BASE_URL", "ENABLED", "PRIORITY", "SECRET"]


def _row(c: dict):
    return (c["id"], c["name"], c["base_url"], c["enabled"], c["priority"], "set" if c["has_secret"] else "none")


@app.command("add")
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Channel name."),
    base_url: str = typer.Option(..., "--base-url", help="The upstream's base URL, e.g. http://127.0.0.1:8090."),
    secret: str = typer.Option("", "--secret", help="The upstream's mj-api-secret (stored sealed)."),
    priority: int = typer.Option(0, "--priority", help="Higher is tried first."),
    disabled: bool = typer.Option(False, "--disabled", help="Add it disabled."),
    json_out: bool = JSON,
) -> None:
    """Add an upstream channel."""
    from mjctl import channels
    from mjctl.cli.output import print_json

    settings = state(ctx).open_store()
    channel = channels.add_channel(settings, name, base_url, secret, priority=priority, enabled=not disabled)
    if json_out:
        print_json(channels.channel_dict(channel))
        return
    # The URL is only checked for a scheme and a host; the rest is shown escaped like any data.
    sys.stdout.write(f"Added channel {channel.name!r} (id {channel.id}) at {visible(channel.base_url)}.\n")


@app.command("list")
def list_(ctx: typer.Context, json_out: bool = JSON) -> None:
    """List channels, highest priority first."""
    from mjctl import channels
    from mjctl.cli.output import print_json, table

    state(ctx).open_store()
    rows = [channels.channel_dict(c) for c in channels.list_channels()]
    if json_out:
        print_json({"items": rows, "total": len(rows)})
        return
    table(COLUMNS, [_row(c) for c in rows])


@app.command("show")
def show(ctx: typer.Context, name: str = typer.Argument(..., help="Channel name or id."),
         json_out: bool = JSON) -> None:
    """One channel, with its count of unfinished tasks."""
    from mjctl import channels
    from mjctl.cli.output import print_json, table
    from mjctl.models import Task

    state(ctx).open_store()
    channel = channels.get_channel(name)
    data = channels.channel_dict(channel)
    data["unfinished_tasks"] = Task.select().where((Task.unfinished == 1) & (Task.channel_id == channel.id)).count()
    if json_out:
        print_json(data)
        return
    table(["FIELD", "VALUE"], list(data.items()))


def _toggle(ctx: typer.Context, name: str, enabled: bool, json_out: bool) -> None:
    from mjctl import channels
    from mjctl.cli.output import print_json

    state(ctx).open_store()
    channel = channels.set_enabled(name, enabled)
    if json_out:
        print_json(channels.channel_dict(channel))
        return
    sys.stdout.write(f"Channel {channel.name!r} is {'enabled' if enabled else 'disabled'}.\n")


@app.command("enable")
def enable(ctx: typer.Context, name: str = typer.Argument(..., help="Channel name or id."),
           json_out: bool = JSON) -> None:
    """Enable a channel: new submissions may use it."""
    _toggle(ctx, name, True, json_out)


@app.command("disable")
def disable(ctx: typer.Context, name: str = typer.Argument(..., help="Channel name or id."),
            json_out: bool = JSON) -> None:
    """Disable a channel: no new submissions; its tasks are still polled."""
    _toggle(ctx, name, False, json_out)


@app.command("remove")
def remove(ctx: typer.Context, name: str = typer.Argument(..., help="Channel name or id."),
           json_out: bool = JSON) -> None:
    """Remove a channel. Its unfinished tasks are failed and refunded by the next poll."""
    from mjctl import channels
    from mjctl.cli.output import print_json

    state(ctx).open_store()
    channel = channels.remove_channel(name)
    if json_out:
        print_json({"removed": channels.channel_dict(channel)})
        return
    sys.stdout.write(f"Removed channel {channel.name!r}.\n")



def _register_test_command() -> None:
    """`channels test` lives with the upstream client's CLI code."""
    from mjctl.cli.channels_test import test

    app.command("test")(test)


_register_test_command()
