"""Each migration is the step it was. On every backend, four databases must end with the same tables,
columns (name, type, nullability, default) and indexes (name, columns, unique): one built by running every
step at once, one created at the first schema and upgraded one step at a time, one upgraded from a middle
version while holding rows, and one created straight from today's models, so that a model changed without
a migration fails here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import peewee
import pytest

from tests.helpers import temp_database

BACKENDS = ["sqlite", "postgres", "mysql"]
MIDDLE = 4  # the mid-way database: before the lease is dropped, ids made unique and the nonce added

Schema = dict[str, dict[str, dict]]


@contextlib.contextmanager
def empty_database(kind: str, tmp_path, name: str) -> Iterator[peewee.Database]:
    """An empty database of this kind, bound to the models (skips when the server's URL is not set)."""
    from mjctl.db import bind

    with (temp_database(kind) if kind != "sqlite" else contextlib.nullcontext(f"sqlite:///{tmp_path}/{name}.db")) \
            as url:
        yield bind(url)


def read_schema(db: peewee.Database) -> Schema:
    """table -> {"columns": name -> (type, nullable, default, extra), "indexes": name -> (columns, unique)}."""
    if isinstance(db, peewee.SqliteDatabase):
        tables = [row[0] for row in db.execute_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        columns = {table: {name: (kind.upper(), not notnull, default, f"pk{pk}" if pk else "")
                           for _, name, kind, notnull, default, pk in db.execute_sql(f'PRAGMA table_info("{table}")')}
                   for table in tables}
    else:
        if isinstance(db, peewee.PostgresqlDatabase):
            here = "current_schema()"
            kind = "data_type || COALESCE('(' || character_maximum_length::text || ')', '')"
            extra = "''"
        else:
            here, kind, extra = "DATABASE()", "column_type", "extra"
        tables = [row[0] for row in db.execute_sql(
            f"SELECT table_name FROM information_schema.tables WHERE table_schema = {here} "
            "AND table_type = 'BASE TABLE'")]
        columns = {table: {} for table in tables}
        for table, name, typ, nullable, default, more in db.execute_sql(
                f"SELECT table_name, column_name, {kind}, is_nullable, column_default, {extra} "
                f"FROM information_schema.columns WHERE table_schema = {here}"):
            columns[table][name] = (typ.upper(), nullable == "YES", default, more)
    return {table: {"columns": columns[table],
                    "indexes": {i.name: (tuple(i.columns), bool(i.unique)) for i in db.get_indexes(table)}}
            for table in tables}


def read_triggers(db: peewee.Database) -> set[tuple]:
    if isinstance(db, peewee.SqliteDatabase):
        return set(db.execute_sql("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"))
    here = "current_schema()" if isinstance(db, peewee.PostgresqlDatabase) else "DATABASE()"
    return set(db.execute_sql(
        "SELECT trigger_name, event_object_table, event_manipulation, action_statement "
        f"FROM information_schema.triggers WHERE trigger_schema = {here}"))


def differences(expected: Schema, actual: Schema) -> list[str]:
    """What actual lacks, adds or has otherwise than expected, one line each."""
    out = [f"table {table}: {'missing' if table in expected else 'unexpected'}"
           for table in sorted(expected.keys() ^ actual.keys())]
    for table in sorted(expected.keys() & actual.keys()):
        for part in ("columns", "indexes"):
            want, got = expected[table][part], actual[table][part]
            for name in sorted(want.keys() | got.keys()):
                if want.get(name) != got.get(name):
                    out.append(f"{table} {part[:-1] if part == 'columns' else 'index'} {name}: "
                               f"expected {want.get(name)}, found {got.get(name)}")
    return out


def models_schema(kind: str, tmp_path) -> Schema:
    """What today's peewee models declare, as this backend stores it."""
    from mjctl.models import ALL_MODELS

    with empty_database(kind, tmp_path, "models") as db:
        db.create_tables(ALL_MODELS)
        return read_schema(db)


@pytest.mark.parametrize("kind", BACKENDS)
def test_fresh_and_step_by_step_databases_are_todays_models(kind, tmp_path):
    from mjctl.db import MIGRATIONS, current_version, migrate

    versions = [version for version, _name, _fn in MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1)), "versions are numbered 1, 2, 3, … without gaps"
    expected = models_schema(kind, tmp_path)

    with empty_database(kind, tmp_path, "fresh") as db:
        assert migrate() == versions
        fresh, fresh_triggers = read_schema(db), read_triggers(db)
    with empty_database(kind, tmp_path, "steps") as db:
        for version in versions:
            assert migrate(upto=version) == [version] and current_version() == version
        steps, steps_triggers = read_schema(db), read_triggers(db)

    assert "nonce" in expected["task"]["columns"] and "lease" not in expected  # the models are today's
    assert not differences(expected, fresh), differences(expected, fresh)
    assert not differences(expected, steps), differences(expected, steps)
    assert fresh_triggers == steps_triggers and len(fresh_triggers) >= 1


def insert(table: str, **values) -> int | None:
    """A row written as the schema of its time has it (not through today's models); its new id, if any."""
    from mjctl.db import database

    rows = peewee.Table(table, ("id", *values)).bind(database.obj)
    rows.insert(**values).execute()
    return rows.select(peewee.fn.MAX(rows.id)).scalar() if table not in ("poll_claim", "lease") else None


def task_row(user_id: int, channel_id: int, mj_id: str) -> dict:
    """Every column of the task table as the first schema has it (none has a database default)."""
    texts = ("prompt", "prompt_en", "description", "state", "progress", "image_url", "video_url", "video_urls",
             "fail_reason", "buttons", "properties")
    return dict(user_id=user_id, channel_id=channel_id, mj_id=mj_id, action="IMAGINE", code=1, status="SUCCESS",
                submit_time=1_700_000_000, start_time=1_700_000_001, finish_time=1_700_000_002, quota=100,
                unfinished=0, updated_at=1_700_000_002.5, **{name: "" for name in texts})


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_mid_version_database_with_rows_upgrades_to_todays_schema(kind, tmp_path):
    from mjctl import db as store
    from mjctl.models import Ledger, Meta_, PollClaim, Reservation, Task, TaskCount, User
    from mjctl.tasks import shared_id_marker

    expected = models_schema(kind, tmp_path)
    with empty_database(kind, tmp_path, "fresh") as db:
        store.migrate()
        fresh_triggers = read_triggers(db)
    with empty_database(kind, tmp_path, "middle") as db:
        assert store.migrate(upto=MIDDLE) == list(range(1, MIDDLE + 1))
        user = insert("user", name="alice", role=1, enabled=True, quota=900, used_quota=100, created_at=1_700_000_000)
        insert("token", user_id=user, token_hash="h" * 64, hint="mj-abc", created_at=1_700_000_000)
        insert("channel", name="one", base_url="http://one", secret_sealed="", enabled=True, priority=0,
               created_at=1_700_000_000)
        older = insert("task", **task_row(user, 1, "1700000000000001"))
        newer = insert("task", **task_row(user, 1, "1700000000000001"))  # the same upstream id on one channel
        other = insert("task", **task_row(user, 2, "1700000000000001"))
        insert("ledger", user_id=user, task_id=older, kind="charge", amount=-100, balance_after=900, reason="",
               created_at=1_700_000_000.5)
        insert("reservation", user_id=user, amount=50, expires_at=1_700_000_100.0, created_at=1_700_000_000.0)
        insert("poll_claim", channel_id=1, holder="old", expires_at=1.0, polled_at=1.0, round_started_at=1.0)
        insert("lease", name="poller", holder="old", expires_at=1.0)

        assert store.migrate() == list(range(MIDDLE + 1, store.latest_version() + 1))
        upgraded, upgraded_triggers = read_schema(db), read_triggers(db)

        tasks = {t.id: t for t in Task.select()}
        assert {i: (t.channel_id, t.mj_id, t.nonce) for i, t in tasks.items()} == {
            older: (1, "1700000000000001", ""), newer: (1, f"1700000000000001~{newer}", ""),
            other: (2, "1700000000000001", "")}
        assert Meta_.get_or_none(Meta_.key == shared_id_marker("1700000000000001")) is not None
        assert {c.channel_id: c.n for c in TaskCount.select()} == {0: 3, 1: 2, 2: 1}
        alice = User.get_by_id(user)
        assert (alice.name, alice.quota, alice.used_quota, alice.enabled) == ("alice", 900, 100, True)
        assert [(r.kind, r.amount) for r in Ledger.select()] == [("charge", -100)]
        assert Reservation.select().count() == 1 and PollClaim.get_by_id(1).holder == "old"
        Task.create(user_id=user, channel_id=1, mj_id="1700000000000002", nonce="n" * 32)  # today's model writes
        assert TaskCount.get_by_id(0).n == 4

    assert not differences(expected, upgraded), differences(expected, upgraded)
    assert upgraded_triggers == fresh_triggers


def test_a_model_column_without_a_migration_is_seen(tmp_path):
    """The comparison is not blind: a column the models gained without a step shows up as a difference."""
    from mjctl.db import migrate
    from mjctl.models import ALL_MODELS, Task

    class TaskWithMore(Task):
        more = peewee.IntegerField(default=0)

        class Meta:
            table_name = "task"

    with empty_database("sqlite", tmp_path, "models") as db:
        db.create_tables([TaskWithMore if model is Task else model for model in ALL_MODELS])
        expected = read_schema(db)
    with empty_database("sqlite", tmp_path, "fresh") as db:
        migrate()
        fresh = read_schema(db)
    assert "task column more: expected ('INTEGER', False, None, ''), found None" in differences(expected, fresh)


def test_the_steps_never_read_todays_models(tmp_path, monkeypatch):
    """A step creates what it created in its day: give every model of mjctl.models a column no step adds,
    and a database built by the steps still has only the columns the models really declare."""
    import mjctl.models as models
    from mjctl.db import migrate

    expected = models_schema("sqlite", tmp_path)
    for model in models.ALL_MODELS:
        meta = type("Meta", (), {"table_name": model._meta.table_name})
        monkeypatch.setattr(models, model.__name__,
                            type(model.__name__, (model,), {"more": peewee.IntegerField(default=0), "Meta": meta}))
    monkeypatch.setattr(models, "ALL_MODELS", [getattr(models, model.__name__) for model in models.ALL_MODELS])
    with empty_database("sqlite", tmp_path, "fresh") as db:
        migrate()
        assert not differences(expected, read_schema(db)), differences(expected, read_schema(db))
