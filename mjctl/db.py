"""Connecting the model proxy to a database by URL, and the versioned schema.

SQLite (the default) runs in WAL mode with a busy timeout, and every write transaction is opened
IMMEDIATE so that a server and a poller wait for each other instead of failing. PostgreSQL and
MySQL/MariaDB go through peewee's connection pools. Migrations are numbered steps (mjctl.migrations), each
applied in its own transaction together with the row recording it, under a lock so two processes may start
at once.

Every wait on the database is bounded by ``[database] busy_timeout`` (a lock: SQLite's busy timeout,
PostgreSQL's lock_timeout, MySQL's lock wait timeouts), ``pool_timeout`` (a free pooled connection) and
``connect_timeout``; a request that meets one of them fails as :class:`DatabaseBusy` (HTTP 503) instead
of holding its server thread, and ``retry_transaction`` never waits for a lock twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import peewee
from playhouse.pool import PooledMySQLDatabase

from mjctl import jsontext
from mjctl.config import DatabaseSettings, PollerSettings, ServerSettings, Settings, redact_url
from mjctl.errors import ConfigError, DatabaseUnavailable, first_line
from mjctl.migrations import MIGRATIONS as MIGRATIONS  # re-exported: the steps and their registration
from mjctl.migrations import TASK_IDENTITY_INDEX as TASK_IDENTITY_INDEX
from mjctl.migrations import create_version_table
from mjctl.migrations import migration as migration
from mjctl.models import SchemaVersion, database

log = logging.getLogger("mjctl.db")
T = TypeVar("T")

SUPPORTED_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")

_open_lock = threading.Lock()
_opened_url: str | None = None


SQLITE_MMAP_BYTES = 1 << 30
DEFAULT_BUSY_TIMEOUT = DatabaseSettings().busy_timeout
BUSY_MESSAGE = "The database is busy; try again shortly."


class DatabaseBusy(DatabaseUnavailable):
    """The database did not serve a request in time: a lock held elsewhere past the busy timeout, no
    free pooled connection, or no connection at all. Worth retrying shortly, hence 503."""

    http_status = 503
    headers = {"Retry-After": "2"}

    def __init__(self, message: str = BUSY_MESSAGE):
        super().__init__(message)


#: SQLite's messages for a lock it gave up waiting for, and for a file it cannot open right now.
_SQLITE_BUSY_WORDS = ("database is locked", "database table is locked", "database is busy",
                      "unable to open database file", "disk i/o error")


def busy_error(exc: BaseException) -> DatabaseBusy | None:
    """The DatabaseBusy that exc amounts to, or None when it is something else (a bug, a constraint).

    On PostgreSQL and MySQL an OperationalError or InterfaceError is a connection, lock-timeout, deadlock
    or cancelled-statement failure; on SQLite only the locked/unopenable messages are (a missing table is
    an OperationalError there too, and a bug). A pool that stayed full for pool_timeout raises peewee's
    MaxConnectionsExceeded, a ValueError."""
    if isinstance(exc, DatabaseBusy):
        return exc
    try:
        from playhouse.pool import MaxConnectionsExceeded
    except ImportError:  # pragma: no cover - playhouse ships with peewee
        MaxConnectionsExceeded = ()
    if MaxConnectionsExceeded and isinstance(exc, MaxConnectionsExceeded):
        return DatabaseBusy()
    if not isinstance(exc, (peewee.OperationalError, peewee.InterfaceError)):
        return None
    if database.obj is not None and is_sqlite():
        text = str(exc).lower()
        return DatabaseBusy() if any(word in text for word in _SQLITE_BUSY_WORDS) else None
    return DatabaseBusy()


def make_database(url: str, settings: Settings | None = None) -> peewee.Database:
    """A peewee Database for url (not yet connected). Raises ConfigError for a URL it cannot use."""
    db_settings = settings.database if settings is not None else DatabaseSettings()
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigError(
            f"Database URL {redact_url(url)!r} has an unknown scheme {scheme or '(none)'!r}; "
            "use sqlite:///PATH, postgresql://… or mysql://…."
        )
    if scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(f"Database URL {url!r} names no file; use sqlite:///PATH.")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        busy = db_settings.busy_timeout
        db = peewee.SqliteDatabase(
            path,
            timeout=busy,
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "busy_timeout": int(busy * 1000),
                "foreign_keys": 0,
                "cache_size": -16000,
                # Read pages straight from the OS page cache instead of a pread() each: a listing page on
                # 1M tasks went from 113 to 67 us, a count from 23 to 13 us. Address space only; SQLite caps it.
                "mmap_size": SQLITE_MMAP_BYTES,
            },
        )
        db._mjctl_busy_timeout = busy
        return db
    from playhouse.db_url import parse
    from playhouse.pool import PooledPostgresqlDatabase

    kwargs = parse(url.replace("mariadb://", "mysql://", 1) if scheme == "mariadb" else url)
    if not kwargs.get("database"):
        raise ConfigError(f"Database URL {redact_url(url)!r} names no database.")
    pool = {
        "max_connections": pool_size(settings),
        "stale_timeout": db_settings.stale_timeout,
        # peewee's pool truncates the wait to whole seconds and takes 0 for "forever": at least 1.
        "timeout": max(1, math.ceil(db_settings.pool_timeout)),
    }
    connect_timeout = db_settings.connect_timeout
    lock_wait = max(1, math.ceil(db_settings.busy_timeout))
    if scheme in ("postgresql", "postgres"):
        # Without lock_timeout a statement waits for a lock forever (an ALTER, a LOCK TABLE elsewhere).
        options = f"-c lock_timeout={lock_wait * 1000}"
        if kwargs.get("options"):
            options = f"{kwargs.pop('options')} {options}"
        db = PooledPostgresqlDatabase(connect_timeout=connect_timeout, options=options, **pool, **kwargs)
        db._mjctl_busy_timeout = db_settings.busy_timeout
        return db
    # READ COMMITTED, as on PostgreSQL: InnoDB's default REPEATABLE READ adds gap locks that turned
    # concurrent submissions into deadlocks, and hides rows other transactions committed meanwhile.
    db = BoundedMySQLDatabase(charset="utf8mb4", connect_timeout=connect_timeout, lock_wait=lock_wait,
                              init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", **pool, **kwargs)
    db._mjctl_busy_timeout = db_settings.busy_timeout
    return db


class _LockWaitMySQL(peewee.MySQLDatabase):
    """Sets the session's lock waits on each new connection (once, not on every checkout from the pool):
    InnoDB's row-lock wait defaults to 50 s and the metadata-lock wait (LOCK TABLES, DDL) to a day.

    _connect is peewee's private hook for opening a connection (the reason pyproject.toml bounds peewee):
    the driver's init_command, the public way, already carries the isolation level and runs one statement."""

    _lock_wait = 5

    def _connect(self):
        conn = super()._connect()
        with conn.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = %s, lock_wait_timeout = %s",
                           (self._lock_wait, self._lock_wait))
        return conn


class BoundedMySQLDatabase(PooledMySQLDatabase, _LockWaitMySQL):
    """PooledMySQLDatabase whose new connections (made through _LockWaitMySQL._connect, next in line
    after the pool) give up on a lock after ``lock_wait`` seconds."""

    def init(self, database, lock_wait: int = 5, **kwargs):
        self._lock_wait = int(lock_wait)
        super().init(database, **kwargs)


def pool_size(settings: Settings | None) -> int:
    """Connections a process may hold: ``[database] pool_size``, or when that is 0 (the default) one for
    every server thread and poller worker plus two (the poller's own, and one spare). A request holds its
    connection to the end, relay calls to the upstream included, so a pool smaller than the threads makes
    requests wait for connections while the database idles."""
    if settings is None:
        threads, concurrency, configured = ServerSettings().threads, PollerSettings().concurrency, 0
    else:
        threads, concurrency = settings.server.threads, settings.poller.concurrency
        configured = settings.database.pool_size
    return configured if configured > 0 else threads + concurrency + 2


def is_sqlite(db: peewee.Database | None = None) -> bool:
    target = db if db is not None else database.obj
    return isinstance(target, peewee.SqliteDatabase)


def sqlite_json_reads() -> bool:
    """Whether the store is SQLite with JSON built in (3.38 and later): a hot read of many rows can then be
    one value, built in one step (see mjctl.reports), instead of a step per row, each of which lets Python's
    interpreter lock go to another thread and waits to get it back."""
    return is_sqlite() and sqlite3.sqlite_version_info >= (3, 38)


def json_rows(sql: str, params: list) -> list:
    """The rows of a one-step read (``SELECT json_group_array(json_array(…)) …``), parsed: a list of lists.
    Raises peewee.OperationalError when a row holds what JSON cannot (a BLOB put in by hand); the callers
    then read row by row."""
    (text,), = database.execute_sql(sql, params).fetchall()
    return jsontext.loads(text)


def write_tx():
    """A write transaction: IMMEDIATE on SQLite (takes the write lock up front), plain elsewhere."""
    if is_sqlite():
        return database.atomic("IMMEDIATE")
    return database.atomic()


def bind(url: str, settings: Settings | None = None) -> peewee.Database:
    """Point the model proxy at url (once per process for the same URL) and check it is reachable."""
    global _opened_url
    with _open_lock:
        if _opened_url == url and database.obj is not None:
            return database.obj
        if database.obj is not None:
            with contextlib.suppress(Exception):
                database.obj.close_all() if hasattr(database.obj, "close_all") else database.obj.close()
        db = make_database(url, settings)
        database.initialize(db)
        _opened_url = url
    try:
        database.connect(reuse_if_open=True)
    except peewee.OperationalError as exc:
        raise DatabaseUnavailable(f"Cannot connect to the database at {redact_url(url)}: {first_line(exc)}.") from None
    except peewee.DatabaseError as exc:
        raise DatabaseUnavailable(f"Cannot open the database at {redact_url(url)}: {first_line(exc)}.") from None
    return database.obj


def unbind() -> None:
    """Close every connection and forget the binding (tests, and processes that fork)."""
    global _opened_url
    with _open_lock:
        if database.obj is not None:
            with contextlib.suppress(Exception):
                if hasattr(database.obj, "close_all"):
                    database.obj.close_all()
                else:
                    database.obj.close()
        _opened_url = None


def open_store(settings: Settings, *, migrate_now: bool = True) -> peewee.Database:
    """Bind the database of these settings and bring its schema up to date."""
    url = settings.database_url()
    db = bind(url, settings)
    if migrate_now:
        migrate()
    return db


#: Errors after which a connection cannot be trusted: the server went away, killed it or restarted.
CONNECTION_ERRORS = (peewee.OperationalError, peewee.InterfaceError)


@contextlib.contextmanager
def connection() -> Iterator[None]:
    """One connection for the current thread for the duration of a unit of work (a request).

    On PostgreSQL and MySQL it comes from the pool, which pings an idle connection before handing it out,
    and goes back at the end. Inside an enclosing transaction the connection is left alone. Otherwise a
    transaction still open at the end is rolled back (and logged) rather than leaked with the connection,
    and after an OperationalError or InterfaceError the connection is discarded, never pooled again.
    """
    outer = database.in_transaction()
    database.connect(reuse_if_open=True)
    try:
        yield
    except CONNECTION_ERRORS:
        if not outer:
            discard_connection()
        raise
    finally:
        if not outer and not database.is_closed():
            end_unit_of_work(close=True)


@contextlib.contextmanager
def request_connection() -> Iterator[None]:
    """The connection of one request that does not hold it to its end (an image route streams long after
    its lookup). On SQLite that is the thread's own, left open for the thread's next request: opening one
    re-runs the PRAGMAs, which costs more than the lookup. Elsewhere it is `connection()`: from the pool,
    returned at the end."""
    if not is_sqlite():
        with connection():
            yield
        return
    database.connect(reuse_if_open=True)
    try:
        yield
    finally:
        if database.in_transaction():
            end_unit_of_work(close=False)


def end_unit_of_work(*, close: bool) -> None:
    """Roll back whatever transaction this thread left open, then return its connection (close=True)."""
    if database.in_transaction():
        log.error("a unit of work ended inside a transaction; rolling it back")
        while database.in_transaction():
            database.pop_transaction()
        try:
            database.rollback()
        except peewee.PeeweeException:
            discard_connection()
            return
    if close:
        database.close()


def discard_connection() -> None:
    """Close this thread's connection without returning it to the pool (it may be dead or half-used).

    A failure to close it is ignored: peewee's close() forgets the thread's connection whatever closing
    the socket raised, and manual_close takes it out of the pool before that."""
    while database.in_transaction():
        database.pop_transaction()
    if database.is_closed():
        return
    db = database.obj
    with contextlib.suppress(Exception):
        if hasattr(db, "manual_close"):
            db.manual_close()
        else:
            db.close()


READ_RETRIES = 2  # a read that meets a dead connection is tried again on a fresh one, at most this often


def call_with_connection(fn: Callable, *args, retry: bool = False, **kwargs):
    """fn(*args, **kwargs) inside connection(). With retry (idempotent reads only) a connection error is
    retried on a fresh connection, up to READ_RETRIES times: after a database restart the first use of a
    connection that was checked out before it fails, and the request need not; a second retry covers a
    fresh connection killed between its liveness ping and its query (an administrator killing sessions).
    A dead connection fails at once; an error that comes after the lock wait (busy_timeout) is a lock
    timeout, and is not retried: the request would only wait as long again."""
    started = time.monotonic()
    for attempt in range(READ_RETRIES + 1):
        try:
            with connection():
                return fn(*args, **kwargs)
        except CONNECTION_ERRORS as exc:
            if (not retry or attempt == READ_RETRIES or database.in_transaction()
                    or time.monotonic() - started >= lock_wait_budget()):
                raise
            log.warning("database connection lost (%s); retrying on a new connection", first_line(exc))
    raise AssertionError("unreachable")


# --- migrations (the steps themselves are in mjctl.migrations) ------------------------------------

def current_version() -> int:
    try:
        value = SchemaVersion.select(peewee.fn.MAX(SchemaVersion.version)).scalar()
    except (peewee.OperationalError, peewee.ProgrammingError):
        if not is_sqlite() and database.in_transaction() is False:
            with contextlib.suppress(Exception):
                database.rollback()
        return 0
    return int(value or 0)


def latest_version() -> int:
    return MIGRATIONS[-1][0]


def migrate(upto: int | None = None) -> list[int]:
    """Apply every migration not yet applied, or those up to version upto; returns the versions this call
    applied. Safe to race."""
    target = latest_version() if upto is None else upto
    if current_version() >= target:
        return []
    db = database.obj
    applied: list[int] = []
    with _migration_lock(db):
        create_version_table(db)
        done = {row.version for row in SchemaVersion.select(SchemaVersion.version)}
        for version, _name, fn in MIGRATIONS:
            if version in done or version > target:
                continue
            with write_tx():
                fn(db)
                SchemaVersion.create(version=version)
            applied.append(version)
    return applied


@contextlib.contextmanager
def _migration_lock(db: peewee.Database) -> Iterator[None]:
    if isinstance(db, peewee.SqliteDatabase):
        # Serialise with a write lock on the file; the other process waits on the busy timeout.
        with db.atomic("IMMEDIATE"):
            yield
        return
    if isinstance(db, peewee.PostgresqlDatabase):
        db.execute_sql("SELECT pg_advisory_lock(7302190017)")
        try:
            yield
        finally:
            db.execute_sql("SELECT pg_advisory_unlock(7302190017)")
        return
    db.execute_sql("SELECT GET_LOCK('mjctl_migrate', 60)")
    try:
        yield
    finally:
        db.execute_sql("SELECT RELEASE_LOCK('mjctl_migrate')")


# --- compiled queries ----------------------------------------------------------------------------

_sql_cache: dict[tuple, tuple[str, tuple]] = {}


def compiled(key: tuple, build: Callable[[], peewee.Query], params: list) -> tuple[str, list]:
    """Peewee builds a query's SQL once per shape (key) and database kind; later calls reuse the text.

    build() makes the query with this call's values; params are the same values in the order the query
    uses them. The SQL is cached only when peewee's own parameters equal params, so a shape whose rendering
    depends on the values themselves is never reused wrongly. Saves ~0.2 ms of SQL generation per query.
    """
    full_key = (type(database.obj).__name__,) + key
    hit = _sql_cache.get(full_key)
    if hit is not None:
        return hit[0], params
    sql, built = build().sql()
    if list(built) == list(params):
        _sql_cache[full_key] = (sql, tuple(built))
    return sql, list(built)


def lock_wait_budget() -> float:
    """Seconds retry_transaction may spend on one unit of work: the configured lock wait, once."""
    db = database.obj
    return float(getattr(db, "_mjctl_busy_timeout", DEFAULT_BUSY_TIMEOUT))


def retry_transaction(fn: Callable[[], T], *, attempts: int = 8, what: str = "transaction",
                      on_conflict: Callable[[], None] | None = None, budget: float | None = None) -> T:
    """Run fn (which opens its own write transaction) again after a deadlock or a quick lock failure.

    The database rolled the failed attempt back whole, so running it again is safe. MariaDB answers
    concurrent inserts that fire the task-count trigger with occasional deadlocks (error 1213);
    PostgreSQL and SQLite can fail the same way under contention. Those fail fast and are worth
    retrying. An attempt that failed after waiting out a lock timeout is not: retrying it would wait
    the whole timeout again, eight times over (80 s of a server thread behind a locked SQLite file).
    So all attempts together get budget seconds (default: the busy timeout); once spent, the failure is
    raised as DatabaseBusy when it is one.
    """
    budget = lock_wait_budget() if budget is None else budget
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (peewee.OperationalError, peewee.InternalError) as exc:
            if on_conflict is not None:
                on_conflict()
            if database.in_transaction():
                raise
            pause = min(0.5, 0.005 * 2 ** attempt) * (0.5 + random.random())  # jittered back-off
            if attempt == attempts or time.monotonic() - started + pause >= budget:
                busy = busy_error(exc)
                if busy is not None:
                    log.warning("%s: gave up after %.1f s: %s", what, time.monotonic() - started, first_line(exc))
                    raise busy from exc
                raise
            log.info("%s: database conflict (%s); retrying", what, first_line(exc))
            time.sleep(pause)
    raise AssertionError("unreachable")
