"""`mjctl demo`: the whole system on this machine in one command.

A simulated midjourney-proxy, the HTTP server (API, relay, images, web page) and the poller, on a SQLite
file in a folder of their own. A user with quota and an admin are created, a channel points at the
simulator, and a handful of tasks are submitted through the relay (so they are charged like real ones).
They progress over the next minute: most succeed, and exactly one fails (the simulator's ``late_fail``
fault, switched on for that one submission only) and is refunded. Ctrl-C or SIGTERM stops everything.
The server, the poller and the simulator are imported inside the command, so that `mjctl --help` does not
load them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mjctl.cli.output import configure_logging
from mjctl.cli.state import state
from mjctl.errors import MjctlError

USER, ADMIN, CHANNEL = "demo", "admin", "demo-simulator"
USER_QUOTA = 100_000
STEP_SECONDS = 5.0  # six progress steps: a task takes about 35 s once it starts
POLL_SECONDS = 2.0
PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a steampunk owl made of brass gears",  # the one that fails
    "isometric tiny city on a floating island, pastel colours",
    "portrait of an astronaut cat, studio lighting",
    "underwater temple with glowing jellyfish",
    "watercolour map of an imaginary archipelago",
)
FAILING = 1  # index in PROMPTS

app = typer.Typer()


@app.command("demo")
def demo(
    ctx: typer.Context,
    directory: Annotated[Path | None, typer.Option("--dir", help="Folder for the database and secret "
                                                   "(created; default: a new temporary folder).")] = None,
    port: Annotated[int, typer.Option("--port", "-p", help="Port of the web page and API (0 picks a free "
                                      "one).")] = 8080,
    sim_port: Annotated[int, typer.Option("--sim-port", help="Port of the simulated upstream (0 picks a free "
                                          "one).")] = 0,
) -> None:
    """Run a simulator, the server and the poller with a user and some tasks in flight, until Ctrl-C."""
    folder = _prepare_folder(directory)
    if port == 0:
        port = _free_port()
    host = "127.0.0.1"
    public_url = f"http://{host}:{port}"
    st = state(ctx)
    st.override("database", "url", f"sqlite:///{folder / 'mjctl.db'}")
    st.override("server", "secret_file", str(folder / "mjctl.secret"))
    st.override("server", "host", host)
    st.override("server", "port", port)
    st.override("server", "public_url", public_url)
    st.override("poller", "interval", POLL_SECONDS)
    settings = st.open_store()
    configure_logging("warning")  # the page's refreshes would otherwise fill the terminal

    import secrets  # with hmac and hashlib: 10 ms of `mjctl --help` if imported at the top
    import threading

    from mjctl import accounts, channels
    from mjctl.httpserver import serve_forever
    from mjctl.server import make_bridge
    from mjctl.sim import run_simulator_in_thread

    sim_secret = secrets.token_urlsafe(18)
    try:
        sim = run_simulator_in_thread(secret=sim_secret, port=sim_port, step_seconds=STEP_SECONDS, fail_rate=0.0,
                                      accounts=1, concurrency=3, seed=7)
    except OSError as exc:
        raise MjctlError(f"Cannot start the simulator on port {sim_port}: {exc.strerror or exc}") from None
    stop_event = threading.Event()
    poller = None
    try:
        user, user_token = accounts.create_user(USER, role="user", quota=USER_QUOTA)
        _, admin_token = accounts.create_user(ADMIN, role="admin")
        channel = channels.add_channel(settings, CHANNEL, sim.url, sim_secret)
        poller = _start_poller(settings, stop_event)

        def ready(url: str) -> None:
            # The server is listening, so the simulator's pushes to the notify hook land from the start.
            accepted = _submit_tasks(settings, user, sim)
            _announce(folder, url, sim.url, user_token, admin_token, accepted, channel.id, settings)

        try:
            serve_forever(make_bridge(settings), host, port, on_ready=ready)
        except OSError as exc:
            raise MjctlError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}; "
                             "pass another --port.") from None
    except KeyboardInterrupt:
        pass  # Ctrl-C before the server was up: stop as cleanly as after
    finally:
        stop_event.set()
        if poller is not None:
            poller.join(timeout=30)
        sim.stop()
    sys.stderr.write("mjctl demo stopped.\n")


def _prepare_folder(directory: Path | None) -> Path:
    if directory is None:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="mjctl-demo-"))
    folder = directory.expanduser().resolve()
    if (folder / "mjctl.db").exists():
        raise MjctlError(f"{folder} already holds a demo database; pass another --dir (or none for a new "
                         "temporary folder).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MjctlError(f"Cannot create the folder {folder}: {exc.strerror or exc}") from None
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_poller(settings, stop_event):
    from mjctl.poller import start_background

    return start_background(settings, stop_event)


def _submit_tasks(settings, user, sim) -> int:
    """Submit the demo's prompts through the relay, charging the user; one of them will fail late."""
    from mjctl import relay

    accepted = 0
    for index, prompt in enumerate(PROMPTS):
        if index == FAILING:
            sim.sim.update({"faults": {"late_fail": 1.0}})
        try:
            _, answer = relay.submit(settings, user, "imagine", {"prompt": prompt})
        finally:
            if index == FAILING:
                sim.sim.update({"faults": {"late_fail": 0.0}})
        if answer.get("code") in (1, 21, 22):
            accepted += 1
        else:
            sys.stderr.write(f"The simulator refused {prompt!r}: {answer.get('description')}\n")
    return accepted


def _announce(folder: Path, url: str, sim_url: str, user_token: str, admin_token: str, accepted: int,
              channel_id: int, settings) -> None:
    lines = [
        "mjctl demo is running.",
        "",
        f"  Web page:     {url}/",
        f"  User token:   {user_token}   (user {USER!r}, quota {USER_QUOTA})",
        f"  Admin token:  {admin_token}   (user {ADMIN!r}, sees every task)",
        "",
        f"  Folder:       {folder}",
        f"  Simulator:    {sim_url}   (channel {channel_id}, {CHANNEL!r})",
        f"  Tasks:        {accepted} submitted; they progress over the next minute, and one fails and is refunded.",
        "",
        "  Try:          curl -H 'Authorization: Bearer <user token>' " + url + "/api/mj/self",
        f"                MJCTL_DATABASE_URL={settings.database.url} mjctl tasks list",
        "",
        "Press Ctrl-C to stop.",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
