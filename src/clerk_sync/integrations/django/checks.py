"""``manage.py check`` errors for a configuration that cannot work, each with its fix.

Registered by the app (``INSTALLED_APPS``); they read ``CLERK_SYNC`` the way requests will. Without the app
installed there are no checks to run: :class:`~.middleware.ClerkMiddleware` and :class:`~.backends.ClerkBackend`
then refuse to start (``ImproperlyConfigured``, see :func:`~.conf.require_app_installed`), as Django's own middleware
refuse a setup they cannot work in.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings as django_settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string
from sqlalchemy.exc import ArgumentError

from clerk_sync._urls import masked_url
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.integrations.django.conf import (
    DjangoOptions,
    _in_test_environment,
    clerk_settings,
    database_url_from_django,
    django_options,
)
from clerk_sync.store import _check_sqlite_directory as _sqlite_directory

__all__ = ["check_settings"]


_MIDDLEWARE = "clerk_sync.integrations.django.middleware.ClerkMiddleware"
_BACKEND = "clerk_sync.integrations.django.backends.ClerkBackend"
_DRF_AUTHENTICATION = "clerk_sync.integrations.django.rest_framework.ClerkAuthentication"
_AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
_CSRF_MIDDLEWARE = "django.middleware.csrf.CsrfViewMiddleware"


def check_settings(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    """Settings readable, database driver installed, webhook secret well-formed, session tokens verifiable (the
    key parses) and their ``azp`` checked, middleware order and CSRF protection, and the Django-only keys (types,
    paths, dotted paths) as requests will read them."""
    try:
        settings = clerk_settings()
        options = django_options()
    except (ConfigError, ImproperlyConfigured, ImportError, TypeError) as exc:
        return [checks.Error(str(exc), hint="Fix settings.CLERK_SYNC (keys are the environment variable names; "
                             "USER_FIELDS, HOOKS and MAPPING dotted paths to importable objects).",
                             id="clerk_sync.E001")]
    database = _database(settings)  # (a database it cannot open first: which one the models read comes after)
    return [*database, *([] if database else _models_database(settings)), *_database_time_zone(),
            *_webhook_secret(settings),
            *_session_keys(settings), *_redis_url(settings),
            *_authorized_parties(settings), *_middleware_order(), *_require_auth(options),
            *_backend_without_middleware(), *_csrf_middleware(), *_clerk_id_field(options)]


def _redis_url(settings: Settings) -> list[checks.CheckMessage]:
    """``REDIS_URL`` readable, as the first signed-in request builds the Clerk API budget from it (with a secret
    key): one redis-py cannot parse passed ``check`` and then answered every signed-in request 500, while Flask and
    the CLI refuse it at start (review). Nothing is connected to."""
    if not (settings.redis_url and settings.clerk_secret_key):
        return []
    from clerk_sync.clerk_api.ratelimit import RedisBudget, budget_from_settings

    try:
        budget = budget_from_settings(settings)
    except ConfigError as exc:
        return [checks.Error(str(exc), id="clerk_sync.E010",
                             hint="Fix CLERK_SYNC['REDIS_URL'] (redis://[:password@]host:port/db, rediss:// for TLS), "
                                  "or remove it for a budget of this process alone: every signed-in request builds "
                                  "the Clerk API client from it, so each would answer 500.")]
    if isinstance(budget, RedisBudget):
        budget.close()
    return []


def _database(settings: Settings) -> list[checks.CheckMessage]:
    """The database URL's driver loads (as the first request builds the store): a missing one would fail every
    request with a 500, public pages included, and ``check`` said nothing."""
    try:  # (a warning said only that the admin reads another database, while every request answered 500)
        _sqlite_directory(settings.database_url)
    except ConfigError as exc:
        return [checks.Error(f"clerk-sync cannot open its database: {exc}", id="clerk_sync.E009",
                             hint="Create the directory, or point CLERK_SYNC['DATABASE_URL'] at an existing one: "
                                  "every request reads the database, so each would answer 500.")]
    except ArgumentError:
        pass  # (a URL SQLAlchemy cannot parse: E007 below)
    try:
        settings.sqlalchemy_url()
    except ConfigError as exc:
        return [checks.Error(
            f"clerk-sync cannot open its database: {exc}",
            hint="Install the driver clerk-sync uses: pip install 'clerk-sync[postgres]' (psycopg 3, which it needs on "
                 "PostgreSQL: it reads psycopg 3's error codes to tell a retry from a refusal; Django runs on it too) "
                 "or 'clerk-sync[mysql]' (mysqlclient); or set CLERK_SYNC['DATABASE_URL'] to a SQLAlchemy URL "
                 "naming one of them (by default it is derived from DATABASES['default'] with psycopg 3).",
            id="clerk_sync.E007")]
    return []


def _models_database(settings: Settings) -> list[checks.CheckMessage]:
    """clerk-sync writes the database of its ``DATABASE_URL``; the unmanaged models (the admin pages,
    ``ClerkUser.objects``) read the Django database the routers give them (``default`` without one). A
    ``CLERK_SYNC['DATABASE_URL']`` (or a ``DATABASE_URL`` in the environment, outside tests) naming another
    database had the admin show stale rows, or fail with "no such table", and ``check`` said nothing. A warning:
    two URLs may name one database (a host alias, a pooler), which only the project can tell."""
    from django.db import connections, router

    from clerk_sync.integrations.django.models import ClerkUser

    alias = router.db_for_read(ClerkUser) or "default"
    if alias not in django_settings.DATABASES or alias not in connections.settings:
        return []  # (Django reports a router naming no database)
    # (as clerk_settings reads DATABASES: the connection's under the test environment, which points it at the
    # test database, else the setting)
    entry = connections[alias].settings_dict if _in_test_environment() else django_settings.DATABASES[alias]
    try:
        read = database_url_from_django(entry)
    except ImproperlyConfigured:
        return []  # an engine clerk-sync cannot map (hence DATABASE_URL set): nothing to compare with
    if read is None or _same_database(read, settings.database_url):
        return []
    return [checks.Warning(
        f"clerk-sync writes to {masked_url(settings.database_url)} (its DATABASE_URL), but its Django models (the "
        f"admin pages, ClerkUser.objects...) read DATABASES[{alias!r}], {masked_url(read)}: they show another "
        "database's rows (stale, or none: 'no such table').",
        hint="Let clerk-sync use Django's database: remove CLERK_SYNC['DATABASE_URL'] (and DATABASE_URL from the "
             "environment, which it falls back to). Or keep clerk-sync's database and give it a DATABASES entry, "
             "then route the app label 'clerk_sync' there with a DATABASE_ROUTERS router whose db_for_read returns "
             "that alias for it. If both URLs name the same database (a host alias, a pooler), silence this with "
             "SILENCED_SYSTEM_CHECKS = ['clerk_sync.W004'].",
        id="clerk_sync.W004")]


def _database_time_zone() -> list[checks.CheckMessage]:
    """clerk-sync's SQLite and MySQL/MariaDB columns hold UTC's wall clock, and Django reads a time without a zone
    from such a database in its ``DATABASES[...]['TIME_ZONE']``: another zone there had the admin pages (and
    ``ClerkUser.objects``) show every time shifted by its offset, and filter by shifted times. A warning rather
    than fields that read UTC: Django's own date functions (``TruncDate``, the admin's date drill-down) would still
    convert in SQL from the database's zone."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from django.db import connections, router
    from django.db.utils import load_backend

    from clerk_sync.integrations.django.models import ClerkUser

    alias = router.db_for_read(ClerkUser) or "default"
    if alias not in django_settings.DATABASES or not getattr(django_settings, "USE_TZ", False):
        return []  # (without USE_TZ Django refuses a database TIME_ZONE itself)
    # (read as _models_database reads it: the connection's under the test environment, else the setting)
    entry = connections[alias].settings_dict if _in_test_environment() else django_settings.DATABASES[alias]
    zone = entry.get("TIME_ZONE")
    if zone is None:
        return []
    try:  # the vendor the backend declares (connections[alias].vendor, without connecting): a backend of its own,
        # django-prometheus's or MySQL Connector's is a sqlite or mysql one as well
        vendor = load_backend(str(entry.get("ENGINE") or "")).DatabaseWrapper.vendor
    except (ImproperlyConfigured, ImportError, AttributeError):
        return []  # (Django says so when it connects)
    if vendor not in ("sqlite", "mysql"):  # (PostgreSQL: timestamptz, read as instants)
        return []
    try:
        tz = ZoneInfo(str(zone))
    except (ZoneInfoNotFoundError, ValueError):
        return []  # (Django says so when it connects)
    if all(tz.utcoffset(datetime(2026, month, 1)) == timedelta(0) for month in (1, 7)):
        return []  # UTC by another name (Etc/UTC, GMT)
    name = "SQLite" if vendor == "sqlite" else "MySQL/MariaDB"
    return [checks.Warning(
        f"DATABASES[{alias!r}]['TIME_ZONE'] is {zone!r}: Django reads the times of that {name} database in "
        f"{zone}, but clerk-sync stores them in UTC, so its admin pages and models (ClerkUser, WebhookDelivery...) "
        "show and filter every time shifted by that zone's offset.",
        hint=f"Remove TIME_ZONE from DATABASES[{alias!r}] (Django then reads the database's times as UTC, and "
             "still shows them in settings.TIME_ZONE). If your own tables hold that zone's wall clock, keep it and "
             "add a second DATABASES entry for the same database without TIME_ZONE, then route the app label "
             "'clerk_sync' to it with a DATABASE_ROUTERS router whose db_for_read returns that alias.",
        id="clerk_sync.W005")]


def _same_database(a: str, b: str) -> bool:
    """Whether two SQLAlchemy URLs name one database (dialect, host, port, database; SQLite by its real path;
    PostgreSQL's ``options``, which may set the search path): the driver and the login may differ."""
    import os

    import sqlalchemy as sa

    def key(url: str) -> tuple[object, ...]:
        u = sa.engine.make_url(url)
        backend = {"postgres": "postgresql", "mariadb": "mysql"}.get(u.get_backend_name(), u.get_backend_name())
        if backend == "sqlite":
            name = u.database or ""
            return backend, name if not name or name.startswith(":") or "mode=memory" in name \
                else os.path.realpath(name)
        port = u.port or {"postgresql": 5432, "mysql": 3306}.get(backend)
        options = u.query.get("options") if backend == "postgresql" else None
        return backend, (u.host or "localhost").lower(), port, u.database, options

    try:
        return key(a) == key(b)
    except Exception:  # (a URL SQLAlchemy cannot parse: reported by the checks that build the engine)
        return True


def _webhook_secret(settings: Settings) -> list[checks.CheckMessage]:
    try:
        settings.webhook_secrets()
    except ConfigError as exc:
        return [checks.Error(
            f"clerk-sync cannot verify webhooks: {exc}",
            hint="Add CLERK_SYNC = {'CLERK_WEBHOOK_SIGNING_SECRET': os.environ['CLERK_WEBHOOK_SIGNING_SECRET'], ...} "
                 "to settings.py, or export CLERK_WEBHOOK_SIGNING_SECRET.",
            id="clerk_sync.E002")]
    return []


def _verifies_sessions(settings: Settings) -> bool:
    """A key to verify session tokens with: ``CLERK_JWT_KEY``, ``CLERK_JWKS_URL``, or the JWKS fetched with
    ``CLERK_SECRET_KEY``. None of them: the app verifies no session (E003; webhooks only, E003 silenced)."""
    return any(key is not None for key in (settings.clerk_jwt_key, settings.clerk_jwks_url, settings.clerk_secret_key))


def _session_keys(settings: Settings) -> list[checks.CheckMessage]:
    if not _verifies_sessions(settings):
        return [checks.Error(
            "clerk-sync cannot verify session tokens: no CLERK_JWT_KEY, CLERK_JWKS_URL or CLERK_SECRET_KEY.",
            hint="Set CLERK_JWT_KEY to the PEM from Clerk Dashboard -> API keys -> JWKS Public Key (no network "
                 "needed), or CLERK_SECRET_KEY to fetch the keys from the Backend API.",
            id="clerk_sync.E003")]
    try:  # as requests will build it: a malformed CLERK_JWT_KEY fails here, not as a 500 on every view
        with httpx.Client() as http:  # (never used: building the verifier fetches nothing)
            verifier_from_settings(settings, http=http)
    except ConfigError as exc:
        return [checks.Error(
            f"clerk-sync cannot verify session tokens: {exc}",
            hint="Copy CLERK_JWT_KEY again from Clerk Dashboard -> API keys -> JWKS Public Key, the whole PEM from "
                 "-----BEGIN PUBLIC KEY----- to -----END PUBLIC KEY----- (one line with \\n is fine), or remove "
                 "it to fetch the keys with CLERK_SECRET_KEY.",
            id="clerk_sync.E006")]
    return []


def _authorized_parties(settings: Settings) -> list[checks.CheckMessage]:
    """Without ``CLERK_AUTHORIZED_PARTIES`` a token's ``azp`` is not checked (``ClaimsValidator``): a session
    token the Clerk instance minted for any origin signs in here. A warning, as ``clerk-sync doctor`` says it:
    signature, issuer and expiry are still checked, and Clerk makes the list optional. An app that verifies no
    session (no key: E003) has nothing to check it on, nor has one whose key serves webhooks or reconcile only
    (``CLERK_SECRET_KEY`` alone, without clerk-sync's middleware, backend or DRF class). ``CLERK_JWT_KEY`` and
    ``CLERK_JWKS_URL`` serve sessions only: with either, it warns whatever authenticates (the view decorators
    verify sessions too, and settings cannot show them)."""
    if not _verifies_sessions(settings) or settings.authorized_parties() is not None:
        return []
    if settings.clerk_jwt_key is None and settings.clerk_jwks_url is None and not _authenticates_sessions():
        return []
    return [checks.Warning(
        "CLERK_AUTHORIZED_PARTIES is not set: the azp claim of session tokens is not checked, so a token your "
        "Clerk instance minted for any origin is accepted here (one for another app or satellite domain of the "
        "same instance, or for a page on one of your subdomains: Clerk's subdomain cookie leaking).",
        hint="Set CLERK_SYNC['CLERK_AUTHORIZED_PARTIES'] to every origin your signed-in pages are served from, as "
             "the browser sends them in Origin (scheme://host[:port], no path), e.g. ['https://app.example.com'] "
             "(and 'http://localhost:3000' in development), or export CLERK_AUTHORIZED_PARTIES comma-separated. "
             "Tokens minted for any other origin are then refused (401 token_invalid_authorized_parties), and a "
             "POST carrying the __session cookie must come from one of them (or CSRF_TRUSTED_ORIGINS): list this "
             "site's own origin too if its pages post forms.",
        id="clerk_sync.W002")]


def _require_auth(options: DjangoOptions) -> list[checks.CheckMessage]:
    """``REQUIRE_AUTH`` is the middleware's: without it every view would be open, silently."""
    if options.require_auth and not any(_is_clerk_middleware(m) for m in getattr(django_settings, "MIDDLEWARE", [])):
        return [checks.Error(
            "CLERK_SYNC['REQUIRE_AUTH'] is on, but ClerkMiddleware is not in MIDDLEWARE: nothing refuses "
            "anonymous requests.",
            hint=f"Add {_MIDDLEWARE!r} to MIDDLEWARE, after {_AUTH_MIDDLEWARE!r}.", id="clerk_sync.E005")]
    return []


def _backend_without_middleware() -> list[checks.CheckMessage]:
    """``ClerkBackend`` signs a Clerk session in from the state ``ClerkMiddleware`` attaches: without the
    middleware, Django's ``request.user`` never is a Clerk session's user (``login_required`` sends a signed-in
    user to the login page, an admin sees no staff rights), and nothing said so."""
    backends = getattr(django_settings, "AUTHENTICATION_BACKENDS", None) or []
    if any(_names(b, _BACKEND) for b in backends) \
            and not any(_is_clerk_middleware(m) for m in getattr(django_settings, "MIDDLEWARE", None) or []):
        return [checks.Warning(
            "ClerkBackend is in AUTHENTICATION_BACKENDS, but ClerkMiddleware is not in MIDDLEWARE: request.user "
            "is never a Clerk session's user in Django views (only DRF's ClerkAuthentication signs one in).",
            hint=f"Add {_MIDDLEWARE!r} to MIDDLEWARE, after {_AUTH_MIDDLEWARE!r}.", id="clerk_sync.W003")]
    return []


def _clerk_id_field(options: DjangoOptions) -> list[checks.CheckMessage]:
    """With ``ClerkBackend``, the user model's field holding the Clerk id (``CLERK_ID_FIELD``, else
    ``USERNAME_FIELD``: :func:`~.backends._clerk_id_field`) must be a unique field the copied fields leave alone.
    An e-mail login (``USERNAME_FIELD = "email"``) had the first request create the user with the address, every
    later one look ``email=user_...`` up, find nobody and create it again: IntegrityError, a 500 on every page
    (the backend now never copies onto the key, which would leave the Clerk id in the e-mail field instead). A
    ``USER_FIELDS`` of the app's own cannot be read here."""
    from django.contrib.auth import get_user_model
    from django.core.exceptions import FieldDoesNotExist

    from clerk_sync.integrations.django.conf import default_user_fields

    if not any(_names(b, _BACKEND) for b in getattr(django_settings, "AUTHENTICATION_BACKENDS", None) or []):
        return []
    try:
        model = get_user_model()
    except ImproperlyConfigured:
        return []  # (Django reports an AUTH_USER_MODEL it cannot load)
    key = options.clerk_id_field or str(model.USERNAME_FIELD)
    label, setting = model._meta.label, "CLERK_SYNC['CLERK_ID_FIELD']"
    hint = (f"Add a unique field for the Clerk id to {label}, e.g. clerk_id = models.CharField(max_length=64, "
            f"unique=True, null=True), migrate, and set {setting} = 'clerk_id'.")
    try:
        field = model._meta.get_field(key)
    except FieldDoesNotExist:
        return [checks.Error(f"{setting} is {key!r}, which is no field of {label}.", hint=hint,
                             id="clerk_sync.E008")]
    copied = options.user_fields is default_user_fields and key in _DEFAULT_COPIED
    if copied or key == model.get_email_field_name() or field.get_internal_type() == "EmailField":
        named = f"{setting} is {key!r}" if options.clerk_id_field else f"{label}'s USERNAME_FIELD is {key!r}"
        return [checks.Error(
            f"{named}, but ClerkBackend keeps the Clerk id in that field and looks its users up by it, so it never "
            "copies Clerk's value there: every user's e-mail address would read user_2abc...", hint=hint,
            id="clerk_sync.E008")]
    if not getattr(field, "unique", False) or not getattr(field, "concrete", False):
        return [checks.Error(
            f"{label}.{key}, which holds the Clerk id ClerkBackend looks its users up by, is not unique: two users "
            "could hold one Clerk id.", hint=hint, id="clerk_sync.E008")]
    return []


_DEFAULT_COPIED = ("email", "first_name", "last_name", "is_active", "is_staff", "is_superuser")


def _is_clerk_middleware(path: str) -> bool:
    """``ClerkMiddleware`` by its path, or a subclass of it (an app's own, re-exported)."""
    from clerk_sync.integrations.django.middleware import ClerkMiddleware

    return path == _MIDDLEWARE or _is_subclass(path, ClerkMiddleware)


def _authenticates_sessions() -> bool:
    """clerk-sync authenticates requests here: ``ClerkMiddleware`` in ``MIDDLEWARE``, ``ClerkBackend`` in
    ``AUTHENTICATION_BACKENDS`` or ``ClerkAuthentication`` in DRF's ``DEFAULT_AUTHENTICATION_CLASSES`` (by path,
    or an app's subclass)."""
    if any(_is_clerk_middleware(m) for m in getattr(django_settings, "MIDDLEWARE", None) or []):
        return True
    if any(_names(b, _BACKEND) for b in getattr(django_settings, "AUTHENTICATION_BACKENDS", None) or []):
        return True
    drf = getattr(django_settings, "REST_FRAMEWORK", None)
    classes = drf.get("DEFAULT_AUTHENTICATION_CLASSES", None) if isinstance(drf, dict) else None
    return any(_names(c, _DRF_AUTHENTICATION) for c in classes or [])


def _names(entry: object, path: str) -> bool:
    """``entry`` (a dotted path, or the class itself) is the class at ``path`` or a subclass of it."""
    if entry == path:
        return True
    try:  # the DRF class needs djangorestframework: without it nothing names it
        base = import_string(path)
    except Exception:
        return False
    if isinstance(entry, type):
        return issubclass(entry, base)
    return isinstance(entry, str) and _is_subclass(entry, base)


def _is_subclass(path: str, base: type) -> bool:
    try:
        found = import_string(path)
    except Exception:  # Django itself reports a middleware that does not import (ImproperlyConfigured..)
        return False
    return isinstance(found, type) and issubclass(found, base)


def _csrf_middleware() -> list[checks.CheckMessage]:
    """Without Django's CSRF middleware another site's form posts with the visitor's Django session cookie
    unchecked: clerk-sync's Origin check covers its own ``__session`` cookie only."""
    from django.middleware.csrf import CsrfViewMiddleware

    middleware = list(getattr(django_settings, "MIDDLEWARE", []))
    if any(m == _CSRF_MIDDLEWARE or _is_subclass(m, CsrfViewMiddleware) for m in middleware):
        return []
    return [checks.Warning(
        f"{_CSRF_MIDDLEWARE} is not in MIDDLEWARE: a form on another site can post with the visitor's cookies; "
        "only a Clerk __session cookie is still checked (its Origin), a Django login session not at all.",
        hint=f"Add {_CSRF_MIDDLEWARE!r} to MIDDLEWARE, or, for an API that only takes Authorization: Bearer, "
             "silence this with SILENCED_SYSTEM_CHECKS = ['clerk_sync.W001'].",
        id="clerk_sync.W001")]


def _middleware_order() -> list[checks.CheckMessage]:
    """``ClerkMiddleware`` after ``AuthenticationMiddleware`` (or an app's subclass of either). With
    ``ClerkBackend``, ``ClerkMiddleware`` sets ``request.user`` for a Clerk session only: without
    ``AuthenticationMiddleware`` a signed-out visitor's request had no ``request.user`` at all, and every view
    reading it answered 500 (AttributeError), while signed-in requests worked."""
    from django.contrib.auth.middleware import AuthenticationMiddleware

    middleware = list(getattr(django_settings, "MIDDLEWARE", []))
    clerk = [i for i, m in enumerate(middleware) if _is_clerk_middleware(m)]  # an app's subclass too
    auth = [i for i, m in enumerate(middleware) if m == _AUTH_MIDDLEWARE or _is_subclass(m, AuthenticationMiddleware)]
    if clerk and auth and clerk[0] < auth[0]:
        return [checks.Error(
            "ClerkMiddleware runs before AuthenticationMiddleware, which would overwrite request.user.",
            hint=f"Move {_MIDDLEWARE!r} after {_AUTH_MIDDLEWARE!r} in MIDDLEWARE.", id="clerk_sync.E004")]
    backends = getattr(django_settings, "AUTHENTICATION_BACKENDS", None) or []
    if clerk and not auth and any(_names(b, _BACKEND) for b in backends):
        return [checks.Error(
            "ClerkMiddleware is in MIDDLEWARE (with ClerkBackend) but AuthenticationMiddleware is not: a request "
            "without a Clerk session gets no request.user, and every view reading it answers 500.",
            hint=f"Add {_AUTH_MIDDLEWARE!r} to MIDDLEWARE before {_MIDDLEWARE!r} (after "
                 "'django.contrib.sessions.middleware.SessionMiddleware').", id="clerk_sync.E004")]
    return []
