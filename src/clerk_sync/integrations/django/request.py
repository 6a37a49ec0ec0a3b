"""``request.clerk``: what a request's Clerk session is, verified once and shared by every guard.

:func:`clerk_request` returns it, verifying the session itself when no middleware did (so guards
stand alone); :func:`aclerk_request` is the async twin. The user's row is read only when asked.

:class:`ClerkUserUnavailable` is what ``request.user`` raises (with :class:`~.backends.ClerkBackend`) when
the request carries a Clerk session whose user cannot be told because clerk-sync's database or Clerk is
down (:func:`is_outage`); :class:`~.middleware.ClerkMiddleware` answers it 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Mapping
from typing import TypeGuard

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import DisallowedHost, SynchronousOnlyOperation
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest

from clerk_sync.auth.claims import Auth
from clerk_sync.auth.jwks import NeedsFetch
from clerk_sync.auth.sessions import token_from_request
from clerk_sync.auth.users import AuthUser
from clerk_sync.errors import (
    AccessDenied,
    ClerkSyncError,
    ClerkUnavailable,
    ConfigError,
    RateLimited,
    StoreDataError,
    StoreError,
    StorePrivilegeMissing,
    TokenError,
    TokenKeysUnavailable,
    TokenMissing,
)
from clerk_sync.integrations.django.runtime import ClerkSync, get_clerk_sync

__all__ = ["ClerkRequest", "ClerkUserUnavailable", "aclerk_request", "clerk_request"]

#: Errors that say nothing about the session but that the database or Clerk is down right now (all 503 in
#: the error table): the session's user cannot be told, which is not the same as signed out.
_OUTAGES: tuple[type[ClerkSyncError], ...] = (StoreError, ClerkUnavailable, RateLimited, TokenKeysUnavailable)


def is_outage(error: BaseException | None) -> bool:
    """Whether ``error`` is an outage (clerk-sync's database, or Clerk: JIT sync, the JWKS, the rate budget)
    rather than an answer about the session or its user (missing, invalid, revoked, banned, not synced). Not a
    :class:`~clerk_sync.errors.StoreDataError`: the database refused a value for good (a just-in-time user row
    the app's table refuses), which no retry heals, so no "retry in 5 s" either."""
    return isinstance(error, _OUTAGES) and not isinstance(error, StoreDataError)


class ClerkUserUnavailable(Exception):
    """Raised by ``request.user`` / ``await request.auser()`` (:class:`~.backends.ClerkBackend`) for a request
    that carries a Clerk session while clerk-sync's database or Clerk is down (``error``, see :func:`is_outage`).

    Not ``AnonymousUser``: that would send a signed-in user to the sign-in page (``login_required``), which,
    seeing a live Clerk session, sends them back: a redirect loop, or a page rendered as signed out.
    :class:`~.middleware.ClerkMiddleware` turns it into a 503 with ``Retry-After``. Deliberately not a
    :class:`~clerk_sync.errors.ClerkSyncError` (code that catches those to answer its own way must not take
    it for a refusal), nor a ``TypeError``/``AttributeError``/``KeyError``/``ValueError``, which Django's
    templates would swallow as a missing variable and render the page as signed out."""

    def __init__(self, error: ClerkSyncError) -> None:
        super().__init__(f"who is signed in cannot be told while {_what_is_down(error)} ({error.code}): answered 503")
        self.error = error

    def __reduce__(self) -> tuple[type[ClerkUserUnavailable], tuple[ClerkSyncError]]:  # copy, pickle
        return type(self), (self.error,)


def _what_is_down(error: ClerkSyncError) -> str:
    """What stops the answer, as "while ..." says it: a missing GRANT is no outage (the operator's to run)."""
    if isinstance(error, StorePrivilegeMissing):
        return "the auth database refuses this service's database role a privilege it needs"
    return f"{'the auth database' if isinstance(error, StoreError) else 'Clerk'} is unavailable"


def _on_event_loop() -> bool:
    """Whether this thread runs an event loop (async code, where a blocking query would stall every request)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ClerkRequest:
    """What ``request.clerk`` holds: the session, or why there is none (``error``).

    ``token_auth`` is the token's session, which the guards judge first (a promotion waits for a new token).
    ``auth`` is that session with its active organization as the database has it (see
    :meth:`~clerk_sync.auth.authenticator.Authenticator.standing_org_role`: a removed member has none, a member
    whose role changed has that role and only the permissions it still grants): read on first use and kept for
    the request (one indexed read when the token names an organization role; none for a view that never asks,
    a public one included). A database down then raises the :class:`~clerk_sync.errors.StoreError` (503) there,
    and again on later uses without a second attempt. Async code calls ``await`` :meth:`astanding` first, which
    reads in a worker thread: :attr:`auth` still to read on an event loop's thread raises Django's
    ``SynchronousOnlyOperation`` rather than block the loop."""

    def __init__(self, runtime: ClerkSync, auth: Auth | None, error: ClerkSyncError | None = None, *,
                 asgi: bool = False) -> None:
        self.runtime = runtime
        self.token_auth = auth
        self.error = error
        self.asgi = asgi  # served by Django's ASGI handler: one event loop for the process (runtime.auser)
        self._standing: Auth | None = None
        self._standing_error: StoreError | None = None
        self._user: AuthUser | None = None
        # Set by backends.django_user when resolving request.user hit an outage: later uses raise it again
        # (no second database or Clerk attempt, no second log line) and ClerkMiddleware answers it.
        self.user_unavailable: ClerkUserUnavailable | None = None

    @property
    def auth(self) -> Auth | None:
        """The session as the database has its organization now (None without a session): see the class."""
        if self.token_auth is None:
            return None
        if self._standing is None:
            self._standing = self._read_standing(self.token_auth)
        return self._standing

    def _read_standing(self, session: Auth) -> Auth:
        if self._standing_error is not None:
            raise self._standing_error
        if session.org_role is None:
            return session
        if _on_event_loop():
            raise SynchronousOnlyOperation(
                "request.clerk.auth / require_auth() would read the organization membership (a blocking database "
                "query) on the event loop's thread: in async code, `await request.clerk.astanding()` first (or "
                "`await (await aclerk_request(request)).astanding()`), which reads it in a worker thread")
        try:
            return self.runtime.authenticator.standing_org_role(session)
        except StoreError as exc:
            self._standing_error = exc
            self.runtime.naming_database(exc)  # (the same error, its message naming the database)
            raise

    async def astanding(self) -> Auth | None:
        """:attr:`auth` for async code: its read, if still to make, in a worker thread."""
        if self.token_auth is not None and self._standing is None:
            self._standing = await sync_to_async(self._read_standing, thread_sensitive=False)(self.token_auth)
        return self.auth

    @property
    def is_authenticated(self) -> bool:
        return self.token_auth is not None

    def require_session(self) -> Auth:
        """The token's session, or the error to answer (401: missing, invalid, revoked; 503: DB down); no
        membership read."""
        if self.token_auth is None:
            raise self.error or TokenMissing("no session token (Authorization: Bearer or __session cookie)")
        return self.token_auth

    def require_auth(self) -> Auth:
        """:attr:`auth`, or the error to answer (401: missing, invalid, revoked; 503: DB down)."""
        self.require_session()
        auth = self.auth
        assert auth is not None
        return auth

    @property
    def user(self) -> AuthUser:
        """The caller's ``users`` row (one indexed query, once per request; JIT-synced when enabled)."""
        if self._user is None:
            auth = self.require_session()  # (its user id: no membership read)
            try:
                self._user = self.runtime.user(auth)
            except StoreError as exc:
                self.runtime.naming_database(exc)  # (the same error, its message naming the database)
                raise
        return self._user

    async def auser(self) -> AuthUser:
        """Async :attr:`user`: the query runs in a worker thread, a JIT fetch on the event loop."""
        if self._user is None:
            auth = self.require_session()
            try:
                self._user = await self.runtime.auser(auth, asgi=self.asgi)
            except StoreError as exc:
                self.runtime.naming_database(exc)
                raise
        return self._user


def _headers_and_cookies(request: HttpRequest) -> tuple[dict[str, str], dict[str, str]]:
    headers = {k.lower(): v for k, v in request.headers.items()}
    # This site's own origin as Django sees it (USE_X_FORWARDED_HOST behind a proxy), as its CSRF check does;
    # a host this site does not serve keeps the raw Host, which no allowed Origin matches.
    with contextlib.suppress(DisallowedHost):
        headers["host"] = request.get_host()
    return headers, dict(request.COOKIES)


def _trusted_origins() -> list[str]:
    """Django's ``CSRF_TRUSTED_ORIGINS``: the origins its own CSRF check trusts are trusted for the
    ``__session`` cookie too (one list for both, as a Django project expects)."""
    return list(getattr(settings, "CSRF_TRUSTED_ORIGINS", ()) or ())


def _answer(runtime: ClerkSync, result: Auth | ClerkSyncError, request: HttpRequest) -> ClerkRequest:
    asgi = isinstance(request, ASGIRequest)
    if isinstance(result, TokenMissing):
        return ClerkRequest(runtime, None, asgi=asgi)
    if isinstance(result, ClerkSyncError):
        return ClerkRequest(runtime, None, result, asgi=asgi)
    return ClerkRequest(runtime, result, asgi=asgi)


def _audited(result: Auth | ClerkSyncError, runtime: ClerkSync) -> TypeGuard[Auth]:
    """Whether ``result`` is a session made while impersonating that gets its audit row here."""
    return isinstance(result, Auth) and result.is_impersonated and runtime.options.audit_impersonation


def clerk_request(request: HttpRequest) -> ClerkRequest:
    """``request.clerk``, verifying the session here when no middleware did (guards stand alone)."""
    state = getattr(request, "clerk", None)
    if isinstance(state, ClerkRequest):
        return state
    runtime = get_clerk_sync()
    headers, cookies = _headers_and_cookies(request)
    try:
        # method and scheme: an unsafe request on the __session cookie must come from an allowed Origin (403
        # cross_site_request), as on the other faces, csrf_exempt views and projects without CSRF middleware too
        result = runtime.authenticator.authenticate(
            headers, cookies, method=request.method, scheme=request.scheme, trusted_origins=_trusted_origins())
        if _audited(result, runtime):  # as ClerkMiddleware does (a guard without it)
            runtime.authenticator.audit_impersonated_request(result, request.method or "", request.path,
                                                             request.META.get("REMOTE_ADDR"))
        answer: Auth | ClerkSyncError = result  # (the membership: read when first asked, ClerkRequest.auth)
    except (TokenError, AccessDenied, StoreError, ConfigError) as exc:  # fails protected views only
        answer = runtime.naming_database(exc)
    state = _answer(runtime, answer, request)
    request.clerk = state  # type: ignore[attr-defined]
    return state


async def aclerk_request(request: HttpRequest) -> ClerkRequest:
    """Async :func:`clerk_request` (the deny-list refresh runs off the event loop)."""
    state = getattr(request, "clerk", None)
    if isinstance(state, ClerkRequest):
        return state
    runtime = get_clerk_sync()
    headers, cookies = _headers_and_cookies(request)
    try:
        result = await runtime.authenticator.aauthenticate(
            headers, cookies, method=request.method, scheme=request.scheme, trusted_origins=_trusted_origins())
        if _audited(result, runtime):
            await sync_to_async(runtime.authenticator.audit_impersonated_request)(
                result, request.method or "", request.path, request.META.get("REMOTE_ADDR"))
        answer: Auth | ClerkSyncError = result
    except (TokenError, AccessDenied, StoreError, ConfigError) as exc:  # fails protected views only
        answer = runtime.naming_database(exc)
    if isinstance(answer, StoreError):
        answer = _unless_invalid(runtime, answer, headers, cookies)  # (no I/O: as averify, on the loop)
    state = _answer(runtime, answer, request)
    request.clerk = state  # type: ignore[attr-defined]
    return state


def _unless_invalid(runtime: ClerkSync, error: StoreError, headers: Mapping[str, str],
                    cookies: Mapping[str, str]) -> ClerkSyncError:
    """The async check refreshes the deny list before it verifies the token, so while the database is down a
    token that is not even valid (malformed, badly signed, expired) fails with the outage, where the sync check
    answers the token's own error (it verifies first). That error here too, from the signature and claims alone
    (no database; keys already held), so an invalid token is told apart from a session that cannot be checked
    (:func:`is_outage`), on either handler. A token it cannot tell about keeps the outage."""
    try:
        verifier = copy.copy(runtime.authenticator.verifier)  # (shares the key source and the caches)
        verifier.revocations = None
        verifier.verify(token_from_request(headers, cookies, suffix=verifier.cookie_suffix), allow_fetch=False)
    except TokenError as invalid:
        return invalid
    except NeedsFetch:  # a key it does not hold yet: cannot tell, the outage stands
        return error
    return error
