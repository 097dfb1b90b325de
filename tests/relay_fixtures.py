"""A running relay for tests: the simulator on a free port, an mjctl server on another, two users and a channel."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import httpx
import pytest

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

    def client(self, user: str = "alice", **headers) -> httpx.Client:
        auth = headers or {"Authorization": f"Bearer {self.tokens[user]}"}
        return httpx.Client(base_url=self.url, headers=auth, timeout=30)

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


@pytest.fixture
def relay_env(store):
    env = start_relay(store)
    yield env
    env.server.stop()
    env.sim.stop()


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def balance(name: str) -> int:
    from mjctl.models import User

    return User.get(User.name == name).quota


def ledger_total(name: str) -> tuple[int, int]:
    """(number of ledger rows, sum of their amounts) of a user."""
    from mjctl.models import Ledger, User

    uid = User.get(User.name == name).id
    rows = list(Ledger.select().where(Ledger.user_id == uid))
    return len(rows), sum(r.amount for r in rows)


def assert_books_balance(name: str) -> None:
    """The ledger explains the balance, and charges minus refunds is used_quota."""
    from mjctl.models import Ledger, User

    user = User.get(User.name == name)
    rows = list(Ledger.select().where(Ledger.user_id == user.id))
    assert user.quota >= 0
    assert sum(r.amount for r in rows) == user.quota
    charged = -sum(r.amount for r in rows if r.kind == "charge")
    refunded = sum(r.amount for r in rows if r.kind == "refund")
    assert charged - refunded == user.used_quota
