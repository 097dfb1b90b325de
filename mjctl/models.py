"""The Peewee models. Every table lives on the one `database` proxy, bound at run time by `mjctl.db`."""

from __future__ import annotations

import json
import time

from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DatabaseProxy,
    DoubleField,
    IntegerField,
    Model,
    TextField,
)

from mjctl.protocol import FINISHED_STATUSES

database = DatabaseProxy()

ROLE_USER, ROLE_ADMIN, ROLE_ROOT = 1, 10, 100
ROLES = {"user": ROLE_USER, "admin": ROLE_ADMIN, "root": ROLE_ROOT}
ROLE_NAMES = {v: k for k, v in ROLES.items()}


def now() -> int:
    return int(time.time())


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Meta_(BaseModel):
    """Key/value facts about this database (schema version lives in its own table)."""

    key = CharField(max_length=64, primary_key=True)
    value = TextField()

    class Meta:
        table_name = "mjctl_meta"


class SchemaVersion(BaseModel):
    version = IntegerField(primary_key=True)
    applied_at = BigIntegerField(default=now)

    class Meta:
        table_name = "mjctl_schema"


class User(BaseModel):
    id = AutoField()
    name = CharField(max_length=64, unique=True)
    role = IntegerField(default=ROLE_USER)
    enabled = BooleanField(default=True)
    quota = BigIntegerField(default=0)  # the balance
    used_quota = BigIntegerField(default=0)  # charged minus refunded
    created_at = BigIntegerField(default=now)

    @property
    def role_name(self) -> str:
        return ROLE_NAMES.get(self.role, str(self.role))

    @property
    def is_admin(self) -> bool:
        return self.role >= ROLE_ADMIN


class Token(BaseModel):
    id = AutoField()
    user_id = IntegerField(index=True)
    token_hash = CharField(max_length=64, unique=True)
    hint = CharField(max_length=16)  # the first characters, to tell tokens apart
    created_at = BigIntegerField(default=now)


class Channel(BaseModel):
    id = AutoField()
    name = CharField(max_length=64, unique=True)
    base_url = CharField(max_length=512)
    secret_sealed = TextField(default="")
    enabled = BooleanField(default=True)
    priority = IntegerField(default=0)  # higher first
    created_at = BigIntegerField(default=now)
    # Out of rotation for new submissions until this time (epoch seconds; 0: healthy), and why.
    cooldown_until = DoubleField(default=0.0, constraints=[SQL("DEFAULT 0")])
    health_reason = CharField(max_length=255, default="", constraints=[SQL("DEFAULT ''")])


class Task(BaseModel):
    id = AutoField()
    user_id = IntegerField()
    channel_id = IntegerField()
    mj_id = CharField(max_length=64)
    action = CharField(max_length=32, default="IMAGINE")
    prompt = TextField(default="")
    prompt_en = TextField(default="")
    description = TextField(default="")
    state = TextField(default="")
    code = IntegerField(default=0)
    status = CharField(max_length=20, default="NOT_START")
    progress = CharField(max_length=32, default="")
    image_url = TextField(default="")
    video_url = TextField(default="")
    video_urls = TextField(default="")  # a JSON array encoded as a string, "" when none
    submit_time = BigIntegerField(default=0)  # epoch seconds
    start_time = BigIntegerField(default=0)
    finish_time = BigIntegerField(default=0)
    fail_reason = TextField(default="")
    quota = BigIntegerField(default=0)  # consumed; 0 once refunded
    buttons = TextField(default="")  # JSON
    properties = TextField(default="")  # JSON
    # 1 while the task is not in a finished status; the poller's "what is unfinished?" is an index seek.
    unfinished = IntegerField(default=1)
    updated_at = DoubleField(default=time.time)
    # The random part of this submission's own notify link (mjctl.relay.notify_hook_url): a push through
    # that link may change this task only. "" for tasks submitted before links were per task.
    # The database default too: a fresh schema then matches one migration 7 upgraded, and writers that
    # name their columns (bench/seed.py) need not know this one.
    nonce = CharField(max_length=32, default="", constraints=[SQL("DEFAULT ''")])
    # The poller's memo (mjctl.poller, migration 8): the digest of the last upstream report found to change
    # nothing here, and the row version (updated_at) it was checked against. Valid only while updated_at
    # still equals memo_version; every write of the row moves updated_at (a database trigger moves it for
    # writers that do not), so any write voids the memo. Database defaults, as for nonce.
    memo_digest = CharField(max_length=32, default="", constraints=[SQL("DEFAULT ''")])
    memo_version = DoubleField(default=0.0, constraints=[SQL("DEFAULT 0")])
    # The generation speed it was submitted for (FAST, RELAX, TURBO), "" when the caller named none.
    mode = CharField(max_length=16, default="", constraints=[SQL("DEFAULT ''")])
    # Quota given back for this task (the sum of its refund ledger entries), kept by a database trigger on
    # the ledger (migration 10): quota charged for a task is quota + quota_refunded, readable in one scan.
    quota_refunded = BigIntegerField(default=0, constraints=[SQL("DEFAULT 0")])

    class Meta:
        indexes = (
            (("user_id", "id"), False),
            (("user_id", "submit_time"), False),
            (("channel_id", "id"), False),
            (("mj_id",), False),  # lookups by the upstream's id alone (a user's task, an admin's search)
            # A task is (channel, upstream id): an upstream's id is unique only among its own tasks (migration 6).
            (("channel_id", "mj_id"), True),
            (("submit_time",), False),
            (("unfinished", "channel_id"), False),
            (("status", "id"), False),
            (("action", "id"), False),
        )

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def buttons_list(self) -> list:
        return _json_or(self.buttons, [])

    def properties_dict(self) -> dict:
        return _json_or(self.properties, {})


class Ledger(BaseModel):
    """Every change to a balance. amount is signed: a charge is negative, a refund or top-up positive."""

    id = AutoField()
    user_id = IntegerField(index=True)
    task_id = IntegerField(null=True, index=True)
    kind = CharField(max_length=16)  # charge, refund, topup, adjust
    amount = BigIntegerField()
    balance_after = BigIntegerField()
    reason = TextField(default="")
    created_at = DoubleField(default=time.time)


class TaskCount(BaseModel):
    """Rows per channel (channel_id 0 = all tasks), kept exact by database triggers so that the unfiltered
    and per-channel totals of the task list need no COUNT over a million rows."""

    channel_id = IntegerField(primary_key=True)
    n = BigIntegerField(default=0)

    class Meta:
        table_name = "task_count"


class TaskChange(BaseModel):
    """One counter (id 1) that triggers raise whenever a task row is deleted or its id, user, channel, upstream
    id, action, submit time or mode changes (migration 11): the deep-page anchors of mjctl.anchors are trusted
    only while it stands still. Status and progress changes, and inserts, leave it alone."""

    id = IntegerField(primary_key=True)
    n = BigIntegerField(default=0)

    class Meta:
        table_name = "task_change"


class PollClaim(BaseModel):
    """One channel's share of the polling work (mjctl.poller): a poller holds it while it polls that channel,
    until expires_at (renewed as batches complete), so several pollers split a cycle's channels between
    them instead of each asking every channel. polled_at is when the last poll of the channel was claimed
    and round_started_at when that poller's cycle began: a poller skips a channel someone polled in its
    own round."""

    channel_id = IntegerField(primary_key=True)
    holder = CharField(max_length=128, default="")
    expires_at = DoubleField(default=0.0)
    polled_at = DoubleField(default=0.0)
    round_started_at = DoubleField(default=0.0)

    class Meta:
        table_name = "poll_claim"


class Reservation(BaseModel):
    """Quota held for a submission while the upstream is being asked (mjctl.relay). A balance available
    for a new submission is quota minus the user's live reservations; an expired one (the process died
    mid-call) counts for nothing and is deleted by the next reservation of that user."""

    id = AutoField()
    user_id = IntegerField(index=True)
    amount = BigIntegerField()
    expires_at = DoubleField()
    created_at = DoubleField(default=time.time)


class PendingSubmission(BaseModel):
    """A submission written down before it is forwarded (mjctl.relay, write-ahead), so that a process dying
    between the upstream accepting it and mjctl recording it leaves a trace the poller can finish: it
    becomes the task (charged once) or is dropped (uncharged). The row lives only while the submission is
    in flight; a table of its own keeps it out of every listing, count and money view of tasks.

    channel_ids are the channels tried so far, in order ("3,5"); state, prompt and properties are what the
    task row will hold (the user's own state, not the tag forwarded in its place); parent_task_id is the
    MODAL task a modal submission continues. expires_at is the reservation's expiry: by then every call
    made for the submission is over."""

    id = AutoField()
    nonce = CharField(max_length=32, unique=True)
    user_id = IntegerField()
    kind = CharField(max_length=16)
    action = CharField(max_length=32)
    price = BigIntegerField(default=0)
    reservation_id = IntegerField(null=True)
    channel_ids = CharField(max_length=255, default="")
    parent_task_id = IntegerField(null=True)
    state = TextField(default="")
    prompt = TextField(default="")
    properties = TextField(default="")
    created_at = DoubleField(default=time.time)
    expires_at = DoubleField(index=True)
    mode = CharField(max_length=16, default="", constraints=[SQL("DEFAULT ''")])

    class Meta:
        table_name = "pending_submission"

    def channel_list(self) -> list[int]:
        return [int(c) for c in self.channel_ids.split(",") if c.strip().isdigit()]


def _json_or(text: str, fallback):
    if not text:
        return fallback
    try:
        return json.loads(text)
    except ValueError:
        return fallback


ALL_MODELS = [Meta_, SchemaVersion, User, Token, Channel, Task, Ledger, TaskCount, Reservation,
              PollClaim, PendingSubmission, TaskChange]
