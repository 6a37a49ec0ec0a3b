"""The hooks outbox in the database: jobs written in the apply's transaction, claimed by dispatchers.

:class:`Outbox` is the write side, used by :class:`~clerk_sync.store.Writer` when the store has
hooks: it reads the row before the write, and after an applied write inserts one ``hook_jobs`` row
per hook that wants the change (so each hook retries on its own). The claim side (:func:`claim`,
:func:`finish`, :func:`fail`) serves :class:`~clerk_sync.hooks.Dispatcher`:

- a job is claimable when it is ``pending`` and due, or ``running`` with an expired lease (its worker
  died), and no earlier job with the same ``entity_key`` (hook + entity) is unfinished: order per entity;
- on PostgreSQL the claim is ``SELECT .. FOR UPDATE SKIP LOCKED`` then a lease with a fresh token, so
  replicas never run a job concurrently (within the lease); on SQLite the writer lock serialises claims;
- a finished job is deleted; one that failed ``max_attempts`` times stays as ``dead`` for the CLI.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from clerk_sync.changes import Change, Hook
from clerk_sync.engine import Entity
from clerk_sync.events import MembershipRecord, OrganizationRecord, UserRecord
from clerk_sync.mapping import SchemaMapping
from clerk_sync.tables import hook_jobs, organization_memberships, organizations, users

__all__ = ["Job", "Outbox", "claim", "delete_jobs", "fail", "finish", "list_jobs", "redact_jobs", "release",
           "retry_jobs"]

JSON = dict[str, Any]
_TABLES: dict[Entity, sa.Table] = {
    Entity.USER: users,
    Entity.ORGANIZATION: organizations,
    Entity.MEMBERSHIP: organization_memberships,
}
FIELDS: dict[Entity, list[str]] = {
    Entity.USER: [f.name for f in fields(UserRecord)],
    Entity.ORGANIZATION: [f.name for f in fields(OrganizationRecord)],
    Entity.MEMBERSHIP: [f.name for f in fields(MembershipRecord)],
}


class Outbox:
    """Where the applied changes of one unit of work go: the app's mapped tables (projected at once,
    :mod:`clerk_sync.mapping`) and the hook jobs. ``changes`` lists what it recorded, in order."""

    def __init__(self, conn: Connection, now: datetime, hooks: Sequence[Hook],
                 mapping: SchemaMapping | None = None) -> None:
        self.conn = conn
        self.now = now
        self.hooks = hooks
        self.mapping = mapping
        self.changes: list[Change] = []

    def before(self, entity: Entity, clerk_id: str) -> JSON | None:
        """The live row's Clerk fields, or None (absent or deleted). Read under the writer's lock."""
        row = self.conn.execute(_before_sql(entity), {"clerk_id": clerk_id}).first()
        return None if row is None else dict(row._mapping)

    def record(self, change: Change | None) -> None:
        """Queue ``change`` for every hook that wants it (nothing when it is None: no change)."""
        if change is None:
            return
        self.changes.append(change)
        if self.mapping is not None:
            self.mapping.project(self.conn, self.now, change)
        names = [hook.name for hook in self.hooks if hook.wants(change)]
        if names:
            payload = json.dumps(change.to_json())
            pg = self.conn.dialect.name == "postgresql"  # JSONB: the payload is cast there
            self.conn.execute(_job_sql(pg), [self._job(name, change, payload) for name in names])

    def _job(self, hook: str, change: Change, payload: str) -> JSON:
        return {"hook": hook, "type": change.type, "entity_key": f"{hook}|{change.entity.value}:{change.clerk_id}",
                "idempotency_key": change.idempotency_key, "payload": payload, "now": self.now}


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed (or listed) job; ``token`` proves the claim when finishing it."""

    id: int
    hook: str
    change: Change
    attempts: int
    token: str | None
    status: str = "running"
    last_error: str | None = None


def claim(conn: Connection, now: datetime, *, lease: timedelta, limit: int, max_attempts: int) -> list[Job]:
    """Lease up to ``limit`` claimable jobs (at most one per entity_key), oldest first.

    A job whose lease expired after ``max_attempts`` claims is marked dead instead (its worker keeps
    dying, or the handler outlives the lease). Run inside the caller's transaction.
    """
    j, earlier = hook_jobs, hook_jobs.alias("earlier")
    due = sa.or_(sa.and_(j.c.status == "pending", j.c.available_at <= now),
                 sa.and_(j.c.status == "running", j.c.lease_until < now))
    blocked = sa.exists().where(earlier.c.entity_key == j.c.entity_key, earlier.c.id < j.c.id,
                                earlier.c.status.in_(("pending", "running")))
    query = sa.select(j.c.id, j.c.hook, j.c.payload, j.c.attempts).where(due, ~blocked).order_by(j.c.id).limit(limit)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=j)
    elif conn.dialect.name in ("mysql", "mariadb"):  # MariaDB has SKIP LOCKED but no FOR UPDATE OF
        query = query.with_for_update(skip_locked=True)
    jobs: list[Job] = []
    for row in conn.execute(query).all():
        if row.attempts >= max_attempts:
            error = f"lease expired after {row.attempts} attempts (worker killed, or handler slower than the lease)"
            _set(conn, row.id, status="dead", lease_until=None, claim_token=None, last_error=error)
            continue
        token = str(uuid.uuid4())
        _set(conn, row.id, status="running", lease_until=now + lease, claim_token=token, attempts=row.attempts + 1)
        jobs.append(Job(row.id, row.hook, Change.from_json(row.payload), row.attempts + 1, token))
    return jobs


def finish(conn: Connection, job: Job) -> bool:
    """Delete a job that ran; False if the claim was lost (its lease expired and another worker took it)."""
    result = conn.execute(sa.delete(hook_jobs).where(hook_jobs.c.id == job.id, hook_jobs.c.claim_token == job.token))
    return result.rowcount == 1


def fail(conn: Connection, job: Job, error: str, retry_at: datetime | None) -> bool:
    """Record a failed attempt: pending again at ``retry_at``, or dead when it is None."""
    values: JSON = {"status": "pending" if retry_at else "dead", "last_error": error[:2000],
                    "lease_until": None, "claim_token": None}
    if retry_at is not None:
        values["available_at"] = retry_at
    stmt = sa.update(hook_jobs).where(hook_jobs.c.id == job.id, hook_jobs.c.claim_token == job.token)
    return conn.execute(stmt.values(**values)).rowcount == 1


def release(conn: Connection, jobs: Sequence[Job]) -> None:
    """Give claimed jobs back unrun (due now, the claim's attempt not counted)."""
    for job in jobs:
        stmt = sa.update(hook_jobs).where(hook_jobs.c.id == job.id, hook_jobs.c.claim_token == job.token)
        conn.execute(stmt.values(status="pending", lease_until=None, claim_token=None, attempts=job.attempts - 1))


def list_jobs(conn: Connection, *, status: str | None = "dead", limit: int = 100) -> list[Job]:
    query = sa.select(hook_jobs).order_by(hook_jobs.c.id).limit(limit)
    if status is not None:
        query = query.where(hook_jobs.c.status == status)
    return [Job(r.id, r.hook, Change.from_json(r.payload), r.attempts, None, r.status, r.last_error)
            for r in conn.execute(query)]


def retry_jobs(conn: Connection, now: datetime, ids: Sequence[int] | None = None) -> int:
    """Dead jobs (all, or these ids) back to pending with a fresh attempt budget."""
    stmt = sa.update(hook_jobs).where(hook_jobs.c.status == "dead")
    if ids is not None:
        stmt = stmt.where(hook_jobs.c.id.in_(ids))
    return conn.execute(stmt.values(status="pending", attempts=0, available_at=now)).rowcount


def delete_jobs(conn: Connection, ids: Sequence[int] | None = None) -> int:
    """Purge dead jobs (all, or these ids); pending and running jobs are never purged."""
    stmt = sa.delete(hook_jobs).where(hook_jobs.c.status == "dead")
    if ids is not None:
        stmt = stmt.where(hook_jobs.c.id.in_(ids))
    return conn.execute(stmt).rowcount


def redact_jobs(conn: Connection, needles: set[str]) -> int:
    """Erasure: queued jobs whose change mentions one of ``needles`` keep only the ids (entity, Clerk id,
    kind, version); the handler still learns of the change, not the person. Returns how many."""
    j = hook_jobs
    text = sa.cast(j.c.payload, sa.Text)
    rows = conn.execute(sa.select(j.c.id, j.c.payload).where(
        sa.or_(*(text.contains(n, autoescape=True) for n in needles)))).all()
    for row in rows:
        payload = row.payload if isinstance(row.payload, dict) else json.loads(row.payload)
        kept = {k: payload[k] for k in ("entity", "clerk_id", "kind", "version") if k in payload}
        conn.execute(sa.update(j).where(j.c.id == row.id).values(payload=kept | {"values": {}, "previous": {}}))
    return len(rows)


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


def _set(conn: Connection, job_id: int, **values: Any) -> None:
    conn.execute(sa.update(hook_jobs).where(hook_jobs.c.id == job_id).values(**values))
