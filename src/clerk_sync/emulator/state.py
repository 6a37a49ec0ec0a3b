"""The emulator's in-memory instance data, guarded by one lock.

:class:`Store` owns every record plus the things all mutations share: the lock (the HTTP
server thread, the delivery thread and test code all touch it), the seeded id factory, the
clock, and the event sink that turns changes into webhook messages.  The operations live in
``users.py``, ``orgs.py`` and ``sessions.py``; they take the store as their first argument.
"""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .errors import ClerkAPIError
from .records import (
    ActorTokenRecord,
    MembershipRecord,
    OrgRecord,
    SessionRecord,
    SignInTokenRecord,
    UserRecord,
)

__all__ = [
    "DEFAULT_LOCKOUT_S",
    "EventSink",
    "Store",
    "deep_merge",
    "merge_metadata_fields",
    "metadata_arg",
    "replace_metadata_fields",
]

JSON = dict[str, Any]
#: Receives ``(event_type, data)`` for every change, in the order the changes happened.
EventSink = Callable[[str, JSON], None]

# Clerk's default lockout duration (an instance setting; the spec's POST /users/{id}/lock takes no body).
DEFAULT_LOCKOUT_S = 3600.0
_ALPHABET = string.ascii_letters + string.digits


def _discard(event_type: str, data: JSON) -> None:
    """Default sink: an emulator without a delivery worker simply forgets events."""


def metadata_arg(body: JSON, name: str) -> JSON | None:
    """A metadata field of a request body: an object, or None when absent (422 otherwise)."""
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise ClerkAPIError.invalid(name, f"{name} must be an object")
    return value


def merge_metadata_fields(record: object, fields: Iterable[str], body: JSON) -> None:
    """``PATCH .../metadata`` on a user or organization: each supplied field deep-merged."""
    for name in fields:
        patch = metadata_arg(body, name)
        if patch is not None:
            setattr(record, name, deep_merge(getattr(record, name), patch))


def replace_metadata_fields(record: object, fields: Iterable[str], body: JSON) -> None:
    """``PUT .../metadata``: each supplied field replaced wholesale (``null`` stores ``{}``)."""
    for name in fields:
        if name in body:
            setattr(record, name, metadata_arg(body, name) or {})


def deep_merge(base: JSON, patch: JSON) -> JSON:
    """Clerk's metadata merge: nested objects merge, a ``None`` value removes the key.

    Returns a new dict; neither argument is modified.
    """
    merged = dict(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Store:
    """Records of one emulated Clerk instance.

    Users are kept in creation order in ``user_order`` (oldest first), so list endpoints
    can page with an offset without sorting 100k records on every call.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        sink: EventSink = _discard,
        role_permissions: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.lock = threading.RLock()
        # How long ``POST /users/{id}/lock`` locks a user (the instance's "restrictions" setting; Clerk's default
        # lockout is one hour). None: locks never expire (``lockout_expires_in_seconds`` null). Tests change it.
        self.lockout_duration_s: float | None = DEFAULT_LOCKOUT_S
        self.role_permissions: Mapping[str, tuple[str, ...]] = role_permissions or {}
        self.clock = clock
        self.sink = sink
        self._seed = seed
        self.rng = random.Random(seed)
        self.users: dict[str, UserRecord] = {}
        self.user_order: list[str] = []
        self.email_index: dict[str, str] = {}
        self.phone_index: dict[str, str] = {}
        self.orgs: dict[str, OrgRecord] = {}
        self.slug_index: dict[str, str] = {}
        # organization id -> user id -> membership, in creation order.
        self.memberships: dict[str, dict[str, MembershipRecord]] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.actor_tokens: dict[str, ActorTokenRecord] = {}
        self.sign_in_tokens: dict[str, SignInTokenRecord] = {}
        self._last_ms = 0

    @contextmanager
    def locked(self) -> Iterator[Store]:
        """Hold the store lock for a compound operation."""
        with self.lock:
            yield self

    def reset(self) -> None:
        """Forget every record and restart the id sequence from the seed."""
        with self.lock:
            self.rng = random.Random(self._seed)
            self.lockout_duration_s = DEFAULT_LOCKOUT_S
            for table in (
                self.users,
                self.email_index,
                self.phone_index,
                self.orgs,
                self.slug_index,
                self.memberships,
                self.sessions,
                self.actor_tokens,
                self.sign_in_tokens,
            ):
                table.clear()
            self.user_order.clear()

    def new_id(self, prefix: str) -> str:
        """A Clerk-looking id: prefix, underscore, 27 base62 characters (seeded)."""
        with self.lock:
            return prefix + "_" + "".join(self.rng.choices(_ALPHABET, k=27))

    def new_token(self, length: int = 40) -> str:
        """An opaque token string, drawn from the seeded generator."""
        with self.lock:
            return "".join(self.rng.choices(_ALPHABET, k=length))

    def now_ms(self) -> int:
        """Current time in ms, never going backwards, so ``updated_at`` always grows."""
        with self.lock:
            now = int(self.clock() * 1000)
            self._last_ms = max(now, self._last_ms)
            return self._last_ms

    def bump_ms(self, previous: int) -> int:
        """A timestamp strictly greater than ``previous`` (for ``updated_at`` on a change)."""
        with self.lock:
            self._last_ms = max(self.now_ms(), previous + 1)
            return self._last_ms

    def emit(self, event_type: str, data: JSON) -> None:
        """Hand one event to the sink (called with the lock held, so order is preserved)."""
        self.sink(event_type, data)

    def permissions_for(self, role: str) -> tuple[str, ...]:
        """Permission keys a role grants (unknown custom roles grant none)."""
        return tuple(self.role_permissions.get(role, ()))

    def members_count(self, org_id: str) -> int:
        """Number of memberships of an organization."""
        return len(self.memberships.get(org_id, ()))

    def all_memberships(self) -> list[MembershipRecord]:
        """Every membership of the instance, oldest first."""
        found = [m for members in self.memberships.values() for m in members.values()]
        return sorted(found, key=lambda m: m.created_at)

    def summary(self) -> dict[str, int]:
        """Record counts, for ``GET /_emulator/state``."""
        with self.lock:
            return {
                "users": len(self.users),
                "organizations": len(self.orgs),
                "memberships": sum(len(m) for m in self.memberships.values()),
                "sessions": len(self.sessions),
                "actor_tokens": len(self.actor_tokens),
                "sign_in_tokens": len(self.sign_in_tokens),
            }
