"""Pure sync decisions: what an event means for our tables (no I/O, easy to table-test).

``plan(envelope)`` turns an event into one write *intent*. ``decide(current, intent)`` states the
ordering rules the store enforces in SQL: a newer Clerk ``updated_at`` wins, a tombstone is terminal,
and a membership whose user or organization is deleted is deleted too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeGuard

from clerk_sync._limits import CLERK_ID_CHARS, fit_clerk_id, fit_ms, fit_reason, fit_text, show
from clerk_sync.errors import EventShapeError
from clerk_sync.events import (
    MS_THRESHOLD,
    VERSION_AHEAD_MS,
    Envelope,
    MembershipRecord,
    OrganizationRecord,
    UserRecord,
    membership_record,
    organization_record,
    user_record,
)

__all__ = [
    "HANDLED_EVENT_TYPES",
    "Action",
    "DeliveryPlan",
    "DeliveryStatus",
    "Entity",
    "Ignore",
    "Intent",
    "Record",
    "RevokeSession",
    "RowState",
    "Tombstone",
    "Upsert",
    "decide",
    "delivery_reason",
    "membership_parents",
    "membership_to_repair",
    "person_named",
    "plan",
    "plan_delivery",
    "touches",
    "user_named",
]

Record = UserRecord | OrganizationRecord | MembershipRecord


class Entity(StrEnum):
    """The mirrored tables; the value is the table name."""

    USER = "users"
    ORGANIZATION = "organizations"
    MEMBERSHIP = "organization_memberships"


@dataclass(frozen=True, slots=True)
class Upsert:
    """Insert or replace the row if ``record.clerk_updated_at`` is newer and the row is not deleted."""

    entity: Entity
    record: Record
    notes: tuple[str, ...] = ()  # values dropped from the record because no column could hold them

    @property
    def clerk_id(self) -> str:
        return self.record.clerk_id

    @property
    def version(self) -> int:
        return self.record.clerk_updated_at


@dataclass(frozen=True, slots=True)
class Tombstone:
    """Soft-delete the row (creating a tombstone if we never saw it) so nothing can resurrect it."""

    entity: Entity
    clerk_id: str
    version: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RevokeSession:
    """Add a session to the deny list checked on every authenticated request."""

    session_id: str
    user_id: str | None
    reason: str
    expire_at: int | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ignore:
    """An event type we record and acknowledge but do not mirror."""

    reason: str


Intent = Upsert | Tombstone | RevokeSession | Ignore


class Action(StrEnum):
    """What applying an intent to the current row does."""

    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    SKIP_STALE = "skip_stale"
    SKIP_DELETED = "skip_deleted"


@dataclass(frozen=True, slots=True)
class RowState:
    """The two facts about a stored row that ordering depends on."""

    version: int
    deleted: bool


class _Builder(Protocol):
    def __call__(self, data: dict[str, Any], notes: list[str], *, event_ms: int | None) -> Record: ...


def _upsert(entity: Entity, build: _Builder) -> Callable[[Envelope], Intent]:
    def plan_upsert(env: Envelope) -> Intent:
        notes: list[str] = []
        record = build(env.data, notes, event_ms=env.timestamp_ms)
        return Upsert(entity, record, tuple(notes))

    return plan_upsert


def _tombstone(entity: Entity) -> Callable[[Envelope], Intent]:
    def plan_delete(env: Envelope) -> Intent:
        clerk_id = fit_clerk_id(env.data.get("id"), f"{env.type} data.id")
        # Deleted objects carry no updated_at: the envelope timestamp is the version (an updated_at a year
        # ahead of it is not Clerk's: see events.VERSION_AHEAD_MS).
        updated = fit_ms(env.data.get("updated_at")) or 0
        version = max(env.timestamp_ms, updated if updated <= env.timestamp_ms + VERSION_AHEAD_MS else 0)
        return Tombstone(entity, clerk_id, version)

    return plan_delete


_SECONDS_SINCE_2001 = 1_000_000_000  # a number of seconds this large is a time Clerk could have written


def _revoke(env: Envelope) -> Intent:
    # Only the session id is essential: the deny list is keyed by it. A user id or expiry that no
    # column can hold is dropped (and noted) rather than holding the revocation back.
    notes: list[str] = []
    session_id = fit_clerk_id(env.data.get("id"), f"{env.type} data.id")
    user_id = fit_text(env.data.get("user_id"), "data.user_id", CLERK_ID_CHARS, notes)
    raw_expiry = env.data.get("expire_at")
    expire_at = fit_ms(raw_expiry)
    if raw_expiry is not None and expire_at is None:
        notes.append(f"data.expire_at dropped: not a millisecond timestamp in range ({show(raw_expiry)})")
    elif expire_at is not None and expire_at < MS_THRESHOLD:
        # 0, or seconds (1970 read as ms): the deny list would take the session for long expired and never
        # load the revocation (fail open); seconds are read as seconds, anything else is kept (no expiry)
        as_seconds = fit_ms(expire_at * 1000) if expire_at >= _SECONDS_SINCE_2001 else None
        notes.append(f"data.expire_at {expire_at} is not a millisecond timestamp: "
                     + ("read as seconds" if as_seconds is not None else "dropped (the revocation is kept)"))
        expire_at = as_seconds
    reason = env.type.removeprefix("session.")
    return RevokeSession(session_id, user_id or None, reason, expire_at, tuple(notes))


_PLANNERS: dict[str, Callable[[Envelope], Intent]] = {
    "user.created": _upsert(Entity.USER, user_record),
    "user.updated": _upsert(Entity.USER, user_record),
    "user.deleted": _tombstone(Entity.USER),
    "organization.created": _upsert(Entity.ORGANIZATION, organization_record),
    "organization.updated": _upsert(Entity.ORGANIZATION, organization_record),
    "organization.deleted": _tombstone(Entity.ORGANIZATION),
    "organizationMembership.created": _upsert(Entity.MEMBERSHIP, membership_record),
    "organizationMembership.updated": _upsert(Entity.MEMBERSHIP, membership_record),
    "organizationMembership.deleted": _tombstone(Entity.MEMBERSHIP),
    "session.revoked": _revoke,
    "session.ended": _revoke,
    "session.removed": _revoke,
}

HANDLED_EVENT_TYPES = frozenset(_PLANNERS)


def plan(envelope: Envelope) -> Intent:
    """Map an event to one intent; raises :class:`EventShapeError` when a handled event lacks fields."""
    planner = _PLANNERS.get(envelope.type)
    if planner is None:
        return Ignore(f"event type {envelope.type!r} is not mirrored")
    return planner(envelope)


def decide(current: RowState | None, intent: Upsert | Tombstone) -> Action:
    """The ordering rule, stated once; ``store`` implements the same rule as guarded SQL."""
    if isinstance(intent, Tombstone):
        return Action.SKIP_DELETED if current is not None and current.deleted else Action.DELETE
    if current is None:
        return Action.INSERT
    if current.deleted:
        return Action.SKIP_DELETED
    return Action.UPDATE if intent.version > current.version else Action.SKIP_STALE


class DeliveryStatus(StrEnum):
    """The outcome of one delivery, as ``webhook_events.status`` stores it (and the service answers)."""

    APPLIED = "applied"  # its intent changed a row
    SKIPPED = "skipped"  # stale or a no-op: the guard kept the newer row
    IGNORED = "ignored"  # a type we do not mirror
    FAILED = "failed"  # verified but unusable: kept with its reason, replayable
    DUPLICATE = "duplicate"  # this svix-id was received before (never stored twice)


@dataclass(frozen=True, slots=True)
class DeliveryPlan:
    """What a delivery is expected to do: the status to store, the intent to apply, the reason to record."""

    status: DeliveryStatus
    intent: Upsert | Tombstone | RevokeSession | None
    reason: str | None

    def status_after(self, changed: bool) -> DeliveryStatus:
        """The final status once the intent ran: an upsert the guard refused is ``skipped``."""
        return self.status if changed else DeliveryStatus.SKIPPED


def plan_delivery(envelope: Envelope, *, stored_parents: tuple[str, str] | None = None) -> DeliveryPlan:
    """The status rule, in one place (live deliveries and ``replay`` both use it): a shape error is
    ``failed``, an unmirrored type ``ignored``, anything else ``applied`` unless the guard skips it.
    ``stored_parents``: see :func:`membership_to_repair`."""
    try:
        if stored_parents is not None and membership_to_repair(envelope) is not None:
            notes: list[str] = []
            record = membership_record(envelope.data, notes, stored=stored_parents, event_ms=envelope.timestamp_ms)
            intent: Intent = Upsert(Entity.MEMBERSHIP, record, tuple(notes))
        else:
            intent = plan(envelope)
    except EventShapeError as exc:
        return DeliveryPlan(DeliveryStatus.FAILED, None, delivery_reason(str(exc), envelope.notes))
    if isinstance(intent, Ignore):
        return DeliveryPlan(DeliveryStatus.IGNORED, None, delivery_reason(None, envelope.notes))
    return DeliveryPlan(DeliveryStatus.APPLIED, intent, delivery_reason(None, envelope.notes + intent.notes))


def membership_to_repair(envelope: Envelope) -> str | None:
    """The id of the membership a created/updated event is about, when that id is well-formed: if its
    organization or user id is not, the row stored here supplies them (``plan_delivery(stored_parents=...)``),
    so a role change is not held back by a malformed field beside it. None for any other event."""
    if envelope.type not in ("organizationMembership.created", "organizationMembership.updated"):
        return None
    try:
        return fit_clerk_id(envelope.data.get("id"), "organization membership object 'id'")
    except EventShapeError:
        return None


def touches(intent: Intent) -> frozenset[tuple[Entity, str]]:
    """The rows whose state decides what ``intent`` does: its own, and a membership's user and organization
    (whose deletion deletes it). A writer that reorders a batch applies a delivery after every earlier one
    that writes a row it touches."""
    if isinstance(intent, Upsert):
        record = intent.record
        if isinstance(record, MembershipRecord):
            return frozenset({(Entity.MEMBERSHIP, record.clerk_id), (Entity.USER, record.user_clerk_id),
                              (Entity.ORGANIZATION, record.organization_clerk_id)})
        return frozenset({(intent.entity, record.clerk_id)})
    if isinstance(intent, Tombstone):
        return frozenset({(intent.entity, intent.clerk_id)})
    return frozenset()


def delivery_reason(error: str | None, notes: tuple[str, ...]) -> str | None:
    """``last_error``: why it failed, then what was cleaned or dropped (so operators see it)."""
    if not notes:
        return error
    cleaned = "cleaned: " + "; ".join(notes)
    text = f"{error}; {cleaned}" if error else cleaned
    return fit_reason(text)


# -- whom a delivery names (the inbox redacts a payload once that user is gone: ingest, retention) ------
_OWN_ROWS = ("user.", "organization.", "organizationMembership.")  # the row events: their own ids


def membership_parents(data: Mapping[str, object]) -> list[tuple[Entity, str]]:
    """The user and organization a membership event names (``public_user_data.user_id``, ``organization.id``),
    read leniently: a deletion's payload is not checked beyond its own id."""
    found: list[tuple[Entity, str]] = []
    for entity, key, field in ((Entity.USER, "public_user_data", "user_id"),
                               (Entity.ORGANIZATION, "organization", "id")):
        inner = data.get(key)
        value = inner.get(field) if isinstance(inner, dict) else None
        if isinstance(value, str) and value:
            found.append((entity, value))
    return found


def person_named(envelope: Envelope) -> str | None:
    """The user an event that is not about a user, organization or membership row names: ``data.user_id``
    (sessions, ``email.created``, ``sms.created``, an accepted invitation) or ``data.payer.user_id``
    (billing). None for the row events and for events that name nobody."""
    if envelope.type.startswith(_OWN_ROWS):
        return None
    data = envelope.data
    payer = data.get("payer")
    person = data.get("user_id") or (payer.get("user_id") if isinstance(payer, dict) else None)
    return person if _may_be_clerk_id(person) else None


def user_named(envelope: Envelope) -> str | None:
    """The user any delivery is about or names: a user event's ``data.id``, a membership's
    ``public_user_data.user_id``, else :func:`person_named`'s. Read leniently (it serves deliveries stored
    ``failed``, whose shape was refused); an id no column could hold names nobody stored."""
    data = envelope.data
    if envelope.type.startswith("user."):
        person = data.get("id")
    elif envelope.type.startswith("organizationMembership."):
        person = dict(membership_parents(data)).get(Entity.USER)
    else:
        person = person_named(envelope)
    return person if _may_be_clerk_id(person) and len(person) <= CLERK_ID_CHARS else None


def _may_be_clerk_id(value: object) -> TypeGuard[str]:
    """A non-empty string without surrounding whitespace: MariaDB's PAD SPACE collations compare
    ``"user_1 "`` equal to ``"user_1"``, so a padded id would find (and redact as) another user's row."""
    return isinstance(value, str) and bool(value) and value == value.strip()
