"""``settings.CLERK_SYNC``: one :class:`~clerk_sync.config.Settings` built from Django settings.

Keys are the environment variable names ``Settings`` reads (``CLERK_WEBHOOK_SIGNING_SECRET``,
``CLERK_JWT_KEY``...); a key left out falls back to the environment, and ``DATABASE_URL`` finally to
Django's ``default`` database, so clerk-sync's tables live next to the app's (an engine it cannot map, or
an in-memory SQLite database it cannot share, is an error, never a local SQLite file; under tests, a
temporary file of its own). A few keys concern
only Django (:class:`DjangoOptions`), checked for their types. Unknown keys are an error, so a typo does not
silently disable a check.

Under Django's test environment (``setup_test_environment()``: Django's test runner, pytest-django) clerk-sync
follows the database Django's ``default`` connection uses, the test database, even when ``DATABASE_URL`` is
in the environment (a dj-database-url setup): only ``CLERK_SYNC['DATABASE_URL']`` moves it elsewhere.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from django.apps import apps
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.utils.module_loading import import_string

from clerk_sync.auth.users import AuthUser
from clerk_sync.config import Settings, _aliases

__all__ = ["APP", "DjangoOptions", "UserFields", "clerk_settings", "database_url_from_django", "default_user_fields",
           "django_options", "require_app_installed"]

#: The app's entry in ``INSTALLED_APPS``.
APP = "clerk_sync.integrations.django"

UserFields = Callable[[AuthUser], dict[str, Any]]


def require_app_installed(what: str) -> None:
    """Refuse to run ``what`` (ClerkMiddleware, ClerkBackend) without the app in ``INSTALLED_APPS``: its system
    checks (settings that cannot work, middleware order...) are registered by the app, so without it ``manage.py
    check`` said nothing at all, and ``manage.py clerk_sync`` and the admin pages were missing too. (Here, not in
    checks.py: checks imports the middleware, which calls this.)"""
    if not apps.is_installed(APP):
        raise ImproperlyConfigured(
            f"{what} needs {APP!r} in INSTALLED_APPS: add it there. The app brings clerk-sync's system checks "
            "(without it `manage.py check` cannot tell a setting that cannot work), `manage.py clerk_sync` "
            "(migrate, replay, prune...) and the admin pages.")


def default_user_fields(row: AuthUser) -> dict[str, Any]:
    """What :class:`~.backends.ClerkBackend` copies onto the Django user: names and email, active unless
    banned or deleted, and Django admin access (staff + superuser) for the ``admin`` app role only.

    A lock (too many failed sign-ins) is not copied into ``is_active``: it ends by itself at a time (no event
    says so), which a copied flag could not follow (``users.locked`` stays true after the end). The backend
    refuses a locked user instead, a Clerk session and a Django login session alike, while the lock lasts."""
    admin = row.role == "admin"
    return {"email": row.email or "", "first_name": row.first_name or "", "last_name": row.last_name or "",
            "is_active": not (row.banned or row.is_deleted), "is_staff": admin, "is_superuser": admin}


@dataclass(frozen=True, slots=True)
class DjangoOptions:
    """The Django-only keys of ``CLERK_SYNC`` (all optional)."""

    #: ``REQUIRE_AUTH``: the middleware answers 401 on every path not declared public.
    require_auth: bool = False
    #: ``PUBLIC_PATHS`` / ``PUBLIC_PREFIXES``: open without a session when ``REQUIRE_AUTH`` is on.
    public_paths: frozenset[str] = frozenset()
    public_prefixes: tuple[str, ...] = ()
    #: ``JIT``: fetch a user from Clerk when their row has not arrived yet (needs CLERK_SECRET_KEY).
    jit: bool = True
    #: ``AUDIT_IMPERSONATION``: one audit row per request made while impersonating.
    audit_impersonation: bool = True
    #: ``DENY_LIST_REFRESH_S``: how stale revocations/bans may be (a DB read at most this often).
    deny_list_refresh_s: float = 1.0
    #: ``USER_FIELDS``: dotted path of ``(AuthUser) -> dict`` deciding what the backend copies.
    user_fields: UserFields = default_user_fields
    #: ``HOOKS`` / ``MAPPING``: dotted paths of a list of :class:`~clerk_sync.changes.Hook` and of a
    #: :class:`~clerk_sync.mapping.SchemaMapping`, so the webhook view, JIT syncs and admin actions
    #: queue the same hooks and write the same tables as ``clerk-sync serve --hooks/--mapping``.
    hooks: tuple[Any, ...] = ()
    mapping: Any = None
    #: ``CLERK_ID_FIELD``: the ``AUTH_USER_MODEL`` field holding the Clerk id, the one the backend looks its
    #: users up by (``None``: ``USERNAME_FIELD``). Needed when the login is the e-mail address (``USERNAME_FIELD
    #: = "email"``): a Clerk id is not an address, and an address (which a user may change in Clerk) is no key.
    clerk_id_field: str | None = None


_OPTION_KEYS = {
    "REQUIRE_AUTH": "require_auth", "PUBLIC_PATHS": "public_paths", "PUBLIC_PREFIXES": "public_prefixes",
    "JIT": "jit", "AUDIT_IMPERSONATION": "audit_impersonation", "DENY_LIST_REFRESH_S": "deny_list_refresh_s",
    "USER_FIELDS": "user_fields", "HOOKS": "hooks", "MAPPING": "mapping",
    "CLERK_ID_FIELD": "clerk_id_field",
}


def _raw() -> Mapping[str, Any]:
    raw = getattr(django_settings, "CLERK_SYNC", {})
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured("settings.CLERK_SYNC must be a dict, e.g. {'CLERK_JWT_KEY': '...'}")
    return raw


def _setting_names() -> dict[str, set[str]]:
    """Each ``Settings`` field's names (its environment variable and aliases)."""
    return {field: set(_aliases(info.validation_alias)) for field, info in Settings.model_fields.items()}


def clerk_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """``Settings`` from ``CLERK_SYNC``, then the environment, then Django's default database (under Django's
    test environment: ``CLERK_SYNC``, then the test database Django's ``default`` connection uses, see the
    module's docstring)."""
    raw = _raw()
    names = _setting_names()
    known = set().union(*names.values())
    unknown = sorted(set(raw) - known - set(_OPTION_KEYS))
    if unknown:
        raise ImproperlyConfigured(f"settings.CLERK_SYNC has unknown keys {unknown}; the known ones are "
                                   f"{sorted(known | set(_OPTION_KEYS))}")
    env = dict(os.environ if environ is None else environ)
    for aliases in names.values():
        if aliases & set(raw):  # CLERK_SYNC wins over every alias of the same setting in the environment
            for name in aliases:
                env.pop(name, None)
    default = _django_default_database()
    if _in_test_environment() and str(default.get("ENGINE") or "") not in _NO_DATABASE:
        # Django's test database, not the one the environment names: Django itself reads DATABASES (from
        # that very variable, with dj-database-url) and tests then run on test_<name>; clerk-sync writing to
        # the real database meanwhile would spoil it and the tests would not see the rows.
        for name in names["database_url"]:
            env.pop(name, None)
    env.update({k: _env_value(k, v) for k, v in raw.items() if k in known and v is not None})
    if "DATABASE_URL" not in env:
        derived = database_url_from_django(default)
        if derived is not None:
            env["DATABASE_URL"] = derived
    return Settings.from_env(env)


def _in_test_environment() -> bool:
    """Whether Django's test environment is set up (``django.test.utils.setup_test_environment()``, which
    Django's test runner and pytest-django call before they create the test databases)."""
    utils = sys.modules.get("django.test.utils")  # (never imported: no test environment)
    return utils is not None and hasattr(getattr(utils, "_TestState", None), "saved_data")


def _django_default_database() -> Mapping[str, Any]:
    """``DATABASES['default']``; under the test environment the settings of Django's ``default`` connection,
    which the test runner points at the test database (``test_<name>``, or a worker's clone of it with
    ``--parallel``, which only the connection is told about)."""
    if _in_test_environment() and "default" in connections:
        return connections["default"].settings_dict
    default: Mapping[str, Any] = django_settings.DATABASES.get("default", {})
    return default


def _env_value(key: str, value: Any) -> str:
    """A ``CLERK_SYNC`` value as its environment variable would hold it: a list of origins or secrets
    comma-separated (``str(list)`` would make ``"['https://a'"`` one origin and refuse every token)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        if key not in _LISTS:
            raise ImproperlyConfigured(f"settings.CLERK_SYNC[{key!r}] is a list; it takes one value")
        return ",".join(str(v) for v in value)
    return str(value)


# comma-separated where read, under any of their names
_LISTS = {name for field in ("authorized_parties_raw", "webhook_secret", "impersonator_roles_raw")
          for name in _aliases(Settings.model_fields[field].validation_alias)}


def django_options() -> DjangoOptions:
    """The Django-only keys of ``CLERK_SYNC``."""
    raw = _raw()
    values: dict[str, Any] = {_OPTION_KEYS[k]: v for k, v in raw.items() if k in _OPTION_KEYS}
    for key in ("PUBLIC_PATHS", "PUBLIC_PREFIXES"):  # a string is not its characters: "/" would open all
        if isinstance(raw.get(key), str):
            raise ImproperlyConfigured(f"settings.CLERK_SYNC[{key!r}] must be a list of paths, e.g. "
                                       f"[{raw[key]!r}], not a string")
    if "public_paths" in values:
        values["public_paths"] = frozenset(values["public_paths"])
    if "public_prefixes" in values:
        values["public_prefixes"] = tuple(values["public_prefixes"])
    for name in ("user_fields", "hooks", "mapping"):
        if isinstance(values.get(name), str):
            values[name] = import_string(values[name])
    _require_kinds(values)
    if "hooks" in values:
        values["hooks"] = tuple(values["hooks"])
    if "CLERK_ID_FIELD" in raw and not (isinstance(raw["CLERK_ID_FIELD"], str) and raw["CLERK_ID_FIELD"]):
        raise ImproperlyConfigured(f"settings.CLERK_SYNC['CLERK_ID_FIELD'] must name a field of AUTH_USER_MODEL, "
                                   f"e.g. 'clerk_id', not {raw['CLERK_ID_FIELD']!r}")
    for key in _BOOL_KEYS:
        _require_bool(raw, key)
    if "DENY_LIST_REFRESH_S" in raw:
        values["deny_list_refresh_s"] = _seconds(raw, "DENY_LIST_REFRESH_S")
    return DjangoOptions(**values)


_BOOL_KEYS = ("REQUIRE_AUTH", "JIT", "AUDIT_IMPERSONATION")


def _require_kinds(values: Mapping[str, Any]) -> None:
    """``USER_FIELDS``, ``HOOKS`` and ``MAPPING`` (imported) of the kind they name: another object passed the
    system checks, then every page answered 500 (the store is built on the first request)."""
    from clerk_sync.changes import Hook
    from clerk_sync.mapping import SchemaMapping

    def refuse(key: str, wanted: str, value: Any) -> None:
        raise ImproperlyConfigured(f"settings.CLERK_SYNC[{key!r}] must be {wanted}, not a {type(value).__name__}: "
                                   "fix the dotted path or the object it names")

    if "user_fields" in values and not callable(values["user_fields"]):
        refuse("USER_FIELDS", "a function (AuthUser) -> dict (a dotted path to it)", values["user_fields"])
    hooks = values.get("hooks", ())
    if not isinstance(hooks, list | tuple) or not all(isinstance(hook, Hook) for hook in hooks):
        refuse("HOOKS", "a list of clerk_sync.changes.Hook (a dotted path to it)", hooks)
    if values.get("mapping") is not None and not isinstance(values["mapping"], SchemaMapping):
        refuse("MAPPING", "a clerk_sync.mapping.SchemaMapping (a dotted path to it)", values["mapping"])


def _require_bool(raw: Mapping[str, Any], key: str) -> None:
    """A real bool: the string ``"false"`` read from the environment is truthy, and would switch a check on
    (or off) without a word."""
    if key in raw and not isinstance(raw[key], bool):
        raise ImproperlyConfigured(
            f"settings.CLERK_SYNC[{key!r}] must be True or False, not {raw[key]!r}; convert a value read from "
            f"the environment yourself, e.g. os.environ.get({key!r}) == '1'")


def _seconds(raw: Mapping[str, Any], key: str) -> float:
    """A non-negative, finite number of seconds (a string would fail every request that carries a session)."""
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ImproperlyConfigured(
            f"settings.CLERK_SYNC[{key!r}] must be a number of seconds >= 0 (e.g. 1.0), not {value!r}; convert a "
            f"value read from the environment yourself, e.g. float(os.environ.get({key!r}, '1'))")
    return float(value)


# Django's engines and GeoDjango's (the same databases with spatial types) -> SQLAlchemy's schemes;
# Django's own MySQL driver too.
_SCHEMES = {
    "django.db.backends.sqlite3": "sqlite", "django.contrib.gis.db.backends.spatialite": "sqlite",
    "django.db.backends.postgresql": "postgresql+psycopg",
    "django.contrib.gis.db.backends.postgis": "postgresql+psycopg",
    "django.db.backends.mysql": "mysql+mysqldb", "django.contrib.gis.db.backends.mysql": "mysql+mysqldb",
}
# No database at all (``DATABASES = {}``): clerk-sync's own default then, as in the standalone service.
_NO_DATABASE = ("", "django.db.backends.dummy")
_IN_MEMORY = (
    "clerk-sync cannot share Django's in-memory SQLite database (DATABASES['default'] NAME {name!r}): its own "
    "connections would each see another, empty database. Django's test runner makes one of every SQLite database "
    "unless it has a test file name: set DATABASES['default']['TEST'] = {{'NAME': BASE_DIR / 'test_db.sqlite3'}} "
    "(see clerk_sync.integrations.django.testing), or CLERK_SYNC['DATABASE_URL'] to the database clerk-sync "
    "should use, e.g. 'sqlite:///clerk_sync_test.db'")


_temporary: list[str] = []  # this process's temporary test database, once made
_temporary_lock = threading.Lock()


def _temporary_test_database() -> str:
    """Under Django's test environment, for an in-memory SQLite test database (Django's default for every
    SQLite database without ``TEST['NAME']``): a SQLite file of clerk-sync's own in a temporary directory,
    migrated at once and removed when the process exits. Refusing would stop every such project's test run
    (the system check runs first), a local ``./clerk_sync.db`` would keep rows between runs; Django's ORM does
    not see these rows (documented: name a test file to share one)."""
    with _temporary_lock:
        if not _temporary:
            from clerk_sync import migrations
            from clerk_sync.store import create_engine

            folder = tempfile.mkdtemp(prefix="clerk-sync-test-")
            atexit.register(shutil.rmtree, folder, True)
            url = f"sqlite:///{os.path.join(folder, 'clerk_sync.db')}"
            engine = create_engine(url)
            try:
                migrations.upgrade(engine)
            finally:
                engine.dispose()
            _temporary.append(url)
        return _temporary[0]


def database_url_from_django(db: Mapping[str, Any]) -> str | None:
    """A SQLAlchemy URL for a Django ``DATABASES`` entry (SQLite, PostgreSQL, MySQL/MariaDB, their GeoDjango
    engines), or None for no database at all (clerk-sync's own default then).

    Raises ``ImproperlyConfigured`` for any other engine (Oracle, a wrapper such as django-prometheus), and for
    an in-memory SQLite database (``:memory:``) outside Django's test environment: another connection cannot
    share it, so guessing would put clerk-sync's tables in a local SQLite file the app never reads. Under the
    test environment (Django's test database of a SQLite database without ``TEST['NAME']``): a temporary
    file of clerk-sync's own (:func:`_temporary_test_database`).
    """
    engine = str(db.get("ENGINE") or "")
    if engine in _NO_DATABASE:
        return None
    scheme = _SCHEMES.get(engine)
    if scheme is None:
        raise ImproperlyConfigured(
            f"clerk-sync cannot derive its DATABASE_URL from DATABASES['default'] with ENGINE {engine!r} (it knows "
            f"{sorted(_SCHEMES)}); set CLERK_SYNC['DATABASE_URL'] (or the DATABASE_URL environment variable) to a "
            "SQLAlchemy URL of the same database, e.g. 'postgresql+psycopg://user:password@host/name'")
    if scheme == "sqlite":
        name = str(db.get("NAME") or "")
        if not name or name.startswith(":memory:") or "mode=memory" in name:
            if _in_test_environment():  # (a project's default SQLite settings under `manage.py test`)
                return _temporary_test_database()
            raise ImproperlyConfigured(_IN_MEMORY.format(name=name))
        return f"sqlite:///{name}"
    options = db.get("OPTIONS") or {}
    host = str(db.get("HOST") or "") or None
    query = _mysql_query(options) if scheme.startswith("mysql") else _postgres_query(options)
    if host is not None and host.startswith("/"):
        if scheme.startswith("mysql"):  # Django's MySQL backend takes a HOST path as the socket file
            query.setdefault("unix_socket", host)  # (OPTIONS["unix_socket"] wins, as in Django)
            host = "localhost"  # (mysqlclient reaches a socket only for "localhost" or no host)
        else:
            query["host"], host = host, None  # a Unix socket directory, as libpq takes it
    url = sa.engine.URL.create(scheme, username=str(db.get("USER") or "") or None,
                               password=str(db.get("PASSWORD") or "") or None, host=host,
                               port=_port(db),
                               database=str(db.get("NAME") or "") or None, query=query)
    return url.render_as_string(hide_password=False)


def _port(db: Mapping[str, Any]) -> int | None:
    port = db.get("PORT")
    if not port:
        return None
    try:
        return int(port)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"DATABASES['default']['PORT'] is {port!r}, not a port number: set it to one "
                                   "(e.g. '5432'), or leave it empty for the driver's default") from None


# libpq's connection parameters Django passes through OPTIONS (TLS above all: left out, a `verify-full`
# database would be reached with libpq's default `prefer`, certificate unchecked)
_LIBPQ_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl", "sslcrldir",
                  "sslsni", "ssl_min_protocol_version", "ssl_max_protocol_version", "gssencmode",
                  "channel_binding", "requirepeer", "krbsrvname", "service", "passfile", "options",
                  "application_name", "target_session_attrs", "load_balance_hosts", "hostaddr")


def _postgres_query(options: Mapping[str, Any]) -> dict[str, str]:
    """Django's PostgreSQL ``OPTIONS`` that are libpq connection parameters; Django's own (``pool``,
    ``server_side_binding``, ``isolation_level``, ``assume_role``) are left out."""
    return {k: str(options[k]) for k in _LIBPQ_OPTIONS if options.get(k) is not None}


def _mysql_query(options: Mapping[str, Any]) -> dict[str, str]:
    """Django's MySQL ``OPTIONS`` that reach the connection (socket, TLS, charset, option file, the app's
    ``init_command``: run first, clerk-sync's session settings after it) as the URL query mysqlclient's
    SQLAlchemy dialect reads; ``isolation_level`` is left out: clerk-sync sets its own."""
    query: dict[str, str] = {k: str(options[k]) for k in ("charset", "unix_socket", "read_default_file",
                                                           "read_default_group", "ssl_mode", "init_command")
                             if k in options}
    ssl = options.get("ssl")
    if isinstance(ssl, Mapping):
        query |= {f"ssl_{k}": str(v) for k, v in ssl.items() if k in ("ca", "cert", "key", "capath", "cipher")}
    return query
