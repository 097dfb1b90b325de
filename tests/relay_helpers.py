"""A running relay for tests: the simulator on a free port, an mjctl server on another, two users and a channel.
The relay_env fixture (conftest.py) is one of these over the test's store. The server is there for what
must reach mjctl over HTTP (the simulator's pushes, tests of the server); the tests' own requests go to
its app in process (Relay.client)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import httpx

from tests.helpers import app_client

SIM_SECRET = "sim-secret"


@dataclass
class Relay:
    settings: object
    sim: object  # SimulatorHandle
    server: object  # ServerThread
    channel: object
    tokens: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, user: str | None = "alice", **headers) -> httpx.Client:
        """A client of the relay's app in process, addressed as the running server (links the app builds
        point at it). Authenticated as user (None: not at all), unless headers are given. The upstream is
        still called over HTTP; only this hop skips the socket."""
        return app_client(self.server.bridge.app, base_url=self.url, headers=self._auth(user, headers), timeout=30)

    def socket_client(self, user: str | None = "alice", **headers) -> httpx.Client:
        """The same through the running server's socket, for tests of what the server itself does."""
        return httpx.Client(base_url=self.url, headers=self._auth(user, headers), timeout=30)

    def _auth(self, user: str | None, headers: dict) -> dict:
        if headers or user is None:
            return headers
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def submit(self, kind: str, body, user: str = "alice", prefix: str = ""):
        with self.client(user) as c:
            return c.post(f"{prefix}/mj/submit/{kind}", json=body)

    def push_here(self) -> None:
        """Have forwarded submissions carry mjctl's signed notify hook (the simulator then pushes to us)."""
        self.settings.server = replace(self.settings.server, public_url=self.url)


def start_relay(settings, *, users=(("alice", 10_000), ("bob", 10_000)), **sim_opts) -> Relay:
    from mjctl import accounts, channels
    from mjctl.httpserver import ServerThread
    from mjctl.server import make_bridge
    from mjctl.sim import run_simulator_in_thread

    opts = dict(secret=SIM_SECRET, step_seconds=0.02, queue_size=1000)
    opts.update(sim_opts)
    sim = run_simulator_in_thread(**opts)
    channel = channels.add_channel(settings, "sim", sim.url, SIM_SECRET, priority=0)
    tokens = {}
    for name, quota in users:
        _, tokens[name] = accounts.create_user(name, quota=quota)
    server = ServerThread(make_bridge(settings)).start()
    return Relay(settings=settings, sim=sim, server=server, channel=channel, tokens=tokens)
