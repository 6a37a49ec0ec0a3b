"""Request-time authorisation, framework-free: who is calling (token), may they (DB-confirmed roles),
and what admins did (audit). No Clerk call on the request path.

The integrations (``integrations/starlette.py``, ``integrations/fastapi.py``) are thin shells over
:class:`Authenticator`; every check here stands on its own, whether or not a middleware ran first.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from anyio import to_thread

from clerk_sync._db_errors import driver_cursor
from clerk_sync._limits import show
from clerk_sync._time import as_utc, utcnow
from clerk_sync.auth.admin import ADMIN_ROLE
from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.jwks import JWKSKeySource
from clerk_sync.auth.sessions import SessionVerifier, check_request_origin, token_from_request
from clerk_sync.auth.users import AuthUser, read_user, standing_error
from clerk_sync.errors import (
    AccessDenied,
    ClerkSyncError,
    ImpersonationEnded,
    SessionUserBanned,
    StoreError,
    TokenMissing,
    UserBanned,
    UserDeleted,
    UserDeprovisioned,
    UserLocked,
)
from clerk_sync.events import believed_end, same_org_role
from clerk_sync.metrics import Metrics
from clerk_sync.store import Store
from clerk_sync.tables import organization_memberships, revoked_sessions, users

__all__ = ["Authenticator", "DenyList", "UserLoader", "signed_out_if_banned", "warn_if_any_origin"]

log = structlog.get_logger("clerk_sync.auth")


@contextmanager
def signed_out_if_banned() -> Iterator[None]:
    """A user loader's own refusal of a banned or deleted user (the JIT loader's 403 ``UserBanned``, 410
    ``UserDeleted``) as the table loader's: the session is signed out (401), whichever loader read the row
    and whichever face asked."""
    try:
        yield
    except (UserLocked, UserDeprovisioned):
        raise  # 403 from every loader: signing in again cannot help (they subclass UserBanned)
    except (UserBanned, UserDeleted) as exc:
        raise SessionUserBanned("user is banned or deleted") from exc


# Set while an async caller checks a token: it refreshed the deny list in a worker thread just before,
# so the checks that follow (SessionVerifier's is_revoked, the blocked users) serve that snapshot rather
# than read the database on the event loop (a refresh interval of 0 is always due). Per task: the sync
# path, in other threads, refreshes as before.
_snapshot_only: ContextVar[bool] = ContextVar("clerk_sync_deny_list_snapshot_only", default=False)


class DenyList:
    """Revoked sessions and blocked users (banned, deleted, deprovisioned, locked), read from the DB at
    most every ``refresh_s``.

    Serves :class:`~clerk_sync.auth.sessions.RevocationCheck`. A periodic refresh (not a query per
    request) keeps the protected path cheap; replicas see a revocation within ``refresh_s``.
    Refreshes are incremental: rows stamped no earlier than the latest stamp already read *minus a
    margin*, because on PostgreSQL transactions commit out of id/timestamp order (a revocation inserted
    first can become visible last). That watermark comes from the rows (``revoked_sessions.revoked_at``,
    ``users.updated_at``: the webhook receiver's clock), never from this process's clock, so a receiver
    whose clock is behind this host's (by more than the margin) does not hide its revocations. Expired
    revocations are dropped, so the set stays the size of live sessions. Every
    ``full_every_s`` a refresh reads everything again: a ban whose transaction committed later than the
    margin after it began (database timeouts disabled) is then seen too, not missed until a restart.

    While one thread refreshes, the others serve the previous snapshot (the first load: they wait for it, up
    to ``hung_after_s`` + ``wait_s``), unless that refresh has been running for ``hung_after_s`` (10 s): stuck on
    a database that holds the connection and never answers (a hung pooler, a paused host), the previous snapshot
    served for as long as the hang lasted let every session revoked and user banned since in (review). They wait
    up to ``wait_s`` for it then, and are refused with :class:`~clerk_sync.errors.StoreError` (503). A refresh
    that is only slow (a full reload of a large table, a first load) is waited for, never refused.
    """

    def __init__(self, store: Store, *, refresh_s: float = 1.0, margin_s: float = 60.0, full_every_s: float = 600.0,
                 now: Callable[[], float] = time.monotonic, wall: Callable[[], datetime] = utcnow,
                 hung_after_s: float = 10.0, wait_s: float = 5.0) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._hung_after_s = hung_after_s
        self._wait_s = wait_s
        self._refreshing_since: float | None = None  # when the refresh in progress began (``now``)
        self._full_every_s = full_every_s
        self._full_at: float | None = None
        self._margin = timedelta(seconds=margin_s)
        self._now = now
        self._wall = wall
        self._revoked: dict[str, int | None] = {}  # session id -> session expire_at (ms)
        self._blocked_users: dict[str, str] = {}  # user id -> why: banned, deleted, deprovisioned, locked
        # user id -> when the lock of a user blocked as "locked" ends (ms). Clerk sends nothing when a lockout
        # expires (no event, no updated_at), so no refresh would see it: the end is compared at lookup.
        self._lock_ends: dict[str, int] = {}
        # The latest revoked_at / users.updated_at read (the writers' clocks; None: none yet, an empty table).
        self._marks: tuple[datetime | None, datetime | None] = (None, None)
        self._loaded_at: float | None = None
        self._lock = threading.Lock()

    def is_revoked(self, session_id: str) -> bool:
        self.refresh_if_due()
        return session_id in self._revoked

    def is_user_blocked(self, user_id: str) -> bool:
        return self.blocked_reason(user_id) is not None

    def blocked_reason(self, user_id: str) -> str | None:
        """``banned``, ``deleted``, ``deprovisioned`` or ``locked`` for a blocked user, else None. A lock
        counts until its end (``users.locked_until``), compared with this list's ``wall`` clock now."""
        self.refresh_if_due()
        reason = self._blocked_users.get(user_id)
        if reason == "locked":
            ends = self._lock_ends.get(user_id)
            if ends is not None and self.now_ms() >= ends:
                return None
        return reason

    def now_ms(self) -> int:
        """This list's wall clock (``wall``), in epoch milliseconds: what a lockout's end is compared with."""
        return int(as_utc(self._wall()).timestamp() * 1000)  # (a naive clock is UTC, not the host's zone)

    def due(self) -> bool:
        """True when the next check would query the DB (async callers refresh off the event loop)."""
        return self._loaded_at is None or self._now() - self._loaded_at >= self._refresh_s

    def refresh(self) -> None:
        """Read revocations and user bans/deletions changed since the last refresh (all, the first time)."""
        wall = self._wall()
        now_ms = int(as_utc(wall).timestamp() * 1000)
        r, u = revoked_sessions, users
        kept_from = now_ms - _REVOCATION_OUTLIVES_EXPIRY_MS  # (a token minted just before expire_at lives on)
        live = sa.or_(r.c.expire_at.is_(None), r.c.expire_at > kept_from)
        revocations = sa.select(r.c.session_id, r.c.expire_at, r.c.revoked_at).where(live)
        changed_users = sa.select(u.c.clerk_id, u.c.banned, u.c.deleted_at, u.c.deprovisioned, u.c.locked,
                                  u.c.locked_until, u.c.clerk_updated_at, u.c.lock_version, u.c.updated_at)
        full = self._full_at is None or self._now() - self._full_at >= self._full_every_s
        revoked_mark, user_mark = self._marks
        if full:
            lock_lasts = sa.and_(u.c.locked.is_(True), sa.or_(  # (no end, a future one, or one not believed)
                u.c.locked_until.is_(None), u.c.locked_until > now_ms, u.c.locked_until < u.c.clerk_updated_at,
                u.c.lock_version.is_(None), u.c.lock_version != u.c.clerk_updated_at))
            changed_users = changed_users.where(sa.or_(u.c.banned.is_(True), u.c.deleted_at.is_not(None),
                                                       u.c.deprovisioned.is_(True), lock_lasts))
            # The watermarks of a full reload: the latest stamps in the tables (read first: a row committed
            # after is stamped no earlier than them minus the margin, as for an incremental refresh).
            latest = sa.select(sa.select(sa.func.max(r.c.revoked_at)).scalar_subquery(),
                               sa.select(sa.func.max(u.c.updated_at)).scalar_subquery())
        else:
            # Rows stamped since the latest stamp read, minus the margin, by the writers' clocks (the
            # receiver's): this host's clock is no measure of theirs. No stamp yet (an empty table): all.
            if revoked_mark is not None:
                revocations = revocations.where(r.c.revoked_at >= revoked_mark - self._margin)
            if user_mark is not None:
                changed_users = changed_users.where(u.c.updated_at >= user_mark - self._margin)
        with self._store.connect() as conn:
            if full:
                revoked_mark, user_mark = conn.execute(latest).one()
            new_revocations = conn.execute(revocations).all()
            user_rows = conn.execute(changed_users).all()
        # A full reload is the whole truth (what is no longer blocked or revoked goes too), built aside and
        # swapped in: other threads keep reading the previous sets meanwhile, never an emptied one.
        revoked, blocked, lock_ends = ({}, {}, {}) if full else (self._revoked, self._blocked_users, self._lock_ends)
        for session_id, expire_at, revoked_at in new_revocations:
            revoked[session_id] = expire_at
            revoked_mark = _later(revoked_mark, revoked_at)
        for (clerk_id, banned, deleted_at, deprovisioned, locked, locked_until, version, lock_version,
             updated_at) in user_rows:
            user_mark = _later(user_mark, updated_at)
            reason = _block_reason(banned, deleted_at, deprovisioned, locked)
            locked_until = believed_end(locked_until, version, lock_version)  # (an earlier lock's end is none)
            # (the end first: a reader between the two sees a "locked" with its end, or the old entry)
            if reason == "locked" and locked_until is not None:
                lock_ends[clerk_id] = locked_until
            if reason is not None:
                blocked[clerk_id] = reason
            else:
                blocked.pop(clerk_id, None)
            if reason != "locked" or locked_until is None:
                lock_ends.pop(clerk_id, None)
        if full:
            self._revoked, self._blocked_users, self._lock_ends = revoked, blocked, lock_ends
            self._full_at = self._now()
        for session_id in [s for s, exp in self._revoked.items() if exp is not None and exp <= kept_from]:
            del self._revoked[session_id]
        # No later than this host's clock: a row stamped in the future (a writer whose clock is ahead, or jumped)
        # would lift the mark past the stamps of every writer with a right clock, whose revocations and bans the
        # refreshes would then skip until the full reload, and again after it (review). Read again meanwhile.
        self._marks = (_no_later_than(revoked_mark, wall), _no_later_than(user_mark, wall))
        self._loaded_at = self._now()

    def refresh_if_due(self) -> None:
        if _snapshot_only.get() or not self.due():
            return
        # One thread refreshes; the others serve the previous snapshot meanwhile, unless there is none yet (they
        # wait for the first load) or that refresh hangs (they wait a little, then refuse).
        if not self._lock.acquire(blocking=False):
            since = self._refreshing_since
            hung = since is not None and self._now() - since >= self._hung_after_s
            if self._loaded_at is not None and not hung:
                return
            wait = self._wait_s if hung else self._hung_after_s + self._wait_s
            if not self._lock.acquire(timeout=wait):
                raise StoreError(
                    "the deny list (revoked sessions, banned users) could not be read: its refresh has waited on the "
                    f"database for {self._now() - (since or self._now()):.0f} s (and {wait:g} s more here), and "
                    "serving an older list would let sessions revoked since in. Is the database (or a pooler in "
                    "front of it) answering? The next request tries again")
        try:
            if self.due():
                self._refreshing_since = self._now()
                try:
                    self.refresh()
                finally:
                    self._refreshing_since = None
        finally:
            self._lock.release()


# How long a revoked session stays on the list past its expire_at: a session token minted just before it lives
# its 60 s, and is accepted within the token check's clock-skew leeway after that; nothing says Clerk caps a
# token's exp at its session's expiry, so the revocation must outlive both: 60 s, the largest leeway
# (CLERK_SYNC_SESSION_LEEWAY_S, 300 s) and a minute for the clocks.
_REVOCATION_OUTLIVES_EXPIRY_MS = (60 + 300 + 60) * 1000


def _later(mark: datetime | None, stamp: datetime | None) -> datetime | None:
    return stamp if mark is None or (stamp is not None and stamp > mark) else mark


def _no_later_than(mark: datetime | None, wall: datetime) -> datetime | None:
    """``mark``, or ``wall`` when that is earlier, compared as the column gave it (SQLite's naive UTC)."""
    if mark is None:
        return None
    if mark.tzinfo is None:
        wall = (wall.astimezone(UTC) if wall.tzinfo is not None else wall).replace(tzinfo=None)
    elif wall.tzinfo is None:
        wall = wall.replace(tzinfo=UTC)
    return min(mark, wall)


def _block_reason(banned: bool, deleted_at: datetime | None, deprovisioned: bool, locked: bool) -> str | None:
    for reason, flag in (("deleted", deleted_at is not None), ("banned", banned),
                         ("deprovisioned", deprovisioned), ("locked", locked)):
        if flag:
            return reason
    return None


UserLoader = Callable[[str], AuthUser | None]
# What a refusal calls a request whose method the caller did not give (no safe method: it is checked).
_UNKNOWN_METHOD = "request of unknown method (authenticate() got no method=, so it is taken as unsafe)"


def warn_if_any_origin(authenticator: Authenticator) -> bool:
    """Say once, at start-up (the faces' ``install``/``init_app``), that tokens' ``azp`` goes unchecked while
    ``CLERK_AUTHORIZED_PARTIES`` is unset, as Django's check W002 and ``clerk-sync doctor`` say it: a token
    the Clerk instance minted for any origin is accepted. A warning, not a refusal (Clerk makes it optional);
    returns whether it warned."""
    if authenticator.verifier.claims.authorized_parties is not None:
        return False
    log.warning("clerk_authorized_parties_unset",
                problem="the azp claim of session tokens is not checked: a token your Clerk instance minted for "
                        "any origin (another app or satellite domain of the instance) is accepted here",
                fix="set CLERK_AUTHORIZED_PARTIES to your front end's origins, comma-separated "
                    "(e.g. https://app.example.com,http://localhost:3000)")
    return True


class Authenticator:
    """Turns a request's headers/cookies into an :class:`Auth`, and answers role questions from the DB.

    ``metrics``: the app's :class:`~clerk_sync.metrics.Metrics` (the processor's), where each
    :meth:`authenticate` / :meth:`aauthenticate` counts its outcome once: ``clerk_sync_auth_authenticated_total``,
    or ``clerk_sync_auth_refused_total{code}`` (a request without any session token is anonymous: neither). The
    verifier's JWKS fetches count there too (``clerk_sync_jwks_fetches_total{outcome}``)."""

    def __init__(self, verifier: SessionVerifier, store: Store, *, deny_list: DenyList | None = None,
                 load_user: UserLoader | None = None,
                 impersonator_roles: frozenset[str] | None = frozenset({ADMIN_ROLE}),
                 metrics: Metrics | None = None) -> None:
        self.verifier = verifier
        self.metrics = metrics
        if metrics is not None and isinstance(verifier.keys, JWKSKeySource) and verifier.keys.metrics is None:
            verifier.keys.metrics = metrics
        self.store = store
        # The roles an impersonating user of this app must still hold (None: any role, standing only):
        # AdminActions.start_impersonation grants actor tokens to admins, so an admin demoted since ends it.
        self.impersonator_roles = impersonator_roles
        self.deny_list = deny_list or DenyList(store)
        if verifier.revocations is None:
            verifier.revocations = self.deny_list
        self._load_user = load_user or self._user_from_table

    def _deny_lists(self) -> tuple[DenyList, ...]:
        """This authenticator's list, and the verifier's when that is another one (a verifier given its own, or
        shared with another authenticator): below, in snapshot mode, neither refreshes by itself, so the
        verifier's was never read and every revoked session was let in on the async path (review)."""
        other = self.verifier.revocations
        return (self.deny_list, other) if isinstance(other, DenyList) and other is not self.deny_list \
            else (self.deny_list,)

    # -- who -------------------------------------------------------------------------------------
    def authenticate(self, headers: Mapping[str, str], cookies: Mapping[str, str], *, method: str | None = None,
                     scheme: str | None = None, trusted_origins: Sequence[str] = ()) -> Auth:
        """Verify the request's session token (401 errors) and refuse blocked users: banned/deleted as
        signed out (401), deprovisioned/locked with 403 (signing in again cannot help).

        A session read from the ``__session`` cookie must come from an allowed origin (403
        :class:`~clerk_sync.errors.CrossSiteRequest`; see :func:`~clerk_sync.auth.sessions.check_request_origin`):
        browsers attach the cookie to requests other sites make. Pass the request's ``method`` (and ``scheme``,
        for its own origin; Django passes its ``CSRF_TRUSTED_ORIGINS`` as ``trusted_origins``), as every
        integration does: an unsafe request (POST, PUT, PATCH, DELETE...) must then carry an allowed ``Origin``,
        else ``Referer``, and a safe one is not checked.

        Without ``method`` the request is taken as unsafe, never as safe: an ``Origin`` it carries must be
        allowed, so a caller who forgot the method does not serve forged POSTs (every browser sends ``Origin``
        on every cross-origin request but a GET/HEAD navigation, ``null`` when it hides it). A request with no
        ``Origin`` passes, as it must for a link followed or a page typed in, which carry none; only the
        method tells a POST without ``Origin`` (an old browser) from those, so pass it for the full rule.
        This is not a :class:`~clerk_sync.errors.ConfigError` for a missing method: callers outside an HTTP
        request (a websocket handshake, the console's sign-in) have none to give, and a Bearer token (no
        ambient credential) needs no check at all.
        """
        try:
            token = token_from_request(headers, cookies, suffix=self.verifier.cookie_suffix)
            self._check_site(headers, method, scheme, trusted_origins)
            auth = self._check_user(self.verifier.verify(token))
            if auth.actor_id is not None:
                self._check_actor(auth)
        except ClerkSyncError as exc:
            self._count_refusal(exc)
            raise
        if self.metrics is not None:
            self.metrics.authenticated()
        return auth

    async def aauthenticate(self, headers: Mapping[str, str], cookies: Mapping[str, str], *,
                            method: str | None = None, scheme: str | None = None,
                            trusted_origins: Sequence[str] = ()) -> Auth:
        """Async :meth:`authenticate`: the deny list is refreshed in a worker thread, then only read (no
        database query on the event loop, even with a refresh interval of 0)."""
        try:
            # first: an anonymous request never touches the DB
            token = token_from_request(headers, cookies, suffix=self.verifier.cookie_suffix)
            self._check_site(headers, method, scheme, trusted_origins)
            for deny_list in self._deny_lists():  # their DB reads run in a worker thread, never on the event loop
                if deny_list.due():
                    await to_thread.run_sync(deny_list.refresh_if_due)
            snapshot = _snapshot_only.set(True)  # ...nor again below, on the loop (see _snapshot_only)
            try:
                auth = self._check_user(await self.verifier.averify(token))
            finally:
                _snapshot_only.reset(snapshot)
            if auth.actor_id is not None:  # its DB read in a worker thread too
                await to_thread.run_sync(self._check_actor, auth)
        except ClerkSyncError as exc:
            self._count_refusal(exc)
            raise
        if self.metrics is not None:
            self.metrics.authenticated()
        return auth

    def _count_refusal(self, exc: ClerkSyncError) -> None:
        """``clerk_sync_auth_refused_total{code}``; a request with no session at all is anonymous, not counted."""
        if self.metrics is not None and not isinstance(exc, TokenMissing):
            self.metrics.auth_refused(exc.code)

    def _check_site(self, headers: Mapping[str, str], method: str | None, scheme: str | None,
                    trusted_origins: Sequence[str]) -> None:
        """The cross-site request check (see :meth:`authenticate`; Bearer requests pass it)."""
        if method is None:  # unknown: unsafe, as far as the headers can tell (see authenticate)
            if headers.get("origin") is None:
                return
            method = _UNKNOWN_METHOD
        check_request_origin(method, headers, scheme=scheme, authorized_parties=self.verifier.claims.authorized_parties,
                             trusted_origins=trusted_origins)

    def _check_user(self, auth: Auth) -> Auth:
        # (the impersonating admin, if any: _check_actor, read fresh after this)
        reason = self.deny_list.blocked_reason(auth.user_id)
        if reason == "deprovisioned":
            raise UserDeprovisioned(f"user {auth.user_id} was deprovisioned by the organization's identity provider")
        if reason == "locked":
            raise UserLocked(f"user {auth.user_id} is locked in Clerk (too many failed sign-ins)")
        if reason is not None:
            raise SessionUserBanned("user is banned or deleted")
        return auth

    def _check_actor(self, auth: Auth) -> None:
        """An impersonation lasts while its admin is one: read now, not from the deny list's snapshot (one
        indexed query, on impersonated requests only, which write an audit row each anyway). An actor with
        no row here is no user of the app's (an impersonation from the Clerk Dashboard): not ours to judge."""
        actor = read_user(self.store, auth.actor_id or "")
        if actor is None:
            return
        if standing_error(actor, self.deny_list.now_ms()) is not None:
            raise ImpersonationEnded(f"the admin impersonating this user ({actor.clerk_id}) is banned, deleted, "
                                     "locked or deprovisioned: the impersonation has ended")
        if self.impersonator_roles is not None and actor.role not in self.impersonator_roles:
            raise ImpersonationEnded(f"the admin impersonating this user ({actor.clerk_id}) no longer has the role "
                                     f"{sorted(self.impersonator_roles)}: the impersonation has ended")
        # Nor past the target becoming an admin or an impersonator (promoted, or a late webhook): the admin
        # would act with those powers under the target's name, what AdminActions refuses at the grant.
        target = read_user(self.store, auth.user_id)
        if target is not None and target.role in {ADMIN_ROLE} | set(self.impersonator_roles or ()):
            raise ImpersonationEnded(f"the impersonated user ({target.clerk_id}) holds the role {show(target.role)}, "
                                     "which may administer or impersonate: the impersonation has ended")

    # -- may they --------------------------------------------------------------------------------
    def user(self, auth: Auth) -> AuthUser:
        """The caller's DB row, read now (so a ban or deprovisioning applies at once, before the deny
        list's next refresh): 403 when it does not exist yet or is deprovisioned/locked (until the lock's end,
        by the deny list's clock), 401 when banned/deleted."""
        with signed_out_if_banned():
            user = self._load_user(auth.user_id)
        if user is None:
            raise AccessDenied("no user row yet for this session (webhook not arrived; use JIT sync)")
        refusal = standing_error(user, self.deny_list.now_ms())
        if user.banned or user.deleted_at is not None:
            raise SessionUserBanned("user is banned or deleted")
        if refusal is not None:
            raise refusal
        return user

    def require_role(self, auth: Auth, *roles: str) -> AuthUser:
        """Confirm the role against the DB, not only the token claim: a demoted admin loses access at once."""
        user = self.user(auth)
        if user.role not in roles:
            raise AccessDenied(f"role {user.role!r} is not one of {sorted(roles)}")
        return user

    @staticmethod
    def require_org_role(auth: Auth, *roles: str) -> Auth:
        """The session token's active organization role is one of ``roles`` (``"org:admin"``...): the token
        only, valid until it expires. Kept for direct callers; the guards use :meth:`confirm_org_role`, which
        also refuses a member removed or demoted since the token was issued."""
        if auth.org_id is None or auth.org_role is None or not _org_role_in(auth.org_role, roles):
            raise AccessDenied(f"active organization role must be one of {sorted(roles)}")
        return auth

    def confirm_org_role(self, auth: Auth, *roles: str, standing: Auth | None = None) -> Auth:
        """:meth:`require_org_role`, confirmed against ``organization_memberships`` (as :meth:`require_role`
        confirms app roles): the token's claims last until it expires, so a member removed from the
        organization or demoted would keep them. Blocking (one indexed query, only when the token passes):
        async callers run it in a worker thread. ``standing``: :meth:`standing_org_role`'s answer already read
        for this request, judged instead of reading again (one read a request, whichever guards ask); one made
        from another session is refused (``ValueError``).

        The token first (403 without a query). Then the caller's standing for the session's organization
        (:meth:`standing_org_role`): a role there not in ``roles`` is refused (403: the row's, when its webhook
        is no older than the token), and so is a membership deleted here (403, no longer a member; an
        organization deleted tombstones its memberships). Returns that standing ``auth``."""
        self.require_org_role(auth, *roles)
        standing = self.standing_org_role(auth) if standing is None else _of_session(standing, auth)
        if standing.org_role is None:
            raise AccessDenied(_deleted(auth))
        if not _org_role_in(standing.org_role, roles):
            raise AccessDenied(f"organization role {show(standing.org_role)} in the database (its membership's "
                               f"latest webhook, no older than the session token, which says {show(auth.org_role)}) "
                               f"is not one of {sorted(roles)}")
        # The confirmed role, not the token's: a guard admitting several roles would otherwise hand the view
        # a role the member no longer has (and the permissions of the one it had: see standing_org_role)
        return standing

    def standing_org_role(self, auth: Auth) -> Auth:
        """``auth`` with its active organization as ``organization_memberships`` has it now: a membership
        deleted there leaves no active organization (``org_id``, ``org_slug``, ``org_role`` None, no
        ``org_permissions``: what Clerk's next token will say), whenever it was deleted (a member re-added gets
        a new membership, which its webhook brings); a role changed there replaces the token's, whose permissions
        are then kept only where the row lists them too (see :func:`_held`), unless the row is older than the
        token (its ``clerk_updated_at`` before the token's ``iat`` by more than the token check's clock-skew
        leeway: the webhook that changed the role since is late, Svix retries for a day), whose answer then
        stands. ``auth`` itself (the token stands) without an
        organization, with the same role, or without a row (its ``organizationMembership.created`` may not have
        arrived yet). One indexed query when the token names an organization role; blocking (async callers run
        it in a worker thread). What :meth:`confirm_org_role` and :meth:`confirm_permission` judge, and what
        every face shows the app (Starlette's ``request.user.auth``, FastAPI's ``current_auth``, Flask's
        ``current_clerk``, Django's ``request.clerk.auth`` and DRF's ``request.auth``), read once a request.
        ``auth.claims`` stays the token's, as signed."""
        if auth.org_id is None or auth.org_role is None:
            return auth
        row = self._membership(auth.org_id, auth.user_id)
        if row is None:
            return auth
        role, deleted_at, permissions, updated_ms = row
        if deleted_at is not None:
            return dataclasses.replace(auth, org_id=None, org_slug=None, org_role=None, org_permissions=())
        if same_org_role(role) == same_org_role(auth.org_role) or _older_than_token(
                updated_ms, auth, skew_s=self.verifier.claims.leeway_s):
            return auth  # the same role, whichever spelling the token uses; or a row the token is newer than
        return dataclasses.replace(auth, org_role=role, org_permissions=_held(auth.org_permissions, permissions))

    def confirm_permission(self, auth: Auth, permission: str, *, standing: Auth | None = None) -> Auth:
        """:meth:`require_permission`, confirmed against ``organization_memberships`` (as
        :meth:`confirm_org_role` confirms the role): the token first (403 without a query), then the
        permissions of :meth:`standing_org_role`, so a member removed, or whose role changed after the token
        was issued, loses what the database's role does not grant. Returns that standing ``auth``. Blocking (one
        indexed query when the token passes): async callers run it in a worker thread. ``standing``: as for
        :meth:`confirm_org_role`."""
        self.require_permission(auth, permission)
        standing = self.standing_org_role(auth) if standing is None else _of_session(standing, auth)
        if standing.org_id is None:  # (the token named one: it carries the permission)
            raise AccessDenied(_deleted(auth))
        if permission not in standing.org_permissions:
            raise AccessDenied(f"missing permission {permission!r}: the organization role {show(standing.org_role)} "
                               f"in the database (its membership's latest webhook, no older than the session token, "
                               f"which says {show(auth.org_role)}) does not grant it")
        return standing

    def _membership(self, org_id: str, user_id: str) -> tuple[str, datetime | None, object, int | None] | None:
        """The (role, deleted_at, permissions, clerk_updated_at) of the caller's membership of ``org_id``, None
        without one: one
        query on the user's index. A member re-added after a removal has a new membership beside the old
        tombstone: the live one is taken, the latest if there are several."""
        with self.store.connect() as conn:
            sql, decode = _membership_sql(conn.dialect)
            with driver_cursor(conn, "SELECT the caller's membership FROM organization_memberships") as cur:
                cur.execute(sql, (user_id, org_id))
                row = cur.fetchone()
        return None if row is None else (row[0], row[1], row[2] if decode is None else decode(row[2]), row[3])

    @staticmethod
    def guardable_permission(permission: str) -> str:
        """``permission``, refused (``ValueError``) when no session token can carry it: Clerk's tokens carry an
        organization's custom permissions only (``org:invoices:read``), never its system ones (``org:sys_*``),
        so a guard on one would refuse every request. Every face's ``require_permission`` asks it when the
        guard is made."""
        if permission.startswith("org:sys_"):
            raise ValueError(
                f"permission {permission!r} is a Clerk system permission, which session tokens never carry (they "
                "carry custom permissions only): a guard on it would refuse everyone. Guard on the organization "
                "role instead: require_org_role('org:admin') (DRF: HasOrgRole.of(...), Django views: "
                "OrgRoleRequiredMixin), or a custom permission you create in the Clerk Dashboard")
        return permission

    @staticmethod
    def require_permission(auth: Auth, permission: str) -> Auth:
        """``permission`` in the token's active organization. From the token only, valid until it expires:
        kept for direct callers; the guards use :meth:`confirm_permission`, which also refuses a member removed,
        or whose role changed, since. A system permission (``org:sys_*``) is refused (``ValueError``, see
        :meth:`guardable_permission`)."""
        Authenticator.guardable_permission(permission)
        if permission not in auth.org_permissions:
            raise AccessDenied(f"missing permission {permission!r} in the active organization")
        return auth

    @staticmethod
    def forbid_impersonation(auth: Auth) -> Auth:
        """Guard for sensitive routes (billing, password, deleting the account)."""
        if auth.is_impersonated:
            raise AccessDenied("not available while impersonating")
        return auth

    def audit_impersonated_request(self, auth: Auth, method: str, path: str, ip: str | None) -> None:
        """Requests made while impersonating are privileged actions: one audit row each."""
        with self.store.transaction() as w:
            record_audit(w, AuditEntry("impersonation.request", auth.actor_id, auth.user_id,
                                       impersonator=auth.actor_id, details={"method": method, "path": path}, ip=ip))

    def _user_from_table(self, clerk_id: str) -> AuthUser | None:
        return read_user(self.store, clerk_id)


_m = organization_memberships
# The one read most protected requests make (every face's standing, once a request), through the driver:
# SQLAlchemy's execute and row cost ~65 µs of Python a request in process, the driver's ~5 µs (bench/auth.py).
# Only ``deleted_at``'s presence is used, so its column type's processing is not needed; the permissions' is.
_MEMBERSHIP_SQL = ("SELECT role, deleted_at, permissions, clerk_updated_at FROM organization_memberships "
                   "WHERE user_clerk_id = {p} AND organization_clerk_id = {p} "
                   "ORDER BY CASE WHEN deleted_at IS NULL THEN 0 ELSE 1 END, clerk_updated_at DESC LIMIT 1")
_MEMBERSHIP_BY_DIALECT: dict[tuple[str, str], tuple[str, Callable[[Any], object] | None]] = {}


def _membership_sql(dialect: sa.Dialect) -> tuple[str, Callable[[Any], object] | None]:
    """The membership read in ``dialect``'s parameter style, and the permissions column's result processing
    there (JSON text on SQLite and MySQL/MariaDB; psycopg hands JSONB over decoded)."""
    key = (dialect.name, dialect.paramstyle)
    known = _MEMBERSHIP_BY_DIALECT.get(key)
    if known is None:
        mark = "?" if dialect.paramstyle == "qmark" else "%s"  # (psycopg, mysqlclient, PyMySQL: %s)
        decode = _m.c.permissions.type.dialect_impl(dialect).result_processor(dialect, None)
        known = _MEMBERSHIP_BY_DIALECT[key] = (_MEMBERSHIP_SQL.format(p=mark), decode)
    return known


def _deleted(auth: Auth) -> str:
    return (f"no longer a member of organization {auth.org_id}: the membership is deleted in the database (a member "
            "re-added since has a new one, judged once its webhook arrives)")


def _of_session(standing: Auth, auth: Auth) -> Auth:
    """``standing``, refused (``ValueError``: a programming error) unless :meth:`Authenticator.standing_org_role`
    made it from ``auth``'s very token (it keeps the claims object): another session's standing would pass the
    database half of a guard for this one."""
    if standing.claims is not auth.claims:
        raise ValueError("standing= is not this session's: pass standing_org_role(auth) of the same auth (read once "
                         "a request for its own session)")
    return standing


def _older_than_token(updated_ms: int | None, auth: Auth, *, skew_s: float) -> bool:
    """The membership row was last written (Clerk's ``updated_at``, ms) before the token was issued (``iat``, s)
    by more than ``skew_s``, the clock skew the token check accepts (its leeway): Clerk minted the token from a
    newer membership than the row, whose webhook is late (Svix retries a failing delivery for about a day), so
    the row is no measure of it. Within the skew (a token's ``iat`` may be that far ahead of the clock that
    stamped the row: a demotion written after the mint would look older), of the same second or later, or a time
    unknown, the row is not older: the database's answer stands."""
    iat = auth.claims.get("iat")
    if updated_ms is None or isinstance(iat, bool) or not isinstance(iat, int | float):
        return False
    return updated_ms < (iat - skew_s) * 1000


def _held(token: tuple[str, ...], row: object) -> tuple[str, ...]:
    """The token's permissions that the membership row lists too, once the row's role differs from the token's.

    The token's were derived from its role, which the member no longer holds, so they alone no longer say what
    the member may do. The row's (the ``organizationMembership.updated`` that changed the role) alone are not
    enough either: they include system permissions no token carries, and a v2 token grants a custom one only
    for the features the organization's plan enables (``fea``). Held are those both grant: a demotion drops what
    the lower role lacks at once, a promotion adds nothing until a new token carries it (as for the role
    itself), and a row without permissions (none sent) leaves none."""
    listed = {p for p in row if isinstance(p, str)} if isinstance(row, list) else set()
    return tuple(p for p in token if p in listed)


def _org_role_in(role: str, roles: tuple[str, ...]) -> bool:
    """``role`` is one of ``roles``, whichever spelling each uses (``admin``, ``org:admin``; Clerk's legacy
    ``basic_member`` is ``org:member``: see :func:`~clerk_sync.events.same_org_role`)."""
    return same_org_role(role) in {same_org_role(r) for r in roles}
