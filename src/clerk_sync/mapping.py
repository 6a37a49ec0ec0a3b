"""Sync into the app's own tables through a declarative mapping (users, organizations, memberships).

The contract tables stay the source of ordering truth: they keep the versions and tombstones, and the
guarded upsert there decides whether an event applies. Every change it applies is then *projected*
into the app's table in the same transaction, so the app's table needs only its Clerk-id column and
inherits every guarantee (newer ``updated_at`` wins, terminal deletes, duplicates are no-ops,
membership cascades). Columns the mapping does not name are never written.

Sources (what a column is filled from): any field of the mirrored record (``email`` = the primary
address, ``first_name``, ``image_url``, ``role`` = ``public_metadata.role``, ``banned``…), ``full_name``,
or a dotted metadata path (``public_metadata.plan``, ``private_metadata.stripe.customer``). Transforms:
``lower``, ``strip``, ``str``, ``bool``, ``int``, ``json`` (a JSON text), ``timestamp`` (epoch milliseconds,
as ``last_sign_in_at`` and ``clerk_created_at``, to an aware UTC datetime), each total (``int``, ``bool`` and
``timestamp`` give None for what is not one: see :data:`TRANSFORMS`); or ``compute``, a function of the
record's values, for the rest. An ISO-8601 text into a date-time column is parsed (see :meth:`_Projection.values`).

Delete policies: :class:`SoftDelete` (a timestamp column), :class:`Deactivate` (a boolean column set
false, or a number column set 0), :class:`Anonymise` (mapped personal columns cleared) and :class:`HardDelete`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection

from clerk_sync._db_errors import (
    driver_cursor,
    foreign_key_of,
    is_foreign_key_violation,
    is_insufficient_privilege,
    passing_cause,
    privilege_refusal,
    store_error,
)
from clerk_sync._limits import CLERK_ID_CHARS
from clerk_sync.changes import Change
from clerk_sync.engine import Entity
from clerk_sync.errors import ConfigError, ParentNotThere, StoreDataError, StoreError, database_message
from clerk_sync.events import MembershipRecord, OrganizationRecord, UserRecord, record_columns
from clerk_sync.tables import Timestamp, metadata, organization_memberships, organizations, users

__all__ = [
    "TRANSFORMS",
    "Anonymise",
    "Column",
    "Deactivate",
    "DeletePolicy",
    "HardDelete",
    "LinkAmbiguous",
    "LinkLookup",
    "LinkUnverified",
    "MappedTable",
    "SchemaMapping",
    "SoftDelete",
    "build_unique_indexes_concurrently",
    "check_schema",
    "migrate_schema",
]

JSON = dict[str, Any]
log = structlog.get_logger("clerk_sync.mapping")
_CONTRACT = {Entity.USER: users, Entity.ORGANIZATION: organizations, Entity.MEMBERSHIP: organization_memberships}
_RECORDS: dict[Entity, type[Any]] = {Entity.USER: UserRecord, Entity.ORGANIZATION: OrganizationRecord,
                                     Entity.MEMBERSHIP: MembershipRecord}
PERSONAL = frozenset({"email", "email_addresses", "first_name", "last_name", "full_name", "username", "image_url"})
# What the user (an organization's admins, for an organization) can write in Clerk themselves, from its
# components or Frontend API: any text of their choosing (an e-mail too, any address they can verify), so any
# length. A row the app's table refuses is written again without the columns filled from these (and without a
# ``compute``, which may read them), so the admin's columns (role, ban, a plan) still land: see
# :meth:`SchemaMapping.user_writable`. ``unsafe_metadata`` and every path under it are the user's too.
USER_WRITABLE: dict[Entity, frozenset[str]] = {
    Entity.USER: PERSONAL | {"unsafe_metadata"},
    Entity.ORGANIZATION: frozenset({"name", "slug", "image_url"}),
    Entity.MEMBERSHIP: frozenset(),
}
# Column types that take one scalar: a metadata path's list or object is not a value of theirs (see
# _Projection.values). Others (JSON, ARRAY, a type reflection does not know) get the value as it is.
_SCALAR_TYPES = (sa.String, sa.Integer, sa.Numeric, sa.Boolean, sa.DateTime, sa.Date, sa.Time, sa.Interval)
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,19}")  # (ASCII digits: "²" and "٣" are digits to str.isdigit)
_BIGINT = range(-(2**63), 2**63)
_TRUE_TEXT = frozenset({"true", "1", "yes", "on"})
_FALSE_TEXT = frozenset({"false", "0", "no", "off", ""})


def _as_int(value: Any) -> int | None:
    """``transform="int"``: an int (not a bool), or a text of ASCII digits with an optional sign (surrounding
    whitespace ignored), within BIGINT's range; None for anything else (``"--5"``, ``"²"``, ``"1.5"``, ``2.0``,
    ``True``, a text of 5,000 digits). Total: a value the user writes (``unsafe_metadata``) never fails the
    row (a narrower column can still refuse a large number: that row's refusal)."""
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        value = int(value.strip())
    elif not isinstance(value, int) or isinstance(value, bool):
        return None
    return value if value in _BIGINT else None


def _as_bool(value: Any) -> bool | None:
    """``transform="bool"``: a bool as it is; a number False when zero, else True; the texts ``"true"``,
    ``"1"``, ``"yes"``, ``"on"`` True and ``"false"``, ``"0"``, ``"no"``, ``"off"``, ``""`` False (case and
    surrounding whitespace ignored); None for anything else (another word, a list, an object)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0 if not math.isnan(value) else None
    if isinstance(value, str):
        text = value.strip().lower()
        return True if text in _TRUE_TEXT else False if text in _FALSE_TEXT else None
    return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _as_timestamp(value: Any) -> datetime | None:
    """``transform="timestamp"``: epoch milliseconds (an int, not a bool: Clerk's ``last_sign_in_at``,
    ``created_at``) as an aware UTC datetime, exact to the millisecond; None for anything else or out of
    datetime's range (years 1 to 9999). A column with a time zone (PostgreSQL's ``timestamptz``) holds the
    instant; one without (PostgreSQL's ``timestamp``, MySQL/MariaDB's ``DATETIME``, any SQLite column) UTC's
    wall clock, whatever the session's zone (README, "Time zones")."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        return _EPOCH + timedelta(milliseconds=value)
    except OverflowError:
        return None


# What each transform makes of a value that is not None (None stays None, then the Column's default): "lower"
# and "strip" change a text, leave anything else as it is; "str" is Python's str(); "json" the value's JSON text
# (keys sorted); "int", "bool", "timestamp": see _as_int, _as_bool, _as_timestamp (never raise: None for what
# is not one).
TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "lower": lambda v: v.lower() if isinstance(v, str) else v,
    "strip": lambda v: v.strip() if isinstance(v, str) else v,
    "str": lambda v: None if v is None else str(v),
    "bool": _as_bool,
    "int": _as_int,
    "json": lambda v: json.dumps(v, sort_keys=True),
    "timestamp": _as_timestamp,
}


class LinkAmbiguous(StoreDataError):
    """Several existing rows match a new Clerk user's external id or e-mail: nothing is guessed. The app's row
    is refused, not the delivery: it is stored ``applied`` (clerk-sync's tables hold the user) with the refusal
    in its ``last_error``, counted among the mapped rows refused (``doctor --freshness``, the metrics), so
    ``clerk-sync replay`` does not take it up again. Resolve the duplicates (merge the rows, or set the
    Clerk-id column on the one to keep), then ``clerk-sync migrate --mapping ... --backfill`` links or writes the
    row; the user's next event does too."""

    code = "link_ambiguous"


class LinkUnverified(StoreDataError):
    """A user may link to an existing row, and nothing says yet that it is theirs: its primary e-mail, which
    Clerk has not verified, is an unlinked row's; or, in a backfill, clerk-sync's tables do not say whether
    Clerk verified it, or the mapping links by external id, which they do not keep (and no lookup from Clerk
    said), or Clerk has another address for the user than the one synced. Not written (neither linked nor a
    second row beside the one it may link, which nothing would link later); the user's next event that says
    (the address verified, an external id set) links it. Counted among the mapped rows refused."""

    code = "link_unverified"


class ValueTooLong(StoreDataError):
    """A mapped text longer than its column's declared length (``column``: which), refused before the
    database is asked, so that every store refuses it alike and the refusal names the column."""

    code = "value_too_long"

    def __init__(self, message: str, column: str) -> None:
        super().__init__(message)
        self.column = column


class AppTableRolledBack(StoreDataError):
    """Writing the app's mapped row rolled back the whole transaction, not just the row (on SQLite, a trigger's
    ``RAISE(ROLLBACK)``): nothing of the unit of work holds, so it is written again without the app's tables
    (each change recorded as refused), and the role, ban or deletion it carries still applies."""

    code = "app_table_rolled_back"


class RefusedAtCommit(StoreError):
    """SQLite: a foreign key of the app's tables declared ``DEFERRABLE INITIALLY DEFERRED`` (Django declares
    every one so) refused the transaction at its COMMIT, naming no statement: nothing of it holds. SQLite
    cannot check such a key at once (PostgreSQL does, :data:`CHECK_AT_ONCE`), so a batch goes one delivery
    at a time, and a delivery refused alone is written again as a refusal at the statement would have left
    it (:meth:`SchemaMapping.refused_at_commit`). ``changes``: what the transaction sent to the app's tables."""

    def __init__(self, message: str, changes: Sequence[Change]) -> None:
        super().__init__(message)
        self.changes = tuple(changes)


class _BackfillWriter(Protocol):
    """What :meth:`SchemaMapping.backfill` uses of a :class:`~clerk_sync.store.Writer` (whose module imports this)."""

    conn: Connection
    now: datetime

    def lock_records(self, entity: Entity, clerk_ids: Sequence[str]) -> None: ...


class _BackfillStore(Protocol):
    """A :class:`~clerk_sync.store.Store`, as :meth:`SchemaMapping.backfill` uses it."""

    def transaction(self) -> AbstractContextManager[_BackfillWriter]: ...


@dataclass(frozen=True, slots=True)
class Column:
    """Where one column's value comes from: ``source`` (+ ``transform``, ``default`` for None), or ``compute``.

    ``personal`` says whether erasure and :class:`Anonymise` clear the column: by default the columns
    from e-mail, names, username and image (:data:`PERSONAL`); say ``personal=True`` for a metadata path
    or a ``compute`` that holds the person's data (a phone number, initials), ``False`` to keep one.

    ``insert_only``: written only into a row clerk-sync inserts (a new Clerk entity's), never into a row
    already there: not when a legacy row is linked (by e-mail or external id), nor on an update, a
    backfill or a replay. For a NOT NULL column the app needs filled that holds the app's own data in its
    existing rows: ``"password": Column(compute=lambda v: "!", insert_only=True)`` gives a new user an unusable
    password and keeps a linked legacy user's password hash (a plain mapped column is the mapping's: every
    link and update rewrites it). Erasure and :class:`Anonymise` clear it as any other when ``personal``."""

    source: str | None = None
    transform: str | None = None
    default: Any = None
    compute: Callable[[JSON], Any] | None = None
    personal: bool | None = None
    insert_only: bool = False

    def __post_init__(self) -> None:
        if (self.source is None) == (self.compute is None):
            raise ValueError("a Column takes a source or a compute function, not both")
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; known: {sorted(TRANSFORMS)}")
        if self.source == "clerk_updated_at":
            raise ValueError("clerk_updated_at is clerk-sync's version, not app data: it cannot be mapped")

    def value(self, values: JSON) -> Any:
        if self.compute is not None:
            return self.compute(values)
        result = _lookup(values, self.source or "")
        if self.transform is not None and result is not None:
            result = TRANSFORMS[self.transform](result)
        return self.default if result is None else result

    @property
    def is_personal(self) -> bool:
        return self.source in PERSONAL if self.personal is None else self.personal

    def user_writable(self, entity: Entity) -> bool:
        """Whether the user can choose this column's value in Clerk (:data:`USER_WRITABLE`); a ``compute``
        counts as such (it may read those fields, and it may raise)."""
        if self.source is None:
            return True
        return self.source in USER_WRITABLE[entity] or self.source.partition(".")[0] in USER_WRITABLE[entity]


@dataclass(frozen=True, slots=True)
class SoftDelete:
    column: str = "deleted_at"


@dataclass(frozen=True, slots=True)
class Deactivate:
    column: str = "is_active"


@dataclass(frozen=True, slots=True)
class Anonymise:
    """Clear the mapped personal columns (from e-mail, names, username, image); keep the row. Cleared is
    NULL, or for a NOT NULL column its Column's ``default`` else ``""`` (see :func:`cleared_values`).
    ``column``: a timestamp column also set at the deletion (as :class:`SoftDelete`'s, NULL while the row
    is live), so the app can tell an anonymised row from a live one with no e-mail; None: none."""

    column: str | None = None


@dataclass(frozen=True, slots=True)
class HardDelete:
    pass


DeletePolicy = SoftDelete | Deactivate | Anonymise | HardDelete


@dataclass(frozen=True, slots=True)
class MappedTable:
    """One entity's target: the app's ``table`` (reflected), its Clerk-id column, its mapped columns.

    ``link_by_external_id`` names the app's own id column (the value Clerk carries as the user's
    ``external_id``) and ``link_by_email`` its e-mail column: a Clerk user seen for the first time is
    linked to the one existing row with that id (tried first), else that e-mail, and no Clerk id yet
    (opt-in; users only), compared exactly (the e-mail after ``lower()``), whatever a MariaDB column's
    collation. Several matching rows: the row is refused, the delivery applied (:class:`LinkAmbiguous`). By
    e-mail only when Clerk verified the user's primary address (otherwise whoever signed up with someone's
    address would get their row): an unverified one that is an unlinked row's is refused
    (:class:`LinkUnverified`), neither linked nor given a row beside it, and the event that verifies it links
    the row; one no row has gets a row of its own.

    ``table`` may name its schema, ``"public.users"`` (PostgreSQL), or its database on the same server,
    ``"app.users"`` (MySQL/MariaDB): how the app keeps a table named as one of clerk-sync's own (``users``,
    ``organizations``, ``organization_memberships``) with clerk-sync's tables in a schema or database of
    their own. Unqualified, it is the connection's (the first schema of its search_path, its database).
    """

    table: str
    clerk_id_column: str
    columns: Mapping[str, str | Column]
    on_delete: DeletePolicy = field(default_factory=SoftDelete)
    link_by_email: str | None = None
    link_by_external_id: str | None = None

    def __post_init__(self) -> None:
        parts = self.table.split(".")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"table {self.table!r}: name a table, or a schema (database) and a table: "
                             "'users' or 'public.users'")
        # A Deactivate flag may be mapped (is_active from "banned"): the mapping's value is the live one, and the
        # deletion still sets it false. A deletion time may not: a value written by every update would make a
        # live row read as deleted, and a deletion keeps the first stamp (one the mapping wrote).
        stamp = self.on_delete.column if isinstance(self.on_delete, SoftDelete | Anonymise) else None
        if stamp is not None and stamp in self.columns:
            raise ValueError(f"{self.table}.{stamp} is the deletion time of on_delete="
                             f"{type(self.on_delete).__name__}({stamp!r}), which clerk-sync writes (NULL while the "
                             "row is live): remove it from the mapped columns, or name another column")

    @property
    def schema(self) -> str | None:
        """The schema (PostgreSQL) or database (MySQL/MariaDB) ``table`` names; None: the connection's."""
        return _split(self.table)[0]

    @property
    def links(self) -> bool:
        return bool(self.link_by_email or self.link_by_external_id)

    @property
    def link_columns(self) -> list[str]:
        return [c for c in (self.link_by_external_id, self.link_by_email) if c]

    def resolved(self) -> dict[str, Column]:
        return {name: c if isinstance(c, Column) else Column(c) for name, c in self.columns.items()}

    def clearable(self) -> dict[str, Column]:
        """The columns erasure and :class:`Anonymise` clear the personal ones of: the mapped columns, and the
        e-mail column rows are linked by, which holds the person's address even when no mapping writes it."""
        columns = self.resolved()
        if self.link_by_email and self.link_by_email not in columns:
            columns[self.link_by_email] = Column("email")
        return columns


class SchemaMapping:
    """The mapped tables per entity; give it to ``Store(engine, mapping=...)``."""

    def __init__(self, *, users: MappedTable | None = None, organizations: MappedTable | None = None,
                 memberships: MappedTable | None = None) -> None:
        self.tables = {e: t for e, t in ((Entity.USER, users), (Entity.ORGANIZATION, organizations),
                                         (Entity.MEMBERSHIP, memberships)) if t is not None}
        for entity, mapped in self.tables.items():
            if mapped.links and entity is not Entity.USER:
                raise ValueError(f"{mapped.table}: link_by_email/link_by_external_id apply to users only")
            for name, col in mapped.resolved().items():
                _check_source(entity, mapped, name, col)
        # Per engine, weakly: an engine's id is reused once it is collected, and a projection reflected through
        # another database's engine would then write with its columns and indexes.
        self._projections: weakref.WeakKeyDictionary[sa.Engine, dict[Entity, _Projection]] = (
            weakref.WeakKeyDictionary())

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a process pool, a task queue): what was reflected stays behind, reflected again there."""
        return {**self.__dict__, "_projections": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._projections = weakref.WeakKeyDictionary()

    def _built(self, engine: sa.Engine) -> dict[Entity, _Projection]:
        """What was reflected through ``engine``; an ``engine.execution_options(...)`` copy (a new OptionEngine each
        call, its connections' ``conn.engine``) shares its parent's, or each call would reflect again."""
        # (OptionEngine keeps its parent as _proxied, SQLAlchemy's only handle on it; a copy of a copy: followed
        # to the root, or the short-lived middle copy would key the cache and each call reflect again)
        while isinstance(parent := getattr(engine, "_proxied", None), sa.Engine):  # (a Mock's would never end)
            engine = parent
        return self._projections.setdefault(engine, {})

    def check_dialect(self, dialect: str) -> None:
        """A :class:`~clerk_sync.errors.ConfigError` for a table the store cannot map (a schema-qualified name on
        SQLite), raised when the store is made: not each delivery refused for it."""
        for mapped in self.tables.values():
            _located(dialect, mapped.table)

    def table(self, conn: Connection, name: str) -> sa.Table:
        """The app's table as the database has it (reflected). On SQLite with its inline ``UNIQUE`` columns
        too (Django writes ``"email" varchar(254) NOT NULL UNIQUE``): SQLAlchemy reflects neither the
        constraint nor its automatic index, and they decide an erased e-mail's value and ON CONFLICT. On
        PostgreSQL its INVALID indexes are marked (``info["invalid"]``, see :func:`_unique`), the names of its
        DEFERRABLE unique and exclusion constraints kept (``info["deferrable"]``, see :func:`_unique`: reflection
        does not tell them) and its schema kept (``info["schema"]``, see :meth:`_Projection.still_referred_to`).
        ``name`` may be schema-qualified (:class:`MappedTable`); every statement built on the table then is."""
        _skip_expression_index_warning()
        schema, bare = _not_clerk_syncs(conn, name)
        table = sa.Table(bare, sa.MetaData(), schema=schema, autoload_with=conn)
        if conn.dialect.name == "postgresql":
            table.info["schema"], invalid, table.info["deferrable"], table.info["partitions"] = _pg_table_state(
                conn, name)
            for reflected in table.indexes:
                reflected.info["invalid"] = reflected.name in invalid
        if conn.dialect.name == "sqlite":
            indexes = sa.inspect(conn).get_indexes(bare, include_auto_indexes=True)
            for index in indexes:
                if index.get("unique") and str(index["name"]).startswith("sqlite_autoindex_"):
                    sa.Index(index["name"], *[table.c[c] for c in index["column_names"] if c is not None],
                             unique=True)
        return table

    def role_lacks(self, conn: Connection, entity: Entity) -> bool:
        """Whether ``conn``'s role lacks a privilege the mapped writes need on ``entity``'s table (its schema's USAGE,
        :func:`lacking_privileges`, the sequences its defaults call), asked after the table refused a row with a
        privilege error (:func:`~clerk_sync._db_errors.is_insufficient_privilege`): then the database's state, a GRANT
        to run (the delivery answered 503); else the row's own refusal (PostgreSQL's 42501 of a row-level security
        policy, of a trigger raising ``insufficient_privilege`` or writing a table this role may not write).
        Under a savepoint of its own; an error asking is taken as lacking (503: Svix retries)."""
        mapped = self.tables.get(entity)
        if mapped is None:
            return True
        try:
            with conn.begin_nested():
                if conn.dialect.name == "postgresql":
                    schema = mapped.schema
                    if schema is not None and conn.execute(sa.text(PG_SCHEMA_USAGE), {"s": schema}).scalar() is False:
                        return True
                    if any(not usage for _, usage in conn.execute(sa.text(PG_TABLE_SEQUENCES),
                                                                  {"t": _qualified(conn, mapped.table)})):
                        return True
                return bool(lacking_privileges(conn, mapped))
        except sa.exc.DBAPIError:
            return True

    def user_writable(self, entity: Entity) -> list[list[str]]:
        """The mapped columns of ``entity``'s table whose value the user chooses in Clerk (see
        :meth:`Column.user_writable`), as the steps in which :meth:`project` leaves them out (``leave_out``)
        when the app's table refused the whole row, so that the columns the user cannot write (role, ban, a
        plan) still land: first the sourced ones alone, so that a computed column (an ``is_admin`` from the
        role) is still written; then the computes too (one that raised, or that the table refuses). Empty
        steps are left out."""
        mapped = self.tables.get(entity)
        if mapped is None:
            return []
        columns = mapped.resolved()
        sourced = [name for name, col in columns.items() if col.compute is None and col.user_writable(entity)]
        every = [name for name, col in columns.items() if col.user_writable(entity)]
        return [step for step in ([sourced] if sourced else []) + ([every] if every != sourced else [])]

    def project(self, conn: Connection, now: datetime, change: Change, *,
                leave_out: Sequence[str] = ()) -> None:
        """Write ``change`` into the mapped table, inside the caller's transaction. ``leave_out``: mapped
        columns not to write (an existing row keeps their values; a new one gets the table's default)."""
        mapped = self.tables.get(change.entity)
        if mapped is None:
            return
        projection = self._projection(conn, change.entity, mapped)
        try:
            with _utc_session(conn) if projection.zoned else nullcontext():
                projection.apply(conn, now, change, frozenset(leave_out))
        except sa.exc.IntegrityError as exc:
            first_line = database_message(exc.orig or exc)  # never the values (MySQL quotes them)
            refused = f"{mapped.table} refused {change.type} for {change.clerk_id}: {first_line}"
            if is_foreign_key_violation(exc.orig) and change.kind != "deleted":
                referrer = projection.still_referred_to(conn, exc.orig, change)
                if referrer is None:  # a parent the app's table does not hold yet (a membership before its
                    # user): an ordering that heals, so retried as a whole, as Svix does, while the parent has
                    # not arrived (Outbox.project asks parents_arrived, once this savepoint is rolled back)
                    raise ParentNotThere(f"{refused}; a row it refers to is not there yet: retried", refused) from None
                # The change replaces a value another app table still refers to (an e-mail orders point at):
                # no event heals that, as a deletion refused for the same reason (orders -> users under
                # HardDelete, MySQL's 1451) never does: the row's refusal.
                raise StoreDataError(f"{refused}; {referrer} still refers to the value it replaces: fix the "
                                     "table or the mapping") from None
            # The app's own constraint (a UNIQUE e-mail still held by a soft-deleted row, a NOT NULL
            # column the mapping does not fill): retrying cannot help.
            raise StoreDataError(f"{refused}; fix the table or the mapping") from None

    def project_deletions(self, conn: Connection, now: datetime, entity: Entity, clerk_ids: Sequence[str]) -> None:
        """The delete policy of ``entity``'s mapped table for all of ``clerk_ids`` at once (a parent's deletion
        cascading to its memberships): one statement per policy step for the set, not one per row. Refused as
        :meth:`project` refuses one row (:class:`~clerk_sync.errors.StoreDataError` for the app's constraint);
        the caller (:meth:`Outbox.record_many`) then writes them one by one, so a refusal stays its row's."""
        mapped = self.tables.get(entity)
        if mapped is None or not clerk_ids:
            return
        projection = self._projection(conn, entity, mapped)
        try:
            with _utc_session(conn) if projection.zoned else nullcontext():
                projection.delete_many(conn, now, clerk_ids)
        except sa.exc.IntegrityError as exc:
            first_line = database_message(exc.orig or exc)
            raise StoreDataError(f"{mapped.table} refused the deletion of {len(clerk_ids)} rows at once: "
                                 f"{first_line}; written again one by one") from None

    def parents_arrived(self, conn: Connection, change: Change) -> bool:
        """Whether an app table's foreign key refusal of a membership's row (:class:`ParentNotThere`) never
        heals by waiting: its user and organization are live in clerk-sync's tables, and the app's mapped row
        of one of them is missing (the app's table refused it for good, a CHECK), so retrying would hold back
        the membership's role forever. When the mapped parents' rows are there (or none is mapped), the key
        refers to a row the app makes itself (a workspace its hook creates): retried, it may heal. Users and
        organizations have no contract parent to wait for: False, retried as before."""
        if change.entity is not Entity.MEMBERSHIP:
            return False
        parents = [(Entity.USER, users, change.values.get("user_clerk_id")),
                   (Entity.ORGANIZATION, organizations, change.values.get("organization_clerk_id"))]
        if not all(clerk_id is not None and conn.execute(sa.select(sa.literal(1)).where(
                table.c.clerk_id == clerk_id, table.c.deleted_at.is_(None))).first() is not None
                for _, table, clerk_id in parents):
            return False
        for entity, _, clerk_id in parents:
            mapped = self.tables.get(entity)
            if mapped is None:
                continue
            app = self.table(conn, mapped.table)
            if conn.execute(sa.select(sa.literal(1)).where(app.c[mapped.clerk_id_column] == clerk_id)).first() is None:
                return True
        return False

    def refused_at_commit(self, conn: Connection, changes: Sequence[Change]) -> str:
        """Why a delivery is written again without the app's tables when a deferred foreign key refused its
        ``changes`` at COMMIT (:class:`RefusedAtCommit`), as :meth:`project` would have said it at the
        statement: a deletion another app table still refers to is the row's refusal; a created or updated
        row waits for its parents (:class:`ParentNotThere`, raised) unless :meth:`parents_arrived`."""
        mapped = [change for change in changes if change.entity in self.tables]
        for change in mapped:
            if change.kind != "deleted":
                refused = self._refused_at_commit(change)
                if not self.parents_arrived(conn, change):
                    raise ParentNotThere(f"{refused}; a row it refers to is not there yet: retried", refused)
                return f"{refused}; the rows it refers to have arrived: the app's table refused theirs"
        if not mapped:
            return "a DEFERRABLE INITIALLY DEFERRED foreign key of the app's tables refused the COMMIT"
        # the entity's own deletion comes after its memberships' (Writer._apply_with_hooks)
        others = f" (or one of the {len(mapped) - 1} other changes it made)" if len(mapped) > 1 else ""
        return f"{self._refused_at_commit(mapped[-1])}{others}; fix the table or the mapping"

    def _refused_at_commit(self, change: Change) -> str:
        return (f"{self.tables[change.entity].table} refused {change.type} for {change.clerk_id}: FOREIGN KEY "
                "constraint failed at COMMIT, a DEFERRABLE INITIALLY DEFERRED key")

    def pipelines(self, conn: Connection, entity: Entity) -> bool:
        """Whether this entity's created/updated changes can be written by :meth:`cte` (psycopg
        pipelines): not when linking, with a column type not adapted here, or without a plain unique
        index on the Clerk-id column. Reflects on a connection of its own: ``conn`` may be mid-pipeline."""
        mapped = self.tables.get(entity)
        if mapped is None:
            return True
        if entity not in self._built(conn.engine):
            try:
                with conn.engine.connect() as own:
                    self._projection(own, entity, mapped)
            except Exception:  # a column the mapping names that the table lacks (StoreDataError): not raised
                # here, outside the delivery's refusal guard, which Outbox.project's path has (the row's refusal)
                return False
        return self._projection(conn, entity, mapped).cte_sql is not None

    def cte(self, conn: Connection, entity: Entity, clerk_id: str, values: JSON) -> tuple[str, list[Any]] | None:
        """The mapped upsert of a created/updated record's ``values``, for an entity that :meth:`pipelines`,
        as a data-modifying CTE named ``mapped`` that writes only when the contract upsert ``up`` of the
        same statement returned a row (it applied), and leaves a row that already holds these values
        alone; with its psycopg parameters. None for an entity the mapping leaves alone."""
        mapped = self.tables.get(entity)
        if mapped is None or not self.pipelines(conn, entity):  # (which reflects on a connection of its own)
            return None
        return self._projection(conn, entity, mapped).cte(clerk_id, values)

    def wave(self, conn: Connection, entity: Entity) -> MappedWave | None:
        """The mapped upsert of many deliveries of ``entity`` in one statement (the writer's waves), for an
        entity that :meth:`pipelines`; None otherwise."""
        mapped = self.tables.get(entity)
        if mapped is None or not self.pipelines(conn, entity):
            return None
        return self._projection(conn, entity, mapped).wave

    def _projection(self, conn: Connection, entity: Entity, mapped: MappedTable) -> _Projection:
        built = self._built(conn.engine)  # reflected, and statements built, once per engine
        if entity not in built:
            built[entity] = _Projection(self.table(conn, mapped.table), mapped, conn.dialect.name)
        return built[entity]

    def backfill(self, store: _BackfillStore, *, lookup: LinkLookup | None = None) -> dict[str, int]:
        """Project every row the contract tables already hold (a mapping added to a running install);
        idempotent. Live rows are written, deleted ones get the delete policy if present. One the app's table
        refuses (a constraint, a compute that raised) is logged and counted as ``refused``, the others are
        written.

        Linking needs what clerk-sync's tables do not keep: whether Clerk verified the e-mail, and the
        external id. ``lookup`` (the CLI's reads them from Clerk's API, rate limited) gives them for the
        users a page has not written yet, before the page's transaction (no lock waits on Clerk); the
        verification counts only for the e-mail the row has. Without it, or for a user it does not know, a
        user that may link (its e-mail on an unlinked row; any user not written yet when the mapping links by
        external id; with the lookup, one whose address in Clerk is not the synced one) is refused
        (:class:`LinkUnverified`), and its next event links it.

        Pages of :data:`_BACKFILL_PAGE` rows (memory stays flat), each a transaction of ``store``'s that takes
        its rows' locks and reads them again under those locks before projecting them: a delivery, deletion or
        erasure that committed since the page was read is what gets projected, not the page's stale copy. Each
        page is under one savepoint; only a page that fails is written again row by row, a savepoint each (on
        PostgreSQL thousands of subtransactions in one transaction overflow its cache and slow every session).
        On SQLite a trigger's ``RAISE(ROLLBACK)`` ends the page's whole transaction: :class:`AppTableRolledBack`,
        nothing of that page written (not rows counted as written that were rolled back)."""
        counts: dict[str, int] = {}
        for entity in self.tables:
            after: int | None = None
            links = lookup is not None and entity is Entity.USER and self.tables[entity].links
            while True:
                facts: Mapping[str, Mapping[str, Any]] = {}
                if links:
                    assert lookup is not None
                    with store.transaction() as writer:  # (a short read: Clerk is asked outside the page's)
                        unwritten = self._unwritten(writer.conn, after)
                    facts = lookup(unwritten) if unwritten else {}
                with store.transaction() as writer:
                    after = self._backfill_page(writer, entity, after, counts, facts)
                if after is None:
                    break
        return counts

    def _page_ids(self, conn: Connection, entity: Entity, after: int | None) -> list[Any]:
        table = _CONTRACT[entity]
        query = sa.select(table.c.id, table.c.clerk_id, table.c.deleted_at).order_by(table.c.id).limit(_BACKFILL_PAGE)
        return list(conn.execute(query if after is None else query.where(table.c.id > after)).all())

    def _unwritten(self, conn: Connection, after: int | None) -> list[str]:
        """The live users of the page after ``after`` without a row in the app's table (those that may link)."""
        page = [row.clerk_id for row in self._page_ids(conn, Entity.USER, after) if row.deleted_at is None]
        if not page:
            return []
        projection = self._projection(conn, Entity.USER, self.tables[Entity.USER])
        written = set(conn.execute(sa.select(projection.key).where(projection.key.in_(page))).scalars())
        return [clerk_id for clerk_id in page if clerk_id not in written]

    def _backfill_page(self, writer: _BackfillWriter, entity: Entity, after: int | None,
                       counts: dict[str, int], facts: Mapping[str, Mapping[str, Any]]) -> int | None:
        """Project the page of ``entity``'s rows after id ``after``; returns its last id (None: no rows left).
        ``facts``: what links a user, by id (:data:`LinkLookup`)."""
        conn = writer.conn
        check_at_once(conn)
        table, names = _CONTRACT[entity], record_columns(_RECORDS[entity])
        page = self._page_ids(conn, entity, after)
        if not page:
            return None
        # The locks a delivery and an erasure take, then the rows again: FOR UPDATE too, as a delivery piped
        # on PostgreSQL without hooks, or a parent's deletion cascading to memberships, locks only the rows.
        writer.lock_records(entity, [row.clerk_id for row in page])
        rows = conn.execute(sa.select(table.c.deleted_at, *[table.c[n] for n in names])
                            .where(table.c.id.in_([row.id for row in page])).order_by(table.c.id)
                            .with_for_update()).mappings().all()
        changes = [Change(entity, row["clerk_id"], "created" if row["deleted_at"] is None else "deleted",
                          row["clerk_updated_at"], {n: row[n] for n in names} | _link_facts(row, facts))
                   for row in rows]
        self._project_page(conn, writer.now, entity, changes, counts)
        last: int = page[-1].id
        return last

    def _project_page(self, conn: Connection, now: datetime, entity: Entity, changes: Sequence[Change],
                      counts: dict[str, int]) -> None:
        """The page under one savepoint; if that fails, row by row: which were refused."""
        unlinked: list[tuple[Change, LinkUnverified]] = []
        try:
            with conn.begin_nested():
                for change in changes:
                    try:
                        self.project(conn, now, change, leave_out=self._not_kept(change))
                    except LinkUnverified as exc:  # raised before the row wrote anything (_link): the page goes
                        unlinked.append((change, exc))  # on (a migration's pages are full of them)
        except Exception as exc:
            _still_in_transaction(conn, exc)
        else:
            for change, unverified in unlinked:
                self._backfill_refused(entity, change, str(unverified), counts)
            if len(changes) > len(unlinked):
                counts[entity.value] = counts.get(entity.value, 0) + len(changes) - len(unlinked)
            return
        for change in changes:
            refusal = self._backfill_row(conn, now, change)
            if refusal is not None and not isinstance(refusal, LinkUnverified | LinkAmbiguous) \
                    and change.kind != "deleted":
                for leave_out in self.user_writable(entity):
                    if self._backfill_row(conn, now, change, leave_out) is None:
                        # written without the user's own columns (see Outbox.project): the admin's land
                        log.warning("backfill_row_kept_back", table=self.tables[entity].table,
                                    clerk_id=change.clerk_id, reason=_reason(refusal), kept_back=leave_out)
                        counts["kept_back"] = counts.get("kept_back", 0) + 1
                        refusal = None
                        break
            if refusal is not None:
                self._backfill_refused(entity, change, _reason(refusal), counts)
                continue
            counts[entity.value] = counts.get(entity.value, 0) + 1

    def _backfill_row(self, conn: Connection, now: datetime, change: Change,
                      leave_out: Sequence[str] = ()) -> Exception | None:
        """One backfilled row under a savepoint: None when written, else why the app's table refused it."""
        try:
            with conn.begin_nested():
                self.project(conn, now, change, leave_out=[*leave_out, *self._not_kept(change)])
        except Exception as exc:  # any refusal is the row's (a privilege's: when the role has every one there)
            _still_in_transaction(conn, exc, lambda: self.role_lacks(conn, change.entity))
            return exc
        return None

    def _not_kept(self, change: Change) -> list[str]:
        """A backfilled row's mapped columns whose source clerk-sync's tables do not keep (``external_id``,
        ``email_verified``: given only to a user not yet written, to link by): left as they are, not cleared.
        The backfill wrote their default (None) over what the events had written (review)."""
        mapped = self.tables.get(change.entity)
        if mapped is None or change.kind == "deleted":
            return []
        carried = _CARRIED[change.entity]
        return [name for name, col in mapped.resolved().items()
                if col.source is not None and (head := col.source.partition(".")[0]) in carried
                and head not in change.values]

    def _backfill_refused(self, entity: Entity, change: Change, reason: str, counts: dict[str, int]) -> None:
        log.warning("backfill_row_refused", table=self.tables[entity].table, clerk_id=change.clerk_id, reason=reason)
        counts["refused"] = counts.get("refused", 0) + 1

    def erase(self, conn: Connection, entity: Entity, clerk_id: str) -> list[str]:
        """Erasure: clear the mapped personal columns of this entity's row, whatever the delete policy (as
        :func:`cleared_values`: Django's NOT NULL ``first_name`` gets ``""``, not a NULL that rolled the whole
        erasure back). Under a savepoint: what the app's table still refuses (a CHECK, a trigger, a NOT NULL
        column with no cleared value, a column the mapping names that the table lacks) is logged and returned,
        and the erasure of clerk-sync's rows holds."""
        mapped = self.tables.get(entity)
        if mapped is None or not any(col.is_personal for col in mapped.clearable().values()):
            return []
        try:
            table = self.table(conn, mapped.table)
        except sa.exc.NoSuchTableError:
            refused = [f"{mapped.table} does not exist: nothing cleared there (the mapping names it)"]
            log.warning("mapped_erasure_refused", table=mapped.table, clerk_id=clerk_id, reason=refused[0])
            return refused
        columns = mapped.clearable()
        if mapped.clerk_id_column not in table.c:  # (check_schema fails it; a delivery's row is refused for it)
            refused = [f"{mapped.table}.{mapped.clerk_id_column} (the mapping's Clerk-id column) is missing: run "
                       "`clerk-sync migrate --mapping ...`; the person's row there is not cleared"]
            personal: JSON = {}
        else:
            refused = [f"{mapped.table}.{name} is missing: add it or remove it from the mapping; not cleared"
                       for name, col in columns.items() if col.is_personal and name not in table.c]
            personal, kept = cleared_values(table, {n: c for n, c in columns.items() if n in table.c}, clerk_id)
            refused += [f"{mapped.table}.{c} is NOT NULL (or UNIQUE) with nothing to clear it to: not cleared"
                        for c in kept]
        check_at_once(conn)
        for name, value in personal.items():  # one at a time: a column the table refuses leaves the others cleared
            tries = [value]
            column = table.c[name]
            if isinstance(value, str) and isinstance(column.type, sa.String):  # unique in a way not reflected
                own = erased_placeholder(clerk_id, columns[name].source == "email", column.type.length)
                tries += [own] if own != value else []  # (an expression index: lower(email))
            for attempt in tries:
                try:
                    with conn.begin_nested():
                        conn.execute(sa.update(table).where(table.c[mapped.clerk_id_column] == clerk_id)
                                     .values({name: attempt}))
                    break
                except sa.exc.DBAPIError as exc:
                    # (a deadlock, a grant missing: the erasure fails whole, nothing half-done)
                    _still_in_transaction(conn, exc, lambda: self.role_lacks(conn, entity))
                    why = database_message(exc.orig or exc)
            else:
                refused.append(f"{mapped.table} refused clearing {name}: {why}")
        for reason in refused:
            log.warning("mapped_erasure_refused", table=mapped.table, clerk_id=clerk_id, reason=reason)
        return refused


class _Projection:
    """The statements for one mapped table, built once (bound parameters, no per-call construct)."""

    def __init__(self, table: sa.Table, mapped: MappedTable, dialect: str) -> None:
        _refuse_missing_columns(table, mapped)
        self.t, self.m, self.columns = table, mapped, mapped.resolved()
        self.key = table.c[mapped.clerk_id_column]
        self.fixed: JSON = {}  # what a live row's delete-policy column holds
        if isinstance(mapped.on_delete, SoftDelete):
            self.fixed[mapped.on_delete.column] = None
        elif isinstance(mapped.on_delete, Deactivate):
            self.fixed[mapped.on_delete.column] = True
        elif isinstance(mapped.on_delete, Anonymise) and mapped.on_delete.column is not None:
            self.fixed[mapped.on_delete.column] = None
        # A mapped Deactivate flag (``is_active`` computed from ``banned``) is the mapping's: its value is the live
        # one on insert, update and link (named once in each statement); the deletion still sets it false.
        # (:class:`MappedTable` refuses a mapped deletion time.) ``live``: the policy's value for a new row, also
        # where a retry leaves the mapped flag out (_apply_without).
        self.fixed = {n: _as_flag(table.c[n].type, v) for n, v in self.fixed.items()}
        self.live: JSON = dict(self.fixed)
        self.fixed = {n: v for n, v in self.fixed.items() if n not in self.columns}
        # An existing row's policy column is the app's once written (an admin's own deactivation): an update
        # fills it only where it holds nothing (is_active NULL: added by migrate); SoftDelete's NULL not at all.
        self.coalesced: JSON = {n: v for n, v in self.fixed.items() if v is not None}
        # Number and text columns a true/false goes into as 1/0 or 'true'/'false' (see _as_flag), by their type
        self.flag_types = {n: type_ for n in self.columns
                           if _as_flag(type_ := table.c[n].type, True) is not True}
        # Columns written only into a row inserted here: never SET on a row already there (linked, updated)
        self.insert_only = frozenset(n for n, c in self.columns.items() if c.insert_only)
        # A source's value into a column of one scalar (text, number, flag, time): a list or object there is
        # not one (see values); a string column's declared length, checked on every store (see fits)
        self.scalar = frozenset(n for n, c in self.columns.items()
                                if c.compute is None and isinstance(table.c[n].type, _SCALAR_TYPES))
        # (an unbounded text takes a list or object as its JSON text, as transform="json" writes it: MariaDB's
        # JSON columns reflect as LONGTEXT, and the object was written as NULL there while SQLite and
        # PostgreSQL's json columns stored it: review)
        self.unbounded_text = frozenset(n for n in self.scalar if isinstance(type_ := table.c[n].type, sa.String)
                                        and not isinstance(type_, sa.Enum) and not type_.length)
        # transform="json" into a JSON column (json, jsonb; SQLite's JSON): the document, not its text, which the
        # column's type encoded again, a JSON string (`meta->>'role'` NULL) where MariaDB's (LONGTEXT) held the
        # object (review)
        self.json_documents = frozenset(n for n, c in self.columns.items()
                                        if c.transform == "json" and isinstance(table.c[n].type, sa.JSON))
        self.bounded = {n: length for n in self.columns
                        if isinstance(type_ := table.c[n].type, sa.String) and not isinstance(type_, sa.Enum)
                        and (length := type_.length)}
        # Date-time columns a time goes into as UTC's wall clock, an aware one converted first (as the deletion's
        # stamp is): one without a time zone, or any on SQLite (it keeps none). Passed aware, PostgreSQL put the
        # session TimeZone's wall clock into a ``timestamp`` column, and SQLite's and MariaDB's drivers drop an
        # offset (a compute's ``+02:00`` time was two hours off). Into one with a time zone (timestamptz) a
        # naive time goes as UTC: PostgreSQL read it in the session's TimeZone
        times = {n: type_.timezone for n in self.columns if isinstance(type_ := table.c[n].type, sa.DateTime)}
        self.times = frozenset(times)
        self.utc_walls = frozenset(n for n, zoned in times.items() if not zoned or dialect == "sqlite")
        self.utc_aware = frozenset(times) - self.utc_walls
        # An ISO date (a metadata "2026-01-31") into a DATE column: PostgreSQL and MariaDB parsed it, SQLite's
        # type refused it (the whole row); a date on every store now (review)
        self.dates = frozenset(n for n in self.columns if isinstance(table.c[n].type, sa.Date))
        # MySQL/MariaDB's TIMESTAMP converts what is written from the session's time_zone: see _utc_session
        policy = _policy_column(mapped)
        written = {*self.columns, *self.fixed, *([policy[0]] if policy is not None else [])}
        self.zoned = dialect in ("mysql", "mariadb") and any(
            isinstance(table.c[n].type, sa.TIMESTAMP) for n in written if n in table.c)
        names = [*self.columns, *self.fixed]
        binds = {n: sa.bindparam(n, type_=table.c[n].type) for n in names}
        row = binds | {self.key.name: sa.bindparam("_clerk_id")}
        sets: dict[str, Any] = ({n: binds[n] for n in self.columns if n not in self.insert_only}
                                | {n: sa.func.coalesce(table.c[n], binds[n]) for n in self.coalesced})
        self.update = sa.update(table).where(self.key == sa.bindparam("_clerk_id")).values(
            sets or {self.key.name: sa.bindparam("_clerk_id")})
        self.insert = sa.insert(table).values(row)
        # A creation usually finds no row: one statement. Any unique conflict skips it, and the UPDATE
        # (then the plain INSERT, which raises on a conflict with another row) takes over.
        # (Not on MySQL: its "do nothing" counts a skipped row like an inserted one.)
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self.insert_new = (insert(table).values(row).on_conflict_do_nothing()
                           if _unique(table, self.key) and dialect in ("postgresql", "sqlite") else None)
        self.cte_sql, self.json_at = _cte_sql(table, self.key, names, mapped, dialect, self.fixed, self.insert_only)
        self.bool_at = [i for i, n in enumerate(names) if isinstance(table.c[n].type, sa.Boolean)]
        self.booleans = frozenset(n for n in self.columns if isinstance(table.c[n].type, sa.Boolean))
        self.wave = _wave(table, self.key, names, self) if self.cte_sql is not None else None
        # Creations and updates in one prebuilt statement (no Core construct to key per call), when
        # ON CONFLICT can name the Clerk-id column and no row is to be linked.
        self.upsert: sa.TextClause | None = None
        self.sqlite_upsert: str | None = None
        self.sqlite_binds: list[Callable[[Any], Any] | None] = []
        if not mapped.links and dialect in ("postgresql", "sqlite") and _unique(table, self.key, plain=True):
            quote = _quote_ident  # the text is SQLAlchemy's: it doubles a "%" itself where the driver needs it
            key = quote(self.key.name)
            updated = ", ".join(f"{c} = {e}" for c, e in _update_sets(table.name, names, self.fixed, quote,
                                                                                  self.insert_only))
            head = f"INSERT INTO {_table_sql(table, quote)} ({', '.join(quote(n) for n in names)}, {key}) "
            tail = f"ON CONFLICT ({key}) DO UPDATE SET {updated or f'{key} = excluded.{key}'}"
            self.upsert = sa.text(
                f"{head}VALUES ({', '.join(':' + _bind(i) for i in range(len(names)))}, :_clerk_id) {tail}"
            ).bindparams(*[sa.bindparam(_bind(i), type_=table.c[n].type) for i, n in enumerate(names)])
            if dialect == "sqlite":  # run on the driver directly (see sqlite_execute)
                self.sqlite_upsert = f"{head}VALUES ({', '.join(['?'] * (len(names) + 1))}) {tail}"
                self.sqlite_binds = processors([table.c[n].type for n in names], sqlite.dialect())

    def values(self, record: JSON, leave_out: frozenset[str] = frozenset()) -> JSON:
        """The mapped columns' values of a created/updated ``record`` (but those in ``leave_out``). A metadata
        path's list or object for a column of one scalar (``public_metadata.role`` ``["admin"]`` into a text
        column) is no value of it: the Column's default instead, logged (PostgreSQL's driver would have stored
        the array literal ``{admin}``, SQLite's refused the row); ``transform="json"`` writes it as JSON text, as
        does a column of unbounded text (``TEXT``; MariaDB's ``JSON``, which reflection sees as ``LONGTEXT``)."""
        values = {name: col.value(record) for name, col in self.columns.items() if name not in leave_out}
        for name in self.scalar:
            value = values.get(name)
            if isinstance(value, list | dict):
                col = self.columns[name]
                if name in self.unbounded_text:  # TEXT, and MariaDB's JSON (a LONGTEXT to reflection): as JSON
                    values[name] = TRANSFORMS["json"](value)
                    continue
                values[name] = col.default if not isinstance(col.default, list | dict) else None
                log.warning("mapped_value_not_scalar", table=self.m.table, column=name, source=col.source,
                            clerk_id=record.get("clerk_id"), kind=type(value).__name__,
                            advice="its default written; map it with transform='json' to keep it as JSON text")
        for name in self.json_documents:  # the value itself (the Column's default, as it is, when there is none)
            if name in values:
                col = self.columns[name]
                found = _lookup(record, col.source or "")
                values[name] = col.default if found is None else found
        for name, type_ in self.flag_types.items():
            if isinstance(value := values.get(name), bool):
                values[name] = _as_flag(type_, value)
        for name in self.times:  # an ISO-8601 text (a metadata date) as the time it says, on every store: PostgreSQL
            # parsed it (dropping an offset in a column without a time zone), MariaDB and SQLite refused the row
            if isinstance(value := values.get(name), str):
                with suppress(ValueError):  # (not one: as it is, for the column to take or refuse)
                    values[name] = datetime.fromisoformat(value.strip())
        for name in self.dates:
            if isinstance(value := values.get(name), str):
                with suppress(ValueError):  # (not one: as it is, for the column to take or refuse)
                    values[name] = date.fromisoformat(value.strip())
        for name in self.utc_walls:
            value = values.get(name)
            if isinstance(value, datetime) and value.tzinfo is not None:
                with suppress(OverflowError):  # (no UTC one in years 1-9999: left for the column's check)
                    values[name] = value.astimezone(UTC).replace(tzinfo=None)
        for name in self.utc_aware:
            value = values.get(name)
            if isinstance(value, datetime) and value.tzinfo is None:
                values[name] = value.replace(tzinfo=UTC)
        return values

    def fits(self, values: JSON) -> None:
        """A text longer than its column's declared length (``VARCHAR(32)``) refused as the row's, naming the
        column, on every store: PostgreSQL and MariaDB refuse it without naming it, SQLite would store it."""
        for name, length in self.bounded.items():
            value = values.get(name)
            if isinstance(value, str) and len(value) > length:
                raise ValueTooLong(f"{self.m.table}.{name} takes at most {length} characters: the value for it "
                                   f"has {len(value)}", name)
        for name in self.booleans:
            # (a metadata "true": SQLite's and psycopg's binding refused it with a TypeError naming nothing, so the
            # refusal said neither the column nor the fix; MariaDB's named it: review)
            if isinstance(values.get(name), str):
                raise StoreDataError(f"{self.m.table}.{name} is a boolean column and the value for it is a text: "
                                     "map it with transform='bool' (true/1/yes/on, false/0/no/off)")

    def row(self, values: JSON) -> list[Any]:
        """The mapped columns' values of a created/updated record's ``values`` (then the policy's fixed ones)."""
        return [*self.values(values).values(), *self.fixed.values()]

    def cte(self, clerk_id: str, values: JSON) -> tuple[str, list[Any]]:
        """:meth:`SchemaMapping.cte` (only built for PostgreSQL, psycopg: see :func:`_cte_sql`)."""
        from psycopg.types.json import Jsonb

        if self.cte_sql is None:
            raise ValueError(f"{self.m.table}: cannot be written by the delivery's statement (see pipelines)")
        row = self.row(values)
        for i in self.bool_at:  # psycopg's text would be cast ("true"): refused as SQLAlchemy's Boolean does
            if isinstance(row[i], str):
                raise TypeError(f"str for a boolean column of {self.m.table}")
        return self.cte_sql, [*(Jsonb(v) if i in self.json_at else v for i, v in enumerate(row)), clerk_id]

    def apply(self, conn: Connection, now: datetime, change: Change, leave_out: frozenset[str] = frozenset()) -> None:
        if change.kind == "deleted":
            self._delete(conn, now, change.clerk_id)
            return
        values = self.values(change.values, leave_out)
        self.fits(values)
        if leave_out:
            self._apply_without(conn, change, values)
            return
        new = values | self.fixed  # a row inserted: the policy's live value too
        if self.sqlite_upsert is not None and direct_sqlite(conn.dialect):
            row = [v if f is None else f(v) for f, v in zip(self.sqlite_binds, new.values(), strict=True)]
            sqlite_execute(conn, self.sqlite_upsert, [[*row, change.clerk_id]])
            return
        if self.upsert is not None:
            bound = {_bind(i): v for i, v in enumerate(new.values())}
            conn.execute(self.upsert, bound | {"_clerk_id": change.clerk_id})
            return
        params = new | {"_clerk_id": change.clerk_id}
        if (change.kind == "created" and self.insert_new is not None and not self.m.links
                and conn.execute(self.insert_new, params).rowcount):
            return
        # (only the UPDATE's own parameters: SQLAlchemy would SET any other column named in them; an
        # insert-only column's value goes into an INSERT alone, never into a row updated or linked)
        kept = {n: v for n, v in values.items() if n not in self.insert_only}
        updated = conn.execute(self.update, kept | self.coalesced | {"_clerk_id": change.clerk_id}).rowcount
        if updated == 0 and not self._link(conn, change, kept):
            conn.execute(self.insert, params)

    def _apply_without(self, conn: Connection, change: Change, values: JSON) -> None:
        """:meth:`apply` writing only ``values`` (some mapped columns left out): statements built for the call
        (a rare path, the retry of a refused row). An existing row keeps the left-out columns; a new one
        gets the table's defaults there (a NOT NULL column without one refuses it)."""
        kept = {n: v for n, v in values.items() if n not in self.insert_only}
        sets: dict[str, Any] = kept | {n: sa.func.coalesce(self.t.c[n], v) for n, v in self.coalesced.items()}
        where = self.key == change.clerk_id
        updated = conn.execute(sa.update(self.t).where(where).values(
            sets or {self.key.name: change.clerk_id})).rowcount
        if updated == 0 and not self._link(conn, change, kept):
            conn.execute(sa.insert(self.t).values({**self.live, **values, self.key.name: change.clerk_id}))

    def _link(self, conn: Connection, change: Change, values: JSON) -> bool:
        """Adopt the one existing row without a Clerk id whose external id, else e-mail, is this user's."""
        external_id, email = change.values.get("external_id"), change.values.get("email")
        if self.m.link_by_external_id and "external_id" not in change.values:
            # A backfill: clerk-sync's users rows do not keep the external id, so the row it would link cannot
            # be found, and a new one beside it would be found by Clerk id ever after, never linked
            raise LinkUnverified(
                f"{self.m.table}: user {change.clerk_id}'s external id, which links it, is known only from its "
                "events (clerk-sync's tables do not keep it): not written; the user's next event links it or "
                f"writes its row (or set {self.key.name} on its row yourself)")
        if self.m.link_by_external_id and external_id:
            column = self.t.c[self.m.link_by_external_id]
            wanted = _as_column_value(column, external_id)
            match = column == wanted  # (the plain equality first: the column's index serves it)
            if isinstance(column.type, sa.String) and conn.dialect.name in ("mysql", "mariadb", "postgresql"):
                match = sa.and_(match, _exactly(conn, column) == _exactly(conn, sa.literal(wanted,
                                                                                                      column.type)))
            if wanted is not None and self._adopt(conn, change, values, match, f"external id ({column.name})"):
                return True
        # Only an address Clerk verified: an unverified primary (verification at sign-up off, an OAuth provider
        # that does not verify, one added through the API unverified) would hand its claimant another's row.
        if self.m.link_by_email and "email_verified" in change.values and change.values["email_verified"] is None:
            # A backfill whose lookup found another address in Clerk than the one synced here: linking by
            # either could write a row beside the customer's that nothing links later; the event that
            # changed the address links it.
            raise LinkUnverified(
                f"{self.m.table}: user {change.clerk_id}'s e-mail in Clerk is not the one synced here: not "
                f"written; the event that changed it links the row (or set {self.key.name} on it yourself)")
        verified = change.values.get("email_verified")  # None: not known (a backfill, see below)
        if self.m.link_by_email and email:
            column = self.t.c[self.m.link_by_email]
            lower = unicode_lower(conn)  # the same lower() on both sides (PostgreSQL's and Python's differ)
            match = _exactly(conn, lower(column)) == _exactly(conn, lower(sa.literal(email)))
            if conn.dialect.name == "postgresql":  # the plain equality first: an index on lower(email) serves it
                # (the exact one under COLLATE "C" alone scanned the whole table for every new user)
                match = sa.and_(lower(column) == lower(sa.literal(email)), match)
            if verified is False:
                # Neither linked (whoever claims the address would get the row) nor a second row beside it: the
                # event that verifies the address finds no row by Clerk id, and links this one then.
                if self._unlinked(conn, match):
                    raise LinkUnverified(
                        f"{self.m.table}: a row without a Clerk id has user {change.clerk_id}'s e-mail "
                        f"({column.name}), which Clerk has not verified: not written (linking would hand that row "
                        "to whoever claims the address; a second row beside it would never be linked); the event "
                        "that verifies the address links it. If the row is theirs and the address will not be "
                        f"verified, set {self.key.name} on it yourself")
                return False
            if verified is None:
                # A backfill projects clerk-sync's users rows, which do not keep whether Clerk verified the
                # address: linking could hand the row to a claimant, and a new row beside the customer's would
                # be linked by nothing later. Refused (counted by the backfill); the user's next event links it.
                if self._unlinked(conn, match):
                    raise LinkUnverified(
                        f"{self.m.table}: a row without a Clerk id has user {change.clerk_id}'s e-mail "
                        f"({column.name}), and whether Clerk verified it is known only from the user's events: not "
                        f"written; the user's next event links it (or set {self.key.name} on that row yourself)")
                return False
            return self._adopt(conn, change, values, match, f"e-mail ({column.name})")
        return False

    def _unlinked(self, conn: Connection, match: sa.ColumnElement[bool]) -> list[Any]:
        """Up to 3 rows (their primary keys) that ``match`` and have no Clerk id."""
        pk = list(self.t.primary_key.columns)
        return list(conn.execute(sa.select(*pk).where(match, self.key.is_(None)).limit(3)).all())

    def _adopt(self, conn: Connection, change: Change, values: JSON, match: sa.ColumnElement[bool], what: str) -> bool:
        pk = list(self.t.primary_key.columns)
        matches = self._unlinked(conn, match)
        if len(matches) > 1:  # (the value is not quoted: the message lands in last_error and logs, which
            # outlive an erasure of the person; clerk-sync's users row has it while the user is not erased)
            raise LinkAmbiguous(
                f"{self.m.table}: {'2' if len(matches) == 2 else '3 or more'} rows without a Clerk id have user "
                f"{change.clerk_id}'s {what}; merge or remove the duplicates, then set {self.key.name} on the row "
                "to keep or run `clerk-sync migrate --mapping ... --backfill` (the user's next event links it too): "
                "the user was not linked")
        if not matches:
            return False
        # Still unlinked when updated: a concurrent delivery of another user with the same external id or
        # e-mail may have adopted it since the SELECT (it waited on the row's lock); that user keeps it.
        where = sa.and_(*[c == v for c, v in zip(pk, matches[0], strict=True)], self.key.is_(None))
        # The app's own row: its policy column stays as the app left it (a legacy account it deactivated is
        # not re-enabled by a sign-up with the same e-mail); only a NULL gets the live value, as on update. A
        # mapped one is the mapping's (in ``values``), as on update.
        kept = {n: sa.func.coalesce(self.t.c[n], v) for n, v in self.coalesced.items()}
        adopted = conn.execute(sa.update(self.t).where(where).values(
            {**values, **kept, self.key.name: change.clerk_id}))  # (one key each: a policy column may be mapped)
        if adopted.rowcount != 1:
            raise StoreError(f"{self.m.table}: the row with {what} was linked to another user meanwhile; "
                             f"retried (user {change.clerk_id})")
        return True

    def still_referred_to(self, conn: Connection, orig: Any, change: Change) -> str | None:
        """Which foreign key refused a created/updated row that is not its parent missing: another row
        still refers to a value of this row the change replaces (an e-mail or a key column the app's
        ``orders`` point at), which no event heals. None when a row it refers to may not be there yet
        (retried), or the store cannot tell (as before: retried).

        PostgreSQL says 23503 both ways, and its message's wording (``insert or update on`` against ``update
        or delete on``) is translated with lc_messages: read instead the table the error's diagnostics name,
        which is always the key's own, the referring one (:func:`~clerk_sync._db_errors.foreign_key_of`),
        so a key of another table means this row is the one referred to; no catalog lookup (pg_constraint)
        could run here anyway, the transaction is aborted until the savepoint is rolled back. A key of this
        table referring to itself reports the same either way: it is the referred side only when the write
        sets none of the key's own columns. SQLite names nothing ("FOREIGN KEY constraint failed") but its
        transaction goes on: the parents are looked up, and the tables referring to this one's written
        columns. MySQL/MariaDB tell them apart by number (1451, never read as a missing parent)."""
        written = {*self.columns, *self.fixed, self.key.name}
        if conn.dialect.name == "postgresql":
            schema, table, constraint = foreign_key_of(orig)
            here = schema in (None, self.t.info.get("schema"))  # (the mapped table's schema, or unsaid)
            partition = any(table == name and schema in (None, ns) for ns, name in self.t.info.get("partitions", ()))
            if table is None or (((table == self.t.name and here) or partition)
                                 and not self._refers_to_itself(constraint, written)):
                return None
            return f"{'' if here else f'{schema}.'}{table} (foreign key {constraint})"
        if conn.dialect.name != "sqlite":
            return None
        # An update writes no insert-only column (its transaction goes on: SQLite can be asked which it was).
        skipped = (self.insert_only if self.insert_only and conn.execute(
            sa.select(sa.literal(1)).where(self.key == change.clerk_id).limit(1)).first() is not None else frozenset())
        if self._parent_missing(conn, change, skipped):
            return None
        return _sqlite_referrers(conn, self.t.name, [c for c in written if c in self.t.c and c not in skipped]) or None

    def _refers_to_itself(self, constraint: str | None, written: set[str]) -> bool:
        """Whether this table's foreign key ``constraint`` refers to this table, and the write sets none of
        its own columns (so the row refused is one it still refers to, not one referring to a missing row)."""
        key = next((k for k in self.t.foreign_key_constraints if k.name == constraint), None)
        return key is not None and key.referred_table is self.t and not set(key.column_keys) & written

    def _parent_missing(self, conn: Connection, change: Change, skipped: frozenset[str] = frozenset()) -> bool:
        """SQLite: whether a row the change's values refer to through this table's own foreign keys is not
        there (or cannot be told: a key whose columns the mapping sets only in part). ``skipped``: the columns
        the write did not set (an update's insert-only ones)."""
        new = {name: col.value(change.values) for name, col in self.columns.items() if name not in skipped}
        new |= self.fixed
        new[self.key.name] = change.clerk_id
        for key in self.t.foreign_key_constraints:
            columns = key.column_keys
            if not set(columns) & new.keys():
                continue  # not written: an UPDATE does not check it (an INSERT's NULL or default: the app's)
            if not set(columns) <= new.keys():
                return True
            if any(new[c] is None for c in columns):
                continue  # a NULL in the key: nothing to refer to
            referred = [element.column for element in key.elements]
            found = sa.select(sa.literal(1)).where(*[r == sa.literal(new[c], r.type)
                                                     for c, r in zip(columns, referred, strict=True)]).limit(1)
            if conn.execute(found).first() is None:
                return True
        return False

    def delete_many(self, conn: Connection, now: datetime, clerk_ids: Sequence[str]) -> None:
        """:meth:`_delete` of every row of ``clerk_ids``: one statement per policy step for the set (an
        :class:`Anonymise` with a UNIQUE column, whose cleared value is each row's own, one per distinct value)."""
        policy, where = self.m.on_delete, self.key.in_(clerk_ids)
        if not isinstance(policy, Anonymise):
            self._delete_where(conn, now, where)
            return
        groups: dict[str, tuple[JSON, list[str]]] = {}  # by the cleared values (repr: a default may be a list)
        for clerk_id in clerk_ids:
            personal, kept = cleared_values(self.t, self.m.clearable(), clerk_id)
            personal |= dict.fromkeys(kept)  # (the table refuses NULL there: the row's refusal, doctor says so)
            groups.setdefault(repr(personal), (personal, []))[1].append(clerk_id)
        for personal, ids in groups.values():
            if personal:
                conn.execute(sa.update(self.t).where(self.key.in_(ids)).values(**personal))
        if policy.column is not None:
            self._stamp_deletion(conn, now, where, policy.column)

    def _delete(self, conn: Connection, now: datetime, clerk_id: str) -> None:
        policy, where = self.m.on_delete, self.key == clerk_id
        if not isinstance(policy, Anonymise):
            self._delete_where(conn, now, where)
            return
        personal, kept = cleared_values(self.t, self.m.clearable(), clerk_id)
        personal |= dict.fromkeys(kept)  # (the table refuses NULL there: the row's refusal, doctor says so)
        if personal:
            conn.execute(sa.update(self.t).where(where).values(**personal))
        if policy.column is not None:
            self._stamp_deletion(conn, now, where, policy.column)

    def _delete_where(self, conn: Connection, now: datetime, where: sa.ColumnElement[bool]) -> None:
        """The rows ``where`` selects, deleted by a policy other than :class:`Anonymise`."""
        policy = self.m.on_delete
        if isinstance(policy, HardDelete):
            conn.execute(sa.delete(self.t).where(where))
        elif isinstance(policy, SoftDelete):
            self._stamp_deletion(conn, now, where, policy.column)
        elif isinstance(policy, Deactivate):
            conn.execute(sa.update(self.t).where(where).values(
                **{policy.column: _as_flag(self.t.c[policy.column].type, False)}))

    def _stamp_deletion(self, conn: Connection, now: datetime, where: sa.ColumnElement[bool], name: str) -> None:
        """The deletion's time into ``name``; the first one's kept (a backfill re-run, a replay). A column
        without a time zone gets UTC's wall time, as on every store (PostgreSQL would convert an aware time
        to its session's TimeZone)."""
        column, when = self.t.c[name], now
        if isinstance(column.type, sa.DateTime) and not column.type.timezone and when.tzinfo is not None:
            when = when.astimezone(UTC).replace(tzinfo=None)
        conn.execute(sa.update(self.t).where(where, column.is_(None)).values(**{name: when}))


CHECK_AT_ONCE = "SET CONSTRAINTS ALL IMMEDIATE"
_BACKFILL_PAGE = 500  # rows of a backfill page (one savepoint, one query)

LinkLookup = Callable[[Sequence[str]], Mapping[str, Mapping[str, Any]]]
"""What links users, by Clerk user id: ``email``, ``email_verified`` and ``external_id`` as Clerk has them now
(a user it does not know is left out). :meth:`SchemaMapping.backfill` asks it for a page's unwritten users."""


_SESSION_ZONE = "clerk_sync.session_zone"  # conn.info: (a weak reference to the transaction, its zone; None: UTC)


@contextmanager
def _utc_session(conn: Connection) -> Iterator[None]:
    """The MySQL/MariaDB session's ``time_zone`` at UTC while clerk-sync writes an app table's TIMESTAMP columns,
    then put back: TIMESTAMP converts what is written from the session's zone, and an app's own engine may keep its
    sessions in another (clerk-sync's sets UTC: ``store.create_engine``), so our UTC wall clock was stored hours
    off. Not a connect event on the app's engine: that would move the app's own sessions (and its reads) to UTC.
    Not ``CONVERT_TZ(value, '+00:00', @@session.time_zone)``: it cannot tell the hour a DST change repeats from
    the one before.

    Asked once per transaction (the answer kept in the connection's ``info`` with the transaction it was read in):
    one round trip a transaction, not one a row of a batch or a backfill page; two more a write only in a session
    that is not UTC. A zone changed between transactions (an app's connect event, its own SET on a pooled
    connection) is seen; one changed by the caller's own statements between two writes of one transaction is
    not. MariaDB's default ``SYSTEM`` is UTC when the server's host is (``@@system_time_zone``; not 'GMT', which
    London's winter also names)."""
    transaction = conn.get_transaction()
    known = conn.info.get(_SESSION_ZONE)
    if transaction is not None and known is not None and known[0]() is transaction:
        zone = known[1]
    else:
        zone, system = conn.exec_driver_sql("SELECT @@session.time_zone, @@system_time_zone").one()
        if zone in ("+00:00", "UTC") or (zone == "SYSTEM" and system == "UTC"):
            zone = None
        if transaction is not None:
            conn.info[_SESSION_ZONE] = (weakref.ref(transaction), zone)
    if zone is None:
        yield
        return
    try:
        # (inside: set, then an exception raised in Python, an app's cursor event, still puts it back)
        conn.exec_driver_sql("SET time_zone = '+00:00'")
        yield
    except BaseException:
        # A connection lost mid-write is not pooled again: nothing to put back, and the SET would raise
        # SQLAlchemy's PendingRollbackError in place of the lost connection's own error
        if not conn.invalidated:
            _put_zone_back(conn, zone)
        raise
    _put_zone_back(conn, zone, lost_raises=True)


def _put_zone_back(conn: Connection, zone: str, *, lost_raises: bool = False) -> None:
    """The session's own ``zone`` again after :func:`_utc_session`. Refused on a connection still alive (a KILL
    QUERY landing on it): that connection is replaced at its next checkout (a soft invalidation: this transaction
    goes on), as pooled in UTC the app's own TIMESTAMP reads and writes through it would be shifted. The
    connection lost by the put-back itself, after the write (``lost_raises``): that error, the delivery's (else
    leaving the savepoint raised PendingRollbackError, taken for the app row's own refusal)."""
    try:
        conn.execute(sa.text("SET time_zone = :zone"), {"zone": zone})  # (any driver's paramstyle)
    except sa.exc.DBAPIError as exc:
        if conn.invalidated:
            if lost_raises:
                raise
            return
        conn.info.pop(_SESSION_ZONE, None)
        conn.connection.invalidate(exc, soft=True)
        log.warning("mapped_time_zone_not_put_back", zone=zone, error=database_message(exc.orig or exc),
                    consequence="the connection is closed at its next checkout instead of going back to the "
                                "app's pool in UTC")


def _link_facts(row: Any, facts: Mapping[str, Mapping[str, Any]]) -> JSON:
    """The carried values a backfilled user links by: its external id, and whether Clerk verified the
    e-mail the row has (not for one changed since). Nothing known of the user: nothing (LinkUnverified)."""
    known = facts.get(row["clerk_id"])
    if known is None:
        return {}
    carried: JSON = {"external_id": known.get("external_id")}
    # Exactly (both are Clerk's; casefold would take "straße" for "strasse"); None == None: no address to link
    # by. Another address in Clerk now: None, which _link refuses (the event that changed it links the row).
    same = row.get("email") == known.get("email")
    carried["email_verified"] = known.get("email_verified") is True if same else None
    return carried


# The sequences an INSERT into table :t may call nextval on (USAGE), with whether the role may use them: its serial
# columns' (OWNED BY the table) and any a column default names (``DEFAULT nextval('ids')`` of a sequence created
# apart, owned by no column or by another table's). (An identity column's sequence needs no privilege.)
PG_TABLE_SEQUENCES = (
    "SELECT s.oid::regclass::text, has_sequence_privilege(s.oid, 'USAGE') FROM pg_class s "
    "WHERE s.relkind = 'S' AND s.oid IN ("
    "SELECT d.objid FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
    "AND d.refclassid = 'pg_class'::regclass AND d.refobjid = to_regclass(:t) AND d.deptype = 'a' "
    "UNION SELECT d.refobjid FROM pg_attrdef ad JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass "
    "AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'n' "
    "WHERE ad.adrelid = to_regclass(:t)) ORDER BY 1")
# Whether the role may use schema :s (USAGE); no row: no such schema. Looked up by its name as written (a mixed-case
# one too): to_regnamespace would read it as an identifier, folding it to lower case.
PG_SCHEMA_USAGE = "SELECT has_schema_privilege(n.oid, 'USAGE') FROM pg_namespace n WHERE n.nspname = :s"


def mapped_privileges(mapped: MappedTable) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the mapped writes need of the app's table: the privileges, in a GRANT's order, and the columns INSERT
    and UPDATE name (the Clerk-id column, the mapped ones, the delete policy's; column-level grants suffice)."""
    written = [mapped.clerk_id_column, *mapped.resolved()]
    policy = mapped.on_delete
    if isinstance(policy, SoftDelete | Deactivate) or (isinstance(policy, Anonymise) and policy.column):
        written.append(str(policy.column))
    privileges = ("SELECT", "INSERT", "UPDATE") + (("DELETE",) if isinstance(policy, HardDelete) else ())
    return privileges, tuple(dict.fromkeys(written))


def mapped_reads(conn: Connection, mapped: MappedTable) -> tuple[str, ...]:
    """The columns of the app's table the mapped writes read (SELECT; column-level grants suffice): the written ones
    (:func:`mapped_privileges`: the upsert's ``WHERE`` and ``ON CONFLICT`` name the Clerk-id column, a coalesced
    column reads its value, a soft delete its column), the link columns and then the primary key (a row to link is
    found by them)."""
    _, written = mapped_privileges(mapped)
    reads = [*written, *mapped.link_columns]
    if mapped.links:
        reads += _primary_key_columns(conn, mapped.table)
    return tuple(dict.fromkeys(reads))


# The primary key's columns of table :t, in the key's order; none when there is no such table (to_regclass: NULL).
# The catalog is readable by every role, whatever it may do to the table.
PG_PRIMARY_KEY = ("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                  "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(:t) AND i.indisprimary "
                  "ORDER BY array_position(i.indkey::int2[], a.attnum)")


def _primary_key_columns(conn: Connection, table: str) -> list[str]:
    """The primary key's columns of the app's ``table``; none when it is not there (a schema behind, said as that
    elsewhere) or the role may not look at it (MySQL/MariaDB refuse SHOW CREATE TABLE to a role with no privilege
    on the table, 1142: its privileges are then missing anyway, and said so). PostgreSQL: asked of the catalog."""
    if conn.dialect.name == "postgresql":
        return list(conn.execute(sa.text(PG_PRIMARY_KEY), {"t": _qualified(conn, table)}).scalars())
    schema, bare = _split(table)
    try:
        return list(sa.inspect(conn).get_pk_constraint(bare, schema=schema)["constrained_columns"])
    except sa.exc.NoSuchTableError:
        return []
    except sa.exc.DBAPIError as exc:
        if not is_insufficient_privilege(exc.orig):
            raise
        return []


def lacking_privileges(conn: Connection, mapped: MappedTable) -> list[str]:
    """Which of :func:`mapped_privileges` ``conn``'s role lacks on the app's table (its schema usable); SELECT on each
    of :func:`mapped_reads`. PostgreSQL: asked of the catalog (``has_column_privilege``, ``has_table_privilege``), so
    no statement runs on the app's table (a statement-level trigger would fire on a zero-row one). MySQL/MariaDB: by
    running each on no row in a savepoint rolled back (``.. WHERE 1 = 0``): its triggers are FOR EACH ROW only, so
    none fires, and the server answers by its own rules (wildcards, roles, column grants). SQLite: none."""
    privileges, columns = mapped_privileges(mapped)
    reads = mapped_reads(conn, mapped)
    name = _qualified(conn, mapped.table)
    if conn.dialect.name == "postgresql":
        held = conn.execute(sa.text(
            "SELECT r.oid IS NOT NULL, has_table_privilege(r.oid, 'DELETE'), "
            "COALESCE(bool_and(has_column_privilege(r.oid, a.attnum, 'SELECT')), true), "
            "COALESCE(bool_and(has_column_privilege(r.oid, a.attnum, 'INSERT')) FILTER (WHERE a.attname = ANY(:c)), "
            "true), "
            "COALESCE(bool_and(has_column_privilege(r.oid, a.attnum, 'UPDATE')) FILTER (WHERE a.attname = ANY(:c)), "
            "true) "
            "FROM (SELECT to_regclass(:t) AS oid) r LEFT JOIN pg_attribute a ON a.attrelid = r.oid "
            "AND a.attname = ANY(:r) AND NOT a.attisdropped GROUP BY r.oid"),
            {"t": name, "c": list(columns), "r": list(reads)}).one()
        if not held[0]:  # not there (a schema behind, said as that elsewhere)
            return []
        have = {"DELETE": held[1], "SELECT": held[2], "INSERT": held[3], "UPDATE": held[4]}
        return [p for p in privileges if not have[p]]
    if conn.dialect.name not in ("mysql", "mariadb"):
        return []
    quote = conn.dialect.identifier_preparer.quote
    listed = ", ".join(quote(c) for c in columns)
    probes = {"SELECT": f"SELECT {', '.join(quote(c) for c in reads)} FROM {name} WHERE 1 = 0",  # noqa: S608
              "INSERT": f"INSERT INTO {name} ({listed}) SELECT {listed} FROM {name} WHERE 1 = 0",  # noqa: S608
              "UPDATE": f"UPDATE {name} SET {', '.join(f'{quote(c)} = NULL' for c in columns)} WHERE 1 = 0",  # noqa: S608
              "DELETE": f"DELETE FROM {name} WHERE 1 = 0"}  # noqa: S608
    lacking = []
    for privilege in privileges:
        savepoint = conn.begin_nested() if conn.in_transaction() else conn.begin()
        try:
            conn.exec_driver_sql(probes[privilege])
        except sa.exc.DBAPIError as exc:
            savepoint.rollback()
            if not is_insufficient_privilege(exc.orig):
                raise
            lacking.append(privilege)
            continue
        savepoint.rollback()
    return lacking


def _reason(exc: Exception) -> str:
    """A refusal as logged: a StoreError's message, else only its type (a compute's message may quote values)."""
    return str(exc) if isinstance(exc, StoreError) else type(exc).__name__


def _still_in_transaction(conn: Connection, exc: Exception, lacks: Callable[[], bool] | None = None) -> None:
    """Whether a failed backfill row is the row's refusal, or the whole transaction's end: a deadlock or a
    lock wait ran out (on MySQL a deadlock rolled everything back; retrying the row in it would count rows
    as written that were not), the connection is gone (or the server's disk or memory, or a table is
    missing), or on SQLite an app trigger's ``RAISE(ROLLBACK)`` ended the transaction, savepoints and earlier
    rows too. Those are raised, the backfill to be run again.

    The deadlock is rarely ``exc`` itself: InnoDB rolled the savepoint back with the transaction, so leaving
    ``begin_nested()`` fails on its ROLLBACK TO SAVEPOINT (1305, "SAVEPOINT does not exist"), the deadlock
    that caused it in the exception's context: :func:`~clerk_sync._db_errors.passing_cause` reads the chain.

    A privilege refusal is the whole's when ``lacks`` (:meth:`SchemaMapping.role_lacks` of the row's table) says
    the role lacks a grant there; else the row's (a row-level security policy, a trigger's)."""
    cause = passing_cause(exc)
    if cause is None and lacks is not None and (denied := privilege_refusal(exc)) is not None and lacks():
        cause = denied
    if cause is not None:
        raise store_error(cause) from exc
    if conn.dialect.name == "sqlite" and not conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
        raise AppTableRolledBack("the app's table rolled back the whole transaction (a trigger's RAISE(ROLLBACK)): "
                                 "nothing was written; make the trigger RAISE(ABORT), which refuses only the row")


def check_at_once(conn: Connection) -> None:
    """PostgreSQL: the app's constraints checked at each statement, also those it declared DEFERRABLE
    INITIALLY DEFERRED. Checked at COMMIT, a refusal of one mapped row names no statement and rolls back
    the whole transaction (a reconcile page, an erasure, a backfill) on every run; at once, it is the row's."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(CHECK_AT_ONCE)


def cleared_values(table: sa.Table, columns: Mapping[str, Column], clerk_id: str) -> tuple[JSON, list[str]]:
    """What erasure and :class:`Anonymise` write into the mapped personal columns, and the NOT NULL ones that
    have nothing to be cleared to. NULL where the column takes it; for a NOT NULL string column that is
    UNIQUE (a custom user model's e-mail), a placeholder of this user's own (:func:`erased_placeholder`:
    one value for every erased user would refuse the second); else the mapped Column's ``default`` (what
    the mapping already writes for "no value", ``Column("first_name", default="")``); else ``""`` for a
    string column (empty rather than a placeholder that reads as data). A NOT NULL number or date without
    a default, or a UNIQUE one, has no cleared value: :func:`check_schema` fails it."""
    values: JSON = {}
    kept: list[str] = []
    for name, col in columns.items():
        if not col.is_personal:
            continue
        column = table.c[name]
        value = _cleared(column.nullable, column.type, col, unique=_unique(table, column, invalid=True),
                         clerk_id=clerk_id)
        if value is _NO_VALUE:
            kept.append(name)
        else:
            values[name] = value
    return values, kept


_NO_VALUE = object()


def _cleared(nullable: bool | None, type_: Any, col: Column, *, unique: bool, clerk_id: str | None) -> Any:
    if nullable or nullable is None:
        return None
    if unique:
        if not isinstance(type_, sa.String):
            return _NO_VALUE
        return "erased" if clerk_id is None else erased_placeholder(clerk_id, col.source == "email", type_.length)
    if col.default is not None:
        return col.default
    return "" if isinstance(type_, sa.String) else _NO_VALUE


def erased_placeholder(clerk_id: str, email: bool, length: int | None) -> str:
    """A UNIQUE column's cleared value: per user (a digest of the Clerk id, not personal), shaped as an
    address for an e-mail column (``.invalid`` is reserved, RFC 2606: it reaches no one)."""
    digest = hashlib.sha256(clerk_id.encode()).hexdigest()
    value = f"erased-{digest[:16]}@erased.invalid" if email else f"erased-{digest[:16]}"
    return value[:length] if length else value


def unicode_lower(conn: Connection) -> Any:
    """SQL's ``lower()`` as PostgreSQL and MariaDB have it: SQLite's own folds ASCII only, so linking by
    e-mail would not find ``ÉLODIE@Example.com`` for Clerk's ``élodie@example.com`` there (and insert a
    second row), nor erasure a stored ``ANNÉ@``. On SQLite, Python's, registered on the connection (the
    callers are rare: linking a new user, an erasure)."""
    if conn.dialect.name != "sqlite":
        return sa.func.lower
    raw: Any = conn.connection.driver_connection
    raw.create_function("clerk_sync_lower", 1, lambda v: v.lower() if isinstance(v, str) else v, deterministic=True)
    return sa.func.clerk_sync_lower


def _exactly(conn: Connection, text: Any, *, collatable: bool = True) -> Any:
    """``text`` compared code point by code point. MySQL/MariaDB compare with the column's collation, whose
    defaults (``*_general_ci``, ``*_unicode_ci``) ignore accents and trailing spaces: linking would give a
    new ``élodie@example.com`` the row of ``elodie@example.com``, another person's account. There both sides
    go as utf8mb4 bytes (``utf8mb4_bin`` still pads spaces). PostgreSQL's column may have a non-deterministic
    ICU collation (``deterministic = false``: case or accents ignored), the same hazard: compared under
    ``COLLATE "C"`` (``collatable``: a text; a number column takes no collation). SQLite: as it is."""
    if conn.dialect.name == "postgresql":
        return sa.collate(text, "C") if collatable else text
    if conn.dialect.name not in ("mysql", "mariadb"):
        return text
    return sa.cast(sa.cast(text, mysql.CHAR(charset="utf8mb4")), sa.LargeBinary)


def folded_like(lower: Any, column: Any, pattern: str) -> sa.ColumnElement[bool]:
    """``column LIKE pattern`` (escape character ``/``) whatever their case, both folded by the same
    ``lower`` (:func:`unicode_lower`): Python's and PostgreSQL's disagree on some letters (``İ``, a final
    ``Σ``)."""
    folded: sa.ColumnElement[bool] = lower(column).like(lower(sa.literal(pattern)), escape="/")
    return folded


def sqlite_execute(conn: Connection, sql: str, rows: Sequence[Sequence[Any]], *, many: bool = False) -> list[Any]:
    """Run one ``?``-style statement on the sqlite3 connection under ``conn`` (in its transaction), without
    SQLAlchemy's per-call work (several times the statement's own cost on the hooks path); the caller
    converts values. Errors come out as SQLAlchemy's, as from ``conn.execute``."""
    with driver_cursor(conn, sql) as cursor:
        if many:
            cursor.executemany(sql, rows)
            return []
        return list(cursor.execute(sql, rows[0]).fetchall())


def _quote_ident(name: str) -> str:
    """An identifier quoted for PostgreSQL and SQLite, as it is (no ``%`` doubled: SQLAlchemy's
    PostgreSQL preparer doubles it for its pyformat drivers, which was once too many on the psycopg
    statements built here and on the text SQLAlchemy compiles, which doubles it again)."""
    return '"' + name.replace('"', '""') + '"'


def _split(name: str) -> tuple[str | None, str]:
    """A mapped table's name as (schema or None, table): ``"public.users"``, ``"users"``."""
    schema, dot, table = name.partition(".")
    return (schema, table) if dot else (None, name)


def _at(name: str) -> tuple[str, str | None]:
    """A mapped table's name as an inspector takes it: ``inspector.get_columns(*_at(name))``."""
    schema, table = _split(name)
    return table, schema


def _located(dialect: str, name: str) -> tuple[str | None, str]:
    """:func:`_split`, refusing a qualified name on SQLite, whose attached databases clerk-sync does not use."""
    schema, table = _split(name)
    if schema is not None and dialect == "sqlite":
        raise ConfigError(f"mapping: table {name!r} names a schema, and SQLite has none clerk-sync can use: name "
                          f"the table alone ({table!r}); if one of clerk-sync's own tables (users, organizations, "
                          "organization_memberships, ...) has its name, rename yours (ALTER TABLE users RENAME TO "
                          "app_users) and map that name")
    return schema, table


def _not_clerk_syncs(conn: Connection, name: str) -> tuple[str | None, str]:
    """:func:`_located`, refusing one of clerk-sync's own tables: an unqualified ``users`` is clerk-sync's
    table (its tables are the connection's), as is ``clerk_sync.users`` when that is the connection's schema.
    Mapped, migrate would add the app's columns to it and every delivery write the app's row there."""
    schema, table = _located(conn.dialect.name, name)
    if table in metadata.tables and schema in (None, conn.dialect.default_schema_name):
        ways = {"sqlite": "rename your table and map that name",
                "postgresql": f"name yours with its schema ('public.{table}'), clerk-sync's tables being in a "
                              "schema of their own"}
        way = ways.get(conn.dialect.name, f"name yours with its database ('app.{table}'), clerk-sync's tables being "
                                          "in a database of their own")
        raise ConfigError(f"mapping: table {name!r} is clerk-sync's own {table} table on this connection, not "
                          f"your app's: {way}")
    return schema, table


def _qualified(conn: Connection, name: str) -> str:
    """A mapped table's name quoted for SQL text on ``conn``'s database, with its schema if it names one."""
    quote = conn.dialect.identifier_preparer.quote
    return ".".join(quote(part) for part in name.split(".", 1))


def _table_sql(table: sa.Table, quote: Callable[[str], str]) -> str:
    """A reflected table's name for SQL text, with its schema if it has one (``"public"."users"``)."""
    return f"{quote(table.schema)}.{quote(table.name)}" if table.schema else quote(table.name)


def direct_sqlite(dialect: sa.Dialect) -> bool:
    """Whether :func:`sqlite_execute` with the default SQLite dialect's conversions (:func:`processors`)
    writes what SQLAlchemy would: SQLite, and no ``json_serializer``/``json_deserializer`` given to the
    engine (with one, the writes go through SQLAlchemy, which applies it)."""
    return (dialect.name == "sqlite" and getattr(dialect, "_json_serializer", None) is None
            and getattr(dialect, "_json_deserializer", None) is None)


def processors(types: Sequence[sa.types.TypeEngine[Any]], dialect: sa.Dialect, *,
               result: bool = False) -> list[Callable[[Any], Any] | None]:
    """SQLAlchemy's own value conversions for these column types (bind, or result), to use with
    :func:`sqlite_execute`."""
    return [t.dialect_impl(dialect).result_processor(dialect, None) if result else
            t.dialect_impl(dialect).bind_processor(dialect) for t in types]


def sqlite_time(value: datetime) -> Any:
    """A timestamp as SQLAlchemy binds it on SQLite, for :func:`sqlite_execute`."""
    return _SQLITE_TIME(value) if _SQLITE_TIME is not None else value


_SQLITE_TIME = processors([Timestamp], sqlite.dialect())[0]


def _bind(i: int) -> str:
    return f"c{i}"  # bind names by position: the app's column names need not be valid bind names


# Column types whose Python values psycopg adapts exactly as SQLAlchemy would (JSON goes as Jsonb).
_RAW_TYPES = (sa.String, sa.Integer, sa.Boolean, sa.DateTime, sa.Numeric, sa.Float, sa.JSON)


def _cte_sql(table: sa.Table, key: sa.Column[Any], names: list[str], mapped: MappedTable,
             dialect: str, fixed: JSON,
             insert_only: frozenset[str] = frozenset()) -> tuple[str | None, tuple[int, ...]]:
    """The mapped upsert as the ``mapped`` CTE of the one-statement delivery (see :meth:`SchemaMapping.cte`),
    and the positions of its JSON values; (None, ()) when the projection's own statements must be used
    instead (not PostgreSQL, linking, no plain unique index on the Clerk-id column, a type psycopg would
    not adapt as SQLAlchemy does).

    Its rows come ``FROM up``: none when the guarded contract upsert refused the version, so the app's
    row follows the contract row's ordering and tombstones without a lock or a read of its own. An
    update whose mapped values the row already holds writes nothing (no dead tuple, no trigger run).
    One statement, one snapshot: a BEFORE trigger of the app's table that reads the contract tables sees
    them as they were before the statement (AFTER triggers and foreign keys see the new row). The mapped
    values are computed for every delivery the batch pipelines, stale ones too (a ``compute`` that
    raises sends the batch down the one-by-one path, where it runs only for applied changes)."""
    types = [table.c[n].type for n in names]
    if (dialect != "postgresql" or mapped.links or not _unique(table, key, plain=True)
            or not all(isinstance(t, _RAW_TYPES) and not isinstance(t, sa.Enum) for t in types)):
        return None, ()
    insert, conflict = _mapped_upsert(table, key, names, fixed, insert_only)
    sql = f"mapped AS ({insert} SELECT {', '.join(['%s'] * (len(names) + 1))} FROM up {conflict})"  # noqa: S608
    return sql, tuple(i for i, typ in enumerate(types) if isinstance(typ, sa.JSON))


def _mapped_upsert(table: sa.Table, key: sa.Column[Any], names: list[str], fixed: JSON,
                   insert_only: frozenset[str] = frozenset()) -> tuple[str, str]:
    """The ``INSERT INTO .. (columns, Clerk id)`` and ``ON CONFLICT ..`` around the rows of a ``mapped`` CTE
    (psycopg SQL): a row that already holds the values is left alone, and its delete-policy column the
    app's (see :func:`_update_sets`)."""
    def q(name: str) -> str:  # a "%" in a name is psycopg's placeholder sign: doubled in the SQL text
        return _quote_ident(name).replace("%", "%%")

    t, k = q(table.name), q(key.name)  # (the target is referred to by its bare name, schema-qualified or not)
    sets = _update_sets(table.name, names, fixed, q, insert_only)
    # json has no equality operator: its values are compared as jsonb
    json_columns = {q(n) for n in names if isinstance(table.c[n].type, sa.JSON)}
    mine = ", ".join(f"{t}.{c}" + ("::jsonb" if c in json_columns else "") for c, _ in sets)
    theirs = ", ".join(e + ("::jsonb" if c in json_columns else "") for c, e in sets)
    update = (f"DO UPDATE SET {', '.join(f'{c} = {e}' for c, e in sets)} "
              f"WHERE ROW({mine}) IS DISTINCT FROM ROW({theirs})" if sets else "DO NOTHING")
    return (f"INSERT INTO {_table_sql(table, q)} ({', '.join([*(q(n) for n in names), k])})",
            f"ON CONFLICT ({k}) {update}")


def _update_sets(table: str, names: list[str], fixed: JSON, quote: Callable[[str], str],
                 insert_only: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """An upsert's ``SET`` for a row already there, as (column, expression): the mapped columns from
    ``excluded``, not the ``insert_only`` ones (the row's own value stays: :attr:`Column.insert_only`); the
    delete-policy column only where it holds nothing (``COALESCE(is_active, TRUE)``:
    an app admin's own deactivation stays), SoftDelete's live NULL not at all (the app's own soft delete
    stays). A new row gets the live value (the INSERT); a linked one is the app's own row, and its column is
    filled as on update (:meth:`_Projection._adopt`)."""
    sets = []
    for name in names:
        column = quote(name)
        if name in insert_only:
            continue
        if name not in fixed:
            sets.append((column, f"excluded.{column}"))
        elif fixed[name] is not None:
            sets.append((column, f"COALESCE({quote(table)}.{column}, excluded.{column})"))
    return sets


@dataclass(frozen=True, slots=True)
class MappedWave:
    """A mapped table's part of a wave statement (see ``store._wave_sql``): ``columns`` are the
    definitions of its values in the wave's JSON rows (``m0``, ``m1``, ...), ``sql`` the ``mapped`` CTE
    that writes them for the rows the contract upsert ``up`` returned, ``row`` a record's values."""

    columns: str
    sql: str
    row: Callable[[JSON], list[Any]]


def json_column_type(type_: sa.types.TypeEngine[Any]) -> str:
    """How json_to_recordset reads a value for a column of ``type_`` (PostgreSQL), so that the INSERT
    stores what it would from psycopg's parameter: strings as ``text`` (the column's own length check
    refuses a long one; a cast would cut it), date-times with or without a time zone as the column is,
    JSON as its text (a JSON ``null`` is then the JSON value, as ``Jsonb(None)`` is, not SQL NULL)."""
    if isinstance(type_, sa.String | sa.JSON):
        return "text"
    if isinstance(type_, sa.DateTime):
        return "timestamptz" if type_.timezone else "timestamp"
    return str(type_.compile(postgresql.dialect()))  # type: ignore[no-untyped-call]


def _as_json(type_: sa.types.TypeEngine[Any]) -> Callable[[Any], Any]:
    """A mapped value as the wave's JSON carries it for a column of ``type_``, only where PostgreSQL then
    stores exactly what psycopg's parameter gave: a float for NUMERIC at the 15 digits of PostgreSQL's
    float8 cast, a decimal or date-time as its text (an aware one not for a column without a time zone,
    which psycopg's parameter would shift to the session's). Anything else raises TypeError, and that
    entity's deliveries of the batch take the statement per delivery (psycopg adapts their values):
    floats for text and REAL columns, non-finite ones for DOUBLE, a signalling NaN decimal included."""
    def refuse(value: Any) -> Any:
        raise TypeError(f"{type(value).__name__} for a {type_} column")

    def taking(*kinds: type, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], Any]:
        def carry(value: Any) -> Any:
            kind = type(value)
            if value is None or kind is str:  # psycopg's text goes through the column type's input, as here
                return value
            return convert(value) if kind in kinds else refuse(value)
        return carry

    def number(value: Any) -> Any:
        if type(value) is Decimal and value.is_snan():
            return refuse(value)
        return format(value, ".15g") if type(value) is float else str(value) if type(value) is Decimal else value

    def finite(value: Any) -> Any:
        return value if type(value) is int or math.isfinite(value) else refuse(value)

    def when(value: Any) -> Any:  # (a datetime subclass too, as psycopg adapts it)
        if value is None or type(value) is str:
            return value
        if isinstance(value, datetime) and (type_.timezone or value.tzinfo is None):  # type: ignore[attr-defined]
            return value.isoformat()
        return refuse(value)

    if isinstance(type_, sa.JSON):
        return json.dumps
    if isinstance(type_, sa.Boolean):  # not a str: PostgreSQL would take "true" here, SQLAlchemy's Boolean not
        return lambda value: value if value is None or type(value) is bool else refuse(value)
    if isinstance(type_, sa.Integer):
        return taking(int)
    if isinstance(type_, sa.Float):  # float4: psycopg's float8 is rounded to it, not the decimal text
        real = type_.compile(postgresql.dialect()) == "REAL"  # type: ignore[no-untyped-call]
        return taking(int) if real else taking(int, float, convert=finite)
    if isinstance(type_, sa.Numeric):
        return taking(int, float, Decimal, convert=number)
    if isinstance(type_, sa.DateTime):
        return when
    if isinstance(type_, sa.String):  # a float's text is PostgreSQL's float8 output there, not repr
        return taking(int, bool)
    return taking()


def _wave(table: sa.Table, key: sa.Column[Any], names: list[str], projection: _Projection) -> MappedWave:
    types = [table.c[n].type for n in names]
    columns = ", ".join(f"m{i} {json_column_type(t)}" for i, t in enumerate(types))
    converters = [_as_json(t) for t in types]

    def row(values: JSON) -> list[Any]:
        return [convert(value) for convert, value in zip(converters, projection.row(values), strict=True)]

    insert, conflict = _mapped_upsert(table, key, names, projection.fixed, projection.insert_only)
    # JSON columns come as their text, read as jsonb as psycopg's Jsonb parameter is (into a json column too)
    values = ", ".join([*(f"v.m{i}::jsonb" if isinstance(t, sa.JSON) else f"v.m{i}" for i, t in enumerate(types)),
                        "v.clerk_id"])
    sql = (f"mapped AS ({insert} SELECT {values} FROM up "  # noqa: S608 (identifiers quoted; values bound)
           f"JOIN v ON v.clerk_id = up.clerk_id ORDER BY v.clerk_id {conflict})")
    return MappedWave(columns, sql, row)


def _as_flag(type_: Any, value: Any) -> Any:
    """A true/false (``banned``, ``transform="bool"``, Deactivate's flag) as 1/0 for a number column (a
    ``smallint`` flag): PostgreSQL refuses a boolean there ("cannot cast type boolean to smallint"), every
    row with it, where MariaDB and SQLite store 1/0; as ``'true'``/``'false'`` for a text column, one spelling on
    every store, JSON's and PostgreSQL's (psycopg sent a bool, written 'true', sqlite3 and mysqlclient 1/0: review);
    anything else as it is."""
    if isinstance(value, bool) and not isinstance(type_, sa.Boolean):
        if isinstance(type_, sa.Integer | sa.Numeric | sa.Float):  # (SQLAlchemy 2.1's Float is no Numeric)
            return int(value)
        if isinstance(type_, sa.String):
            return "true" if value else "false"
    return value


def _as_column_value(column: sa.Column[Any], external_id: str) -> Any:
    """Clerk's external id (a string) as the app's id column holds it; None if it cannot be one (the
    text ``"abc"`` is no integer id), so nothing matches."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return external_id
    if python_type is int:
        return _as_int(external_id)  # ("--5" and "²" passed str.isdigit, then int() raised)
    if python_type is uuid.UUID:  # a uuid primary key (PostgreSQL's uuid, SQLAlchemy's Uuid)
        try:
            return uuid.UUID(external_id) if getattr(column.type, "as_uuid", True) else external_id
        except ValueError:
            return None
    return external_id if python_type is str else None


def _unique(table: sa.Table, column: sa.Column[Any], *, plain: bool = False, invalid: bool = False) -> bool:
    """Whether ``column`` alone is unique in the reflected ``table`` (index or constraint). ``plain``: not
    through a partial index (ON CONFLICT (column) cannot infer one without its predicate). Never through a
    PostgreSQL INVALID index (a CONCURRENTLY build that failed, marked by :meth:`SchemaMapping.table`): ON
    CONFLICT (column) cannot use it ("no unique or exclusion constraint matching"), and one not ready yet
    enforces nothing (ON CONFLICT DO NOTHING inserts the duplicate), unless ``invalid``: erasure's cleared
    value, which such an index, if ready, may still refuse as a duplicate.

    PostgreSQL: ON CONFLICT refuses a DEFERRABLE constraint as its arbiter ("ON CONFLICT does not support
    deferrable unique constraints"), even under SET CONSTRAINTS ALL IMMEDIATE, and ON CONFLICT (column)
    infers every unique index on the column, so one such constraint on ``column`` alone makes it not unique
    here, a plain unique index beside it or not; nor, unless ``plain``, one anywhere on the table: ON CONFLICT
    DO NOTHING without a target takes every unique index as its arbiter. Unless ``invalid``: such a
    constraint refuses a duplicate (at the statement, the writes being :func:`check_at_once`)."""
    deferrable: set[str] = table.info.get("deferrable") or set()
    on_column = [list(c.columns) for c in [*table.constraints, *table.indexes]
                 if isinstance(c, sa.UniqueConstraint | sa.Index) and c.name in deferrable]
    if deferrable and not invalid and (not plain or any(len(cols) == 1 and cols[0].name == column.name
                                                        for cols in on_column)):
        return False
    indexes = [list(i.columns) for i in table.indexes if i.unique and not (plain and _partial(i) is not None)
               and (invalid or not i.info.get("invalid"))]
    constraints = [list(c.columns) for c in table.constraints if isinstance(c, sa.UniqueConstraint)]
    return any(len(cols) == 1 and cols[0].name == column.name for cols in indexes + constraints)


def _partial(index: sa.Index) -> Any:
    """A partial index's predicate (``WHERE clerk_user_id IS NOT NULL``, Django's ``condition=``), as
    PostgreSQL's and SQLite's reflection give it; None for a plain index."""
    where = index.dialect_options["postgresql"].get("where")
    return where if where is not None else index.dialect_options["sqlite"].get("where")


def _skip_expression_index_warning() -> None:
    """SQLAlchemy warns that it does not reflect an app's expression index (``lower(email)``): nothing
    here needs it (an erased e-mail it refuses is retried with a placeholder), so no warning per table.

    A filter for that one message, added before each reflection (again: the same filter is not repeated;
    a test's own filter reset may have removed it) and left in place: ``warnings.catch_warnings`` would
    restore the process's whole filter list on leaving, undoing filters another thread added meanwhile (it
    is not thread-safe), and reflection runs in the committer's and the dispatcher's threads."""
    warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index", sa.exc.SAWarning)


def _unique_sets(inspector: Any, name: str) -> set[tuple[str, ...]]:
    """The column sets unique in table ``name`` (indexes, constraints; SQLite's inline ``UNIQUE`` too), not
    through a PostgreSQL INVALID index (a CONCURRENTLY build that failed: it enforces nothing reliably).
    A PostgreSQL DEFERRABLE constraint counts: it refuses duplicates (the writes check it at once), so migrate
    adds no index beside it, which would not serve ON CONFLICT either (see :func:`_unique`,
    :func:`_deferrable_problems`)."""
    extra = {"include_auto_indexes": True} if inspector.dialect.name == "sqlite" else {}
    _skip_expression_index_warning()
    indexes = inspector.get_indexes(*_at(name), **extra)
    invalid = _invalid_indexes(inspector, name)
    unique = {tuple(i["column_names"]) for i in indexes if i.get("unique") and None not in i["column_names"]
              and i["name"] not in invalid}
    return unique | {tuple(u["column_names"]) for u in inspector.get_unique_constraints(*_at(name))}


def _sqlite_referrers(conn: Connection, table: str, columns: Sequence[str]) -> str:
    """SQLite: the tables whose foreign keys refer to ``columns`` of ``table`` (to its primary key where a key
    names no column), as ``orders (email), ..``; "" for none."""
    info = conn.exec_driver_sql(f"PRAGMA table_info({_quote_ident(table)})").mappings().all()
    pk = [c["name"] for c in sorted(info, key=lambda c: c["pk"]) if c["pk"]]
    rows = conn.execute(sa.text(
        'SELECT m.name AS referrer, p."from" AS column, p."to" AS referred, p.seq AS seq FROM sqlite_master m '
        "JOIN pragma_foreign_key_list(m.name) p WHERE m.type = 'table' AND lower(p.\"table\") = lower(:t)"),
        {"t": table}).mappings().all()
    found = sorted({f"{r['referrer']} ({r['column']})" for r in rows
                    if (r["referred"] or (pk[r["seq"]] if r["seq"] < len(pk) else None)) in columns})
    return ", ".join(found)


def _pg_table_state(conn: Connection, name: str) -> tuple[str | None, set[str], set[str], frozenset[tuple[str, str]]]:
    """PostgreSQL: the schema table ``name`` is found in (its own, or on the search path, as reflection finds it), its
    INVALID indexes (``pg_index.indisvalid`` false), its DEFERRABLE unique and exclusion constraints (their
    indexes' names, the constraints': ``pg_index.indimmediate`` false), and its partitions as (schema, name):
    a foreign key error of a partitioned table names the leaf partition the row went to. Read from the
    catalog, not from reflection: SQLAlchemy reports an INVALID index as a valid one before 2.1 (2.1 adds
    ``postgresql_invalid``), and 2.0 is supported; neither tells a deferrable unique constraint."""
    row = conn.execute(sa.text(
        "SELECT (SELECT nspname FROM pg_namespace WHERE oid = c.relnamespace) AS schema, "
        "ARRAY(SELECT x.relname FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid "
        "      WHERE i.indrelid = c.oid AND NOT i.indisvalid) AS invalid, "
        "ARRAY(SELECT x.relname FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid "
        "      WHERE i.indrelid = c.oid AND NOT i.indimmediate) AS deferrable, "
        "ARRAY(SELECT n.nspname || '.' || p.relname FROM pg_partition_tree(c.oid) t "
        "      JOIN pg_class p ON p.oid = t.relid JOIN pg_namespace n ON n.oid = p.relnamespace "
        "      WHERE t.relid <> c.oid) AS partitions "
        "FROM pg_class c WHERE c.oid = to_regclass(:t)"), {"t": _qualified(conn, name)}).first()
    if row is None:
        return None, set(), set(), frozenset()
    partitions = frozenset(tuple(qualified.split(".", 1)) for qualified in row.partitions)
    return str(row.schema), set(row.invalid), set(row.deferrable), partitions


def _missing_columns(mapped: MappedTable, columns: Iterable[str]) -> list[str]:
    """What the mapping names that the app's table (its ``columns``) lacks, each as what to do about it."""
    migrate = "run `clerk-sync migrate --mapping ...`, which adds it"
    policy = _policy_column(mapped)
    named = {**{c: ("a link column", "add it or stop linking by it") for c in mapped.link_columns},
             **{c: ("a mapped column", "add it or remove it from the mapping") for c in mapped.columns},
             **({policy[0]: (f"{type(mapped.on_delete).__name__}'s column", migrate)} if policy else {}),
             mapped.clerk_id_column: ("the Clerk-id column", migrate)}
    present = set(columns)
    return [f"{mapped.table}.{column} ({what}) is missing: {fix}"
            for column, (what, fix) in named.items() if column not in present]


def _refuse_missing_columns(table: sa.Table, mapped: MappedTable) -> None:
    """A column the mapping names that the app's table lacks: each row's refusal, naming it (a ``KeyError`` deep in
    the projection said only "a value the column's type cannot take")."""
    missing = _missing_columns(mapped, table.c.keys())
    if missing:
        raise StoreDataError("; ".join(missing))


def _sources(entity: Entity) -> list[str]:
    """The sources a Column of ``entity``'s table may name (a dotted path under the ``*_metadata`` ones too)."""
    fields = [name for name in _RECORD_FIELDS[entity] if name not in ("clerk_updated_at", "lock_version",
                                                                        "lockout_pending_s")]
    return [*fields, "full_name"] if entity is Entity.USER else fields


def _check_source(entity: Entity, mapped: MappedTable, name: str, col: Column) -> None:
    """A source no record of ``entity`` has (``"ful_name"``) would write NULL into every row: refused when declared."""
    if col.source is None:
        return
    known = _sources(entity)
    head, dot, rest = col.source.partition(".")
    paths = [field for field in known if field.endswith("_metadata")]
    if (head in paths) if dot else (head in known):
        return
    close = difflib.get_close_matches(head, paths if dot else known, n=1)
    hint = f" (did you mean {close[0] + dot + rest!r}?)" if close else ""
    under = f", or a dotted path under {', '.join(paths)}" if paths else ""
    raise ValueError(f"{mapped.table}.{name}: unknown source {col.source!r} for {entity.value}{hint}; known: "
                     f"{', '.join(known)}{under}; or Column(compute=...)")


def _lookup(values: JSON, source: str) -> Any:
    if source == "full_name":
        names = [values.get("first_name"), values.get("last_name")]
        return " ".join(n for n in names if n) or None
    head, _, rest = source.partition(".")
    value: Any = values.get(head)
    for part in rest.split(".") if rest else ():
        value = value.get(part) if isinstance(value, dict) else None
    return value


# -- the live schema: what the mapping needs, checked (doctor) and added (migrate) ---------------------

def _policy_column(mapped: MappedTable) -> tuple[str, sa.types.TypeEngine[Any]] | None:
    if isinstance(mapped.on_delete, SoftDelete | Anonymise) and mapped.on_delete.column is not None:
        return mapped.on_delete.column, sa.DateTime(timezone=True)
    if isinstance(mapped.on_delete, Deactivate):
        return mapped.on_delete.column, sa.Boolean()
    return None


def check_schema(conn: Connection, mapping: SchemaMapping) -> list[tuple[str, str]]:
    """Problems of the live schema against the mapping, as (severity, what to fix); empty when fine."""
    inspector = sa.inspect(conn)
    problems: list[tuple[str, str]] = []
    for entity, mapped in mapping.tables.items():
        name = mapped.table
        try:
            _not_clerk_syncs(conn, name)
        except ConfigError as exc:
            problems.append(("fail", str(exc)))
            continue
        if not inspector.has_table(*_at(name)):
            where = (f" (schema or database {mapped.schema!r} as this connection sees it)" if mapped.schema else "")
            problems.append(("fail", f"table {name!r} does not exist{where}: create it (the mapping writes existing "
                                     "tables)"))
            continue
        columns = {c["name"]: c for c in inspector.get_columns(*_at(name))}
        needed = [mapped.clerk_id_column, *mapped.columns, *mapped.link_columns]
        policy = _policy_column(mapped)
        for column in [*needed, *([policy[0]] if policy else [])]:
            if column not in columns:
                fix = "run `clerk-sync migrate --mapping ...`" if column in (mapped.clerk_id_column, *(
                    [policy[0]] if policy else [])) else "add it or remove it from the mapping"
                problems.append(("fail", f"{name}.{column} is missing: {fix}"))
        # (before migrate, without the Clerk-id column, every row is unlinked: the preflight run says it too)
        problems += [("warn", p) for c in mapped.link_columns if c in columns
                     for p in _shared_link_values(conn, mapped, c, linked=mapped.clerk_id_column in columns,
                                                  text=isinstance(columns[c]["type"], sa.String))]
        problems += _nondeterministic_link_problems(conn, mapped, [c for c in mapped.link_columns if c in columns])
        collation, column_type, nullable = (_mysql_collation(conn, name, mapped.clerk_id_column)
                                            if mapped.clerk_id_column in columns else ("", "", True))
        if collation.endswith("_ci"):  # MySQL/MariaDB: a case-insensitive collation (often the table's default)
            problems.append(("warn", f"{name}.{mapped.clerk_id_column} compares without regard to case "
                                     f"({collation}): Clerk ids that differ only in case would be one row; "
                                     f"ALTER TABLE {name} MODIFY {mapped.clerk_id_column} {column_type} CHARACTER SET "
                                     f"utf8mb4 COLLATE utf8mb4_bin{'' if nullable else ' NOT NULL'} (MODIFY restates "
                                     "the whole column: add its DEFAULT and COMMENT, if any, from SHOW CREATE TABLE)"))
        for column in mapped.link_columns:
            collation = _mysql_collation(conn, name, column)[0] if column in columns else ""
            if not collation.endswith("_ci"):
                continue
            if column == mapped.link_by_email:
                same = ("so the app's own lookups take elodie@ and élodie@ for one person; clerk-sync links by the "
                        "exact address (after lower()), which this column's index does not serve")
            else:
                same = ("so the app's own lookups take the ids ABC and abc (or ids differing in accents or trailing "
                        "spaces) for one; clerk-sync links by the exact external id, which this column's index does "
                        "not serve")
            problems.append(("warn", f"{name}.{column} compares without regard to case or accents ({collation}), "
                                     f"{same}: consider COLLATE utf8mb4_bin"))
        problems += _email_scan_problems(conn, mapped, columns)
        if mapped.links and not (inspector.get_pk_constraint(*_at(name)) or {}).get("constrained_columns"):
            # a linked row is read and adopted by its primary key: without one every new user was refused
            # (SQLite, MariaDB: a syntax error naming nothing) or every unlinked row adopted at once (review)
            problems.append(("fail", f"{name} has no primary key, and link_by_email/link_by_external_id adopt an "
                                     "existing row by it: add one (an id column), or drop the linking"))
        unique = _unique_sets(inspector, name)
        if mapped.clerk_id_column in columns and (mapped.clerk_id_column,) not in unique:
            problems.append(("fail", f"{name}.{mapped.clerk_id_column} has no unique index: run "
                                     "`clerk-sync migrate --mapping ...`"))
        elif mapped.clerk_id_column in columns:
            problems += _clerk_id_problems(inspector, entity, mapped, columns[mapped.clerk_id_column])
        if mapped.clerk_id_column in columns:
            problems += _invalid_index_problems(inspector, mapped, (mapped.clerk_id_column,) in unique)
            problems += _deferrable_problems(inspector, mapped)
        problems += _insert_problems(inspector, entity, mapped, columns)
        problems += _type_problems(entity, mapped, columns, conn.dialect.name)
        problems += _policy_type_problems(conn.dialect.name, mapped, columns)
        problems += _lockout_problems(entity, mapped)
        problems += _unbounded_problems(mapped, columns)
        problems += _refused_deletion_problems(inspector, mapping, entity, mapped)
        problems += _inactive_rows_problems(conn, mapped, columns)
        problems += _kept_address_problems(inspector, entity, mapped, columns)
        for column, col in mapped.resolved().items():  # erasure clears them whatever the policy
            if (col.is_personal and column in columns
                    and _cleared(columns[column].get("nullable", True), columns[column]["type"], col,
                                 unique=(column,) in unique, clerk_id=None) is _NO_VALUE):
                problems.append(("fail", f"{name}.{column} is NOT NULL and holds personal data, with nothing to clear "
                                         "it to (a number or date without a default, or UNIQUE): erasure (and "
                                         "Anonymise) leave it; let the column be NULL or make it text"))
    return problems


# Clerk's ids today: a prefix and 27 characters; clerk-sync's own columns take CLERK_ID_CHARS.
_ID_PREFIX = {Entity.USER: "user_", Entity.ORGANIZATION: "org_", Entity.MEMBERSHIP: "orgmem_"}


def _clerk_id_problems(inspector: Any, entity: Entity, mapped: MappedTable, info: Any) -> list[tuple[str, str]]:
    """The Clerk-id column too narrow for Clerk's ids (SQLite does not enforce a length), and a unique index
    on it that is only partial (each row then takes an UPDATE, then an INSERT, not one upsert)."""
    name, column = mapped.table, mapped.clerk_id_column
    problems: list[tuple[str, str]] = []
    widen = (f"ALTER TABLE {name} ALTER COLUMN {column} TYPE varchar({CLERK_ID_CHARS})"
             if inspector.dialect.name == "postgresql" else
             f"ALTER TABLE {name} MODIFY {column} VARCHAR({CLERK_ID_CHARS}) CHARACTER SET utf8mb4 COLLATE "
             "utf8mb4_bin (restate NOT NULL, DEFAULT and COMMENT if it has them)"
             if inspector.dialect.name != "sqlite" else
             f"a {column} VARCHAR({CLERK_ID_CHARS}) column (SQLite: a new table, its rows copied)")
    if not isinstance(info["type"], sa.String | sa.types.NullType):
        # (an integer one took every id on SQLite, refused on the others: the doctor said ok; a SQLite column
        # declared without a type, NullType, takes text)
        return [("fail", f"{name}.{column} is {info['type']} and Clerk's ids are text ({_ID_PREFIX[entity]}...): every "
                         f"row is refused on PostgreSQL and MySQL/MariaDB; make it text: {widen}")]
    length = getattr(info["type"], "length", None)
    if inspector.dialect.name != "sqlite" and isinstance(length, int) and length < CLERK_ID_CHARS:
        if length < len(_ID_PREFIX[entity]) + 27:
            problems.append(("fail", f"{name}.{column} holds {length} characters and Clerk's ids there "
                                     f"({_ID_PREFIX[entity]}...) have {len(_ID_PREFIX[entity]) + 27}: every row is "
                                     f"refused; widen it: {widen}"))
        else:
            problems.append(("warn", f"{name}.{column} holds {length} characters; Clerk's ids may grow to "
                                     f"{CLERK_ID_CHARS} (clerk-sync's own columns take that): widen it: {widen}"))
    extra = {"include_auto_indexes": True} if inspector.dialect.name == "sqlite" else {}
    indexes = [i for i in inspector.get_indexes(*_at(name), **extra)
               if i.get("unique") and i["column_names"] == [column]]
    predicates = [(i.get("dialect_options") or {}).get(f"{inspector.dialect.name}_where") for i in indexes]
    constrained = any(u["column_names"] == [column] for u in inspector.get_unique_constraints(*_at(name)))
    if predicates and None not in predicates and not constrained:
        problems.append(("warn", f"{name}.{column} is unique only through a partial index (WHERE {predicates[0]}): "
                                 "each delivery's row is written with an UPDATE, then an INSERT, not one upsert "
                                 "(nor in the delivery's own statement on PostgreSQL); a plain unique index allows "
                                 f"many NULLs too: CREATE UNIQUE INDEX {_index_name(mapped, inspector.dialect.name)} "
                                 f"ON {name} ({column})"))
    return problems


def _invalid_index_problems(inspector: Any, mapped: MappedTable, served: bool) -> list[tuple[str, str]]:
    """PostgreSQL: a unique index on the Clerk-id column alone that is INVALID (``pg_index.indisvalid`` false:
    a CREATE INDEX CONCURRENTLY that failed or was interrupted). The write path does not count it (see
    :func:`_unique`): a fail when no valid one ``served``, else a warning (it still costs every write)."""
    name, column = mapped.table, mapped.clerk_id_column
    invalid = _invalid_indexes(inspector, name)
    if not invalid:
        return []
    quote = inspector.dialect.identifier_preparer.quote
    found = sorted(str(i["name"]) for i in inspector.get_indexes(*_at(name))
                   if i["name"] in invalid and i.get("unique") and i["column_names"] == [column])
    then = ("another, valid, serves the writes; this one still costs each of them: drop it" if served else
            "each delivery's row is written with an UPDATE, then an INSERT: drop it")
    fix = "" if served else " and re-run `clerk-sync migrate --mapping ...`"
    return [("warn" if served else "fail",
             f"{name}.{column}: its unique index {index} is INVALID (a CREATE UNIQUE INDEX CONCURRENTLY that failed "
             f"or was interrupted): it enforces nothing reliably and ON CONFLICT cannot use it; {then} (DROP INDEX "
             f"CONCURRENTLY {quote(index)}){fix}") for index in found]


def _deferrable_problems(inspector: Any, mapped: MappedTable) -> list[tuple[str, str]]:
    """PostgreSQL: a DEFERRABLE unique constraint on the Clerk-id column alone (Django's
    ``UniqueConstraint(deferrable=...)``). ON CONFLICT cannot use it as its arbiter, nor a plain unique index
    beside it (ON CONFLICT (column) infers both): the writes do without (see :func:`_unique`)."""
    name, column = mapped.table, mapped.clerk_id_column
    deferrable = _deferrable_constraints(inspector, name)
    found = sorted(str(u["name"]) for u in inspector.get_unique_constraints(*_at(name))
                   if u["name"] in deferrable and u["column_names"] == [column])
    quote, table = inspector.dialect.identifier_preparer.quote, _qualified(inspector.bind, name)
    return [("warn", f"{name}.{column} is unique through the DEFERRABLE constraint {c}: PostgreSQL's ON CONFLICT "
                     "cannot use a deferrable constraint as its arbiter (nor a plain unique index on the column "
                     "beside it: ON CONFLICT infers both), so each delivery's row is written with an UPDATE, then "
                     "an INSERT, not one upsert (nor in the delivery's own statement); for one upsert make it NOT "
                     f"DEFERRABLE: ALTER TABLE {table} DROP CONSTRAINT {quote(c)}, ADD CONSTRAINT {quote(c)} "
                     f"UNIQUE ({quote(column)}) (Django: a UniqueConstraint without deferrable=)") for c in found]


def _insert_problems(inspector: Any, entity: Entity, mapped: MappedTable,
                     columns: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What refuses a new row at runtime: a NOT NULL column nothing fills (not mapped, no database default:
    a primary key whose default is the app's code, Django's ``UUIDField(default=uuid.uuid4)``), or a mapped
    one whose source can be empty (a user without a last name) with no Column ``default``."""
    name, problems = mapped.table, []
    policy = _policy_column(mapped)
    written = {mapped.clerk_id_column, *mapped.columns, *([policy[0]] if policy else [])}
    pk = _primary_key(inspector, name)
    for column, info in columns.items():
        if column in written or info.get("nullable", True) or _database_fills(inspector.dialect.name, info, pk):
            continue
        if column in pk:
            problems.append(("fail", f"{name}.{column} is the primary key and the database gives it no value (a "
                                     "default in the app's code, as Django's UUIDField(default=uuid.uuid4), is not "
                                     "applied to clerk-sync's inserts): every new row is refused; give it a database "
                                     f"default: {_pk_default(inspector.dialect.name, name, column, info['type'])}"))
        else:
            problems.append(("fail", f"{name}.{column} is NOT NULL without a default and not mapped: inserts "
                                     "of new Clerk entities will fail; give it a database default "
                                     f"({_set_default(inspector.dialect.name, name, column)}), or fill it in new "
                                     f"rows only: {column!r}: Column(compute=lambda values: ..., insert_only=True) "
                                     "(a plain mapped column is rewritten on every link and update: a linked "
                                     "row's own value, a password hash, would be lost)"))
    resolved = mapped.resolved()
    for column, col in resolved.items():
        if column in columns and not columns[column].get("nullable", True) and _may_be_empty(entity, col):
            how = f"{col.source!r}" + (f" (transform {col.transform!r})" if col.transform else "")
            problems.append(("warn", f"{name}.{column} is NOT NULL and its source {how} can be empty: those rows "
                                     f"are refused (the rest of the delivery applies); give the mapping's Column a "
                                     f"default, Column({col.source!r}, default=...), or let the column be NULL"))
    if policy is not None and policy[0] in columns and not columns[policy[0]].get("nullable", True) and isinstance(
            mapped.on_delete, SoftDelete | Anonymise):
        problems.append(("fail", f"{name}.{policy[0]} is NOT NULL, and a live row's deletion time is NULL: every "
                                 "new row is refused; let the column be NULL"))
    return problems


def _set_default(dialect: str, table: str, column: str) -> str:
    """The statement that gives a column a database default (the value left for the app to choose)."""
    if dialect == "sqlite":
        return "SQLite cannot add one to a column: a new table with DEFAULT ..."
    return f"ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT ..."


_REFUSING = frozenset({"RESTRICT", "NO ACTION"})


def _refused_deletion_problems(inspector: Any, mapping: SchemaMapping, entity: Entity,
                               mapped: MappedTable) -> list[tuple[str, str]]:
    """:class:`HardDelete` of a table another table's foreign key refers to with ON DELETE RESTRICT or NO
    ACTION (the default): the deletion of every entity a row there refers to is refused (the row's refusal,
    ``mapped_row_refused``), and the app's row stays live, while the entity is deleted in Clerk and clerk-sync's
    tables. Every table of the mapped table's schema and the connection's is read (SQLite enforces keys:
    clerk-sync's connections turn ``foreign_keys`` on). A mapped memberships table hard-deleted too is no
    such referrer: a user's or organization's memberships are deleted before it."""
    if not isinstance(mapped.on_delete, HardDelete):
        return []
    default = inspector.default_schema_name
    schema, bare = _split(mapped.table)
    target = schema or default
    members = mapping.tables.get(Entity.MEMBERSHIP)
    cascaded = (members is not None and entity is not Entity.MEMBERSHIP and isinstance(members.on_delete, HardDelete))
    problems: list[tuple[str, str]] = []
    for scanned in dict.fromkeys([None if target == default else target, None]):
        for (_, referrer), keys in sorted(inspector.get_multi_foreign_keys(schema=scanned).items(),
                                          key=lambda item: item[0][1]):
            where = referrer if scanned is None else f"{scanned}.{referrer}"
            if cascaded and members is not None and _split(members.table) in ((scanned, referrer), (target, referrer)):
                continue
            for key in keys:
                referred = key.get("referred_schema") or default
                ondelete = str((key.get("options") or {}).get("ondelete") or
                               _sqlite_on_delete(inspector, referrer, key) or "NO ACTION").upper()
                if key.get("referred_table") != bare or referred != target or ondelete not in _REFUSING:
                    continue
                what = ", ".join(key.get("constrained_columns") or [])
                one = entity.value[:-1].replace("_", " ")
                problems.append(("warn", f"{mapped.table} is hard-deleted (HardDelete) and {where} ({what}) refers "
                                         f"to it (foreign key {key.get('name') or 'unnamed'}, ON DELETE {ondelete}): "
                                         f"the deletion of every {one} a {where} row refers to is refused, and its "
                                         "row stays live in the app (its Clerk id set, nothing marking it deleted) "
                                         "while Clerk and clerk-sync's tables have it deleted; make the key ON "
                                         "DELETE CASCADE or SET NULL, or map the deletion with SoftDelete or "
                                         "Deactivate"))
    return problems


def _sqlite_on_delete(inspector: Any, referrer: str, key: Mapping[str, Any]) -> str | None:
    """SQLite's own word for a key's ON DELETE action: SQLAlchemy's reflection leaves it out of a key written on
    its column (``owner_id INTEGER REFERENCES users(id) ON DELETE CASCADE``), which read as NO ACTION."""
    if inspector.dialect.name != "sqlite":
        return None
    rows = inspector.bind.exec_driver_sql(f"PRAGMA foreign_key_list({_quote_ident(referrer)})").mappings().all()
    columns = list(key.get("constrained_columns") or [])
    actions = {str(r["on_delete"]) for r in rows
               if r["table"] == key.get("referred_table") and r["from"] in columns}
    return actions.pop() if len(actions) == 1 else None


def _inactive_rows_problems(conn: Connection, mapped: MappedTable, columns: Mapping[str, Any]) -> list[tuple[str, str]]:
    """:class:`Deactivate`'s flag NULL in rows already there (added without a default by an earlier ``migrate
    --mapping``; it adds it with ``DEFAULT TRUE`` now): an app filtering ``WHERE is_active`` hides them, and
    clerk-sync sets TRUE only in the rows it inserts, links or updates (``COALESCE(is_active, TRUE)``)."""
    policy = mapped.on_delete
    if not isinstance(policy, Deactivate) or policy.column not in columns:
        return []
    t = sa.table(_split(mapped.table)[1], sa.column(policy.column), schema=mapped.schema)
    n = conn.execute(sa.select(sa.func.count()).select_from(t).where(t.c[policy.column].is_(None))).scalar_one()
    if not n:
        return []
    table, column = _qualified(conn, mapped.table), conn.dialect.identifier_preparer.quote(policy.column)
    default = ("" if conn.dialect.name == "sqlite" else
               f"; and give it a default: ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT TRUE")
    fix = f"UPDATE {table} SET {column} = TRUE WHERE {column} IS NULL{default}"  # noqa: S608 (a message)
    return [("warn", f"{mapped.table}.{policy.column} is NULL in {n} row(s) (added without a default by an earlier "
                     f"`migrate --mapping`): an app filtering WHERE {policy.column} hides them, though nothing "
                     f"deactivated them; {fix}")]


def _kept_address_problems(inspector: Any, entity: Entity, mapped: MappedTable,
                           columns: Mapping[str, Any]) -> list[tuple[str, str]]:
    """:class:`SoftDelete` or :class:`Deactivate` with a UNIQUE e-mail column (mapped from ``email``, or linked
    by): a deleted user's row keeps its address, so a user who signs up again with it is refused for good."""
    if entity is not Entity.USER or not isinstance(mapped.on_delete, SoftDelete | Deactivate):
        return []
    emails = [c for c, col in mapped.resolved().items() if col.source == "email"]
    emails += [mapped.link_by_email] if mapped.link_by_email and mapped.link_by_email not in emails else []
    dialect = inspector.dialect.name
    extra = {"include_auto_indexes": True} if dialect == "sqlite" else {}
    _skip_expression_index_warning()
    invalid = _invalid_indexes(inspector, mapped.table)
    unique = {tuple(i["column_names"]) for i in inspector.get_indexes(*_at(mapped.table), **extra)
              if i.get("unique") and i["name"] not in invalid
              and (i.get("dialect_options") or {}).get(f"{dialect}_where") is None}  # a partial one: the way out
    unique |= {tuple(u["column_names"]) for u in inspector.get_unique_constraints(*_at(mapped.table))}
    policy = mapped.on_delete
    live = (f"{policy.column} IS NULL" if isinstance(policy, SoftDelete) else f"{policy.column}")
    kind = "SoftDelete" if isinstance(policy, SoftDelete) else "Deactivate"
    partial = (f"a partial unique index in place of this one (CREATE UNIQUE INDEX ... ON {mapped.table} ({{c}}) WHERE "
               f"{live}), " if dialect in ("postgresql", "sqlite") else "")
    return [("warn", f"{mapped.table}.{c} is UNIQUE and a deleted user's row keeps its address ({kind}): a user who "
                     "signs up again with it (or another given it) is refused for good; use Anonymise (the deletion "
                     f"clears the address), {partial.format(c=c)}or free the address when the app sees the deletion "
                     "(a hook that rewrites it)")
            for c in emails if c in columns and (c,) in unique]


def _database_fills(dialect: str, info: Any, pk: set[str]) -> bool:
    """Whether the database gives the column a value on an INSERT that leaves it out: a default, an identity
    or auto-increment, a generated column, or SQLite's rowid (a lone ``INTEGER PRIMARY KEY``)."""
    rowid = dialect == "sqlite" and pk == {info["name"]} and str(info["type"]).upper() == "INTEGER"
    return bool(info.get("default") is not None or info.get("autoincrement") is True or info.get("identity")
                or info.get("computed") or rowid)


def _pk_default(dialect: str, table: str, column: str, type_: Any) -> str:
    """The statement that gives a primary key a database-side value (an identity, or a random uuid)."""
    if isinstance(type_, sa.Integer):
        return {"postgresql": f"ALTER TABLE {table} ALTER COLUMN {column} ADD GENERATED BY DEFAULT AS IDENTITY",
                "sqlite": "declare it INTEGER PRIMARY KEY (a new table: SQLite cannot alter a column)"}.get(
            dialect, f"ALTER TABLE {table} MODIFY {column} {type_} NOT NULL AUTO_INCREMENT")
    return {"postgresql": f"ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT gen_random_uuid()",
            "sqlite": "DEFAULT (lower(hex(randomblob(16)))) (a new table: SQLite cannot alter a column)"}.get(
        dialect, f"ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT (uuid())")


def _may_be_empty(entity: Entity, col: Column) -> bool:
    """Whether a mapped Column's value can be None (then the table refuses it in a NOT NULL column): a
    metadata path, ``full_name``, a record field that may be None, an ``int``/``bool``/``timestamp``
    transform; not with a ``default``, nor a ``compute`` (whose values are the app's to know)."""
    if col.default is not None or col.compute is not None:
        return False
    if col.transform in ("int", "bool", "timestamp") or col.source is None or "." in col.source:
        return True
    found = _RECORD_FIELDS[entity].get(col.source)
    return found is None or "None" in str(found.type)


_RECORD_FIELDS = {entity: {f.name: f for f in dataclasses.fields(record)} for entity, record in _RECORDS.items()}
# Record fields events carry that clerk-sync's tables do not keep (``external_id``, ``email_verified``): a
# backfill, which reads those tables, does not know them (SchemaMapping._not_kept)
_CARRIED = {entity: frozenset(fields) - frozenset(record_columns(_RECORDS[entity]))
            for entity, fields in _RECORD_FIELDS.items()}

# The column types a source's values cannot go into (every row refused, or on MySQL/MariaDB a wrong value
# stored: an epoch-milliseconds int in a DATETIME is '0170-00-00 00:00:00'), by the kind of value it gives.
_TEXT_ONLY = (sa.Integer, sa.Numeric, sa.Boolean, sa.Date, sa.DateTime, sa.Time)
_NOT_FOR: dict[str, tuple[type[Any], ...]] = {"int": (sa.Date, sa.DateTime, sa.Time),
                                              "bool": (sa.Date, sa.DateTime, sa.Time),
                                              "str": _TEXT_ONLY,
                                              "datetime": (sa.Integer, sa.Numeric, sa.Boolean, sa.Time)}
_TRANSFORMED = {"str": "str", "json": "str", "int": "int", "bool": "bool", "timestamp": "datetime"}


def _source_kind(entity: Entity, col: Column) -> str | None:
    """What a mapped Column gives (``int``, ``str``, ``bool``, ``datetime``), when known: a record field's
    type, ``full_name``, a transform's result; None for a metadata path (any JSON value) or a ``compute``."""
    if col.compute is not None or col.source is None:
        return None
    if col.transform in _TRANSFORMED:
        return _TRANSFORMED[col.transform]
    if col.source == "full_name":
        return "str"
    found = _RECORD_FIELDS[entity].get(col.source)
    kind = str(found.type).replace(" | None", "") if found is not None else None
    return kind if kind in ("int", "str", "bool") else None


def _type_problems(entity: Entity, mapped: MappedTable, columns: Mapping[str, Any],
                   dialect: str = "sqlite") -> list[tuple[str, str]]:
    """A mapped column whose type cannot take what its source gives: an epoch-milliseconds field
    (``last_sign_in_at``, ``clerk_created_at``) in a date-time column, or in a 32-bit integer one (PostgreSQL's
    and MariaDB's INTEGER: today's times are 13 digits), a text in a number, boolean or date column. Sources of
    unknown type (metadata paths, ``compute``) are not checked."""
    problems: list[tuple[str, str]] = []
    for column, col in mapped.resolved().items():
        kind = _source_kind(entity, col)
        if (kind == "int" and col.transform is None and dialect != "sqlite" and column in columns
                and _epoch_ms(col.source) and _narrow_integer(columns[column]["type"])):
            problems.append(("fail", f"{mapped.table}.{column} is {columns[column]['type']} and its source "
                                     f"{col.source!r} gives epoch milliseconds (13 digits), past what it holds: "
                                     "every row with one set is refused (its role, ban or deletion never reaches "
                                     "this table); make it a BIGINT column, or convert it: "
                                     f"Column({col.source!r}, transform='timestamp') into a date-time column"))
            continue
        type_ = columns[column]["type"] if column in columns else None
        length = getattr(type_, "length", None)
        if kind == "bool" and isinstance(type_, sa.String) and isinstance(length, int) and length < len("false"):
            problems.append(("fail", f"{mapped.table}.{column} is {type_} and its source {col.source!r} gives a "
                                     "true/false, written as the text 'true' or 'false': a 'false' (5 characters) "
                                     "does not fit, and every such row is refused; widen it to VARCHAR(5) or more, "
                                     "or map it to a boolean column"))
            continue
        if kind is None or column not in columns or not isinstance(columns[column]["type"], _NOT_FOR[kind]):
            continue
        if kind == "str" and col.source == "external_id" and col.transform is None \
                and isinstance(columns[column]["type"], sa.Integer):
            # an app's own integer id, given to Clerk as the user's external_id (as link_by_external_id takes
            # it): the digits go in; it was a fail, "every row is refused", for a mapping that works (review)
            problems.append(("warn", f"{mapped.table}.{column} is {columns[column]['type']} and its source "
                                     "'external_id' is a text: a user whose external_id is not an integer's digits "
                                     "has their row refused (clerk-sync's tables still hold them); map it to a text "
                                     "column if Clerk may hold another"))
            continue
        how = f"{col.source!r}" + (f" (transform {col.transform!r})" if col.transform else "")
        what = "an int, epoch milliseconds" if kind == "int" and col.transform is None else f"a {kind}"
        if kind == "int" and col.transform is None:
            fix = (f"map it to a BIGINT column, or convert it: Column({col.source!r}, transform='timestamp') (an "
                   "aware UTC date-time, stored as UTC in a date-time column with or without a time zone) or a "
                   "compute")
        elif kind == "str":
            fix = "map it to a text column, or convert it with a transform ('int', 'bool') or a compute"
        else:
            fix = "map it to a column of that kind, or convert it with a compute"
        problems.append(("fail", f"{mapped.table}.{column} is {columns[column]['type']} and its source {how} gives "
                                 f"{what}: the column cannot take it (every row is refused; MySQL/MariaDB may "
                                 f"store a wrong value instead); {fix}"))
    return problems


def _epoch_ms(source: str | None) -> bool:
    """Whether a record field is a time in epoch milliseconds (``*_at``, ``locked_until``)."""
    return source is not None and (source.endswith("_at") or source == "locked_until")


def _narrow_integer(type_: Any) -> bool:
    """An integer column of 32 bits or fewer (INTEGER, SMALLINT, MEDIUMINT), not BIGINT."""
    return isinstance(type_, sa.Integer) and not isinstance(type_, sa.BigInteger)


def _policy_type_problems(dialect: str, mapped: MappedTable, columns: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The delete policy's column of a type that refuses what the policy writes: a deletion time
    (:class:`SoftDelete`, :class:`Anonymise`) in a number or boolean column refuses every deletion, the app's
    row staying live; :class:`Deactivate`'s true/false (1/0 in a number column) in a date or time column (on
    SQLite: kept anyway), or a text one too short for ``'false'`` (not SQLite), refuses every row. Only those: a
    ``DATE`` keeps the day, a text column the time as text (MariaDB, SQLite), ``BIT(1)`` the flag; a column of no
    declared type anything."""
    policy = _policy_column(mapped)
    if policy is None or policy[0] not in columns:
        return []
    column, type_ = policy[0], columns[policy[0]]["type"]
    kind = type(mapped.on_delete).__name__
    if isinstance(mapped.on_delete, Deactivate):
        length = getattr(type_, "length", None)  # ('true'/'false' into text: 'false' needs 5 characters)
        refused = ((isinstance(type_, sa.Date | sa.DateTime | sa.Time) and dialect != "sqlite")
                   or (isinstance(type_, sa.String) and not isinstance(type_, sa.Enum) and dialect != "sqlite"
                       and isinstance(length, int) and length < len("false")))
        if not refused:
            return []
        return [("fail", f"{mapped.table}.{column} is {type_} and on_delete={kind}({column!r}) writes true/false "
                         "there (1/0 in a number column): every row is refused; make it a boolean column, or name "
                         "another column")]
    if not isinstance(type_, sa.Integer | sa.Numeric | sa.Boolean):
        return []
    wanted = {"postgresql": "timestamptz", "sqlite": "TIMESTAMP"}.get(dialect, "DATETIME(6)")
    refused_text = ("every deletion is refused, the app's row staying live" if dialect != "sqlite" else
                    "a deletion is stored as a text the app's column type does not read as a time")
    return [("fail", f"{mapped.table}.{column} is {type_} and on_delete={kind}({column!r}) writes the deletion's "
                     f"time there: {refused_text}, while Clerk and clerk-sync's tables have it deleted; make it a "
                     f"date-time column ({wanted}, converting what the app keeps there), or name another column")]


def _lockout_problems(entity: Entity, mapped: MappedTable) -> list[tuple[str, str]]:
    """``locked`` mapped without ``locked_until``: a Clerk lockout ends by itself with no webhook (and no new
    ``updated_at``), so the mapped flag stays true until the user's next event or a reconcile that lists them
    unlocked. (Not unlocked by serve on its own: that would write clerk-sync's rows and run the hooks for a
    change Clerk never sent, from every replica; the lock's end is known, so the app can read it.)"""
    if entity is not Entity.USER:
        return []
    resolved = mapped.resolved()
    if any(col.source == "locked_until" for col in resolved.values()):
        return []
    return [("warn", f"{mapped.table}.{column} is mapped from 'locked', and a Clerk lockout ends by itself with no "
                     "webhook: the column stays true after it ends, until the user's next event or `clerk-sync "
                     "reconcile`; map its end too, \"locked_until\": Column(\"locked_until\", transform=\"timestamp\") "
                     f"(NULL: no end), and treat the user as locked while {column} AND (locked_until IS NULL OR "
                     "locked_until > now)") for column, col in resolved.items() if col.source == "locked"]


def _unbounded_problems(mapped: MappedTable, columns: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A text of any length the user writes (an ``unsafe_metadata`` path) mapped into a column of bounded
    length: a longer value is kept back (the row written without the user's columns, :meth:`Outbox.project`)."""
    problems: list[tuple[str, str]] = []
    for column, col in mapped.resolved().items():
        type_ = columns[column]["type"] if column in columns else None
        if (col.source is None or col.source.partition(".")[0] != "unsafe_metadata"
                or col.transform not in (None, "lower", "strip", "str", "json")
                or not isinstance(type_, sa.String) or isinstance(type_, sa.Enum) or not type_.length):
            continue
        problems.append(("warn", f"{mapped.table}.{column} holds {type_.length} characters and its source "
                                 f"{col.source!r} is the user's to write in Clerk, at any length: a longer value "
                                 "refuses it, and the row is written without the user's own columns (names, e-mail, "
                                 "unsafe_metadata, computes) until they change it; a TEXT column takes any"))
    return problems


#: Rows (the server's estimate) from which ``doctor`` says that linking by e-mail reads a MySQL/MariaDB table whole.
_EMAIL_SCAN_ROWS = 50_000


def _email_scan_problems(conn: Connection, mapped: MappedTable, columns: Mapping[str, Any]) -> list[tuple[str, str]]:
    """MySQL/MariaDB: linking by e-mail compares ``lower()`` of the column as bytes, which no index serves: every
    new user's lookup reads the whole table, said once it is large. (A ``_ci`` column has its own warning.)"""
    column = mapped.link_by_email
    if conn.dialect.name not in ("mysql", "mariadb") or column is None or column not in columns:
        return []
    if _mysql_collation(conn, mapped.table, column)[0].endswith("_ci"):
        return []
    schema, table = _split(mapped.table)
    rows = conn.execute(sa.text("SELECT table_rows FROM information_schema.tables WHERE table_schema = "
                                "COALESCE(:schema, DATABASE()) AND table_name = :table"),
                        {"schema": schema, "table": table}).scalar()
    if rows is None or rows < _EMAIL_SCAN_ROWS:
        return []
    return [("warn", f"{mapped.table}.{column}: linking by e-mail reads every row of {mapped.table} (about {rows:,}) "
                     "on MySQL/MariaDB, once for each new user: its exact comparison after lower() uses no index")]


def _mysql_collation(conn: Connection, table: str, column: str) -> tuple[str, str, bool]:
    """A MySQL/MariaDB column's collation, type and nullability (("", "", True) elsewhere); reflection names
    no collation a column inherits from its table."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return "", "", True
    schema, bare = _split(table)
    found = conn.execute(sa.text("SELECT collation_name, column_type, is_nullable FROM information_schema.columns "
                                 "WHERE table_schema = COALESCE(:s, DATABASE()) AND table_name = :t "
                                 "AND column_name = :c"), {"s": schema, "t": bare, "c": column}).first()
    if found is None:
        return "", "", True
    return str(found[0] or ""), str(found[1]), found[2] == "YES"


def _shared_link_values(conn: Connection, mapped: MappedTable, column: str, *, linked: bool = True,
                        text: bool = True) -> list[str]:
    """The link column's values held by several rows without a Clerk id: users with them will not be
    linked (their rows refused as :class:`LinkAmbiguous`). Counted, not shown (they are personal).
    ``linked``: whether the table has its Clerk-id column yet (before migrate it has not: every row counts).
    ``text``: whether the column is a text one (a number takes no collation, :func:`_exactly`)."""
    t = sa.table(_split(mapped.table)[1], sa.column(column), *([sa.column(mapped.clerk_id_column)] if linked else []),
                 schema=mapped.schema)
    # grouped as linking compares: the same lower(), then exactly (not by a MariaDB _ci collation, nor a
    # PostgreSQL non-deterministic one)
    email = column == mapped.link_by_email
    value = _exactly(conn, unicode_lower(conn)(t.c[column]) if email else t.c[column], collatable=email or text)
    unlinked = [t.c[mapped.clerk_id_column].is_(None)] if linked else []
    shared = (sa.select(value).where(*unlinked, t.c[column].is_not(None))
              .group_by(value).having(sa.func.count() > 1).subquery())
    n = conn.execute(sa.select(sa.func.count()).select_from(shared)).scalar_one()
    if not n:
        return []
    kind = "e-mail" if column == mapped.link_by_email else "external id"
    rows = ("several rows without a Clerk id" if linked else
            f"several rows (before `clerk-sync migrate --mapping ...` adds {mapped.clerk_id_column}, every row is "
            "unlinked)")
    return [f"{mapped.table}.{column}: {n} {kind} value(s) are shared by {rows}; the "
            "users with them will not be linked: their rows are refused (the deliveries apply to clerk-sync's tables, "
            "so replay does not take them up again); merge the rows, then run `clerk-sync migrate --mapping ... "
            "--backfill`"]


def _nondeterministic_link_problems(conn: Connection, mapped: MappedTable,
                                    columns: Sequence[str]) -> list[tuple[str, str]]:
    """PostgreSQL: a link column under a non-deterministic collation (an ICU one created ``deterministic =
    false``, ignoring case or accents): linking compares exactly (``COLLATE "C"``), which its index does not
    serve, and the app's own lookups take ``elodie@`` and ``élodie@`` for one person."""
    if conn.dialect.name != "postgresql" or not columns:
        return []
    found = conn.execute(sa.text(
        "SELECT a.attname, c.collname FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation "
        "WHERE a.attrelid = to_regclass(:t) AND a.attname = ANY(:c) AND NOT c.collisdeterministic "
        "ORDER BY a.attname"), {"t": _qualified(conn, mapped.table), "c": list(columns)}).all()
    return [("warn", f"{mapped.table}.{column} compares under the non-deterministic collation {collation} (case or "
                     "accents ignored), so the app's own lookups may take elodie@ and élodie@ (or ids ABC and abc) "
                     "for one person; clerk-sync links by the exact value (COLLATE \"C\", after the column's own "
                     "comparison): consider a deterministic collation") for column, collation in found]


def _primary_key(inspector: Any, table: str) -> set[str]:
    return set(inspector.get_pk_constraint(*_at(table)).get("constrained_columns") or [])


# The Clerk-id column migrate adds: on MySQL/MariaDB with a binary collation, not the table's default (often
# case-insensitive: ``user_2aBc`` and ``user_2abc`` would be one row), as clerk-sync's own tables have.
_CLERK_ID_TYPE = sa.String(64).with_variant(mysql.VARCHAR(64, charset="utf8mb4", collation="utf8mb4_bin"),
                                            "mysql", "mariadb")


def migrate_schema(conn: Connection, mapping: SchemaMapping, *, unique_indexes: bool = True) -> list[str]:
    """Add what the mapping needs (the Clerk-id column with a unique index, the delete-policy column: a
    :class:`Deactivate` flag with ``DEFAULT TRUE``, so the rows already there stay active), through Alembic
    operations; returns what it did. Idempotent; never drops or alters a column. A mapped table, or a mapped or
    link column, that is not there: :class:`~clerk_sync.errors.ConfigError` naming each, before anything is changed.

    The unique index is built in ``conn``'s transaction: on PostgreSQL that holds a SHARE lock on the app's
    table, blocking its writes, for the whole build; ``unique_indexes=False`` leaves the indexes out, for
    :func:`clerk_sync.cli.hooks.migrate_mapping`, which builds them CONCURRENTLY there (every face's
    ``migrate`` goes through it). MariaDB's InnoDB builds a unique index online (writes go on meanwhile),
    and SQLite has one writer anyway: both build it here."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    done: list[str] = []
    with without_statement_bound(conn):
        ops = Operations(MigrationContext.configure(conn))
        inspector = sa.inspect(conn)
        missing: list[str] = []
        for mapped in mapping.tables.values():  # every table checked before any is changed
            schema, bare = _not_clerk_syncs(conn, mapped.table)
            if not inspector.has_table(bare, schema):
                raise ConfigError(_missing_table_message(mapped))
            # (what migrate adds, the Clerk-id and delete columns, aside: every row would be refused for the rest)
            added = {mapped.clerk_id_column, *([policy[0]] if (policy := _policy_column(mapped)) else [])}
            missing += _missing_columns(mapped, {c["name"] for c in inspector.get_columns(bare, schema)} | added)
        if missing:
            raise ConfigError(f"the mapping names columns the app's tables lack ({'; '.join(missing)}); nothing was "
                              "migrated: every row would be refused for them")
        for mapped in mapping.tables.values():
            name = mapped.table
            schema, bare = _not_clerk_syncs(conn, name)
            columns = {c["name"] for c in inspector.get_columns(bare, schema)}
            policy = _policy_column(mapped)
            wanted: list[tuple[str, sa.types.TypeEngine[Any]]] = [(mapped.clerk_id_column, _CLERK_ID_TYPE)]
            for column, type_ in [*wanted, *([policy] if policy else [])]:
                if column not in columns:
                    # Deactivate's flag: TRUE in the rows already there, active as they were (NULL would hide
                    # every legacy row from an app that filters WHERE is_active)
                    active = isinstance(mapped.on_delete, Deactivate) and policy is not None and column == policy[0]
                    ops.add_column(bare, sa.Column(column, type_, nullable=True,
                                                   server_default=sa.true() if active else None), schema=schema)
                    done.append(f"added {name}.{column}")
            if unique_indexes and (mapped.clerk_id_column,) not in _unique_sets(inspector, name):
                index = _index_name(mapped, conn.dialect.name)
                if index in _invalid_indexes(inspector, name):  # a CONCURRENTLY build that failed: not an index
                    ops.drop_index(index, bare, schema=schema)
                    done.append(f"dropped invalid index {index} (a build that failed or was interrupted)")
                ops.create_index(index, bare, [mapped.clerk_id_column], unique=True, schema=schema)
                done.append(f"created unique index {index}")
    return done


def _missing_table_message(mapped: MappedTable) -> str:
    """A mapped table that is not there: the app's own migrations create it, not clerk-sync's (not a
    database outage to wait out)."""
    where = f" (schema or database {mapped.schema!r} as this connection sees it)" if mapped.schema else ""
    return (f"the mapped table {mapped.table!r} does not exist{where}: create it with your app's own migrations "
            "first (clerk-sync writes your existing tables, adding only its Clerk-id and delete columns), then run "
            "migrate again (if your app's migrations did create it, clerk-sync's database URL reaches another "
            "database than your app's)")


def _index_name(mapped: MappedTable, dialect: str = "sqlite") -> str:
    """The Clerk-id column's unique index (in the table's own schema: named without it), cut to what the
    database takes: PostgreSQL's 63 bytes (as it cuts a longer one itself; SQLAlchemy refused to send one),
    MySQL/MariaDB's 64 characters (it refused a longer one: ``migrate`` failed for a long table and column
    name, after adding the column, and again on every run) (review)."""
    name = f"uq_{_split(mapped.table)[1]}_{mapped.clerk_id_column}"
    if dialect == "postgresql":
        return _pg_name(name)
    return name[:64] if dialect in ("mysql", "mariadb") else name


def _deferrable_constraints(inspector: Any, name: str) -> set[str]:
    """PostgreSQL: table ``name``'s DEFERRABLE unique and exclusion constraints (``pg_index.indimmediate``
    false), which ON CONFLICT refuses as arbiters; reflection does not tell them."""
    if inspector.dialect.name != "postgresql":
        return set()
    return _pg_table_state(inspector.bind, name)[2]


def _invalid_indexes(inspector: Any, name: str) -> set[str]:
    """PostgreSQL: table ``name``'s INVALID indexes (``pg_index.indisvalid`` false): what a CREATE INDEX
    CONCURRENTLY that failed or was interrupted leaves, ignored by queries and ON CONFLICT."""
    if inspector.dialect.name != "postgresql":
        return set()
    return _pg_table_state(inspector.bind, name)[1]  # (every caller's inspector is sa.inspect(conn)'s)


# Any fixed 64-bit number ("clerkmap"): replicas migrating together build the mapped tables' indexes in turn.
_INDEX_LOCK = 0x636C65726B6D6170


def build_unique_indexes_concurrently(engine: sa.Engine, mapping: SchemaMapping, *,
                                      wait_s: float = 600.0) -> list[str]:
    """PostgreSQL: the mapped tables' missing unique indexes on their Clerk-id column, built with ``CREATE
    UNIQUE INDEX CONCURRENTLY``, so the app's table takes writes all along (a plain build's SHARE lock
    blocks every INSERT, UPDATE and DELETE until it ends). It cannot run in a transaction: on a connection
    of its own in autocommit, discarded after, whose statement bound is lifted (the build takes as long as
    it takes) and lock bound kept (the build waits for the transactions open on the table, at its start
    and its end). An INVALID index of an earlier build is dropped and built again; a build that fails drops
    what it left and raises (:class:`StoreDataError` for duplicate Clerk ids, else :class:`StoreError`).

    Call it with no transaction of yours open on the mapped tables (the build would wait for it: for ever on
    an engine without a lock bound). Replicas migrating together build in turn; one waits at most ``wait_s``
    for the other, then raises naming the session that holds the turn."""
    done: list[str] = []
    with engine.connect() as conn:
        if conn.connection.info.get("clerk_sync_transaction_pooler"):  # (store.TRANSACTION_POOLER_INFO)
            _refuse_through_pooler(conn, mapping)
            return done
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.detach()  # its session settings end with it: never back in the pool
        conn.exec_driver_sql("SET statement_timeout = 0")
        lock = sa.select(sa.func.pg_try_advisory_lock(_INDEX_LOCK))
        if not conn.execute(lock).scalar_one():
            log.warning("mapping.index_build_waits", reason="another migrate is building the mapped tables' indexes",
                        wait_s=wait_s)
            until = time.monotonic() + wait_s
            while not conn.execute(lock).scalar_one():  # polled: a session waiting in pg_advisory_lock holds a
                if time.monotonic() >= until:  # snapshot, which the other one's CONCURRENTLY build would wait for
                    raise StoreError(f"migrate waited {wait_s:g} s for another session building the mapped tables' "
                                     f"indexes (pid {_index_lock_holder(conn)}): let it finish, or end that session "
                                     "(SELECT pg_terminate_backend(pid)) if it is stuck, then run migrate again")
                time.sleep(0.5)
        for mapped in mapping.tables.values():
            done += _build_unique_index(conn, mapped)
    return done


def _refuse_through_pooler(conn: Connection, mapping: SchemaMapping) -> None:
    """Through a pooler in transaction mode the build cannot run: its session lock (the replicas' turn) and
    its ``SET`` would stay on a pooled server connection and its statements run on others (a lock left held
    there stalled every later migrate), and a transaction-scoped turn holds a snapshot the build waits for."""
    inspector = sa.inspect(conn)
    missing = [m.table for m in mapping.tables.values() if (m.clerk_id_column,) not in _unique_sets(inspector, m.table)]
    if missing:
        raise ConfigError(f"the unique index on the Clerk-id column of {', '.join(missing)} is built CONCURRENTLY, "
                          "which needs one database session: run `clerk-sync migrate --mapping` once with "
                          "DATABASE_URL pointing at PostgreSQL itself (not PgBouncer in transaction mode) and "
                          "without CLERK_SYNC_DB_TRANSACTION_POOLER")


def _index_lock_holder(conn: Connection) -> str:
    """The pid holding :data:`_INDEX_LOCK` (an advisory lock's key is split into classid and objid)."""
    holder = conn.execute(sa.text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                                  "AND classid = :hi AND objid = :lo"),
                          {"hi": _INDEX_LOCK >> 32, "lo": _INDEX_LOCK & 0xFFFFFFFF}).scalar()
    return "unknown" if holder is None else str(holder)


def _named_on_table(conn: Connection, table: str, index: str) -> tuple[bool, bool | None]:
    """Whether a relation named ``index`` exists in ``table``'s schema, and, if it is an index on ``table``,
    whether it is valid (None: something else holds the name). PostgreSQL cuts names to 63 bytes: so does
    this lookup."""
    row = conn.execute(sa.text(
        "SELECT c.oid, i.indisvalid, i.indrelid = to_regclass(:t) AS ours FROM pg_class c "
        "LEFT JOIN pg_index i ON i.indexrelid = c.oid "
        "WHERE c.relname = :n AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = to_regclass(:t))"),
        {"t": _qualified(conn, table), "n": _pg_name(index)}).first()
    if row is None:
        return False, None
    return True, (bool(row.indisvalid) if row.ours else None)


def _pg_name(index: str) -> str:
    """``index`` as PostgreSQL stores it: cut to 63 bytes (NAMEDATALEN - 1), on a character boundary."""
    return index.encode()[:63].decode(errors="ignore")


def _build_unique_index(conn: Connection, mapped: MappedTable) -> list[str]:
    inspector = sa.inspect(conn)
    name, column, index = mapped.table, mapped.clerk_id_column, _index_name(mapped, "postgresql")
    if (column,) in _unique_sets(inspector, name):
        return []
    done: list[str] = []
    taken, valid = _named_on_table(conn, name, index)
    if taken and valid is not False:  # another object's name (or a valid index not unique on the column alone)
        raise StoreError(f"{name}.{column}: building its unique index {index} (CONCURRENTLY) failed: something else "
                         f"is named {index} already (not a unique index on {column} alone): rename or drop it, then "
                         "run migrate again")
    if taken:  # an INVALID index on this table: a build that failed or was interrupted
        if not _drop_concurrently(conn, name, index):
            raise StoreError(f"{name}.{column}: dropping the INVALID index {index} (a build that failed or was "
                             "interrupted) failed: see the log; run migrate again when the transactions open on "
                             f"the table have ended, or drop it yourself: DROP INDEX CONCURRENTLY {index}")
        done.append(f"dropped invalid index {index} (a build that failed or was interrupted)")
    quote = conn.dialect.identifier_preparer.quote
    try:
        conn.exec_driver_sql(f"CREATE UNIQUE INDEX CONCURRENTLY {quote(index)} ON {_qualified(conn, name)} "
                             f"({quote(column)})")
    except sa.exc.DBAPIError as exc:
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        # Only an INVALID index on this table under our name is what the failed build left: never another's.
        left = ("" if _named_on_table(conn, name, index) != (True, False) else
                "the INVALID index it left was dropped; " if _drop_concurrently(conn, name, index) else
                "the INVALID index it left is still there (the next migrate drops it and builds again); ")
        raise _build_failed(conn, mapped, state, exc, left) from None
    return [*done, f"created unique index {index}"]


def _drop_concurrently(conn: Connection, table: str, index: str) -> bool:
    """Drop what a failed build left (in ``table``'s schema); False when that failed too (a lost connection,
    the lock bound)."""
    schema = conn.execute(sa.text("SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = to_regclass(:t)"),
                          {"t": _qualified(conn, table)}).scalar()
    quote = conn.dialect.identifier_preparer.quote
    where = f"{schema}.{quote(index)}" if schema else quote(index)  # (regnamespace::text comes quoted)
    try:
        conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {where}")
    except sa.exc.DBAPIError as exc:
        log.warning("mapping.invalid_index_kept", index=index, error=database_message(exc.orig or exc))
        return False
    return True


def _build_failed(conn: Connection, mapped: MappedTable, state: str | None, exc: sa.exc.DBAPIError,
                  left: str) -> StoreError:
    """What failed, why and what to do, for a CONCURRENTLY build of the Clerk-id column's unique index."""
    name, column, index = mapped.table, mapped.clerk_id_column, _index_name(mapped, "postgresql")
    failed = f"{name}.{column}: building its unique index {index} (CONCURRENTLY) failed"
    if state == "23505":
        t = sa.table(_split(name)[1], sa.column(column), schema=mapped.schema)
        shared = sa.select(t.c[column]).where(t.c[column].is_not(None)).group_by(t.c[column]).having(
            sa.func.count() > 1).subquery()
        n = conn.execute(sa.select(sa.func.count()).select_from(shared)).scalar_one()
        q = conn.dialect.identifier_preparer.quote
        find = (f"SELECT {q(column)}, count(*) FROM {_qualified(conn, name)} WHERE {q(column)} IS NOT NULL "  # noqa: S608 (a message)
                f"GROUP BY {q(column)} HAVING count(*) > 1")
        return StoreDataError(f"{failed}: {n} Clerk id(s) are held by several rows; {left}find them with {find}, "
                              "keep one row per Clerk id (merge the rows, or set the column NULL in the others), "
                              "then run migrate again")
    if state == "55P03":
        return StoreError(f"{failed}: it waited longer than lock_timeout for transactions open on the database (a "
                          f"CONCURRENTLY build waits for those older than it, at its start and its end); {left}run "
                          "migrate again when they have ended, or raise CLERK_SYNC_DB_LOCK_TIMEOUT_S for it")
    if state == "42P07":
        return StoreError(f"{failed}: something else is named {index} already (not a unique index on {column} "
                          "alone): rename or drop it, then run migrate again")
    return StoreError(f"{failed}: {store_error(exc)}; {left}fix that, then run migrate again")


@contextmanager
def without_statement_bound(conn: Connection) -> Iterator[None]:
    """The service's statement bound (``DatabaseTimeouts.statement_s``, 15 s) lifted for work that takes as
    long as it takes (migrate's unique index on a populated app table, an erasure's search of every stored
    payload), then put back. The lock bound stays: DDL queued behind live traffic would block every query on
    its table. PostgreSQL: ``SET LOCAL`` (this transaction only); MySQL/MariaDB: a session variable
    (``max_statement_time``, ``max_execution_time``), set back after, and a connection where that failed is
    never handed out again unbounded; SQLite has none."""
    if conn.dialect.name == "postgresql":
        before = conn.exec_driver_sql("SELECT current_setting('statement_timeout')").scalar()
        conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
        yield  # (a failure aborted the transaction, and its rollback ends SET LOCAL)
        conn.execute(sa.select(sa.func.set_config("statement_timeout", before, True)))
        return
    if conn.dialect.name not in ("mysql", "mariadb"):
        yield
        return
    name = "max_statement_time" if getattr(conn.dialect, "is_mariadb", False) else "max_execution_time"
    conn.exec_driver_sql(f"SET @clerk_sync_statement_time = @@SESSION.{name}, SESSION {name} = 0")
    restore = f"SET SESSION {name} = @clerk_sync_statement_time"
    try:
        yield
    except BaseException:
        if not conn.invalidated:  # best effort: a failing restore must not hide why the work failed
            with suppress(sa.exc.SQLAlchemyError):
                conn.exec_driver_sql(restore)
        raise
    try:
        conn.exec_driver_sql(restore)
    except sa.exc.SQLAlchemyError:
        conn.invalidate()
        raise
