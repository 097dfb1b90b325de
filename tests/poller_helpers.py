"""Building charged tasks on the simulator and checking the books, for the poller tests and benchmark."""

from __future__ import annotations

from peewee import fn

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


def book_problems() -> list[str]:
    """Every way the books could be wrong; an empty list means they are exact."""
    from mjctl.models import Ledger, Task, User

    problems = []
    for user in User.select():
        rows = Ledger.select().where(Ledger.user_id == user.id)
        charges = -sum(r.amount for r in rows if r.kind == "charge")
        refunds = sum(r.amount for r in rows if r.kind == "refund")
        total = sum(r.amount for r in rows)
        if charges - refunds != user.used_quota:
            problems.append(f"user {user.name}: charges {charges} - refunds {refunds} != used {user.used_quota}")
        if total != user.quota:
            problems.append(f"user {user.name}: ledger sum {total} != balance {user.quota}")
    twice = (Ledger.select(Ledger.task_id, fn.COUNT(Ledger.id).alias("n")).where(Ledger.kind == "refund")
             .group_by(Ledger.task_id).having(fn.COUNT(Ledger.id) > 1))
    for row in twice:
        problems.append(f"task {row.task_id} refunded {row.n} times")
    refunded = {r.task_id for r in Ledger.select(Ledger.task_id).where(Ledger.kind == "refund")}
    charged = {r.task_id: -r.amount for r in Ledger.select().where(Ledger.kind == "charge")}
    for task in Task.select():
        if task.id not in charged:
            continue
        should_refund = task.status in ("FAILURE", "CANCEL")
        if should_refund != (task.id in refunded):
            problems.append(f"task {task.id} {task.status}: refunded={task.id in refunded}")
        expected_quota = 0 if should_refund else charged[task.id]
        if task.quota != expected_quota:
            problems.append(f"task {task.id} {task.status}: quota {task.quota} != {expected_quota}")
        if task.unfinished != (0 if task.is_finished else 1):
            problems.append(f"task {task.id} {task.status}: unfinished flag {task.unfinished}")
    return problems
