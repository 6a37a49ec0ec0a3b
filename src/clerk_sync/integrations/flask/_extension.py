"""The Flask extension, shaped like Flask-Login: ``ClerkSync(app)``, or ``ClerkSync()`` then ``init_app(app)``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import httpx
from flask import Flask

from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.authenticator import Authenticator, DenyList, warn_if_any_origin
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.auth.users import JitUsers
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkSyncError, ConfigError
from clerk_sync.freshness import database_probe
from clerk_sync.integrations.flask._cli import clerk_sync_cli
from clerk_sync.integrations.flask._core import (
    EXTENSION_KEY,
    SYNC_ME_ENDPOINT,
    WEBHOOK_ENDPOINT,
    ClerkSyncState,
    clerk_state,
    cli_config_errors,
    deny_by_default,
    error_json,
    settings_from_config,
    sync_me,
    user_context,
)
from clerk_sync.integrations.flask._webhook import webhook_blueprint
from clerk_sync.integrations.starlette import build_processor
from clerk_sync.store import Store

__all__ = ["ClerkSync"]


class ClerkSync:
    """The Flask extension: the webhook route, session verification, guards, errors as JSON, CLI.

    Usage::

        app.config["CLERK_SYNC"] = {"DATABASE_URL": ..., "CLERK_WEBHOOK_SIGNING_SECRET": ...}
        clerk = ClerkSync(app, deny_by_default=True, public_endpoints={"home"})

    ``deny_by_default`` refuses (401) every endpoint without a valid session unless it is listed in
    ``public_endpoints`` or decorated with :func:`public` (the webhook route and the static files Flask
    serves from the app's ``static_folder`` always are; a blueprint's static files when listed:
    ``public_endpoints={"shop.static"}``). A URL Flask redirects (``/docs`` for ``/docs/``, a
    ``redirect_to`` string) is judged by where it leads: Flask's 308 to a public page, the page's own 401 to
    the signed-out otherwise. A ``redirect_to`` rule whose endpoint is public answers wherever it leads
    (``public_endpoints={"old_blog"}`` for ``add_url_rule("/blog", "old_blog", redirect_to="https://...")``);
    a ``redirect_to`` callable is judged as a view, by its endpoint alone.
    Refusals answer as JSON (status, ``{"error", "message"}``), unless the app registered its own handler for
    :class:`~clerk_sync.errors.ClerkSyncError` (before or after ``init_app``), or a blueprint for its routes.
    ``jit`` syncs a signed-in user whose webhook has not arrived (needs ``CLERK_SECRET_KEY``).
    Its Clerk API calls (429s, the circuit breaker, the budget) and JIT fetches are counted in the webhook
    processor's metrics, with the deliveries: ``clerk_state(app).processor.metrics.render()`` answers a ``/metrics``.
    ``revocation_refresh_s`` is how stale the deny list (revoked sessions, banned users) may be.
    ``store``: a :class:`~clerk_sync.store.Store` you built with ``hooks=``/``mapping=`` — pass it so
    webhooks, JIT syncs and admin actions all queue your hooks and write your tables (you close it);
    ``flask clerk-sync migrate [--backfill]`` then adds what the mapping needs to your tables. With an app
    factory, pass each app's to ``init_app(app, store=...)``. No hook runs in the app itself: run
    ``clerk-sync worker --hooks yourapp:HOOKS`` (it reads the environment) beside it.
    ``webhook_path=None``: no webhook route, or your own registration of :func:`webhook_blueprint` after this.
    ``sync_me_path`` (e.g. ``"/sync/me"``) adds that ``POST`` route for signed-in users: the front end
    calls it right after sign-up, so the row exists before the webhook (needs ``CLERK_SECRET_KEY``).
    """

    def __init__(self, app: Flask | None = None, *, settings: Settings | None = None,
                 webhook_path: str | None = "/webhooks/clerk", deny_by_default: bool = False,
                 public_endpoints: Iterable[str] = (), jit: bool = True,
                 audit_impersonation: bool = True, revocation_refresh_s: float = 1.0,
                 store: Store | None = None, sync_me_path: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.webhook_path = webhook_path
        self.deny_by_default = deny_by_default
        # Flask's static files are public by their view (``_core._is_flask_static``), not by the name
        # ``static``: an app without a static folder may name its own view so. A blueprint's only when listed.
        self.public_endpoints = frozenset(public_endpoints)
        self.jit = jit
        self.audit_impersonation = audit_impersonation
        self.revocation_refresh_s = revocation_refresh_s
        if sync_me_path is not None and not sync_me_path.startswith("/"):
            raise ValueError(f"sync_me_path must start with '/', like a Flask route: {sync_me_path!r}")
        if sync_me_path is not None and not jit:  # its route syncs a user just in time: 500 on every POST
            raise ValueError(f"sync_me_path={sync_me_path!r} syncs the signed-in user just in time, which "
                             "jit=False turns off: keep jit=True (the default), or drop sync_me_path")
        self.sync_me_path = sync_me_path
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, store: Store | None = None) -> None:
        """Build the app's state from its config (errors name the missing setting), register the rest.

        ``store``: this app's own :class:`~clerk_sync.store.Store` (instead of the constructor's), for an app
        factory with a module-level ``clerk = ClerkSync()``: ``clerk.init_app(app, store=Store.from_settings(
        settings_from_config(app.config), hooks=..., mapping=...))`` (you close it).

        Under the ``flask`` command line, a settings error is one line (``Error: ...``, exit 2) instead of
        the traceback of the app's loading: a :class:`~clerk_sync.errors.ConfigError` that is also a
        ``click.ClickException`` (elsewhere, a server's start-up, it is raised as it is).
        """
        with cli_config_errors():
            self._init_app(app, self.store if store is None else store)

    def _init_app(self, app: Flask, store: Store | None) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("ClerkSync is already set up on this app")
        # What would refuse a registration half-way, refused before any (Flask cannot take one back): the
        # app's own blueprint or endpoint of our names
        if self.webhook_path is not None and "clerk_sync" in app.blueprints:
            raise ValueError("the app already has a blueprint named 'clerk_sync': rename it, or pass "
                             "ClerkSync(webhook_path=None), then register the webhook under another name: "
                             "app.register_blueprint(webhook_blueprint(name='clerk_webhook'))")
        if self.sync_me_path is not None and SYNC_ME_ENDPOINT in app.view_functions:
            raise ValueError(f"the app already has an endpoint named {SYNC_ME_ENDPOINT!r}: drop sync_me_path, or "
                             "rename yours")
        state = self._build(self.settings or settings_from_config(app.config), store)
        app.extensions[EXTENSION_KEY] = state
        try:
            if self.sync_me_path is not None:  # first: a path Flask refuses leaves nothing registered behind
                # (without CLERK_SECRET_KEY it answers config_error: the app still starts without the Clerk
                # API key, e.g. for `flask clerk-sync migrate`; the webhook secret it needs, see _build)
                app.add_url_rule(self.sync_me_path, endpoint=SYNC_ME_ENDPOINT, view_func=sync_me, methods=["POST"])
            if self.webhook_path is not None:
                app.register_blueprint(webhook_blueprint(self.webhook_path))
            if ClerkSyncError not in app.error_handler_spec.get(None, {}).get(None, {}):  # the app's own wins
                app.register_error_handler(ClerkSyncError, error_json)
            app.before_request(deny_by_default)
            app.context_processor(user_context)  # {% if current_user.is_authenticated %}, as with Flask-Login
        except Exception:  # a blueprint named clerk_sync already, an app already serving: no half-set-up app
            del app.extensions[EXTENSION_KEY]  # (its guards without deny_by_default), nor pools left open
            state.close()
            raise
        app.cli.add_command(clerk_sync_cli)

    def state(self, app: Flask | None = None) -> ClerkSyncState:
        return clerk_state(app)

    def _build(self, settings: Settings, given: Store | None) -> ClerkSyncState:
        # A missing or malformed webhook secret fails here, at start-up, not on the first delivery.
        processor = build_processor(settings, given) if self.webhook_path is not None else None
        if processor is None and settings.webhook_secret is not None:
            # For a webhook_blueprint() registered by hand (it needs one, and the Clerk API metrics below are
            # the processor's); an app without one starts with a secret it does not use, malformed or not.
            with contextlib.suppress(ConfigError):
                processor = build_processor(settings, given)
        store = processor.store if processor is not None else given or Store.from_settings(settings)
        closers: list[Callable[[], None]] = [] if given is not None else [store.dispose]
        if processor is not None:
            closers.append(processor.flush_summary)  # the deliveries since the last summary line
            closers.append(processor.metrics.stop)  # (multiprocess mode: the thread writing its gauges)
            # the freshness series (database up, schema current, lag, hook jobs), read at scrape time, as serve's:
            # without them ClerkSyncDatabaseDown and the schema alerts cannot fire for an app receiving its webhooks
            processor.metrics.watch_database(database_probe(store))
        # The processor's metrics (what an app's /metrics renders): Clerk API calls, 429s, the circuit breaker,
        # the budget, JIT fetches and the authenticator's outcomes are counted there too. Without a webhook route
        # (nor its secret) there is no processor.
        metrics = processor.metrics if processor is not None else None
        clerk = (ClerkClient.from_settings(settings, metrics=metrics) if settings.clerk_secret_key is not None
                 else None)
        if clerk is not None:
            closers.append(clerk.close)
        users = (JitUsers(store, clerk=clerk, metrics=metrics, refresh_interval_s=settings.jit_refresh_interval_s)
                 if clerk is not None and self.jit else None)
        authenticator = None
        if settings.clerk_jwt_key is not None or settings.clerk_secret_key is not None or settings.clerk_jwks_url:
            http = httpx.Client()
            closers.append(http.close)
            authenticator = Authenticator(
                verifier_from_settings(settings, http=http), store,
                deny_list=DenyList(store, refresh_s=self.revocation_refresh_s),
                load_user=users.get_auth_user if users is not None else None,
                impersonator_roles=settings.impersonator_roles(), metrics=metrics,
            )
            warn_if_any_origin(authenticator)
        admin = AdminActions(store, clerk, impersonator_roles=settings.impersonator_roles()) if clerk else None
        return ClerkSyncState(
            settings, store, processor, authenticator, users, admin,
            deny_by_default=self.deny_by_default, audit_impersonation=self.audit_impersonation,
            public_endpoints=self.public_endpoints | ({WEBHOOK_ENDPOINT} if self.webhook_path is not None else set()),
            closers=closers,
        )
