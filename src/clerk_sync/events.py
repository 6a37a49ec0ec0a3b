"""Typed views of Clerk event envelopes and the objects we mirror (pure: no I/O).

The same record builders serve webhooks and Backend API responses (JIT sync, reconcile),
because Clerk sends the same User/Organization/OrganizationMembership objects on both.

Every value is checked against the limits in :mod:`clerk_sync._limits` before a store sees it, so
SQLite and PostgreSQL decide alike. An identity that cannot be stored (an id longer than a Clerk id
can be, a missing ``updated_at``) is an :class:`EventShapeError`: the delivery is kept as ``failed``.
Anything else that cannot be stored (a 300-character name, metadata that is not an object) is dropped
and described in ``notes``, and the security-relevant columns (role, banned, locked, deprovisioned)
are still applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from clerk_sync._limits import (
    BIGINT_MAX,
    EMAIL_CHARS,
    EVENT_TYPE_CHARS,
    INSTANCE_ID_CHARS,
    NAME_CHARS,
    ROLE_CHARS,
    URL_CHARS,
    Notes,
    fit_clerk_id,
    fit_ms,
    fit_text,
    isfinite,
    parse_json,
    show,
)
from clerk_sync.errors import EventShapeError, PayloadError

__all__ = [
    "Envelope",
    "MembershipRecord",
    "OrganizationRecord",
    "UserRecord",
    "instance_mismatch",
    "membership_record",
    "normalize_timestamp_ms",
    "organization_record",
    "parse_envelope",
    "record_columns",
    "user_record",
]

JSON = dict[str, Any]
# Larger timestamps would not fit BIGINT columns (and are meaningless: year 292 million).
_MAX_MS = BIGINT_MAX
# Seconds-vs-milliseconds cut-off: 10^11 s is the year 5138, 10^11 ms is 1973.
MS_THRESHOLD = 100_000_000_000
# Legacy payloads used role keys without the ``org:`` prefix (see shared/clerk examples/variants).
_LEGACY_ORG_ROLES = {"admin": "org:admin", "basic_member": "org:member"}


def same_org_role(role: str) -> str:
    """One spelling of an organization role, to compare roles written differently: webhooks store Clerk's
    legacy names mapped (``basic_member`` → ``org:member``, ``admin`` → ``org:admin``), v2 session tokens only
    prefix ``org:`` (``org:basic_member``), v1 tokens and routes may name either."""
    bare = role.removeprefix("org:")
    return _LEGACY_ORG_ROLES.get(bare, f"org:{bare}")


def org_role_spellings(role: str) -> tuple[str, ...]:
    """Every ``org:``-prefixed spelling :func:`same_org_role` takes for ``role``'s, its own first: what an
    exact-match check (Starlette's scopes) needs to agree with it. Never the bare ``admin`` a v1 token may carry,
    which an app could take for its own role of that name."""
    one = same_org_role(role)
    legacy = (f"org:{name}" for name, mapped in _LEGACY_ORG_ROLES.items() if mapped == one)
    return tuple(dict.fromkeys((one, f"org:{role.removeprefix('org:')}", *legacy)))


def normalize_timestamp_ms(value: object) -> int:
    """Clerk's envelope ``timestamp`` is ms in the docs and seconds in the spec examples."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not isfinite(value):
        raise PayloadError(f"event timestamp must be a number, got {show(value)}")
    if not -_MAX_MS <= value <= _MAX_MS:  # before float(): an integer of 400 digits (either sign) overflows it
        raise PayloadError(f"event timestamp {show(value)} is out of range")
    number = float(value)
    ms = int(number if number >= MS_THRESHOLD else number * 1000)
    if not 0 <= ms <= _MAX_MS:
        raise PayloadError(f"event timestamp {show(value)} is out of range")
    return ms


@dataclass(frozen=True, slots=True)
class Envelope:
    """A Clerk event: ``{"data", "object": "event", "type", "timestamp", "instance_id"}``.

    ``text`` is what the inbox stores: the body as received, or its cleaned copy when the body held
    values a store refuses (``notes`` then says what was changed, e.g. a NUL replaced).
    """

    type: str
    data: JSON
    timestamp_ms: int
    instance_id: str | None
    raw: JSON = field(repr=False)
    text: str = field(default="", repr=False)
    notes: tuple[str, ...] = ()


def parse_envelope(body: bytes | str, *, received_ms: Callable[[], int] | None = None) -> Envelope:
    """Parse a verified body; one that is not a Clerk event (not JSON, no ``type`` or ``data``) is a
    :class:`PayloadError`.

    With ``received_ms`` (a live delivery: the signature said it is Clerk's; the clock, in ms, read only when
    needed), the envelope's other fields never refuse the event, since a refusal would lose it (a 4xx, nothing
    stored) and with it a deletion or a revocation: a ``timestamp`` that is not one becomes the time
    received, an unusable ``instance_id`` none (``CLERK_INSTANCE_ID`` is checked on the raw value:
    :func:`instance_mismatch`), an ``object`` other than ``"event"`` is let through; each is noted."""
    try:
        parsed = parse_json(body.decode() if isinstance(body, bytes) else body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"body is not JSON: {exc}") from None
    raw = parsed.value
    if not isinstance(raw, dict):
        raise PayloadError("body is not a JSON object")
    etype, data = raw.get("type"), raw.get("data")
    if not isinstance(etype, str) or not etype:
        raise PayloadError("event has no 'type'")
    if len(etype) > EVENT_TYPE_CHARS:
        raise PayloadError(f"event 'type' is {len(etype)} characters, Clerk's have at most {EVENT_TYPE_CHARS}")
    if not isinstance(data, dict):
        raise PayloadError("event has no 'data' object")
    problems: list[str] = []
    if raw.get("object", "event") != "event":
        problems.append(f"'object' is {show(raw.get('object'))}, expected 'event'")
    instance_id = raw.get("instance_id")
    if isinstance(instance_id, str) and len(instance_id) > INSTANCE_ID_CHARS:
        problems.append(f"'instance_id' is {len(instance_id)} characters, Clerk's have at most {INSTANCE_ID_CHARS}")
        instance_id = None
    elif instance_id is not None and not isinstance(instance_id, str):
        problems.append(f"'instance_id' is not a string ({show(instance_id)})")
        instance_id = None
    try:
        timestamp_ms = normalize_timestamp_ms(raw.get("timestamp"))
        if received_ms is not None:
            _check_plausible(timestamp_ms, received_ms())
    except PayloadError as exc:
        if received_ms is None:
            raise
        problems.append(f"{exc}: the time received used instead")
        timestamp_ms = received_ms()
    if problems and received_ms is None:
        raise PayloadError(problems[0])
    notes = (*parsed.notes, f"envelope: {'; '.join(problems)}") if problems else parsed.notes
    return Envelope(
        type=etype,
        data=data,
        timestamp_ms=timestamp_ms,
        instance_id=instance_id,
        raw=raw,
        text=parsed.text,
        notes=notes,
    )


# How far a live event's ``timestamp`` may be from the time it was received. Before: a retry (Svix's schedule ends
# after ~28 h) or a replay from Clerk's Dashboard of an older message, so up to a year. After: a year too, as
# :data:`VERSION_AHEAD_MS` allows an ``updated_at`` (test suites, ours and apps', stamp events with round future
# times). Outside, it is not the event's time: 0, 1000 or microseconds would otherwise anchor the row's version
# (:func:`_version`), a deletion's tombstone and a lock's end, and hold back the ban or demotion the event
# carries, or every later one.
TIMESTAMP_BEFORE_MS = TIMESTAMP_AFTER_MS = 366 * 86_400_000


def _check_plausible(timestamp_ms: int, received_ms: int) -> None:
    """Raise :class:`PayloadError` when a live event's ``timestamp`` cannot be its time (see above)."""
    if timestamp_ms < received_ms - TIMESTAMP_BEFORE_MS:
        raise PayloadError(f"event timestamp {timestamp_ms} is more than a year before the time received "
                           f"({received_ms})")
    if timestamp_ms > received_ms + TIMESTAMP_AFTER_MS:
        raise PayloadError(f"event timestamp {timestamp_ms} is more than a year after the time received "
                           f"({received_ms})")


def instance_mismatch(raw: JSON, expected: str) -> object | None:
    """The envelope's ``instance_id`` when it names an instance other than ``expected``; None when it is
    ``expected`` or absent (older Dashboard payloads carry none). A value that is no instance id (a number, a
    list, a string too long) is not ``expected`` either."""
    value = raw.get("instance_id")
    return None if value is None or value == expected else value


@dataclass(frozen=True, slots=True)
class UserRecord:
    """The columns of ``users`` that come from Clerk."""

    clerk_id: str
    clerk_updated_at: int
    clerk_created_at: int | None
    email: str | None
    email_addresses: list[str]
    first_name: str | None
    last_name: str | None
    username: str | None
    image_url: str | None
    public_metadata: JSON
    private_metadata: JSON
    unsafe_metadata: JSON
    role: str
    banned: bool
    locked: bool
    last_sign_in_at: int | None
    deprovisioned: bool = False  # SCIM: a user removed by the IdP arrives as user.updated, not user.deleted
    # When a lockout ends by itself (ms): the record's time base (the event's timestamp, or when the object was
    # fetched) + Clerk's ``lockout_expires_in_seconds``. None: not locked, or a lock that never expires (null
    # seconds), or a lock whose end the writer settles (``lockout_pending_s``). See :func:`lock_in_force`.
    locked_until: int | None = None
    # ``lockout_expires_in_seconds`` of a lock built with no time base (``user_record`` given neither
    # ``event_ms`` nor ``fetched_ms``): the store's writer sets ``locked_until`` from its own clock, at the write
    # (:func:`settle_lockout`). Not a column.
    lockout_pending_s: float | None = field(default=None, metadata={"column": False})
    # The app's own id for this user (Clerk's ``external_id``): carried for the mapping and hooks (linking
    # existing rows), not mirrored (``users`` has no column for it, see record_columns).
    external_id: str | None = field(default=None, metadata={"column": False})
    # Whether Clerk verified the primary address (its ``verification.status``): carried, so that linking an
    # existing row by e-mail trusts only an address its user proved to own.
    email_verified: bool = field(default=False, metadata={"column": False})
    # The version this release wrote the row at: always ``clerk_updated_at`` (set, never passed). A release
    # without it (before 0017) leaves the column behind when it writes the row, so a ``locked_until`` whose
    # ``lock_version`` differs from the row's version is not this lock's end (see :func:`believed_end`).
    lock_version: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lock_version", self.clerk_updated_at)


@dataclass(frozen=True, slots=True)
class OrganizationRecord:
    """The columns of ``organizations`` that come from Clerk."""

    clerk_id: str
    clerk_updated_at: int
    clerk_created_at: int | None
    name: str | None
    slug: str | None
    image_url: str | None
    public_metadata: JSON
    private_metadata: JSON


@dataclass(frozen=True, slots=True)
class MembershipRecord:
    """The columns of ``organization_memberships``; ids are Clerk ids, not foreign keys."""

    clerk_id: str
    clerk_updated_at: int
    clerk_created_at: int | None
    organization_clerk_id: str
    user_clerk_id: str
    role: str
    permissions: list[str]


def user_record(data: JSON, notes: Notes = None, *, event_ms: int | None = None,
                fetched_ms: int | None = None) -> UserRecord:
    """Build a user row from a Clerk User object; ``notes`` (if given) receives what was dropped.
    ``event_ms``: the envelope's timestamp of a webhook event (see :func:`_version`). ``fetched_ms``: when a
    Backend API object was fetched (the caller's injected clock). Either is the time base of a lockout's end:
    ``locked_until`` = base + ``lockout_expires_in_seconds`` (Clerk's remaining seconds when it wrote the
    object); with neither, the writer that stores the record settles it from its own clock."""
    emails = [e for e in _list(data, "email_addresses", notes) if isinstance(e, dict)]
    primary_id = data.get("primary_email_address_id")
    primary_object = next((e for e in emails if e.get("id") == primary_id), None)
    primary = primary_object.get("email_address") if primary_object is not None else None
    verification = primary_object.get("verification") if primary_object is not None else None
    public = _obj(data, "public_metadata", notes)
    locked = _flag(data, "locked", notes)
    return _end_not_before_version(UserRecord(
        clerk_id=_id(data, "user"),
        clerk_updated_at=_version(data, notes, event_ms),
        clerk_created_at=_opt_int(data, "created_at"),
        email=fit_text(primary, "primary email address", EMAIL_CHARS, notes),
        email_addresses=[a for e in emails if isinstance(a := e.get("email_address"), str) and a],
        first_name=_fit(data, "first_name", NAME_CHARS, notes),
        last_name=_fit(data, "last_name", NAME_CHARS, notes),
        username=_fit(data, "username", NAME_CHARS, notes),
        image_url=_fit(data, "image_url", URL_CHARS, notes),
        public_metadata=public,
        private_metadata=_obj(data, "private_metadata", notes),
        unsafe_metadata=_obj(data, "unsafe_metadata", notes),
        role=_role(public, "data.public_metadata.role", "user", notes),
        banned=_flag(data, "banned", notes),
        locked=locked,
        deprovisioned=_flag(data, "deprovisioned", notes, null=False),
        last_sign_in_at=_opt_int(data, "last_sign_in_at"),
        **_lockout(data, locked, event_ms if event_ms is not None else fetched_ms, notes),
        external_id=_fit(data, "external_id", NAME_CHARS, notes),
        email_verified=isinstance(verification, dict) and verification.get("status") == "verified",
    ))


def _end_not_before_version(record: UserRecord) -> UserRecord:
    """A lock's end no earlier than its record's version: the end is counted on this host's clock (or the
    envelope's), the version on Clerk's, and an end before the version reads as an earlier lock's (see
    :func:`lock_in_force`), which would keep the user locked until the next event."""
    if record.locked_until is not None and record.locked_until < record.clerk_updated_at:
        return replace(record, locked_until=record.clerk_updated_at)
    return record


def _lockout(data: JSON, locked: bool, base_ms: int | None, notes: Notes) -> dict[str, Any]:
    """``locked_until`` (or, with no time base, ``lockout_pending_s``) of a user object. Not locked: neither.
    Locked with ``lockout_expires_in_seconds`` null or absent: neither (Clerk: the lockout never expires; an
    unlock event lifts it). A value that is not a number of seconds fails closed, as a null one, noted."""
    if not locked:
        return {}
    seconds = data.get("lockout_expires_in_seconds")
    if seconds is None:
        return {}
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not isfinite(seconds) or seconds < 0:
        if notes is not None:
            notes.append(f"data.lockout_expires_in_seconds is not a number of seconds ({show(seconds)}): the lock "
                         "is kept until Clerk unlocks the user")
        return {}
    if base_ms is None:
        return {"lockout_pending_s": seconds}
    return {"locked_until": lock_end(base_ms, seconds)}


def lock_end(base_ms: int, seconds: float) -> int | None:
    """When a lockout of ``seconds`` remaining at ``base_ms`` ends (ms); None (never) past a BIGINT column."""
    end = base_ms + round(seconds * 1000) if seconds <= _MAX_MS / 1000 else _MAX_MS + 1
    return end if end <= _MAX_MS else None


def lock_in_force(locked: bool, locked_until: int | None, now_ms: int, version_ms: int | None = None,
                  lock_version: int | None = None) -> bool:
    """Whether a lock refuses its user at ``now_ms``: while ``locked`` and (no end, or ``now_ms`` before it).

    ``version_ms`` and ``lock_version`` (the row's ``clerk_updated_at`` and ``lock_version``): an end is this
    lock's only when the row was last written by a release that keeps it (see :func:`believed_end`); otherwise
    it is not believed: locked until Clerk says otherwise (fail closed)."""
    locked_until = believed_end(locked_until, version_ms, lock_version)
    return locked and (locked_until is None or now_ms < locked_until)


def believed_end(locked_until: int | None, version_ms: int | None, lock_version: int | None = None) -> int | None:
    """``locked_until`` when it is the end of the lock stored with it, else None (no known end).

    With ``version_ms`` (the row's version), the end is believed only when ``lock_version`` equals it: a release
    without ``locked_until`` or ``lock_version`` (during a rolling upgrade) that re-locked the row left an
    earlier lock's end behind, which may be past, or ahead of the new version and still not this lock's (a
    lock that never expires would end then). An end older than the version is never this lock's either."""
    if version_ms is not None and locked_until is not None and (lock_version != version_ms
                                                                 or locked_until < version_ms):
        return None
    return locked_until


def settle_lockout(record: UserRecord, now_ms: int) -> UserRecord:
    """A record built with no time base, its lockout's end set from ``now_ms`` (the writer's clock)."""
    if record.lockout_pending_s is None:
        return record
    return _end_not_before_version(replace(record, locked_until=lock_end(now_ms, record.lockout_pending_s),
                                           lockout_pending_s=None))


def record_columns(record_type: type[Any]) -> list[str]:
    """The fields of a record type that its contract table has a column for, in order (a few fields,
    such as a user's ``external_id``, are carried for the mapping and hooks only)."""
    return [f.name for f in fields(record_type) if f.metadata.get("column", True)]


def organization_record(data: JSON, notes: Notes = None, *, event_ms: int | None = None) -> OrganizationRecord:
    """Build an organization row from a Clerk Organization object (``event_ms``: as :func:`user_record`)."""
    return OrganizationRecord(
        clerk_id=_id(data, "organization"),
        clerk_updated_at=_version(data, notes, event_ms),
        clerk_created_at=_opt_int(data, "created_at"),
        name=_fit(data, "name", NAME_CHARS, notes),
        slug=_fit(data, "slug", NAME_CHARS, notes),
        image_url=_fit(data, "image_url", URL_CHARS, notes) or _fit(data, "logo_url", URL_CHARS, notes),
        public_metadata=_obj(data, "public_metadata", notes),
        private_metadata=_obj(data, "private_metadata", notes),
    )


def membership_record(data: JSON, notes: Notes = None, *, stored: tuple[str, str] | None = None,
                      event_ms: int | None = None) -> MembershipRecord:
    """Build a membership row; the org and user may not be in our tables yet, and that is fine.
    ``event_ms``: as :func:`user_record`.

    ``stored``: the organization and user ids of the membership's row here (which never change in Clerk).
    Given, a malformed one in the payload is replaced by the stored one (noted) instead of failing the event:
    its role change must not be held back by it."""
    org = data.get("organization")
    user = data.get("public_user_data")
    org_id = _parent_id(org.get("id") if isinstance(org, dict) else None, "membership organization.id",
                        None if stored is None else stored[0], notes)
    user_id = _parent_id(user.get("user_id") if isinstance(user, dict) else None,
                         "membership public_user_data.user_id", None if stored is None else stored[1], notes)
    role = _role(data, "data.role", "org:member", notes)
    return MembershipRecord(
        clerk_id=_id(data, "organization membership"),
        clerk_updated_at=_version(data, notes, event_ms),
        clerk_created_at=_opt_int(data, "created_at"),
        organization_clerk_id=org_id,
        user_clerk_id=user_id,
        role=_LEGACY_ORG_ROLES.get(role, role),
        permissions=[p for p in _list(data, "permissions", notes) if isinstance(p, str)],
    )


def _parent_id(value: object, what: str, stored: str | None, notes: Notes) -> str:
    try:
        return fit_clerk_id(value, what)
    except EventShapeError as exc:
        if stored is None:
            raise
        if notes is not None:
            notes.append(f"{exc}: the stored {stored!r} kept")
        return stored


def _id(data: JSON, what: str) -> str:
    return fit_clerk_id(data.get("id"), f"{what} object 'id'")


# How far a row's ``updated_at`` may run ahead of its event's own timestamp. Clerk stamps the event after the
# change, so a version far ahead is a wrong unit (microseconds: millennia ahead) or a wrong clock, not Clerk's:
# kept, it would make every later change of that row look stale (its ban, its demotion) until someone edited
# the table. A year, not a minute: test suites (ours, and apps') build events with round future versions.
VERSION_AHEAD_MS = 366 * 86_400_000


def _version(data: JSON, notes: Notes, event_ms: int | None) -> int:
    """A row's version: its ``updated_at`` in ms. Without ``event_ms`` (a Backend API object) one that is
    missing or not a millisecond timestamp is an :class:`EventShapeError`. With it (a webhook event, whose
    timestamp the signature vouches for), such an ``updated_at``, or one more than a year after ``event_ms``,
    is replaced by ``event_ms`` (noted), as a deletion's tombstone takes it: failing the event would hold
    back the role and ban it carries, and keeping a far-future version would hold back every later one. One
    in seconds within a year of ``event_ms`` is read as seconds (noted)."""
    value = _opt_int(data, "updated_at")
    if event_ms is None:
        if value is None:
            raise EventShapeError(f"'updated_at' must be a number of milliseconds, got {show(data.get('updated_at'))}")
        return value
    if value is not None and value < MS_THRESHOLD and abs(value * 1000 - event_ms) <= VERSION_AHEAD_MS:
        # seconds of a time near the event's (Clerk's own examples mix the units): taken as milliseconds, a 1970
        # version would lose to the row's and the ban the event carries be skipped. (Small test versions, 1 or
        # 1000, are nowhere near an event's time and stay as they are.)
        if notes is not None:
            notes.append(f"'updated_at' {value} is in seconds: read as seconds")
        return value * 1000
    if value is not None and value <= event_ms + VERSION_AHEAD_MS:
        return value
    if notes is not None:
        why = ("is more than a year after the event's timestamp" if value is not None
               else "is not a number of milliseconds")
        notes.append(f"'updated_at' {show(data.get('updated_at'))} {why}: the event's timestamp is the version")
    return event_ms


def _opt_int(data: JSON, key: str) -> int | None:
    """A millisecond timestamp that fits a BIGINT column, else None."""
    return fit_ms(data.get(key))


def _flag(data: JSON, key: str, notes: Notes, *, null: bool = True) -> bool:
    """A refusal flag (``banned``, ``locked``, ``deprovisioned``): absent means False (older payloads carry
    none of them). Any other value that is not a boolean, ``null`` too where Clerk never sends one (``null``),
    fails closed: True, noted. Failing the event instead would hold back the role and the other flags it
    carries (a ban next to a malformed ``locked``); False would let a malformed event lift a ban."""
    if key not in data:
        return False
    value = data[key]
    if isinstance(value, bool):
        return value
    if value is None and not null:
        return False
    if notes is not None:
        notes.append(f"data.{key} is not true or false ({show(value)}): true applied (refused until Clerk "
                     "sends a boolean)")
    return True


def _role(data: JSON, where: str, default: str, notes: Notes) -> str:
    """A role that fits its column; anything else means the least-privileged ``default``."""
    value = data.get("role")
    if isinstance(value, str) and 0 < len(value) <= ROLE_CHARS:
        return value
    if value is not None and notes is not None:
        what = f"{len(value)} characters" if isinstance(value, str) else f"not a string: {show(value)}"
        notes.append(f"{where} ignored ({what}): {default!r} applied")
    return default


def _fit(data: JSON, key: str, limit: int | None, notes: Notes) -> str | None:
    return fit_text(data.get(key), f"data.{key}", limit, notes)


def _obj(data: JSON, key: str, notes: Notes) -> JSON:
    value = data.get(key)
    if isinstance(value, dict):
        return value
    if value is not None and notes is not None:
        notes.append(f"data.{key} dropped: not an object")
    return {}


def _list(data: JSON, key: str, notes: Notes) -> list[Any]:
    value = data.get(key)
    if isinstance(value, list):
        return value
    if value is not None and notes is not None:
        notes.append(f"data.{key} dropped: not a list")
    return []
