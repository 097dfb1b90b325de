"""The store on every backend: schema, money moves with a ledger, tokens, task listing and its indexes."""

from __future__ import annotations

import json
import threading
import time

import peewee
import pytest

from mjctl import accounts, channels, db
from mjctl.errors import Conflict, InsufficientQuota, NotFound, UsageError
from mjctl.models import Ledger, Task, Token, User
from mjctl.tasks import TaskFilter, list_tasks, page_envelope, task_item
from tests.books import assert_books, ledger_total


def make_task(user, channel_id=1, **fields):
    defaults = dict(user_id=user.id, channel_id=channel_id, mj_id=f"{time.time_ns()}", action="IMAGINE",
                    prompt="a cat", status="SUCCESS", progress="100%", submit_time=1_700_000_000, quota=100,
                    unfinished=0)
    defaults.update(fields)
    return Task.create(**defaults)


def test_migrations_are_idempotent(any_store):
    assert db.current_version() == db.latest_version()
    assert db.migrate() == []
    assert db.current_version() == db.latest_version()


def test_create_user_records_opening_balance_and_hashes_token(any_store):
    user, token = accounts.create_user("alice", quota=500)
    assert user.quota == 500 and user.used_quota == 0
    assert ledger_total("alice") == (1, 500)
    stored = Token.get(Token.user_id == user.id)
    assert token not in (stored.token_hash, stored.hint) and len(stored.token_hash) == 64
    assert accounts.authenticate(token).id == user.id
    assert accounts.authenticate(token + "x") is None
    assert accounts.authenticate("") is None


def test_duplicate_and_invalid_users_change_nothing(any_store):
    accounts.create_user("alice", quota=10)
    with pytest.raises(Conflict):
        accounts.create_user("alice", quota=99)
    for bad in [dict(name="", quota=1), dict(name="bad name", quota=1), dict(name="bob", quota=-1),
                dict(name="bob", quota="1.5"), dict(name="bob", role="god")]:
        with pytest.raises(UsageError):
            accounts.create_user(**bad)
    assert [u.name for u in User.select()] == ["alice"]
    assert Ledger.select().count() == 1


def test_charge_refund_and_topup_keep_the_books(any_store):
    user, _ = accounts.create_user("alice", quota=1000)
    with db.write_tx():
        accounts.charge(user.id, 300, task_id=None, reason="imagine")
    with db.write_tx():
        accounts.refund(user.id, 300, task_id=None, reason="failed")
    with db.write_tx():
        accounts.charge(user.id, 200, task_id=None, reason="imagine")
    accounts.topup("alice", 50)
    user = User.get_by_id(user.id)
    assert user.quota == 850 and user.used_quota == 200
    assert_books()


def test_charge_beyond_balance_is_refused_and_changes_nothing(any_store):
    user, _ = accounts.create_user("alice", quota=100)
    with pytest.raises(InsufficientQuota):
        with db.write_tx():
            accounts.charge(user.id, 101, task_id=None, reason="imagine")
    user = User.get_by_id(user.id)
    assert user.quota == 100 and user.used_quota == 0 and Ledger.select().count() == 1


def test_set_quota_is_an_adjustment_in_the_ledger(any_store):
    accounts.create_user("alice", quota=100)
    user = accounts.set_user("alice", quota=40, role="admin", enabled=False)
    assert (user.quota, user.role, user.enabled) == (40, 10, False)
    assert ledger_total("alice") == (2, 40)
    with pytest.raises(NotFound):
        accounts.set_user("nobody", quota=1)


def test_revoked_tokens_stop_working(any_store):
    user, token = accounts.create_user("alice")
    second = accounts.issue_token("alice")
    assert accounts.authenticate(second).id == user.id
    assert accounts.revoke_tokens("alice") == 2
    assert accounts.authenticate(token) is None and accounts.authenticate(second) is None


def test_channel_secret_is_sealed_at_rest(any_store):
    channel = channels.add_channel(any_store, "up1", "http://127.0.0.1:9/", "s3cret-value", priority=5)
    row = channels.get_channel("up1")
    assert "s3cret-value" not in row.secret_sealed
    assert channels.channel_secret(any_store, row) == "s3cret-value"
    assert channel.base_url == "http://127.0.0.1:9"
    with pytest.raises(Conflict):
        channels.add_channel(any_store, "up1", "http://x", "s")
    with pytest.raises(UsageError):
        channels.add_channel(any_store, "up2", "not a url", "s")
    channels.set_enabled("up1", False)
    assert channels.list_channels(enabled_only=True) == []
    channels.remove_channel("up1")
    with pytest.raises(NotFound):
        channels.get_channel("up1")


def test_list_tasks_filters_pages_and_orders_newest_first(any_store):
    alice, _ = accounts.create_user("alice")
    bob, _ = accounts.create_user("bob")
    for i in range(25):
        make_task(alice, channel_id=1 + i % 2, mj_id=f"a{i}", submit_time=1_700_000_000 + i)
    make_task(bob, mj_id="b0", status="FAILURE", action="UPSCALE")
    page = list_tasks(TaskFilter(user_id=alice.id), 1, 10)
    assert page.total == 25 and [t.mj_id for t in page.items][:2] == ["a24", "a23"]
    last = list_tasks(TaskFilter(user_id=alice.id), 3, 10)
    assert len(last.items) == 5 and last.total == 25
    past = list_tasks(TaskFilter(user_id=alice.id), 4, 10)
    assert past.items == [] and past.total == 25
    assert list_tasks(TaskFilter(user_id=alice.id, mj_id="b0")).total == 0
    assert list_tasks(TaskFilter(channel_id=2)).total == 12
    ranged = list_tasks(TaskFilter(start=1_700_000_010, end=1_700_000_014))
    assert sorted(t.mj_id for t in ranged.items) == [f"a{i}" for i in range(10, 15)]
    assert list_tasks(TaskFilter(status="FAILURE", action="UPSCALE")).total == 1
    assert list_tasks(TaskFilter(), 1, 1000).page_size == 100
    with pytest.raises(UsageError):
        list_tasks(TaskFilter(), 0, 10)


def test_later_pages_are_exactly_the_matches_in_order_on_every_filter(any_store):
    """Pages after the first choose their ids first (a deferred join); they must be the plain query's rows."""
    alice, _ = accounts.create_user("alice")
    bob, _ = accounts.create_user("bob")
    for i in range(23):
        make_task(alice if i % 3 else bob, channel_id=1 + i % 2, mj_id=f"t{i}", submit_time=1_700_000_000 + i,
                  status="SUCCESS" if i % 4 else "FAILURE", quota=i)
    Task.delete().where(Task.mj_id == "t7").execute()  # a gap in the ids
    for filters in (TaskFilter(), TaskFilter(user_id=alice.id), TaskFilter(channel_id=2), TaskFilter(status="SUCCESS"),
                    TaskFilter(user_id=alice.id, start=1_700_000_003, end=1_700_000_020)):
        expected = [t.id for t in filters.where(Task.select()).order_by(Task.id.desc())]
        for size in (1, 3, 5):
            pages = [list_tasks(filters, n, size) for n in range(1, len(expected) // size + 3)]
            assert [t.id for page in pages for t in page.items] == expected, (filters, size)
            assert all(page.total == len(expected) for page in pages)
            assert all(t.quota == Task.get_by_id(t.id).quota for t in pages[1].items)


def test_task_item_shapes(any_store):
    alice, _ = accounts.create_user("alice")
    task = make_task(alice, video_urls='["https://v/1.mp4"]')
    user_item = task_item(task, admin=False)
    assert "user_id" not in user_item and "channel_id" not in user_item
    assert set(user_item) == {"id", "mj_id", "action", "prompt", "prompt_en", "status", "progress", "image_url",
                              "video_url", "video_urls", "submit_time", "start_time", "finish_time", "fail_reason",
                              "quota"}
    admin_item = task_item(task, admin=True)
    assert admin_item["user_id"] == alice.id and admin_item["channel_id"] == 1
    assert isinstance(admin_item["video_urls"], str) and admin_item["start_time"] == 0


def test_listing_items_are_the_one_item_shape(any_store):
    """page_envelope builds listing items straight from row tuples; they must equal task_item's, field for
    field and in the document's order, for users and admins, with image URLs rewritten only where set."""
    alice, _ = accounts.create_user("alice")
    make_task(alice, mj_id="with-image", image_url="https://cdn/1.png", video_urls='["https://v/1.mp4"]',
              submit_time=1_700_000_000, start_time=1_700_000_001, finish_time=1_700_000_002, quota=7)
    make_task(alice, mj_id="no-image", prompt="ünïcode", fail_reason="boom", status="FAILURE")

    from mjctl.images.urls import ResultLinks

    forwarded = ResultLinks("https://mjctl", b"secret")
    page = list_tasks(TaskFilter(user_id=alice.id))
    for admin in (False, True):
        for image_url in (None, forwarded):
            items = page_envelope(page, admin=admin, image_url=image_url)["items"]
            expected = [task_item(Task.get_by_id(row.id), admin=admin, image_url=image_url) for row in page.items]
            assert items == expected
            assert [list(item) for item in items] == [list(item) for item in expected]
    no_image, with_image = page_envelope(page, admin=False, image_url=forwarded)["items"]
    assert with_image["image_url"].startswith("https://mjctl/mj/image/with-image?t=") and no_image["image_url"] == ""
    assert json.loads(with_image["video_urls"])[0].startswith("https://mjctl/mj/video/with-image?t=")
    assert no_image["video_urls"] == ""


def test_unfinished_lookup_uses_an_index(store):
    """The poller's question "which tasks are unfinished?" must be an index seek, never a scan."""
    plan = " ".join(str(r) for r in db.database.execute_sql(
        "EXPLAIN QUERY PLAN SELECT id FROM task WHERE unfinished = 1 AND channel_id = 3").fetchall())
    assert "USING" in plan and "INDEX" in plan and "SCAN task" not in plan.replace("USING INDEX", "")
    for sql in ("SELECT id FROM task WHERE user_id = 5 ORDER BY id DESC LIMIT 20",
                "SELECT id FROM task WHERE mj_id = 'x'",
                "SELECT id FROM task WHERE channel_id = 2 ORDER BY id DESC LIMIT 20",
                "SELECT id FROM task WHERE submit_time BETWEEN 1 AND 2"):
        plan = " ".join(str(r) for r in db.database.execute_sql("EXPLAIN QUERY PLAN " + sql).fetchall())
        assert "INDEX" in plan, (sql, plan)


def test_concurrent_charges_never_overdraw(store, tmp_path):
    """Two writers (threads, each with its own connection) race on one balance; it never goes negative."""
    user, _ = accounts.create_user("alice", quota=1000)
    results = []

    def worker():
        for _ in range(10):
            try:
                with db.write_tx():
                    accounts.charge(user.id, 70, task_id=None, reason="race")
                results.append(True)
            except InsufficientQuota:
                results.append(False)
        db.database.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    user = User.get_by_id(user.id)
    assert results.count(True) == 1000 // 70
    assert user.quota == 1000 - 70 * (1000 // 70) and user.quota >= 0
    assert_books()


def test_two_processes_can_migrate_at_once(tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path}/race.db"
    code = f"from mjctl.db import bind, migrate; bind({url!r}); migrate()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    db.bind(url)
    assert db.current_version() == db.latest_version()
    assert db.migrate() == []


def test_trigger_kept_counts_match_real_counts(any_store):
    from mjctl.models import TaskCount
    from mjctl.tasks import count_tasks

    alice, _ = accounts.create_user("alice")
    for i in range(7):
        make_task(alice, channel_id=1 + i % 3, mj_id=f"t{i}")
    make_task(alice, channel_id=0, mj_id="no-channel")
    Task.delete().where(Task.mj_id == "t0").execute()
    assert count_tasks(TaskFilter()) == Task.select().count() == 7
    for channel in (1, 2, 3):
        assert count_tasks(TaskFilter(channel_id=channel)) == Task.select().where(Task.channel_id == channel).count()
    assert count_tasks(TaskFilter(channel_id=0)) == 1
    assert TaskCount.get_by_id(0).n == 7


def test_retry_transaction_runs_again_after_a_conflict(store):
    attempts = []

    def flaky():
        attempts.append(1)
        with db.write_tx():
            User.create(name=f"u{len(attempts)}")
            if len(attempts) < 3:
                raise peewee.OperationalError("Deadlock found when trying to get lock")
        return len(attempts)

    assert db.retry_transaction(flaky) == 3
    assert [u.name for u in User.select()] == ["u3"]  # the failed attempts were rolled back whole
    with pytest.raises(peewee.OperationalError):
        db.retry_transaction(lambda: (_ for _ in ()).throw(peewee.OperationalError("still locked")), attempts=2)


def test_the_pool_is_sized_to_the_threads_unless_configured(tmp_path, monkeypatch):
    """A request keeps its connection to the end (relay calls to the upstream included): the default pool
    has one for every server thread and poller worker, so slow submissions cannot starve the API."""
    from mjctl.config import load_settings
    from mjctl.errors import ConfigError

    url = "postgresql://nobody@127.0.0.1:1/unused"  # never connected: the pool is only configured
    default = db.make_database(url, load_settings(None, {}))
    assert default._max_connections == 16 + 4 + 2
    wide = db.make_database(url, load_settings(None, {("server", "threads"): 40, ("poller", "concurrency"): 8}))
    assert wide._max_connections == 40 + 8 + 2
    fixed = db.make_database(url, load_settings(None, {("database", "pool_size"): 5, ("server", "threads"): 40}))
    assert fixed._max_connections == 5
    monkeypatch.setenv("MJCTL_DATABASE_POOL_SIZE", "-1")
    with pytest.raises(ConfigError, match="pool_size"):
        load_settings(None, {})


def test_the_old_poller_lease_table_is_dropped_on_upgrade(any_store):
    """Migration 5 removes the single poller lease of stores created before the per-channel claims."""
    from mjctl.models import SchemaVersion

    db.database.execute_sql("CREATE TABLE lease (name VARCHAR(64) PRIMARY KEY, holder VARCHAR(128), expires_at REAL)")
    SchemaVersion.delete().where(SchemaVersion.version >= 5).execute()
    assert db.current_version() == 4
    assert db.migrate() == list(range(5, db.latest_version() + 1))  # the later ones run again, harmlessly
    assert "lease" not in db.database.get_tables()
    assert db.migrate() == []
