"""`mjctl poll`: one polling cycle for cron, or a loop with --every until SIGTERM or Ctrl-C.

The poller (peewee and httpx underneath) is imported inside the command, so that `mjctl --help` does not load it.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from typing import Annotated

import typer

from mjctl.cli.output import configure_logging, examples, info, print_json, table
from mjctl.cli.state import state

app = typer.Typer()

ROWS = (
    ("checked", "tasks checked"),
    ("skipped", "unchanged, skipped"),
    ("updated", "updated"),
    ("finished", "finished"),
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("cancelled", "cancelled"),
    ("timed_out", "timed out"),
    ("refunded", "refunded"),
    ("quota_refunded", "quota refunded"),
    ("channels", "channels polled"),
    ("requests", "upstream requests"),
)


@app.command("poll", epilog=examples('mjctl poll', 'mjctl poll --verbose', 'mjctl poll --every 15 --json'))
def poll(
    ctx: typer.Context,
    every: Annotated[float | None, typer.Option("--every", min=0.1, help="Poll every SECONDS until SIGTERM or "
                                                "Ctrl-C (the current cycle finishes first).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON (one line per cycle with --every).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print a one-shot cycle's summary as a "
                                          "table.")] = False,
) -> None:
    """Run one polling cycle and print its summary line (a table with --verbose), or loop with --every."""
    from mjctl.channels import list_channels
    from mjctl.poller import drain_prefetch, poll_once, run_loop

    st = state(ctx)
    settings = st.open_store()
    if any(channel.secret_sealed for channel in list_channels()):
        st.require_secret("the channels' secrets cannot be opened")
    configure_logging(settings.log.level, settings.log.format)

    if every is None:
        summary = poll_once(settings)
        if summary.succeeded and not drain_prefetch(settings):
            logging.getLogger("mjctl.poller").warning(
                "some images of the tasks that just succeeded were not cached within %s s", settings.images.timeout)
        if json_out:
            print_json(summary.to_dict())
        elif verbose:
            _render(summary.to_dict())
        else:  # one line, like each cycle of a loop: what a cron log wants
            _cycle_line(summary.to_dict(), False)
        return

    stop_event = threading.Event()

    def stop(signum, _frame) -> None:
        if not stop_event.is_set():
            sys.stderr.write("Stopping after the current cycle…\n")
        stop_event.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_loop(settings, stop_event, every, on_cycle=lambda s: _cycle_line(s.to_dict(), json_out))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _render(data: dict) -> None:
    if not data["ran"]:
        info(f"Other pollers have this round's work ({data['message']}); nothing to do.")
        return
    rows = [(label, data[key]) for key, label in ROWS]
    rows.append(("channels with errors", ", ".join(data["channels_with_errors"]) or "-"))
    rows.extend((f"fault: {name}", count) for name, count in data["faults"].items())
    rows.append(("duration", f"{data['duration_ms']:.1f} ms"))
    table(["WHAT", "VALUE"], rows, title="Poll cycle")


def _cycle_line(data: dict, json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    elif not data["ran"]:
        sys.stdout.write(f"{_clock()} skipped: {data['message']}\n")
    else:
        parts = [f"{label} {data[key]}" for key, label in ROWS]
        if data["channels_with_errors"]:
            parts.append("channels with errors " + ",".join(data["channels_with_errors"]))
        if data["faults"]:
            parts.append("faults " + ",".join(f"{k}={v}" for k, v in data["faults"].items()))
        sys.stdout.write(f"{_clock()} " + "; ".join(parts) + f"; {data['duration_ms']:.0f} ms\n")
    sys.stdout.flush()


def _clock() -> str:
    from mjctl.logs import timestamp

    return timestamp(time.time())
