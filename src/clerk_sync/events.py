"""Typed views of Clerk event envelopes and the objects we mirror (pure: no I/O).

The same record builders serve webhooks and Backend API responses (JIT sync, reconcile),
because Clerk sends the same User/Organization/OrganizationMembership objects on both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from clerk_sync.errors import EventShapeError, PayloadError

__all__ = [
    "Envelope",
    "MembershipRecord",
    "OrganizationRecord",
    "UserRecord",
    "membership_record",
    "normalize_timestamp_ms",
    "organization_record",
    "parse_envelope",
    "user_record",
]

JSON = dict[str, Any]
# Larger timestamps would not fit BIGINT columns (and are meaningless: year 292 million).
_MAX_MS = 2**63 - 1
# Seconds-vs-milliseconds cut-off: 10^11 s is the year 5138, 10^11 ms is 1973.
_MS_THRESHOLD = 100_000_000_000
# Legacy payloads used role keys without the ``org:`` prefix (see shared/clerk examples/variants).
_LEGACY_ORG_ROLES = {"admin": "org:admin", "basic_member": "org:member"}


def normalize_timestamp_ms(value: object) -> int:
    """Clerk's envelope ``timestamp`` is ms in the docs and seconds in the spec examples."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PayloadError(f"event timestamp must be a number, got {value!r}")
    number = float(value)
    ms = int(number if number >= _MS_THRESHOLD else number * 1000)
    if not 0 <= ms <= _MAX_MS:
        raise PayloadError(f"event timestamp {value!r} is out of range")
    return ms


@dataclass(frozen=True, slots=True)
class Envelope:
    """A Clerk event: ``{"data", "object": "event", "type", "timestamp", "instance_id"}``."""

    type: str
    data: JSON
    timestamp_ms: int
    instance_id: str | None
    raw: JSON = field(repr=False)


def parse_envelope(body: bytes | str) -> Envelope:
    """Parse a verified body; anything that is not a Clerk event envelope is a :class:`PayloadError`."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PayloadError("body is not a JSON object")
    etype, data = raw.get("type"), raw.get("data")
    if not isinstance(etype, str) or not etype:
        raise PayloadError("event has no 'type'")
    if not isinstance(data, dict):
        raise PayloadError("event has no 'data' object")
    if raw.get("object", "event") != "event":
        raise PayloadError(f"'object' is {raw.get('object')!r}, expected 'event'")
    instance_id = raw.get("instance_id")
    return Envelope(
        type=etype,
        data=data,
        timestamp_ms=normalize_timestamp_ms(raw.get("timestamp")),
        instance_id=instance_id if isinstance(instance_id, str) else None,
        raw=raw,
    )


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


def user_record(data: JSON) -> UserRecord:
    """Build a user row from a Clerk User object."""
    emails = [e for e in _list(data, "email_addresses") if isinstance(e, dict)]
    primary_id = data.get("primary_email_address_id")
    primary = next((e.get("email_address") for e in emails if e.get("id") == primary_id), None)
    public = _obj(data, "public_metadata")
    role = public.get("role")
    return UserRecord(
        clerk_id=_id(data, "user"),
        clerk_updated_at=_ms(data, "updated_at"),
        clerk_created_at=_opt_int(data, "created_at"),
        email=primary if isinstance(primary, str) else None,
        email_addresses=[str(e["email_address"]) for e in emails if e.get("email_address")],
        first_name=_opt_str(data, "first_name"),
        last_name=_opt_str(data, "last_name"),
        username=_opt_str(data, "username"),
        image_url=_opt_str(data, "image_url"),
        public_metadata=public,
        private_metadata=_obj(data, "private_metadata"),
        unsafe_metadata=_obj(data, "unsafe_metadata"),
        role=role if isinstance(role, str) and role else "user",
        banned=bool(data.get("banned", False)),
        locked=bool(data.get("locked", False)),
        last_sign_in_at=_opt_int(data, "last_sign_in_at"),
    )


def organization_record(data: JSON) -> OrganizationRecord:
    """Build an organization row from a Clerk Organization object."""
    return OrganizationRecord(
        clerk_id=_id(data, "organization"),
        clerk_updated_at=_ms(data, "updated_at"),
        clerk_created_at=_opt_int(data, "created_at"),
        name=_opt_str(data, "name"),
        slug=_opt_str(data, "slug"),
        image_url=_opt_str(data, "image_url") or _opt_str(data, "logo_url"),
        public_metadata=_obj(data, "public_metadata"),
        private_metadata=_obj(data, "private_metadata"),
    )


def membership_record(data: JSON) -> MembershipRecord:
    """Build a membership row; the org and user may not be in our tables yet, and that is fine."""
    org = data.get("organization")
    user = data.get("public_user_data")
    org_id = org.get("id") if isinstance(org, dict) else None
    user_id = user.get("user_id") if isinstance(user, dict) else None
    if not isinstance(org_id, str) or not org_id:
        raise EventShapeError("membership has no organization.id")
    if not isinstance(user_id, str) or not user_id:
        raise EventShapeError("membership has no public_user_data.user_id")
    role = _opt_str(data, "role") or "org:member"
    perms = [p for p in _list(data, "permissions") if isinstance(p, str)]
    return MembershipRecord(
        clerk_id=_id(data, "organization membership"),
        clerk_updated_at=_ms(data, "updated_at"),
        clerk_created_at=_opt_int(data, "created_at"),
        organization_clerk_id=org_id,
        user_clerk_id=user_id,
        role=_LEGACY_ORG_ROLES.get(role, role),
        permissions=perms,
    )


def _id(data: JSON, what: str) -> str:
    value = data.get("id")
    if not isinstance(value, str) or not value:
        raise EventShapeError(f"{what} object has no 'id'")
    return value


def _ms(data: JSON, key: str) -> int:
    value = _opt_int(data, key)
    if value is None:
        raise EventShapeError(f"'{key}' must be a number of milliseconds, got {data.get(key)!r}")
    return value


def _opt_int(data: JSON, key: str) -> int | None:
    """A millisecond timestamp that fits a BIGINT column, else None."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if 0 <= value <= _MAX_MS else None


def _opt_str(data: JSON, key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _obj(data: JSON, key: str) -> JSON:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _list(data: JSON, key: str) -> list[Any]:
    value = data.get(key)
    return value if isinstance(value, list) else []
