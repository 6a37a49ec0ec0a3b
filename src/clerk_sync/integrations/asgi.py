"""Starlette/ASGI session authentication: a pure ASGI middleware and an ``AuthenticationBackend``.

The middleware is convenience (deny by default, public routes declared); handler dependencies in
``integrations/fastapi.py`` re-check on their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, cookie_parser
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import (
    check_websocket_origin,
    is_cors_preflight,
    is_public_path,
    is_session_cookie,
)
from clerk_sync.errors import (
    AccessDenied,
    ClerkSyncError,
    CrossSiteRequest,
    StoreError,
    TokenError,
    TokenMalformed,
    TokenMissing,
)
from clerk_sync.events import org_role_spellings
from clerk_sync.integrations.http import status_for
from clerk_sync.integrations.starlette import error_json

__all__ = ["WEBHOOK_SLASH_TWINS", "ClerkAuthBackend", "ClerkAuthMiddleware", "ClerkUser", "check_handshake_origin",
           "judged_by", "keep_standing", "kept_standing", "refusal_of", "refuse_handshake", "remember"]

# The public paths whose trailing-slash twin is public too: the webhook route, which ``webhook_routes`` and
# ``webhook_router`` serve with and without the slash (Svix follows no redirect). Another public path's twin
# may be a separate protected route (``/health`` public, ``/health/`` not), so it stays protected.
WEBHOOK_SLASH_TWINS: tuple[str, ...] = ("/webhooks/clerk",)


class ClerkUser(BaseUser):
    """Starlette's ``request.user`` for a verified Clerk session."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.auth.user_id

    @property
    def identity(self) -> str:
        return self.auth.user_id


class ClerkAuthBackend(AuthenticationBackend):
    """For ``starlette.middleware.authentication.AuthenticationMiddleware``: scopes ``authenticated``,
    ``org:<role>`` and each org permission. The role is named as every other face's guard compares it
    (:func:`~clerk_sync.events.same_org_role`): a v1 token's legacy ``admin`` is ``org:admin``, never a bare
    ``admin`` scope; ``basic_member`` is both ``org:member`` and ``org:basic_member``.

    The ``org:<role>`` scope (``@requires("org:admin")``) is granted only once the role is confirmed against
    ``organization_memberships``, as every other face's org-role guard does
    (:meth:`~clerk_sync.auth.authenticator.Authenticator.confirm_org_role`): a member removed from the
    organization, or demoted, since the token was issued gets no such scope (a ``requires`` on it answers 403)
    while the session stays authenticated; a membership whose webhook has not arrived yet is judged on the
    token alone. The backend cannot tell which scopes a route will ask for, so this costs one indexed read, in
    a worker thread, on every request whose token carries an active organization role (none for the others);
    a database outage then refuses the request (503), as an org-role guard would. The permission scopes are
    the confirmed ones too (:meth:`~clerk_sync.auth.authenticator.Authenticator.standing_org_role`): none for
    a removed member, and, once the role changed, only the token's that the membership row also lists.

    A refused session is Starlette's ``AuthenticationError``, which the middleware answers with its own
    ``on_error`` (400, plain text, by default); pass ``on_error=ClerkAuthBackend.on_error`` for the
    answers of the one error table (401 with ``WWW-Authenticate``, 403, 503 with ``Retry-After``; JSON).
    ``audit_impersonation=False``: no audit row for a request made while impersonating (as the middleware's
    option of that name).
    """

    def __init__(self, authenticator: Authenticator, *, audit_impersonation: bool = True) -> None:
        self.authenticator = authenticator
        self.audit_impersonation = audit_impersonation

    @staticmethod
    def on_error(conn: HTTPConnection, exc: Exception) -> Response:
        """``AuthenticationMiddleware(on_error=...)``: the refusal's own answer (see the class docstring)."""
        cause = exc.__cause__
        if isinstance(cause, ClerkSyncError):
            return error_json(cause)
        return PlainTextResponse(str(exc), status_code=400)  # not ours: as Starlette answers it

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        http = conn.scope["type"] == "http"
        try:
            # A ClerkAuthMiddleware outside judged it already: its session (audited there), or its refusal on a
            # public path. One verdict a request, counted once.
            judged, refused = judged_by(conn.scope, self.authenticator), refusal_of(conn.scope, self.authenticator)
            if refused is not None:
                raise refused
            if isinstance(judged, Auth):
                auth = judged
            else:
                auth = await self._authenticate(conn, http)
                if auth.is_impersonated and self.audit_impersonation:  # one row a request, as the middleware
                    client = conn.scope.get("client")
                    await run_in_threadpool(self.authenticator.audit_impersonated_request, auth, conn.scope.get(
                        "method", "GET"), conn.scope["path"], client[0] if client else None)
        except TokenMissing:
            return None
        except (TokenError, AccessDenied, StoreError) as exc:  # AccessDenied: deprovisioned, locked or a
            raise AuthenticationError(exc.code) from exc  # cross-site POST; StoreError: deny list unreadable
        standing = await self._standing(conn, auth)
        # the org-role scope only when the token's role stands (a route asking for the database's other role
        # is refused too, as every face's org-role guard refuses it until a new token carries it)
        # (every org:-prefixed spelling: a v1 token's legacy "admin" is "org:admin", as to the other faces' guards)
        confirmed = org_role_spellings(auth.org_role) if standing is auth and auth.org_role is not None else ()
        scopes = ["authenticated", *confirmed, *standing.org_permissions]  # (confirmed: see the class docstring)
        return AuthCredentials(scopes), ClerkUser(standing)

    async def _authenticate(self, conn: HTTPConnection, http: bool) -> Auth:
        if not http:  # as ClerkAuthMiddleware: a cookie handshake from another site is refused
            check_handshake_origin(conn.headers, conn.cookies, conn.scope.get("scheme", "ws"), self.authenticator)
        auth = await self.authenticator.aauthenticate(conn.headers, conn.cookies,
                                                      method=conn.scope["method"] if http else None,
                                                      scheme=conn.scope.get("scheme", "http"))
        remember(conn.scope, self.authenticator, auth)  # one identity per request: FastAPI's dependencies reuse it
        return auth

    async def _standing(self, conn: HTTPConnection, auth: Auth) -> Auth:
        """``auth`` with the organization role ``organization_memberships`` has
        (:meth:`~clerk_sync.auth.authenticator.Authenticator.standing_org_role`: one indexed read in a worker
        thread; none without a role), which ``request.user.auth`` then shows: a demoted admin's token still says
        ``org:admin``. ``scope["clerk_auth"]`` keeps the token's: the org-role guards judge the token first, then
        the database (a promotion waits for a new token). A database error is an ``AuthenticationError`` (503
        with ``on_error``): an outage is not taken for a demotion."""
        if auth.org_role is None:
            return auth
        try:
            standing = await run_in_threadpool(self.authenticator.standing_org_role, auth)
        except StoreError as exc:
            raise AuthenticationError(exc.code) from exc
        keep_standing(conn.scope, self.authenticator, auth, standing)  # (FastAPI's guards and current_auth reuse it)
        return standing


class ClerkAuthMiddleware:
    """Pure ASGI: verifies the session of every HTTP request and websocket handshake; refused unless the
    path is declared public (HTTP: 401/403/503 JSON; websocket: closed before accept, see below).

    A POST (any method but GET/HEAD/OPTIONS/TRACE) authenticated by the ``__session`` cookie must come
    from an allowed origin (``Origin``, else ``Referer``: in ``CLERK_AUTHORIZED_PARTIES`` when set, else
    this site's own), or it is refused as cross-site request forgery (403 ``cross_site_request``; on a
    public path, served as anonymous). Bearer requests carry no ambient credential and are not checked.

    A browser's CORS preflight carries no session (Fetch never sends one), so the CORS layer must answer it
    before this middleware: ``CORSMiddleware`` outside this one (FastAPI: added after ``install()``). Inside,
    on a protected path, it is refused as any request without a session, with a message saying where the
    CORS layer goes: any client can send a preflight's headers, and letting one through would run the app's
    routes (a view taking OPTIONS, a mounted app that ignores the method) for a caller with no session.

    A public path's trailing-slash twin is public only when listed in ``slash_twins`` (default: the webhook
    route, served with and without the slash): name yours when the webhook is mounted elsewhere.

    Sets ``scope["clerk_auth"]`` to the :class:`Auth` (or None on a public path without a session). A session
    refused on a public path is kept in ``scope["clerk_auth_refused"]`` with the authenticator that refused it: a
    dependency (``current_auth``), the Starlette backend or a mounted app's own middleware with the same
    authenticator raises it rather than verifying the session again, so the request is judged, and counted in
    ``clerk_sync_auth_*``, once (:func:`refusal_of`).
    A refused websocket gets the same JSON answer as HTTP where the server supports the ASGI
    ``websocket.http.response`` extension (uvicorn does), else a close before accept: code 1008
    (policy violation) for a refused session, 1013 (try again later) when the database is down.
    """

    def __init__(self, app: ASGIApp, authenticator: Authenticator, *, public_paths: Iterable[str] = (),
                 public_prefixes: Iterable[str] = (), audit_impersonation: bool = True,
                 slash_twins: Iterable[str] = WEBHOOK_SLASH_TWINS) -> None:
        self.app = app
        self.audit_impersonation = audit_impersonation
        self.authenticator = authenticator
        self.public_paths = frozenset(public_paths)
        self.public_prefixes = tuple(public_prefixes)
        self.slash_twins = frozenset(slash_twins)

    def is_public(self, path: str) -> bool:
        return is_public_path(path, self.public_paths, self.public_prefixes, slash_twins=self.slash_twins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or judged_by(scope, self.authenticator) is not None:
            await self.app(scope, receive, send)  # lifespan, or an outer instance has authenticated the caller
            return  # (with this authenticator: another one's session, a mounted app's own instance, is judged here)
        # (None: an outer instance let an anonymous caller through as public on *its* paths; what is public
        # here is this instance's to say, so a mounted app's own deny-by-default holds: checked again below)
        path: str = scope["path"]
        headers: dict[str, str] = {}
        repeated = False
        for key, value in scope["headers"]:
            name = key.decode("latin-1").lower()
            repeated = repeated or (name == "authorization" and name in headers)
            headers.setdefault(name, value.decode("latin-1"))  # the first, as Starlette's request.headers
        if (scope["type"] == "http" and _is_browser_preflight(scope["method"], headers)
                and not (self.is_public(_route_path(scope)) or self.is_public(path))):
            await error_json(TokenMissing(_PREFLIGHT_REFUSED))(scope, receive, send)
            return
        try:
            refused = refusal_of(scope, self.authenticator)
            if refused is not None:  # an outer instance's verdict on this request (counted once: not checked again)
                raise refused
            if repeated:  # two credentials: the app's dependencies and this check could each read another one
                raise TokenMalformed("more than one Authorization header: send one")
            http = scope["type"] == "http"
            if not http:
                check_handshake_origin(headers, _cookies(headers), scope.get("scheme", "ws"), self.authenticator)
            auth = await self.authenticator.aauthenticate(headers, _cookies(headers),
                                                          method=scope["method"] if http else None,
                                                          scheme=scope.get("scheme", "http"))
            remember(scope, self.authenticator, auth)
            if auth.is_impersonated and self.audit_impersonation:
                client = scope.get("client")
                await run_in_threadpool(self.authenticator.audit_impersonated_request, auth,
                                        scope.get("method", "GET"), path, client[0] if client else None)
        except (TokenError, AccessDenied, StoreError) as exc:
            # A database outage (deny list unreadable) must not take public pages down with it.
            # (the full path too: public paths declared with a proxy's prefix, as before the route path)
            if not (self.is_public(_route_path(scope)) or self.is_public(path)):
                await _refuse(exc, scope, receive, send)
                return
            if isinstance(exc, CrossSiteRequest):  # anonymous for the app's own checks too (its dependencies
                scope = {**scope, "headers": _without_session_cookies(scope["headers"])}  # re-verify)
            else:  # the app's own checks answer this refusal, not a second verification (counted once)
                scope["clerk_auth_refused"] = (self.authenticator, exc)
            scope["clerk_auth"] = None
        await self.app(scope, receive, send)



def judged_by(scope: Scope, authenticator: Authenticator) -> Auth | None:
    """The session ``authenticator`` already verified for this request (``scope["clerk_auth"]``), for a later
    layer to reuse (one identity, one audit row, one count a request); None when there is none, or when another
    authenticator verified it (a mounted app with its own Clerk instance or authorized parties verifies for
    itself: the outer acceptance is not its verdict; review)."""
    auth = scope.get("clerk_auth")
    return auth if isinstance(auth, Auth) and scope.get("clerk_auth_by") is authenticator else None


def remember(scope: Scope, authenticator: Authenticator, auth: Auth) -> None:
    """Keep ``auth`` as this request's session, verified (or confirmed) by ``authenticator`` (:func:`judged_by`)."""
    scope["clerk_auth"], scope["clerk_auth_by"] = auth, authenticator


def kept_standing(scope: Scope, authenticator: Authenticator, auth: Auth) -> Auth | None:
    """The :meth:`~clerk_sync.auth.authenticator.Authenticator.standing_org_role` of session ``auth`` that
    ``authenticator`` already read for this request (:func:`keep_standing`), else None: one read a request."""
    kept = scope.get("clerk_sync.org_standing")
    if kept is None or kept[0] is not authenticator or kept[1] is not auth:
        return None
    standing: Auth = kept[2]
    return standing


def keep_standing(scope: Scope, authenticator: Authenticator, auth: Auth, standing: Auth) -> None:
    """Keep ``standing``, session ``auth``'s organization as the database has it, beside (not instead of) the
    session, which the guards judge first."""
    scope["clerk_sync.org_standing"] = (authenticator, auth, standing)


def refusal_of(scope: Scope, authenticator: Authenticator) -> Exception | None:
    """The refusal a :class:`ClerkAuthMiddleware` with the same ``authenticator`` made of this request on a
    public path (``scope["clerk_auth_refused"]``), for a later layer to raise instead of verifying, and counting,
    the session again; None when there is none, or when another authenticator made it (a mounted app with its own
    Clerk instance or authorized parties judges for itself: the outer refusal is not its verdict)."""
    refused = scope.get("clerk_auth_refused")
    if refused is None or refused[0] is not authenticator:
        return None
    error: Exception = refused[1]
    return error


def check_handshake_origin(headers: Mapping[str, str], cookies: Mapping[str, str], scheme: str,
                           authenticator: Authenticator) -> None:
    """A websocket handshake riding on the session cookie from another site refused
    (:func:`~clerk_sync.auth.sessions.check_websocket_origin` with the authenticator's authorized parties)."""
    check_websocket_origin(headers, cookies, scheme=scheme,
                           authorized_parties=authenticator.verifier.claims.authorized_parties)


def _is_browser_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """A CORS preflight as browsers send it: ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``
    and no credential (Fetch sends a preflight without cookies or Authorization; MDN: "the preflight request
    does not include credentials"). One that carries a session is no browser's: it is authenticated as any
    request."""
    if not (is_cors_preflight(method, headers.get("access-control-request-method")) and "origin" in headers):
        return False
    return "authorization" not in headers and not any(is_session_cookie(name) for name in _cookies(headers))


_PREFLIGHT_REFUSED = ("a CORS preflight reached ClerkAuthMiddleware: browsers send no session on a preflight, so "
                      "the CORS layer must answer it first: add CORSMiddleware outside this middleware (FastAPI: "
                      "app.add_middleware(CORSMiddleware, ...) after ClerkAuth.install(app))")


def _route_path(scope: Scope) -> str:
    """The path as the app's routes match it: without the ``root_path`` a proxy prefix (``--root-path``) or a
    mount puts in front (public paths are declared as the routes are)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


async def _refuse(exc: ClerkSyncError, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
        await error_json(exc)(scope, receive, send)  # Starlette turns it into a handshake denial
        return
    await send({"type": "websocket.close", "code": _close_code(exc), "reason": exc.code})


async def refuse_handshake(websocket: WebSocket, exc: ClerkSyncError) -> None:
    """A websocket handshake refused as :class:`ClerkAuthMiddleware` refuses one (a FastAPI dependency's
    refusal): the error's HTTP answer where the server can send one, else a close with a code saying why. A
    refusal after the handshake was accepted (a route checking again per message) is that close: a denial
    response then was an ASGI error, the connection dropped without a close frame (review)."""
    state = websocket.application_state
    if state == WebSocketState.CONNECTING and "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_json(exc))
    elif state != WebSocketState.DISCONNECTED:
        await websocket.close(code=_close_code(exc), reason=exc.code)


def _close_code(exc: ClerkSyncError) -> int:
    """1013 (try again later) for what HTTP answers 503 (a database that did not answer, Clerk's keys that could
    not be fetched: they were 1008, a refusal, review), else 1008 (policy violation)."""
    return 1013 if status_for(exc) == 503 else 1008


def _cookies(headers: Mapping[str, str]) -> dict[str, str]:
    # Starlette's parser, as request.cookies uses: SimpleCookie drops every cookie after one it cannot parse.
    raw = headers.get("cookie")
    return cookie_parser(raw) if raw else {}


def _without_session_cookies(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with the ``__session*`` cookies taken out: a cross-site request reaches a public path as
    the anonymous request a SameSite cookie would have made it."""
    kept: list[tuple[bytes, bytes]] = []
    for key, value in headers:
        if key.lower() == b"cookie":
            pairs = [p for p in value.split(b";")
                     if not is_session_cookie(p.split(b"=", 1)[0].strip().decode("latin-1"))]
            if not pairs:
                continue
            value = b";".join(pairs).strip()
        kept.append((key, value))
    return kept
