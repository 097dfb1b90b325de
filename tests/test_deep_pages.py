"""Deep listing pages read from anchors (mjctl.anchors) are exactly the pages read with OFFSET, on every backend,
whatever happens to the tasks between two reads; and the counter that guards the anchors moves when it must."""

from __future__ import annotations

import random

import pytest

from mjctl import accounts, anchors
from mjctl.models import Task, TaskChange
from mjctl.tasks import TaskFilter, list_tasks

BASE_TIME = 1_700_000_000


@pytest.fixture
def small_anchors(monkeypatch):
    """Anchors from the 7th match on, used within 9 matches, at most 8 a filter, 30 newer matches counted:
    every path of mjctl.anchors is reached with a few hundred tasks."""
    monkeypatch.setattr(anchors, "ANCHOR_FROM", 6)
    monkeypatch.setattr(anchors, "REACH", 9)
    monkeypatch.setattr(anchors, "MAX_ANCHORS", 8)
    monkeypatch.setattr(anchors, "FRESH_CAP", 30)
    anchors.stats.clear()
    return anchors.stats


class Tasks:
    """Tasks with ids chosen here (even ones in order, so that odd ones can arrive late, below them, as a
    transaction that commits after newer ones does on PostgreSQL and MariaDB)."""

    def __init__(self, rng: random.Random, users: list[int]):
        self.rng = rng
        self.users = users
        self.high = 0

    def insert(self, row_id: int) -> None:
        rng = self.rng
        Task.insert(id=row_id, user_id=rng.choice(self.users), channel_id=rng.randint(1, 3), mj_id=f"m{row_id}",
                    action=rng.choice(["IMAGINE", "UPSCALE"]), status=rng.choice(["SUCCESS", "FAILURE"]),
                    progress="100%", submit_time=BASE_TIME + row_id * 10 + rng.randint(-30, 30), quota=row_id,
                    mode=rng.choice(["", "FAST", "RELAX"]), unfinished=0).execute()
        self.high = max(self.high, row_id)

    def newer(self) -> None:
        self.insert(self.high + 2 - self.high % 2)

    def late(self) -> None:
        """A task below newer ones, in a gap no task has taken."""
        taken = {i for (i,) in Task.select(Task.id).tuples()}
        gaps = [i for i in range(1, self.high, 2) if i not in taken]
        if gaps:
            self.insert(self.rng.choice(gaps))

    def some_id(self) -> int:
        ids = [i for (i,) in Task.select(Task.id).tuples()]
        return self.rng.choice(ids)


def same_page(filters: TaskFilter, page: int, size: int) -> None:
    served = list_tasks(filters, page, size)
    plain = list_tasks(filters, page, size, anchored=False)
    assert [tuple(row) for row in served.items] == [tuple(row) for row in plain.items], (filters, page, size)
    assert served.total == plain.total, (filters, page, size)


def random_filters(rng: random.Random, users: list[int]) -> TaskFilter:
    start = BASE_TIME + rng.randint(0, 3000)
    return rng.choice([
        TaskFilter(),
        TaskFilter(channel_id=rng.randint(1, 3)),
        TaskFilter(user_id=rng.choice(users)),
        TaskFilter(action="UPSCALE"),
        TaskFilter(start=start, end=start + rng.randint(1000, 4000)),
        TaskFilter(user_id=rng.choice(users), channel_id=rng.randint(1, 3)),
        TaskFilter(channel_id=rng.randint(1, 3), action="IMAGINE", start=start),
        TaskFilter(mode="RELAX"),
        TaskFilter(channel_id=rng.randint(1, 3), mode="FAST"),
        TaskFilter(status="SUCCESS"),  # never anchored: statuses change
        TaskFilter(channel_id=0),
    ])


def test_deep_pages_equal_offset_pages_while_tasks_come_change_and_go(any_store, small_anchors):
    rng = random.Random(20240611)
    users = [accounts.create_user(name)[0].id for name in ("alice", "bob", "carol")]
    tasks = Tasks(rng, users)
    for _ in range(300):
        tasks.newer()
    visits: list[tuple[TaskFilter, int, int]] = []
    for step in range(500):
        if visits and rng.random() < 0.75:
            filters, page, size = rng.choice(visits[-8:])  # near a page read lately: its anchor is there
            page = max(1, page + rng.choice([-1, 0, 0, 1, 2]))
        else:
            filters, size = random_filters(rng, users), rng.randint(3, 7)
            page = rng.randint(1, 30)
        same_page(filters, page, size)
        visits.append((filters, page, size))
        move = rng.random()
        if move < 0.35:
            for _ in range(rng.randint(1, 4)):
                tasks.newer()
        elif move < 0.38:
            tasks.late()
        elif move < 0.43:
            Task.update(status="CANCEL").where(Task.id == tasks.some_id()).execute()
        elif move < 0.445:
            column = rng.choice([Task.channel_id, Task.user_id, Task.action, Task.submit_time, Task.mj_id, Task.mode])
            value = {"channel_id": rng.randint(1, 3), "user_id": rng.choice(users), "action": "VARIATION",
                     "submit_time": BASE_TIME + rng.randint(0, 4000), "mj_id": f"renamed{step}",
                     "mode": "TURBO"}[column.name]
            Task.update({column: value}).where(Task.id == tasks.some_id()).execute()
        elif move < 0.46:
            Task.delete().where(Task.id == tasks.some_id()).execute()
    # Every way through mjctl.anchors was taken: served from anchors, re-read after newer matches, anchors
    # proven wrong and dropped, and pages read with OFFSET.
    assert min(small_anchors[k] for k in ("anchored", "moved", "dropped", "offset")) > 0, dict(small_anchors)
    assert small_anchors["anchored"] > 100, dict(small_anchors)


def test_a_late_insert_below_the_anchors_is_caught(any_store, small_anchors):
    alice, _ = accounts.create_user("alice")
    tasks = Tasks(random.Random(1), [alice.id])
    for _ in range(60):
        tasks.newer()
    for page in (4, 5, 4):
        same_page(TaskFilter(), page, 5)
    assert small_anchors["anchored"] == 2
    tasks.insert(3)  # below every anchor, and the only change: the total alone moved
    same_page(TaskFilter(), 5, 5)
    assert small_anchors["dropped"] == 1
    tasks.newer()  # above them: the ranks hold, the page moved down by one
    same_page(TaskFilter(), 4, 5)
    same_page(TaskFilter(), 4, 5)
    assert small_anchors["moved"] == 1 and small_anchors["anchored"] == 4


def test_a_deletion_matched_by_a_late_insert_is_caught(any_store, small_anchors):
    """The total alone cannot tell: one task gone, one arrived below the anchors. The change counter can."""
    alice, _ = accounts.create_user("alice")
    tasks = Tasks(random.Random(2), [alice.id])
    for _ in range(60):
        tasks.newer()
    same_page(TaskFilter(), 6, 5)
    same_page(TaskFilter(), 6, 5)
    assert small_anchors["anchored"] == 1
    Task.delete().where(Task.id == 100).execute()
    tasks.insert(5)
    same_page(TaskFilter(), 6, 5)
    assert small_anchors["dropped"] == 1


def test_status_listings_and_shallow_pages_never_use_anchors(any_store, small_anchors):
    alice, _ = accounts.create_user("alice")
    tasks = Tasks(random.Random(3), [alice.id])
    for _ in range(60):
        tasks.newer()
    for _ in range(2):
        same_page(TaskFilter(status="SUCCESS"), 5, 3)
        same_page(TaskFilter(), 2, 3)
    assert sum(small_anchors.values()) == 0


def test_the_change_counter_moves_on_deletions_and_identity_changes_only(any_store):
    """Every column a listing filters or orders on, except status, moves it when it changes."""
    alice, _ = accounts.create_user("alice")
    bob, _ = accounts.create_user("bob")
    tasks = Tasks(random.Random(4), [alice.id])

    def counter() -> int:
        return TaskChange.get_by_id(1).n

    before = counter()
    for _ in range(3):
        tasks.newer()
    Task.update(status="IN_PROGRESS", progress="5%", image_url="https://x/1.png", quota=7).where(Task.id == 2).execute()
    Task.update(channel_id=Task.channel_id, mj_id=Task.mj_id).where(Task.id == 2).execute()  # the same values
    assert counter() == before
    for change in ({Task.user_id: bob.id}, {Task.channel_id: 9}, {Task.mj_id: "other"}, {Task.action: "BLEND"},
                   {Task.submit_time: 5}, {Task.mode: "RELAX"}, {Task.id: 1001}):
        Task.update(change).where(Task.id == 4).execute()
        assert counter() > before, change
        before = counter()
        if Task.id in change:
            Task.update(id=4).where(Task.id == 1001).execute()
            before = counter()
    Task.delete().where(Task.id == 6).execute()
    assert counter() > before


def test_time_ranges_far_back_are_read_range_first_with_the_same_rows(any_store, monkeypatch):
    from mjctl import tasks as tasks_module

    monkeypatch.setattr(tasks_module, "RANGE_FIRST_FROM", 5)
    rng = random.Random(5)
    alice, _ = accounts.create_user("alice")
    Tasks(rng, [alice.id])
    rows = [dict(user_id=alice.id, channel_id=1 + i % 2, mj_id=f"r{i}", status="SUCCESS", progress="100%",
                 submit_time=BASE_TIME + i * 10 + rng.randint(-200, 200), unfinished=0) for i in range(120)]
    Task.insert_many(rows).execute()  # submit times follow the ids, loosely
    cases = [(TaskFilter(start=BASE_TIME, end=BASE_TIME + 300), True),
             (TaskFilter(channel_id=2, start=BASE_TIME + 200, end=BASE_TIME + 600), True),
             (TaskFilter(start=BASE_TIME + 1150), False),  # reaches the newest: walked from the top
             (TaskFilter(start=BASE_TIME + 1000, end=BASE_TIME + 1400), False),  # none submitted after it
             (TaskFilter(user_id=alice.id, start=BASE_TIME, end=BASE_TIME + 300), False)]
    for filters, by_range in cases:
        assert tasks_module.range_first(filters) is by_range, filters
        expected = [t.id for t in filters.where(Task.select()).order_by(Task.id.desc())]
        assert expected, filters
        for size in (1, 4):
            pages = [list_tasks(filters, n, size, anchored=False) for n in range(1, len(expected) // size + 2)]
            assert [row.id for page in pages for row in page.items] == expected, (filters, size)
            assert {page.total for page in pages} == {len(expected)}
