"""Just-in-time user sync: the signed-in user's row, fetched from Clerk when the webhook is late.

``get_auth_user`` costs one indexed query when the row exists. When it does not (the sign-up race:
the user's first request beats ``user.created``), it fetches the user from Clerk once — single-flight
across threads and event loops, until the fetch is stored, and within the shared budget — upserts it
through the same guarded write as the webhook path (``Writer.apply(Upsert(...))``), and returns it.
Whichever of webhook and JIT lands first, the other is a no-op, so the row ends the same.

Usage::

    users = JitUsers(store, clerk=ClerkClient.from_settings(settings))
    user = users.get_auth_user(auth.user_id)          # or: await users.aget_auth_user(...)

Errors: :class:`~clerk_sync.errors.UserDeleted` (410), :class:`~clerk_sync.errors.UserBanned` (403; its
leaves :class:`~clerk_sync.errors.UserLocked` and :class:`~clerk_sync.errors.UserDeprovisioned` too),
:class:`~clerk_sync.errors.ClerkUnavailable` / :class:`~clerk_sync.errors.RateLimited` (503 with
``retry_after``) when the row is missing and Clerk cannot be asked within ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import anyio
import sqlalchemy as sa
from anyio import CapacityLimiter, to_thread

from clerk_sync._time import as_utc, utcnow
from clerk_sync.clerk_api import AsyncClerkClient, ClerkClient
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import (
    ClerkAPIError,
    ClerkNotFound,
    ClerkUnavailable,
    EventShapeError,
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


class _Fetch:
    """One user's fetch under way, from the Clerk call to the upsert and its being counted in the interval: who
    asks for that user meanwhile (a thread, or a task of any event loop) waits for it instead of asking Clerk
    again. It ends only once its outcome is recorded, so no request finds neither it nor the outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.user: AuthUser | None = None
        self.error: BaseException | None = None
        self.abandoned = False  # its leader never finished (cancelled, interrupted): a follower takes over
        self.found: bool | None = None  # what Clerk said (None: nothing, or not asked), for the interval
        self.callers = 1  # the requests sharing it
        self.wakers: list[Callable[[], None]] = []  # the async followers' (thread-safe)
        self.loop: int | None = None  # an async leader's: the thread its event loop runs in

    def outcome(self) -> AuthUser:
        """The leader's user (a copy: nobody sees another caller's mutations), or its error again."""
        if self.error is not None:
            try:
                error = copy.copy(self.error)
            except TypeError:  # an exception its own constructor cannot rebuild: the leader's, shared
                raise self.error from None
            raise error from self.error
        return copy.deepcopy(self.user)  # type: ignore[return-value]


def _waker() -> tuple[anyio.Event, Callable[[], None]] | None:
    """An event of the running asyncio loop and a function setting it from any thread (None: not asyncio)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio: see _await
        return None
    event = anyio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(event.set)
    return event, wake


async def _await(fetch: _Fetch, woken: anyio.Event | None, left: float) -> bool:
    """Wait ``left`` seconds at most for ``fetch`` on the event loop; whether it ended. Off asyncio (trio) in a
    worker thread of its own: never one of anyio's default threads, which the fetch's upsert may need."""
    with anyio.move_on_after(left):
        if woken is not None:
            await woken.wait()
        else:
            await to_thread.run_sync(fetch.done.wait, left, limiter=CapacityLimiter(1))
    return fetch.done.is_set()


class JitUsers:
    """The signed-in user's row, with a just-in-time fetch from Clerk; one instance per app.

    Pass ``clerk`` for the blocking methods, ``aclerk`` for the async ones (or both).
    ``timeout_s`` bounds the Clerk part of a call, waiting for the budget and retries included.

    Requests for a user whose fetch is under way (threads and tasks, both faces) wait for it, its upsert
    included, up to ``timeout_s`` and a second, and share its outcome: one Clerk call, not one per request.

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
        self._fetches: dict[str, _Fetch] = {}  # user -> its fetch under way
        self._fetched_lock = threading.Lock()  # both, held for no I/O

    def _usable(self, user: AuthUser) -> AuthUser:
        return _usable(user, _now_ms(self._wall))

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.jit.labels(outcome=outcome).inc()

    def _claim(self, user_id: str, waker: Callable[[], None] | None = None, *,
               recent: bool = True) -> tuple[_Fetch, bool] | bool:
        """In one step, so that no request falls between a fetch ending and its being recorded: the user's fetch
        under way to wait for (``(fetch, False)``), or what Clerk said (found or not) within the interval, or
        a new fetch for the caller to lead (``(fetch, True)``). ``waker``: an async follower's."""
        with self._fetched_lock:
            fetch = self._fetches.get(user_id)
            if fetch is not None:
                fetch.callers += 1
                if waker is not None:
                    fetch.wakers.append(waker)
                return fetch, False
            last = self._fetched_at.get(user_id)
            if recent and last is not None and self._clock() - last[0] < self.refresh_interval_s:
                return last[1]
            fetch = self._fetches[user_id] = _Fetch()
            return fetch, True

    def _recent(self, user_id: str, found: bool) -> AuthUser | None:
        """The stored row of a user fetched within the interval (None: not stored; fetch now)."""
        if not found:
            self._count("throttled")
            raise UserDeleted(f"user {user_id} does not exist in Clerk")
        user = self._read(user_id)
        if user is not None:
            self._count("throttled")
        return user

    def _end(self, user_id: str, fetch: _Fetch) -> None:
        """Record the fetch's outcome in the interval and end it, in one step (see :meth:`_claim`); then wake
        its followers. A failed fetch is not recorded: the next request asks Clerk again."""
        with self._fetched_lock:
            del self._fetches[user_id]
            if fetch.found is not None and self.refresh_interval_s > 0:
                self._fetched_at[user_id] = (self._clock(), fetch.found)
                self._fetched_at.move_to_end(user_id)
                while len(self._fetched_at) > self.max_tracked_users:
                    self._fetched_at.popitem(last=False)
            wakers, fetch.wakers = fetch.wakers, []
        fetch.done.set()
        for wake in wakers:
            wake()

    def _waited(self, user_id: str) -> ClerkUnavailable:
        self._count("unavailable")
        return ClerkUnavailable(f"waited {self.timeout_s + 1.0:.1f}s for user {user_id}'s fetch from Clerk (another "
                                "request's, still under way); try again shortly", retry_after=1.0)

    # -- blocking ---------------------------------------------------------------------------
    def get_auth_user(self, user_id: str) -> AuthUser:
        """The user's row; fetched from Clerk and stored first if the webhook has not arrived yet."""
        user = self._read(user_id)
        if user is None:
            user = self._refresh(user_id, missing=True)
        return self._usable(user)

    def refresh_user(self, user_id: str, *, check: bool = True) -> AuthUser:
        """Fetch the user from Clerk now and upsert it (after sign-up: ``POST /sync/me``); at most once per
        ``refresh_interval_s`` a user (within it: the stored row)."""
        user = self._refresh(user_id)
        return self._usable(user) if check else user

    def _refresh(self, user_id: str, *, missing: bool = False) -> AuthUser:
        """The user from one fetch per interval: this caller's, or the one under way (waited for, up to the
        Clerk part's ``timeout_s`` and a second for its upsert). ``missing``: the caller found no row."""
        if self.clerk is None:
            raise TypeError("JitUsers needs clerk=ClerkClient(...) for blocking calls")
        deadline = time.monotonic() + self.timeout_s + 1.0
        recent = True
        while True:
            claim = self._claim(user_id, recent=recent)
            if isinstance(claim, bool):
                user = self._recent(user_id, claim)
                if user is not None:
                    return user
                recent = False
                continue
            fetch, leader = claim
            if leader:
                return self._lead(user_id, fetch, missing)
            if fetch.loop == threading.get_ident():  # a blocking call in a task of the loop leading the fetch:
                return self._fetch(user_id, _Fetch(), missing)  # waiting would hold that loop up, fetch alone
            if not fetch.done.wait(max(0.0, deadline - time.monotonic())):
                raise self._waited(user_id)
            if not fetch.abandoned:
                return fetch.outcome()

    def _lead(self, user_id: str, fetch: _Fetch, missing: bool) -> AuthUser:
        try:
            fetch.user = self._fetch(user_id, fetch, missing)
            return fetch.user
        except Exception as exc:
            fetch.error = exc
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: this thread's, not the followers'
            fetch.abandoned = True
            raise
        finally:
            self._end(user_id, fetch)

    def _fetch(self, user_id: str, fetch: _Fetch, missing: bool) -> AuthUser:
        assert self.clerk is not None
        # Read first whatever ``missing`` is: an erased user (refused by _read) costs no Clerk call, refresh or not
        if (user := self._read(user_id)) is not None and missing:
            return user  # stored since the caller's read (a fetch that just ended, the webhook): no Clerk call
        try:
            data = _asked_for(user_id, self.clerk.get_user(user_id, deadline_s=self.timeout_s))
        except ClerkNotFound:
            self._count("not_found")
            fetch.found = False
            raise UserDeleted(f"user {user_id} does not exist in Clerk") from None
        except ClerkAPIError as exc:
            self._count(_failure(exc))
            raise
        try:
            user = self._store(data, _now_ms(self._wall))  # fetched now: the base of a lockout's end
        except UserDeleted:
            fetch.found = False  # erased here since the read: 410 for the interval, as Clerk's 404
            raise
        fetch.found = True
        return user

    # -- async ------------------------------------------------------------------------------
    async def aget_auth_user(self, user_id: str) -> AuthUser:
        """Async :meth:`get_auth_user`: the database runs in a worker thread, Clerk on the event loop."""
        user = await to_thread.run_sync(self._read, user_id)
        if user is None:
            user = await self._arefresh(user_id, missing=True)
        return self._usable(user)

    async def arefresh_user(self, user_id: str, *, check: bool = True) -> AuthUser:
        """Async :meth:`refresh_user`."""
        user = await self._arefresh(user_id)
        return self._usable(user) if check else user

    async def _arefresh(self, user_id: str, *, missing: bool = False) -> AuthUser:
        """Async :meth:`_refresh`: one fetch shared with the blocking face's callers too."""
        if self.aclerk is None:
            raise TypeError("JitUsers needs aclerk=AsyncClerkClient(...) for async calls")
        deadline = time.monotonic() + self.timeout_s + 1.0
        recent = True
        while True:
            waiting = _waker()
            claim = self._claim(user_id, waiting[1] if waiting else None, recent=recent)
            if isinstance(claim, bool):
                user = await to_thread.run_sync(self._recent, user_id, claim)
                if user is not None:
                    return user
                recent = False
                continue
            fetch, leader = claim
            if leader:
                return await self._alead(user_id, fetch, missing)
            if not await _await(fetch, waiting[0] if waiting else None, deadline - time.monotonic()):
                raise self._waited(user_id)
            if not fetch.abandoned:
                return fetch.outcome()

    async def _alead(self, user_id: str, fetch: _Fetch, missing: bool) -> AuthUser:
        fetch.loop = threading.get_ident()
        try:
            fetch.user = await self._afetch(user_id, fetch, missing)
            return fetch.user
        except Exception as exc:
            fetch.error = exc
            raise
        except BaseException:  # cancelled (or KeyboardInterrupt): a waiting follower takes over
            fetch.abandoned = True
            raise
        finally:
            self._end(user_id, fetch)

    async def _afetch(self, user_id: str, fetch: _Fetch, missing: bool) -> AuthUser:
        assert self.aclerk is not None
        # The leader's database work runs in a thread of its own, never one of anyio's default pool: blocking
        # requests waiting for this fetch (a sync route's, in that pool) could hold every one of those threads.
        if (user := await to_thread.run_sync(self._read, user_id, limiter=CapacityLimiter(1))) is not None and missing:
            return user  # (read whatever ``missing`` is: see _fetch)
        try:
            # The client's deadline already bounds the call; this is the belt to its braces.
            with anyio.fail_after(self.timeout_s + 1.0):
                data = _asked_for(user_id, await self.aclerk.get_user(user_id, deadline_s=self.timeout_s))
        except ClerkNotFound:
            self._count("not_found")
            fetch.found = False
            raise UserDeleted(f"user {user_id} does not exist in Clerk") from None
        except ClerkAPIError as exc:
            self._count(_failure(exc))
            raise
        except TimeoutError:
            self._count("unavailable")
            raise ClerkUnavailable(f"Clerk did not answer within {self.timeout_s}s", retry_after=1.0) from None
        try:
            user = await to_thread.run_sync(self._store, data, _now_ms(self._wall), limiter=CapacityLimiter(1))
        except UserDeleted:
            fetch.found = False  # see _fetch
            raise
        fetch.found = True
        return user

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
        try:
            record = user_record(data, fetched_ms=fetched_ms)
        except EventShapeError as exc:  # Clerk's answer, not the caller's request: a 502, never the client's 422
            self._count("error")
            raise ClerkAPIError(
                f"GET /users/{str(data.get('id'))[:64]} answered a user object clerk-sync cannot read ({exc}); "
                "nothing stored (is CLERK_API_URL Clerk's API, with no proxy rewriting its answers in between?)",
                method="GET", path=f"/users/{str(data.get('id'))[:64]}") from exc

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

