"""Event histories for the convergence, concurrency and crash tests, and the pure model they must match.

A history is what Clerk would emit for a handful of users, organizations and memberships: each entity
is created, updated with strictly increasing ``updated_at``, and maybe deleted at the end of its life,
all on one global clock. Memberships may come before their user or organization exists, and may keep
changing after either is deleted. The *model* replays the in-order history through ``engine.plan`` and
``engine.decide`` (plus the membership cascade), with no database.

Ids are rendered inside a namespace (``ns``) so several histories can share one database.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from clerk_sync.engine import Action, Entity, Record, RowState, Tombstone, Upsert, decide, plan
from clerk_sync.events import MembershipRecord, OrganizationRecord, UserRecord, parse_envelope, record_columns
from clerk_sync.tables import organization_memberships, organizations, users, webhook_events
from tests.factories import body_of, deleted, envelope, membership, organization, user

BASE_MS = 1_700_000_000_000
TERMINAL_STATUSES = frozenset({"applied", "skipped", "ignored", "failed"})

_KIND = {Entity.USER: "user", Entity.ORGANIZATION: "organization", Entity.MEMBERSHIP: "organizationMembership"}
_DELETED_OBJECT = {Entity.USER: "user", Entity.ORGANIZATION: "organization",
                   Entity.MEMBERSHIP: "organization_membership"}
_PREFIX = {Entity.USER: "user", Entity.ORGANIZATION: "org", Entity.MEMBERSHIP: "orgmem"}
_TABLES = {Entity.USER: users, Entity.ORGANIZATION: organizations, Entity.MEMBERSHIP: organization_memberships}
_MEMBER_ROLES = ("org:member", "org:admin", "admin", "basic_member")  # the last two are legacy names


@dataclass(frozen=True, slots=True)
class Spec:
    """One entity of a history; memberships name their (organization, user) local ids."""

    entity: Entity
    local_id: str
    org: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Ev:
    """One abstract event: ``op`` is created/updated/deleted, ``clock`` its ms timestamp."""

    spec: Spec
    op: str
    clock: int
    variant: int


Step = tuple[int, bool, int]  # (entity index, wants delete, data variant)
Final = dict[tuple[str, str], dict[str, Any] | None]  # (table, clerk_id) -> live columns, None = deleted


def specs(n_users: int, n_orgs: int, parents: Sequence[tuple[int, int]]) -> list[Spec]:
    """Users ``u0..``, organizations ``o0..`` and one membership per (org index, user index)."""
    out = [Spec(Entity.USER, f"u{i}") for i in range(n_users)]
    out += [Spec(Entity.ORGANIZATION, f"o{i}") for i in range(n_orgs)]
    out += [Spec(Entity.MEMBERSHIP, f"m{i}", org=f"o{o}", user=f"u{u}") for i, (o, u) in enumerate(parents)]
    return out


def build_history(entities: Sequence[Spec], steps: Iterable[Step]) -> list[Ev]:
    """Turn steps into a lifecycle per entity: first ``created``, then ``updated``, ``deleted`` ends it."""
    born: set[int] = set()
    dead: set[int] = set()
    history: list[Ev] = []
    for tick, (index, wants_delete, variant) in enumerate(steps, 1):
        if index in dead:
            continue
        if index not in born:
            op = "created"
            born.add(index)
        elif wants_delete:
            op = "deleted"
            dead.add(index)
        else:
            op = "updated"
        history.append(Ev(entities[index], op, BASE_MS + tick * 1000, variant))
    return history


def random_history(rng: random.Random, *, n_users: int, n_orgs: int, n_memberships: int,
                   n_steps: int, p_delete: float = 0.12) -> list[Ev]:
    """A seeded history; every entity is created at least once."""
    parents = [(rng.randrange(n_orgs), rng.randrange(n_users)) for _ in range(n_memberships)]
    entities = specs(n_users, n_orgs, parents)
    indexes = list(range(len(entities))) + [rng.randrange(len(entities)) for _ in range(n_steps - len(entities))]
    rng.shuffle(indexes)
    return build_history(entities, [(i, rng.random() < p_delete, rng.randrange(4)) for i in indexes])


def clerk_id(entity: Entity, local_id: str, ns: str) -> str:
    return f"{_PREFIX[entity]}_{ns}_{local_id}"


def render(ev: Ev, ns: str) -> dict[str, Any]:
    """The Clerk event envelope for ``ev`` with ids in namespace ``ns``."""
    spec, v = ev.spec, ev.variant
    cid = clerk_id(spec.entity, spec.local_id, ns)
    etype = f"{_KIND[spec.entity]}.{ev.op}"
    if ev.op == "deleted":
        return envelope(etype, deleted(_DELETED_OBJECT[spec.entity], cid), ev.clock)
    if spec.entity is Entity.USER:
        data = user(cid, ev.clock, email=f"{cid}.{v}@example.com", first_name=f"n{v}",
                    role=(None, "admin", "member", None)[v], banned=v == 3)
    elif spec.entity is Entity.ORGANIZATION:
        data = organization(cid, ev.clock, name=f"Org{v}")
    else:
        assert spec.org is not None
        assert spec.user is not None
        data = membership(cid, clerk_id(Entity.ORGANIZATION, spec.org, ns),
                          clerk_id(Entity.USER, spec.user, ns), ev.clock, role=_MEMBER_ROLES[v])
    # The envelope timestamp trails the object's updated_at a little, as Clerk's does.
    return envelope(etype, data, ev.clock + 7)


def bodies(history: Sequence[Ev], ns: str) -> list[bytes]:
    return [body_of(render(ev, ns)) for ev in history]


# -- the pure model ------------------------------------------------------------------------------

@dataclass(slots=True)
class _Row:
    state: RowState
    record: Record | None  # None for a tombstone that never saw an upsert


def model(event_bodies: Iterable[bytes]) -> Final:
    """Replay deliveries in order through ``plan`` + ``decide`` and the membership cascade."""
    rows: dict[tuple[Entity, str], _Row] = {}

    def is_deleted(entity: Entity, cid: str) -> bool:
        row = rows.get((entity, cid))
        return row is not None and row.state.deleted

    for body in event_bodies:
        intent = plan(parse_envelope(body))
        if not isinstance(intent, Upsert | Tombstone):
            continue
        key = (intent.entity, intent.clerk_id)
        current = rows.get(key)
        action = decide(current.state if current else None, intent)
        if action in (Action.INSERT, Action.UPDATE):
            assert isinstance(intent, Upsert)
            rows[key] = _Row(RowState(intent.version, deleted=False), intent.record)
        elif action is Action.DELETE:
            version = max(intent.version, current.state.version if current else 0)
            rows[key] = _Row(RowState(version, deleted=True), current.record if current else None)
        # The cascade: a membership is deleted once its user or organization is.
        if isinstance(intent, Upsert) and isinstance(intent.record, MembershipRecord):
            row = rows[key]
            rec = intent.record
            if not row.state.deleted and (is_deleted(Entity.USER, rec.user_clerk_id)
                                          or is_deleted(Entity.ORGANIZATION, rec.organization_clerk_id)):
                row.state = RowState(row.state.version, deleted=True)
        if isinstance(intent, Tombstone) and intent.entity is not Entity.MEMBERSHIP:
            for row in rows.values():
                if isinstance(row.record, MembershipRecord) and not row.state.deleted:
                    parent = (row.record.user_clerk_id if intent.entity is Entity.USER
                              else row.record.organization_clerk_id)
                    if parent == intent.clerk_id:
                        row.state = RowState(row.state.version, deleted=True)
    return {
        (entity.value, cid): None if row.state.deleted or row.record is None else _mirrored(row.record)
        for (entity, cid), row in rows.items()
    }


def _mirrored(record: Record) -> dict[str, Any]:
    """The record's values the contract table holds (a user's external_id is carried, not mirrored)."""
    columns = set(record_columns(type(record)))
    return {k: v for k, v in asdict(record).items() if k in columns}


# -- reading what the database holds --------------------------------------------------------------

def _record_columns(entity: Entity) -> list[str]:
    record = {Entity.USER: UserRecord, Entity.ORGANIZATION: OrganizationRecord,
              Entity.MEMBERSHIP: MembershipRecord}[entity]
    return record_columns(record)


def db_rows(conn: sa.Connection, ns: str) -> Final:
    """The mirrored rows of namespace ``ns``: Clerk-derived columns for live rows, None for deleted."""
    out: Final = {}
    for entity, table in _TABLES.items():
        columns = _record_columns(entity)
        query = sa.select(table.c.deleted_at, *(table.c[c] for c in columns)).where(
            table.c.clerk_id.like(f"%\\_{ns}\\_%", escape="\\")
        )
        for row in conn.execute(query).mappings():
            values = {c: row[c] for c in columns}
            out[(entity.value, values["clerk_id"])] = None if row["deleted_at"] is not None else values
    return out


def inbox(conn: sa.Connection, prefix: str) -> dict[str, list[str]]:
    """svix_id -> statuses of its inbox rows, for svix ids starting with ``prefix``."""
    query = sa.select(webhook_events.c.svix_id, webhook_events.c.status).where(
        webhook_events.c.svix_id.like(f"{prefix}%")
    )
    out: dict[str, list[str]] = {}
    for svix_id, status in conn.execute(query):
        out.setdefault(svix_id, []).append(status)
    return out


def normalize(rows: Mapping[tuple[str, str], Any], ns: str) -> Any:
    """Replace the namespace in every string so rows of two namespaces can be compared."""

    def strip(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(ns, "NS")
        if isinstance(value, dict):
            return {strip(k): strip(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(strip(v) for v in value)
        return value

    return {strip(k): strip(v) for k, v in rows.items()}
