"""Just-in-time user sync: the signed-in user's row, fetched from Clerk when the webhook is late.

``get_auth_user`` costs one indexed query when the row exists. When it does not (the sign-up race:
the user's first request beats ``user.created``), it fetches the user from Clerk once — single-flight
and within the shared budget — upserts it through the same guarded write as the webhook path
(``Writer.apply(Upsert(...))``), and returns it. Whichever of webhook and JIT lands first, the other
is a no-op, so the row ends the same.

Usage::

    users = JitUsers(store, clerk=ClerkClient.from_settings(settings))
    user = users.get_auth_user(auth.user_id)          # or: await users.aget_auth_user(...)

Errors: :class:`~clerk_sync.errors.UserDeleted` (410), :class:`~clerk_sync.errors.UserBanned` (403; its
leaves :class:`~clerk_sync.errors.UserLocked` and :class:`~clerk_sync.errors.UserDeprovisioned` too),
:class:`~clerk_sync.errors.ClerkUnavailable` / :class:`~clerk_sync.errors.RateLimited` (503 with
``retry_after``) when the row is missing and Clerk cannot be asked within ``timeout_s``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import anyio
import sqlalchemy as sa

from clerk_sync._time import as_utc, utcnow
from clerk_sync.clerk_api import AsyncClerkClient, ClerkClient
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import (
    ClerkAPIError,
    ClerkNotFound,
    ClerkUnavailable,
    RateLimited,
    StoreError,
    UserBanned,
    UserDeleted,
    UserDeprovisioned,
    UserLocked,
)
from clerk_sync.events import lock_in_force, user_record
from clerk_sync.metrics import Metrics
from clerk_sync.store import Store, Writer, is_erased
from clerk_sync.tables import users

__all__ = ["AuthUser", "JitUsers", "load_user", "read_user", "standing_error"]

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuthUser:
    """A ``users`` row, read-only. ``clerk_id`` is Clerk's user id; ``id`` is ours (join on it)."""

    id: int
    clerk_id: str
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
    plan: str
    banned: bool
    locked: bool
    deprovisioned: bool
    last_sign_in_at: int | None
    clerk_created_at: int | None
    clerk_updated_at: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    # When Clerk's lockout ends by itself (ms; None: not locked, or until Clerk unlocks): see :meth:`is_locked`.
    locked_until: int | None = None
    # The version the row's ``locked_until`` was written at (see clerk_sync.events.believed_end).
    lock_version: int | None = None

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None

    def is_locked(self, now_ms: int) -> bool:
        """Whether Clerk's lockout refuses this user at ``now_ms`` (epoch ms): while ``locked`` and its end
        (``locked_until``) is unknown (a lock that never expires) or still ahead. Clerk sends no event when a
        lock expires, so the end is compared with the caller's clock, not waited for."""
        return lock_in_force(self.locked, self.locked_until, now_ms, self.clerk_updated_at, self.lock_version)


_COLUMNS = [users.c[f.name] for f in fields(AuthUser)]


def load_user(conn: sa.Connection, clerk_id: str) -> AuthUser | None:
    """The row for ``clerk_id`` (deleted or not): one query on the unique ``clerk_id`` index."""
    row = conn.execute(sa.select(*_COLUMNS).where(users.c.clerk_id == clerk_id)).mappings().first()
    return AuthUser(**row) if row is not None else None


def read_user(store: Store, clerk_id: str) -> AuthUser | None:
    """The ``users`` row for a Clerk id (one indexed query), deleted or not."""
    with store.connect() as conn:
        return load_user(conn, clerk_id)


def standing_error(user: AuthUser, now_ms: int | None = None) -> UserBanned | UserDeleted | None:
    """Why this user may not be served (deleted, banned, deprovisioned, locked), or None. A lock counts while
    it lasts at ``now_ms`` (epoch ms; None: the UTC clock now): Clerk's lockout expires by itself."""
    if user.deleted_at is not None:
        return UserDeleted(f"user {user.clerk_id} was deleted")
    if user.banned:
        return UserBanned(f"user {user.clerk_id} is banned")
    if user.deprovisioned:
        return UserDeprovisioned(f"user {user.clerk_id} was deprovisioned by the organization's identity provider")
    if user.locked and user.is_locked(_now_ms() if now_ms is None else now_ms):
        return UserLocked(f"user {user.clerk_id} is locked in Clerk (too many failed sign-ins)")
    return None


def _now_ms(wall: Callable[[], datetime] = utcnow) -> int:
    return int(as_utc(wall()).timestamp() * 1000)  # (a naive clock is UTC, not the host's zone)


def _usable(user: AuthUser, now_ms: int | None = None) -> AuthUser:
    refusal = standing_error(user, now_ms)
    if refusal is not None:
        raise refusal
    return user


def _failure(exc: Exception) -> str:
    if isinstance(exc, RateLimited):
        return "rate_limited"
    return "unavailable" if isinstance(exc, ClerkUnavailable) else "error"


def _asked_for(user_id: str, data: JSON) -> JSON:
    """Clerk's answer, if it is the user asked for: storing and returning another user's object (a caching
    proxy, a stand-in ignoring the path) would sign this caller in as that user."""
    if data.get("id") != user_id:
        raise ClerkAPIError(
            f"GET /users/{user_id} answered user {str(data.get('id'))[:64]!r}, not the one asked for; refused, "
            "nothing stored (is CLERK_API_URL Clerk's API, with no caching proxy in between?)",
            method="GET", path=f"/users/{user_id}")
    return data


class JitUsers:
    """The signed-in user's row, with a just-in-time fetch from Clerk; one instance per app.

    Pass ``clerk`` for the blocking methods, ``aclerk`` for the async ones (or both).
    ``timeout_s`` bounds the Clerk part of a call, waiting for the budget and retries included.

    ``refresh_interval_s`` is the least time between two Clerk fetches for one user (0: none). The Clerk
    budget is shared by every user and by ``reconcile``, and ``POST /sync/me`` is any signed-in user's to
    call: one user calling it in a loop would otherwise spend everyone's budget. Within the interval a
    refresh answers the stored row (kept fresh by webhooks meanwhile), or 410 again when Clerk had no such
    user. Counted per process (``clock`` is injectable for tests).

    ``wall`` (UTC, injectable) stamps a fetched user's lockout end (fetch time + Clerk's remaining seconds) and
    decides whether a stored lock still holds.
    """

    #: Users remembered for the interval (oldest forgotten first): bounds the memory a flood of ids can take.
    max_tracked_users = 10_000

    def __init__(self, store: Store, *, clerk: ClerkClient | None = None,
                 aclerk: AsyncClerkClient | None = None, timeout_s: float = 5.0,
                 metrics: Metrics | None = None, refresh_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], datetime] = utcnow) -> None:
        if refresh_interval_s < 0:
            raise ValueError(f"refresh_interval_s must be 0 or more seconds, not {refresh_interval_s}")
        self.store = store
        self.clerk = clerk
        self.aclerk = aclerk
        self.timeout_s = timeout_s
        self.metrics = metrics  # counts fetches by outcome: clerk_sync_jit_fetches_total{outcome}
        self.refresh_interval_s = refresh_interval_s
        self._clock = clock
        self._wall = wall
        self._fetched_at: OrderedDict[str, tuple[float, bool]] = OrderedDict()  # user -> (when, found)
        self._fetched_lock = threading.Lock()

    def _usable(self, user: AuthUser) -> AuthUser:
        return _usable(user, _now_ms(self._wall))

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.jit.labels(outcome=outcome).inc()

    def _recent(self, user_id: str) -> AuthUser | None:
        """The stored row when this user's last fetch ended within the interval (None: fetch now).
        Only finished fetches count: concurrent first requests still share one Clerk call (single-flight)."""
        if self.refresh_interval_s <= 0:
            return None
        with self._fetched_lock:
            last = self._fetched_at.get(user_id)
        if last is None or self._clock() - last[0] >= self.refresh_interval_s:
            return None
        if not last[1]:
            self._count("throttled")
            raise UserDeleted(f"user {user_id} does not exist in Clerk")
        user = self._read(user_id)
        if user is not None:
            self._count("throttled")
        return user

    def _fetched(self, user_id: str, *, found: bool) -> None:
        if self.refresh_interval_s <= 0:
            return
        with self._fetched_lock:
            self._fetched_at[user_id] = (self._clock(), found)
            self._fetched_at.move_to_end(user_id)
            while len(self._fetched_at) > self.max_tracked_users:
                self._fetched_at.popitem(last=False)

    # -- blocking ---------------------------------------------------------------------------
    def get_auth_user(self, user_id: str) -> AuthUser:
        """The user's row; fetched from Clerk and stored first if the webhook has not arrived yet."""
        user = self._read(user_id)
        if user is None:
            user = self.refresh_user(user_id, check=False)
        return self._usable(user)

    def refresh_user(self, user_id: str, *, check: bool = True) -> AuthUser:
        """Fetch the user from Clerk now and upsert it (after sign-up: ``POST /sync/me``); at most once per
        ``refresh_interval_s`` a user (within it: the stored row)."""
        if self.clerk is None:
            raise TypeError("JitUsers needs clerk=ClerkClient(...) for blocking calls")
        recent = self._recent(user_id)
        if recent is not None:
            return self._usable(recent) if check else recent
        try:
            data = _asked_for(user_id, self.clerk.get_user(user_id, deadline_s=self.timeout_s))
        except ClerkNotFound:
            self._count("not_found")
            self._fetched(user_id, found=False)
            raise UserDeleted(f"user {user_id} does not exist in Clerk") from None
        except ClerkAPIError as exc:
            self._count(_failure(exc))
            raise
        user = self._store(data, _now_ms(self._wall))  # fetched now: the base of a lockout's end
        self._fetched(user_id, found=True)
        return self._usable(user) if check else user

    # -- async ------------------------------------------------------------------------------
    async def aget_auth_user(self, user_id: str) -> AuthUser:
        """Async :meth:`get_auth_user`: the database runs in a worker thread, Clerk on the event loop."""
        user = await anyio.to_thread.run_sync(self._read, user_id)
        if user is None:
            user = await self.arefresh_user(user_id, check=False)
        return self._usable(user)

    async def arefresh_user(self, user_id: str, *, check: bool = True) -> AuthUser:
        """Async :meth:`refresh_user`."""
        if self.aclerk is None:
            raise TypeError("JitUsers needs aclerk=AsyncClerkClient(...) for async calls")
        recent = await anyio.to_thread.run_sync(self._recent, user_id)
        if recent is not None:
            return self._usable(recent) if check else recent
        try:
            # The client's deadline already bounds the call; this is the belt to its braces.
            with anyio.fail_after(self.timeout_s + 1.0):
                data = _asked_for(user_id, await self.aclerk.get_user(user_id, deadline_s=self.timeout_s))
        except ClerkNotFound:
            self._count("not_found")
            self._fetched(user_id, found=False)
            raise UserDeleted(f"user {user_id} does not exist in Clerk") from None
        except ClerkAPIError as exc:
            self._count(_failure(exc))
            raise
        except TimeoutError:
            self._count("unavailable")
            raise ClerkUnavailable(f"Clerk did not answer within {self.timeout_s}s", retry_after=1.0) from None
        user = await anyio.to_thread.run_sync(self._store, data, _now_ms(self._wall))
        self._fetched(user_id, found=True)
        return self._usable(user) if check else user

    # -- database ---------------------------------------------------------------------------
    def _read(self, user_id: str) -> AuthUser | None:
        """The user's row; None when it is not here yet. A user whose tombstone was hard-deleted (its digest
        in ``clerk_sync_erased``) is refused here: Clerk may still have them (erased here only), and the
        guarded upsert would not store them anyway, so no Clerk request is spent on every such call."""
        with self.store.connect() as conn:
            user = load_user(conn, user_id)
            if user is None and is_erased(conn, Entity.USER, user_id):
                raise UserDeleted(f"user {user_id} was deleted")
        return user

    def _store(self, data: JSON, fetched_ms: int) -> AuthUser:
        """Upsert through the webhook path's guard, then read back what won (maybe a newer webhook).
        ``fetched_ms``: when Clerk answered (the base of a lockout's end)."""
        record = user_record(data, fetched_ms=fetched_ms)

        def write(writer: Writer) -> AuthUser | None:
            writer.apply(Upsert(Entity.USER, record))
            return load_user(writer.conn, record.clerk_id)

        try:
            user = self.store.run(write)
        except StoreError:
            self._count("db_error")
            raise
        if user is None:  # the guard refused it: erased here (its digest) since the read
            raise UserDeleted(f"user {record.clerk_id} was deleted")
        self._count("stored")
        return user

