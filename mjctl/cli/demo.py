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

import shlex
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from mjctl.cli.output import configure_logging, examples
from mjctl.cli.state import state
from mjctl.errors import MjctlError
from mjctl.protocol import ACCEPTED_CODES

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
CONFIG_FILE, DB_FILE, SECRET_FILE, CACHE_DIR = "mjctl.toml", "mjctl.db", "mjctl.secret", "images"

app = typer.Typer()


@app.command("demo", epilog=examples('mjctl demo', 'mjctl demo --dir ./demo --port 8081'))
def demo(
    ctx: typer.Context,
    directory: Annotated[Path | None, typer.Option("--dir", help="Folder for the database, secret, image cache "
                                                   "and mjctl.toml (created; default: a new temporary "
                                                   "folder).")] = None,
    port: Annotated[int, typer.Option("--port", "-p", help="Port of the web page and API (0 picks a free "
                                      "one).")] = 8080,
    sim_port: Annotated[int, typer.Option("--sim-port", help="Port of the simulated upstream (0 picks a free "
                                          "one).")] = 0,
) -> None:
    """Run a simulator, the server and the poller with a user and some tasks in flight, until Ctrl-C.

    The folder gets a mjctl.toml naming its database, secret and image cache, so that any mjctl command
    run with MJCTL_CONFIG=<folder>/mjctl.toml, from any folder, sees the demo's store."""
    from mjctl.httpserver import probe_port

    host = "127.0.0.1"
    try:  # before anything is created: a busy port leaves nothing behind
        port = probe_port(host, port)
    except OSError as exc:
        raise MjctlError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); pass another port with "
                         "--port, or --port 0 for a free one.") from None
    folder, created = _prepare_folder(directory)
    started = threading.Event()
    try:
        _run(state(ctx), folder, host, port, sim_port, started)
    finally:
        if not started.is_set():  # a failed start: take away what it made
            _remove_demo_files(folder, created)
    sys.stderr.write("mjctl demo stopped.\n")


def _run(st, folder: Path, host: str, port: int, sim_port: int, started: threading.Event) -> None:
    import secrets  # with hmac and hashlib: 10 ms of `mjctl --help` if imported at the top

    from mjctl import accounts, channels
    from mjctl.httpserver import serve_forever
    from mjctl.server import make_bridge
    from mjctl.sim import run_simulator_in_thread

    config = _write_config(folder, host, port)
    st.config = str(config)
    # The same values as options too: $MJCTL_* variables of this shell must not point the demo elsewhere.
    for (section, key), value in _demo_settings(folder, host, port).items():
        st.override(section, key, value)
    settings = st.open_store(create=True)
    configure_logging("warning")  # the page's refreshes would otherwise fill the terminal

    sim_secret = secrets.token_urlsafe(18)
    try:
        sim = run_simulator_in_thread(secret=sim_secret, port=sim_port, step_seconds=STEP_SECONDS, fail_rate=0.0,
                                      accounts=1, concurrency=3, seed=7)
    except OSError as exc:
        raise MjctlError(f"Cannot start the simulator on port {sim_port} ({exc.strerror or exc}); pass another "
                         "port with --sim-port.") from None
    stop_event = threading.Event()
    poller = None
    try:
        user, user_token = accounts.create_user(USER, role="user", quota=USER_QUOTA)
        _, admin_token = accounts.create_user(ADMIN, role="admin")
        channel = channels.add_channel(settings, CHANNEL, sim.url, sim_secret)
        poller = _start_poller(settings, stop_event)

        def ready(url: str) -> None:
            # The server is listening, so the simulator's pushes to the notify hook land from the start.
            started.set()
            accepted = _submit_tasks(settings, user, sim)
            _announce(folder, config, url, sim.url, user_token, admin_token, accepted, channel.id)

        try:
            serve_forever(make_bridge(settings), host, port, on_ready=ready)
        except OSError as exc:
            raise MjctlError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); pass another port with "
                             "--port.") from None
    except KeyboardInterrupt:
        pass  # Ctrl-C before the server was up: stop as cleanly as after
    finally:
        stop_event.set()
        if poller is not None:
            poller.join(timeout=30)
        sim.stop()


def _demo_settings(folder: Path, host: str, port: int) -> dict[tuple[str, str], object]:
    return {
        ("database", "url"): f"sqlite:///{folder / DB_FILE}",
        ("server", "secret_file"): str(folder / SECRET_FILE),
        ("server", "host"): host,
        ("server", "port"): port,
        ("server", "public_url"): f"http://{host}:{port}",
        ("images", "cache_dir"): str(folder / CACHE_DIR),
        ("poller", "interval"): POLL_SECONDS,
    }


def _write_config(folder: Path, host: str, port: int) -> Path:
    """The demo's mjctl.toml: its paths relative to the file, so the folder can be moved as a whole."""
    path = folder / CONFIG_FILE
    path.write_text(
        "# Written by `mjctl demo`. Any mjctl command run with MJCTL_CONFIG=<this file> uses the demo's store.\n"
        "# Paths are relative to this file's folder.\n\n"
        f'[database]\nurl = "sqlite:///{DB_FILE}"\n\n'
        f'[server]\nhost = "{host}"\nport = {port}\npublic_url = "http://{host}:{port}"\n'
        f'secret_file = "{SECRET_FILE}"\n\n'
        f'[images]\ncache_dir = "{CACHE_DIR}"\n\n'
        f"[poller]\ninterval = {POLL_SECONDS}\n",
        encoding="utf-8",
    )
    return path


def _prepare_folder(directory: Path | None) -> tuple[Path, bool]:
    """The demo's folder, and whether the demo created it."""
    if directory is None:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="mjctl-demo-")), True
    folder = directory.expanduser().resolve()
    if (folder / DB_FILE).exists():
        raise MjctlError(f"{folder} already holds a demo database; pass another --dir (or none for a new "
                         "temporary folder).")
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MjctlError(f"Cannot create the folder {folder}: {exc.strerror or exc}") from None
    return folder, not existed


def _remove_demo_files(folder: Path, created: bool) -> None:
    """Remove what a demo that never started wrote: its whole folder when it made it, else its own files."""
    import shutil

    from mjctl.db import unbind

    unbind()  # SQLite's files are open until then
    if created:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in (CONFIG_FILE, DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", SECRET_FILE):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / CACHE_DIR, ignore_errors=True)


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
        if answer.get("code") in ACCEPTED_CODES:
            accepted += 1
        else:
            sys.stderr.write(f"The simulator refused {prompt!r}: {answer.get('description')}\n")
    return accepted


def _announce(folder: Path, config: Path, url: str, sim_url: str, user_token: str, admin_token: str, accepted: int,
              channel_id: int) -> None:
    env = f"MJCTL_CONFIG={shlex.quote(str(config))}"
    lines = [
        "mjctl demo is running.",
        "",
        f"  Web page:     {url}/",
        f"  User token:   {user_token}   (user {USER!r}, quota {USER_QUOTA})",
        f"  Admin token:  {admin_token}   (user {ADMIN!r}, sees every task)",
        "",
        f"  Folder:       {folder}   (its mjctl.toml names the database, secret and image cache)",
        f"  Simulator:    {sim_url}   (channel {channel_id}, {CHANNEL!r})",
        f"  Tasks:        {accepted} submitted; they progress over the next minute, and one fails and is refunded.",
        "",
        "  Try:          curl -H 'Authorization: Bearer <user token>' " + url + "/api/mj/self",
        f"                {env} mjctl tasks list",
        f"                {env} mjctl channels test {CHANNEL}",
        "",
        "Press Ctrl-C to stop.",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
