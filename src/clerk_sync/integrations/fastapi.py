"""FastAPI adapter: the webhook router, and auth dependencies over
:class:`~clerk_sync.auth.authenticator.Authenticator`.

Usage::

    clerk = ClerkAuth(authenticator)
    clerk.install(app, public_paths={"/", "/webhooks/clerk"})  # deny by default; 401/403/410/503 answers

    @app.get("/admin")
    def admin(user: AuthUser = Depends(clerk.require_role("admin"))): ...

Each dependency verifies the token itself (cheap: verified signatures are cached until ``exp``),
so a route stays protected even where no middleware runs; on a websocket route (``@app.websocket``) it judges
the handshake, and a refusal denies it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, cast, overload

try:
    from fastapi import APIRouter, FastAPI
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("clerk_sync.integrations.fastapi needs FastAPI: pip install 'clerk-sync[fastapi]'") from exc
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket
from typing_extensions import TypeVar  # (a TypeVar default: a bare ``ClerkAuth`` is ``ClerkAuth[AuthUser]``)

from clerk_sync.auth.authenticator import Authenticator, signed_out_if_banned, warn_if_any_origin
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.users import AuthUser, JitUsers
from clerk_sync.errors import ClerkSyncError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.asgi import (
    WEBHOOK_SLASH_TWINS,
    ClerkAuthMiddleware,
    check_handshake_origin,
    judged_by,
    keep_standing,
    kept_standing,
    refusal_of,
    refuse_handshake,
    remember,
)
from clerk_sync.integrations.starlette import build_processor, error_json, webhook_endpoint, with_and_without_slash

__all__ = ["ClerkAuth", "build_processor", "sync_me_router", "webhook_router"]

UserT = TypeVar("UserT", default=AuthUser)  # what ``current_user`` returns: ``get_user``'s row
UserGetter = Callable[[Auth], UserT]


def webhook_router(processor: WebhookProcessor, path: str = "/webhooks/clerk", *,
                   read_timeout_s: float = 30.0) -> APIRouter:
    """A router with ``POST path`` (and its trailing-slash twin: Svix follows no redirect); signature-checked,
    so keep it outside your auth dependencies. A body not in within ``read_timeout_s`` of its headers is
    answered 408, nothing written (:func:`~clerk_sync.integrations.starlette.webhook_endpoint`)."""
    router = APIRouter()
    endpoint = webhook_endpoint(processor, read_timeout_s=read_timeout_s)
    for one in with_and_without_slash(path):
        router.add_api_route(one, endpoint, methods=["POST"], include_in_schema=False)
    return router


def sync_me_router(clerk: ClerkAuth[Any], users: JitUsers, path: str = "/sync/me") -> APIRouter:
    """Flow A: the front end calls ``POST path`` right after sign-up, so the user's row exists before
    the ``user.created`` webhook arrives (one budgeted Clerk call, the same guarded upsert)."""
    router = APIRouter()

    async def sync_me(request: HTTPConnection) -> dict[str, Any]:
        auth = await clerk._session(request)  # (its user id only: no membership read)
        user = await run_in_threadpool(users.refresh_user, auth.user_id)
        return {"user_id": user.clerk_id, "email": user.email, "role": user.role}

    router.add_api_route(path, sync_me, methods=["POST"])
    return router


class ClerkAuth(Generic[UserT]):
    """FastAPI dependencies: ``current_auth``, ``current_user``, ``require_role``, ``require_org_role``,
    ``require_permission``, ``not_impersonated``.

    ``current_user`` is typed as what ``get_user`` returns: an :class:`AuthUser` by default (a
    ``ClerkAuth[AuthUser]``), the app's own row type for a getter of its own.

    A request made while impersonating gets an ``impersonation.request`` audit row (no row, no access:
    503); ``audit_impersonation=False`` turns that off, as Flask's and Django's option of that name do."""

    @overload
    def __init__(self: ClerkAuth[AuthUser], authenticator: Authenticator, *, get_user: None = None,
                 audit_impersonation: bool = True) -> None: ...

    @overload
    def __init__(self, authenticator: Authenticator, *, get_user: UserGetter[UserT],
                 audit_impersonation: bool = True) -> None: ...

    def __init__(self, authenticator: Authenticator, *, get_user: UserGetter[UserT] | None = None,
                 audit_impersonation: bool = True) -> None:
        self.authenticator = authenticator
        self.audit_impersonation = audit_impersonation
        # get_user(auth) -> user row; default: the users table (UserT is then AuthUser, as the overload says).
        # The JIT sync can be plugged in here.
        self._get_user: UserGetter[UserT] = get_user or cast("UserGetter[UserT]", authenticator.user)

    def install(self, app: FastAPI, *, public_paths: Iterable[str], public_prefixes: Iterable[str] = (),
                deny_by_default: bool = True, slash_twins: Iterable[str] = WEBHOOK_SLASH_TWINS) -> None:
        """Protect ``app`` itself: the deny-by-default :class:`ClerkAuthMiddleware` (every path not
        declared public needs a session, routes without a dependency included), and clerk-sync errors
        answered through the one table in :mod:`.http`.

        ``public_paths`` is required so the choice is made on purpose: list your public pages and the
        webhook path (its signature is its authentication). ``deny_by_default=False`` leaves protection
        to the dependencies alone, route by route. ``slash_twins``: the public paths whose trailing-slash
        twin is public too (default the webhook route, which :func:`webhook_router` serves both ways; name
        yours when you mount it elsewhere); any other twin stays protected.

        CORS: a ``CORSMiddleware`` added after ``install()`` sits outside the middleware (its headers then
        reach refusals too, so a front end can read a 401). One added before sits inside, where the browser's
        preflights, which carry no session, are refused 401 on protected paths with a message saying to add
        it after (see :class:`ClerkAuthMiddleware`).
        """

        async def handle(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
            assert isinstance(exc, ClerkSyncError)
            if isinstance(conn, WebSocket):  # a dependency of a websocket route refused the handshake
                await refuse_handshake(conn, exc)
                return None
            return error_json(exc)

        app.add_exception_handler(ClerkSyncError, cast(Any, handle))  # (typed for one kind of connection or the other)
        warn_if_any_origin(self.authenticator)
        if deny_by_default:
            app.add_middleware(ClerkAuthMiddleware, authenticator=self.authenticator,
                               public_paths=public_paths, public_prefixes=public_prefixes,
                               audit_impersonation=self.audit_impersonation, slash_twins=slash_twins)

    async def current_auth(self, request: HTTPConnection) -> Auth:
        """The verified session (401 when missing/invalid/revoked), its active organization as
        ``organization_memberships`` has it now
        (:meth:`~clerk_sync.auth.authenticator.Authenticator.standing_org_role`: a removed member has none, a
        member whose role changed has the database's role and only the permissions it still grants; one indexed
        read in the thread pool when the token names an organization role, once a request: the org guards'
        read is reused)."""
        return await self._standing(request, await self._session(request))

    async def _standing(self, request: HTTPConnection, auth: Auth) -> Auth:
        """:meth:`~clerk_sync.auth.authenticator.Authenticator.standing_org_role` of the request's session, read
        once a request and kept in its scope beside (not instead of) the token's session, which the guards judge
        first: the guards and ``current_auth`` share the one read."""
        if auth.org_role is None:
            return auth
        standing = kept_standing(request.scope, self.authenticator, auth)
        if standing is None:
            standing = await run_in_threadpool(self.authenticator.standing_org_role, auth)
            keep_standing(request.scope, self.authenticator, auth, standing)
        return standing

    async def _session(self, request: HTTPConnection) -> Auth:
        """The token's session: the one :class:`ClerkAuthMiddleware` verified for this request when it ran (one
        identity per request, audited once), else verified here, a request made while impersonating audited
        here (once: the session is kept for the request's other dependencies). The guards judge it first."""
        judged = judged_by(request.scope, self.authenticator)
        if judged is not None:
            return judged
        refused = refusal_of(request.scope, self.authenticator)
        if refused is not None:  # the middleware's refusal on a public path: one verdict (and count) a request
            raise refused
        # A websocket route's dependency (HTTPConnection: FastAPI passes one for both) judges the handshake as
        # the middleware does: a cookie handshake from another site refused, no method to check a POST by.
        http = request.scope["type"] == "http"
        if not http:
            check_handshake_origin(request.headers, request.cookies, request.url.scheme, self.authenticator)
        method = request.scope["method"] if http else None
        auth = await self.authenticator.aauthenticate(request.headers, request.cookies, method=method,
                                                      scheme=request.url.scheme)
        if auth.is_impersonated and self.audit_impersonation:  # no audit row, no access (a StoreError: 503)
            await run_in_threadpool(self.authenticator.audit_impersonated_request, auth, method or "GET",
                                    request.url.path, request.client.host if request.client else None)
        remember(request.scope, self.authenticator, auth)
        return auth

    async def current_user(self, request: HTTPConnection) -> UserT:
        """The caller's DB row (JIT-synced when configured)."""
        auth = await self._session(request)
        with signed_out_if_banned():  # (a JIT getter's 403/410 for a banned/deleted user: 401, as require_role)
            return await run_in_threadpool(self._get_user, auth)

    def require_role(self, *roles: str) -> Callable[[HTTPConnection], Awaitable[AuthUser]]:
        """Role confirmed against the DB row, so a demotion applies at once."""

        async def dependency(request: HTTPConnection) -> AuthUser:
            auth = await self._session(request)
            return await run_in_threadpool(self.authenticator.require_role, auth, *roles)

        return dependency

    def require_org_role(self, *roles: str) -> Callable[[HTTPConnection], Awaitable[Auth]]:
        """The active organization role (``"org:admin"`` ...) from the token, confirmed against the
        membership row (:meth:`~clerk_sync.auth.authenticator.Authenticator.confirm_org_role`): a member
        removed or demoted is refused at once (403). The row is read in the thread pool."""

        async def dependency(request: HTTPConnection) -> Auth:
            auth = Authenticator.require_org_role(await self._session(request), *roles)  # a "no" reads nothing
            # (the database's role; the session kept for the other guards stays the token's, judged first)
            return self.authenticator.confirm_org_role(auth, *roles, standing=await self._standing(request, auth))

        return dependency

    def require_permission(self, permission: str) -> Callable[[HTTPConnection], Awaitable[Auth]]:
        """``permission`` in the active organization: in the token, and still granted by the membership row
        (:meth:`~clerk_sync.auth.authenticator.Authenticator.confirm_permission`, read in the thread pool): a
        member removed or whose role changed is refused at once (403). A system permission (``org:sys_*``),
        which tokens never carry, is refused here (``ValueError``)."""
        Authenticator.guardable_permission(permission)

        async def dependency(request: HTTPConnection) -> Auth:
            auth = Authenticator.require_permission(await self._session(request), permission)  # a "no" reads nothing
            return self.authenticator.confirm_permission(auth, permission, standing=await self._standing(request, auth))

        return dependency

    async def not_impersonated(self, request: HTTPConnection) -> Auth:
        """Refuse impersonated sessions on sensitive routes: the token's session judged first (a refusal reads
        nothing); returns the session's standing, as :meth:`current_auth` (the organization as the database has
        it: a removed member's view scoped by ``org_id`` stops at once; the read shared with the other guards)."""
        session = self.authenticator.forbid_impersonation(await self._session(request))
        return await self._standing(request, session)


