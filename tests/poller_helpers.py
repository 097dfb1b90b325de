"""Building charged tasks on the simulator, for the poller tests (the books check is tests/books.py)."""

from __future__ import annotations

PRICE = 1000


def add_channel(settings, name: str, url: str, secret: str = "sim-secret", enabled: bool = True):
    from mjctl import channels

    return channels.add_channel(settings, name, url, secret, enabled=enabled)


def submit_charged(user_id: int, channel_id: int, mj_ids: list[str], price: int = PRICE,
                   submit_time: int | None = None) -> list[int]:
    """Local tasks for upstream ids, each charged like the relay does (one transaction per task)."""
    import time

    from mjctl import accounts
    from mjctl.db import write_tx
    from mjctl.models import Task

    ids = []
    for mj_id in mj_ids:
        with write_tx():
            task = Task.create(user_id=user_id, channel_id=channel_id, mj_id=mj_id, action="IMAGINE",
                               prompt=f"prompt {mj_id}", status="SUBMITTED", progress="0%", quota=price,
                               unfinished=1, submit_time=submit_time or int(time.time()))
            accounts.charge(user_id, price, task_id=task.id, reason=f"IMAGINE {mj_id}")
        ids.append(task.id)
    return ids


def sim_submit(url: str, n: int, secret: str = "sim-secret", prefix: str = "cat") -> list[str]:
    """Submit n imagine tasks to a simulator; returns their upstream ids."""
    from mjctl.upstream import UpstreamClient

    ids = []
    with UpstreamClient(url, secret) as client:
        for i in range(n):
            result = client.submit("imagine", {"prompt": f"{prefix} {i}"})
            assert result.accepted, result
            ids.append(result.task_id)
    return ids
