"""The console's reads. Every list is keyset-paginated (``id < before``, newest first) over an index,
so page 1 and page 2,000 cost the same; no list counts its rows.

Filters on Clerk ids inside a delivery's payload use the expression indexes of migration
``0008_console``: the expressions below compile to exactly the indexed text on each dialect (on PostgreSQL
and MySQL/MariaDB the id cut to 191 characters, as indexed there).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from clerk_sync._limits import BIGINT_MAX
from clerk_sync._time import aware  # a name of this module too: _console and _pages read it here
from clerk_sync.integrations.console._access import OPERATOR
from clerk_sync.tables import (
    audit_log,
    organization_memberships,
    organizations,
    pending_role_changes,
    reconcile_runs,
    users,
    webhook_events,
)

__all__ = [
    "MAX_ID", "MEMBERS_SHOWN", "PAGE_SIZE", "AuditFilter", "DeliveryFilter", "Memberships", "Overview", "Page",
    "aware", "count_upto", "delivery_ids",
    "delivery_types", "get_delivery", "get_organization", "get_user", "list_audit", "list_deliveries", "memberships",
    "overview", "pending_changes", "search_organizations", "search_users", "touching",
]

PAGE_SIZE = 50
MAX_ID = BIGINT_MAX  # a larger id names no row, and SQLite's driver cannot even send it
_TOP = "\U0010ffff"  # above every character: ``x >= q AND x < q + _TOP`` is a prefix match on an index


class _PayloadText(FunctionElement[str]):
    """``payload`` -> a text field at ``path``, written as migration 0008_console indexes it; on
    MySQL/MariaDB the indexed virtual ``column`` of migration 0012 that computes it."""

    type = sa.String()
    inherit_cache = True
    path: ClassVar[tuple[str, ...]] = ()
    column: ClassVar[str] = ""


class _DataId(_PayloadText):
    inherit_cache = True
    path = ("data", "id")
    column = "data_id"


class _DataUserId(_PayloadText):
    inherit_cache = True
    path = ("data", "public_user_data", "user_id")
    column = "data_user_id"


class _DataOwnerId(_PayloadText):
    """A session's, an e-mail's or a text's user (``session.*``, ``email.created``, ``sms.created``; 0020)."""

    inherit_cache = True
    path = ("data", "user_id")
    column = "data_owner_id"


class _DataOrgId(_PayloadText):
    inherit_cache = True
    path = ("data", "organization", "id")
    column = "data_org_id"


class _Lower(FunctionElement[str]):
    """``lower(column)`` as migrations 0008_console and 0020 index it; on MySQL/MariaDB the indexed virtual
    ``<column>_lower`` of migrations 0012 and 0020."""

    type = sa.String()
    inherit_cache = True


@compiles(_Lower)
def _lower(element: _Lower, compiler: SQLCompiler, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


_LOWER_COLUMNS = {("users", "first_name"): "first_name_lower", ("users", "last_name"): "last_name_lower",
                  ("users", "email"): "email_lower", ("organizations", "name"): "name_lower"}


@compiles(_Lower, "mysql")
@compiles(_Lower, "mariadb")
def _mysql_lower(element: _Lower, compiler: SQLCompiler, **kw: Any) -> str:
    (column,) = element.clauses
    return _LOWER_COLUMNS[(column.table.name, column.name)]  # computed and indexed (migration 0012)


class _DetailsAs(FunctionElement[str]):
    """An audit row's ``details.as`` (who acted through the console: ``operator`` for the operator token)."""

    type = sa.String()
    inherit_cache = True


@compiles(_DetailsAs)
def _details_as(element: _DetailsAs, compiler: SQLCompiler, **kw: Any) -> str:
    # (json_valid first: an older release's row may hold details no JSON reader takes, NaN say, on which
    # json_extract raises and fails the whole page; migration 0019 keeps such rows)
    return "CASE WHEN json_valid(details) THEN json_extract(details, '$.as') END"


@compiles(_DetailsAs, "postgresql")
def _pg_details_as(element: _DetailsAs, compiler: SQLCompiler, **kw: Any) -> str:
    return "(details ->> 'as')"


@compiles(_DetailsAs, "mysql")
@compiles(_DetailsAs, "mariadb")
def _mysql_details_as(element: _DetailsAs, compiler: SQLCompiler, **kw: Any) -> str:
    return "JSON_VALUE(details, '$.as')" if getattr(compiler.dialect, "is_mariadb", False) else \
        "CASE WHEN JSON_VALID(details) THEN JSON_UNQUOTE(JSON_EXTRACT(details, '$.as')) END"


@compiles(_PayloadText, "sqlite")
def _sqlite_path(element: _PayloadText, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_extract(payload, '$.{'.'.join(element.path)}')"


@compiles(_PayloadText, "mysql")
@compiles(_PayloadText, "mariadb")
def _mysql_path(element: _PayloadText, compiler: SQLCompiler, **kw: Any) -> str:
    return element.column  # the text at '$.<path>', cut to 191 characters, computed and indexed


@compiles(_PayloadText, "postgresql")
def _pg_path(element: _PayloadText, compiler: SQLCompiler, **kw: Any) -> str:
    # cut to 191 characters, as indexed (a btree entry holds 2,704 bytes: migrations 0008_console, 0015)
    *parents, leaf = element.path
    return "left((payload" + "".join(f" -> '{p}'" for p in parents) + f" ->> '{leaf}'), 191)"


@dataclass(frozen=True, slots=True)
class Page:
    """One page of rows and the cursor of the next one (None on the last page)."""

    rows: list[RowMapping]
    next_before: int | None


def _page(conn: Connection, query: sa.Select[Any], id_column: sa.ColumnElement[int], before: int | None,
          limit: int) -> Page:
    if before is not None:
        query = query.where(id_column < before)
    rows = list(conn.execute(query.order_by(id_column.desc()).limit(limit + 1)).mappings())
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, int(rows[-1]["id"]) if more else None)


# -- deliveries ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    """The filters of the deliveries page (all optional, combined with AND)."""

    status: str | None = None
    type: str | None = None
    clerk_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        e = webhook_events.c
        found: list[sa.ColumnElement[bool]] = []
        if self.status:
            found.append(e.status == self.status)
        if self.type:
            found.append(e.type == self.type)
        if self.since:
            found.append(e.received_at >= self.since)
        if self.until:
            found.append(e.received_at < self.until)
        if self.clerk_id:
            found.append(e.id.in_(touching(self.clerk_id)))
        return found

    def query(self) -> dict[str, str]:
        """The filter as query-string parameters (for links to the next page, CSV, and forms)."""
        values = {"status": self.status, "type": self.type, "clerk_id": self.clerk_id,
                  "since": self.since.isoformat() if self.since else None,
                  "until": self.until.isoformat() if self.until else None}
        return {k: v for k, v in values.items() if v}

    def urlencode(self, **extra: object) -> str:
        return urlencode({**self.query(), **{k: str(v) for k, v in extra.items() if v is not None}})


def touching(clerk_id: str) -> sa.CompoundSelect[Any]:
    """Ids of deliveries about ``clerk_id``: the object itself, a membership of that user/org, or a session
    (e-mail, text) of that user."""
    e = webhook_events
    return sa.union(*(sa.select(e.c.id).where(expr == clerk_id)
                      for expr in (_DataId(), _DataUserId(), _DataOrgId(), _DataOwnerId())))


def list_deliveries(conn: Connection, where: DeliveryFilter, before: int | None, limit: int = PAGE_SIZE) -> Page:
    e = webhook_events.c
    query = sa.select(e.id, e.svix_id, e.type, e.status, e.attempts, e.received_at, e.applied_at,
                      sa.func.substr(e.last_error, 1, 160).label("last_error"), _DataId().label("subject"))
    return _page(conn, query.where(*where.conditions()), e.id, before, limit)


def delivery_ids(conn: Connection, where: DeliveryFilter, limit: int,
                 through: int | None = None) -> list[tuple[str, str | None]]:
    """The svix ids matching ``where`` with their subject (``data.id``, the audit row's target), oldest
    first (replay order), at most ``limit``, and none past the row id ``through`` when given."""
    e = webhook_events.c
    query = sa.select(e.svix_id, _DataId()).where(*where.conditions()).order_by(e.id).limit(limit)
    if through is not None:
        query = query.where(e.id <= through)
    return [(svix_id, subject if isinstance(subject, str) else None) for svix_id, subject in conn.execute(query)]


def count_upto(conn: Connection, where: DeliveryFilter, limit: int) -> tuple[int, int | None, bool]:
    """How many deliveries match ``where``, counting at most ``limit`` (oldest first, as replayed): that
    count, the row id of the last one counted (None when none), and whether more match."""
    e = webhook_events.c
    ids = list(conn.execute(sa.select(e.id).where(*where.conditions()).order_by(e.id).limit(limit + 1)).scalars())
    counted = ids[:limit]
    return len(counted), (int(counted[-1]) if counted else None), len(ids) > limit


def get_delivery(conn: Connection, delivery_id: int) -> RowMapping | None:
    return conn.execute(sa.select(webhook_events).where(webhook_events.c.id == delivery_id)).mappings().first()


def delivery_types(conn: Connection) -> list[str]:
    """Event types for the filter's drop-down. A loose index scan (one ``type > previous`` lookup per
    distinct value): a plain DISTINCT reads the whole index, 70 ms at 100,000 rows on PostgreSQL."""
    return [t for t in conn.execute(_DISTINCT_TYPES).scalars() if t is not None]


_DISTINCT_TYPES = sa.text(
    "WITH RECURSIVE t(type) AS ("
    " SELECT MIN(type) FROM webhook_events"
    " UNION ALL"
    " SELECT (SELECT MIN(e.type) FROM webhook_events e WHERE e.type > t.type) FROM t WHERE t.type IS NOT NULL"
    ") SELECT type FROM t"
)


# -- overview --------------------------------------------------------------------------------------
@dataclass
class Overview:
    """The figures of the overview page."""

    last_received_at: datetime | None = None
    per_minute: float = 0.0
    lag_ms_median: float | None = None
    lag_ms_p95: float | None = None
    lag_sample: int = 0
    failed: int = 0
    last_run: RowMapping | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def overview(conn: Connection, now: datetime, *, window: timedelta = timedelta(minutes=5),
             lag_sample: int = 200) -> Overview:
    e = webhook_events.c
    result = Overview()
    result.last_received_at = aware(conn.execute(sa.select(e.received_at).order_by(e.id.desc()).limit(1)).scalar())
    recent = conn.execute(sa.select(sa.func.count()).where(e.received_at >= now - window)).scalar_one()
    result.per_minute = recent / (window.total_seconds() / 60)
    # Lag of the latest applied deliveries: Clerk's event time (ms) -> our applied_at.
    rows = conn.execute(sa.select(e.event_timestamp, e.applied_at)
                        .where(e.applied_at.is_not(None), e.event_timestamp.is_not(None))
                        .order_by(e.id.desc()).limit(lag_sample)).all()
    lags = sorted(max(0.0, aware(applied).timestamp() * 1000 - ts) for ts, applied in rows)
    if lags:
        result.lag_sample = len(lags)
        result.lag_ms_median = statistics.median(lags)
        result.lag_ms_p95 = lags[min(len(lags) - 1, int(len(lags) * 0.95))]
    result.failed = conn.execute(sa.select(sa.func.count()).where(e.status == "failed")).scalar_one()
    result.last_run = conn.execute(sa.select(reconcile_runs).order_by(reconcile_runs.c.id.desc()).limit(1)
                                   ).mappings().first()
    return result


# -- users and organizations -----------------------------------------------------------------------
def _prefix(column: sa.ColumnElement[str], q: str) -> sa.ColumnElement[bool]:
    return sa.and_(column >= q, column < q + _TOP)


def _lower_prefix(column: sa.ColumnElement[str], typed: str) -> sa.ColumnElement[bool]:
    """``column`` lower-cased starts with ``typed`` lower-cased, both by the database's ``lower()``: Python's
    disagrees with it (``İ`` gives ``i̇``, which PostgreSQL's and MariaDB's do not; MariaDB leaves 4-byte letters
    such as ``𐐀`` as they are; SQLite folds ASCII only), and such names were never found. ``lower(:typed)`` is
    a constant: the index on ``lower(column)`` still serves the range."""
    low = sa.func.lower(sa.literal(typed, sa.String()), type_=sa.String())
    return sa.and_(_Lower(column) >= low, _Lower(column) < low.concat(_TOP))


def search_users(conn: Connection, q: str, before: int | None, limit: int = PAGE_SIZE) -> Page:
    """Users by Clerk id (``user_...``), email or name prefix (case-insensitive); newest first."""
    u = users.c
    query = sa.select(u.id, u.clerk_id, u.email, u.first_name, u.last_name, u.role, u.banned, u.deleted_at,
                      u.locked, u.deprovisioned, u.updated_at)
    q = q.strip()
    if q:
        query = query.where(u.id.in_(_user_matches(q)))
    return _page(conn, query, u.id, before, limit)


def _user_matches(q: str) -> sa.CompoundSelect[Any] | sa.Select[Any]:
    u = users.c
    if q.startswith("user_"):
        return sa.select(u.id).where(_prefix(u.clerk_id, q))
    # An address in any case (Clerk keeps it as it was entered: John.Smith@Example.com), by the database's
    # lower(); and as Python lower-cases the query, which SQLite's lower() (ASCII only) does not match for
    # jürgen@ typed JÜRGEN@
    addresses = [sa.select(u.id).where(_lower_prefix(u.email, q)), sa.select(u.id).where(_prefix(u.email, q.lower()))]
    if "@" in q:
        return sa.union(*addresses)
    first, _, last = q.partition(" ")
    if last:
        return sa.select(u.id).where(_lower_prefix(u.first_name, first), _lower_prefix(u.last_name, last.strip()))
    return sa.union(sa.select(u.id).where(_lower_prefix(u.first_name, q)),
                    sa.select(u.id).where(_lower_prefix(u.last_name, q)), *addresses)


def search_organizations(conn: Connection, q: str, limit: int = 20) -> list[RowMapping]:
    o = organizations.c
    query = sa.select(o.id, o.clerk_id, o.name, o.slug, o.deleted_at)
    q = q.strip()
    if q.startswith("org_"):
        query = query.where(_prefix(o.clerk_id, q))
    elif q:
        query = query.where(_lower_prefix(o.name, q))
    return list(conn.execute(query.order_by(o.id.desc()).limit(limit)).mappings())


def get_user(conn: Connection, clerk_id: str) -> RowMapping | None:
    return conn.execute(sa.select(users).where(users.c.clerk_id == clerk_id)).mappings().first()


def get_organization(conn: Connection, clerk_id: str) -> RowMapping | None:
    return conn.execute(sa.select(organizations).where(organizations.c.clerk_id == clerk_id)).mappings().first()


MEMBERS_SHOWN = 200


@dataclass(frozen=True, slots=True)
class Memberships:
    """The first :data:`MEMBERS_SHOWN` live memberships (admins first) and how many there are in all: a large
    organization's page says how many it leaves out rather than stopping silently."""

    rows: list[RowMapping]
    total: int


def memberships(conn: Connection, *, user: str | None = None, organization: str | None = None,
                limit: int = MEMBERS_SHOWN) -> Memberships:
    """Live memberships of a user or of an organization, with the other side's name; admins first."""
    m, o, u = organization_memberships.c, organizations.c, users.c
    where: list[sa.ColumnElement[bool]] = [m.deleted_at.is_(None)]
    if user is not None:
        where.append(m.user_clerk_id == user)
    if organization is not None:
        where.append(m.organization_clerk_id == organization)
    query = (sa.select(m.clerk_id, m.role, m.organization_clerk_id, m.user_clerk_id, o.name.label("org_name"),
                       u.email.label("user_email"))
             .outerjoin_from(organization_memberships, organizations, o.clerk_id == m.organization_clerk_id)
             .outerjoin(users, u.clerk_id == m.user_clerk_id)
             .where(*where))
    admins_first = sa.case((m.role.in_(("org:admin", "admin")), 0), else_=1)
    rows = list(conn.execute(query.order_by(admins_first, m.id).limit(limit)).mappings())
    total = len(rows) if len(rows) < limit else conn.execute(
        sa.select(sa.func.count()).select_from(organization_memberships).where(*where)).scalar_one()
    return Memberships(rows, total)


def pending_changes(conn: Connection, user: str) -> list[RowMapping]:
    p = pending_role_changes.c
    query = sa.select(pending_role_changes).where(p.user_clerk_id == user, p.done_at.is_(None)).order_by(p.id)
    return list(conn.execute(query).mappings())


# -- audit log -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuditFilter:
    """The filters of the audit page (actor and target are Clerk ids; action may end with ``*``)."""

    actor: str | None = None
    action: str | None = None
    target: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        a = audit_log.c
        found: list[sa.ColumnElement[bool]] = []
        if self.actor == OPERATOR:  # the operator token has no Clerk id: its rows say so in their details
            found += [a.actor_clerk_id.is_(None), _DetailsAs() == OPERATOR]
        elif self.actor:
            found.append(a.actor_clerk_id == self.actor)
        if self.action:
            found.append(_prefix(a.action, self.action[:-1]) if self.action.endswith("*")
                         else a.action == self.action)
        if self.target:
            found.append(a.target_clerk_id == self.target)
        if self.since:
            found.append(a.created_at >= self.since)
        if self.until:
            found.append(a.created_at < self.until)
        return found

    def query(self) -> dict[str, str]:
        """The filter as query-string parameters (for links to the next page, CSV, and the form)."""
        values = {"actor": self.actor, "action": self.action, "target": self.target,
                  "since": self.since.isoformat() if self.since else None,
                  "until": self.until.isoformat() if self.until else None}
        return {k: v for k, v in values.items() if v}

    def urlencode(self, **extra: object) -> str:
        return urlencode({**self.query(), **{k: str(v) for k, v in extra.items() if v is not None}})


def list_audit(conn: Connection, where: AuditFilter, before: int | None, limit: int = PAGE_SIZE) -> Page:
    return _page(conn, sa.select(audit_log).where(*where.conditions()), audit_log.c.id, before, limit)
