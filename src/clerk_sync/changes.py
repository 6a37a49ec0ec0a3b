"""What an applied write changed, and which hooks want to hear about it (pure: no I/O).

The store calls :func:`describe` with the row as it was and the row as written, inside the
transaction of the apply, and writes one outbox row per :class:`Hook` that :meth:`Hook.wants` the
:class:`Change` (PostgreSQL's batched path does the same in SQL: :func:`clerk_sync.outbox.jobs_cte_sql`).
Values compare as JSON does: ``true`` is not ``1``. The type is the change *as the app's table saw
it*: a ``user.updated`` event that arrives before its ``user.created`` creates the row, so it is the
``user.created`` change; the late ``user.created`` is then stale and produces nothing. Duplicates,
stale events, writes that change no field and tombstones for rows never seen produce no change.

The event types clerk-sync stores but does not mirror (Clerk Billing's ``subscription.*``,
``subscriptionItem.*``, ``paymentAttempt.*``, ``waitlistEntry.*``, ``organizationInvitation.*``...:
:data:`EVENT_TYPES`) reach the hooks that name them as an :class:`Event`, queued by the ingest in the
transaction that stores the delivery (:meth:`clerk_sync.outbox.Outbox.record_event`).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any

from clerk_sync.engine import HANDLED_EVENT_TYPES, Entity
from clerk_sync.events import MembershipRecord, OrganizationRecord, UserRecord, record_columns
from clerk_sync.metrics import KNOWN_EVENT_TYPES

__all__ = ["EVENT_TYPES", "Change", "Event", "EventHandler", "Handler", "Hook", "describe", "job_payload"]

JSON = dict[str, Any]
_PREFIX = {Entity.USER: "user", Entity.ORGANIZATION: "organization", Entity.MEMBERSHIP: "organizationMembership"}
# Always different on an applied update, so never "a change" on their own.
BOOKKEEPING = frozenset({"clerk_updated_at", "lock_version"})
# The fields an update may change, per entity (``Hook(fields=)``): the contract table's columns, less the id
# and the bookkeeping.
_CHANGEABLE = {entity: frozenset(record_columns(record)) - BOOKKEEPING - {"clerk_id"}
               for entity, record in ((Entity.USER, UserRecord), (Entity.ORGANIZATION, OrganizationRecord),
                                      (Entity.MEMBERSHIP, MembershipRecord))}
# Carried in a change's values (for the mapping and hooks) with no column to keep a previous value in: a user's
# external_id, email_verified, lockout_pending_s. Never "a change" on their own (:func:`describe`).
_CARRIED = frozenset(f.name for f in fields(UserRecord)) - set(record_columns(UserRecord))


@dataclass(frozen=True, slots=True)
class Change:
    """One applied change: ``values`` as written (for a delete, the last values), ``previous`` the old
    value of each field an update changed, ``version`` the Clerk ``updated_at`` (ms) it carries.

    ``redacted``: queued before the person it names was erased (``clerk-sync users erase``; a dead job by
    prune), so ``values`` and ``previous`` were emptied (``{}``): act on the ids alone, or leave it (a welcome
    mail to no address). Read ``change.values.get("email")``, not ``["email"]``, in a handler that may meet one."""

    entity: Entity
    clerk_id: str
    kind: str  # "created" | "updated" | "deleted"
    version: int
    values: JSON
    previous: JSON = field(default_factory=dict)
    redacted: bool = field(default=False, kw_only=True)

    @property
    def type(self) -> str:
        """The event name handlers subscribe to: ``user.created``, ``organizationMembership.deleted``…"""
        return change_type(self.entity, self.kind)

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and re-deliveries: the ordering guard applies a version only once."""
        return f"{self.type}:{self.clerk_id}:{self.version}"

    def changed(self, name: str) -> bool:
        """Whether this change touched field ``name`` (always true for created and deleted)."""
        return self.kind != "updated" or name in self.previous

    def to_json(self) -> JSON:
        doc: JSON = {"entity": self.entity.value, "clerk_id": self.clerk_id, "kind": self.kind,
                     "version": self.version, "values": self.values, "previous": self.previous}
        if self.redacted:
            doc["redacted"] = True
        return doc

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Change:
        return cls(Entity(data["entity"]), data["clerk_id"], data["kind"], int(data["version"]),
                   dict(data["values"]), dict(data.get("previous") or {}), redacted=bool(data.get("redacted")))


Handler = Callable[[Change], None]

#: The Clerk event types a hook may name that clerk-sync stores (answered ``ignored``) but does not mirror:
#: their hooks get an :class:`Event`. Every type Clerk documents (``metrics.KNOWN_EVENT_TYPES``: its webhook
#: spec's, its JS SDK's ``subscriptionItem.created``, the ``invitation.*`` of application invitations) but the
#: mirrored ones. ``session.revoked``/``ended``/``removed`` are not among them: they are applied (the revocation
#: deny list), not offered to hooks. A family (``"subscriptionItem.*"``) also takes a type of it Clerk adds later.
EVENT_TYPES = KNOWN_EVENT_TYPES - HANDLED_EVENT_TYPES
_MIRRORED = frozenset(_PREFIX.values())  # the families of the mirrored changes: never an Event
_EVENT_FAMILIES = frozenset(f"{t.partition('.')[0]}.*" for t in EVENT_TYPES)
_SUBJECT_CHARS = 100  # a data.id longer than this is keyed by its digest (hook_jobs.entity_key holds 200)


@dataclass(frozen=True, slots=True)
class Event:
    """A stored delivery of a type clerk-sync does not mirror (:data:`EVENT_TYPES`), for the hooks that name it.

    ``type`` and ``data`` are Clerk's (the payload's ``data`` object as received), ``svix_id`` the delivery's
    id, ``timestamp_ms`` the event's ``timestamp`` (ms; the time received when it had none). ``redacted``:
    ``data`` was reduced because the person it names was deleted or erased (or the organization that pays,
    ``payer.organization_id``, was deleted): arriving (or replayed) after that, to what the inbox keeps
    (``id``, ``object``, ``created_at``, ``updated_at``, ``status``, the payer's ``id``, ``user_id`` and
    ``organization_id``); queued before, by ``clerk-sync users erase`` (or prune, dead), to ``{"id": ...}``
    alone. Jobs of one subject (``data.id``: a subscription, a payment attempt, a waitlist entry; a user's or an
    organization's alike) run one at a time in the order the deliveries arrived, which is not always the order
    Clerk produced them: compare ``timestamp_ms`` (or ``data.updated_at``) with what you stored to leave a late
    one alone."""

    type: str
    svix_id: str
    timestamp_ms: int
    data: JSON
    redacted: bool = False

    @property
    def subject(self) -> str:
        """What the event is about: ``data.id`` (the svix id when it has none); its jobs run in order."""
        subject = self.data.get("id")
        return subject if isinstance(subject, str) and subject else self.svix_id

    @property
    def idempotency_key(self) -> str:
        """Stable across retries, Clerk's re-deliveries (same svix id) and replicas: ``type:svix_id``."""
        return f"{self.type}:{self.svix_id}"

    def to_json(self) -> JSON:
        doc: JSON = {"event": self.type, "svix_id": self.svix_id, "timestamp": self.timestamp_ms,
                     "subject": self.subject, "data": self.data}
        if self.redacted:
            doc["redacted"] = True
        return doc

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        return cls(str(data["event"]), str(data["svix_id"]), int(data["timestamp"]), dict(data.get("data") or {}),
                   bool(data.get("redacted")))

    def key(self) -> str:
        """The part of a job's ``entity_key`` after the hook's name: its family and subject (order per subject)."""
        subject = self.subject
        if len(subject) > _SUBJECT_CHARS:
            subject = "sha256:" + hashlib.sha256(subject.encode()).hexdigest()
        return f"{self.type.partition('.')[0]}:{subject}"


EventHandler = Callable[[Event], None]


def job_payload(data: Mapping[str, Any]) -> Change | Event:
    """A queued job's stored payload: an :class:`Event` (it has ``"event"``) or a :class:`Change`."""
    return Event.from_json(data) if "event" in data else Change.from_json(data)


def change_type(entity: Entity, kind: str) -> str:
    """``user.created``, ``organizationMembership.*`` (kind ``*``), ``user.`` (kind "")."""
    return f"{_PREFIX[entity]}.{kind}"


@dataclass(frozen=True, slots=True)
class Hook:
    """A named handler for some changes, or some events clerk-sync does not mirror.

    ``on`` holds change types (``"user.created"``), entity wildcards (``"user.*"``) or ``"*"``;
    ``fields`` narrows *updates* to those that changed one of these fields (``{"role"}``): the names of
    ``Change.values`` (snake_case: ``first_name``, not Clerk's ``firstName``) that the entities ``on``
    covers have; any other name (a typo, ``clerk_updated_at``), and ``on=[]``, raise ValueError, as does a
    user's ``external_id``, ``email_verified`` or ``lockout_pending_s``: carried in ``values`` with no
    previous value kept, so a change to one alone is not detected. The name
    is stored with each queued job, so keep it stable: renaming a hook strands its queued jobs.

    ``on`` may also name event types clerk-sync stores but does not mirror (:data:`EVENT_TYPES`:
    ``"subscriptionItem.active"``) or their families (``"subscription.*"``, ``"paymentAttempt.*"``): for
    each new delivery of one (not a duplicate: same svix id), the handler gets an :class:`Event` (type,
    data, svix id, timestamp, idempotency key), queued in the transaction that stores the delivery. Only
    by name: ``"*"`` means every *change of a mirrored row*, as it always has, and never an unmirrored
    event, so a ``"*"`` hook or forwarding sink does not start receiving billing events after an upgrade.
    A hook naming both kinds gets both (``isinstance(x, Event)`` tells them apart). ``fields`` does not
    apply to events.

    ``timeout_s`` (seconds; None: no limit) bounds how long the dispatcher waits for one run of the
    handler, which then runs in a daemon thread of its own. A run past it cannot be stopped (a thread
    cannot be killed): the dispatcher goes on with its other jobs while the job stays claimed, its lease
    kept by the heartbeat for as long as the run lasts (never run twice at once), and the run's outcome
    is recorded when it ends. Give the handler's own network calls a timeout all the same: at most
    ``Dispatcher(max_overdue=)`` runs may be overdue at once.
    """

    name: str
    handler: Handler | EventHandler
    on: Collection[str] = ("*",)
    fields: Collection[str] = ()
    timeout_s: float | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64:
            raise ValueError(f"hook name must be 1-64 characters, got {self.name!r}")
        if self.timeout_s is not None and not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):  # NaN too
            raise ValueError(f"hook {self.name!r}: timeout_s must be None (no limit) or a finite number of "
                             f"seconds more than 0, not {self.timeout_s!r}")
        if isinstance(self.on, str) or isinstance(self.fields, str):
            raise TypeError(f"hook {self.name!r}: 'on' and 'fields' take a list, e.g. on=['user.created']")
        if is_async_callable(self.handler):
            raise TypeError(f"hook {self.name!r}: its handler is an async function, which the dispatcher would "
                            "call and never await (the job marked done, nothing sent): hooks run in the "
                            "dispatcher's own thread, not in an event loop; pass a plain function, e.g. "
                            "handler=lambda change: asyncio.run(send_welcome(change))")
        if "session.*" in self.on:  # it reads as every session event, and would never get a revocation
            raise ValueError(f"hook {self.name!r}: 'session.*' would get session.created and session.pending "
                             "only: a revoked, ended or removed session is applied by clerk-sync (the deny list, "
                             "its tokens refused within 1 s), not offered to hooks; name the types you want, e.g. "
                             "on=['session.created'], and to act on a revocation ask a "
                             "clerk_sync.auth.DenyList(store)'s is_revoked(session_id)")
        known = {f"{p}.{k}" for p in _PREFIX.values() for k in ("created", "updated", "deleted")}
        known |= {f"{p}.*" for p in _PREFIX.values()} | {"*"} | EVENT_TYPES | _EVENT_FAMILIES
        unknown = sorted(set(self.on) - known)
        applied = [t for t in unknown if t in HANDLED_EVENT_TYPES]
        if applied:
            raise ValueError(f"hook {self.name!r}: {applied} are applied by clerk-sync, not offered to hooks: a "
                             "revoked, ended or removed session goes to the deny list, and its tokens are refused "
                             "from then on by clerk-sync's protection (401 session_revoked, within the deny list's "
                             "refresh: 1 s) with no code of yours; to act on one yourself (close a long-lived "
                             "connection), ask a clerk_sync.auth.DenyList(store)'s is_revoked(session_id). A hook "
                             "may name 'session.created' "
                             "and 'session.pending'")
        if unknown:
            raise ValueError(f"hook {self.name!r}: unknown change type(s) {unknown}; expected a mirrored "
                             "change ('user.created', 'organizationMembership.*', '*') or a Clerk event type "
                             "clerk-sync does not mirror ('subscriptionItem.active', 'subscription.*'; see "
                             "clerk_sync.changes.EVENT_TYPES)")
        if not self.on:
            raise ValueError(f"hook {self.name!r}: 'on' is empty, so it would never run; name the change types "
                             "it wants (on=['user.created']), or leave 'on' out for every change ('*')")
        if self.fields:
            self._check_fields()

    def _check_fields(self) -> None:
        """Refuse ``fields`` that no update of an entity ``on`` covers can change (a typo, Clerk's
        ``email_address`` or ``firstName``, ``clerk_updated_at``): the hook would never run for an update."""
        covered = [entity for entity in _PREFIX if self.covers(entity)]
        valid = sorted(set().union(*(_CHANGEABLE[entity] for entity in covered)))
        unknown = sorted(set(self.fields) - set(valid))
        carried = sorted(set(self.fields) & _CARRIED)
        if carried:
            raise ValueError(f"hook {self.name!r}: {carried} in 'fields' can never be seen to change: clerk-sync's "
                             "users table has no column for them, so no previous value is kept and a change to "
                             "one alone makes no change (no hook job, nothing forwarded); they ride along in "
                             "Change.values of the user's other changes. To follow one, map it into a column of "
                             "your app's table (SchemaMapping: MappedTable(..., {'external_id': 'external_id'}), "
                             "written on every applied event of the user) and act on that column; 'fields' "
                             "takes the others")
        if not covered:
            raise ValueError(f"hook {self.name!r}: 'fields' narrows updates of mirrored rows, and 'on' names "
                             f"none ({sorted(self.on)}): events have no fields to match; leave 'fields' out")
        if unknown:
            raise ValueError(f"hook {self.name!r}: unknown field(s) {unknown} in 'fields', so an update "
                             f"would never run it; the fields of the mirrored row (as in Change.values, "
                             f"snake_case) for {', '.join(_PREFIX[e] for e in covered)}: {valid}")

    def covers(self, entity: Entity) -> bool:
        """Whether some change of ``entity`` may be wanted (no need to look at its changes otherwise)."""
        return any(p == "*" or p.partition(".")[0] == _PREFIX[entity] for p in self.on)

    def wants_event(self, event_type: str) -> bool:
        """Whether this hook names the unmirrored ``event_type`` (by itself or its family; never by ``"*"``, nor
        by a mirrored entity's wildcard: a ``"user.*"`` hook gets :class:`Change` objects only, whatever
        ``user.`` type Clerk adds)."""
        family = event_type.partition(".")[0]
        return family not in _MIRRORED and (event_type in self.on or f"{family}.*" in self.on)

    def wants(self, change: Change) -> bool:
        kind = change.type
        if not ({"*", kind, kind.rpartition(".")[0] + ".*"} & set(self.on)):
            return False
        return change.kind != "updated" or not self.fields or any(change.changed(f) for f in self.fields)


def is_async_callable(handler: object) -> bool:
    """Whether calling ``handler`` only makes a coroutine or an async generator (an ``async def``, a partial of
    one, an object whose ``__call__`` is one): work that runs only when awaited."""
    call = inspect.getattr_static(type(handler), "__call__", None) if not inspect.isroutine(handler) else None
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (handler, call)
               if f is not None)


def describe(entity: Entity, clerk_id: str, version: int, before: JSON | None, after: JSON | None) -> Change | None:
    """The change from ``before`` (None: no live row) to ``after`` (None: deleted), or None if there is none."""
    if after is None:
        return None if before is None else Change(entity, clerk_id, "deleted", version, before)
    if before is None:
        return Change(entity, clerk_id, "created", version, after)
    # Fields with no column (a user's external_id) are not in ``before``: carried, never "a change".
    previous = {k: before[k] for k, v in after.items()
                if k not in BOOKKEEPING and k in before and not _same_json(before[k], v)}
    return Change(entity, clerk_id, "updated", version, after, previous) if previous else None


_SCALARS = frozenset({str, int, float, type(None)})


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values (as PostgreSQL compares jsonb): Python's ``True == 1`` is not."""
    kind = type(a)
    if kind is type(b) and kind in _SCALARS:  # most fields: one type check (bool is not among them)
        return bool(a == b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):  # 1e23 as sent, 10**23 as jsonb reads it back
        return _number(a) == _number(b)
    return bool(a == b)


def _number(value: int | float) -> Decimal | int:
    """The JSON number a float was written as (``repr``: 1e23 is 10**23, not the double nearest it)."""
    return Decimal(repr(value)) if isinstance(value, float) else value
