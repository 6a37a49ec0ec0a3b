"""The console's Starlette app: routes, the access guard, and error pages.

Every page goes through :func:`_guard`: identify the caller (401 -> the login page, 403 -> an error
page with nothing else on it), refuse a NUL anywhere in the input (400), and for POSTs verify the CSRF
token and the read-only setting before the handler runs. Handlers are plain functions run in a worker
thread (the store is synchronous).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from urllib.parse import quote, unquote

from anyio import to_thread
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.config import _CONSOLE_SECRET_HELP, Settings
from clerk_sync.errors import (
    AccessDenied,
    ClerkSyncError,
    ConfigError,
    TokenAlgorithmNotAllowed,
    TokenError,
    TokenKeysUnavailable,
    TokenKeyUnknown,
    TokenMalformed,
    TokenMissing,
    TokenSignatureInvalid,
)
from clerk_sync.integrations.console import _link, _pages
from clerk_sync.integrations.console._access import (
    COOKIE,
    LOGIN_COOKIE,
    NO_KEY,
    SIGN_IN,
    ConsoleAccess,
    Identity,
    bearer_token,
    check_csrf,
    signing_key,
)
from clerk_sync.integrations.console._console import Console, SignInThrottled, utcnow
from clerk_sync.integrations.console._throttle import SignInThrottle
from clerk_sync.integrations.console._web import (
    BadInput,
    NotFound,
    read_form,
    refuse_nul,
    set_session_cookie,
)
from clerk_sync.metrics import Metrics
from clerk_sync.store import Store

__all__ = ["create_console"]

Handler = Callable[["Console", Request, Identity, dict[str, str]], Response]
_HEADERS = {
    "Cache-Control": "no-store",  # pages carry personal data
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


class _SecurityHeaders:
    """:data:`_HEADERS` on every answer of the console: its pages, and the refusals that come before them
    (an expired sign-in form, a signed-out caller, an unknown path), which no handler finishes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _ConsoleApp(Starlette):
    """The console's Starlette, :class:`_SecurityHeaders` outermost: Starlette's ServerErrorMiddleware sits
    outside every ``middleware=`` entry, so its 500 would otherwise go out without them."""

    def build_middleware_stack(self) -> ASGIApp:
        return _SecurityHeaders(super().build_middleware_stack())


def _guard(console: Console, handler: Handler, *, post: bool = False, read_only_ok: bool = False,
           sign_out: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """``read_only_ok``: a POST that changes nothing (signing out), served in a read-only console too.
    ``sign_out``: any validly signed console cookie may end itself (CSRF still checked), even once its
    admin is demoted, locked or banned; else a copy of it would work again after a re-promotion."""

    async def endpoint(request: Request) -> Response:
        try:
            bearer = bearer_token(request.headers)
            if bearer is not None:  # the operator token, a session token, or a guess at either: throttled
                identity = await console.sign_in(request, "bearer", bearer, lambda: _caller(console, request, sign_out),
                                                 operator=console.access.operator, sessions=True, guessed=_guessed)
            else:
                identity = await to_thread.run_sync(_caller, console, request, sign_out)
        except SignInThrottled as exc:
            return _throttled(console, request, exc)
        except TokenError as exc:
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                # (the query too: a link to a filtered page, an alert's, lands on that filter once signed in)
                here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                target = console.path_for(request, "login") + "?next=" + quote(here, safe="/")
                return _signed_out(request, RedirectResponse(target, status_code=303))
            return _signed_out(request, console.clerk_error(request, exc))
        except ClerkSyncError as exc:  # AccessDenied (403), StoreError (503)
            return console.clerk_error(request, exc)
        # A console session is opened by its audited sign-in: the cookie is set only once the login row is
        # written, so a first request refused before that (a NUL, no CSRF token) opens none and, as every
        # refused request, writes nothing.
        opened: str | None = None
        try:
            form = await read_form(request) if post else {}
            refuse_nul(request, form)
            if post and not check_csrf(identity, form.get("csrf")):
                raise AccessDenied("the form's CSRF token is missing or wrong: reload the page and submit it again")
            if post and console.read_only and not read_only_ok:
                raise AccessDenied("the console is read-only (CLERK_SYNC_CONSOLE_READ_ONLY is set)")
            if identity.new_cookie:  # first request of a Clerk session: record the sign-in
                await to_thread.run_sync(lambda: console.audit(identity, SIGN_IN, identity.clerk_id, request,
                                                               method="clerk_session", sid=identity.session_id,
                                                               session=identity.session_digest))
                opened = identity.new_cookie
            response = await to_thread.run_sync(handler, console, request, identity, form)
        except BadInput as exc:
            response = console.error(request, 400, "bad_request", str(exc))
        except NotFound as exc:
            response = console.error(request, 404, "not_found", str(exc))
        except ClerkSyncError as exc:
            response = console.clerk_error(request, exc)
        if opened:
            set_session_cookie(request, response, opened)
        return response

    return endpoint


def _guessed(exc: TokenError) -> bool:
    """Whether a refused ``Bearer`` was a guess (counted against its address): neither the operator token nor a
    session token signed by a key Clerk holds (malformed, forged, an unknown key). A genuine token refused for
    its age, its session (revoked, ended) or its user (banned) is no guess, nor is a key set that could not be
    fetched: an admin's front end sending an expired token must not lock its address out."""
    if isinstance(exc, TokenKeysUnavailable):
        return False
    return isinstance(exc, TokenMissing | TokenMalformed | TokenSignatureInvalid | TokenAlgorithmNotAllowed
                      | TokenKeyUnknown)


def _always(_exc: TokenError) -> bool:
    """The login form's refusals are all guesses: a wrong operator token (or none is set)."""
    return True


def _throttled(console: Console, request: Request, exc: SignInThrottled) -> Response:
    """429: too many failed sign-ins from this address lately; the token it sent was not compared."""
    return console.error(request, 429, "sign_in_throttled", str(exc), headers={"Retry-After": str(exc.wait)})


def _caller(console: Console, request: Request, sign_out: bool) -> Identity:
    identity = console.access.signing_out(request.headers, request.cookies) if sign_out else None
    return identity or console.access.identify(request.headers, request.cookies, method=request.method,
                                               scheme=request.url.scheme)


def _signed_out(request: Request, response: Response) -> Response:
    """A refused session (its Clerk session revoked, say) is no session: clear its cookie."""
    if COOKIE in request.cookies:
        set_session_cookie(request, response, None)
    return response


def _routes(console: Console) -> list[BaseRoute]:
    def page(path: str, handler: Handler, name: str, *, post: bool = False, read_only_ok: bool = False,
             sign_out: bool = False) -> Route:
        return Route(path, _guard(console, handler, post=post, read_only_ok=read_only_ok, sign_out=sign_out),
                     methods=["POST"] if post else ["GET"], name=name)

    return [
        Route("/login", _login_page(console), methods=["GET"], name="login"),
        Route("/login", _login_submit(console), methods=["POST"], name="login_submit"),
        Route("/login/clerk", _login_clerk(console), methods=["GET"], name="login_clerk"),
        Route("/login/clerk/confirm", _link.confirm_page(console), methods=["GET"], name="login_clerk_confirm"),
        Route("/login/clerk/confirm", _link.confirm_submit(console), methods=["POST"],
              name="login_clerk_confirm_submit"),
        page("/logout", _pages.logout, "logout", post=True, read_only_ok=True, sign_out=True),
        page("/", _pages.overview, "overview"),
        page("/deliveries", _pages.deliveries, "deliveries"),
        page("/deliveries/replay", _pages.replay_matching_confirm, "replay_matching_confirm"),
        page("/deliveries/replay", _pages.replay_matching, "replay_matching", post=True),
        # {delivery_id} is text, read by _pages._row_id: Starlette's int converter calls int() on any run of
        # digits before the guard, and 5,000 of them raise ValueError (500).
        page("/deliveries/{delivery_id}", _pages.delivery, "delivery"),
        page("/deliveries/{delivery_id}/replay", _pages.replay, "replay", post=True),
        page("/deliveries/{delivery_id}/reveal", _pages.reveal, "reveal", post=True),
        page("/drift", _pages.drift, "drift"),
        page("/drift/run", _pages.drift_run, "drift_run", post=True),
        page("/drift/status.json", _pages.drift_status, "drift_status"),
        page("/users", _pages.users_page, "users"),
        page("/users/{clerk_id}", _pages.user, "user"),
        page("/users/{clerk_id}/role", _pages.set_role, "set_role", post=True),
        page("/organizations/{clerk_id}", _pages.organization, "organization"),
        page("/audit", _pages.audit, "audit"),
        page("/audit.csv", _pages.audit_csv, "audit_csv"),
        Mount("/static", StaticFiles(packages=[("clerk_sync.integrations.console", "static")]), name="static"),
    ]


def _login_page(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return _login_form(console, request)

    return endpoint


def _login_form(console: Console, request: Request, *, status: int = 200, message: str | None = None) -> Response:
    token = console.access.login_token()
    response = console.render(request, "login.html", None, status=status, login_csrf=token, message=message,
                              operator=bool(console.access.operator_token),
                              clerk=console.access.authenticator is not None,
                              next=request.query_params.get("next", ""))
    response.set_cookie(LOGIN_COOKIE, token, path=request.scope.get("root_path") or "/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", max_age=3600)
    return response


def _login_submit(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            form = await read_form(request)
        except BadInput as exc:
            return console.error(request, 400, "bad_request", str(exc))
        if not console.access.check_login_token(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):
            return console.error(request, 403, "access_denied",
                                 "the sign-in form expired or its CSRF token is missing: reload the page")
        token = form.get("token", "")
        try:
            identity = await console.sign_in(request, "form", token, lambda: console.access.operator_session(token),
                                             operator=lambda: console.access.operator_session(token),
                                             sessions=False, guessed=_always)
        except SignInThrottled as exc:  # the token was not compared
            response = _login_form(console, request, status=429, message=str(exc))
            response.headers["Retry-After"] = str(exc.wait)
            return response
        except TokenError as exc:
            return _login_form(console, request, status=401, message=str(exc))
        except ClerkSyncError as exc:  # (the database down: the console's 503 page, as every page's)
            return console.clerk_error(request, exc)
        try:  # the sign-in is audited before its cookie is set: the database down, a 503 page (was a bare 500)
            await to_thread.run_sync(lambda: console.audit(identity, SIGN_IN, None, request, method="operator"))
        except ClerkSyncError as exc:
            return console.clerk_error(request, exc)
        return _signed_in(console, request, identity, form.get("next", ""))

    return endpoint


def _login_clerk(console: Console) -> Callable[[Request], Awaitable[Response]]:
    """A sign-in link carrying a Clerk session token (``clerk-sync dev`` prints one for its demo admin), or a
    caller already signed in with Clerk (its ``__session`` cookie) or holding a ``Bearer``. A link's token and a
    ``Bearer`` (the operator token, or a guess at it) are throttled as every sign-in (:meth:`Console.sign_in`).
    A link followed from another site, or into a browser with a console session open, only asks first
    (:mod:`._link`); a link's refused token leaves the session open in the browser as it was."""

    async def endpoint(request: Request) -> Response:
        token = request.query_params.get("token", "")
        try:
            bearer = bearer_token(request.headers)
            if token and _link.needs_confirmation(request):
                admin = await console.sign_in(request, "link", token, lambda: console.access.clerk_admin(token),
                                               operator=None, sessions=True, guessed=_guessed)
                return _link.ask_first(console, request, admin)
            if token:  # a session token only: the operator token here is a guess as any other
                identity = await console.sign_in(request, "link", token, lambda: console.access.clerk_session(token),
                                                  operator=None, sessions=True, guessed=_guessed)
            elif bearer is not None:
                identity = await console.sign_in(
                    request, "bearer", bearer, lambda: console.access.identify(request.headers, request.cookies),
                    operator=console.access.operator, sessions=True, guessed=_guessed)
            else:
                identity = await to_thread.run_sync(console.access.identify, request.headers, request.cookies)
            if identity.new_cookie:
                await to_thread.run_sync(lambda: console.audit(identity, SIGN_IN, identity.clerk_id, request,
                                                               method="clerk_link" if token else "clerk_session",
                                                               sid=identity.session_id,
                                                               session=identity.session_digest))
        except SignInThrottled as exc:
            return _throttled(console, request, exc)
        except ClerkSyncError as exc:
            response = console.clerk_error(request, exc)
            if isinstance(exc, TokenError) and not token:  # any site may link a bad token: no sign-out for it
                _signed_out(request, response)
            return response
        return _signed_in(console, request, identity, "")

    return endpoint


def _signed_in(console: Console, request: Request, identity: Identity, next_path: str) -> Response:
    home = console.path_for(request, "overview")
    root = request.scope.get("root_path") or ""
    target = next_path if _inside_console(next_path, root) else home
    response = RedirectResponse(target, status_code=303)
    if identity.new_cookie:
        set_session_cookie(request, response, identity.new_cookie)
    return response


def _inside_console(next_path: str, root: str) -> bool:
    """Whether redirecting to ``next_path`` stays inside the console: never an open redirect to another site,
    nor a way out of the console through dot segments (``/console/../x``, ``%2e%2e`` too), which the browser
    resolves before it requests the page."""
    path = next_path.split("?", 1)[0].split("#", 1)[0]
    return (next_path.startswith(root + "/") and not next_path.startswith("//") and "\\" not in next_path
            and next_path.isprintable() and not any(s in (".", "..") for s in unquote(path).split("/")))


def check_console_settings(settings: Settings) -> None:
    """Raise the ConfigError :func:`create_console` would: nobody could sign in (no operator token, no
    Clerk key to verify admins' sessions), or the console has no secret of its own to sign its cookies
    with (:func:`_check_cookie_key`). ``serve --workers`` checks it once, before its workers start,
    without building the console (whose Clerk client would count the supervisor among the workers)."""
    if not (settings.console_operator_token or settings.clerk_jwt_key or settings.clerk_secret_key
            or settings.clerk_jwks_url):
        raise ConfigError("the console has no way to sign in: set CLERK_SYNC_CONSOLE_TOKEN (operator token), or "
                          "CLERK_SECRET_KEY / CLERK_JWT_KEY so admins can sign in with Clerk")
    _check_cookie_key(settings)


def _check_cookie_key(settings: Settings) -> None:
    """The cookie key needs a secret nobody outside holds (see :func:`signing_key`). Admins signing in with
    ``CLERK_JWT_KEY`` / ``CLERK_JWKS_URL`` alone leave only the webhook signing secret, which Clerk and Svix
    hold: rather than fall back on it (anyone with it could sign a console session for any admin) or on a
    random key (every worker its own, every restart a sign-out), start-up stops and says what to set."""
    if not (settings.console_secret or settings.console_operator_token or settings.clerk_secret_key):
        raise ConfigError(NO_KEY)
    if settings.console_secret is not None and settings.webhook_secret is not None:
        own = settings.console_secret.get_secret_value().strip()
        shared = {s.strip() for s in settings.webhook_secret.get_secret_value().replace(",", " ").split()}
        if own in shared or own.removeprefix("whsec_") in {s.removeprefix("whsec_") for s in shared}:
            raise ConfigError("CLERK_SYNC_CONSOLE_SECRET is the webhook signing secret, which Clerk and Svix hold "
                              f"too: give the console a secret of its own ({_CONSOLE_SECRET_HELP})")


def create_console(store: Store, settings: Settings, *, clerk: ClerkClient | None = None,
                   authenticator: Authenticator | None = None, now: Callable[[], datetime] = utcnow,
                   secret: bytes | None = None, metrics: Metrics | None = None,
                   sign_ins: SignInThrottle | None = None) -> Starlette:
    """The console as a Starlette app: ``Mount("/console", app=create_console(store, settings))``.

    ``clerk`` (default: from ``CLERK_SECRET_KEY``) powers drift and promotion; ``authenticator``
    (default: from the session-key settings) lets Clerk-signed-in admins in. Without either an
    authenticator or ``CLERK_SYNC_CONSOLE_TOKEN`` nobody could sign in: that is a ConfigError. So is a console
    whose session cookies would have no key of its own: set ``CLERK_SYNC_CONSOLE_SECRET`` when neither
    ``CLERK_SYNC_CONSOLE_TOKEN`` nor ``CLERK_SECRET_KEY`` is (``secret`` gives the key directly).
    ``metrics``: where the Clerk client's calls, 429s, breaker and budget, and the drift page's reconcile
    runs are counted (``serve`` passes its own, so the ``clerk_sync_clerk_api_*`` and
    ``clerk_sync_reconcile_*`` series and their alerts move, and failed sign-ins are counted in
    ``clerk_sync_console_sign_in_failures_total``). ``sign_ins``: how many failed sign-ins a client address
    may make, and in how long, before it is answered 429 (default: 10 in 10 minutes).
    """
    if clerk is None and settings.clerk_secret_key is not None:
        clerk = ClerkClient.from_settings(settings, metrics=metrics)
    if authenticator is None and (settings.clerk_jwt_key or settings.clerk_secret_key or settings.clerk_jwks_url):
        authenticator = Authenticator(verifier_from_settings(settings), store, metrics=metrics)
    operator = settings.console_operator_token.get_secret_value() if settings.console_operator_token else None
    if authenticator is None:
        check_console_settings(settings)
    elif secret is None:
        _check_cookie_key(settings)
    key = secret or signing_key(
        console_secret=settings.console_secret.get_secret_value() if settings.console_secret else None,
        operator_token=operator,
        clerk_secret_key=settings.clerk_secret_key.get_secret_value() if settings.clerk_secret_key else None)
    access = ConsoleAccess(store, operator_token=operator, authenticator=authenticator, secret=key,
                           max_age_s=settings.console_session_s)
    limits = {"max_delivery_age_s": settings.freshness_max_delivery_age_s,
              "max_failed": settings.freshness_max_failed,
              "max_reconcile_age_s": settings.freshness_max_reconcile_age_s,
              "max_hook_wait_s": settings.freshness_max_hook_wait_s}
    console = Console(store, access, clerk=clerk, read_only=settings.console_read_only, now=now,
                      freshness_limits=limits, metrics=metrics, instance_id=settings.instance_id,
                      sign_ins=sign_ins)
    app = _ConsoleApp(routes=_routes(console))
    console.router = app.router
    app.state.console = console
    return app

