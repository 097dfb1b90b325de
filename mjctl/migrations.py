"""The numbered schema steps, each frozen as the step it was.

A step never reads the live classes of :mod:`mjctl.models`: those describe today's schema, and a step run
against a database of its own time must create exactly what it created then, whatever the models
declare. So each step declares the tables it makes as snapshots defined inside it (peewee models bound to the
database being migrated, with only what reaches the DDL: column types, NULL, database defaults, indexes)
or as explicit SQL. A database built by running every step in order has the same tables, columns and
indexes as today's models declare; ``tests/test_migrations.py`` checks that on every backend.

A change to the models therefore comes with a new step: ``@migration(N, "what it adds")`` on a function
taking the database, adding to the schema of step N-1 exactly what the models gained (see
docs/architecture.md). :func:`mjctl.db.migrate` applies each step in its own write transaction together
with the row recording it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import peewee
from peewee import (
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DoubleField,
    IntegerField,
    TextField,
)

log = logging.getLogger("mjctl.db")

MIGRATIONS: list[tuple[int, str, Callable[[peewee.Database], None]]] = []


def migration(version: int, name: str):
    """Register fn as schema step `version`; the steps run in version order."""

    def register(fn):
        MIGRATIONS.append((version, name, fn))
        MIGRATIONS.sort(key=lambda m: m[0])
        return fn

    return register


def frozen_table(db: peewee.Database, table_name: str, *, indexes: tuple = (), **columns: peewee.Field) -> Any:
    """A snapshot of one table as a step knows it: a peewee model bound to db with these columns, in this
    order. Only what reaches the DDL is declared (types, NULL, uniqueness, indexes, database defaults);
    Python-side defaults belong to the live models."""
    meta = type("Meta", (), {"database": db, "table_name": table_name, "indexes": indexes,
                             "legacy_table_names": False})
    return type(f"Frozen_{table_name}", (peewee.Model,), {"Meta": meta, **columns})


def create_version_table(db: peewee.Database) -> None:
    """mjctl_schema, the record of applied steps (``mjctl.models.SchemaVersion`` reads and writes it)."""
    db.create_tables([frozen_table(db, "mjctl_schema", version=IntegerField(primary_key=True),
                                   applied_at=BigIntegerField())], safe=True)


def _meta_table(db: peewee.Database) -> Any:
    """mjctl_meta, key/value facts about the database, as step 1 created it."""
    return frozen_table(db, "mjctl_meta", key=CharField(max_length=64, primary_key=True), value=TextField())


@migration(1, "initial schema")
def _m1_initial(db: peewee.Database) -> None:
    user = frozen_table(
        db, "user", id=AutoField(), name=CharField(max_length=64, unique=True), role=IntegerField(),
        enabled=BooleanField(), quota=BigIntegerField(), used_quota=BigIntegerField(), created_at=BigIntegerField())
    token = frozen_table(
        db, "token", id=AutoField(), user_id=IntegerField(index=True), token_hash=CharField(max_length=64, unique=True),
        hint=CharField(max_length=16), created_at=BigIntegerField())
    channel = frozen_table(
        db, "channel", id=AutoField(), name=CharField(max_length=64, unique=True), base_url=CharField(max_length=512),
        secret_sealed=TextField(), enabled=BooleanField(), priority=IntegerField(), created_at=BigIntegerField())
    task = frozen_table(
        db, "task", id=AutoField(), user_id=IntegerField(), channel_id=IntegerField(), mj_id=CharField(max_length=64),
        action=CharField(max_length=32), prompt=TextField(), prompt_en=TextField(), description=TextField(),
        state=TextField(), code=IntegerField(), status=CharField(max_length=20), progress=CharField(max_length=32),
        image_url=TextField(), video_url=TextField(), video_urls=TextField(), submit_time=BigIntegerField(),
        start_time=BigIntegerField(), finish_time=BigIntegerField(), fail_reason=TextField(),
        quota=BigIntegerField(), buttons=TextField(), properties=TextField(), unfinished=IntegerField(),
        updated_at=DoubleField(),
        indexes=((("user_id", "id"), False), (("user_id", "submit_time"), False), (("channel_id", "id"), False),
                 (("mj_id",), False), (("submit_time",), False), (("unfinished", "channel_id"), False),
                 (("status", "id"), False), (("action", "id"), False)))
    ledger = frozen_table(
        db, "ledger", id=AutoField(), user_id=IntegerField(index=True), task_id=IntegerField(null=True, index=True),
        kind=CharField(max_length=16), amount=BigIntegerField(), balance_after=BigIntegerField(), reason=TextField(),
        created_at=DoubleField())
    lease = frozen_table(db, "lease", name=CharField(max_length=64, primary_key=True),
                         holder=CharField(max_length=128), expires_at=DoubleField())
    db.create_tables([_meta_table(db), user, token, channel, task, ledger, lease], safe=True)


@migration(2, "exact task counts per channel, kept by triggers")
def _m2_task_counts(db: peewee.Database) -> None:
    task_count = frozen_table(db, "task_count", channel_id=IntegerField(primary_key=True), n=BigIntegerField())
    db.create_tables([task_count], safe=True)
    db.execute_sql("DELETE FROM task_count")
    db.execute_sql("INSERT INTO task_count (channel_id, n) SELECT 0, COUNT(*) FROM task")
    db.execute_sql("INSERT INTO task_count (channel_id, n) SELECT channel_id, COUNT(*) FROM task "
                   "WHERE channel_id <> 0 GROUP BY channel_id")
    if isinstance(db, peewee.SqliteDatabase):
        db.execute_sql(
            "CREATE TRIGGER IF NOT EXISTS task_count_insert AFTER INSERT ON task BEGIN "
            "INSERT OR IGNORE INTO task_count (channel_id, n) VALUES (0, 0), (NEW.channel_id, 0); "
            "UPDATE task_count SET n = n + 1 WHERE channel_id IN (0, NEW.channel_id); END")
        db.execute_sql(
            "CREATE TRIGGER IF NOT EXISTS task_count_delete AFTER DELETE ON task BEGIN "
            "UPDATE task_count SET n = n - 1 WHERE channel_id IN (0, OLD.channel_id); END")
    elif isinstance(db, peewee.PostgresqlDatabase):
        db.execute_sql(
            "CREATE OR REPLACE FUNCTION mjctl_task_count() RETURNS trigger AS $$ BEGIN "
            "IF TG_OP = 'INSERT' THEN "
            "INSERT INTO task_count (channel_id, n) VALUES (0, 1) "
            "ON CONFLICT (channel_id) DO UPDATE SET n = task_count.n + 1; "
            "IF NEW.channel_id <> 0 THEN INSERT INTO task_count (channel_id, n) VALUES (NEW.channel_id, 1) "
            "ON CONFLICT (channel_id) DO UPDATE SET n = task_count.n + 1; END IF; RETURN NEW; "
            "ELSE UPDATE task_count SET n = n - 1 WHERE channel_id IN (0, OLD.channel_id); RETURN OLD; END IF; "
            "END $$ LANGUAGE plpgsql")
        db.execute_sql("DROP TRIGGER IF EXISTS task_count_trigger ON task")
        db.execute_sql("CREATE TRIGGER task_count_trigger AFTER INSERT OR DELETE ON task "
                       "FOR EACH ROW EXECUTE FUNCTION mjctl_task_count()")
    else:
        db.execute_sql("DROP TRIGGER IF EXISTS task_count_insert")
        db.execute_sql(
            "CREATE TRIGGER task_count_insert AFTER INSERT ON task FOR EACH ROW BEGIN "
            "INSERT INTO task_count (channel_id, n) VALUES (0, 1) ON DUPLICATE KEY UPDATE n = n + 1; "
            "IF NEW.channel_id <> 0 THEN INSERT INTO task_count (channel_id, n) VALUES (NEW.channel_id, 1) "
            "ON DUPLICATE KEY UPDATE n = n + 1; END IF; END")
        db.execute_sql("DROP TRIGGER IF EXISTS task_count_delete")
        db.execute_sql(
            "CREATE TRIGGER task_count_delete AFTER DELETE ON task FOR EACH ROW "
            "UPDATE task_count SET n = n - 1 WHERE channel_id IN (0, OLD.channel_id)")


@migration(3, "quota reservations held while a submission is relayed")
def _m3_reservations(db: peewee.Database) -> None:
    db.create_tables([frozen_table(db, "reservation", id=AutoField(), user_id=IntegerField(index=True),
                                   amount=BigIntegerField(), expires_at=DoubleField(), created_at=DoubleField())],
                     safe=True)


@migration(4, "per-channel poll claims, so several pollers share a cycle's work")
def _m4_poll_claims(db: peewee.Database) -> None:
    db.create_tables([frozen_table(db, "poll_claim", channel_id=IntegerField(primary_key=True),
                                   holder=CharField(max_length=128), expires_at=DoubleField(),
                                   polled_at=DoubleField(), round_started_at=DoubleField())], safe=True)


@migration(5, "drop the single poller lease, replaced by the per-channel claims of migration 4")
def _m5_drop_lease(db: peewee.Database) -> None:
    db.execute_sql('DROP TABLE IF EXISTS lease')


#: The unique index of migration 6, named as peewee names the model's (channel_id, mj_id) index.
TASK_IDENTITY_INDEX = "task_channel_id_mj_id"
MJ_ID_CHARS = 64  # task.mj_id


@migration(6, "a task is (channel, upstream id): unique (channel_id, mj_id)")
def _m6_task_identity(db: peewee.Database) -> None:
    """Make (channel_id, mj_id) unique, keeping every row.

    An upstream's task id is unique only among that upstream's tasks, and without this index nothing stops one
    channel from holding two tasks with the same id (an upstream repeating an id). Such rows are all kept: on each
    channel the oldest keeps its mj_id and every newer one is renamed ``<mj_id>~<row id>``, the original
    part cut short so that the whole fits 64 characters. Upstream ids are digits and row ids are unique, so
    a renamed id meets no other; should one be taken all the same, ``.<n>`` is added until it is free. How
    many were renamed is logged as a warning, and each shared id is recorded in mjctl_meta
    (``mjctl.tasks.shared_id_marker``): what named a task by that id alone (a legacy image link, a file
    cached under the id) cannot say which of the tasks it was for, and must not be taken for the one
    left with the id. A renamed task is no longer known to its upstream under its new id: the image it
    already has stays (its image_url is untouched), and one still unfinished times out and is refunded
    after ``[poller] task_timeout``, like any task an upstream forgot.

    The index is this migration's one DDL statement, after the renames: MySQL commits DDL at once, and a
    run interrupted before it is recorded finds nothing left to rename and only creates the index. The
    plain mj_id index stays, for lookups by the upstream's id alone."""
    from mjctl.tasks import shared_id_marker

    # the columns of task this step reads and writes
    task = frozen_table(db, "task", id=AutoField(), channel_id=IntegerField(), mj_id=CharField(max_length=64),
                    updated_at=DoubleField())
    meta = _meta_table(db)
    groups = list(task.select(task.channel_id, task.mj_id).group_by(task.channel_id, task.mj_id)
                  .having(peewee.fn.COUNT(task.id) > 1).tuples())
    renamed = 0
    for channel_id, mj_id in groups:
        same = (task.channel_id == channel_id) & (task.mj_id == mj_id)
        row_ids = [row_id for (row_id,) in task.select(task.id).where(same).order_by(task.id).tuples()]
        for row_id in row_ids[1:]:
            fresh = _free_duplicate_id(task, channel_id, mj_id, row_id)
            task.update(mj_id=fresh, updated_at=time.time()).where(task.id == row_id).execute()
            renamed += 1
        marker = shared_id_marker(mj_id)
        if not meta.select(meta.key).where(meta.key == marker).exists():
            meta.insert(key=marker, value=json.dumps({"mj_id": mj_id, "rows": row_ids})).execute()
    if renamed:
        log.warning("migration 6: %d task(s) shared their upstream id with an older task on the same channel; "
                    "each was renamed <upstream id>~<row id> (%d id(s) affected)", renamed, len(groups))
    if TASK_IDENTITY_INDEX not in {index.name for index in db.get_indexes("task")}:
        db.execute_sql(f"CREATE UNIQUE INDEX {TASK_IDENTITY_INDEX} ON task (channel_id, mj_id)")


def _free_duplicate_id(task: Any, channel_id: int, mj_id: str, row_id: int) -> str:
    """``<mj_id>~<row id>`` cut to MJ_ID_CHARS, with ``.<n>`` added while the channel already has it."""
    n = 0
    while True:
        suffix = f"~{row_id}" + (f".{n}" if n else "")
        candidate = mj_id[:MJ_ID_CHARS - len(suffix)] + suffix
        same = (task.channel_id == channel_id) & (task.mj_id == candidate)
        if not task.select(task.id).where(same).exists():
            return candidate
        n += 1


@migration(7, "per-submission notify links and write-ahead records of submissions in flight")
def _m7_write_ahead(db: peewee.Database) -> None:
    """Each step checks first, so a migration interrupted half-way (MySQL commits each DDL at once)
    runs again cleanly. The column is added with a constant default, which PostgreSQL 11+, MariaDB 10.3+
    and SQLite apply without rewriting the task table."""
    pending = frozen_table(
        db, "pending_submission", id=AutoField(), nonce=CharField(max_length=32, unique=True), user_id=IntegerField(),
        kind=CharField(max_length=16), action=CharField(max_length=32), price=BigIntegerField(),
        reservation_id=IntegerField(null=True), channel_ids=CharField(max_length=255),
        parent_task_id=IntegerField(null=True), state=TextField(), prompt=TextField(), properties=TextField(),
        created_at=DoubleField(), expires_at=DoubleField(index=True))
    if "nonce" not in {c.name for c in db.get_columns("task")}:
        db.execute_sql("ALTER TABLE task ADD COLUMN nonce VARCHAR(32) NOT NULL DEFAULT ''")
    db.create_tables([pending], safe=True)


@migration(8, "the poller's memo of unchanged reports on each task, voided by any write of the row")
def _m8_report_memo(db: peewee.Database) -> None:
    """Two columns on task, as they are at this step, and a trigger on each database that moves updated_at
    (the row version the memo is checked against) on any update that moves neither updated_at nor the
    memo itself — a hand edit in SQL, say — so that no write leaves a memo standing. Each step checks
    first or replaces, so a run interrupted half-way (MySQL commits each DDL at once) runs again cleanly;
    the columns come with constant defaults, added without rewriting the table (as in migration 7)."""
    if isinstance(db, peewee.PostgresqlDatabase):
        real = "DOUBLE PRECISION"
    elif isinstance(db, peewee.SqliteDatabase):
        real = "REAL"
    else:
        real = "DOUBLE"
    columns = {c.name for c in db.get_columns("task")}
    if "memo_digest" not in columns:
        db.execute_sql("ALTER TABLE task ADD COLUMN memo_digest VARCHAR(32) NOT NULL DEFAULT ''")
    if "memo_version" not in columns:
        db.execute_sql(f"ALTER TABLE task ADD COLUMN memo_version {real} NOT NULL DEFAULT 0")
    if isinstance(db, peewee.SqliteDatabase):
        db.execute_sql("DROP TRIGGER IF EXISTS task_version")
        db.execute_sql(
            "CREATE TRIGGER task_version AFTER UPDATE ON task FOR EACH ROW "
            "WHEN NEW.updated_at IS OLD.updated_at AND NEW.memo_digest IS OLD.memo_digest "
            "AND NEW.memo_version IS OLD.memo_version BEGIN "
            "UPDATE task SET updated_at = max((julianday('now') - 2440587.5) * 86400.0, OLD.updated_at + 0.000001) "
            "WHERE id = NEW.id; END")
    elif isinstance(db, peewee.PostgresqlDatabase):
        db.execute_sql(
            "CREATE OR REPLACE FUNCTION mjctl_task_version() RETURNS trigger AS $$ BEGIN "
            "IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at "
            "AND NEW.memo_digest IS NOT DISTINCT FROM OLD.memo_digest "
            "AND NEW.memo_version IS NOT DISTINCT FROM OLD.memo_version THEN "
            "NEW.updated_at := GREATEST(EXTRACT(EPOCH FROM clock_timestamp())::double precision, "
            "OLD.updated_at + 0.000001); END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
        db.execute_sql("DROP TRIGGER IF EXISTS task_version ON task")
        db.execute_sql("CREATE TRIGGER task_version BEFORE UPDATE ON task "
                       "FOR EACH ROW EXECUTE FUNCTION mjctl_task_version()")
    else:
        db.execute_sql("DROP TRIGGER IF EXISTS task_version")
        db.execute_sql(
            "CREATE TRIGGER task_version BEFORE UPDATE ON task FOR EACH ROW BEGIN "
            "IF NEW.updated_at <=> OLD.updated_at AND NEW.memo_digest <=> OLD.memo_digest "
            "AND NEW.memo_version <=> OLD.memo_version THEN "
            "SET NEW.updated_at = GREATEST(UNIX_TIMESTAMP(NOW(6)), OLD.updated_at + 0.000001); END IF; END")

@migration(9, "task kinds: each task's generation mode, and each channel's health")
def _m9_modes_and_health(db: peewee.Database) -> None:
    """Columns added with constant defaults (no table rewrite), each only when missing, so an interrupted
    step runs again cleanly."""
    double = {peewee.SqliteDatabase: "REAL", peewee.PostgresqlDatabase: "DOUBLE PRECISION"}
    kind = next((name for cls, name in double.items() if isinstance(db, cls)), "DOUBLE")
    added = {
        "task": ("mode VARCHAR(16) NOT NULL DEFAULT ''",),
        "pending_submission": ("mode VARCHAR(16) NOT NULL DEFAULT ''",),
        "channel": (f"cooldown_until {kind} NOT NULL DEFAULT 0", "health_reason VARCHAR(255) NOT NULL DEFAULT ''"),
    }
    for table, columns in added.items():
        present = {c.name for c in db.get_columns(table)}
        for column in columns:
            if column.split()[0] not in present:
                db.execute_sql(f"ALTER TABLE {table} ADD COLUMN {column}")


@migration(10, "quota refunded per task, kept by a trigger on the ledger, for statistics and metrics")
def _m10_refund_tally(db: peewee.Database) -> None:
    """Add task.quota_refunded: the sum of the task's refund ledger entries, so that the quota charged for
    a set of tasks (quota + quota_refunded; a refund sets quota to 0) and what was given back are read in
    the one scan that counts them, with no join against the ledger.

    A trigger on ledger inserts keeps it: a refund is written in the transaction that fails the task, which
    already holds that task's row, so the trigger takes no new lock. The column comes first, then the
    trigger, then the backfill, which sets each refunded task to the sum of its entries (absolute, not
    added): every step can run again after an interruption (MySQL commits each DDL at once) and a refund
    written meanwhile is counted once."""
    if "quota_refunded" not in {c.name for c in db.get_columns("task")}:
        kind = "INTEGER" if isinstance(db, peewee.SqliteDatabase) else "BIGINT"  # peewee's big integer, each
        db.execute_sql(f"ALTER TABLE task ADD COLUMN quota_refunded {kind} NOT NULL DEFAULT 0")
    if isinstance(db, peewee.SqliteDatabase):
        db.execute_sql(
            "CREATE TRIGGER IF NOT EXISTS ledger_refund_tally AFTER INSERT ON ledger "
            "WHEN NEW.kind = 'refund' AND NEW.task_id IS NOT NULL BEGIN "
            "UPDATE task SET quota_refunded = quota_refunded + NEW.amount WHERE id = NEW.task_id; END")
    elif isinstance(db, peewee.PostgresqlDatabase):
        db.execute_sql(
            "CREATE OR REPLACE FUNCTION mjctl_refund_tally() RETURNS trigger AS $$ BEGIN "
            "UPDATE task SET quota_refunded = quota_refunded + NEW.amount WHERE id = NEW.task_id; "
            "RETURN NEW; END $$ LANGUAGE plpgsql")
        db.execute_sql("DROP TRIGGER IF EXISTS ledger_refund_tally ON ledger")
        db.execute_sql("CREATE TRIGGER ledger_refund_tally AFTER INSERT ON ledger FOR EACH ROW "
                       "WHEN (NEW.kind = 'refund' AND NEW.task_id IS NOT NULL) EXECUTE FUNCTION mjctl_refund_tally()")
    else:
        db.execute_sql("DROP TRIGGER IF EXISTS ledger_refund_tally")
        db.execute_sql(
            "CREATE TRIGGER ledger_refund_tally AFTER INSERT ON ledger FOR EACH ROW BEGIN "
            "IF NEW.kind = 'refund' AND NEW.task_id IS NOT NULL THEN "
            "UPDATE task SET quota_refunded = quota_refunded + NEW.amount WHERE id = NEW.task_id; END IF; END")
    if isinstance(db, peewee.PostgresqlDatabase) and int(db.server_version or 0) >= 140000:
        # Statistics on the day and hour buckets GROUP BY uses (mjctl.stats): without them the planner takes
        # every row for its own group and sorts them all (on disk) instead of hashing ~100 groups, 2.5x the
        # time on a million tasks. Statistics cost nothing on writes; ANALYZE fills them.
        db.execute_sql("CREATE STATISTICS IF NOT EXISTS task_bucket_stats ON (submit_time / 86400), "
                       "(submit_time / 3600) FROM task")
        db.execute_sql("ANALYZE task")
    db.execute_sql(
        "UPDATE task SET quota_refunded = (SELECT COALESCE(SUM(refund.amount), 0) FROM ledger refund "
        "WHERE refund.task_id = task.id AND refund.kind = 'refund') "
        "WHERE id IN (SELECT task_id FROM ledger WHERE kind = 'refund' AND task_id IS NOT NULL)")


@migration(11, "a counter of task deletions and identity changes, for deep-page anchors")
def _m11_task_change(db: peewee.Database) -> None:
    """Create task_change (one row, id 1) and the triggers raising it: on every deleted task, and on an
    update that changes a column a listing filters or orders on. Inserts and status or progress updates do
    not touch it.

    Every step is safe to run again (MySQL commits each DDL at once)."""
    db.create_tables([frozen_table(db, "task_change", id=IntegerField(primary_key=True), n=BigIntegerField())],
                     safe=True)
    columns = ("id", "user_id", "channel_id", "mj_id", "action", "submit_time", "mode")
    bump = "UPDATE task_change SET n = n + 1 WHERE id = 1"
    if isinstance(db, peewee.SqliteDatabase):
        db.execute_sql("INSERT OR IGNORE INTO task_change (id, n) VALUES (1, 0)")
        db.execute_sql(f"CREATE TRIGGER IF NOT EXISTS task_change_delete AFTER DELETE ON task BEGIN {bump}; END")
        changed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in columns)
        db.execute_sql(f"CREATE TRIGGER IF NOT EXISTS task_change_update AFTER UPDATE OF {', '.join(columns)} "
                       f"ON task WHEN {changed} BEGIN {bump}; END")
    elif isinstance(db, peewee.PostgresqlDatabase):
        db.execute_sql("INSERT INTO task_change (id, n) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
        db.execute_sql(f"CREATE OR REPLACE FUNCTION mjctl_task_change() RETURNS trigger AS $$ BEGIN {bump}; "
                       "RETURN NULL; END $$ LANGUAGE plpgsql")
        # Once per statement for deletions (and TRUNCATE, which fires no row trigger).
        db.execute_sql("DROP TRIGGER IF EXISTS task_change_delete ON task")
        db.execute_sql("CREATE TRIGGER task_change_delete AFTER DELETE OR TRUNCATE ON task "
                       "FOR EACH STATEMENT EXECUTE FUNCTION mjctl_task_change()")
        changed = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in columns)
        db.execute_sql("DROP TRIGGER IF EXISTS task_change_update ON task")
        db.execute_sql(f"CREATE TRIGGER task_change_update AFTER UPDATE OF {', '.join(columns)} ON task "
                       f"FOR EACH ROW WHEN ({changed}) EXECUTE FUNCTION mjctl_task_change()")
    else:
        db.execute_sql("INSERT IGNORE INTO task_change (id, n) VALUES (1, 0)")
        db.execute_sql("DROP TRIGGER IF EXISTS task_change_delete")
        db.execute_sql(f"CREATE TRIGGER task_change_delete AFTER DELETE ON task FOR EACH ROW {bump}")
        # MariaDB has no UPDATE OF: the trigger runs on every update and compares.
        same = " AND ".join(f"OLD.{c} <=> NEW.{c}" for c in columns)
        db.execute_sql("DROP TRIGGER IF EXISTS task_change_update")
        db.execute_sql(f"CREATE TRIGGER task_change_update AFTER UPDATE ON task FOR EACH ROW BEGIN "
                       f"IF NOT ({same}) THEN {bump}; END IF; END")
