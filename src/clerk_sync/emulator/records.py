"""Compact in-memory records and their Clerk JSON shapes.

Records hold only what can change; the ``render_*`` functions expand them into the full
objects of the Backend API spec (``components.schemas.User`` and friends).  Keeping the
stored form small lets the emulator hold 100k users for reconcile benchmarks.

Metadata dicts are treated as immutable values: every update stores a new dict, so records
may share one empty dict and rendered output never aliases stored state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ActorTokenRecord",
    "EmailRecord",
    "MembershipRecord",
    "OrgRecord",
    "PhoneRecord",
    "SessionRecord",
    "SignInTokenRecord",
    "UserRecord",
    "deleted_object",
    "lockout_remaining_s",
    "render_email",
    "render_membership",
    "render_org",
    "render_phone",
    "render_session",
    "render_user",
    "role_name",
]

JSON = dict[str, Any]
_EMPTY: JSON = {}
_DEFAULT_IMAGE = "https://img.clerk.com/emulator-default-avatar"
_GRAVATAR = "https://www.gravatar.com/avatar?d=mp"


@dataclass(slots=True)
class EmailRecord:
    id: str
    email_address: str
    created_at: int
    updated_at: int


@dataclass(slots=True)
class PhoneRecord:
    id: str
    phone_number: str  # E.164, as given
    created_at: int
    updated_at: int


@dataclass(slots=True)
class UserRecord:
    id: str
    created_at: int
    updated_at: int
    emails: list[EmailRecord] = field(default_factory=list)
    primary_email_address_id: str | None = None
    phones: list[PhoneRecord] = field(default_factory=list)
    primary_phone_number_id: str | None = None
    external_id: str | None = None
    username: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    locale: str | None = None
    public_metadata: JSON = field(default_factory=lambda: _EMPTY)
    private_metadata: JSON = field(default_factory=lambda: _EMPTY)
    unsafe_metadata: JSON = field(default_factory=lambda: _EMPTY)
    password_enabled: bool = False
    banned: bool = False
    locked: bool = False
    last_sign_in_at: int | None = None
    last_active_at: int | None = None
    legal_accepted_at: int | None = None
    delete_self_enabled: bool = True
    create_organization_enabled: bool = True
    create_organizations_limit: int | None = None
    bypass_client_trust: bool = False
    deprovisioned: bool = False  # SCIM: removed by the IdP ("restricted from signing in")
    # A lock's end (ms, on ``lock_clock``): set by ``POST /users/{id}/lock`` from the instance's lockout duration.
    # None with ``locked``: a lock that never expires (the spec's null ``lockout_expires_in_seconds``), as a
    # user created locked or locked by hand in a test. Passing the end changes nothing stored: ``locked`` and
    # ``lockout_expires_in_seconds`` are rendered from the clock (no updated_at bump, no event), as Clerk's.
    lock_ends_at: int | None = None
    lock_clock: Callable[[], float] | None = field(default=None, repr=False, compare=False)

    def primary_email(self) -> str | None:
        """The address whose id is ``primary_email_address_id`` (not necessarily the first)."""
        for email in self.emails:
            if email.id == self.primary_email_address_id:
                return email.email_address
        return None

    def primary_phone(self) -> str | None:
        """The number whose id is ``primary_phone_number_id``."""
        for phone in self.phones:
            if phone.id == self.primary_phone_number_id:
                return phone.phone_number
        return None


@dataclass(slots=True)
class OrgRecord:
    id: str
    name: str
    slug: str
    created_at: int
    updated_at: int
    created_by: str | None = None
    public_metadata: JSON = field(default_factory=lambda: _EMPTY)
    private_metadata: JSON = field(default_factory=lambda: _EMPTY)
    max_allowed_memberships: int = 0
    admin_delete_enabled: bool = True


@dataclass(slots=True)
class MembershipRecord:
    id: str
    organization_id: str
    user_id: str
    role: str
    created_at: int
    updated_at: int
    public_metadata: JSON = field(default_factory=lambda: _EMPTY)
    private_metadata: JSON = field(default_factory=lambda: _EMPTY)


@dataclass(slots=True)
class SessionRecord:
    id: str
    user_id: str
    client_id: str
    status: str
    created_at: int
    updated_at: int
    expire_at: int
    abandon_at: int
    actor: JSON | None = None
    last_active_organization_id: str | None = None


@dataclass(slots=True)
class ActorTokenRecord:
    id: str
    user_id: str
    actor: JSON
    token: str
    status: str
    created_at: int
    updated_at: int
    expires_at: int
    session_max_duration_s: int


@dataclass(slots=True)
class SignInTokenRecord:
    id: str
    user_id: str
    token: str
    status: str
    created_at: int
    updated_at: int
    expires_at: int
    org_id: str | None = None


def _admin_verification() -> JSON:
    """How an identifier created through the BAPI is verified (``verification_admin``)."""
    return {"object": "verification_admin", "status": "verified", "strategy": "admin", "attempts": None,
            "expire_at": None}


def render_email(email: EmailRecord) -> JSON:
    """An ``EmailAddress`` verified by an admin, as addresses created via the BAPI are."""
    return {
        "id": email.id,
        "object": "email_address",
        "email_address": email.email_address,
        "reserved": False,
        "verification": _admin_verification(),
        "linked_to": [],
        "matches_sso_connection": False,
        "created_at": email.created_at,
        "updated_at": email.updated_at,
    }


def render_phone(phone: PhoneRecord) -> JSON:
    """A ``PhoneNumber`` verified by an admin, as numbers created via the BAPI are (not for second factor)."""
    return {
        "id": phone.id,
        "object": "phone_number",
        "phone_number": phone.phone_number,
        "reserved_for_second_factor": False,
        "default_second_factor": False,
        "reserved": False,
        "verification": _admin_verification(),
        "linked_to": [],
        "backup_codes": None,
        "created_at": phone.created_at,
        "updated_at": phone.updated_at,
    }


def lockout_remaining_s(user: UserRecord) -> tuple[bool, int | None]:
    """``(locked, lockout_expires_in_seconds)`` now: a lock whose end has passed is over (False, None); a live
    one says the whole seconds left (rounded up: 1 while any of its last second remains); None: never ends."""
    if not user.locked:
        return False, None
    if user.lock_ends_at is None or user.lock_clock is None:
        return True, None
    left_ms = user.lock_ends_at - user.lock_clock() * 1000
    if left_ms <= 0:
        return False, None
    return True, math.ceil(left_ms / 1000)


def render_user(user: UserRecord) -> JSON:
    """The full ``User`` object (every required key of the spec, nothing outside it)."""
    locked, lockout_s = lockout_remaining_s(user)
    return {
        "id": user.id,
        "object": "user",
        "external_id": user.external_id,
        "primary_email_address_id": user.primary_email_address_id,
        "primary_phone_number_id": user.primary_phone_number_id,
        "primary_web3_wallet_id": None,
        "username": user.username,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "locale": user.locale,
        "profile_image_url": _GRAVATAR,
        "image_url": _DEFAULT_IMAGE,
        "has_image": False,
        "public_metadata": copy.deepcopy(user.public_metadata),
        "private_metadata": copy.deepcopy(user.private_metadata),
        "unsafe_metadata": copy.deepcopy(user.unsafe_metadata),
        "email_addresses": [render_email(e) for e in user.emails],
        "phone_numbers": [render_phone(p) for p in user.phones],
        "web3_wallets": [],
        "passkeys": [],
        "password_enabled": user.password_enabled,
        "two_factor_enabled": False,
        "totp_enabled": False,
        "backup_code_enabled": False,
        "mfa_enabled_at": None,
        "mfa_disabled_at": None,
        "password_last_updated_at": None,
        "external_accounts": [],
        "saml_accounts": [],
        "enterprise_accounts": [],
        "last_sign_in_at": user.last_sign_in_at,
        "banned": user.banned,
        "locked": locked,
        "lockout_expires_in_seconds": lockout_s,
        "verification_attempts_remaining": None if locked else 100,
        "updated_at": user.updated_at,
        "created_at": user.created_at,
        "delete_self_enabled": user.delete_self_enabled,
        "create_organization_enabled": user.create_organization_enabled,
        "create_organizations_limit": user.create_organizations_limit,
        "last_active_at": user.last_active_at,
        "legal_accepted_at": user.legal_accepted_at,
        "bypass_client_trust": user.bypass_client_trust,
        "deprovisioned": user.deprovisioned,
    }


def render_org(org: OrgRecord, members_count: int) -> JSON:
    """The ``Organization`` object; ``members_count`` is computed by the caller."""
    return {
        "object": "organization",
        "id": org.id,
        "name": org.name,
        "slug": org.slug,
        "image_url": _DEFAULT_IMAGE,
        "has_image": False,
        "members_count": members_count,
        "missing_member_with_elevated_permissions": False,
        "pending_invitations_count": 0,
        "max_allowed_memberships": org.max_allowed_memberships,
        "admin_delete_enabled": org.admin_delete_enabled,
        "public_metadata": copy.deepcopy(org.public_metadata),
        "private_metadata": copy.deepcopy(org.private_metadata),
        "created_by": org.created_by or "",
        "created_at": org.created_at,
        "updated_at": org.updated_at,
        "role_set_key": "role_set:default",
    }


def role_name(role: str) -> str:
    """Display name of a role key: ``org:admin`` -> ``Admin``, ``org:billing_manager`` -> ``Billing Manager``."""
    return role.removeprefix("org:").replace("_", " ").title()


def _public_user_data(user: UserRecord | None, user_id: str) -> JSON:
    return {
        "user_id": user_id,
        "first_name": user.first_name if user else None,
        "last_name": user.last_name if user else None,
        "profile_image_url": _GRAVATAR,
        "image_url": _DEFAULT_IMAGE,
        "has_image": False,
        "identifier": (user.primary_email() or user.primary_phone() or user.username) if user else None,
        "username": user.username if user else None,
        "banned": user.banned if user else False,
    }


def render_membership(
    membership: MembershipRecord,
    organization: JSON,
    user: UserRecord | None,
    permissions: tuple[str, ...],
) -> JSON:
    """The ``OrganizationMembership`` object with its nested organization and user data."""
    return {
        "id": membership.id,
        "object": "organization_membership",
        "role": membership.role,
        "role_name": role_name(membership.role),
        "permissions": list(permissions),
        "public_metadata": copy.deepcopy(membership.public_metadata),
        "private_metadata": copy.deepcopy(membership.private_metadata),
        "organization": organization,
        "public_user_data": _public_user_data(user, membership.user_id),
        "created_at": membership.created_at,
        "updated_at": membership.updated_at,
    }


def render_session(session: SessionRecord, last_active_at: int) -> JSON:
    """The ``Session`` object (webhooks add the full ``user`` beside it)."""
    return {
        "object": "session",
        "id": session.id,
        "user_id": session.user_id,
        "client_id": session.client_id,
        "actor": copy.deepcopy(session.actor),
        "status": session.status,
        "last_active_organization_id": session.last_active_organization_id,
        "last_active_at": last_active_at,
        "latest_activity": None,
        "expire_at": session.expire_at,
        "abandon_at": session.abandon_at,
        "updated_at": session.updated_at,
        "created_at": session.created_at,
    }


def deleted_object(kind: str, object_id: str, **extra: str | None) -> JSON:
    """A ``DeletedObject``: all a ``*.deleted`` event or DELETE response says about the object."""
    body: JSON = {"object": kind, "id": object_id, "deleted": True}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body
