"""The hooks outbox in the database: jobs written in the apply's transaction, claimed by dispatchers.

:class:`Outbox` is the write side, used by :class:`~clerk_sync.store.Writer` when the store has
hooks: it reads the row before the write, and after an applied write inserts one ``hook_jobs`` row
per hook that wants the change (so each hook retries on its own). PostgreSQL's batched path does the
same inside the delivery's statement (:func:`jobs_cte_sql`). The claim side (:func:`claim`,
:func:`finish`, :func:`fail`) serves :class:`~clerk_sync.hooks.Dispatcher`:

- a job is claimable when it is ``pending`` and due, or ``running`` with an expired lease (its worker
  died), and no earlier job with the same ``entity_key`` (hook + entity) is unfinished: order per entity;
- a dispatcher claims only the jobs of the hooks it has (``claim(hooks=)``): during a rolling deploy a
  worker with an older hooks list leaves a new hook's jobs to the workers that have it (it marked them
  dead, "no hook named ..."); the order per entity is unchanged, since an ``entity_key`` is one hook's;
- on PostgreSQL the claim is ``SELECT .. FOR UPDATE SKIP LOCKED`` then a lease with a fresh token, so
  replicas never run a job concurrently (within the lease); on SQLite the writer lock serialises claims;
- a finished job is deleted; one that failed ``max_attempts`` times stays as ``dead`` for the CLI, until
  retention redacts it (:func:`redact_jobs`) and then deletes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from clerk_sync._db_errors import driver_cursor, passing_cause, privilege_refusal, store_error
from clerk_sync._mentions import Mentions
from clerk_sync._time import aware
from clerk_sync.changes import BOOKKEEPING, Change, Event, Hook, change_type, job_payload
from clerk_sync.engine import Entity, Tombstone, Upsert
from clerk_sync.errors import ParentNotThere, StoreDataError, StoreError, database_message
from clerk_sync.events import MembershipRecord, OrganizationRecord, UserRecord, record_columns
from clerk_sync.mapping import (
    AppTableRolledBack,
    LinkAmbiguous,
    LinkUnverified,
    SchemaMapping,
    ValueTooLong,
    check_at_once,
    direct_sqlite,
    folded_like,
    processors,
    sqlite_execute,
    sqlite_time,
    unicode_lower,
)
from clerk_sync.metrics import mapped_rows_refused
from clerk_sync.tables import hook_jobs, organization_memberships, organizations, users

__all__ = ["Job", "Outbox", "claim", "delete_jobs", "extend", "fail", "finish", "finish_many", "list_jobs",
           "redact_jobs", "release", "retry_jobs"]

log = structlog.get_logger("clerk_sync.mapping")
#: How a refusal of the app's mapped table starts in the delivery's ``last_error`` (:meth:`Outbox.project`;
#: ``doctor --freshness`` looks for it, :func:`clerk_sync.freshness.read_refusals`).
REFUSAL_NOTE = "the app's table refused the change"

JSON = dict[str, Any]


class _StoredText(FunctionElement[str]):
    """A JSON column's value as the text the database holds, never parsed by the driver: the column itself
    (SQLite, MySQL/MariaDB keep text); on PostgreSQL ``CAST(.. AS TEXT)``, as psycopg decodes JSONB."""

    type = sa.Text()
    inherit_cache = True


@compiles(_StoredText)
def _stored_text(element: _StoredText, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(_StoredText, "postgresql")
def _pg_stored_text(element: _StoredText, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS TEXT)"


#: A job's payload as the database holds it: its text, on every database (:class:`_StoredText`). Not parsed while
#: the rows are fetched: one payload that is not JSON (edited by hand) would fail the fetch of every row with it,
#: and so every claim, ``hooks list`` and ``retry``; :func:`parsed_payload` reads each, once, where only its own
#: job fails. (A JSONB value that is a JSON string, decoded by psycopg, came back a str: retry wrote it back as
#: JSON text, refused, and one holding JSON text was decoded twice.)
RAW_PAYLOAD = _StoredText(hook_jobs.c.payload).label("payload")


def stored_text(column: sa.ColumnElement[Any]) -> sa.ColumnElement[str]:
    """A JSON column as the text the database holds (:class:`_StoredText`; the inbox's payloads in retention)."""
    return _StoredText(column)
# RAW_PAYLOAD in the claim's SQL text (a RETURNING list)
_PG_PAYLOAD_TEXT = "CAST(payload AS TEXT) AS payload"


class _RedactedMark(FunctionElement[str]):
    """A job payload's ``redacted`` member as text, or NULL. On SQLite NULL too for a payload that is not JSON:
    ``json_extract`` raises "malformed JSON" there, and one hand-edited dead job failed every prune pass (and
    so every retention step after it) and the recording of its handler's failure."""

    type = sa.Text()
    inherit_cache = True


@compiles(_RedactedMark)
def _redacted_mark(element: _RedactedMark, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(hook_jobs.c.payload["redacted"].as_string(), **kw)


@compiles(_RedactedMark, "sqlite")
def _sqlite_redacted_mark(element: _RedactedMark, compiler: SQLCompiler, **kw: Any) -> str:
    payload = hook_jobs.c.payload
    return compiler.process(sa.case((sa.func.json_valid(payload) == 1, payload["redacted"].as_string())), **kw)


#: A job's ``redacted`` mark (:class:`_RedactedMark`): NULL for a job not redacted, or whose payload is not JSON.
REDACTED_MARK = _RedactedMark()

HookSpec = tuple[str, tuple[str, ...], tuple[str, ...]]  # a hook's name, the kinds and fields it wants
# The refusals written again without the user's own columns (Outbox.project): a value, not a link or a parent
_KEPT_BACK_KINDS = frozenset({"constraint", "database", "value"})
# The rows of one set-wise statement of Outbox.record_many (its IN list): few round trips for a 20,000-member
# organization, and within every driver's parameter limit (SQLite's 32,766; 999 before 3.32)
_SET_CHUNK = 500
# The most job rows a group-committed batch holds before writing them (Outbox.defer_jobs)
_HELD_JOBS_MAX = 5_000
_TABLES: dict[Entity, sa.Table] = {
    Entity.USER: users,
    Entity.ORGANIZATION: organizations,
    Entity.MEMBERSHIP: organization_memberships,
}
FIELDS: dict[Entity, list[str]] = {  # the columns a change's row before is read from
    Entity.USER: record_columns(UserRecord),
    Entity.ORGANIZATION: record_columns(OrganizationRecord),
    Entity.MEMBERSHIP: record_columns(MembershipRecord),
}


class HeldJobsNotWritten(Exception):
    """The job rows a group-committed batch held (:meth:`Outbox.defer_jobs`) were refused: rows of several of
    its deliveries, so the batch names none (each is written again alone)."""


class Outbox:
    """Where the applied changes of one unit of work go: the app's mapped tables (projected at once,
    :mod:`clerk_sync.mapping`) and the hook jobs. ``changes`` lists what it recorded, in order (not the
    jobs a batched statement wrote in SQL, :func:`jobs_cte_sql`); ``refused`` why the app's tables refused
    some of them (see :meth:`project`)."""

    def __init__(self, conn: Connection, now: datetime, hooks: Sequence[Hook],
                 mapping: SchemaMapping | None = None, *, unmapped: str | None = None) -> None:
        self.conn = conn
        self.now = now
        self.hooks = hooks
        self.mapping = mapping
        # Why the app's tables are left out of this unit of work (its first try was rolled back by one of
        # them, :class:`AppTableRolledBack`): every change they would get is refused with this reason.
        self.unmapped = unmapped
        self.changes: list[Change] = []
        self.refused: list[str] = []
        self._uncounted: dict[tuple[str, str, str], int] = {}  # refusals counted when this transaction commits
        self.checked_at_once = False  # whether this transaction checks the app's deferred constraints at once
        # SQLite's job rows held for one executemany at the end of a batch (defer_jobs), else None: written at once
        self._held_jobs: list[list[Any]] | None = None
        self._hooked = {e for e in Entity if any(hook.covers(e) for hook in hooks)}
        self._upsert_hooks: dict[Entity, tuple[HookSpec, ...]] = {}
        self._event_hooks: dict[str, tuple[str, ...]] = {}  # by unmirrored event type: the hooks naming it
        self._wanted = self._hooked | set(mapping.tables if mapping is not None else ())

    def wants(self, intent: Upsert | Tombstone) -> bool:
        """Whether the mapping or a hook can care about what ``intent`` changes (a user's or organization's
        deletion also deletes its memberships); if not, the writer takes its plain path."""
        return _touches(intent, self._wanted)

    def before(self, entity: Entity, clerk_id: str) -> JSON | None:
        """The live row's Clerk fields, or None (absent or deleted). Read under the writer's lock."""
        if direct_sqlite(self.conn.dialect):  # the driver directly, converting as SQLAlchemy would
            sql, convert = _sqlite_before(entity)
            rows = sqlite_execute(self.conn, sql, [[clerk_id]])
            if not rows:
                return None
            return {n: v if f is None else f(v) for n, f, v in zip(FIELDS[entity], convert, rows[0], strict=True)}
        row = self.conn.execute(_before_sql(entity), {"clerk_id": clerk_id}).first()
        return None if row is None else dict(row._mapping)

    def record(self, change: Change | None) -> None:
        """Queue ``change`` for every hook that wants it (nothing when it is None: no change)."""
        if change is None:
            return
        self.changes.append(change)
        if self.mapping is not None:
            self.project(change)
        self._insert_jobs([change])

    def record_many(self, changes: Sequence[Change]) -> None:
        """:meth:`record` of each of ``changes`` (deletions of one entity: a user's or organization's memberships
        deleted with it), in that order, set-wise: their projection into the app's mapped table by one statement
        per :data:`_SET_CHUNK` rows, under a savepoint each (:meth:`SchemaMapping.project_deletions`), and all
        their hook jobs by one executemany. A chunk the app's table refuses is written again one change at a
        time (:meth:`project`): a refused row is that row's alone, noted in ``refused``, the others written.
        The jobs, their payloads and keys, and what ``changes`` and ``refused`` list are those of :meth:`record`
        called change by change; a 20,000-member organization's deletion is ~100 round trips, not ~80,000."""
        if not changes:
            return
        assert all(c.kind == "deleted" and c.entity is changes[0].entity for c in changes), \
            "record_many takes deletions of one entity"
        self.changes.extend(changes)
        if self.mapping is not None and changes[0].entity in self.mapping.tables:
            for at in range(0, len(changes), _SET_CHUNK):
                self._project_deletions(changes[at:at + _SET_CHUNK])
        self._insert_jobs(changes)

    def event_hooks(self, event_type: str) -> tuple[str, ...]:
        """The names of the hooks that want unmirrored deliveries of ``event_type`` (:meth:`Hook.wants_event`)."""
        names = self._event_hooks.get(event_type)
        if names is None:
            names = self._event_hooks[event_type] = tuple(h.name for h in self.hooks if h.wants_event(event_type))
        return names

    def record_event(self, event: Event, names: Sequence[str]) -> None:
        """One job per hook of ``names`` for ``event`` (a delivery just stored, not a duplicate), in this
        transaction; ordered after the earlier jobs of the same hook and subject (``entity_key``)."""
        # The type (webhook_events holds 128 characters; a family hook takes a type Clerk adds later) and the
        # keys are bounded to hook_jobs' columns (a longer one stored by its head and digest), which are the
        # queue's bookkeeping: the job's payload keeps the whole type, and its Event the whole idempotency key.
        payload = json.dumps(event.to_json())
        key, event_type = event.key(), _bounded(event.type, _TYPE_CHARS)
        idempotency_key = _bounded(event.idempotency_key, _KEY_CHARS)
        rows = [(name, _bounded(f"{name}|{key}", _KEY_CHARS)) for name in names]
        if direct_sqlite(self.conn.dialect):
            now = sqlite_time(self.now)
            self._sqlite_jobs([[name, event_type, entity_key, idempotency_key, payload, now, now]
                               for name, entity_key in rows])
            return
        self.conn.execute(_job_sql(self.conn.dialect.name == "postgresql"), [
            {"hook": name, "type": event_type, "entity_key": entity_key, "idempotency_key": idempotency_key,
             "payload": payload, "now": self.now} for name, entity_key in rows])

    def _project_deletions(self, changes: Sequence[Change]) -> None:
        """One chunk of :meth:`record_many`'s deletions into the app's table under one savepoint; refused (what
        :meth:`_attempt` takes as a row's refusal), each again on its own by :meth:`project`."""
        assert self.mapping is not None
        if self.unmapped is None:
            if not self.checked_at_once:
                check_at_once(self.conn)
                self.checked_at_once = True
            try:
                with _savepoint(self.conn):
                    self.mapping.project_deletions(self.conn, self.now, changes[0].entity,
                                                   [c.clerk_id for c in changes])
                return
            except AppTableRolledBack:
                raise  # the whole transaction is gone (a SQLite trigger's RAISE(ROLLBACK)): as project's
            except StoreDataError:
                pass  # the app's constraint refused one of them: which, row by row
            except StoreError:
                raise  # transient: the unit of work is retried
            except sa.exc.SQLAlchemyError as exc:
                if passing_cause(exc) is not None:
                    raise  # the connection, a bounded wait, a deadlock, the server: the unit of work is retried
            except Exception:  # noqa: S110 (a trigger's error, a value: project says it row by row, as its own)
                pass
        for change in changes:
            self.project(change)

    def _insert_jobs(self, changes: Sequence[Change]) -> None:
        """One hook job per change and hook that wants it, in that order, in one (executemany) statement."""
        rows = [(name, change, payload) for change in changes
                if (names := [hook.name for hook in self.hooks if hook.wants(change)])
                for payload in (json.dumps(change.to_json()),) for name in names]
        if not rows:
            return
        if direct_sqlite(self.conn.dialect):
            now = sqlite_time(self.now)
            self._sqlite_jobs([[name, change.type, _entity_key(name, change), change.idempotency_key, payload, now, now]
                               for name, change, payload in rows])
            return
        pg = self.conn.dialect.name == "postgresql"  # JSONB: the payload is cast there
        self.conn.execute(_job_sql(pg), [self._job(name, change, payload) for name, change, payload in rows])

    def _sqlite_jobs(self, rows: list[list[Any]]) -> None:
        if self._held_jobs is None:
            sqlite_execute(self.conn, _SQLITE_JOB_SQL, rows, many=True)
            return
        self._held_jobs.extend(rows)
        if len(self._held_jobs) >= _HELD_JOBS_MAX:  # (a batch of organizations' deletions: their members' jobs
            self.write_jobs()  # written as they come, not all held to the batch's end)
            self._held_jobs = []

    def defer_jobs(self) -> None:
        """SQLite: hold the job rows of this transaction's changes and events for one executemany
        (:meth:`write_jobs`), in the order they were queued (their ids, hence each entity's order, are those
        written one by one would get). For a group-committed batch (nothing in it reads ``hook_jobs``): one
        statement a batch instead of one a delivery (BENCHMARKS.md, issue 11)."""
        if direct_sqlite(self.conn.dialect):
            self._held_jobs = []

    def write_jobs(self) -> None:
        """The job rows :meth:`defer_jobs` held, written; before the COMMIT. Refused: :class:`HeldJobsNotWritten`
        (a lost connection as itself)."""
        held, self._held_jobs = self._held_jobs, None
        if not held:
            return
        try:
            sqlite_execute(self.conn, _SQLITE_JOB_SQL, held, many=True)
        except Exception as exc:
            if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
                raise
            raise HeldJobsNotWritten(f"the batch's hook jobs: {type(exc).__name__}") from exc

    def project(self, change: Change) -> None:
        """The change into the app's mapped table, under a savepoint: what the app's table refuses for good
        (its own constraint, a value its column type cannot take, an ambiguous link) is its row's alone.
        The contract rows, the inbox and the hook jobs still commit, so a role, a ban or a deletion is
        never held back by the app's table; the refusal is logged and kept in ``refused`` (the delivery's
        ``last_error``). A transient failure still fails the whole, as does a refusal that rolled back the
        whole transaction (:class:`AppTableRolledBack`: the caller writes the unit of work again with
        ``unmapped``).

        A created or updated row refused for a value (too long for its column, a constraint, a type) is
        written again, in a fresh savepoint, without the columns the user chooses in Clerk
        (:meth:`SchemaMapping.user_writable`: names, username, image, e-mail, ``unsafe_metadata``, computed
        ones): a value the user wrote never holds back the role, ban or plan columns of their row. Those
        columns keep their earlier values (a new row: the table's defaults), and ``refused`` says which were
        kept back and why. Refused again (the admin's own value, a NOT NULL column left empty): the whole row
        is refused, as before."""
        assert self.mapping is not None
        if change.entity not in self.mapping.tables:
            return  # not mapped: nothing of the app's to write or to refuse (memberships under a users-only mapping)
        kept_back: list[str] = []
        if self.unmapped is not None:
            reason, kind = self.unmapped, "rolled_back"
        else:
            if not self.checked_at_once:  # every mapped transaction (reconcile, admin writes), not only Store.run's
                check_at_once(self.conn)
                self.checked_at_once = True
            refusal = self._attempt(change)
            if refusal is None:
                return
            reason, kind = refusal
            if kind in _KEPT_BACK_KINDS and change.kind != "deleted":
                for leave_out in self.mapping.user_writable(change.entity):  # the sourced ones, then computes too
                    if self._attempt(change, leave_out) is None:
                        kept_back = leave_out
                        break
        table = self.mapping.tables[change.entity].table
        if kept_back:
            advice = (f"it is applied to clerk-sync's tables, and written to {table} without the columns the user "
                      f"can set in Clerk ({', '.join(kept_back)}), which keep their earlier values (role, ban and "
                      "the other columns hold): the user's next change, or a wider column then `clerk-sync migrate "
                      "--mapping ... --backfill`, writes them")
        else:
            advice = ("it is applied to clerk-sync's tables (role, ban and deletion hold): fix it, then `clerk-sync "
                      "migrate --mapping ... --backfill` writes the row (one to link: set its Clerk-id column "
                      "yourself, or the user's next event links it)")
        self.refused.append(f"{REFUSAL_NOTE} ({reason}); {advice}")
        log.warning("mapped_row_refused", table=table, event_type=change.type, clerk_id=change.clerk_id,
                    reason=reason, kept_back=kept_back or None)
        self._count_refusal(table, change.entity.value, kind)

    def _attempt(self, change: Change, leave_out: Sequence[str] = ()) -> tuple[str, str] | None:
        """Project ``change`` (without the columns ``leave_out``) under a savepoint: None when written, else
        (why the app's table refused it, the kind of refusal). What is not the row's is raised."""
        assert self.mapping is not None
        try:
            with _savepoint(self.conn):
                self.mapping.project(self.conn, self.now, change, leave_out=leave_out)
        except AppTableRolledBack:
            raise
        except StoreDataError as exc:
            kind = ("link" if isinstance(exc, LinkAmbiguous | LinkUnverified)
                    else "value" if isinstance(exc, ValueTooLong) else "constraint")
            return str(exc), kind
        except ParentNotThere as exc:  # (asked once the savepoint is rolled back: PostgreSQL reads nothing before)
            if not self.mapping.parents_arrived(self.conn, change):
                raise  # a parent row not there yet: the unit of work is retried
            return f"{exc.refused}; the rows it refers to have arrived: the app's table refused theirs", "parent"
        except StoreError:
            raise  # transient: the unit of work is retried
        except sa.exc.SQLAlchemyError as exc:
            if passing_cause(exc) is not None:
                raise  # the connection, a bounded wait, a deadlock, the server: the unit of work is retried
            denied = privilege_refusal(exc)
            if denied is not None:
                if self.mapping.role_lacks(self.conn, change.entity):
                    raise  # a grant missing on the app's table: the database's state (503 until granted)
                # PostgreSQL's 42501 with every grant there: a row-level security policy's refusal, or a trigger's
                orig = denied.orig or denied
                return (f"database error: {type(orig).__name__}: {database_message(orig)}; the app's "
                        "table refused the row itself (a row-level security policy, or a trigger raising "
                        "insufficient_privilege or writing a table this role may not write), though the role has "
                        "every privilege clerk-sync needs on it"), "database"
            # anything else the database said is about this row (an app trigger's RAISE EXCEPTION or
            # SIGNAL, which no error class marks as the data's): the same row would be refused again
            return str(store_error(exc)), "database"
        except Exception as exc:  # SQLAlchemy's processors on SQLite's direct path, a compute that raised
            # (a KeyError on a metadata key the user removed must not hold back their ban); its message may
            # quote the value: only its type is kept
            return (f"{type(exc).__name__}: a value the column's type cannot take, or the mapping's compute "
                    "raised it"), "value"
        return None

    def _count_refusal(self, table: str, entity: str, kind: str) -> None:
        """``clerk_sync_mapped_rows_refused_total``, once this transaction has committed (:meth:`committed`): a
        unit of work rolled back (a batch written again one by one, a retry after a transient failure, one an
        app table rolled back whole, a COMMIT the database refused) counts its refusals only the time it
        commits."""
        key = (table, entity, kind)
        self._uncounted[key] = self._uncounted.get(key, 0) + 1

    def committed(self) -> None:
        """The unit of work committed (``Store.transaction`` calls it after the COMMIT succeeded; SQLAlchemy's
        ``commit`` event comes before it, so a COMMIT refused there, a SQLite deferred key, counted too)."""
        for (table, entity, kind), n in self._uncounted.items():
            mapped_rows_refused(table, entity, kind, n)
        self._uncounted.clear()

    def pipelines(self, entity: Entity) -> bool:
        """Whether the one-statement path (with :func:`jobs_cte_sql` for the jobs) can take this entity's
        created/updated changes."""
        return entity is not Entity.MEMBERSHIP and (self.mapping is None or self.mapping.pipelines(self.conn, entity))

    def upsert_hooks(self, entity: Entity) -> tuple[HookSpec, ...]:
        """The hooks that may want a created or updated ``entity``, as (name, kinds, fields) for
        :func:`jobs_cte_sql`: the one-statement path writes their jobs in SQL (the same choice as
        :meth:`Hook.wants` on the :func:`~clerk_sync.changes.describe` of the write)."""
        specs = self._upsert_hooks.get(entity)
        if specs is None:
            specs = self._upsert_hooks[entity] = tuple(
                (hook.name, kinds, tuple(hook.fields)) for hook in self.hooks
                if (kinds := tuple(k for k in ("created", "updated")
                                   if {"*", change_type(entity, k), change_type(entity, "*")} & set(hook.on))))
        return specs

    def jobs_params(self, entity: Entity, clerk_id: str, version: int, values_json: str) -> list[Any]:
        """The parameters of :func:`jobs_cte_sql` for one upsert (``values_json``: the change's values)."""
        prefix = change_type(entity, "")
        return [values_json, prefix, f"|{entity.value}:{clerk_id}", prefix, f":{clerk_id}:{version}",
                entity.value, clerk_id, version, self.now, self.now]

    def _job(self, hook: str, change: Change, payload: str) -> JSON:
        return {"hook": hook, "type": change.type, "entity_key": _entity_key(hook, change),
                "idempotency_key": change.idempotency_key, "payload": payload, "now": self.now}


def _touches(intent: Upsert | Tombstone, entities: set[Entity]) -> bool:
    # a user's or organization's deletion also deletes its memberships
    cascades = isinstance(intent, Tombstone) and intent.entity is not Entity.MEMBERSHIP
    return intent.entity in entities or (cascades and Entity.MEMBERSHIP in entities)


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed (or listed) job; ``token`` proves the claim when finishing it."""

    id: int
    hook: str
    change: Change | Event  # an Event: a delivery of a type clerk-sync does not mirror
    attempts: int
    token: str | None
    status: str = "running"
    last_error: str | None = None


_LEASE_EXPIRED = "attempts (worker killed, or handler slower than the lease)"  # "lease expired after N " + this


def claim(conn: Connection, now: datetime, *, lease: timedelta, limit: int, max_attempts: int,
          hooks: Sequence[str] | None = None, dead: list[tuple[int, str]] | None = None) -> list[Job]:
    """Lease up to ``limit`` claimable jobs (at most one per entity_key), oldest first; all jobs of one
    claim share its token. Run inside the caller's transaction. ``hooks``: only the jobs of these hooks
    (the dispatcher's own; None: every hook's). A job's ``entity_key`` starts with its hook's name, so the
    jobs a dispatcher leaves out never hold back those it takes, nor the reverse: each entity's jobs of a
    hook still run one at a time, in order, by whichever dispatcher has that hook.

    A job whose lease expired after ``max_attempts`` claims is marked dead instead (its worker keeps
    dying, or the handler outlives the lease), as is one whose payload cannot be read: ``dead`` (when
    given) is appended the (id, hook) of each job the claim marked dead, which it does not return.

    Three short statements rather than one: the oldest due jobs, page by page (2 x ``limit`` a page); the
    first unfinished job of each of their entities (only that one may run: order per entity); then the
    update of ``limit`` of those, skipping what another dispatcher holds and what is no longer due (and
    then looking further for what was skipped). Each is one index scan (at worst one pass over the
    table) whatever the statistics say. The single statement it replaced nested its subqueries under a
    plan chosen from statistics taken when the queue was empty (as vacuum leaves them on a queue table):
    15 ms per claim of 80 jobs, growing with the square of the queue. Through psycopg or sqlite3
    (:func:`_claim_direct`) the first two are one statement: the page first, then one index probe per
    page row for its entity's first job, so the same bound holds.
    """
    if conn.dialect.name in ("mysql", "mariadb"):  # no UPDATE .. RETURNING, nor a subquery on the updated table
        return _claim_one_by_one(conn, now, lease=lease, limit=limit, max_attempts=max_attempts, hooks=hooks,
                                 dead=dead)
    pg = conn.dialect.name == "postgresql"
    direct = _direct(conn)
    if direct is not None:
        return _claim_direct(conn, direct, now, lease=lease, limit=limit, max_attempts=max_attempts, hooks=hooks,
                             dead=dead)
    expired = conn.execute(_dead_sql(pg), {"now": now, "max_attempts": max_attempts, "error": _LEASE_EXPIRED}).all()
    if dead is not None:
        dead += [(job_id, hook) for job_id, hook in expired]
    due: dict[str, Any] = {"now": now, "max_attempts": max_attempts}
    if hooks is not None:
        due["hooks"] = list(hooks)
    token = str(uuid.uuid4())
    take = due | {"lease_until": now + lease, "token": token}

    def page(after: int, size: int) -> list[tuple[int, str, bool]]:
        rows = conn.execute(_due_sql(pg, hooks is not None), due | {"after": after, "page": size}).all()
        keys = sorted({row.entity_key for row in rows})
        first = {key: job_id for key, job_id in conn.execute(_first_sql(pg), {"keys": keys})} if keys else {}
        return [(row.id, row.entity_key, first.get(row.entity_key) == row.id) for row in rows]

    rows = _claim_pages(page, lambda chosen: conn.execute(_take_sql(pg), take | {"ids": chosen}).all(), limit)
    return _claimed(conn, rows, token, dead)


def _claim_pages(page: Callable[[int, int], Sequence[tuple[int, str, Any]]],
                 take: Callable[[list[int]], Sequence[Any]], limit: int) -> list[Any]:
    """The walk of :func:`claim`: pages of due jobs after an id (each with whether it is its entity's first
    unfinished job) until ``limit`` are chosen, then ``take`` them (id, hook, payload, attempts rows)."""
    taken: list[Any] = []
    decided: set[str] = set()  # entities already looked at: at most one candidate each, the first
    after, exhausted, size = 0, False, 2 * limit
    while len(taken) < limit and not exhausted:
        need, chosen = limit - len(taken), list[int]()
        while len(chosen) < need and not exhausted:
            rows = page(after, size)
            exhausted, before = len(rows) < size, len(chosen)
            for job_id, key, first in rows:
                after = job_id
                if key in decided:
                    continue
                decided.add(key)
                if first:
                    chosen.append(job_id)
                    if len(chosen) == need:
                        exhausted = exhausted and job_id == rows[-1][0]
                        break
            if len(chosen) == before:  # a page of jobs blocked behind their entities' first ones (a sink
                # down, its first jobs in backoff): larger pages, not one round trip per 2 x limit of them
                size = min(2 * size, max(4096, 2 * limit))
        if not chosen:
            break
        # Fewer taken than chosen: another dispatcher holds some of them (it chose the same oldest ones
        # at the same moment): look further rather than come back short.
        taken += take(chosen)
    return sorted(taken, key=lambda row: row[0])


def _claimed(conn: Connection, rows: Sequence[Any], token: str, dead: list[tuple[int, str]] | None) -> list[Job]:
    """The jobs of claimed (id, hook, payload, attempts) rows; one whose payload this release cannot read is
    marked dead with the reason (:func:`_unreadable`), the others run: one job's payload never stalls the claim."""
    jobs: list[Job] = []
    for job_id, hook, payload, attempts in rows:
        change = _readable(conn, job_id, payload)
        if change is not None:
            jobs.append(Job(job_id, hook, change, attempts, token))
        elif dead is not None:
            dead.append((job_id, hook))
    return jobs


def _readable(conn: Connection, job_id: int, payload: Any) -> Change | Event | None:
    """A claimed job's change or event; None, the job marked dead with why, when its payload cannot be read."""
    try:
        return job_payload(parsed_payload(payload))
    except Exception as exc:  # whatever a payload holds, only its own job fails
        error = _unreadable(exc, job_id)
        log.error("hook_job_unreadable", job_id=job_id, error=error)
        _set(conn, job_id, status="dead", lease_until=None, claim_token=None, last_error=_storable(error))
        return None


def parsed_payload(payload: Any) -> Any:
    """A :data:`RAW_PAYLOAD`'s document (raises on text that is not JSON)."""
    return json.loads(payload) if isinstance(payload, str) else payload


def _unreadable(exc: Exception, job_id: int) -> str:
    return (f"unreadable payload ({type(exc).__name__}: {exc}): not a change or event this release reads (one "
            "rewritten by an older release's `users erase`, or edited by hand); nothing to run: purge it "
            f"(`clerk-sync hooks purge {job_id}`)")


def _claim_direct(conn: Connection, sql: _DirectSQL, now: datetime, *, lease: timedelta, limit: int,
                  max_attempts: int, hooks: Sequence[str] | None, dead: list[tuple[int, str]] | None) -> list[Job]:
    """:func:`claim` through the driver itself (psycopg, sqlite3), two statements a page instead of three:
    each page of due jobs comes with whether each is its entity's first unfinished job (the keys are not
    sent back), and the rows are the driver's tuples, not SQLAlchemy's. The dispatcher in ``serve`` shares
    the interpreter (and on SQLite the writer lock) with the webhook path: its CPU per job was the mapped +
    hook ingest cell's largest cost (85 -> 28 us a job on PostgreSQL, in process; BENCHMARKS.md, issue 11)."""
    params: dict[str, Any] = {"now": sql.time(now), "max_attempts": max_attempts, "error": _LEASE_EXPIRED}
    token = str(uuid.uuid4())
    with driver_cursor(conn, "claim hook jobs") as cur:
        expired = cur.execute(sql.dead, params).fetchall()
        params |= {"lease_until": sql.time(now + lease), "token": token}
        page = sql.page
        if hooks is not None:
            page, params["hooks"] = sql.page_of_hooks, sql.hooks(hooks)
        rows = _claim_pages(
            lambda after, size: cur.execute(page, params | {"after": after, "page": size}).fetchall(),
            lambda chosen: cur.execute(sql.take, params | {"ids": sql.ids(chosen)}).fetchall(), limit)
    if dead is not None:
        dead += [(job_id, hook) for job_id, hook in expired]
    return _claimed(conn, rows, token, dead)


def _claim_one_by_one(conn: Connection, now: datetime, *, lease: timedelta, limit: int,
                      max_attempts: int, hooks: Sequence[str] | None,
                      dead: list[tuple[int, str]] | None) -> list[Job]:
    """:func:`claim` as a select then one update per job (MySQL/MariaDB)."""
    j, earlier = hook_jobs, hook_jobs.alias("earlier")
    due = sa.or_(sa.and_(j.c.status == "pending", j.c.available_at <= now),
                 sa.and_(j.c.status == "running", j.c.lease_until < now))
    blocked = sa.exists().where(earlier.c.entity_key == j.c.entity_key, earlier.c.id < j.c.id,
                                earlier.c.status.in_(("pending", "running")))
    query = sa.select(j.c.id, j.c.hook, RAW_PAYLOAD, j.c.attempts, j.c.status).where(due, ~blocked)
    if hooks is not None:
        query = query.where(j.c.hook.in_(list(hooks)))
    query = query.order_by(j.c.id).limit(limit).with_for_update(skip_locked=True)  # MariaDB: no FOR UPDATE OF
    jobs: list[Job] = []
    for row in conn.execute(query).all():
        # only a lease that expired is the dead statement's; a pending job past max_attempts (the limit was
        # lowered) runs once more, as _DUE has it on the other databases
        if row.status == "running" and row.attempts >= max_attempts:
            error = f"lease expired after {row.attempts} {_LEASE_EXPIRED}"
            _set(conn, row.id, status="dead", lease_until=None, claim_token=None, last_error=error)
            if dead is not None:
                dead.append((row.id, row.hook))
            continue
        change = _readable(conn, row.id, row.payload)
        if change is None:
            if dead is not None:
                dead.append((row.id, row.hook))
            continue
        token = str(uuid.uuid4())
        _set(conn, row.id, status="running", lease_until=now + lease, claim_token=token, attempts=row.attempts + 1)
        jobs.append(Job(row.id, row.hook, change, row.attempts + 1, token))
    return jobs


def finish(conn: Connection, job: Job) -> bool:
    """Delete a job that ran; False if the claim was lost (its lease expired and another worker took it)."""
    return not finish_many(conn, [job])


def finish_many(conn: Connection, jobs: Sequence[Job]) -> list[int]:
    """Delete jobs that ran, in one statement; returns the ids whose claim was lost (see :func:`finish`)."""
    if conn.dialect.name in ("mysql", "mariadb"):  # no DELETE .. RETURNING on MySQL
        d = sa.delete(hook_jobs).where(hook_jobs.c.id == sa.bindparam("job_id"),
                                       hook_jobs.c.claim_token == sa.bindparam("token"))
        return [job.id for job in jobs if conn.execute(d, {"job_id": job.id, "token": job.token}).rowcount != 1]
    direct = _direct(conn)
    if direct is not None:
        return _finish_direct(conn, direct, jobs)
    deleted: set[int] = set()
    for token in {job.token for job in jobs}:
        ids = [job.id for job in jobs if job.token == token]
        # PostgreSQL: one array parameter, the same statement text for any batch size, so psycopg's query
        # cache and prepared statement serve it (an expanded IN list missed both)
        finish = _finish_sql(conn.dialect.name == "postgresql")
        deleted.update(conn.execute(finish, {"ids": ids, "token": token}).scalars())
    return [job.id for job in jobs if job.id not in deleted]


def _finish_direct(conn: Connection, sql: _DirectSQL, jobs: Sequence[Job]) -> list[int]:
    """:func:`finish_many` through the driver itself (see :func:`_claim_direct`)."""
    deleted: set[int] = set()
    with driver_cursor(conn, "finish hook jobs") as cur:
        for token in {job.token for job in jobs}:
            ids = sql.ids([job.id for job in jobs if job.token == token])
            deleted.update(row[0] for row in cur.execute(sql.finish, {"ids": ids, "token": token}).fetchall())
    return [job.id for job in jobs if job.id not in deleted]


def extend(conn: Connection, jobs: Sequence[Job], until: datetime) -> int:
    """Move the leases of claimed jobs to ``until`` (a heartbeat); returns how many are still this
    claim's (the others' leases expired and another dispatcher took them, or they were finished)."""
    stmt = sa.update(hook_jobs).where(hook_jobs.c.id.in_(sa.bindparam("ids", expanding=True)),
                                      hook_jobs.c.claim_token == sa.bindparam("token"),
                                      hook_jobs.c.status == "running").values(lease_until=until)
    return sum(conn.execute(stmt, {"ids": [j.id for j in jobs if j.token == token], "token": token}).rowcount
               for token in {j.token for j in jobs})


def fail(conn: Connection, job: Job, error: str, retry_at: datetime | None) -> bool:
    """Record a failed attempt: pending again at ``retry_at``, or dead when it is None. A job whose payload
    was redacted meanwhile (its user erased while the handler ran) keeps only the exception's name: the
    handler's message may quote the person, and no later redaction would find it. ``error`` is stored
    as every database takes it (:func:`_storable`)."""
    j = hook_jobs
    error = _storable(error)
    redacted = REDACTED_MARK.is_not(None)
    last_error = sa.case((redacted, _redacted_error(error)), else_=sa.literal(error, j.c.last_error.type))
    values: JSON = {"status": "pending" if retry_at else "dead", "last_error": last_error,
                    "lease_until": None, "claim_token": None}
    if retry_at is not None:
        values["available_at"] = retry_at
    stmt = sa.update(hook_jobs).where(hook_jobs.c.id == job.id, hook_jobs.c.claim_token == job.token)
    return conn.execute(stmt.values(**values)).rowcount == 1


_MAX_ERROR = 2000  # characters of a last error kept


def _storable(text: str) -> str:
    """``text`` as every database stores it: a NUL (PostgreSQL refuses it in text; a receiver's binary
    answer has them) as ``\\0``, a lone surrogate (no encoding takes it) as ``\\ud800``; at most
    :data:`_MAX_ERROR` characters. A refusal here would abandon the dispatcher's batch."""
    text = text[:_MAX_ERROR].replace("\x00", "\\0")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:_MAX_ERROR]


def release(conn: Connection, jobs: Sequence[Job]) -> None:
    """Give claimed jobs back unrun (due now, the claim's attempt not counted)."""
    for job in jobs:
        stmt = sa.update(hook_jobs).where(hook_jobs.c.id == job.id, hook_jobs.c.claim_token == job.token)
        conn.execute(stmt.values(status="pending", lease_until=None, claim_token=None, attempts=job.attempts - 1))


def list_jobs(conn: Connection, *, status: str | None = "dead", limit: int = 100) -> list[Job]:
    columns = [c for c in hook_jobs.c if c.name != "payload"]
    query = sa.select(*columns, RAW_PAYLOAD).order_by(hook_jobs.c.id).limit(limit)
    if status is not None:
        query = query.where(hook_jobs.c.status == status)
    return [Job(r.id, r.hook, _listed(r), r.attempts, None, r.status, r.last_error) for r in conn.execute(query)]


def _listed(row: Any) -> Change | Event:
    """A listed job's change or event; for a payload this release cannot read (dead: :func:`_readable`), an
    empty redacted Event standing for it, of the row's type and, when its idempotency key is ``type:svix_id``
    (an event's), its svix id, so ``hooks list`` shows it (its last error says why) and ``purge`` takes it."""
    try:
        return job_payload(parsed_payload(row.payload))
    except Exception:  # (what a payload holds: only that job is shown by its columns)
        head, sep, svix_id = str(row.idempotency_key).partition(":")
        return Event(str(row.type), svix_id if sep and head == row.type else "", 0, {}, True)


def retry_jobs(conn: Connection, now: datetime, ids: Sequence[int] | None = None) -> int:
    """Dead jobs (all, or these ids) queued again with a fresh attempt budget, at the tail of the queue:
    each becomes a new job (a new id, the same change and idempotency key; on SQLite, whose ``hook_jobs`` ids are
    not AUTOINCREMENT, the dead row's number may come back when it was the highest) and the dead row goes.

    Not set back to pending in place: a dead job no longer holds its entity back, so a later job of the
    same entity may be running; back under its old (lower) id it would be that entity's first unfinished
    job again and be claimed beside it (two handlers of one entity at once). At the tail it waits behind
    whatever of its entity is unfinished, as a new change does. Rows are locked first, so two retries at
    once queue each job once. They are read and queued in id order, :data:`_RETRY_PAGE` at a time (a few
    pages in memory, not every dead payload); ``clerk-sync hooks retry`` also commits each page."""
    j = hook_jobs
    query = sa.select(j.c.id, *_KEPT_ON_RETRY, RAW_PAYLOAD).where(j.c.status == "dead")
    query = query.order_by(j.c.id).with_for_update()
    count = 0
    if ids is not None:  # sorted: the pages, one after the other, keep the order of the ids
        wanted = sorted(set(ids))
        for start in range(0, len(wanted), _RETRY_PAGE):
            chunk = wanted[start:start + _RETRY_PAGE]
            count += _requeue(conn, now, conn.execute(query.where(j.c.id.in_(chunk))).all())
        return count
    after = 0
    while rows := conn.execute(query.where(j.c.id > after).limit(_RETRY_PAGE)).all():
        count += _requeue(conn, now, rows)
        after = rows[-1].id
    return count


_RETRY_PAGE = 500  # dead jobs read (with their payloads) and queued again at a time


_KEPT_ON_RETRY = tuple(hook_jobs.c[name] for name in (
    "hook", "type", "entity_key", "idempotency_key", "last_error", "created_at"))  # and the payload, as it is


def _requeue(conn: Connection, now: datetime, rows: Sequence[Any]) -> int:
    """``rows`` (dead jobs, id-ordered) as new pending jobs at the tail, in their order; the dead rows go."""
    if not rows:
        return 0
    j = hook_jobs
    conn.execute(sa.delete(j).where(j.c.id.in_([row.id for row in rows])))
    # the payload written back as it was read (RAW_PAYLOAD): one that is not JSON stays what it was
    text = sa.bindparam("payload_text", type_=sa.Text)
    insert = sa.insert(j).values(payload=sa.cast(text, postgresql.JSONB) if conn.dialect.name == "postgresql"
                                 else text)
    conn.execute(insert, [{**{c.name: getattr(row, c.name) for c in _KEPT_ON_RETRY}, "status": "pending",
                           "attempts": 0, "available_at": now,
                           "payload_text": row.payload if isinstance(row.payload, str) else json.dumps(row.payload)}
                          for row in rows])
    return len(rows)


def delete_jobs(conn: Connection, ids: Sequence[int] | None = None, *, hook: str | None = None,
                now: datetime | None = None) -> int:
    """Purge dead jobs (all, or these ids); pending and running jobs are never purged. With ``hook``: every
    job of that hook that is not running, pending ones too (a hook removed or renamed: no dispatcher has it,
    so none claims its jobs, which would wait for ever), and those left running by a dispatcher that died
    (their lease ended before ``now``: no dispatcher with the hook is left to take them over)."""
    j = hook_jobs
    if hook is not None:
        left = sa.or_(j.c.status.in_(("dead", "pending")),
                      sa.and_(j.c.status == "running", j.c.lease_until < now) if now is not None else sa.false())
        return conn.execute(sa.delete(j).where(j.c.hook == hook, left)).rowcount
    stmt = sa.delete(j).where(j.c.status == "dead")
    if ids is not None:
        stmt = stmt.where(j.c.id.in_(ids))
    return conn.execute(stmt).rowcount


def redact_jobs(conn: Connection, mentions: Mentions | None = None, *, ids: Sequence[int] | None = None) -> int:
    """Keep only the ids (entity, Clerk id, kind, version) of the jobs whose change or last error names the
    person ``mentions`` (erasure), or of the jobs ``ids`` (pruning): the handler still learns of the change,
    not the person. The last error (a handler's message may quote the person) keeps only the exception's
    name. Returns how many."""
    j = hook_jobs
    where: sa.ColumnElement[bool]
    if ids is not None:
        where = sa.and_(j.c.id.in_(ids), j.c.status == "dead")  # (queued again meanwhile: its handler's)
    elif not mentions:
        return 0
    else:
        lower = unicode_lower(conn)
        where = sa.or_(*(folded_like(lower, c, n) for n in mentions.patterns()
                         for c in (sa.cast(j.c.payload, sa.Text), j.c.last_error)))
    done = 0
    for row in conn.execute(sa.select(j.c.id, RAW_PAYLOAD, j.c.last_error).where(where)).all():
        try:
            document, readable = parsed_payload(row.payload), True
        except ValueError:  # not JSON (edited by hand): none of it kept
            document, readable = row.payload, False
        # Another person's (``joann@`` for ``ann@``) is told apart in a readable document; a payload that is not
        # JSON is redacted whenever the search matched (its text may hold the address as a JSON escape,
        # ``zo\u00eb@``, which the search matches and a text check does not: better redacted than kept)
        if mentions is not None and ids is None and readable and not (
                mentions.in_document(document) or mentions.in_text(row.last_error)):
            continue
        payload: JSON = document if isinstance(document, dict) else {}
        if payload.get("redacted") and row.last_error in (None, _redacted_error(row.last_error or "")):
            continue  # redacted already (an erasure run again): not counted, nor audited, twice
        redacted: JSON = {"payload": _redacted_payload(payload)}
        if row.last_error is not None:
            redacted["last_error"] = _redacted_error(row.last_error)
        conn.execute(sa.update(j).where(j.c.id == row.id).values(**redacted))
        done += 1
    return done


def _redacted_payload(payload: JSON) -> JSON:
    """A job's payload reduced to its ids: a change's entity, Clerk id, kind and version; an event's type, svix
    id, timestamp and subject (``data`` keeps only its ``id``)."""
    if "event" in payload:
        ids = {k: payload[k] for k in ("event", "svix_id", "timestamp", "subject") if k in payload}
        data = payload.get("data")
        ident = data.get("id") if isinstance(data, dict) else None
        return ids | {"data": {"id": ident} if isinstance(ident, str) else {}, "redacted": True}
    kept = {k: payload[k] for k in ("entity", "clerk_id", "kind", "version") if k in payload}
    return kept | {"values": {}, "previous": {}, "redacted": True}


def _redacted_error(error: str) -> str:
    """``ValueError: CRM refused ada@example.com`` -> ``ValueError: (redacted)``."""
    name, sep, _ = error.partition(": ")
    return f"{name}: (redacted)" if sep and name.replace(".", "").replace("_", "").isalnum() else "(redacted)"


# Prebuilt statements: built once, as the hot path in store.py does (a Core construct per delivery
# spent most of the hook path's CPU generating cache keys).
@functools.cache
def _before_sql(entity: Entity) -> sa.TextualSelect:
    table, names = _TABLES[entity], FIELDS[entity]
    # Identifiers come from our own tables, values are bound: nothing of the input reaches the SQL text.
    sql = f"SELECT {', '.join(names)} FROM {table.name} WHERE clerk_id = :clerk_id AND deleted_at IS NULL"  # noqa: S608
    return sa.text(sql).columns(*[table.c[n] for n in names])


@functools.cache
def _job_sql(postgres: bool) -> sa.TextClause:
    payload = "CAST(:payload AS JSONB)" if postgres else ":payload"
    names = ["hook", "type", "entity_key", "idempotency_key"]
    return sa.text(
        f"INSERT INTO hook_jobs ({', '.join(names)}, payload, status, attempts, available_at, created_at) "  # noqa: S608
        f"VALUES ({', '.join(':' + n for n in names)}, {payload}, 'pending', 0, :now, :now)"
    ).bindparams(sa.bindparam("payload", type_=sa.Text), sa.bindparam("now", type_=hook_jobs.c.created_at.type))


# Due: pending and available, or running with an expired lease and attempts left (the dead statement takes
# the others). A pending job past max_attempts (the limit was lowered) runs once more before it is dead.
_DUE = ("((j.status = 'pending' AND j.available_at <= :now) "
        "OR (j.status = 'running' AND j.lease_until < :now AND j.attempts < :max_attempts))")
# The same test as one expression no index serves: where the rows are already named by id, the planner
# must not prefer the status index (with statistics from an empty queue it did, and walked every due row).
_STILL_DUE = ("CASE WHEN j.status = 'pending' THEN j.available_at <= :now WHEN j.status = 'running' "
              "THEN j.lease_until < :now AND j.attempts < :max_attempts ELSE false END")


@contextmanager
def _savepoint(conn: Connection) -> Iterator[None]:
    """``conn.begin_nested()``, through the driver itself on psycopg and sqlite3: SQLAlchemy's SAVEPOINT and
    RELEASE cost ~0.1 ms of Python each, per mapped change, which was most of what a mapped table cost on
    SQLite (BENCHMARKS.md, issue 11). SQLAlchemy's transaction is the same: it never sees this savepoint.

    On SQLite an app's trigger can end the whole transaction (``RAISE(ROLLBACK)``), savepoint included:
    that comes out as :class:`AppTableRolledBack` (the unit of work is to be written again without the
    app's tables), not as "no such savepoint", a 503 on every retry of the delivery. SQLite ends it too on
    a full disk or an I/O error: a :class:`StoreError` then (503), not the app's table's refusal."""
    if conn.dialect.driver not in ("psycopg", "pysqlite"):
        with conn.begin_nested():
            yield
        return
    with driver_cursor(conn, "SAVEPOINT") as cur:
        cur.execute("SAVEPOINT clerk_sync_mapped")
    try:
        yield
    except BaseException as exc:
        if conn.invalidated:  # the connection is gone (SQLAlchemy saw it): the original error says why
            raise
        raw: Any = conn.connection.driver_connection
        if conn.dialect.driver == "pysqlite" and not raw.in_transaction:
            passing = passing_cause(exc)
            if passing is not None:  # SQLite ends the transaction on a full disk, an I/O error: not the app's
                raise store_error(passing) from exc  # doing, nor the row's (503, retried whole)
            cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
            raise AppTableRolledBack(f"{cause} (and it rolled back the whole transaction: a trigger's "
                                     "RAISE(ROLLBACK); RAISE(ABORT) refuses only the row)") from exc
        with driver_cursor(conn, "ROLLBACK TO SAVEPOINT") as cur:
            cur.execute("ROLLBACK TO SAVEPOINT clerk_sync_mapped")
            cur.execute("RELEASE SAVEPOINT clerk_sync_mapped")
        raise
    with driver_cursor(conn, "RELEASE SAVEPOINT") as cur:
        cur.execute("RELEASE SAVEPOINT clerk_sync_mapped")


@dataclass(frozen=True)
class _DirectSQL:
    """:func:`_claim_direct`'s statements for one driver: the same as :func:`_dead_sql`, :func:`_due_sql`
    with :func:`_first_sql`, :func:`_take_sql` and :func:`_finish_sql`, in its placeholders; how it takes a
    list of ids (one parameter: a driver adapts a list element by element, in Python) and a timestamp."""

    dead: str
    page: str
    page_of_hooks: str  # the page, of the jobs of the hooks in :hooks only
    take: str
    finish: str
    ids: Callable[[list[int]], str]
    hooks: Callable[[Sequence[str]], Any]
    time: Callable[[datetime], Any]


def _direct_sql(*, postgres: bool, placeholder: Callable[[str], str], in_ids: str, in_hooks: str,
                ids: Callable[[list[int]], str], hooks: Callable[[Sequence[str]], Any],
                time: Callable[[datetime], Any]) -> _DirectSQL:
    def bind(sql: str) -> str:
        return re.sub(r"(?<!:):(\w+)", lambda m: placeholder(m.group(1)), sql)  # not a ::cast

    # Each page row with whether it is its entity's first unfinished job: one index probe of
    # (entity_key, id) per row, whatever the statistics say. (A join with the page's entities grouped
    # was planned, from the statistics of an emptied queue, as a nested loop that grouped them again for
    # every row: ~1 s for a page of 4,096 over a backlog blocked behind its first jobs; review.)
    def page(of_hooks: str) -> str:
        sql = ("WITH page AS (SELECT j.id, j.entity_key FROM hook_jobs j "  # noqa: S608
               f"WHERE {_DUE}{of_hooks} AND j.id > :after ORDER BY j.id LIMIT :page) "
               "SELECT p.id, p.entity_key, p.id = (SELECT f.id FROM hook_jobs f WHERE f.entity_key = p.entity_key "
               "AND f.status <> 'dead' ORDER BY f.id LIMIT 1) FROM page p ORDER BY p.id")
        # PostgreSQL: the page first, then one probe for each of its rows (not for every due row)
        return bind(sql.replace("WITH page AS (", "WITH page AS MATERIALIZED (") if postgres else sql)

    lock = " FOR UPDATE OF j SKIP LOCKED" if postgres else ""  # SQLite: the writer lock serialises claims
    return _DirectSQL(
        dead=bind("UPDATE hook_jobs SET status = 'dead', lease_until = NULL, claim_token = NULL, "  # noqa: S608
                  "last_error = 'lease expired after ' || attempts || ' ' || :error WHERE id IN (SELECT j.id "
                  "FROM hook_jobs j WHERE j.status = 'running' AND j.lease_until < :now "
                  f"AND j.attempts >= :max_attempts{' FOR UPDATE SKIP LOCKED' if lock else ''}) RETURNING id, hook"),
        page=page(""), page_of_hooks=page(f" AND j.hook {in_hooks}"),
        take=bind("UPDATE hook_jobs SET status = 'running', lease_until = :lease_until, "  # noqa: S608
                  "claim_token = :token, attempts = attempts + 1 WHERE id IN (SELECT j.id FROM hook_jobs j "
                  f"WHERE j.id {in_ids} AND {_STILL_DUE}{lock}) "
                  f"RETURNING id, hook, {_PG_PAYLOAD_TEXT if postgres else 'payload'}, attempts"),
        finish=bind(f"DELETE FROM hook_jobs WHERE claim_token = :token AND id {in_ids} RETURNING id"),  # noqa: S608
        ids=ids, hooks=hooks, time=time)


_DIRECT: dict[str, _DirectSQL] = {
    "psycopg": _direct_sql(postgres=True, placeholder=lambda name: f"%({name})s", in_ids="= ANY(:ids::bigint[])",
                           in_hooks="= ANY(:hooks::text[])", ids=lambda ids: "{" + ",".join(map(str, ids)) + "}",
                           hooks=list, time=aware),  # (a naive time is UTC: PostgreSQL reads it in its TimeZone)
    # sqlite3 takes :name itself; SQLAlchemy's own timestamp text, so comparisons match what it wrote
    "sqlite": _direct_sql(postgres=False, placeholder=lambda name: f":{name}",
                          in_ids="IN (SELECT value FROM json_each(:ids))",
                          in_hooks="IN (SELECT value FROM json_each(:hooks))",
                          ids=lambda ids: "[" + ",".join(map(str, ids)) + "]",
                          hooks=lambda names: json.dumps(list(names)), time=sqlite_time),
}


def _direct(conn: Connection) -> _DirectSQL | None:
    """The :data:`_DIRECT` statements that serve ``conn``: psycopg, or SQLite without a JSON deserializer
    of the engine's own (that one only SQLAlchemy applies); None: SQLAlchemy's statements."""
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        return _DIRECT["psycopg"]
    return _DIRECT["sqlite"] if direct_sqlite(conn.dialect) else None


@functools.cache
def _dead_sql(postgres: bool) -> sa.TextClause:
    lock = " FOR UPDATE SKIP LOCKED" if postgres else ""
    return sa.text(
        "UPDATE hook_jobs SET status = 'dead', lease_until = NULL, claim_token = NULL, "  # noqa: S608
        "last_error = 'lease expired after ' || attempts || ' ' || :error "
        "WHERE id IN (SELECT j.id FROM hook_jobs j WHERE j.status = 'running' AND j.lease_until < :now "
        f"AND j.attempts >= :max_attempts{lock}) RETURNING id, hook"
    ).bindparams(sa.bindparam("now", type_=hook_jobs.c.created_at.type))


@functools.cache
def _due_sql(postgres: bool, of_hooks: bool) -> sa.TextClause:
    """A page of due jobs after id ``:after``, oldest first: their ids and entities (``of_hooks``: of the
    hooks in ``:hooks`` only)."""
    hooks = (" AND j.hook = ANY(:hooks)" if postgres else " AND j.hook IN :hooks") if of_hooks else ""
    stmt = sa.text(
        f"SELECT j.id, j.entity_key FROM hook_jobs j WHERE {_DUE}{hooks} AND j.id > :after "  # noqa: S608
        "ORDER BY j.id LIMIT :page"
    ).bindparams(sa.bindparam("now", type_=hook_jobs.c.created_at.type))
    if not of_hooks:
        return stmt
    return stmt.bindparams(sa.bindparam("hooks", type_=postgresql.ARRAY(sa.String)) if postgres
                           else sa.bindparam("hooks", expanding=True))


@functools.cache
def _first_sql(postgres: bool) -> sa.TextClause:
    """The first unfinished (pending or running) job of each entity in ``:keys``; "<> 'dead'" is what no
    index serves, so the (entity_key, id) index is the one used."""
    keys = "entity_key = ANY(:keys)" if postgres else "entity_key IN :keys"
    stmt = sa.text(
        f"SELECT entity_key, min(id) FROM hook_jobs WHERE {keys} AND status <> 'dead' GROUP BY entity_key"  # noqa: S608
    )
    if postgres:
        return stmt.bindparams(sa.bindparam("keys", type_=postgresql.ARRAY(sa.String)))
    return stmt.bindparams(sa.bindparam("keys", expanding=True))


@functools.cache
def _take_sql(postgres: bool) -> sa.TextualSelect:
    """Lease the chosen jobs that are still due. PostgreSQL: a row another dispatcher is claiming is
    skipped, never waited for (SKIP LOCKED); once it committed, the row is no longer due."""
    ids, lock = ("j.id = ANY(:ids)", " FOR UPDATE OF j SKIP LOCKED") if postgres else ("j.id IN :ids", "")
    stmt = sa.text(
        "UPDATE hook_jobs SET status = 'running', lease_until = :lease_until, claim_token = :token, "  # noqa: S608
        f"attempts = attempts + 1 WHERE id IN (SELECT j.id FROM hook_jobs j WHERE {ids} AND {_STILL_DUE}{lock}) "
        f"RETURNING id, hook, {_PG_PAYLOAD_TEXT if postgres else 'payload'}, attempts"
    ).bindparams(sa.bindparam("now", type_=hook_jobs.c.created_at.type),
                 sa.bindparam("lease_until", type_=hook_jobs.c.created_at.type),
                 sa.bindparam("ids", type_=postgresql.ARRAY(sa.BigInteger)) if postgres
                 else sa.bindparam("ids", expanding=True))
    return stmt.columns(hook_jobs.c.id, hook_jobs.c.hook, sa.column("payload", sa.Text), hook_jobs.c.attempts)


@functools.cache
def _finish_sql(postgres: bool) -> sa.TextClause:
    if postgres:
        return sa.text("DELETE FROM hook_jobs WHERE claim_token = :token AND id = ANY(:ids) RETURNING id").bindparams(
            sa.bindparam("ids", type_=postgresql.ARRAY(sa.BigInteger)))
    return sa.text("DELETE FROM hook_jobs WHERE claim_token = :token AND id IN :ids RETURNING id").bindparams(
        sa.bindparam("ids", expanding=True))


_TYPE_CHARS = 64  # hook_jobs.type
_KEY_CHARS = 200  # hook_jobs.entity_key and idempotency_key


def _bounded(text: str, limit: int) -> str:
    """``text`` if it fits a column of ``limit`` characters, else its head and a digest of the whole (distinct
    texts stay distinct: 128 bits)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 33]}~{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def _entity_key(hook: str, change: Change) -> str:
    return f"{hook}|{change.entity.value}:{change.clerk_id}"


@functools.cache
def _sqlite_before(entity: Entity) -> tuple[str, list[Callable[[Any], Any] | None]]:
    """:func:`_before_sql` for :func:`sqlite_execute`, and the conversions of its columns."""
    table, names = _TABLES[entity], FIELDS[entity]
    sql = f"SELECT {', '.join(names)} FROM {table.name} WHERE clerk_id = ? AND deleted_at IS NULL"  # noqa: S608
    return sql, processors([table.c[n].type for n in names], sqlite.dialect(), result=True)


_SQLITE_JOB_SQL = (  # _job_sql(False) for sqlite_execute
    "INSERT INTO hook_jobs (hook, type, entity_key, idempotency_key, payload, status, attempts, available_at, "
    "created_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?)"
)


@functools.cache
def jobs_cte_sql(hooks: tuple[HookSpec, ...]) -> str:
    """The hook jobs of an applied upsert as two CTEs (psycopg SQL) that follow ``before`` (the live row as
    one jsonb ``prev``, absent: none) and ``up`` (a row when the upsert applied) in the delivery's statement.

    ``chg`` is :func:`~clerk_sync.changes.describe` in SQL: created when there was no live row, else
    updated with ``previous`` the old value of every column the write changed (bookkeeping excluded; no
    change, no job); ``jobs`` inserts one row per hook of ``hooks`` (:meth:`Outbox.upsert_hooks`) that wants
    it. No second round trip for the row before, no Python per change. Parameters: :meth:`Outbox.jobs_params`.

    The hooks are constants of the statement (quoted by psycopg), not parameters: the statement is prepared
    once per connection, while two lists per hook and delivery cost psycopg ~10 µs of Python to adapt."""
    rows, kind_previous = _hooks_values(hooks), _kind_previous("v.doc")
    return (
        f"chg AS (SELECT {kind_previous}, v.doc "  # noqa: S608
        "FROM up CROSS JOIN (SELECT %s::jsonb AS doc) AS v LEFT JOIN before AS b ON true), "
        f"{_JOBS_INSERT} SELECT h.name, %s::text || c.kind, h.name || %s::text, "
        "%s::text || c.kind || %s::text, jsonb_build_object('entity', %s::text, 'clerk_id', %s::text, "
        "'kind', c.kind, 'version', %s::bigint, 'values', c.doc, 'previous', c.previous), 'pending', 0, %s, %s "
        f"FROM chg AS c CROSS JOIN (VALUES {rows}) AS h(n, name, kinds, fields) {_WANTED} ORDER BY h.n)"
    )


def jobs_wave_sql(hooks: tuple[HookSpec, ...]) -> str:
    """:func:`jobs_cte_sql` for a wave of upserts (``store._wave_sql``): ``before`` holds one ``prev`` per
    Clerk id (``k_``), the wave's rows ``v`` carry each change's values (``doc_``) and version
    (``version_``). Parameters: the change type's prefix (``user.``), the entity (``user``), now, now."""
    rows, kind_previous = _hooks_values(hooks), _kind_previous("v.doc_")
    return (
        f"chg AS (SELECT v.o, v.clerk_id, v.version_, {kind_previous}, v.doc_ AS doc "  # noqa: S608
        "FROM up JOIN v ON v.clerk_id = up.clerk_id LEFT JOIN before AS b ON b.k_ = v.clerk_id), "
        "pre AS (SELECT %s::text AS prefix, %s::text AS entity), "
        f"{_JOBS_INSERT} SELECT h.name, p.prefix || c.kind, h.name || '|' || p.entity || ':' || c.clerk_id, "
        "p.prefix || c.kind || ':' || c.clerk_id || ':' || c.version_, jsonb_build_object('entity', p.entity, "
        "'clerk_id', c.clerk_id, 'kind', c.kind, 'version', c.version_, 'values', c.doc, 'previous', c.previous), "
        "'pending', 0, %s, %s "
        f"FROM chg AS c CROSS JOIN pre AS p CROSS JOIN (VALUES {rows}) AS h(n, name, kinds, fields) {_WANTED} "
        "ORDER BY c.o, h.n)"
    )


_JOBS_INSERT = ("jobs AS (INSERT INTO hook_jobs (hook, type, entity_key, idempotency_key, payload, status, attempts, "
                "available_at, created_at)")
# Hook.wants in SQL: created, or updated with a change; of a kind the hook takes; touching a field it names
_WANTED = ("WHERE (c.kind = 'created' OR c.previous <> '{}'::jsonb) AND c.kind = ANY(h.kinds) "
           "AND (c.kind <> 'updated' OR cardinality(h.fields) = 0 OR c.previous ?| h.fields)")


def _hooks_values(hooks: tuple[HookSpec, ...]) -> str:
    """The hooks as the rows of a ``VALUES`` list: (n, name, kinds, fields)."""
    return ", ".join(f"({n}, {_literal(name)}, {_literal(list(kinds))}::text[], {_literal(list(fields))}::text[])"
                     for n, (name, kinds, fields) in enumerate(hooks))


def _kind_previous(doc: str) -> str:
    """``kind`` and ``previous`` of a change whose values are ``doc`` (jsonb), from the row before ``b.prev``."""
    bookkeeping = "".join(f" AND o.key <> '{name}'" for name in sorted(BOOKKEEPING))
    return ("CASE WHEN b.prev IS NULL THEN 'created' ELSE 'updated' END AS kind, "  # noqa: S608 (constants)
            "CASE WHEN b.prev IS NULL THEN '{}'::jsonb ELSE COALESCE((SELECT jsonb_object_agg(o.key, o.value) "
            f"FROM jsonb_each(b.prev) AS o WHERE {doc} ? o.key{bookkeeping} "
            f"AND ({doc} -> o.key) IS DISTINCT FROM o.value), '{{}}'::jsonb) END AS previous")


def _literal(value: str | list[str]) -> str:
    """``value`` quoted for the statement's text, its ``%`` doubled: the statement also has parameters."""
    from psycopg import sql  # the postgres extra; only reached when writing through psycopg

    return sql.Literal(value).as_string(None).replace("%", "%%")


def _set(conn: Connection, job_id: int, **values: Any) -> None:
    conn.execute(sa.update(hook_jobs).where(hook_jobs.c.id == job_id).values(**values))
