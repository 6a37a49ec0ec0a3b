"""The database side: engine set-up, and the writes one delivery needs inside one transaction.

Every write that decides something is a single guarded statement (``INSERT .. ON CONFLICT DO UPDATE
.. WHERE``), so concurrent replicas on PostgreSQL stay correct without reading first. Methods of
:class:`Writer` never commit: the caller owns the transaction (``Store.transaction()``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from clerk_sync.engine import Entity, RevokeSession, Tombstone, Upsert
from clerk_sync.errors import StoreError
from clerk_sync.events import MembershipRecord
from clerk_sync.tables import (
    organization_memberships,
    organizations,
    revoked_sessions,
    users,
    webhook_events,
)

__all__ = ["Store", "Writer", "create_engine"]

Clock = Callable[[], datetime]
_READ_ONLY = "clerk_sync_read_only"
_TABLES: dict[Entity, sa.Table] = {
    Entity.USER: users,
    Entity.ORGANIZATION: organizations,
    Entity.MEMBERSHIP: organization_memberships,
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings clerk-sync relies on (SQLite: WAL, busy timeout, BEGIN IMMEDIATE)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **kwargs)
        _tune_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 20)
    return sa.create_engine(url, **kwargs)


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

    def __init__(self, conn: Connection, now: datetime) -> None:
        self.conn = conn
        self.now = now
        self._pg = conn.dialect.name == "postgresql"

    # -- inbox ---------------------------------------------------------------------------------
    def record_delivery(self, svix_id: str, payload: dict[str, Any], *, event_type: str,
                        instance_id: str | None, event_timestamp: int | None) -> bool:
        """Insert the inbox row; False when this ``svix_id`` was already received (a duplicate)."""
        stmt = self._insert(webhook_events).values(
            svix_id=svix_id, type=event_type, instance_id=instance_id,
            event_timestamp=event_timestamp, received_at=self.now, payload=payload,
            status="received", attempts=1,
        ).on_conflict_do_nothing(index_elements=["svix_id"])
        return self._changed(stmt.returning(webhook_events.c.id))

    def finish_delivery(self, svix_id: str, status: str, error: str | None = None,
                        *, count_attempt: bool = False) -> None:
        """Set the outcome of a delivery (applied, skipped, ignored, failed)."""
        values: dict[str, Any] = {"status": status, "last_error": error}
        if status in ("applied", "skipped"):
            values["applied_at"] = self.now
        if count_attempt:
            values["attempts"] = webhook_events.c.attempts + 1
        self.conn.execute(
            webhook_events.update().where(webhook_events.c.svix_id == svix_id).values(**values)
        )

    # -- mirrored rows -------------------------------------------------------------------------
    def lock(self, keys: Sequence[str]) -> None:
        """Serialise writers that touch the same user/organization (PostgreSQL advisory locks).

        Needed for the membership cascade: "membership deleted if its user is deleted" reads one
        row and writes another, which row locks alone cannot order. SQLite has one writer already.
        """
        if not self._pg:
            return
        for key in sorted(set(keys)):
            self.conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_id(key))))

    def apply(self, intent: Upsert | Tombstone | RevokeSession) -> bool:
        """Execute an intent under the ordering guard; True when a row changed."""
        if isinstance(intent, RevokeSession):
            return self._revoke_session(intent)
        self.lock(_lock_keys(intent))
        if isinstance(intent, Upsert):
            changed = self._upsert(intent)
            if intent.entity is Entity.MEMBERSHIP:
                changed = self._delete_membership_if_parent_deleted(intent.clerk_id) or changed
            return changed
        changed = self._tombstone(intent)
        if intent.entity in (Entity.USER, Entity.ORGANIZATION):
            self._cascade_memberships(intent.entity, intent.clerk_id)
        return changed

    def _upsert(self, intent: Upsert) -> bool:
        table = _TABLES[intent.entity]
        values = asdict(intent.record)
        stmt = self._insert(table).values(**values, created_at=self.now, updated_at=self.now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["clerk_id"],
            set_={**{k: stmt.excluded[k] for k in values if k != "clerk_id"}, "updated_at": self.now},
            where=sa.and_(
                table.c.deleted_at.is_(None),
                table.c.clerk_updated_at < stmt.excluded.clerk_updated_at,
            ),
        )
        return self._changed(stmt.returning(table.c.id))

    def _tombstone(self, intent: Tombstone) -> bool:
        table = _TABLES[intent.entity]
        values: dict[str, Any] = {"clerk_id": intent.clerk_id, "clerk_updated_at": intent.version}
        if intent.entity is Entity.MEMBERSHIP:
            # Unknown parents of a tombstone-only membership; never read (the row is deleted).
            values |= {"organization_clerk_id": "", "user_clerk_id": ""}
        stmt = self._insert(table).values(
            **values, created_at=self.now, updated_at=self.now, deleted_at=self.now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["clerk_id"],
            set_={
                "deleted_at": self.now,
                "updated_at": self.now,
                "clerk_updated_at": sa.case(
                    (table.c.clerk_updated_at > stmt.excluded.clerk_updated_at, table.c.clerk_updated_at),
                    else_=stmt.excluded.clerk_updated_at,
                ),
            },
            where=table.c.deleted_at.is_(None),
        )
        return self._changed(stmt.returning(table.c.id))

    def _revoke_session(self, intent: RevokeSession) -> bool:
        stmt = self._insert(revoked_sessions).values(
            session_id=intent.session_id, user_clerk_id=intent.user_id, reason=intent.reason,
            expire_at=intent.expire_at, revoked_at=self.now,
        ).on_conflict_do_nothing(index_elements=["session_id"])
        return self._changed(stmt.returning(revoked_sessions.c.id))

    def _cascade_memberships(self, entity: Entity, clerk_id: str) -> None:
        m = organization_memberships
        column = m.c.user_clerk_id if entity is Entity.USER else m.c.organization_clerk_id
        self.conn.execute(
            m.update()
            .where(column == clerk_id, m.c.deleted_at.is_(None))
            .values(deleted_at=self.now, updated_at=self.now)
        )

    def _delete_membership_if_parent_deleted(self, clerk_id: str) -> bool:
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

    def _changed(self, stmt: Any) -> bool:
        # RETURNING, not rowcount: with implicit RETURNING drivers report rowcount -1, and a
        # skipped ON CONFLICT .. DO UPDATE WHERE returns no row on both SQLite and PostgreSQL.
        return self.conn.execute(stmt).first() is not None

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table) if self._pg else sqlite.insert(table)


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


class Store:
    """Owns the engine; hands out one :class:`Writer` per transaction."""

    def __init__(self, engine: Engine, *, now: Clock = _utcnow) -> None:
        self.engine = engine
        self._now = now

    @classmethod
    def from_url(cls, url: str, **engine_kwargs: Any) -> Store:
        return cls(create_engine(url, **engine_kwargs))

    @contextmanager
    def transaction(self) -> Iterator[Writer]:
        """One unit of work: commit on success, roll back on any error; DB errors become StoreError."""
        try:
            with self.engine.begin() as conn:
                yield Writer(conn, self._now())
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(getattr(exc, 'orig', None) or exc).__name__}: {exc}") from exc

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A plain connection for reads; DB errors become StoreError."""
        try:
            with self.engine.connect().execution_options(**{_READ_ONLY: True}) as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"database error: {exc}") from exc

    def ping(self) -> None:
        with self.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
