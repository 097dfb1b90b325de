"""The books: one check that the ledger, the balances and the tasks' quota agree, for every test that moves quota.

Exact books mean, for every user, that the ledger rows sum to the balance, that charges minus refunds is
``used_quota`` and that no balance is below zero; and for every charged task, that it was charged once,
refunded once exactly when it ended as FAILURE or CANCEL, that its quota is what it was charged (0 once
refunded) and that its unfinished flag agrees with its status.
"""

from __future__ import annotations

from collections import Counter, defaultdict

REFUNDED_STATUSES = ("FAILURE", "CANCEL")  # a charged task that ends so gets its quota back


def balance(name: str) -> int:
    from mjctl.models import User

    return User.get(User.name == name).quota


def ledger_total(name: str) -> tuple[int, int]:
    """(number of ledger rows, sum of their amounts) of a user."""
    from mjctl.models import Ledger, User

    uid = User.get(User.name == name).id
    amounts = [r.amount for r in Ledger.select(Ledger.amount).where(Ledger.user_id == uid)]
    return len(amounts), sum(amounts)


def book_problems() -> list[str]:
    """Every way the books are wrong, one sentence each; an empty list means they are exact."""
    from mjctl.models import Ledger, Task, User

    ledger = list(Ledger.select())
    by_user = defaultdict(list)
    charged: dict[int, int] = {}
    charges, refunds = Counter(), Counter()
    for row in ledger:
        by_user[row.user_id].append(row)
        if row.task_id is not None and row.kind == "charge":
            charges[row.task_id] += 1
            charged[row.task_id] = -row.amount
        elif row.task_id is not None and row.kind == "refund":
            refunds[row.task_id] += 1

    problems = []
    for user in User.select():
        rows = by_user[user.id]
        total = sum(r.amount for r in rows)
        charged_sum = -sum(r.amount for r in rows if r.kind == "charge")
        refunded_sum = sum(r.amount for r in rows if r.kind == "refund")
        if total != user.quota:
            problems.append(f"user {user.name}: ledger sum {total} != balance {user.quota}")
        if charged_sum - refunded_sum != user.used_quota:
            problems.append(f"user {user.name}: charges {charged_sum} - refunds {refunded_sum} "
                            f"!= used {user.used_quota}")
        if user.quota < 0:
            problems.append(f"user {user.name}: balance {user.quota} below zero")
    problems += [f"task {task_id} charged {n} times" for task_id, n in charges.items() if n > 1]
    problems += [f"task {task_id} refunded {n} times" for task_id, n in refunds.items() if n > 1]
    for task in Task.select():
        if task.id not in charged:
            continue
        if task.unfinished != (0 if task.is_finished else 1):
            problems.append(f"task {task.id} {task.status}: unfinished flag {task.unfinished}")
        failed, refunded = task.status in REFUNDED_STATUSES, task.id in refunds
        if failed != refunded:
            problems.append(f"task {task.id} {task.status}: refunded={refunded}")
        expected_quota = 0 if refunded else charged[task.id]
        if task.quota != expected_quota:
            problems.append(f"task {task.id} {task.status}: quota {task.quota} != {expected_quota}")
    return problems


def assert_books() -> None:
    """Fail the test, naming each problem, unless the books are exact."""
    problems = book_problems()
    assert not problems, "the books are wrong:\n" + "\n".join(problems)
