"""The contract tables (public: apps JOIN their own tables to these) and clerk-sync's own bookkeeping
(inbox, deny list, pending role changes, reconcile runs). Migrations mirror this file.

Column sizes that Clerk values must fit come from ``clerk_sync._limits``, where the webhook path checks
them before either store sees a value (so SQLite, which would store anything, decides like PostgreSQL).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from clerk_sync._limits import (
    CLERK_ID_CHARS,
    EMAIL_CHARS,
    EVENT_TYPE_CHARS,
    INSTANCE_ID_CHARS,
    NAME_CHARS,
    ROLE_CHARS,
    SVIX_ID_CHARS,
)

__all__ = [
    "audit_log",
    "erased",
    "hook_jobs",
    "metadata",
    "organization_memberships",
    "organizations",
    "pending_role_changes",
    "reconcile_runs",
    "reconcile_seen",
    "revoked_sessions",
    "seen_columns",
    "sync_locks",
    "users",
    "webhook_events",
]

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BIGINT primary keys, but INTEGER on SQLite so they alias ROWID and autoincrement.
PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class JSONText(sa.types.TypeDecorator[Any]):
    """JSON kept as text on MySQL/MariaDB. MariaDB's ``JSON`` is LONGTEXT with a ``JSON_VALID`` check
    that refuses nesting deeper than 32 levels, which a signed Clerk event may hold (``_limits`` allows
    64, as PostgreSQL and SQLite store): the check would turn such an event into a 503 forever."""

    impl = mysql.LONGTEXT
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        return None if value is None else json.dumps(value)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else json.loads(value)


JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql").with_variant(JSONText(), "mysql", "mariadb")
class _WallClockUTC(sa.types.TypeDecorator[datetime]):
    """A date-time column without a time zone holding UTC: an aware value is converted first (the drivers,
    and SQLAlchemy on SQLite, drop its offset); read back naive."""

    impl: sa.types.TypeEngine[datetime] = sa.DateTime()
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if isinstance(value, datetime) and value.tzinfo is not None:  # (anything else as the driver takes it)
            return value.astimezone(UTC).replace(tzinfo=None)
        return value


class UTCDateTime(_WallClockUTC):
    """MySQL's DATETIME(6) holding UTC (read back naive, as SQLite gives it). Plain DATETIME keeps whole
    seconds."""

    impl = mysql.DATETIME(fsp=6)
    cache_ok = True


class SQLiteUTCDateTime(_WallClockUTC):
    """SQLite's text holding UTC: SQLAlchemy wrote an aware value's wall clock without its offset, so
    ``07:00-05:00`` (an app's own clock, a ``since=`` in its zone) was stored and compared as 07:00 UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        # (SQLAlchemy writes the wall clock of what it is given: UTC's as it is, the common case, at no cost)
        if isinstance(value, datetime) and value.tzinfo is not None and value.tzinfo is not UTC:
            return value.astimezone(UTC)
        return value


class AwareUTCDateTime(sa.types.TypeDecorator[datetime]):
    """PostgreSQL's timestamptz, a naive value bound as UTC (what a naive time means in clerk-sync): PostgreSQL
    reads a time without an offset in the session's TimeZone, so ``since=datetime(2026, 1, 31, 12)`` under
    ``timezone=Pacific/Chatham`` compared from 22:15 UTC the day before."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        # (a string, an app's own bind, goes as PostgreSQL parses it)
        return value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value


Timestamp = (sa.DateTime(timezone=True).with_variant(AwareUTCDateTime(), "postgresql")
             .with_variant(UTCDateTime(), "mysql", "mariadb").with_variant(SQLiteUTCDateTime(), "sqlite"))
# MySQL/MariaDB tables: 4-byte UTF-8, and a binary collation because Clerk ids are case-sensitive
# (``user_2aB`` and ``user_2Ab`` are two users; the servers' default ``_ci`` collations would merge them).
MYSQL_TABLE: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin", "mysql_engine": "InnoDB"}


def _clerk_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("clerk_created_at", sa.BigInteger, nullable=True),
        sa.Column("clerk_updated_at", sa.BigInteger, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.Column("deleted_at", Timestamp, nullable=True),
    ]


users = sa.Table(
    "users",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("clerk_id", sa.String(CLERK_ID_CHARS), nullable=False, unique=True),
    sa.Column("email", sa.String(EMAIL_CHARS), nullable=True, index=True),
    sa.Column("email_addresses", JSONType, nullable=False, default=list),
    sa.Column("first_name", sa.String(NAME_CHARS), nullable=True),
    sa.Column("last_name", sa.String(NAME_CHARS), nullable=True),
    sa.Column("username", sa.String(NAME_CHARS), nullable=True),
    sa.Column("image_url", sa.Text, nullable=True),
    sa.Column("public_metadata", JSONType, nullable=False, default=dict),
    sa.Column("private_metadata", JSONType, nullable=False, default=dict),
    sa.Column("unsafe_metadata", JSONType, nullable=False, default=dict),
    sa.Column("role", sa.String(ROLE_CHARS), nullable=False, server_default="user"),
    sa.Column("plan", sa.String(64), nullable=False, server_default="free"),
    sa.Column("banned", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("locked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("deprovisioned", sa.Boolean, nullable=False, server_default=sa.false()),  # SCIM (0006)
    sa.Column("last_sign_in_at", sa.BigInteger, nullable=True),
    # When a Clerk lockout ends by itself (ms; NULL: not locked, or locked until Clerk unlocks) (0016)
    sa.Column("locked_until", sa.BigInteger, nullable=True),
    # The clerk_updated_at this release last wrote the row at: locked_until is believed only when it is the
    # row's version (a release before 0017 leaves it behind) (0017)
    sa.Column("lock_version", sa.BigInteger, nullable=True),
    *_clerk_columns(),
    sa.Index("ix_users_updated_at", "updated_at"),  # incremental deny-list refresh
)

organizations = sa.Table(
    "organizations",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("clerk_id", sa.String(CLERK_ID_CHARS), nullable=False, unique=True),
    sa.Column("name", sa.String(NAME_CHARS), nullable=True),
    sa.Column("slug", sa.String(NAME_CHARS), nullable=True, index=True),
    sa.Column("image_url", sa.Text, nullable=True),
    sa.Column("public_metadata", JSONType, nullable=False, default=dict),
    sa.Column("private_metadata", JSONType, nullable=False, default=dict),
    sa.Column("plan", sa.String(64), nullable=False, server_default="free"),
    *_clerk_columns(),
)

organization_memberships = sa.Table(
    "organization_memberships",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("clerk_id", sa.String(CLERK_ID_CHARS), nullable=False, unique=True),
    # Clerk ids, not foreign keys: a membership may arrive before its user or organization.
    sa.Column("organization_clerk_id", sa.String(CLERK_ID_CHARS), nullable=False, index=True),
    sa.Column("user_clerk_id", sa.String(CLERK_ID_CHARS), nullable=False, index=True),
    sa.Column("role", sa.String(ROLE_CHARS), nullable=False, server_default="org:member"),
    sa.Column("permissions", JSONType, nullable=False, default=list),
    *_clerk_columns(),
)

webhook_events = sa.Table(
    "webhook_events",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("svix_id", sa.String(SVIX_ID_CHARS), nullable=False, unique=True),
    sa.Column("type", sa.String(EVENT_TYPE_CHARS), nullable=False, index=True),
    sa.Column("instance_id", sa.String(INSTANCE_ID_CHARS), nullable=True),
    sa.Column("event_timestamp", sa.BigInteger, nullable=True),
    sa.Column("received_at", Timestamp, nullable=False),
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("applied_at", Timestamp, nullable=True),
    sa.Column("redacted_at", Timestamp, nullable=True),  # payload reduced to ids (retention, erasure)
    sa.Index("ix_webhook_events_status_received_at", "status", "received_at"),
    sa.Index("ix_webhook_events_redacted_at_received_at", "redacted_at", "received_at"),
    sa.Index("ix_webhook_events_received_at", "received_at"),  # the console's freshness figures
    # Migration 0008_console also indexes the Clerk ids inside ``payload`` (expression indexes).
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("action", sa.String(64), nullable=False, index=True),
    sa.Column("actor_clerk_id", sa.String(64), nullable=True, index=True),
    sa.Column("target_clerk_id", sa.String(64), nullable=True, index=True),
    sa.Column("impersonator_clerk_id", sa.String(64), nullable=True),
    sa.Column("details", JSONType, nullable=False, default=dict),
    sa.Column("ip", sa.String(64), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False, index=True),
)

revoked_sessions = sa.Table(
    "revoked_sessions",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.String(CLERK_ID_CHARS), nullable=False, unique=True),
    sa.Column("user_clerk_id", sa.String(CLERK_ID_CHARS), nullable=True, index=True),
    sa.Column("reason", sa.String(16), nullable=False),
    sa.Column("expire_at", sa.BigInteger, nullable=True),
    sa.Column("revoked_at", Timestamp, nullable=False, index=True),
)

pending_role_changes = sa.Table(
    "pending_role_changes",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("user_clerk_id", sa.String(64), nullable=False, index=True),
    sa.Column("role", sa.String(64), nullable=False),
    sa.Column("requested_by", sa.String(64), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("done_at", Timestamp, nullable=True),
    # a `retry-pending` run pushing it until then (another run passes it over; 0021)
    sa.Column("pushing_until", Timestamp, nullable=True),
)

# -- Bookkeeping of ``clerk-sync reconcile`` (not contract tables): runs with their cursor, and seen ids.

# One row per run: where it is (phase + offset), what it did so far, and a heartbeat so a second
# invocation can tell a live run from a killed one.
reconcile_runs = sa.Table(
    "reconcile_runs",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("since", Timestamp, nullable=True),
    sa.Column("phase", sa.String(32), nullable=False),
    sa.Column("cursor", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deleted", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unchanged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duration_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("details", JSONType, nullable=False, default=dict),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("heartbeat_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp, nullable=True),
)

#: A resumed run's ``details``: when its last attempt started (ISO 8601): freshness measures missed deliveries
#: from it (``read_snapshot``), not from the first attempt's ``started_at``.
RECONCILE_ATTEMPT_STARTED = "attempt_started_at"

# The Clerk ids a run has listed, per table: staged here rather than in memory so 10 M users cost
# no RAM and a resumed run still knows what it saw before the kill.
def seen_columns() -> list[sa.Column[Any]]:
    """Fresh columns of ``reconcile_seen`` (a dry run builds a TEMPORARY twin from them)."""
    return [
        sa.Column("run_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("entity", sa.String(32), primary_key=True),
        sa.Column("clerk_id", sa.String(64), primary_key=True),
    ]


reconcile_seen = sa.Table("reconcile_seen", metadata, *seen_columns())


# -- The hooks outbox (``clerk_sync.outbox``): one row per (applied change, hook that wants it),
# written in the apply's transaction; dispatchers claim, run and delete them (dead ones stay). PostgreSQL also
# has a partial index on (hook, id) of unfinished jobs, declared in migration 0018 only (as 0008's expression
# indexes): a dispatcher's claim of its own hooks' jobs does not walk another hook's backlog.
hook_jobs = sa.Table(
    "hook_jobs",
    metadata,
    sa.Column("id", PK, primary_key=True, autoincrement=True),
    sa.Column("hook", sa.String(64), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    # hook + entity + Clerk id: a job waits while an earlier one with the same key is unfinished.
    sa.Column("entity_key", sa.String(200), nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=False),
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | running | dead
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("available_at", Timestamp, nullable=False),
    sa.Column("lease_until", Timestamp, nullable=True),
    sa.Column("claim_token", sa.String(36), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Index("ix_hook_jobs_status_available_at", "status", "available_at"),
    sa.Index("ix_hook_jobs_entity_key_id", "entity_key", "id"),
)


# Row locks standing in for PostgreSQL's advisory locks on MySQL/MariaDB (``store.Writer.lock``): a
# writer upserts the rows of the keys it needs, in sorted order, and holds them until it commits.
sync_locks = sa.Table(
    "clerk_sync_locks",
    metadata,
    sa.Column("lock_key", sa.BigInteger, primary_key=True, autoincrement=False),
)

# Hard-deleted tombstones (``RetentionPolicy.delete_tombstones_after``): the SHA-256 of
# "entity:clerk_id", not the id, so the table lists nobody; every guarded insert consults it, so a
# late or replayed event cannot bring an erased entity back.
erased = sa.Table(
    "clerk_sync_erased",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("entity", sa.String(32), nullable=False),
    sa.Column("erased_at", Timestamp, nullable=False),
)

for _table in metadata.tables.values():
    _table.dialect_kwargs.update(MYSQL_TABLE)
