"""`mjctl channels …`: the upstream midjourney-proxy deployments.

The core (peewee underneath) and the upstream client (httpx) are imported inside each command, so that
`mjctl --help` does not load them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mjctl.cli.output import Group, JsonOut, examples, human_time, print_json, table
from mjctl.cli.state import state
from mjctl.textsafe import visible

app = typer.Typer(cls=Group, no_args_is_help=True, help="Manage upstream midjourney-proxy channels.")

COLUMNS = ["ID", "NAME", "BASE_URL", "ENABLED", "PRIORITY", "SECRET", "HEALTH"]
ChannelRef = Annotated[str, typer.Argument(help="Channel name or id.")]


def _row(c: dict):
    return (c["id"], c["name"], c["base_url"], c["enabled"], c["priority"], "set" if c["has_secret"] else "none",
            c["health"])


@app.command("add", epilog=examples(
    'mjctl channels add up1 --base-url http://127.0.0.1:8090 --secret S --priority 10',
))
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Channel name.")],
    base_url: Annotated[str, typer.Option("--base-url",
                                          help="The upstream's base URL, e.g. http://127.0.0.1:8090.")],
    secret: Annotated[str, typer.Option("--secret", help="The upstream's mj-api-secret (stored sealed).")] = "",
    priority: Annotated[int, typer.Option("--priority", help="Higher is tried first.")] = 0,
    disabled: Annotated[bool, typer.Option("--disabled", help="Add it disabled.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Add an upstream channel."""
    from mjctl import channels

    settings = state(ctx).open_store(create=True)
    channel = channels.add_channel(settings, name, base_url, secret, priority=priority, enabled=not disabled)
    if json_out:
        print_json(channels.channel_dict(channel))
        return
    # The URL is only checked for a scheme and a host; the rest is shown escaped like any data.
    sys.stdout.write(f"Added channel {channel.name!r} (id {channel.id}) at {visible(channel.base_url)}.\n")


@app.command("list", epilog=examples('mjctl channels list', 'mjctl channels list --json'))
def list_(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """List channels, highest priority first."""
    from mjctl import channels

    state(ctx).open_store()
    rows = [channels.channel_dict(c) for c in channels.list_channels()]
    if json_out:
        print_json({"items": rows, "total": len(rows)})
        return
    table(COLUMNS, [_row(c) for c in rows])


@app.command("show", epilog=examples('mjctl channels show up1', 'mjctl channels show 2 --json'))
def show(ctx: typer.Context, name: ChannelRef, json_out: JsonOut = False) -> None:
    """One channel, with its count of unfinished tasks."""
    from mjctl import channels
    from mjctl.models import Task

    state(ctx).open_store()
    channel = channels.get_channel(name)
    data = channels.channel_dict(channel)
    data["unfinished_tasks"] = Task.select().where((Task.unfinished == 1) & (Task.channel_id == channel.id)).count()
    if json_out:
        print_json(data)
        return
    table(["FIELD", "VALUE"], [(k, human_time(v) if k in ("created_at", "cooldown_until") and v else v)
                               for k, v in data.items()])


@app.command("test", epilog=examples('mjctl channels test up1'))
def test(ctx: typer.Context, name: ChannelRef, json_out: JsonOut = False) -> None:
    """Probe a channel: reachable or not, secret accepted or not, round-trip time. Exit 1 when it is not usable."""
    from mjctl import channels

    st = state(ctx)
    settings = st.open_store()
    channel = channels.get_channel(name)
    if channel.secret_sealed:
        st.require_secret(f"the secret of channel {channel.name!r} cannot be opened")
    timeout = settings.poller.request_timeout
    with channels.client_for(settings, channel, timeout=timeout) as client:
        probe = client.probe()
    usable = probe.reachable and probe.authorized is True
    if json_out:
        print_json({"channel": channel.name, "base_url": channel.base_url, "reachable": probe.reachable,
                    "authorized": probe.authorized, "rtt_ms": probe.rtt_ms, "ok": usable, "message": probe.message})
    else:
        secret = {True: "accepted", False: "REFUSED", None: "unknown"}[probe.authorized]
        sys.stdout.write(f"Channel {channel.name!r} at {channel.base_url}: "
                         f"{'reachable' if probe.reachable else 'UNREACHABLE'}, secret {secret}, "
                         f"{probe.rtt_ms:.0f} ms.\n")
        if not usable:
            sys.stderr.write(f"{probe.message}\n")
    if not usable:
        raise typer.Exit(1)


def _toggle(ctx: typer.Context, name: str, enabled: bool, json_out: bool) -> None:
    from mjctl import channels

    state(ctx).open_store()
    channel = channels.set_enabled(name, enabled)
    if json_out:
        print_json(channels.channel_dict(channel))
        return
    sys.stdout.write(f"Channel {channel.name!r} is {'enabled' if enabled else 'disabled'}.\n")


@app.command("enable", epilog=examples('mjctl channels enable up1'))
def enable(ctx: typer.Context, name: ChannelRef, json_out: JsonOut = False) -> None:
    """Enable a channel, ending any cool-down: new submissions may use it."""
    _toggle(ctx, name, True, json_out)


@app.command("disable", epilog=examples('mjctl channels disable up1'))
def disable(ctx: typer.Context, name: ChannelRef, json_out: JsonOut = False) -> None:
    """Disable a channel: no new submissions; its tasks are still polled."""
    _toggle(ctx, name, False, json_out)


@app.command("remove", epilog=examples('mjctl channels remove up1'))
def remove(ctx: typer.Context, name: ChannelRef, json_out: JsonOut = False) -> None:
    """Remove a channel. Its unfinished tasks are failed and refunded by the next poll."""
    from mjctl import channels

    state(ctx).open_store()
    channel = channels.remove_channel(name)
    if json_out:
        print_json({"removed": channels.channel_dict(channel)})
        return
    sys.stdout.write(f"Removed channel {channel.name!r}.\n")
