"""The Flask extension: settings from ``app.config``, per-app state, the session proxies and the guards.

Shaped like Flask-Login: ``ClerkSync(app)`` or ``ClerkSync()`` then ``init_app(app)``; everything built
for an app lives in ``app.extensions["clerk_sync"]`` (a :class:`ClerkSyncState`), so one extension
object can serve several apps. Flask is synchronous: the blocking ``Authenticator.authenticate`` and
``JitUsers.get_auth_user`` run in the request thread, and no event loop is ever created.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import httpx
from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.local import LocalProxy

from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.auth.users import AuthUser, JitUsers
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkSyncError, ConfigError, TokenError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.http import error_response
from clerk_sync.integrations.starlette import build_processor
from clerk_sync.store import Store

__all__ = [
    "EXTENSION_KEY",
    "ClerkSync",
    "ClerkSyncState",
    "clerk_login_required",
    "clerk_state",
    "current_clerk",
    "current_user",
    "error_json",
    "not_impersonated",
    "optional_clerk",
    "public",
    "require_org_role",
    "require_permission",
    "require_role",
    "settings_from_config",
]

EXTENSION_KEY = "clerk_sync"
WEBHOOK_ENDPOINT = "clerk_sync.webhook"
_PUBLIC_ATTR = "clerk_sync_public"
P = ParamSpec("P")
R = TypeVar("R")


# -- settings --------------------------------------------------------------------------------------
def _spellings() -> dict[str, tuple[str, ...]]:
    """Each setting's primary environment name -> its environment names, in Settings' order of preference."""
    out: dict[str, tuple[str, ...]] = {}
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = [alias] if isinstance(alias, str) else [c for c in getattr(alias, "choices", ()) if isinstance(c, str)]
        out[names[0] if names else name] = tuple(names)
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
    """
    spellings = _spellings()
    section = config.get("CLERK_SYNC") or {}
    if not isinstance(section, Mapping):
        raise ConfigError("app.config['CLERK_SYNC'] must be a dict of settings, e.g. {'DATABASE_URL': ...}")
    fields = {primary: (*keys, name) for (primary, keys), name in zip(spellings.items(), Settings.model_fields,
                                                                       strict=True)}
    known = {key for keys in fields.values() for key in keys}
    unknown = sorted(str(k) for k in section if k not in known)
    if unknown:
        raise ConfigError(f"unknown key(s) in app.config['CLERK_SYNC']: {', '.join(unknown)}; use the "
                          f"environment variable names (CLERK_WEBHOOK_SIGNING_SECRET, DATABASE_URL, ...)")
    values = _pick(os.environ if environ is None else environ, spellings)
    values.update(_pick(config, spellings))
    values.update(_pick(section, fields))
    return Settings.from_env(values)


# -- per-app state ---------------------------------------------------------------------------------
@dataclass(eq=False)
class ClerkSyncState:
    """What :class:`ClerkSync` built for one app: find it with :func:`clerk_state`.

    ``processor`` is None without a webhook route, ``authenticator`` without session keys
    (``CLERK_JWT_KEY`` or ``CLERK_SECRET_KEY``), ``users`` (JIT sync) and ``admin`` without
    ``CLERK_SECRET_KEY``.
    """

    settings: Settings
    store: Store
    processor: WebhookProcessor | None = None
    authenticator_: Authenticator | None = None
    users: JitUsers | None = None
    admin: AdminActions | None = None
    deny_by_default: bool = False
    public_endpoints: frozenset[str] = frozenset()
    audit_impersonation: bool = True
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def authenticator(self) -> Authenticator:
        if self.authenticator_ is None:
            raise ConfigError("session verification is not configured: set CLERK_JWT_KEY (Dashboard -> API keys "
                              "-> JWKS Public Key) or CLERK_SECRET_KEY (to fetch the JWKS) in app.config")
        return self.authenticator_

    def close(self) -> None:
        """Release the database pool and HTTP clients (tests, or an app that is torn down)."""
        for close in reversed(self._closers):
            close()
        self._closers.clear()


def clerk_state(app: Flask | None = None) -> ClerkSyncState:
    """The state of ``app`` (default: the current app)."""
    target = app if app is not None else current_app
    state = target.extensions.get(EXTENSION_KEY)
    if not isinstance(state, ClerkSyncState):
        raise RuntimeError("clerk-sync is not set up on this app: call ClerkSync(app) or ClerkSync().init_app(app)")
    return state


class ClerkSync:
    """The Flask extension: the webhook route, session verification, guards, errors as JSON, CLI.

    Usage::

        app.config["CLERK_SYNC"] = {"DATABASE_URL": ..., "CLERK_WEBHOOK_SIGNING_SECRET": ...}
        clerk = ClerkSync(app, deny_by_default=True, public_endpoints={"home"})

    ``deny_by_default`` refuses (401) every endpoint without a valid session unless it is listed in
    ``public_endpoints`` or decorated with :func:`public` (the webhook route always is).
    ``jit`` syncs a signed-in user whose webhook has not arrived (needs ``CLERK_SECRET_KEY``).
    ``revocation_refresh_s`` is how stale the deny list (revoked sessions, banned users) may be.
    """

    def __init__(self, app: Flask | None = None, *, settings: Settings | None = None,
                 webhook_path: str | None = "/webhooks/clerk", deny_by_default: bool = False,
                 public_endpoints: Iterable[str] = ("static",), jit: bool = True,
                 audit_impersonation: bool = True, revocation_refresh_s: float = 1.0) -> None:
        self.settings = settings
        self.webhook_path = webhook_path
        self.deny_by_default = deny_by_default
        self.public_endpoints = frozenset(public_endpoints)
        self.jit = jit
        self.audit_impersonation = audit_impersonation
        self.revocation_refresh_s = revocation_refresh_s
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Build the app's state from its config (errors name the missing setting), register the rest."""
        from clerk_sync.integrations.flask._cli import cli_group
        from clerk_sync.integrations.flask._webhook import webhook_blueprint

        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("ClerkSync is already set up on this app")
        state = self._build(self.settings or settings_from_config(app.config))
        app.extensions[EXTENSION_KEY] = state
        if self.webhook_path is not None:
            app.register_blueprint(webhook_blueprint(self.webhook_path))
        app.register_error_handler(ClerkSyncError, error_json)
        app.before_request(_deny_by_default)
        app.cli.add_command(cli_group())

    def state(self, app: Flask | None = None) -> ClerkSyncState:
        return clerk_state(app)

    def _build(self, settings: Settings) -> ClerkSyncState:
        # A missing or malformed webhook secret fails here, at start-up, not on the first delivery.
        processor = build_processor(settings) if self.webhook_path is not None else None
        store = processor.store if processor is not None else Store.from_url(settings.sqlalchemy_url())
        public = self.public_endpoints | ({WEBHOOK_ENDPOINT} if processor else set())
        state = ClerkSyncState(settings, store, processor, deny_by_default=self.deny_by_default,
                               public_endpoints=public, audit_impersonation=self.audit_impersonation)
        state._closers.append(store.dispose)
        if settings.clerk_secret_key is not None:
            clerk = ClerkClient.from_settings(settings)
            state._closers.append(clerk.close)
            state.admin = AdminActions(store, clerk)
            state.users = JitUsers(store, clerk=clerk) if self.jit else None
        if settings.clerk_jwt_key is not None or settings.clerk_secret_key is not None or settings.clerk_jwks_url:
            http = httpx.Client()
            state._closers.append(http.close)
            load_user = state.users.get_auth_user if state.users is not None else None
            state.authenticator_ = Authenticator(
                verifier_from_settings(settings, http=http), store,
                deny_list=DenyList(store, refresh_s=self.revocation_refresh_s), load_user=load_user,
            )
        return state


# -- errors ----------------------------------------------------------------------------------------
def error_json(exc: ClerkSyncError) -> Response:
    """A clerk-sync error as a Flask response (status, body and headers from :mod:`..http`)."""
    answer = error_response(exc)
    response = jsonify(answer.body)
    response.status_code = answer.status
    response.headers.update(answer.headers)
    return response


# -- who is calling --------------------------------------------------------------------------------
def _current_auth() -> Auth:
    """Verify the session once per request (raises a TokenError: 401); audit impersonated requests."""
    auth: Auth | None = g.get("_clerk_auth")
    if auth is None:
        state = clerk_state()
        headers = {k.lower(): v for k, v in request.headers.items()}
        auth = state.authenticator.authenticate(headers, request.cookies)
        g._clerk_auth = auth
        if auth.is_impersonated and state.audit_impersonation:
            state.authenticator.audit_impersonated_request(auth, request.method, request.path, request.remote_addr)
    return auth


def _current_user() -> AuthUser:
    """The caller's row, read (or JIT-synced) on first use in a request and kept for the rest of it."""
    user: AuthUser | None = g.get("_clerk_user")
    if user is None:
        user = clerk_state().authenticator.user(_current_auth())
        g._clerk_user = user
    return user


#: The verified session of this request (:class:`~clerk_sync.auth.claims.Auth`); 401 without one.
current_clerk = cast(Auth, LocalProxy(_current_auth))
#: The caller's ``users`` row (:class:`~clerk_sync.auth.users.AuthUser`), JIT-synced when configured.
current_user = cast(AuthUser, LocalProxy(_current_user))


def optional_clerk() -> Auth | None:
    """The verified session, or None when the request has none (or a bad one): for public pages."""
    try:
        return _current_auth()
    except TokenError:
        return None


# -- guards ----------------------------------------------------------------------------------------
def public(view: Callable[P, R]) -> Callable[P, R]:
    """Mark a view as open to everyone when ``deny_by_default`` is on."""
    setattr(view, _PUBLIC_ATTR, True)
    return view


def _deny_by_default() -> None:
    state = clerk_state()
    if not state.deny_by_default:
        return
    endpoint = request.endpoint
    view = current_app.view_functions.get(endpoint) if endpoint else None
    if endpoint in state.public_endpoints or getattr(view, _PUBLIC_ATTR, False):
        return
    _current_auth()  # unknown paths too: refuse before revealing what exists


def _guard(check: Callable[[], object]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorator(view: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            check()
            return view(*args, **kwargs)

        return wrapper

    return decorator


def clerk_login_required(view: Callable[P, R]) -> Callable[P, R]:
    """A valid session (401 otherwise)."""
    return _guard(_current_auth)(view)


def require_role(*roles: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """An app role confirmed against the DB row, so a demotion applies on the next request (403)."""

    def check() -> None:
        g._clerk_user = clerk_state().authenticator.require_role(_current_auth(), *roles)

    return _guard(check)


def require_org_role(*roles: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """An active organization with one of ``roles`` (``org:admin`` ...), from the token (403)."""
    return _guard(lambda: Authenticator.require_org_role(_current_auth(), *roles))


def require_permission(permission: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``permission`` in the active organization (403)."""
    return _guard(lambda: Authenticator.require_permission(_current_auth(), permission))


def not_impersonated(view: Callable[P, R]) -> Callable[P, R]:
    """Refuse impersonated sessions on sensitive routes (billing, password, deleting the account)."""
    return _guard(lambda: Authenticator.forbid_impersonation(_current_auth()))(view)
