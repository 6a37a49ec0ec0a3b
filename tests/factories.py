"""Builders for Clerk event envelopes shaped like tests/fixtures/clerk/examples (minimal but faithful)."""

from __future__ import annotations

import json
import time
from typing import Any

from clerk_sync.emulator.config import EmulatorConfig
from clerk_sync.webhooks import sign

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# The emulator's instance: the deliveries these envelopes stand for and the emulator the tests reconcile
# against are one Clerk instance (reconcile refuses a key of another instance than its deliveries').
INSTANCE = EmulatorConfig().instance_id


def envelope(event_type: str, data: dict[str, Any], timestamp: int | None = None) -> dict[str, Any]:
    return {
        "data": data,
        "object": "event",
        "type": event_type,
        "timestamp": timestamp if timestamp is not None else int(time.time() * 1000),
        "instance_id": INSTANCE,
        "event_attributes": {"http_request": {"client_ip": "127.0.0.1", "user_agent": "tests"}},
    }


def user(user_id: str, updated_at: int, *, email: str | None = None, first_name: str = "Ada",
         role: str | None = None, banned: bool = False) -> dict[str, Any]:
    email = email or f"{user_id}@example.com"
    public: dict[str, Any] = {"role": role} if role else {}
    return {
        "id": user_id, "object": "user", "external_id": None,
        "primary_email_address_id": f"idn_{user_id}",
        "email_addresses": [
            {"id": f"idn_other_{user_id}", "object": "email_address", "email_address": f"alt.{email}",
             "linked_to": [], "verification": None},
            {"id": f"idn_{user_id}", "object": "email_address", "email_address": email,
             "linked_to": [], "verification": {"status": "verified", "strategy": "email_code"}},
        ],
        "username": None, "first_name": first_name, "last_name": "Lovelace",
        "image_url": "https://img.clerk.com/x", "has_image": False,
        "public_metadata": public, "private_metadata": {}, "unsafe_metadata": {},
        "banned": banned, "locked": False, "last_sign_in_at": None,
        "created_at": 1_700_000_000_000, "updated_at": updated_at,
    }


def organization(org_id: str, updated_at: int, *, name: str = "Acme") -> dict[str, Any]:
    return {
        "id": org_id, "object": "organization", "name": name, "slug": name.lower(),
        "image_url": None, "has_image": False, "public_metadata": {}, "private_metadata": {},
        "created_by": "user_x", "created_at": 1_700_000_000_000, "updated_at": updated_at,
        "members_count": 1, "max_allowed_memberships": 5, "admin_delete_enabled": True,
    }


def membership(mem_id: str, org_id: str, user_id: str, updated_at: int, *,
               role: str = "org:member") -> dict[str, Any]:
    return {
        "id": mem_id, "object": "organization_membership", "role": role, "role_name": "Member",
        "permissions": ["org:sys_memberships:read"], "public_metadata": {}, "private_metadata": {},
        "organization": organization(org_id, updated_at),
        "public_user_data": {"user_id": user_id, "first_name": "Ada", "last_name": "Lovelace",
                             "identifier": f"{user_id}@example.com", "image_url": "", "has_image": False},
        "created_at": 1_700_000_000_000, "updated_at": updated_at,
    }


def deleted(kind: str, clerk_id: str) -> dict[str, Any]:
    return {"id": clerk_id, "object": kind, "deleted": True}


def body_of(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def signed(event: dict[str, Any] | bytes, svix_id: str, *, secret: str = SECRET,
           timestamp: int | None = None) -> tuple[dict[str, str], bytes]:
    body = event if isinstance(event, bytes) else body_of(event)
    return sign(secret, svix_id, timestamp or int(time.time()), body), body
