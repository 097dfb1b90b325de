"""`mjctl channels test NAME`: is the upstream reachable, does it accept the secret, how fast does it answer."""

from __future__ import annotations

import sys

import typer

from mjctl.cli.state import state


def test(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Channel name or id."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Probe a channel: reachable or not, secret accepted or not, round-trip time. Exit 1 when it is not usable."""
    from mjctl import channels
    from mjctl.cli.output import print_json

    settings = state(ctx).open_store()
    channel = channels.get_channel(name)
    timeout = float(settings.poller.request_timeout)
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
