"""The database side: engine set-up, and the writes one delivery needs inside one transaction.

Every write that decides something is a single guarded statement (``INSERT .. ON CONFLICT DO UPDATE
.. WHERE``), so concurrent replicas on PostgreSQL stay correct without reading first. Methods of
:class:`Writer` never commit: the caller owns the transaction (``Store.transaction()``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import os
import re
import socket
import threading
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import fields, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from clerk_sync._db_errors import CONNECTION_OPTION_ADVICE, is_foreign_key_violation, is_schema_behind, store_error
from clerk_sync._limits import fit_reason
from clerk_sync._time import as_utc
from clerk_sync.changes import Change, Hook, change_type, describe
from clerk_sync.config import DatabaseTimeouts, Settings
from clerk_sync.engine import DeliveryStatus, Entity, Record, RevokeSession, Tombstone, Upsert
from clerk_sync.errors import ConfigError
from clerk_sync.events import MembershipRecord, OrganizationRecord, UserRecord, record_columns, settle_lockout
from clerk_sync.mapping import CHECK_AT_ONCE as CHECK_AT_ONCE_SQL
from clerk_sync.mapping import (
    AppTableRolledBack,
    MappedWave,
    RefusedAtCommit,
    SchemaMapping,
    direct_sqlite,
    json_column_type,
    processors,
    sqlite_execute,
    sqlite_time,
)
from clerk_sync.outbox import HookSpec, Outbox, jobs_cte_sql, jobs_wave_sql
from clerk_sync.tables import (
    Timestamp,
    erased,
    organization_memberships,
    organizations,
    revoked_sessions,
    sync_locks,
    users,
    webhook_events,
)

__all__ = ["READ_ONLY_OPTION", "Store", "Writer", "create_engine", "dialect_family", "erased_digest"]

Clock = Callable[[], datetime]
_T = TypeVar("_T")
log = structlog.get_logger("clerk_sync.store")
READ_ONLY_OPTION = _READ_ONLY = "clerk_sync_read_only"  # execution option: a deferred (reader) BEGIN on SQLite
_TABLES: dict[Entity, sa.Table] = {
    Entity.USER: users,
    Entity.ORGANIZATION: organizations,
    Entity.MEMBERSHIP: organization_memberships,
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


def dialect_family(dialect: sa.Dialect) -> str:
    """``"postgresql"``, ``"sqlite"`` or ``"mysql"`` (MySQL and MariaDB, whichever URL scheme named them)."""
    return "mysql" if dialect.name in ("mysql", "mariadb") else dialect.name


def create_engine(url: str, *, timeouts: DatabaseTimeouts | None = None, transaction_pooler: bool = False,
                  **kwargs: Any) -> Engine:
    """An engine with the settings clerk-sync relies on (SQLite: WAL, busy timeout, BEGIN IMMEDIATE;
    PostgreSQL and MySQL/MariaDB: every wait bounded by ``timeouts``, see
    :class:`~clerk_sync.config.DatabaseTimeouts`; MySQL/MariaDB: utf8mb4, strict mode, UTC, READ COMMITTED).
    ``transaction_pooler``: PostgreSQL behind a pooler in transaction mode (``CLERK_SYNC_DB_TRANSACTION_POOLER``,
    see :func:`_pooled_postgres`)."""
    kwargs.setdefault("hide_parameters", True)  # bound values (emails, metadata) stay out of errors
    if url.startswith("sqlite"):
        _check_sqlite_directory(url)
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **kwargs)
        _tune_sqlite(engine)
        return engine
    # No pre-ping: it costs a round trip per delivery. A connection broken by a server restart fails
    # one transaction (503, which Svix retries) and the pool replaces it.
    kwargs.setdefault("pool_pre_ping", False)
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 20)
    if url.startswith("postgresql") and transaction_pooler:
        return _pooled_postgres(url, timeouts or DatabaseTimeouts(), kwargs)
    if url.startswith("postgresql"):
        kwargs["connect_args"] = _postgres_bounds(url, timeouts or DatabaseTimeouts()) | kwargs.get("connect_args", {})
    if url.startswith(("mysql", "mariadb")):
        return _mysql_engine(url, timeouts or DatabaseTimeouts(), kwargs)
    return sa.create_engine(url, **kwargs)


#: ``Connection.connection.info`` key set on a transaction-pooled engine's connections (read by ``mapping``).
TRANSACTION_POOLER_INFO = "clerk_sync_transaction_pooler"


def _pooled_postgres(url: str, t: DatabaseTimeouts, kwargs: dict[str, Any]) -> Engine:
    """PostgreSQL through a pooler in transaction mode (PgBouncer ``pool_mode=transaction``), where each
    transaction may run on another server connection: psycopg prepares no statements (a statement prepared
    on one server connection is missing on the next, or already there under the same name, before PgBouncer
    1.21's ``max_prepared_statements``), and no ``options`` startup parameter (PgBouncer refuses it), so the
    timeouts are the role's (``ALTER ROLE ... SET``, which every server connection the pooler opens takes);
    a connection that finds them unset says so once. Not the default: a direct connection keeps its
    prepared statements (fewer parse and plan rounds on the webhook path)."""
    args = _postgres_bounds(url, DatabaseTimeouts(lock_s=0, statement_s=0, idle_in_transaction_s=0, keepalive_s=0,
                                                  connect_s=t.connect_s))
    if not args["options"]:
        del args["options"]  # (the URL's own ?options= is left: the pooler may accept what it names)
    if t.keepalive_s > 0:  # client side only: the server's keepalives face the pooler, not us
        args |= {"keepalives": 1, "keepalives_idle": max(1, int(t.keepalive_s)), "keepalives_interval": 2,
                 "keepalives_count": 3}
    if sa.engine.make_url(url).get_driver_name() == "psycopg":
        args["prepare_threshold"] = None
    kwargs["connect_args"] = args | kwargs.get("connect_args", {})
    engine = sa.create_engine(url, **kwargs)
    wanted = {"lock_timeout": t.lock_s, "statement_timeout": t.statement_s,
              "idle_in_transaction_session_timeout": t.idle_in_transaction_s}
    checked = threading.Event()  # the role's settings are checked on the engine's first connection only

    @sa_event.listens_for(engine, "connect")
    def _check_bounds(dbapi_conn: Any, record: Any) -> None:
        record.info[TRANSACTION_POOLER_INFO] = True
        if checked.is_set():
            return
        checked.set()
        cur = dbapi_conn.cursor()
        cur.execute("SELECT name FROM pg_settings WHERE setting = '0' AND name = ANY(%s)",
                    ([n for n, s in wanted.items() if s > 0],))
        unbounded = sorted(row[0] for row in cur.fetchall())
        cur.close()
        dbapi_conn.rollback()  # (the check's transaction: the pooler's server connection goes back)
        if unbounded:
            log.warning("db_role_unbounded", unbounded=unbounded, fix="; ".join(
                f"ALTER ROLE <clerk-sync's role> SET {n} = '{int(wanted[n] * 1000)}ms'" for n in unbounded),
                reason="CLERK_SYNC_DB_TRANSACTION_POOLER sends no startup options: the timeouts are the role's")
    return engine


def sqlite_file(url: str) -> str | None:
    """The file a SQLite URL names, or None: another database, in memory, or a URI filename the driver resolves
    itself. Raises SQLAlchemy's ArgumentError for a URL it cannot parse."""
    parsed = sa.engine.make_url(url)
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:") \
            or "uri" in parsed.query:
        return None
    return path


def _check_sqlite_directory(url: str) -> None:
    """A SQLite file whose directory does not exist is a setting to fix (the driver says only "unable to open
    database file", which reads as the database being down: retry)."""
    path = sqlite_file(url)
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(
            f"DATABASE_URL names the SQLite file {path!r}, but its directory {directory} does not exist: create "
            f"it (mkdir -p {directory}) or fix DATABASE_URL (sqlite:///relative.db, sqlite:////absolute/path.db)")


def _mysql_engine(url: str, t: DatabaseTimeouts, kwargs: dict[str, Any]) -> Engine:
    """MySQL/MariaDB with PostgreSQL's semantics where they differ by default: READ COMMITTED (no gap
    locks between concurrent upserts), strict mode (a value that does not fit is an error, never
    truncated), utf8mb4 on the wire, UTC session time, and the same bounds on waits."""
    parsed = sa.engine.make_url(url)
    charset = parsed.query.get("charset", "utf8mb4")
    asked = (charset,) if isinstance(charset, str) else tuple(charset)  # (a tuple when the URL repeats it)
    if any(c.lower() != "utf8mb4" for c in asked):
        raise ConfigError(
            f"the database URL asks for charset={'&charset='.join(asked)}: clerk-sync's tables are utf8mb4, and a "
            "connection in another character set refuses 4-byte characters (an emoji in a name or in metadata), "
            "so such a delivery could never be stored; remove ?charset= from the URL or set charset=utf8mb4")
    parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    kwargs.setdefault("isolation_level", "READ COMMITTED")
    session = ["sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'",
               "time_zone = '+00:00'"]
    if t.lock_s > 0:  # row locks (and our lock rows), and metadata locks (a table held by LOCK TABLES or an
        # ALTER queued behind a long transaction; bounded by max_statement_time alone otherwise): whole seconds
        wait = max(1, round(t.lock_s))
        session += [f"innodb_lock_wait_timeout = {wait}", f"lock_wait_timeout = {wait}"]
    ours = "SET SESSION " + ", ".join(session)
    connect: dict[str, Any] = {}
    if t.connect_s > 0:
        connect["connect_timeout"] = max(1, int(t.connect_s))
    kwargs["connect_args"] = connect | kwargs.get("connect_args", {})
    # Pooled connections idle past the server's wait_timeout (8 h by default) are gone: replace them
    # before that, without a ping per checkout.
    kwargs.setdefault("pool_recycle", 3600)
    options = [f"?{name}=" for name in parsed.query if name != "charset"]
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (TypeError, ValueError) as exc:  # an option SQLAlchemy's dialect converts (?connect_timeout=abc)
        if not options or "sent to create_engine" in str(exc):  # (the caller's own keyword arguments: theirs)
            raise
        raise ConfigError(f"DATABASE_URL's options ({', '.join(options)}): {exc}; {CONNECTION_OPTION_ADVICE}") from None
    _refusals_said(engine)

    @sa_event.listens_for(engine, "connect", insert=True)
    def _after_theirs(dbapi_conn: Any, _record: Any) -> None:
        _after_their_init_command(dbapi_conn, ours)

    @sa_event.listens_for(engine, "connect")
    def _bounds(dbapi_conn: Any, _record: Any) -> None:
        # MariaDB bounds every statement (max_statement_time, s) and an idle open transaction
        # (idle_transaction_timeout); MySQL only SELECTs (max_execution_time, ms).
        cur = dbapi_conn.cursor()
        cur.execute("SELECT VERSION()")
        mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
        if t.statement_s > 0:
            cur.execute(f"SET SESSION max_statement_time = {t.statement_s:g}" if mariadb
                        else f"SET SESSION max_execution_time = {int(t.statement_s * 1000)}")
        if mariadb and t.idle_in_transaction_s > 0:
            cur.execute(f"SET SESSION idle_transaction_timeout = {max(1, round(t.idle_in_transaction_s))}")
        cur.close()
        if t.keepalive_s > 0:
            _keepalive(dbapi_conn, t.keepalive_s)
    return engine


def _refusals_said(engine: Engine) -> None:
    """The MySQL drivers refuse an unknown keyword (``?sslmode=require``, PostgreSQL's) with a plain TypeError at
    connect, which SQLAlchemy passes on unwrapped: a setting to fix, said as one (:class:`ConfigError`), not a
    traceback. The dialect's own ``connect`` is wrapped, not a ``do_connect`` listener: a listener returning the
    connection would keep the app's own listeners (a token or password set at connect time) from running."""
    dialect = engine.dialect
    connect = dialect.connect

    def said(*cargs: Any, **cparams: Any) -> Any:
        try:
            return connect(*cargs, **cparams)
        except TypeError as exc:
            raise ConfigError(f"DATABASE_URL (or connect_args): {exc}; {CONNECTION_OPTION_ADVICE}") from None

    dialect.connect = said  # type: ignore[method-assign]


def _after_their_init_command(dbapi_conn: Any, ours: str) -> None:
    """Our session settings after every ``init_command`` the driver runs: the URL's own (or ``connect_args``'),
    and an option file's (``?read_default_file=``, as Django's ``OPTIONS`` pass it: the client library runs its
    ``init-command`` after the one it is given, so ours as the driver's was overridden there). Not joined to
    theirs: two statements in one need ``CLIENT.MULTI_STATEMENTS``, which PyMySQL leaves off (and which would let
    any statement stack another). So theirs stay the driver's, run first as they asked, and ours follows here on
    every new connection (one round trip), ahead of SQLAlchemy's first-connect checks (which read ``sql_mode``):
    where both set one variable (``time_zone``, ``sql_mode``), clerk-sync's wins, as it relies on it."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute(ours)
    finally:
        cur.close()


def _keepalive(dbapi_conn: Any, idle_s: float) -> None:
    """TCP keepalives on a MySQL/MariaDB connection's socket, as libpq's on PostgreSQL (``_postgres_bounds``):
    neither driver offers them, and without them a statement sent to a host that vanished (a failover to
    another address, a partition) waits in ``recv`` for the kernel's 2 hours, its writer thread with it. By
    hand: the socket is reached through a duplicate of its descriptor (the options are the socket's)."""
    fileno = getattr(dbapi_conn, "fileno", None) or getattr(getattr(dbapi_conn, "_sock", None), "fileno", None)
    if fileno is None:  # pragma: no cover - a driver with no way to its socket
        return
    with socket.socket(fileno=os.dup(fileno())) as sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket: the server is on this host
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # (macOS names the idle time TCP_KEEPALIVE; an option this platform lacks is left at its default)
        idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
        for option, value in ((idle, max(1, min(32_767, int(idle_s)))),
                              (getattr(socket, "TCP_KEEPINTVL", None), 2), (getattr(socket, "TCP_KEEPCNT", None), 3)):
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _postgres_bounds(url: str, t: DatabaseTimeouts) -> dict[str, Any]:
    """libpq parameters: server settings through ``options`` (no round trip per connection), merged
    before the URL's own ``options`` so an explicit setting there wins; client-side keepalives."""
    ms = {"lock_timeout": t.lock_s, "statement_timeout": t.statement_s,
          "idle_in_transaction_session_timeout": t.idle_in_transaction_s}
    server = [f"-c {name}={int(s * 1000)}" for name, s in ms.items() if s > 0]
    if t.keepalive_s > 0:  # the server drops a vanished client's locks within ~keepalive_s + 6 s
        idle = max(1, int(t.keepalive_s))
        server += [f"-c tcp_keepalives_idle={idle}", "-c tcp_keepalives_interval=2", "-c tcp_keepalives_count=3"]
    query = sa.engine.make_url(url).query
    own = query.get("options")
    args: dict[str, Any] = {"options": " ".join([*server, *([own] if isinstance(own, str) else own or [])])}
    if "application_name" not in query and "application_name" not in args["options"]:
        # pg_stat_activity tells clerk-sync's connections from the app's own; libpq's fallback: PGAPPNAME wins
        args["fallback_application_name"] = "clerk-sync"
    if t.keepalive_s > 0:
        args |= {"keepalives": 1, "keepalives_idle": max(1, int(t.keepalive_s)), "keepalives_interval": 2,
                 "keepalives_count": 3}
    if t.connect_s > 0:
        args["connect_timeout"] = max(2, int(t.connect_s))  # libpq's minimum is 2 s
    return args


#: SQLite's ``journal_size_limit``: the -wal file is truncated to this after a checkpoint resets it. Without it
#: the -wal keeps its high-water mark for as long as any process holds the file open (1.3 GB after one big write
#: in the SQLite walkthrough, while serve, the worker and the app ran on): 64 MiB is many minutes of deliveries
#: between checkpoints, and a big prune or reconcile still grows it as far as it needs, only not for ever.
WAL_SIZE_LIMIT = 64 * 1024 * 1024


def _tune_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN until the first write and cannot do
    # BEGIN IMMEDIATE; we take over so a writer holds the lock from the start (no upgrade deadlocks).
    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "busy_timeout=30000",
            "foreign_keys=ON",
            f"journal_size_limit={WAL_SIZE_LIMIT}",  # (per connection: every one that may checkpoint sets it)
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Readers (Store.connect) take a deferred snapshot: WAL lets them run beside the writer.
        reader = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if reader else "BEGIN IMMEDIATE")


class Writer:
    """The write operations of one unit of work, bound to an open transaction."""

    def __init__(self, conn: Connection, now: datetime, *, hooks: Sequence[Hook] = (),
                 mapping: SchemaMapping | None = None, unmapped: str | None = None) -> None:
        self.conn = conn
        self.now = now
        self._dialect = dialect_family(conn.dialect)
        self._pg = self._dialect == "postgresql"
        self._my = self._dialect == "mysql"
        self._psycopg = self._pg and conn.dialect.driver == "psycopg"
        # SQLite through the stdlib driver: the hot writes go to it directly (see _sqlite_upsert)
        self._pysqlite = conn.dialect.driver == "pysqlite" and direct_sqlite(conn.dialect)
        self._sqlite_now = sqlite_time(now) if self._pysqlite else None
        # Applied changes go to the app's mapped tables and the hook outbox, in this transaction
        # (None: neither is configured, so no extra reads).
        self.outbox = Outbox(conn, now, hooks, mapping, unmapped=unmapped) if hooks or mapping else None
        self._mapped = mapping is not None
        # Memberships this unit of work deleted because their user or organization is deleted (a late event
        # after the parent's deletion or erasure): their deliveries keep no personal data either.
        self.deleted_with_parent: set[str] = set()
        self._carried: list[Change] = []  # projected without a change to record (see _record_upserted)

    @property
    def mapped_changes(self) -> list[Change]:
        """What this unit of work sent to the app's mapped tables (a COMMIT they refuse names none of it)."""
        return [*self.outbox.changes, *self._carried] if self.outbox is not None else []

    @property
    def refused(self) -> list[str]:
        """Why the app's mapped tables refused changes of this unit of work (the changes themselves are
        applied: :meth:`Outbox.project`), in order."""
        return self.outbox.refused if self.outbox is not None else []

    def refusals_noted(self, since: int, error: str | None) -> str | None:
        """``error`` followed by the refusals recorded since ``len(refused)`` was ``since`` (one delivery's)."""
        notes = [error, *self.refused[since:]] if error else self.refused[since:]
        # (a deletion cascading to hundreds of refused rows: bounded, as MariaDB's TEXT is)
        return fit_reason("; ".join(notes)) or None

    #: Sent after BEGIN where an app's table may hold a deferred constraint (see :attr:`checks_at_once`).
    CHECK_AT_ONCE = CHECK_AT_ONCE_SQL

    @property
    def checks_at_once(self) -> bool:
        """PostgreSQL with a mapping: the app's tables may declare constraints DEFERRABLE INITIALLY DEFERRED,
        checked only at COMMIT, where a refusal names no statement (so no delivery to store failed: a batch,
        and alone the delivery, would answer 503 on every retry). Checked at each statement instead, a
        refusal is the delivery's own, stored failed like any other. Our own tables defer nothing."""
        return self._pg and self._mapped

    def check_at_once(self) -> None:
        """:attr:`CHECK_AT_ONCE` when :attr:`checks_at_once` (one statement, in this transaction)."""
        if self.checks_at_once:
            self.conn.exec_driver_sql(self.CHECK_AT_ONCE)
            if self.outbox is not None:
                self.outbox.checked_at_once = True  # (Outbox.project sends it otherwise)

    # -- inbox ---------------------------------------------------------------------------------
    def membership_parents(self, clerk_id: str) -> tuple[str, str] | None:
        """The organization and user ids of membership ``clerk_id`` as stored, or None (no row)."""
        m = organization_memberships
        row = self.conn.execute(sa.select(m.c.organization_clerk_id, m.c.user_clerk_id)
                                .where(m.c.clerk_id == clerk_id)).first()
        return None if row is None else (row[0], row[1])

    def record_delivery(self, svix_id: str, payload: dict[str, Any] | str, *, event_type: str,
                        instance_id: str | None, event_timestamp: int | None, status: str = "received",
                        error: str | None = None, unless_gone: tuple[str, dict[str, Any]] | None = None) -> bool:
        """Insert the inbox row; False when this ``svix_id`` was already received (a duplicate).

        ``payload`` may be the verified body text: it is stored as received, not re-serialised.
        ``status`` lets the caller write the expected outcome at once (one statement fewer).
        ``unless_gone`` = (a user's Clerk id, the redacted payload): stored instead, redacted, when that
        user is a tombstone or erased, decided in the same statement (an event naming a deleted user).
        """
        text = payload if isinstance(payload, str) else json.dumps(payload)
        applied_at = None if status not in _APPLIED else self._sqlite_now if self._pysqlite else self.now
        if unless_gone is not None:
            person, redacted = unless_gone
            if self._pysqlite:
                now = self._sqlite_now
                return bool(sqlite_execute(self.conn, _SQLITE_INBOX_NAMING_SQL, [[
                    svix_id, event_type, instance_id, event_timestamp, str(status), error, applied_at,
                    json.dumps(redacted), text, now, now, person, erased_digest(Entity.USER, person)]]))
            params = {"svix_id": svix_id, "type": event_type, "instance_id": instance_id,
                      "event_timestamp": event_timestamp, "now": self.now, "payload": text, "status": status,
                      "last_error": error, "applied_at": applied_at, "redacted": json.dumps(redacted),
                      "person": person, "erased": erased_digest(Entity.USER, person)}
            return self._wrote(self.conn.execute(_inbox_naming_sql(self._dialect), params))
        if self._pysqlite:
            return bool(sqlite_execute(self.conn, _SQLITE_INBOX_SQL, [[
                svix_id, event_type, instance_id, event_timestamp, str(status), error, applied_at, text,
                self._sqlite_now]]))
        params = {"svix_id": svix_id, "type": event_type, "instance_id": instance_id,
                  "event_timestamp": event_timestamp, "now": self.now, "payload": text, "status": status,
                  "last_error": error, "applied_at": applied_at}
        return self._wrote(self.conn.execute(_inbox_sql(self._dialect), params))

    @property
    def pipelines(self) -> bool:
        """Whether :meth:`record_and_upsert_many` sends its statements in one pipeline (psycopg)."""
        return self._psycopg

    def one_statement(self, intent: Upsert | Tombstone | RevokeSession) -> bool:
        """Whether :meth:`record_and_upsert` can take this intent: an upsert, on PostgreSQL with psycopg;
        one the hooks or the mapping care about if :meth:`Outbox.pipelines` its entity (the statement then
        also writes the mapped row, and the hook jobs when a hook may want the change)."""
        return (self._psycopg and isinstance(intent, Upsert)
                and (self.outbox is None or not self.outbox.wants(intent) or self.outbox.pipelines(intent.entity)))

    def record_and_upsert(self, svix_id: str, payload: str, *, event_type: str, instance_id: str | None,
                          event_timestamp: int | None, error: str | None, intent: Upsert) -> DeliveryStatus | None:
        """The inbox row and the guarded upsert in one statement (a data-modifying CTE, PostgreSQL):
        ``applied``, ``skipped`` (the guard refused the row), or None for a duplicate ``svix_id``.

        The upsert runs before the inbox insert, so it refuses a ``svix_id`` the inbox holds itself
        (:data:`_UNLESS_STORED`: whatever that delivery's status or body; ``replay`` applies a failed one). The
        statement goes to psycopg directly (prepared by psycopg after a few runs): no SQLAlchemy work
        per delivery on the hot path.
        """
        return self.record_and_upsert_many([(svix_id, payload, event_type, instance_id, event_timestamp, error,
                                              intent)], pipeline=False)[0]

    def record_and_upsert_many(self, items: Sequence[OneStatement], *, pipeline: bool = True,
                               then: Sequence[Upsert | Tombstone] = (),
                               then_keys: Sequence[str] = ()) -> list[DeliveryStatus | None]:
        """:meth:`record_and_upsert` for many deliveries, sent in one psycopg pipeline (one round trip
        for all of them). A failure does not say which delivery caused it: the caller retries them one
        by one to find out.

        Piped, users and organizations go in "waves" (:func:`_wave_sql`): one statement for the deliveries of
        an entity type (their mapped rows and hook jobs included), at most one per row and ``svix_id``, a
        delivery that repeats either in the next wave. Rows of one entity stay in batch order that way;
        those of different entities are independent (an upsert never changes ``deleted_at``, which is all
        the membership check reads), so the waves go after the other statements. An entity type whose
        mapped values the wave's JSON cannot carry as psycopg would (see ``mapping._as_json``) takes the
        statement per delivery described below.

        Memberships take three statements (guarded upsert, inbox row, "deleted if its user or
        organization is"), after one statement that takes the advisory locks of all of them in one
        sorted pass (see :meth:`lock`); a membership the guard refused is set ``skipped`` afterwards.

        The mapped table's upsert of an entity the mapping covers is a part of the delivery's statement
        (:meth:`SchemaMapping.cte`: it writes when the guarded upsert applied). An upsert a hook may care
        about (see :meth:`Outbox.upsert_hooks`) takes its entity's lock in that pass too, and its statement
        also reads the row before and writes the jobs of the change (:func:`~clerk_sync.outbox.jobs_cte_sql`:
        the change described in SQL, as :meth:`_apply_with_hooks` does in Python). A duplicate ``svix_id``
        applies nothing (:data:`_UNLESS_STORED`), as on the other stores. Jobs written in SQL are not in
        ``Outbox.changes``.
        Alone (``pipeline=False``) the statement returns the row before, and the mapping and the jobs go
        through :meth:`Outbox.record`, whose errors say which table refused what.

        ``then``: what the caller applies after these in the same transaction (deletions): their locks are
        taken in the same pass, so that no lock is taken out of the one order every writer keeps; ``then_keys``
        too (the unmirrored events' subjects it queues jobs for).
        """
        from psycopg.types.json import Jsonb  # the postgres extra; only reached on a psycopg connection

        raw: Any = self.conn.connection.driver_connection
        outbox = self.outbox
        now = self.now
        # (webhook records always carry their event's time base; this is for a caller's own records)
        items = [(s, p, t, i, ts, e, self._settled(intent)) for s, p, t, i, ts, e, intent in items]
        statements: list[tuple[str, list[Any]]] = []
        shape: list[int] = []  # statements per item: 1 (user/organization), 3 (membership); 0: 1, hooked alone
        # Piped, the mapping's upsert and the hook jobs are parts of the delivery's statement
        # (SchemaMapping.cte, jobs_cte_sql). Alone, the statement returns the row before and the change goes
        # through Outbox.record (mapped row and jobs), whose errors say which table refused what.
        # Piped: the hooks that may want each upsert (their jobs written in SQL; none alone). ``hooked``: the
        # row before is read (under the entity's lock), piped for those jobs, alone for Outbox.record.
        hooks = [outbox.upsert_hooks(intent.entity) if outbox is not None and pipeline else ()
                 for *_, intent in items]
        hooked = [bool(specs) if pipeline else outbox is not None and outbox.wants(intent)
                  for (*_, intent), specs in zip(items, hooks, strict=True)]
        mapping = outbox.mapping if outbox is not None and pipeline else None
        keys = sorted({_lock_id(k) for *_, intent in items if intent.entity is Entity.MEMBERSHIP
                       for k in _lock_keys(intent)}
                      | {_lock_id(f"{_LOCK_PREFIX[item[-1].entity]}:{item[-1].clerk_id}")
                         for item, h in zip(items, hooked, strict=True) if h}
                      | {_lock_id(k) for intent in then for k in self.locks_of(intent)}
                      | {_lock_id(k) for k in then_keys})
        if keys:
            statements.append((_LOCKS_SQL, [keys]))
        # Users and organizations go in waves (_wave_sql): one statement per entity type and wave, a
        # delivery in the wave after the last one holding its entity or svix_id (an entity type whose
        # mapped values JSON cannot carry as psycopg would: one statement per delivery).
        waves: dict[tuple[int, Entity], list[int]] = {}
        wave_of: dict[tuple[Entity, str] | str, int] = {}
        where: list[tuple[int, int]] = []  # per item: (its statement, its row in it); waves filled in below
        in_waves: dict[Entity, bool] = {}  # per entity type of the batch
        mapped_waves: dict[Entity, MappedWave | None] = {}
        mapped_rows: dict[int, list[Any]] = {}
        for n, (*_, intent) in enumerate(items if pipeline else ()):
            entity = intent.entity
            if entity not in in_waves:
                mapped_waves[entity] = (mapping.wave(self.conn, entity) if mapping is not None
                                        and entity is not Entity.MEMBERSHIP and entity in mapping.tables else None)
                in_waves[entity] = entity is not Entity.MEMBERSHIP and (
                    mapping is None or entity not in mapping.tables or mapped_waves[entity] is not None)
            wave_mapped = mapped_waves[entity]
            if in_waves[entity] and wave_mapped is not None:
                try:
                    mapped_rows[n] = wave_mapped.row(_change_values(intent.record))
                except Exception:  # a value the JSON cannot carry as psycopg would (TypeError), a compute
                    # that raised: this entity type's deliveries take a statement each (mapping.cte), whose
                    # refusals are each delivery's own (Outbox.project, once the pipeline is retried alone)
                    in_waves[entity] = False
        for n, ((svix_id, payload, event_type, instance_id, event_timestamp, error, intent), h, specs) in enumerate(
                zip(items, hooked, hooks, strict=True)):
            if in_waves.get(intent.entity, False):
                key = (intent.entity, intent.clerk_id)
                wave = max(wave_of.get(key, -1), wave_of.get(svix_id, -1)) + 1
                wave_of[key] = wave_of[svix_id] = wave
                waves.setdefault((wave, intent.entity), []).append(n)
                where.append((-1, -1))
                shape.append(-1)
                continue
            where.append((len(statements), 0))
            values: list[Any] = [getattr(intent.record, name) for name in _RECORD_FIELDS[intent.entity]]
            if intent.entity is Entity.MEMBERSHIP:
                sql, json_at = _raw_upsert_sql(intent.entity, unless_stored=True)
                for i in json_at:
                    values[i] = Jsonb(values[i])
                statements += [  # (the upsert first: its _UNLESS_STORED must not see this inbox row)
                    (sql, [*values, now, now, *_erased_params(intent.entity, intent.record).values(), svix_id]),
                    (_RAW_INBOX_SQL, [svix_id, event_type, instance_id, event_timestamp, DeliveryStatus.APPLIED.value,
                                      error, now, payload, now]),
                    (_RAW_PARENT_DELETED_SQL, [now, now, intent.clerk_id]),
                ]
                shape.append(3)
                continue
            changed = _change_values(intent.record) if mapping is not None or specs else {}
            cte = mapping.cte(self.conn, intent.entity, intent.clerk_id, changed) if mapping is not None else None
            mapped_sql, mapped_params = cte or ("", [])
            if specs:
                sql, json_at = _jobs_statement_sql(intent.entity, mapped_sql, specs)
            else:
                sql, json_at = (_hooked_statement_sql if h else _one_statement_sql)(intent.entity, mapped_sql)
            for i in json_at:
                values[i] = Jsonb(values[i])
            values += [now, now, erased_digest(intent.entity, intent.clerk_id), svix_id,  # (_UNLESS_STORED's)
                       svix_id, event_type, instance_id, event_timestamp, error, now, payload, now, *mapped_params]
            if specs:
                assert outbox is not None  # specs come from it
                values += outbox.jobs_params(intent.entity, intent.clerk_id, intent.version, json.dumps(changed))
            statements.append((sql, [intent.clerk_id, *values] if h else values))
            shape.append(0 if h and not specs else 1)
        many: set[int] = set()
        for (_, entity), members in sorted(waves.items(), key=lambda kv: kv[0][0]):
            names = _RECORD_FIELDS[entity]
            mapped = mapped_waves.get(entity)
            specs = hooks[members[0]]  # the same for every delivery of an entity type
            rows_json: list[str] = []
            for row, n in enumerate(members):
                svix_id, payload, event_type, instance_id, event_timestamp, error, intent = items[n]
                record = intent.record
                one = {name: getattr(record, name) for name in names}
                one.update(o=row, erased_=erased_digest(entity, intent.clerk_id), svix_id_=svix_id, type_=event_type,
                           instance_=instance_id, event_ts_=event_timestamp, error_=error)
                if mapped is not None:
                    one.update((f"m{i}", value) for i, value in enumerate(mapped_rows[n]))
                if specs:
                    one.update(doc_=_change_values(record), version_=intent.version)
                # The payload is JSON already (as received, or cleaned): spliced in, not escaped into a string.
                rows_json.append(f'{json.dumps(one, ensure_ascii=False)[:-1]},"payload_":{payload}}}')
                where[n] = (len(statements), row)
            many.add(len(statements))
            params: list[Any] = ["[" + ",".join(rows_json) + "]", now, now, now, now]
            if specs:
                params += [change_type(entity, ""), entity.value, now, now]
            sql = _wave_sql(entity, mapped.columns, mapped.sql, specs) if mapped is not None else _wave_sql(
                entity, hooks=specs)
            statements.append((sql, params))
        rows = _run_raw(raw, statements, pipeline=pipeline, many=many)
        out: list[DeliveryStatus | None] = []
        upserted_alone: list[tuple[Upsert, Change | None]] = []
        for item, size, (at, row) in zip(items, shape, where, strict=True):
            if size == -1:
                status = rows[at][row][0]
                out.append(None if status is None else DeliveryStatus(status))
            elif size == 0:
                status, upserted, *before = rows[at]
                out.append(None if status is None else DeliveryStatus(status))
                if upserted:
                    upserted_alone.append((item[-1], _hooked_change(item[-1], before)))
            elif size == 1:
                out.append(None if rows[at] is None else DeliveryStatus(rows[at][0]))
            elif rows[at + 1] is None:
                out.append(None)  # a duplicate: its upsert refused (_UNLESS_STORED), its cascade check harmless
            elif rows[at] is None and rows[at + 2] is None:
                self.finish_delivery(item[0], DeliveryStatus.SKIPPED, item[5])
                out.append(DeliveryStatus.SKIPPED)
            else:
                if rows[at + 2] is not None:
                    self.deleted_with_parent.add(item[-1].clerk_id)
                out.append(DeliveryStatus.APPLIED)
        if outbox is not None:
            for intent, change in upserted_alone:  # alone (pipeline=False): the mapped row and jobs in Python
                self._record_upserted(outbox, intent, change)
        return out

    def forget_payload_if_deleted(self, svix_id: str, entity: Entity, clerk_id: str,
                                  redacted: dict[str, Any], *, parents: Sequence[tuple[Entity, str]] = ()) -> bool:
        """Store ``redacted`` instead of the payload when its entity (or one of ``parents``: a membership's
        user and organization) is a tombstone or erased: a late event for a deleted (maybe erased) user
        changes nothing, so its personal data is not kept either."""
        conditions: list[sa.ColumnElement[bool]] = []
        for one, one_id in ((entity, clerk_id), *parents):
            table = _TABLES[one]
            conditions += [sa.exists().where(table.c.clerk_id == one_id, table.c.deleted_at.is_not(None)),
                           sa.exists().where(erased.c.digest == erased_digest(one, one_id))]
        gone = sa.or_(*conditions)
        stmt = (webhook_events.update().where(webhook_events.c.svix_id == svix_id, gone)
                .values(payload=redacted, redacted_at=self.now))
        return bool(self.conn.execute(stmt).rowcount)

    def finish_delivery(self, svix_id: str, status: str, error: str | None = None,
                        *, count_attempt: bool = False) -> None:
        """Set the outcome of a delivery (applied, skipped, ignored, failed)."""
        values: dict[str, Any] = {"status": status, "last_error": error}
        if status in _APPLIED:
            values["applied_at"] = self.now
        if count_attempt:
            values["attempts"] = webhook_events.c.attempts + 1
        self.conn.execute(
            webhook_events.update().where(webhook_events.c.svix_id == svix_id).values(**values)
        )

    # -- mirrored rows -------------------------------------------------------------------------
    def lock(self, keys: Sequence[str]) -> None:
        """Serialise writers that touch the same user/organization (PostgreSQL advisory locks; on
        MySQL/MariaDB the rows of ``clerk_sync_locks``, upserted in sorted order and held to COMMIT).

        Needed for the membership cascade: "membership deleted if its user is deleted" reads one
        row and writes another, which row locks alone cannot order. SQLite has one writer already.
        """
        if not (self._pg or self._my):
            return  # SQLite: nothing to take, nor lock ids to compute (two CRC-32s a key, every mapped delivery)
        # In the order of their lock ids, as every writer takes them (the piped batches' ``_LOCKS_SQL``): two
        # writers sorting the same keys differently would deadlock (a backfill page against a batch).
        ids = sorted({_lock_id(k) for k in keys})
        if self._pg and len(ids) == 1:
            self.conn.execute(_LOCK_SQL, {"key": ids[0]})
        elif self._pg and ids:  # (one statement: a backfill page's 500 locks are not 500 round trips)
            self.conn.execute(_LOCK_MANY_SQL, {"keys": ids})
        elif self._my and ids:
            self.conn.execute(_MYSQL_LOCK_SQL, [{"key": k} for k in ids])

    def locks_of(self, intent: Upsert | Tombstone) -> list[str]:
        """The lock keys :meth:`apply` takes for ``intent``."""
        if self.outbox is not None and self.outbox.wants(intent):
            return [*_lock_keys(intent), f"{_LOCK_PREFIX[intent.entity]}:{intent.clerk_id}"]
        return _lock_keys(intent)

    def lock_batch(self, intents: Sequence[object]) -> None:
        """Take, in one sorted pass, every lock that applying ``intents`` one by one takes (PostgreSQL group
        commit, reconcile's pages): each apply sorts only its own, so a transaction taking them apply by
        apply could hold a lock another writer (a backfill page, a batch) needs while waiting for one it has."""
        self.lock([k for intent in intents if isinstance(intent, Upsert | Tombstone) for k in self.locks_of(intent)])

    def lock_page(self, entity: Entity, records: Sequence[Record]) -> None:
        """Everything a reconcile page's writes of ``records`` wait for, taken before the first and in the one
        order every writer keeps: the locks their applies take and, on MySQL/MariaDB, the entity locks a webhook
        batch takes for them (``lock_entities``), in one sorted pass; then, on PostgreSQL, the rows themselves in
        ``clerk_id`` order, as the webhook waves write them (for rows no hook or mapping reads the waves take no
        advisory lock, and nor does the page: its 500 rows would hold 500 of the server's shared lock slots;
        for those a hook or mapping reads, both take them, in ``locks_of``).
        Taken write by write instead, in listing order, a page deadlocked with a batch holding some."""
        keys = [k for record in records for k in self.locks_of(Upsert(entity, record))]
        if self._my:
            keys += [f"{_LOCK_PREFIX[entity]}:{record.clerk_id}" for record in records]
        self.lock(keys)
        if self._pg and records:
            table, ids = _TABLES[entity], sorted({record.clerk_id for record in records})
            self.conn.execute(sa.select(table.c.clerk_id).where(table.c.clerk_id.in_(ids))
                              .order_by(table.c.clerk_id).with_for_update())

    def lock_records(self, entity: Entity, clerk_ids: Sequence[str]) -> None:
        """The locks a delivery of these records of ``entity`` takes for them (a backfill page's)."""
        self.lock([f"{_LOCK_PREFIX[entity]}:{clerk_id}" for clerk_id in clerk_ids])

    def lock_entities(self, intents: Sequence[object], extra: Sequence[str] = ()) -> None:
        """Lock every user/organization/membership a batch will write (and the ``extra`` keys: its unmirrored
        events' subjects), in one sorted pass, before writing any (MySQL/MariaDB group commit): batches touching
        the same entities in different orders then queue instead of deadlocking on their rows (InnoDB would
        roll one back)."""
        keys = [key for intent in intents if isinstance(intent, Upsert | Tombstone)
                for key in (*_lock_keys(intent), f"{_LOCK_PREFIX[intent.entity]}:{intent.clerk_id}")]
        self.lock([*keys, *extra])

    def apply(self, intent: Upsert | Tombstone | RevokeSession) -> bool:
        """Execute an intent under the ordering guard; True when a row changed."""
        if isinstance(intent, RevokeSession):
            return self._revoke_session(intent)
        intent = self._settled(intent) if isinstance(intent, Upsert) else intent
        if self.outbox is not None and self.outbox.wants(intent):
            return self._apply_with_hooks(intent, self.outbox)
        self.lock(_lock_keys(intent))  # (locks_of, the outbox not wanting it)
        if isinstance(intent, Upsert):
            changed = self._upsert(intent)
            if intent.entity is Entity.MEMBERSHIP:
                changed = self._delete_membership_if_parent_deleted(intent.clerk_id) or changed
            return changed
        changed = self._tombstone(intent)
        if intent.entity in (Entity.USER, Entity.ORGANIZATION):
            self._cascade_memberships(intent.entity, intent.clerk_id)
        return changed

    @staticmethod
    def ended_lockouts(now_ms: int) -> sa.ColumnElement[bool]:
        """Rows of live users stored locked whose lock's end is unknown, not believed (an earlier lock's: see
        :func:`~clerk_sync.events.believed_end`) or past at ``now_ms``: what :meth:`end_lockout` may unlock."""
        u = users
        return sa.and_(u.c.locked.is_(True), u.c.deleted_at.is_(None), sa.or_(
            u.c.locked_until.is_(None), u.c.lock_version.is_(None), u.c.lock_version != u.c.clerk_updated_at,
            u.c.locked_until < u.c.clerk_updated_at, u.c.locked_until <= now_ms))

    def end_lockout(self, record: UserRecord) -> bool:
        """Unlock a user Clerk lists unlocked at the stored version, when the stored lock's end is unknown, not
        its own or past (a lockout's end bumps no ``updated_at``, so the guarded upsert skips it: reconcile's
        repair). Through the outbox, so the app's mapped table and the hooks see the change. True if it did."""
        intent = Upsert(Entity.USER, record)
        outbox = self.outbox if self.outbox is not None and self.outbox.wants(intent) else None
        self.lock(self.locks_of(intent))
        before = outbox.before(Entity.USER, record.clerk_id) if outbox is not None else None
        u = users
        done = self.conn.execute(u.update().where(
            u.c.clerk_id == record.clerk_id, u.c.clerk_updated_at == record.clerk_updated_at,
            self.ended_lockouts(int(self.now.timestamp() * 1000)),
        ).values(locked=False, locked_until=None, updated_at=self.now)).rowcount == 1
        if done and outbox is not None and before is not None:
            after = {**before, "locked": False, "locked_until": None}
            # Versioned one ms after the lock's change (same ``updated_at``), so its idempotency key is its own:
            # a receiver deduplicating on it, or keeping the newest version, would drop the unlock otherwise.
            # Never above a real later update: Clerk listed the user at this version after the lock had ended.
            outbox.record(describe(Entity.USER, record.clerk_id, record.clerk_updated_at + 1, before, after))
        return done

    def _settled_record(self, record: Record) -> Record:
        """A user record built with no time base (a Backend API object whose caller passed no ``fetched_ms``:
        reconcile's pages) gets its lockout's end from this transaction's clock (see :func:`settle_lockout`)."""
        if isinstance(record, UserRecord) and record.lockout_pending_s is not None:
            return settle_lockout(record, int(self.now.timestamp() * 1000))
        return record

    def _settled(self, intent: Upsert) -> Upsert:
        record = self._settled_record(intent.record)
        return intent if record is intent.record else replace(intent, record=record)

    # -- hooks: the same writes, plus the row before and one outbox row per applied change --------
    def _apply_with_hooks(self, intent: Upsert | Tombstone, outbox: Outbox) -> bool:
        # The entity's own lock too (locks_of), so the row read as "before" is the one the write replaces.
        self.lock(self.locks_of(intent))
        before = outbox.before(intent.entity, intent.clerk_id)
        if isinstance(intent, Upsert):
            upserted = self._upsert(intent)
            removed = intent.entity is Entity.MEMBERSHIP and self._delete_membership_if_parent_deleted(intent.clerk_id)
            after = None if removed else _change_values(intent.record)
            if upserted or removed:
                change = describe(intent.entity, intent.clerk_id, intent.version, before, after)
                if upserted and not removed:
                    self._record_upserted(outbox, intent, change)
                else:
                    outbox.record(change)
            return upserted or removed
        changed = self._tombstone(intent)
        cascaded = (self._cascade_memberships(intent.entity, intent.clerk_id, returning=True)
                    if intent.entity in (Entity.USER, Entity.ORGANIZATION) else ())
        # The memberships' deletions first: an app's memberships table may refer to its users/organizations
        # table, whose row (HardDelete) can only go once they are gone.
        # Set-wise (one statement per policy step and chunk, one executemany of jobs), as one by one they were
        # ~4 round trips per member: a 20,000-member organization's deletion took longer than Svix waits.
        outbox.record_many([Change(Entity.MEMBERSHIP, values["clerk_id"], "deleted", intent.version, values)
                            for values in (dict(row._mapping) for row in cascaded)])
        if changed:
            outbox.record(describe(intent.entity, intent.clerk_id, intent.version, before, None))
        return changed

    def _record_upserted(self, outbox: Outbox, intent: Upsert, change: Change | None) -> None:
        """An applied upsert's change to the mapping and the hooks. With no change to a contract column
        (``change`` None) a carried field (a user's external_id) or a computed column may still differ in
        the app's table: projected anyway, as the batches' waves do, with no hook job."""
        if change is not None:
            outbox.record(change)
        elif outbox.mapping is not None:
            carried = Change(intent.entity, intent.clerk_id, "updated", intent.version, _change_values(intent.record))
            self._carried.append(carried)
            outbox.project(carried)

    def _upsert(self, intent: Upsert) -> bool:
        if self._pysqlite:
            sql, convert = _sqlite_upsert(intent.entity)
            record = intent.record
            values = [getattr(record, n) if f is None else f(getattr(record, n))
                      for n, f in zip(_RECORD_FIELDS[intent.entity], convert, strict=True)]
            values += [self._sqlite_now, self._sqlite_now, *_erased_params(intent.entity, record).values()]
            return bool(sqlite_execute(self.conn, sql, [values]))
        params = _params(intent.entity, intent.record) | {"now": self.now,
                                                          **_erased_params(intent.entity, intent.record)}
        return self._wrote(self.conn.execute(_upsert_sql(intent.entity, self._dialect, returning=True), params))

    def upsert_many(self, entity: Entity, records: Sequence[Record]) -> None:
        """The same guarded upsert for many rows in one executemany (reconcile pages).

        No locks or cascades: memberships, whose parents may be deleted, go through :meth:`apply`.
        """
        if records:
            records = [self._settled_record(r) for r in records]
            stamp = {"now": self.now}
            self.conn.execute(_upsert_sql(entity, self._dialect, returning=False),
                              [_params(entity, r) | stamp | _erased_params(entity, r)
                               for r in records])

    def _tombstone(self, intent: Tombstone) -> bool:
        params = {"clerk_id": intent.clerk_id, "clerk_updated_at": intent.version, "now": self.now,
                  "erased": erased_digest(intent.entity, intent.clerk_id), **_TOMBSTONE_FILL[intent.entity]}
        return self._wrote(self.conn.execute(_tombstone_sql(intent.entity, self._dialect), params))

    def _revoke_session(self, intent: RevokeSession) -> bool:
        values = {"session_id": intent.session_id, "user_clerk_id": intent.user_id, "reason": intent.reason,
                  "expire_at": intent.expire_at, "revoked_at": self.now}
        if self._my:
            stmt = mysql.insert(revoked_sessions).values(values)
            return self._wrote(self.conn.execute(stmt.on_duplicate_key_update(session_id=stmt.inserted.session_id)))
        stmt = self._insert(revoked_sessions).values(values).on_conflict_do_nothing(index_elements=["session_id"])
        return self._changed(stmt.returning(revoked_sessions.c.id))

    def _cascade_memberships(self, entity: Entity, clerk_id: str, *, returning: bool = False) -> Sequence[Any]:
        m = organization_memberships
        column = m.c.user_clerk_id if entity is Entity.USER else m.c.organization_clerk_id
        stmt = (
            m.update()
            .where(column == clerk_id, m.c.deleted_at.is_(None))
            .values(deleted_at=self.now, updated_at=self.now)
        )
        if not returning:
            self.conn.execute(stmt)
            return []
        columns = [m.c[n] for n in _RECORD_FIELDS[Entity.MEMBERSHIP]]
        if self._my:  # no UPDATE .. RETURNING: read the rows first (the parent's lock is held)
            rows = self.conn.execute(sa.select(*columns).where(column == clerk_id, m.c.deleted_at.is_(None))
                                     .with_for_update()).all()
            self.conn.execute(stmt)
            return rows
        return self.conn.execute(stmt.returning(*columns)).all()

    def _delete_membership_if_parent_deleted(self, clerk_id: str) -> bool:
        deleted = self._parent_deleted(clerk_id)
        if deleted:
            self.deleted_with_parent.add(clerk_id)
        return deleted

    def _parent_deleted(self, clerk_id: str) -> bool:
        if self._pysqlite:
            now = self._sqlite_now
            return bool(sqlite_execute(self.conn, _SQLITE_PARENT_DELETED_SQL, [[now, now, clerk_id]]))
        m = organization_memberships

        def deleted(table: sa.Table, column: sa.ColumnElement[str]) -> sa.Exists:
            return sa.exists().where(table.c.clerk_id == column, table.c.deleted_at.is_not(None))

        stmt = (
            m.update()
            .where(
                m.c.clerk_id == clerk_id,
                m.c.deleted_at.is_(None),
                sa.or_(deleted(users, m.c.user_clerk_id), deleted(organizations, m.c.organization_clerk_id)),
            )
            .values(deleted_at=self.now, updated_at=self.now)
        )
        return self.conn.execute(stmt).rowcount == 1

    def _wrote(self, result: sa.CursorResult[Any]) -> bool:
        """Whether a guarded write (with RETURNING on PostgreSQL/SQLite) inserted or changed its row.

        MySQL has no ``ON DUPLICATE KEY .. RETURNING`` that tells a no-op apart, and with the
        FOUND_ROWS flag SQLAlchemy sets, an insert and an unchanged row both count 1: an insert is
        told by its new auto-increment id, a change by the count 2.
        """
        if self._my:
            return result.rowcount == 2 or bool(result.lastrowid)
        return result.first() is not None

    def _changed(self, stmt: Any) -> bool:
        # RETURNING, not rowcount: with implicit RETURNING drivers report rowcount -1, and a
        # skipped ON CONFLICT .. DO UPDATE WHERE returns no row on both SQLite and PostgreSQL.
        return self.conn.execute(stmt).first() is not None

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table) if self._pg else sqlite.insert(table)


_LOCK_PREFIX = {Entity.USER: "user", Entity.ORGANIZATION: "org", Entity.MEMBERSHIP: "membership"}


def _checked_hooks(hooks: Sequence[Hook]) -> tuple[Hook, ...]:
    names = [h.name for h in hooks]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"hook names must be unique (they key the queued jobs): {duplicated}")
    return tuple(hooks)


def _lock_keys(intent: Upsert | Tombstone) -> list[str]:
    if isinstance(intent, Upsert):
        record = intent.record
        if isinstance(record, MembershipRecord):
            return [f"org:{record.organization_clerk_id}", f"user:{record.user_clerk_id}"]
        return []
    if intent.entity is Entity.USER:
        return [f"user:{intent.clerk_id}"]
    if intent.entity is Entity.ORGANIZATION:
        return [f"org:{intent.clerk_id}"]
    return []


def _lock_id(key: str) -> int:
    # A stable signed 64-bit id for pg_advisory_xact_lock; crc32 twice keeps it dependency-free.
    hi, lo = zlib.crc32(key.encode()), zlib.crc32(key.encode()[::-1])
    value = (hi << 32) | lo
    return value - (1 << 64) if value >= 1 << 63 else value


# -- prebuilt statements ---------------------------------------------------------------------------
# The hot path runs a few fixed statements per delivery. They are written once as text (the ON
# CONFLICT syntax is the same on SQLite >= 3.35 and PostgreSQL >= 9.5) with typed bind parameters,
# so SQLAlchemy still converts JSON and datetimes but no longer builds and compiles a DML
# construct per delivery (that was over a third of the service's CPU, see BENCHMARKS.md).
_APPLIED = frozenset({DeliveryStatus.APPLIED, DeliveryStatus.SKIPPED})
_LOCK_SQL = sa.text("SELECT pg_advisory_xact_lock(:key)").bindparams(sa.bindparam("key", type_=sa.BigInteger))
_LOCK_MANY_SQL = sa.text("SELECT pg_advisory_xact_lock(k) FROM unnest(:keys) AS k").bindparams(  # in order
    sa.bindparam("keys", type_=postgresql.ARRAY(sa.BigInteger)))
_MYSQL_LOCK_SQL = sa.text(
    f"INSERT INTO {sync_locks.name} (lock_key) VALUES (:key) ON DUPLICATE KEY UPDATE lock_key = lock_key"
).bindparams(sa.bindparam("key", type_=sa.BigInteger))
_RECORD_FIELDS: dict[Entity, list[str]] = {  # the contract tables' columns (record_columns)
    Entity.USER: record_columns(UserRecord),
    Entity.ORGANIZATION: record_columns(OrganizationRecord),
    Entity.MEMBERSHIP: record_columns(MembershipRecord),
}
# NOT NULL columns a tombstone for a never-seen id must still fill (never read: the row is deleted).
_TOMBSTONE_FILL: dict[Entity, dict[str, Any]] = {
    Entity.USER: {"email_addresses": [], "public_metadata": {}, "private_metadata": {}, "unsafe_metadata": {}},
    Entity.ORGANIZATION: {"public_metadata": {}, "private_metadata": {}},
    Entity.MEMBERSHIP: {"organization_clerk_id": "", "user_clerk_id": "", "permissions": []},
}


def _params(entity: Entity, record: Record) -> dict[str, Any]:
    # Shallow, unlike dataclasses.asdict, which deep-copies every metadata dict.
    return {name: getattr(record, name) for name in _RECORD_FIELDS[entity]}


def _typed(table: sa.Table, sql: str, names: Sequence[str]) -> sa.TextClause:
    params = [sa.bindparam(n, type_=table.c[n].type) for n in names]
    params += [sa.bindparam(n, type_=erased.c.digest.type) for n in ("erased", "erased_user", "erased_org")
               if f":{n}" in sql]
    return sa.text(sql).bindparams(*params, sa.bindparam("now", type_=Timestamp))


def erased_digest(entity: Entity, clerk_id: str) -> str:
    """What ``clerk_sync_erased`` keeps of a hard-deleted entity: a SHA-256, not the id itself."""
    return hashlib.sha256(f"{entity.value}:{clerk_id}".encode()).hexdigest()


def is_erased(conn: Connection, entity: Entity, clerk_id: str) -> bool:
    """Whether the entity's tombstone was hard-deleted (its digest is in ``clerk_sync_erased``)."""
    digest = erased_digest(entity, clerk_id)
    return conn.execute(sa.select(erased.c.digest).where(erased.c.digest == digest)).first() is not None


# Every guarded insert is an INSERT .. SELECT with this filter (PostgreSQL, SQLite and MySQL alike):
# a hard-deleted entity's digest stops the row from coming back; a live row is updated as before.
_NOT_ERASED = f"WHERE NOT EXISTS (SELECT 1 FROM {erased.name} WHERE digest = %s)"


def _not_erased(entity: Entity, *, named: bool) -> str:
    """:data:`_NOT_ERASED` for an upsert; a membership is also refused when its user or organization was
    hard-deleted (their tombstones, which the "deleted parent" check reads, are gone)."""
    if entity is not Entity.MEMBERSHIP:
        return _NOT_ERASED % (":erased" if named else "%s")
    marks = ":erased, :erased_user, :erased_org" if named else "%s, %s, %s"
    return f"WHERE NOT EXISTS (SELECT 1 FROM {erased.name} WHERE digest IN ({marks}))"


def _erased_params(entity: Entity, record: Record) -> dict[str, str]:
    """The digests :func:`_not_erased` compares, as named parameters."""
    if isinstance(record, MembershipRecord):
        return {"erased": erased_digest(entity, record.clerk_id),
                "erased_user": erased_digest(Entity.USER, record.user_clerk_id),
                "erased_org": erased_digest(Entity.ORGANIZATION, record.organization_clerk_id)}
    return {"erased": erased_digest(entity, record.clerk_id)}


def _q(name: str) -> str:
    # MySQL reserves some of our column names (``role``); backticks are MySQL-only SQL, so quote there.
    return f"`{name}`"


@functools.cache
def _upsert_sql(entity: Entity, dialect: str, *, returning: bool) -> sa.TextClause:
    table, names = _TABLES[entity], _RECORD_FIELDS[entity]
    t = table.name
    if dialect == "mysql":
        # The guard in every assignment: MySQL evaluates them left to right, each seeing the ones
        # before, so the guarded columns (clerk_updated_at, read by the guard) are assigned last.
        guard = f"{t}.deleted_at IS NULL AND {t}.clerk_updated_at < VALUES(clerk_updated_at)"
        order = [n for n in names if n not in ("clerk_id", "clerk_updated_at")] + ["updated_at", "clerk_updated_at"]
        sets = ", ".join(f"{_q(n)} = IF({guard}, VALUES({_q(n)}), {t}.{_q(n)})" for n in order)
        return _typed(table, (
            f"INSERT INTO {t} ({', '.join(map(_q, names))}, created_at, updated_at) "
            f"SELECT {', '.join(':' + n for n in names)}, :now, :now FROM DUAL {_not_erased(entity, named=True)} "
            f"ON DUPLICATE KEY UPDATE {sets}"
        ), names)
    sets = ", ".join(f"{n} = excluded.{n}" for n in names if n != "clerk_id")
    return _typed(table, (
        f"INSERT INTO {t} ({', '.join(names)}, created_at, updated_at) "
        f"SELECT {', '.join(':' + n for n in names)}, :now, :now {_not_erased(entity, named=True)} "
        f"ON CONFLICT (clerk_id) DO UPDATE SET {sets}, updated_at = excluded.updated_at "
        f"WHERE {t}.deleted_at IS NULL AND {t}.clerk_updated_at < excluded.clerk_updated_at"
        + (" RETURNING id" if returning else "")
    ), names)


@functools.cache
def _tombstone_sql(entity: Entity, dialect: str) -> sa.TextClause:
    table = _TABLES[entity]
    t, names = table.name, ["clerk_id", "clerk_updated_at", *_TOMBSTONE_FILL[entity]]
    if dialect == "mysql":  # deleted_at last: the assignments before it read the old one
        live = f"{t}.deleted_at IS NULL"
        return _typed(table, (
            f"INSERT INTO {t} ({', '.join(map(_q, names))}, created_at, updated_at, deleted_at) "
            f"SELECT {', '.join(':' + n for n in names)}, :now, :now, :now FROM DUAL {_NOT_ERASED % ':erased'} "
            "ON DUPLICATE KEY UPDATE "
            f"clerk_updated_at = IF({live}, GREATEST({t}.clerk_updated_at, VALUES(clerk_updated_at)), "
            f"{t}.clerk_updated_at), updated_at = IF({live}, VALUES(updated_at), {t}.updated_at), "
            f"deleted_at = IF({live}, VALUES(deleted_at), {t}.deleted_at)"
        ), names)
    return _typed(table, (
        f"INSERT INTO {t} ({', '.join(names)}, created_at, updated_at, deleted_at) "
        f"SELECT {', '.join(':' + n for n in names)}, :now, :now, :now {_NOT_ERASED % ':erased'} "
        f"ON CONFLICT (clerk_id) DO UPDATE SET deleted_at = excluded.deleted_at, updated_at = excluded.updated_at, "
        f"clerk_updated_at = CASE WHEN {t}.clerk_updated_at > excluded.clerk_updated_at "
        f"THEN {t}.clerk_updated_at ELSE excluded.clerk_updated_at END "
        f"WHERE {t}.deleted_at IS NULL RETURNING id"
    ), names)


_INBOX_NAMES = ["svix_id", "type", "instance_id", "event_timestamp", "status", "last_error", "applied_at"]


def _jsonb(name: str, dialect: str) -> str:
    """A JSON text parameter as the payload column takes it (JSONB parses it on PostgreSQL)."""
    return f"CAST({name} AS JSONB)" if dialect == "postgresql" else name


def _inbox_duplicate(dialect: str) -> str:
    """A repeated ``svix_id`` inserts nothing (and says so: no RETURNING row, or MySQL's counts)."""
    return ("ON DUPLICATE KEY UPDATE svix_id = webhook_events.svix_id" if dialect == "mysql"
            else "ON CONFLICT (svix_id) DO NOTHING RETURNING id")


@functools.cache
def _inbox_sql(dialect: str) -> sa.TextClause:
    # The payload is bound as text: the verified body is stored as received (JSONB parses it on PG).
    return _typed(webhook_events, (
        f"INSERT INTO webhook_events ({', '.join(_INBOX_NAMES)}, payload, received_at, attempts) "
        f"VALUES ({', '.join(':' + n for n in _INBOX_NAMES)}, {_jsonb(':payload', dialect)}, :now, 1) "
        f"{_inbox_duplicate(dialect)}"
    ), _INBOX_NAMES).bindparams(sa.bindparam("payload", type_=sa.Text))


# The user a delivery names is a tombstone or erased (see Writer.record_delivery's ``unless_gone``).
_GONE = ("SELECT (EXISTS (SELECT 1 FROM users WHERE clerk_id = {p} AND deleted_at IS NOT NULL) "
         f"OR EXISTS (SELECT 1 FROM {erased.name} WHERE digest = {{d}})) AS gone")


def _inbox_naming_text(dialect: str, mark: Callable[[str], str]) -> str:
    """The text of :func:`_inbox_naming_sql`, its parameters written by ``mark`` (``:name``, or ``?`` for the
    sqlite3 driver: positional, so in this order)."""
    return (
        f"INSERT INTO webhook_events ({', '.join(_INBOX_NAMES)}, payload, received_at, attempts, redacted_at) "
        f"SELECT {', '.join(mark(n) for n in _INBOX_NAMES)}, CASE WHEN g.gone THEN "
        f"{_jsonb(mark('redacted'), dialect)} ELSE {_jsonb(mark('payload'), dialect)} END, {mark('now')}, 1, "
        f"CASE WHEN g.gone THEN {mark('now')} END FROM ({_GONE.format(p=mark('person'), d=mark('erased'))}) AS g "
        f"WHERE 1 = 1 {_inbox_duplicate(dialect)}"
    )


@functools.cache
def _inbox_naming_sql(dialect: str) -> sa.TextClause:
    """:func:`_inbox_sql` whose payload is ``:redacted`` (and ``redacted_at`` set) when the user
    ``:person`` is a tombstone or erased: one statement, as the inbox row alone is."""
    return _typed(webhook_events, _inbox_naming_text(dialect, lambda name: f":{name}"), _INBOX_NAMES).bindparams(
        sa.bindparam("payload", type_=sa.Text), sa.bindparam("redacted", type_=sa.Text),
        sa.bindparam("person", type_=users.c.clerk_id.type))


_LOCKS_SQL = "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k"  # in the array's (sorted) order
_RAW_INBOX_SQL = (
    "INSERT INTO webhook_events (svix_id, type, instance_id, event_timestamp, status, last_error, applied_at, "
    "payload, received_at, attempts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, 1) "
    "ON CONFLICT (svix_id) DO NOTHING RETURNING id"
)
_RAW_PARENT_DELETED_SQL = (  # Writer._delete_membership_if_parent_deleted, as psycopg SQL (no alias: SQLite too)
    "UPDATE organization_memberships SET deleted_at = %s, updated_at = %s "
    "WHERE clerk_id = %s AND deleted_at IS NULL AND ("
    "EXISTS (SELECT 1 FROM users u WHERE u.clerk_id = organization_memberships.user_clerk_id "
    "AND u.deleted_at IS NOT NULL) OR "
    "EXISTS (SELECT 1 FROM organizations o WHERE o.clerk_id = organization_memberships.organization_clerk_id "
    "AND o.deleted_at IS NOT NULL)) RETURNING id"
)


# The same statements for the sqlite3 driver (its placeholders; the payload is text there).
_SQLITE_INBOX_SQL = _RAW_INBOX_SQL.replace("%s::jsonb", "%s").replace("%s", "?")
_SQLITE_INBOX_NAMING_SQL = _inbox_naming_text("sqlite", lambda name: "?")
_SQLITE_PARENT_DELETED_SQL = _RAW_PARENT_DELETED_SQL.replace("%s", "?")


@functools.cache
def _sqlite_upsert(entity: Entity) -> tuple[str, list[Callable[[Any], Any] | None]]:
    """The guarded upsert for the sqlite3 driver, and SQLAlchemy's conversions of its record's columns
    (then ``now`` twice and the erased digests). The inbox row, this upsert and the membership check of
    every delivery on SQLite skip SQLAlchemy's per-call work (compile cache, bind processing, result
    set-up), which cost more than the statements themselves; values are converted exactly as it would."""
    table = _TABLES[entity]
    return (_raw_upsert_sql(entity)[0].replace("%s", "?"),
            processors([table.c[n].type for n in _RECORD_FIELDS[entity]], sqlite.dialect()))


def _raw_upsert(entity: Entity, returning: str, *, unless_stored: bool = False) -> str:
    """:func:`_upsert_sql` as psycopg SQL (positional: the record's fields, now, now, the erased digests, and
    with ``unless_stored`` the delivery's ``svix_id``: see :data:`_UNLESS_STORED`)."""
    table, names = _TABLES[entity], _RECORD_FIELDS[entity]
    t = table.name
    sets = ", ".join(f"{n} = excluded.{n}" for n in names if n != "clerk_id")
    return (
        f"INSERT INTO {t} ({', '.join(names)}, created_at, updated_at) SELECT {', '.join(['%s'] * (len(names) + 2))} "
        f"{_not_erased(entity, named=False)}{_UNLESS_STORED % '%s' if unless_stored else ''} "
        f"ON CONFLICT (clerk_id) DO UPDATE SET {sets}, updated_at = excluded.updated_at "
        f"WHERE {t}.deleted_at IS NULL AND {t}.clerk_updated_at < excluded.clerk_updated_at RETURNING {returning}"
    )


# The statements that write the inbox row and the upsert together run the upsert before the inbox insert
# knows the delivery is a duplicate. A duplicate ``svix_id`` must apply nothing, as on SQLite and MariaDB:
# not the version guard's job alone, since the stored delivery may be one ``failed`` (``replay`` applies it,
# updating its inbox row) or dismissed (``ignored``), or a re-send of the id with another body, none of
# which the inbox would then say was applied. The inbox row of the delivery itself is not seen: written in
# the same statement (a data-modifying CTE sees the snapshot before it), or, for a membership, after it.
_UNLESS_STORED = " AND NOT EXISTS (SELECT 1 FROM webhook_events f_ WHERE f_.svix_id = %s)"


def _json_at(entity: Entity) -> tuple[int, ...]:
    """Positions of the JSON fields among the record's (psycopg needs them wrapped in ``Jsonb``)."""
    table = _TABLES[entity]
    return tuple(i for i, n in enumerate(_RECORD_FIELDS[entity]) if isinstance(table.c[n].type, sa.JSON))


# The inbox row of a one-statement delivery, its status from the upsert CTE ``up`` (psycopg parameters:
# svix_id, type, instance_id, event_timestamp, last_error, applied_at, payload, received_at).
_RAW_INBOX_CTE = (
    "ins AS (INSERT INTO webhook_events (svix_id, type, instance_id, event_timestamp, status, last_error, "
    "applied_at, payload, received_at, attempts) VALUES (%s, %s, %s, %s, "
    f"CASE WHEN EXISTS (SELECT 1 FROM up) THEN '{DeliveryStatus.APPLIED}' ELSE '{DeliveryStatus.SKIPPED}' END, "
    "%s, %s, %s::jsonb, %s, 1) ON CONFLICT (svix_id) DO NOTHING RETURNING status)"
)


@functools.cache
def _raw_upsert_sql(entity: Entity, *, unless_stored: bool = False) -> tuple[str, tuple[int, ...]]:
    """:func:`_upsert_sql` as psycopg SQL (positional), and the positions of its JSON parameters."""
    return _raw_upsert(entity, "id", unless_stored=unless_stored), _json_at(entity)
# svix_id, payload text, event type, instance id, event timestamp (ms), reason, the upsert
OneStatement = tuple[str, str, str, str | None, int | None, str | None, Upsert]


@functools.cache
def _one_statement_sql(entity: Entity, mapped: str = "") -> tuple[str, tuple[int, ...]]:
    """psycopg SQL for :meth:`Writer.record_and_upsert`, and the positions of its JSON parameters.

    Parameters: the record's, now, now, the erased digest, the svix_id (:data:`_UNLESS_STORED`), then the
    inbox row's, then those of ``mapped`` (a mapped table's upsert, :meth:`SchemaMapping.cte`; "" for none)."""
    also = f", {mapped}" if mapped else ""
    up = _raw_upsert(entity, '1', unless_stored=True)
    return f"WITH up AS ({up}), {_RAW_INBOX_CTE}{also} SELECT status FROM ins", _json_at(entity)


@functools.cache
def _wave_sql(entity: Entity, mapped_columns: str = "", mapped: str = "", hooks: tuple[HookSpec, ...] = ()) -> str:
    """Many deliveries of ``entity`` in one statement: the guarded upserts and the inbox rows of a "wave",
    at most one delivery per entity and per ``svix_id`` (so every row is written once), passed as one
    JSON array (json_to_recordset: one parameter, parsed in C, instead of ~20 adapted parameters and a
    psycopg cursor per delivery). With ``mapped`` (:meth:`SchemaMapping.wave`: its values are the rows'
    ``m0``, ``m1``.. described by ``mapped_columns``) the app's rows are written too, and with ``hooks``
    the jobs of the changes (:func:`~clerk_sync.outbox.jobs_wave_sql`, from the rows before as jsonb).
    Returns each delivery's status (NULL: a duplicate ``svix_id``) in the array's order. Parameters: the
    array, now four times, then with ``hooks`` those of jobs_wave_sql."""
    table, names = _TABLES[entity], _RECORD_FIELDS[entity]
    t = table.name
    # (the record's JSON fields come as JSON values: never None, a dict or list is the same jsonb either way)
    columns = ", ".join(f"{n} {'jsonb' if isinstance(table.c[n].type, sa.JSON) else json_column_type(table.c[n].type)}"
                        for n in names)
    sets = ", ".join(f"{n} = excluded.{n}" for n in names if n != "clerk_id")
    extra = (f", {mapped_columns}" if mapped_columns else "") + (", doc_ jsonb, version_ bigint" if hooks else "")
    before = (f"before AS (SELECT r.clerk_id AS k_, to_jsonb(r) AS prev FROM (SELECT {', '.join(names)} FROM {t} "
              "WHERE clerk_id IN (SELECT v.clerk_id FROM v) AND deleted_at IS NULL) AS r), " if hooks else "")
    also = (f", {mapped}" if mapped else "") + (f", {jobs_wave_sql(hooks)}" if hooks else "")
    return (
        f"WITH v AS (SELECT * FROM json_to_recordset(%s::json) AS v(o integer, {columns}, erased_ text, "
        f"svix_id_ text, type_ text, instance_ text, event_ts_ bigint, error_ text, payload_ jsonb{extra})), {before}"
        f"up AS (INSERT INTO {t} ({', '.join(names)}, created_at, updated_at) "
        f"SELECT {', '.join('v.' + n for n in names)}, %s::timestamptz, %s::timestamptz FROM v "
        f"WHERE NOT EXISTS (SELECT 1 FROM {erased.name} x WHERE x.digest = v.erased_)"
        f"{_UNLESS_STORED % 'v.svix_id_'} ORDER BY v.clerk_id "
        f"ON CONFLICT (clerk_id) DO UPDATE SET {sets}, updated_at = excluded.updated_at "
        f"WHERE {t}.deleted_at IS NULL AND {t}.clerk_updated_at < excluded.clerk_updated_at RETURNING clerk_id), "
        "ins AS (INSERT INTO webhook_events (svix_id, type, instance_id, event_timestamp, status, last_error, "
        "applied_at, payload, received_at, attempts) SELECT v.svix_id_, v.type_, v.instance_, v.event_ts_, "
        f"CASE WHEN EXISTS (SELECT 1 FROM up WHERE up.clerk_id = v.clerk_id) THEN '{DeliveryStatus.APPLIED}' "
        f"ELSE '{DeliveryStatus.SKIPPED}' END, v.error_, %s::timestamptz, v.payload_, %s::timestamptz, 1 "
        f"FROM v ORDER BY v.o ON CONFLICT (svix_id) DO NOTHING RETURNING svix_id, status){also} "
        "SELECT ins.status FROM v LEFT JOIN ins ON ins.svix_id = v.svix_id_ ORDER BY v.o"
    )


@functools.cache
def _hooked_statement_sql(entity: Entity, mapped: str = "") -> tuple[str, tuple[int, ...]]:
    """:func:`_one_statement_sql` that also returns whether the upsert applied and the live row before it
    (all NULL when there was none): ``status, upserted, <record fields>``. The caller holds the entity's
    advisory lock, so the row read is the one the upsert replaces (every part sees the same snapshot).
    Parameters: the Clerk id, then :func:`_one_statement_sql`'s."""
    t, names = _TABLES[entity].name, _RECORD_FIELDS[entity]
    also = f", {mapped}" if mapped else ""
    sql = (
        f"WITH before AS (SELECT {', '.join(names)} FROM {t} WHERE clerk_id = %s AND deleted_at IS NULL), "
        f"up AS ({_raw_upsert(entity, '1', unless_stored=True)}), {_RAW_INBOX_CTE}{also} "
        "SELECT (SELECT status FROM ins), EXISTS (SELECT 1 FROM up), before.* "
        "FROM (SELECT 1) AS one LEFT JOIN before ON true"
    )
    return sql, _json_at(entity)


@functools.cache
def _jobs_statement_sql(entity: Entity, mapped: str, hooks: tuple[HookSpec, ...]) -> tuple[str, tuple[int, ...]]:
    """:func:`_one_statement_sql` that also writes the hook jobs of the change (:func:`jobs_cte_sql` for
    ``hooks``), from the live row before it as jsonb. The caller holds the entity's advisory lock, so
    that row is the one the upsert replaces. Parameters: the Clerk id, then :func:`_one_statement_sql`'s,
    then :meth:`Outbox.jobs_params`."""
    t, names = _TABLES[entity].name, _RECORD_FIELDS[entity]
    also = f", {mapped}" if mapped else ""
    sql = (
        f"WITH before AS (SELECT to_jsonb(r) AS prev FROM (SELECT {', '.join(names)} FROM {t} "
        "WHERE clerk_id = %s AND deleted_at IS NULL) AS r), "
        f"up AS ({_raw_upsert(entity, '1', unless_stored=True)}), {_RAW_INBOX_CTE}{also}, {jobs_cte_sql(hooks)} "
        "SELECT status FROM ins"
    )
    return sql, _json_at(entity)


def _hooked_change(intent: Upsert, before: Sequence[Any]) -> Change | None:
    """The change an applied upsert made, from the row before it (all NULL: there was none)."""
    names = _RECORD_FIELDS[intent.entity]
    old = None if before[0] is None else dict(zip(names, before, strict=True))
    return describe(intent.entity, intent.clerk_id, intent.version, old, _change_values(intent.record))


def _change_values(record: Record) -> dict[str, Any]:
    """What a change carries: every field of the record (the columns, and e.g. a user's external_id)."""
    names = _FIELD_NAMES.get(type(record))
    if names is None:
        names = _FIELD_NAMES[type(record)] = tuple(f.name for f in fields(record))
    return {name: getattr(record, name) for name in names}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # per record class (dataclasses.fields is slow per call)


def _run_raw(raw: Any, statements: Sequence[tuple[str, list[Any]]], *, pipeline: bool,
             many: Collection[int] = ()) -> list[Any]:
    """Run psycopg statements (in one pipeline when asked and there are several); the first row of each
    (None when it returned none), every row of those in ``many``. psycopg errors come out as
    SQLAlchemy's, as execute's do."""
    import psycopg

    rows: list[Any] = []
    # Already in the caller's pipeline: no nested one (entering it would sync what the caller queued, one
    # more round trip); the first fetchone asks the server for the results so far (a flush, not a sync).
    piped = raw.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF
    cursors: list[Any] = []
    try:
        with raw.pipeline() if pipeline and len(statements) > 1 and not piped else nullcontext():
            for sql, values in statements:
                cur = psycopg.RawCursor(raw)
                cursors.append(cur)
                cur.execute(_native(sql), values)
            for n, cur in enumerate(cursors):
                rows.append(cur.fetchall() if n in many else cur.fetchone())
                cur.close()
    except psycopg.Error as exc:
        # The statement the error is about. Piped, any fetch may raise it: results come in order and the
        # failed statement's cursor is the first without one (those after it were skipped). Alone, its
        # execute raised: the last cursor.
        failed = next((i for i, c in enumerate(cursors)
                       if c.pgresult is None or c.pgresult.status == psycopg.pq.ExecStatus.FATAL_ERROR),
                      len(cursors) - 1)
        raise sa.exc.DBAPIError.instance(statements[max(failed, 0)][0], None, exc, psycopg.Error,
                                         hide_parameters=True, connection_invalidated=bool(raw.closed)) from exc
    return rows


@functools.lru_cache(maxsize=512)
def _native(sql: str) -> str:
    """A ``%s`` statement in PostgreSQL's own ``$n`` form, for ``psycopg.RawCursor`` (``%%`` back to
    ``%``; text, so the cursor encodes it in the connection's encoding). psycopg's own cursor splits a
    statement on every execution when it is longer than 4,096 characters or has more than 50
    parameters (the bounds of its cache): a wide mapping plus a hook crossed them, ~0.1 ms of Python
    each time (BENCHMARKS.md, issue 11). Any other ``%`` sequence is refused, as psycopg would."""
    count = itertools.count(1)

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) == "%":
            return "%"
        if match.group(1) == "s":
            return f"${next(count)}"
        raise ValueError(f"only %s placeholders and %% are supported, got {match.group(0)!r} in: {sql[:200]}")

    return _PLACEHOLDER.sub(placeholder, sql)


_PLACEHOLDER = re.compile(r"%(.?)", re.DOTALL)


class Store:
    """Owns the engine; hands out one :class:`Writer` per transaction."""

    def __init__(self, engine: Engine, *, now: Clock = _utcnow, hooks: Sequence[Hook] = (),
                 mapping: SchemaMapping | None = None) -> None:
        self.engine = engine
        self._now = now
        self.hooks = _checked_hooks(hooks)  # every unit of work queues their jobs (clerk_sync.outbox)
        self.mapping = mapping  # and writes the app's own tables (clerk_sync.mapping)
        if mapping is not None:
            mapping.check_dialect(engine.dialect.name)  # (a schema-qualified table on SQLite: said now)
        # SQLite has one writer; queueing our own threads on a lock is fair and immediate, where
        # SQLite's busy handler sleeps and polls (a 0.4-0.6 s p99 tail at 16 senders).
        self._writers: AbstractContextManager[Any] = (
            threading.RLock() if engine.dialect.name == "sqlite" else nullcontext()
        )
        self.dialect = dialect_family(engine.dialect)  # "postgresql", "sqlite" or "mysql"
        self._reflected = False  # the mapped tables, before the first transaction (see _reflect_mapped)

    def now(self) -> datetime:
        """The store's clock (injected in tests): what its writes stamp, and what "due" means for hook jobs. In
        UTC: a naive clock's reading is UTC (``.timestamp()`` would read it in the host's zone), an aware one's
        converted."""
        return as_utc(self._now())

    @classmethod
    def from_url(cls, url: str, *, hooks: Sequence[Hook] = (), mapping: SchemaMapping | None = None,
                 **engine_kwargs: Any) -> Store:
        return cls(create_engine(url, **engine_kwargs), hooks=hooks, mapping=mapping)

    @classmethod
    def from_settings(cls, settings: Settings, *, hooks: Sequence[Hook] = (),
                      mapping: SchemaMapping | None = None) -> Store:
        """The store every command and face builds from the settings: ``DATABASE_URL`` with its
        ``CLERK_SYNC_DB_*`` timeouts and pool size (one place, so no command forgets them)."""
        url = settings.sqlalchemy_url()
        pool: dict[str, int] = {} if url.startswith("sqlite") else {
            "pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow}
        return cls.from_url(url, timeouts=settings.database_timeouts(), hooks=hooks, mapping=mapping,
                            transaction_pooler=settings.db_transaction_pooler, **pool)

    @contextmanager
    def transaction(self, *, unmapped: str | None = None) -> Iterator[Writer]:
        """One unit of work: commit on success, roll back on any error; DB errors become StoreError.
        ``unmapped``: why the app's mapped tables are left out of it (see :meth:`run`)."""
        written: Writer | None = None  # the unit of work, once it is only to be committed
        if not self._reflected:
            self._reflect_mapped()
        try:
            with self._writers, self.engine.begin() as conn:
                writer = Writer(conn, self.now(), hooks=self.hooks, mapping=self.mapping, unmapped=unmapped)
                yield writer
                written = writer
        except sa.exc.SQLAlchemyError as exc:
            if written is not None and unmapped is None and self._deferred_refusal(exc):
                raise RefusedAtCommit(
                    "the app's tables refused the transaction at COMMIT (FOREIGN KEY constraint failed: a "
                    "DEFERRABLE INITIALLY DEFERRED key, as Django declares them on SQLite); nothing was applied",
                    written.mapped_changes) from exc
            raise store_error(exc) from exc
        if written is not None and written.outbox is not None:
            written.outbox.committed()  # (after the COMMIT: what it counts is written)

    def _reflect_mapped(self) -> None:
        """Reflect the app's mapped tables before the first transaction: a writer's pipelined path would do it
        mid-transaction on a second connection, and through PgBouncer (transaction mode) each open transaction
        holds a server connection: with as many writers as the pool has, all waited for ever for one more.

        ``pipelines`` says False, never raises, when its reflection failed: a table it answered False for is
        reflected once more here, on a connection of its own as there, to tell. A database error (down at first
        use, a pooled connection gone, a pooler whose logins succeed with the server down) is a StoreError, and the
        reflection is tried again before the next transaction: one attempt per transaction, each bounded by the
        connect and statement timeouts (marked done, it came back mid-transaction once the database did). The
        mapping's own problems (a table or column missing) are left to the writes that meet them, as before."""
        if self.mapping is not None and self.dialect == "postgresql":
            try:
                with self.engine.connect() as conn:  # (it runs nothing itself: holds no server connection)
                    unsure = [mapped.table for entity, mapped in self.mapping.tables.items()
                              if not self.mapping.pipelines(conn, entity)]
                for name in unsure:  # (linking, or no unique index: the mapping's answer, reflected fine)
                    with self.engine.connect() as own:
                        self.mapping.table(own, name)
            except sa.exc.SQLAlchemyError as exc:
                if not isinstance(exc, sa.exc.NoSuchTableError) and not is_schema_behind(getattr(exc, "orig", None)):
                    raise store_error(exc) from exc
            except Exception:  # noqa: S110 - the mapping refusing the table (one of clerk-sync's): said at its use
                pass
        self._reflected = True

    def _deferred_refusal(self, exc: sa.exc.SQLAlchemyError) -> bool:
        """SQLite with a mapping: a COMMIT a foreign key refused. Ours are checked at each statement, so it is
        one of the app's tables' deferred keys (SQLite cannot check those at once, as PostgreSQL does)."""
        return (self.mapping is not None and self.dialect == "sqlite"
                and is_foreign_key_violation(getattr(exc, "orig", None)))

    def run(self, work: Callable[[Writer], _T]) -> _T:
        """``work`` in one transaction, constraints checked at each statement (:meth:`Writer.check_at_once`);
        when an app's mapped table rolled that transaction back whole (:class:`~clerk_sync.mapping.AppTableRolledBack`,
        or on SQLite a deferred foreign key that refused its COMMIT, :class:`~clerk_sync.mapping.RefusedAtCommit`),
        once more with the app's tables left out, so the contract rows, the inbox and the hook jobs still commit."""
        try:
            with self.transaction() as writer:
                writer.check_at_once()
                return work(writer)
        except AppTableRolledBack as exc:
            unmapped = str(exc)
        except RefusedAtCommit as exc:  # (only with a mapping) a deferred foreign key, SQLite
            assert self.mapping is not None
            with self.connect() as conn:  # raises ParentNotThere while the parents may still arrive (retried)
                unmapped = self.mapping.refused_at_commit(conn, exc.changes)
        log.warning("app_table_rolled_back", reason=unmapped)
        with self.transaction(unmapped=unmapped) as writer:
            writer.check_at_once()
            return work(writer)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A plain connection for reads; DB errors become StoreError."""
        try:
            with self.engine.connect().execution_options(**{_READ_ONLY: True}) as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise store_error(exc) from exc

    def without_hooks(self) -> Store:
        """The same store (engine, clock, writer lock, mapping) queueing no hook jobs: replay, reconcile."""
        twin = copy.copy(self)
        twin.hooks = ()
        return twin

    def ping(self) -> None:
        with self.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
