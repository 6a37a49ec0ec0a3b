"""``request.clerk``: what a request's Clerk session is, verified once and shared by every guard.

:func:`clerk_request` returns it, verifying the session itself when no middleware did (so guards
stand alone); :func:`aclerk_request` is the async twin. The user's row is read only when asked.
"""

from __future__ import annotations

import contextlib
from typing import TypeGuard

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest

from clerk_sync.auth.claims import Auth
from clerk_sync.auth.users import AuthUser
from clerk_sync.errors import AccessDenied, ClerkSyncError, ConfigError, StoreError, TokenError, TokenMissing
from clerk_sync.integrations.django.runtime import ClerkSync, get_clerk_sync

__all__ = ["ClerkRequest", "aclerk_request", "clerk_request"]


class ClerkRequest:
    """What ``request.clerk`` holds: the session (``auth``), or why there is none (``error``)."""

    def __init__(self, runtime: ClerkSync, auth: Auth | None, error: ClerkSyncError | None = None, *,
                 asgi: bool = False) -> None:
        self.runtime = runtime
        self.auth = auth
        self.error = error
        self.asgi = asgi  # served by Django's ASGI handler: one event loop for the process (runtime.auser)
        self._user: AuthUser | None = None

    @property
    def is_authenticated(self) -> bool:
        return self.auth is not None

    def require_auth(self) -> Auth:
        """The session, or the error to answer (401: missing, invalid, revoked; 503: DB down)."""
        if self.auth is None:
            raise self.error or TokenMissing("no session token (Authorization: Bearer or __session cookie)")
        return self.auth

    @property
    def user(self) -> AuthUser:
        """The caller's ``users`` row (one indexed query, once per request; JIT-synced when enabled)."""
        if self._user is None:
            self._user = self.runtime.user(self.require_auth())
        return self._user

    async def auser(self) -> AuthUser:
        """Async :attr:`user`: the query runs in a worker thread, a JIT fetch on the event loop."""
        if self._user is None:
            self._user = await self.runtime.auser(self.require_auth(), asgi=self.asgi)
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
        result: Auth | ClerkSyncError = runtime.authenticator.authenticate(
            headers, cookies, method=request.method, scheme=request.scheme, trusted_origins=_trusted_origins())
        if _audited(result, runtime):  # as ClerkMiddleware does (a guard without it)
            runtime.authenticator.audit_impersonated_request(result, request.method or "", request.path,
                                                             request.META.get("REMOTE_ADDR"))
    except (TokenError, AccessDenied, StoreError, ConfigError) as exc:  # fails protected views only
        result = exc
    state = _answer(runtime, result, request)
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
        result: Auth | ClerkSyncError = await runtime.authenticator.aauthenticate(
            headers, cookies, method=request.method, scheme=request.scheme, trusted_origins=_trusted_origins())
        if _audited(result, runtime):
            await sync_to_async(runtime.authenticator.audit_impersonated_request)(
                result, request.method or "", request.path, request.META.get("REMOTE_ADDR"))
    except (TokenError, AccessDenied, StoreError, ConfigError) as exc:  # fails protected views only
        result = exc
    state = _answer(runtime, result, request)
    request.clerk = state  # type: ignore[attr-defined]
    return state
