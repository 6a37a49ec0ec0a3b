"""What the Flask extension stands on: settings from ``app.config``, per-app state, the session proxies, the guards.

Everything built for an app lives in ``app.extensions["clerk_sync"]`` (a :class:`ClerkSyncState`), so one
:class:`~clerk_sync.integrations.flask.ClerkSync` can serve several apps. Flask is synchronous: the
blocking ``Authenticator.authenticate`` and ``JitUsers.get_auth_user`` run in the request thread, and no
event loop is ever created.

What ``deny_by_default`` leaves open to a caller without a session: endpoints listed in
``public_endpoints`` or marked :func:`public`, the webhook, the static files Flask serves from the app's
``static_folder`` (not a view of the app's own named ``static``, nor a blueprint's unless listed), and a
browser's preflight that Flask answers itself. A URL the routing redirects: Werkzeug's own redirect (a
missing slash, merged slashes) or a ``redirect_to`` string when it leads to one of those; a ``redirect_to``
rule whose own endpoint is public wherever it leads; a ``redirect_to`` callable only then. Everything else,
unknown paths included, answers 401 (see :func:`_redirect_is_public`).
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, ParamSpec, TypeVar, cast
from urllib.parse import unquote, urlsplit

import click
from flask import Flask, Response, current_app, has_request_context, jsonify, request
from flask.cli import ScriptInfo
from werkzeug.exceptions import HTTPException
from werkzeug.local import LocalProxy
from werkzeug.routing import MapAdapter, RequestRedirect, RoutingException, Rule
from werkzeug.routing.exceptions import NoMatch

from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import check_websocket_origin, is_cors_preflight
from clerk_sync.auth.users import AuthUser, JitUsers
from clerk_sync.config import Settings
from clerk_sync.errors import (
    AccessDenied,
    ClerkAPIError,
    ClerkSyncError,
    ConfigError,
    StoreError,
    TokenError,
    TokenMissing,
)
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.http import error_response
from clerk_sync.store import Store

__all__ = [
    "EXTENSION_KEY",
    "WEBHOOK_ENDPOINT",
    "AnonymousUser",
    "ClerkSyncState",
    "SignedInUser",
    "clerk_login_required",
    "clerk_state",
    "cli_config_errors",
    "current_clerk",
    "current_user",
    "deny_by_default",
    "error_json",
    "not_impersonated",
    "optional_clerk",
    "public",
    "require_org_role",
    "require_permission",
    "require_role",
    "settings_from_config",
    "user_context",
]

EXTENSION_KEY = "clerk_sync"
WEBHOOK_ENDPOINT = "clerk_sync.webhook"
SYNC_ME_ENDPOINT = "clerk_sync_me"  # ClerkSync(sync_me_path=...): a login-required route, never public
_PUBLIC_ATTR = "clerk_sync_public"
P = ParamSpec("P")
R = TypeVar("R")


# -- settings --------------------------------------------------------------------------------------
class _ConfigErrorForCli(ConfigError, click.ClickException):
    """A settings error raised while the ``flask`` command loads the app: click shows it as ``Error: ...``
    and exits 2 (``clerk-sync``'s code for a setting to fix), as Flask shows an app it cannot find, where any
    other exception ends every ``flask`` command (``routes``, ``shell``, ``clerk-sync migrate``) in the
    traceback of the app's loading. Still a :class:`ConfigError` to an ``except`` in the app's factory."""

    def __init__(self, message: str) -> None:
        from clerk_sync.cli.main import EXIT_SETTINGS  # (the CLI's one table; imported only when it fails)

        click.ClickException.__init__(self, message)
        self.exit_code = EXIT_SETTINGS  # type: ignore[misc]  # (click reads it from the instance)


@contextmanager
def cli_config_errors() -> Iterator[None]:
    """A :class:`ConfigError` raised inside, under the ``flask`` command line, re-raised as one line for it."""
    try:
        yield
    except ConfigError as exc:
        ctx = click.get_current_context(silent=True)
        if isinstance(exc, click.ClickException) or ctx is None or ctx.find_object(ScriptInfo) is None:
            raise
        raise _ConfigErrorForCli(str(exc)) from exc


def _spellings(*, field_names: bool = False) -> dict[str, tuple[str, ...]]:
    """Each setting's primary environment name -> its environment names in Settings' order of preference
    (then its field name, with ``field_names``)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = [alias] if isinstance(alias, str) else [c for c in getattr(alias, "choices", ()) if isinstance(c, str)]
        out[names[0] if names else name] = (*names, name) if field_names else tuple(names)
    return out


def _pick(source: Mapping[str, Any], spellings: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """The settings present in ``source``, keyed by primary name (the preferred spelling wins)."""
    return {primary: source[key] for primary, keys in spellings.items()
            for key in reversed(keys) if key in source}


def settings_from_config(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """One :class:`~clerk_sync.config.Settings` from a Flask config, under the environment's names.

    Precedence: the ``CLERK_SYNC`` dict (environment names or ``Settings`` field names), then top-level
    config keys named like the environment variables (``CLERK_WEBHOOK_SIGNING_SECRET``, ``DATABASE_URL``,
    ``CLERK_SYNC_MAX_BODY_BYTES`` ...), then the environment (``environ``, default ``os.environ``).
    ``CLERK_AUTHORIZED_PARTIES`` and the webhook secret take a list as well as a comma-separated string.
    A malformed setting raises :class:`~clerk_sync.errors.ConfigError` (under the ``flask`` command line, one
    that click shows as one line, exit 2: see :func:`cli_config_errors`).
    """
    with cli_config_errors():
        return _settings_from_config(config, environ)


def _settings_from_config(config: Mapping[str, Any], environ: Mapping[str, str] | None) -> Settings:
    spellings, fields = _spellings(), _spellings(field_names=True)
    section = config.get("CLERK_SYNC") or {}
    if not isinstance(section, Mapping):
        raise ConfigError("app.config['CLERK_SYNC'] must be a dict of settings, e.g. {'DATABASE_URL': ...}")
    known = {key for keys in fields.values() for key in keys}
    unknown = sorted(str(k) for k in section if k not in known)
    if unknown:
        raise ConfigError(f"unknown key(s) in app.config['CLERK_SYNC']: {', '.join(unknown)}; use the "
                          f"environment variable names (CLERK_WEBHOOK_SIGNING_SECRET, DATABASE_URL, ...)")
    values = _pick(os.environ if environ is None else environ, spellings)
    values.update(_pick(config, spellings))
    values.update(_pick(section, fields))
    for name in _LISTS:  # a list of origins or secrets, as Django's CLERK_SYNC takes it: comma-separated
        if isinstance(values.get(name), list | tuple | set | frozenset):
            values[name] = ",".join(str(v) for v in values[name])
    return Settings.from_env(values)


# The settings read comma-separated (authorized parties; webhook secrets, for rotation), by primary name
_LISTS = frozenset(primary for primary, names in _spellings(field_names=True).items()
                   if {"authorized_parties_raw", "webhook_secret", "impersonator_roles_raw"} & set(names))


# -- per-app state ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ClerkSyncState:
    """What :class:`~clerk_sync.integrations.flask.ClerkSync` built for one app: find it with :func:`clerk_state`.

    ``processor`` is None without a webhook route or its secret, ``authenticator`` without session keys
    (``CLERK_JWT_KEY`` or ``CLERK_SECRET_KEY``), ``users`` (JIT sync) and ``admin`` without
    ``CLERK_SECRET_KEY``.
    """

    settings: Settings
    store: Store
    processor: WebhookProcessor | None = None
    authenticator: Authenticator | None = None
    users: JitUsers | None = None
    admin: AdminActions | None = None
    deny_by_default: bool = False
    public_endpoints: frozenset[str] = frozenset()
    audit_impersonation: bool = True
    closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Release the database pool and HTTP clients (tests, or an app that is torn down)."""
        while self.closers:
            self.closers.pop()()


def _authenticator(state: ClerkSyncState) -> Authenticator:
    if state.authenticator is None:
        raise ConfigError("session verification is not configured: set CLERK_JWT_KEY (Dashboard -> API keys -> "
                          "JWKS Public Key) or CLERK_SECRET_KEY (to fetch the JWKS) in app.config or the environment")
    return state.authenticator


def clerk_state(app: Flask | None = None) -> ClerkSyncState:
    """The state of ``app`` (default: the current app)."""
    target = app if app is not None else current_app
    state = target.extensions.get(EXTENSION_KEY)
    if not isinstance(state, ClerkSyncState):
        raise RuntimeError("clerk-sync is not set up on this app: call ClerkSync(app) or ClerkSync().init_app(app)")
    return state


# -- errors ----------------------------------------------------------------------------------------
def error_json(exc: ClerkSyncError) -> Response:
    """A clerk-sync error as a Flask response (status, body and headers from :mod:`..http`)."""
    answer = error_response(exc)
    response = jsonify(answer.body)
    response.status_code = answer.status
    response.headers.update(answer.headers)
    return response


def _refusal(exc: ClerkSyncError) -> Response:
    """The answer to a refusal of :func:`deny_by_default` or a guard, made where it is raised instead of raising
    it: Flask tries a blueprint's error handlers for every class of the exception before the app's, so a
    blueprint's ``errorhandler(Exception)`` (Flask's documented catch-all) turned every 401 and 403 into its
    500. An app's or blueprint's own handler for ``ClerkSyncError`` (or a subclass) still answers, looked up as
    Flask does (the request's blueprints, innermost first, then the app), over the exception's classes up to
    ``ClerkSyncError`` only; :func:`error_json` otherwise."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    classes = type(exc).__mro__
    classes = classes[:classes.index(ClerkSyncError) + 1]
    for name in (*request.blueprints, None):
        handlers = app.error_handler_spec.get(name, {}).get(None, {})  # (get: no entry added to the spec)
        for cls in classes:
            handler = handlers.get(cls)
            if handler is not None:
                return app.make_response(app.ensure_sync(handler)(exc))
    return error_json(exc)


# -- who is calling --------------------------------------------------------------------------------
def _cached() -> dict[str, Any]:
    """This request's verified session and row, on the request object itself. Not in ``g``: that belongs
    to the app context, which requests share inside an outer ``with app.app_context():`` (a request without
    credentials got the previous request's user). Not in the WSGI environ either: Flask-SocketIO runs every
    event of a connection on the handshake's environ (a ban or revocation would never be seen again), and a
    sub-request may copy it."""
    current = request._get_current_object()  # type: ignore[attr-defined]
    cache: dict[str, Any] | None = getattr(current, "_clerk_sync", None)
    if cache is None:
        cache = {}
        current._clerk_sync = cache
    return cache


def _current_auth() -> Auth:
    """Verify the session once per request (raises a TokenError: 401); audit impersonated requests.

    A POST (any unsafe method) riding on the ``__session`` cookie must come from an allowed origin, else
    403 ``cross_site_request`` (see :func:`~clerk_sync.auth.sessions.check_request_origin`).
    """
    cache = _cached()
    auth: Auth | None = cache.get("auth")
    if auth is None:
        refused: ClerkSyncError | None = cache.get("refused")
        if refused is not None:  # refused once (deny_by_default, optional_clerk, current_user): not judged again
            raise refused
        state = clerk_state()
        headers = {k.lower(): v for k, v in request.headers.items()}
        authenticator = _authenticator(state)
        try:
            if _is_websocket_handshake(headers):  # a GET the POST rule lets through: its origin checked as ASGI's
                check_websocket_origin(headers, request.cookies, scheme=request.scheme,
                                       authorized_parties=authenticator.verifier.claims.authorized_parties)
            auth = authenticator.authenticate(headers, request.cookies, method=request.method, scheme=request.scheme)
        except ClerkSyncError as exc:  # one verdict a request, counted once in clerk_sync_auth_refused_total
            cache["refused"] = exc
            raise
        if auth.is_impersonated and state.audit_impersonation:  # no audit row, no access (503)
            authenticator.audit_impersonated_request(auth, request.method, request.path, request.remote_addr)
        _cached()["auth"] = auth
    return auth


def _is_websocket_handshake(headers: Mapping[str, str]) -> bool:
    """A websocket opening handshake (RFC 6455: ``Upgrade: websocket``), as flask-sock and simple-websocket serve
    them through Flask's routing and its ``before_request`` hooks."""
    return any(token.strip().lower() == "websocket" for token in headers.get("upgrade", "").split(","))


def _standing_auth() -> Auth:
    """The verified session with its active organization as ``organization_memberships`` has it now (see
    :meth:`~clerk_sync.auth.authenticator.Authenticator.standing_org_role`): what ``current_clerk`` shows.
    Read once a request (one indexed query when the token names an organization role), or taken from the
    org-role or permission guard that read it."""
    cache = _cached()
    standing: Auth | None = cache.get("standing")
    if standing is None:
        auth = _current_auth()
        standing = auth if auth.org_role is None else _authenticator(clerk_state()).standing_org_role(auth)
        cache["standing"] = standing
    return standing


def sync_me() -> Response:
    """``POST /sync/me`` (``ClerkSync(app, sync_me_path=...)``): Flow A, the front end calls it right after
    sign-up so the row exists before ``user.created`` arrives (one budgeted Clerk call a user per
    ``CLERK_SYNC_JIT_REFRESH_INTERVAL_S``, the webhook's guarded upsert)."""
    user_id = _current_auth().user_id  # the session first: 401 to a stranger, whatever the set-up
    users = clerk_state().users
    if users is None:
        raise ConfigError(f"{request.path} fetches the signed-in user from Clerk: set CLERK_SECRET_KEY (and keep "
                          "ClerkSync(jit=True)), or drop sync_me_path")
    user = users.refresh_user(user_id)
    return jsonify({"user_id": user.clerk_id, "email": user.email, "role": user.role})


class SignedInUser(AuthUser):
    """``current_user`` with a session: the caller's ``users`` row (an :class:`AuthUser`), shaped like a
    Flask-Login user (``is_authenticated``, ``is_active``, ``is_anonymous``, ``get_id()``)."""

    __slots__ = ()

    @classmethod
    def of(cls, user: AuthUser) -> SignedInUser:
        return user if isinstance(user, cls) else cls(**{f.name: getattr(user, f.name) for f in fields(user)})

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_active(self) -> bool:
        return True  # banned, deleted, locked and deprovisioned users never get this far

    @property
    def is_anonymous(self) -> bool:
        return False

    def get_id(self) -> str:
        return self.clerk_id


class AnonymousUser:
    """``current_user`` without a usable session, shaped like Flask-Login's anonymous user: falsy,
    ``is_authenticated`` False, ``is_anonymous`` True, ``get_id()`` None.

    Reading any other attribute (``current_user.email``) raises ``error``, why there is no user (401
    no/invalid session, 403, 503), so a view that reads the row without a guard refuses as before.
    """

    __slots__ = ("error",)

    def __init__(self, error: ClerkSyncError) -> None:
        self.error = error

    @property
    def is_authenticated(self) -> bool:
        return False

    @property
    def is_active(self) -> bool:
        return False

    @property
    def is_anonymous(self) -> bool:
        return True

    def get_id(self) -> None:
        return None

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("_"):  # copy, pickle and friends probe for dunders
            raise AttributeError(name)
        raise self.error

    def __repr__(self) -> str:
        return f"<AnonymousUser: {self.error.code}>"


def _current_user() -> SignedInUser | AnonymousUser:
    """The caller's row, read (or JIT-synced) on first use in a request and kept for the rest of it;
    without a usable session, an :class:`AnonymousUser` holding the refusal."""
    user: AuthUser | AnonymousUser | None = _cached().get("user")
    if user is None:
        try:
            user = _authenticator(clerk_state()).user(_current_auth())
        except (TokenError, AccessDenied, StoreError, ClerkAPIError) as exc:  # as optional_clerk, and JIT
            user = AnonymousUser(exc)  # sync failing: public pages stay up, fields still refuse
    if isinstance(user, AuthUser):
        user = SignedInUser.of(user)
    _cached()["user"] = user
    return user


#: The verified session of this request (:class:`~clerk_sync.auth.claims.Auth`), its active organization as
#: the database has it now (a removed member has none; see :func:`_standing_auth`); 401 without one.
current_clerk = cast(Auth, LocalProxy(_standing_auth))
#: The caller's ``users`` row (:class:`SignedInUser`, an :class:`~clerk_sync.auth.users.AuthUser`),
#: JIT-synced when configured; without a usable session an :class:`AnonymousUser` (``is_authenticated``
#: False) whose other attributes refuse (401). Typed as the signed-in user: check ``is_authenticated``.
current_user = cast(SignedInUser, LocalProxy(_current_user))


def user_context() -> dict[str, Any]:
    """Context processor: ``current_user`` in templates, as Flask-Login does (which keeps its own when the
    app also uses Flask-Login). Lazy: the row is read only when a template uses it. None without session
    keys (a webhook-only app): it would shadow the app's own ``current_user`` with a 500 on every page.
    Without a request (a template rendered in ``app.app_context()`` alone: an e-mail sent by a CLI command or a
    job) nobody is calling: an :class:`AnonymousUser` (Flask-Login gives None there)."""
    if hasattr(current_app, "login_manager") or clerk_state().authenticator is None:
        return {}
    if not has_request_context():
        return {"current_user": AnonymousUser(TokenMissing("no request: this template was rendered outside one "
                                                           "(app.app_context() alone), nobody is signed in"))}
    return {"current_user": current_user}


def optional_clerk() -> Auth | None:
    """The verified session, or None when the request has none (or a bad one): for public pages.

    A database outage (deny list or membership unreadable) also reads as signed out: it must not take public
    pages down. The active organization is the database's, as :data:`current_clerk` shows it.
    """
    try:
        return _standing_auth()
    except (TokenError, AccessDenied, StoreError):  # a locked user browses public pages signed out
        return None


# -- guards ----------------------------------------------------------------------------------------
def public(view: Callable[P, R]) -> Callable[P, R]:
    """Mark a view as open to everyone when ``deny_by_default`` is on."""
    setattr(view, _PUBLIC_ATTR, True)
    return view


def deny_by_default() -> Response | None:
    """``before_request``: refuse non-public endpoints without a valid session (when the app asks for it).

    A URL the routing answers with a redirect has no endpoint here: this runs before Flask acts on it, and
    it is judged by :func:`_redirect_is_public`. A signed-in caller gets Flask's redirect.
    """
    state = clerk_state()
    if not state.deny_by_default:
        return None
    redirect = isinstance(request.routing_exception, RequestRedirect)  # (endpoint is None: no rule was matched)
    if _redirect_is_public(state) if redirect else _is_public(state, request.endpoint):
        return None
    if is_cors_preflight(request.method, request.headers.get("Access-Control-Request-Method")):
        # A browser's preflight carries no session by design and needs a 2xx before the real request; any
        # client can fake one, though. So every preflight to what is not public gets this same bare 200 (Flask-CORS
        # adds its headers), whatever the path: Flask's own answer listed a route's methods in ``Allow`` where
        # a path nothing serves got 401, telling strangers what exists (review). No view runs for it.
        return current_app.response_class(status=200)
    try:
        _current_auth()  # unknown paths too: refuse before revealing what exists
    except ClerkSyncError as exc:
        return _refusal(exc)  # answered here: returned, a before_request's value is the response
    return None


def _is_public(state: ClerkSyncState, endpoint: str | None) -> bool:
    """Listed in ``public_endpoints`` (the webhook always is), a view decorated with :func:`public`, or the
    static files Flask itself serves from the app's ``static_folder`` (:func:`_is_flask_static`).

    A blueprint's static files (``<name>.static``) are public only when listed: an app may keep private
    assets in a blueprint's folder, and a release must not open them by itself. So is a view of the app's
    own registered as ``static`` (an app built with ``static_folder=None`` may use the name).
    """
    if endpoint is None:
        return False
    if endpoint in state.public_endpoints:
        return True
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    view = app.view_functions.get(endpoint)
    return bool(getattr(view, _PUBLIC_ATTR, False)) or (endpoint == "static" and _is_flask_static(app, view))


def _is_flask_static(app: Flask, view: object) -> bool:
    """Whether ``view`` is the one Flask registers as ``static`` for an app with a ``static_folder``:
    ``lambda **kw: self_ref().send_static_file(**kw)``, made in ``Flask.__init__`` around a weak reference to
    this app (Flask 2.0 to 3.1). A view that Flask did not make fails closed, protected: list ``"static"``
    in ``public_endpoints`` to open it."""
    code = getattr(view, "__code__", None)
    # Every ``__init__`` of the app's classes: ``flask.Flask`` may be a subclass by the time this module is
    # imported (OpenTelemetry's Flask instrumentation replaces it), and the view is made by Flask's own.
    inits = [getattr(vars(cls).get("__init__"), "__code__", None) for cls in type(app).__mro__]
    if not app.has_static_folder or not any(code is const for init in inits if init is not None
                                            for const in init.co_consts):
        return False
    cells = [cell.cell_contents for cell in getattr(view, "__closure__", None) or ()]
    return any(isinstance(ref, weakref.ref) and ref() is app for ref in cells)


_MAX_REDIRECTS = 5  # a chain longer than this (a loop of redirect_to rules) is not followed: protected


def _redirect_is_public(state: ClerkSyncState) -> bool:
    """Whether this request's routing redirect may be answered to a caller without a session.

    - Werkzeug's own redirects (``/docs`` for a rule declared ``/docs/``, merged slashes, a rule's
      defaults, an alias) name another URL of the same page, and a rule's ``redirect_to`` *string* is filled
      in from the request's URL alone: they are judged by where they lead. To a public endpoint of this app,
      within :data:`_MAX_REDIRECTS` redirects, Flask's redirect answers (308), as without the extension. To
      a protected endpoint, another site or a path nothing here serves, the signed-out get the 401 the page
      would give: a redirect reveals that a route exists, which is what deny-by-default keeps from strangers
      (an unknown path answers 401, not 404; answering ``/admin`` with ``/admin/`` would tell them apart).
    - A ``redirect_to`` rule whose own endpoint is public (listed in ``public_endpoints``, or the endpoint of
      a view marked :func:`public`) answers its redirect wherever it leads: another site, a path nothing
      serves, a protected page (which still asks for a session itself). The app published it.
    - Otherwise a ``redirect_to`` *callable* is judged as a view: 401 wherever it leads. It is the app's code
      computing a URL from the request (a slug or an email looked up from an id), which it may put in the
      ``Location`` of a redirect to a public page. Werkzeug runs it while routing, before any
      ``before_request``: it must not act on the caller's behalf. Judging never runs it again.
    """
    adapter = current_app.create_url_adapter(request)
    # Every request has an adapter. A Werkzeug without the matcher (2.2 to 3.1 have it) could not name the
    # rule a redirect came from: every redirect then asks the signed-out for a session.
    if adapter is None or not hasattr(adapter.map, "_matcher"):  # pragma: no cover
        return False
    return _leads_to_public(state, adapter, adapter.path_info, _MAX_REDIRECTS)


def _leads_to_public(state: ClerkSyncState, adapter: MapAdapter, path: str, hops: int) -> bool:
    """Whether what ``path`` answers here may go to the signed-out: see :func:`_redirect_is_public`."""
    rule = _rule_for(adapter, path)
    if rule is not None:
        if _is_public(state, rule.endpoint):
            return True  # its page, or its redirect wherever it leads
        if not isinstance(rule.redirect_to, str):
            return False  # a protected page, or a redirect the app's code computes
    try:
        adapter.match(path, method=request.method)  # runs no app code: a string redirect_to at most
    except RequestRedirect as redirect:
        target = _path_here(adapter, redirect.new_url)
        return hops > 0 and target is not None and _leads_to_public(state, adapter, target, hops - 1)
    except HTTPException:
        return False  # 404, 405: nothing the signed-out may learn of
    return False  # pragma: no cover - a path that matches had its rule above


def _rule_for(adapter: MapAdapter, path: str) -> Rule | None:
    """The rule Werkzeug matches ``path`` to, before it acts on the rule's ``redirect_to``; None when
    Werkzeug redirects the path itself (a missing slash, merged slashes, an alias) or nothing matches.
    Werkzeug names that rule nowhere public: this is its matcher, called as ``MapAdapter.match`` calls it."""
    domain = adapter.server_name if adapter.map.host_matching or adapter.subdomain is None else adapter.subdomain
    try:
        rule, _values = adapter.map._matcher.match(domain, f"/{path.lstrip('/')}" if path else "",
                                                   request.method, adapter.websocket)
    except (RoutingException, NoMatch):
        return None
    return rule


def _path_here(adapter: MapAdapter, url: str) -> str | None:
    """The path ``url`` names on this app, to match with its adapter; None for another host or scheme, or a
    path outside the app's root. (Werkzeug builds a redirect's URL from the request's adapter: scheme, host,
    script root, then the quoted path.)"""
    target = urlsplit(url)
    if (target.scheme, target.netloc) != (adapter.url_scheme or "http", adapter.get_host(None)):
        return None
    path, root = unquote(target.path).lstrip("/"), adapter.script_name.strip("/")
    if root:
        if path != root and not path.startswith(f"{root}/"):
            return None
        path = path[len(root):]
    return f"/{path.lstrip('/')}"


def _guard(check: Callable[[], object]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorator(view: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                check()
            except ClerkSyncError as exc:
                if not _dispatched(wrapper):  # a Flask-SocketIO event, a function a view calls: raised
                    raise
                return cast(R, _refusal(exc))  # the view Flask runs: answered here, as deny_by_default does
            # An ``async def`` view (flask[async]) is run to its result, as Flask does for an undecorated one
            # and Flask-Login's guards do: called as is, it would return a coroutine (500).
            return cast(R, current_app.ensure_sync(view)(*args, **kwargs))

        return wrapper

    return decorator


def _dispatched(guarded: Callable[..., Any]) -> bool:
    """Whether ``guarded`` is the view Flask dispatches this request to, or wrapped by it (other decorators
    over a guard keep ``__wrapped__``, as ``functools.wraps`` sets it; a ``MethodView``'s ``decorators``
    too). Only then is a refusal answered by the guard (see :func:`_refusal`): a Flask-SocketIO event handler
    (run in a request context of the handshake's, with no endpoint) or a guarded function a view calls gets
    the exception, as before, for its own handling."""
    endpoint = request.endpoint
    view = current_app.view_functions.get(endpoint) if endpoint is not None else None
    return view is not None and inspect.unwrap(view, stop=lambda f: f is guarded) is guarded


def clerk_login_required(view: Callable[P, R]) -> Callable[P, R]:
    """A valid session (401 otherwise)."""
    return _guard(_current_auth)(view)


def require_role(*roles: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """An app role confirmed against the DB row, so a demotion applies on the next request (403)."""

    def check() -> None:
        _cached()["user"] = _authenticator(clerk_state()).require_role(_current_auth(), *roles)

    return _guard(check)


def require_org_role(*roles: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """An active organization with one of ``roles`` (``org:admin`` ...) in the token, confirmed against the
    membership row, so a removal or demotion applies on the next request (403; see
    :meth:`~clerk_sync.auth.authenticator.Authenticator.confirm_org_role`)."""
    def check() -> None:  # the standing judged is current_clerk's too: one read a request, whichever guards ask
        auth = Authenticator.require_org_role(_current_auth(), *roles)  # a "no" reads nothing
        _authenticator(clerk_state()).confirm_org_role(auth, *roles, standing=_standing_auth())

    return _guard(check)


def require_permission(permission: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``permission`` in the active organization: in the token, and still granted by the membership row (403;
    see :meth:`~clerk_sync.auth.authenticator.Authenticator.confirm_permission`). A system permission
    (``org:sys_*``), which tokens never carry, is refused here (``ValueError``)."""
    Authenticator.guardable_permission(permission)

    def check() -> None:
        auth = Authenticator.require_permission(_current_auth(), permission)  # a "no" reads nothing
        _authenticator(clerk_state()).confirm_permission(auth, permission, standing=_standing_auth())

    return _guard(check)


def not_impersonated(view: Callable[P, R]) -> Callable[P, R]:
    """Refuse impersonated sessions on sensitive routes (billing, password, deleting the account)."""
    return _guard(lambda: Authenticator.forbid_impersonation(_current_auth()))(view)
