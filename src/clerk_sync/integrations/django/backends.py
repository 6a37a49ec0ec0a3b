"""``request.user`` as a Django user linked to the Clerk id, so ``login_required``, permissions and
the Django admin work for Clerk sessions (opt-in)::

    AUTHENTICATION_BACKENDS = ["clerk_sync.integrations.django.backends.ClerkBackend",
                               "django.contrib.auth.backends.ModelBackend"]

The Django user's ``USERNAME_FIELD`` holds the Clerk user id (or the field ``CLERK_SYNC["CLERK_ID_FIELD"]``
names, which an e-mail-login model needs: see :func:`_clerk_id_field`). It is created on the first request of
a Clerk session and updated from the mirrored ``users`` row whenever the copied fields differ. What
is copied is decided by ``CLERK_SYNC["USER_FIELDS"]``, a dotted path to ``(AuthUser) -> dict``; the
default (:func:`~.conf.default_user_fields`) copies email and names, ``is_active`` and gives Django
admin access (``is_staff``/``is_superuser``) to the ``admin`` app role only. The app role itself is
always read from the row, so demotion removes Django admin access on the next request.

Linking never takes over a local account. The users the backend creates have no usable password
(only the Clerk session signs them in). A Django user that already exists under the Clerk id with a
*usable* password (say a local sign-up ``user_2abc...`` from before the move to Clerk) is someone's
local login: the backend leaves it untouched (no field is copied, no admin flag granted), refuses
the Clerk session (``request.user`` stays ``AnonymousUser``; DRF answers 401) and logs the error
``django_user_not_linked`` on every such request. To resolve it, rename the local user (the next
request then creates the Clerk-linked one), or, when it is the same person, link it explicitly by
giving up its local password: ``user.set_unusable_password(); user.save()``. An existing user
without a usable password is adopted as linked, so do not let another sign-in path (e.g. social
login) create users whose username can equal a Clerk id.

An outage is not a sign-out. When the request carries a Clerk session but its user cannot be told because
clerk-sync's database or Clerk is down (the session's deny-list check or the ``users`` row read fails, or the
just-in-time fetch from Clerk does), ``request.user`` (and ``await request.auser()``) raise
:class:`~.request.ClerkUserUnavailable` instead of becoming ``AnonymousUser``, which would send a signed-in
user to the sign-in page (``login_required``) and from there back, or render pages as signed out. Nobody is
authenticated meanwhile; :class:`~.middleware.ClerkMiddleware` answers the request 503 with ``Retry-After``,
and the outage is logged once per request (``django_user_unavailable``). Views that never read
``request.user`` keep working. A missing, invalid or revoked session, and a banned, deleted or not yet
synced user, keep their answers (``AnonymousUser``).

Django's own database down is the same outage (the same 503, the same log line), though clerk-sync's may be up: its
pooled connections keep working while Django cannot open one ("too many clients already", a database closed to new
connections). An ``OperationalError`` or ``InterfaceError`` reading or saving the linked Django user raises
:class:`~.request.ClerkUserUnavailable` with a :class:`~clerk_sync.errors.StoreError` (:func:`_django_outage`); any
other database error stays Django's 500.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from django.conf import settings
from django.contrib.auth import get_user_model, load_backend
from django.contrib.auth.backends import BaseBackend
from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX, make_password
from django.contrib.auth.models import AnonymousUser
from django.db import IntegrityError, InterfaceError, OperationalError, connections, router, transaction
from django.db.models import Q
from django.http import HttpRequest
from django.utils.module_loading import import_string

from clerk_sync._db_errors import is_schema_behind, store_error
from clerk_sync._time import utcnow
from clerk_sync.auth.users import AuthUser, read_user
from clerk_sync.errors import (
    ClerkSyncError,
    ConfigError,
    SessionUserBanned,
    StoreDataError,
    StoreError,
    UserBanned,
    UserDeleted,
    UserLocked,
    database_message,
)
from clerk_sync.integrations.django.conf import default_user_fields
from clerk_sync.integrations.django.request import ClerkUserUnavailable, is_outage
from clerk_sync.integrations.django.runtime import get_clerk_sync

if TYPE_CHECKING:
    from clerk_sync.integrations.django.request import ClerkRequest

__all__ = ["ClerkBackend", "deactivate_django_user", "django_user", "forget_cleared_django_users",
           "forget_django_user", "refresh_django_user", "refresh_django_users", "sync_django_user",
           "uses_clerk_backend"]

log = structlog.get_logger("clerk_sync.django")


def sync_django_user(row: AuthUser) -> Any:
    """Create or update the Django user for a ``users`` row (saves only when a copied field changed),
    or ``None`` when the Clerk id names a local user with a usable password, never taken over."""
    model = get_user_model()
    fields = _user_fields(model, row)
    lookup: dict[str, Any] = {_clerk_id_field(model): row.clerk_id}
    # Created without a usable password in the one INSERT: a concurrent first request that loses the
    # race reads the row back and must see it as the backend's own, never as a local account.
    defaults = {**fields, "password": make_password(None)}
    try:
        user, created = model._default_manager.get_or_create(**lookup, defaults=defaults)  # (its own savepoint)
    except IntegrityError as exc:
        return _refused(row, exc)
    if created:
        return user
    # An empty password (a row created without one, or left so by the earlier two-step create) can sign
    # nobody in, though Django calls it usable: the backend's own, as an unusable one is.
    if user.password and user.has_usable_password():
        log.error("django_user_not_linked", clerk_id=row.clerk_id, django_user_pk=user.pk,
                  reason=f"a local Django user {_clerk_id_field(model)}={row.clerk_id!r} with a usable password "
                         "already exists; a Clerk session never takes over a local account, so it is refused",
                  fix="rename the local user (the next request creates the Clerk-linked one), or, if it is the "
                      "same person, link it explicitly: user.set_unusable_password(); user.save()")
        return None
    if any(getattr(user, name) != value for name, value in fields.items()):  # (no savepoint per request)
        try:
            with transaction.atomic(using=user._state.db):  # a refused save must not doom the request's one
                _copy_fields(user, fields)
        except IntegrityError as exc:
            return _refused(row, exc)
    return user


def _refused(row: AuthUser, exc: IntegrityError) -> None:
    """The user model refused the Clerk user's copied fields: a unique one (the e-mail address of a login-by-e-mail
    model) is held by another Django user. Said, and the session left anonymous: a 500 on every request would
    tell nobody more."""
    # The driver's message without the values it quotes (PostgreSQL's DETAIL line, MySQL's "Duplicate entry
    # 'ada@…'"): an e-mail address in an ERROR line on every request of that user (review)
    refused = database_message(exc.__cause__ or exc)
    log.error("django_user_not_linked", clerk_id=row.clerk_id, reason=f"the user model refused it: {refused}",
              fix="a unique field USER_FIELDS copies is held by another Django user: e.g. the address of a "
                  "deactivated user whose Clerk account was deleted (free it, or wait for `manage.py clerk_sync "
                  "prune` to forget that user), or an empty address of a second user without one (make the field "
                  "null=True: an empty address is stored NULL there)")


def _clerk_id_field(model: Any) -> str:
    """The user model's field holding the Clerk id, the one the backend looks its users up by:
    ``CLERK_SYNC["CLERK_ID_FIELD"]``, else ``USERNAME_FIELD``.

    ``USERNAME_FIELD`` by default, as with Django's own ``User`` (the username is the Clerk id, no column to add).
    A model whose login is the e-mail address (``USERNAME_FIELD = "email"``) must name another field, a unique one
    of its own (``clerk_id``): the address is what Clerk changes and ``USER_FIELDS`` copies, and a key overwritten
    by the copy finds nobody on the next request, which then creates the user again (check ``clerk_sync.E008``
    refuses the setup)."""
    return get_clerk_sync().options.clerk_id_field or str(model.USERNAME_FIELD)


def _clerk_id(user: Any) -> str:
    """The Clerk id a linked ``user`` holds (:func:`_clerk_id_field`)."""
    return str(getattr(user, _clerk_id_field(type(user))))


@functools.cache
def _field_names(model: Any) -> frozenset[str]:
    """The model's concrete fields, by name and by column attribute (``USER_FIELDS`` may give either)."""
    return frozenset({f.name for f in model._meta.concrete_fields} | {f.attname for f in model._meta.concrete_fields})


_unknown_fields_logged: set[frozenset[str]] = set()


def _user_fields(model: Any, row: AuthUser) -> dict[str, Any]:
    """``USER_FIELDS`` for ``row``, less what the backend must not copy: the field holding the Clerk id (the lookup
    key: overwritten, the next request would find nobody and create the user again) and the fields the model does
    not have (the default's ``first_name``, ``is_staff``... on a model without ``AbstractUser``'s fields: skipped
    silently; a ``USER_FIELDS`` of the app's own naming one is logged once, ``django_user_field_unknown``)."""
    options = get_clerk_sync().options
    fields = options.user_fields(row)
    key, names = _clerk_id_field(model), _field_names(model)
    unknown = frozenset(name for name in fields if name not in names)
    if unknown and options.user_fields is not default_user_fields and unknown not in _unknown_fields_logged:
        _unknown_fields_logged.add(unknown)
        log.warning("django_user_field_unknown", fields=sorted(unknown), model=model._meta.label,
                    fix="CLERK_SYNC['USER_FIELDS'] returns fields the user model does not have; they are not copied")
    return {name: _storable(model, name, value) for name, value in fields.items() if name != key and name in names}


def _storable(model: Any, name: str, value: Any) -> Any:
    """``value`` as the model's field takes it: an empty string is NULL in a unique field allowing NULL (a second
    user without an e-mail address would collide with the first on ``""``)."""
    if value != "":
        return value
    field = model._meta.get_field(name)
    return None if field.unique and field.null else value


def _copy_fields(user: Any, fields: dict[str, Any]) -> list[str]:
    """Set and save the fields that differ (no write when none does); returns their names."""
    changed = [name for name, value in fields.items() if getattr(user, name) != value]
    if changed:
        for name in changed:
            setattr(user, name, fields[name])
        user.save(update_fields=changed)
    return changed


def _is_linked(user: Any) -> bool:
    """Whether the backend owns this Django user (no usable password, a Clerk id held: a ``CLERK_ID_FIELD`` may be
    empty for the app's other users), so may change it."""
    return not (user.password and user.has_usable_password()) and bool(getattr(user, _clerk_id_field(type(user))))


_FLAGS = ("is_active", "is_staff", "is_superuser")


def _flags(model: Any) -> tuple[str, ...]:
    """The flags ``model`` stores: a model without the field (``AbstractBaseUser``'s ``is_active`` is a class
    attribute, ``True``; an ``is_staff`` property) has nothing to clear, and ``save(update_fields=...)`` naming it
    raises ``ValueError``."""
    return tuple(name for name in _FLAGS if name in _field_names(model))


def deactivate_django_user(clerk_id: str, row: AuthUser | None = None) -> None:
    """Make the linked Django user of a banned, deleted or deprovisioned Clerk user inactive and not staff:
    ``sync_django_user`` never runs for a refused row, and a Django login session (``login()``) would
    otherwise outlive the ban. For a ban (``row`` banned or deprovisioned, which can be lifted) only the
    flags ``USER_FIELDS`` copies are changed, so the next sync after an unban sets them back; for a
    deletion (terminal) or a row that is gone, all three. A local account (usable password) is never
    touched."""
    model = get_user_model()
    user = model._default_manager.filter(**{_clerk_id_field(model): clerk_id}).first()
    if user is None or not _is_linked(user):
        return
    _deactivate(user, row)


def _deactivate(user: Any, row: AuthUser | None) -> bool:
    """:func:`deactivate_django_user` of a linked ``user`` read already; whether it changed."""
    names = _flags(type(user))
    if row is not None and not row.is_deleted:
        copied = _user_fields(type(user), row)
        names = tuple(n for n in names if n in copied)
    if _copy_fields(user, dict.fromkeys(names, False)):
        log.warning("django_user_deactivated", clerk_id=_clerk_id(user), django_user_pk=user.pk)
        return True
    return False


def refresh_django_user(clerk_id: str) -> bool:
    """Bring the linked Django user of ``clerk_id`` in step with its ``users`` row now, as its next request would:
    deactivated (not staff, not superuser) once the Clerk user is banned, deleted or deprovisioned, else the
    fields ``USER_FIELDS`` copies (a demoted admin loses ``is_staff``/``is_superuser``). The webhook view calls it
    after a committed apply of a ``user.*`` delivery, so ``auth_user`` (the Django admin's user list, a
    ``User.objects.filter(is_superuser=True)``) stops showing a deleted or banned admin as a live superuser. No
    Django user is created, a local account (usable password) is never touched, a lock changes nothing (it ends
    by itself, with no event: the backend refuses the user while it lasts). Returns whether the user changed.

    Two deliveries for one user (an unban, then a demotion) refresh one after the other: the Django user's row is
    locked (``select_for_update``; on SQLite the database's write lock) *before* the ``users`` row is read, so the
    refresh that locks last reads the newest row, and one that read a row since changed cannot save it over the
    later refresh (a demoted user left staff and superuser). In its own ``atomic`` block: a failed save under
    ``ATOMIC_REQUESTS`` rolls back only its savepoint. A Clerk user with no linked Django user (never signed in
    through ``ClerkBackend``) takes no lock at all."""
    model = get_user_model()
    using = router.db_for_write(model)
    users = model._default_manager.using(using).filter(**{_clerk_id_field(model): clerk_id})
    if not any(_is_linked(user) for user in users[:1]):  # (no lock for a user never signed in here, or local)
        return False
    with transaction.atomic(using=using):
        _write_lock(using, model)
        user = users.select_for_update().first()
        if user is None or not _is_linked(user):
            return False
        row = read_user(get_clerk_sync().store, clerk_id)
        return row is not None and _in_step(user, row)


def _write_lock(using: str, model: Any) -> None:
    """SQLite: take the database's write lock now, as the transaction's first statement (``select_for_update`` is
    a no-op there). A deferred transaction that read first could not write once another writer committed (its
    snapshot stale: "database is locked" at once); this one waits its turn (the busy timeout) as a row lock
    would. Elsewhere nothing: ``select_for_update`` locks the row."""
    connection = connections[using]
    if connection.vendor != "sqlite":
        return
    quote = connection.ops.quote_name
    column = quote(model._meta.pk.column)
    # Matches no row, yet a write statement: it takes the lock. Only the model's own names, quoted.
    statement = f"UPDATE {quote(model._meta.db_table)} SET {column} = {column} WHERE 0 = 1"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(statement)


def _in_step(user: Any, row: AuthUser) -> bool:
    """Set the linked ``user``'s fields from ``row`` (see :func:`refresh_django_user`); whether any changed."""
    if row.banned or row.is_deleted or row.deprovisioned:
        changed = _deactivate(user, row)
    else:
        changed = bool(_copy_fields(user, _user_fields(type(user), row)))
    return changed


def refresh_django_users(batch: int = 500) -> tuple[int, list[Any]]:
    """:func:`refresh_django_user` for every linked Django user: deactivated once its ``users`` row is banned,
    deleted or deprovisioned, else given the copied fields that no longer match the row (a demotion; an unban
    makes an inactive user active again, so inactive users are read too): what the webhook view does at once,
    for deliveries another process applied (``clerk-sync serve``, ``replay``, ``reconcile``). ``batch`` users and one
    query of their rows at a time; returns how many changed and the primary keys of those that could not be changed
    (logged ``django_user_refresh_failed``). ``manage.py clerk_sync prune`` runs it."""
    import dataclasses

    from clerk_sync.tables import users as users_table

    store = get_clerk_sync().store
    columns = [users_table.c[f.name] for f in dataclasses.fields(AuthUser)]
    changed = 0
    failed: list[Any] = []
    for page in _pages(_linked_users(get_user_model()), batch):
        ids = [_clerk_id(user) for user in page]
        with store.connect() as conn:
            rows = {r["clerk_id"]: AuthUser(**r) for r in conn.execute(
                sa.select(*columns).where(users_table.c.clerk_id.in_(ids))).mappings()}
        for user in page:
            row = rows.get(_clerk_id(user))
            if row is None:  # never synced here, or a purged tombstone (forget_cleared_django_users' part)
                continue
            try:
                with transaction.atomic(using=user._state.db):
                    changed += _in_step(user, row)
            except Exception as exc:  # one user must not stop the others
                failed.append(user.pk)
                log.error("django_user_refresh_failed", django_user_pk=user.pk, error=type(exc).__name__,
                          fix="check CLERK_SYNC['USER_FIELDS'] and the Django user model's unique fields")
    return changed, failed


def _linked_users(model: Any) -> Any:
    """The Django users the backend owns (no usable password: :func:`_is_linked`) and holding a Clerk id (a
    ``CLERK_ID_FIELD`` may be empty for the app's other users), as a queryset."""
    key = _clerk_id_field(model)
    return model._default_manager.filter(Q(password="") | Q(password__isnull=True)
                                         | Q(password__startswith=UNUSABLE_PASSWORD_PREFIX)).exclude(
        Q(**{f"{key}__isnull": True}) | Q(**{key: ""}))


def _pages(users: Any, batch: int) -> Iterator[list[Any]]:
    """``users`` by primary key, ``batch`` at a time (keyset paging: saves on one page do not shift the next)."""
    users, after = users.order_by("pk"), None
    while True:
        page = list((users if after is None else users.filter(pk__gt=after))[:batch])
        if page:
            yield page
        if len(page) < batch:
            return
        after = page[-1].pk


def forget_django_user(clerk_id: str) -> bool:
    """Clear what the backend copied onto the linked Django user of an erased (or cleared, deleted) Clerk user:
    the fields ``USER_FIELDS`` gives for a deleted row with no personal data (by default e-mail and names
    blank), inactive, not staff. clerk-sync's own erasure never sees ``auth_user``: this is its Django half
    (``manage.py clerk_sync erase``, and ``prune`` for tombstones it clears). A local account (usable password)
    is never touched. Returns whether the user changed."""
    model = get_user_model()
    user = model._default_manager.filter(**{_clerk_id_field(model): clerk_id}).first()
    return user is not None and _is_linked(user) and _forget(user, clerk_id)


def forget_cleared_django_users(batch: int = 500) -> tuple[int, list[Any]]:
    """:func:`forget_django_user` for every linked Django user whose Clerk user clerk-sync no longer keeps data of
    (:meth:`~clerk_sync.retention.Retention.cleared_users`), read ``batch`` users at a time; returns how many
    changed, and the primary keys of those it could not change (logged ``django_user_forget_failed``: a
    ``USER_FIELDS`` that raised, a unique field the blank collides on), which do not stop the others.
    ``manage.py clerk_sync prune`` runs it after the retention pass."""
    from clerk_sync.retention import Retention

    retention = Retention(get_clerk_sync().store)
    changed = 0
    failed: list[Any] = []
    for page in _pages(_linked_users(get_user_model()), batch):
        cleared = retention.cleared_users([_clerk_id(user) for user in page])
        for user in page:
            if _clerk_id(user) not in cleared:
                continue
            try:
                with transaction.atomic(using=user._state.db):  # (a refused save inside a caller's transaction
                    changed += _forget(user, _clerk_id(user))  # must not doom the users after it)
            except Exception as exc:  # one user must not stop every later prune at the same place
                failed.append(user.pk)
                log.error("django_user_forget_failed", django_user_pk=user.pk, error=type(exc).__name__,
                          fix="check CLERK_SYNC['USER_FIELDS'] with a deleted row holding no personal data, and "
                              "the Django user model's unique fields")
    return changed, failed


def _forget(user: Any, clerk_id: str) -> bool:
    changed = _copy_fields(user, {**_user_fields(type(user), _cleared_row(clerk_id)),
                                  **dict.fromkeys(_flags(type(user)), False)})
    if changed:
        log.info("django_user_forgotten", clerk_id=clerk_id, django_user_pk=user.pk, fields=changed)
    return bool(changed)


def _cleared_row(clerk_id: str) -> AuthUser:
    """A deleted ``users`` row holding nothing personal, as erasure leaves it (or as if it did: hard-deleted)."""
    gone = datetime.fromtimestamp(0, UTC)
    return AuthUser(id=0, clerk_id=clerk_id, email=None, email_addresses=[], first_name=None, last_name=None,
                    username=None, image_url=None, public_metadata={}, private_metadata={}, unsafe_metadata={},
                    role="user", plan="free", banned=False, locked=False, deprovisioned=False, last_sign_in_at=None,
                    clerk_created_at=None, clerk_updated_at=0, created_at=gone, updated_at=gone, deleted_at=gone)


_SESSION_USER_UNREAD = ("the Django user of a Clerk session could not be read or saved (clerk-sync's own database may "
                        "be up: check Django's DATABASES, and its server's connections: max_connections, "
                        "CONN_MAX_AGE under ASGI)")


def _django_outage(exc: BaseException, then: str = _SESSION_USER_UNREAD) -> StoreError | None:
    """The outage a Django database error is, as clerk-sync's :class:`~clerk_sync.errors.StoreError` (503 with
    ``Retry-After``), or None when it is none.

    Only ``OperationalError`` and ``InterfaceError``: DB-API's errors of the database's operation, "not necessarily
    under the control of the programmer" (no connection could be opened: refused, "too many clients already", a
    database closed to new connections; the connection lost; a lock or statement timeout, a deadlock; the server out
    of memory or disk; SQLite's "database is locked"), which a retry may heal. Not ``IntegrityError``, ``DataError``,
    ``ProgrammingError``, ``InternalError`` or ``NotSupportedError``: the row or the code refused for good, where
    "retry in 5 s" would be a lie; they stay Django's 500 with its traceback, as any bug. Nor an ``OperationalError``
    clerk-sync's store takes for a value refused for good (:class:`~clerk_sync.errors.StoreDataError`: a MySQL
    column's refusal, which its driver raises as one; a PostgreSQL program limit). The message names the driver's
    error without the values it may quote, then ``then``: what could not be done, and what to check."""
    if not isinstance(exc, OperationalError | InterfaceError):
        return None
    orig = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc  # (Django raises it from the driver's)
    if _schema_or_statement_fault(orig):
        return None
    if isinstance(store_error(sa.exc.DBAPIError.instance(None, None, orig, Exception)), StoreDataError):
        return None
    return StoreError(f"Django's database: {type(orig).__name__}: {database_message(orig)}; {then}")


def _schema_or_statement_fault(orig: BaseException) -> bool:
    """A schema behind the code (a table or column missing: ``manage.py migrate`` not run) or a statement the
    database cannot run: SQLite and MySQL raise these as ``OperationalError`` too (PostgreSQL as
    ``ProgrammingError``), but no retry heals them, so they stay Django's 500 with its traceback, as on PostgreSQL,
    not a 503 that reads as an outage (review)."""
    if is_schema_behind(orig):
        return True
    return type(orig).__module__ == "sqlite3" and any(
        fault in str(orig) for fault in ("syntax error", "no such function", "no such index", "no such collation"))


def _refused_for_good(exc: ClerkSyncError) -> bool:
    """Banned, deleted or deprovisioned (not locked: Clerk unlocks on its own; not "no row yet")."""
    return isinstance(exc, (SessionUserBanned, UserDeleted, UserBanned)) and not isinstance(exc, UserLocked)


def django_user(request: HttpRequest, state: ClerkRequest) -> Any:
    """The Django user of a Clerk session, from the configured :class:`ClerkBackend` (its path recorded as
    ``authenticate()`` records it), or ``AnonymousUser`` when the session has no usable row (not synced
    yet, banned, deleted). Not through ``authenticate()``: it sends ``user_login_failed`` for every such
    request, which lockout tools (django-axes) count as failed logins, and locks the client's IP out.

    Raises :class:`~.request.ClerkUserUnavailable` while clerk-sync's database or Clerk is down (see the
    module's docstring): logged here once, and raised again without a second attempt on every later use in
    the same request (``request.user`` is re-evaluated after a failure, ``request.auser()`` on each call)."""
    if state.user_unavailable is not None:
        raise state.user_unavailable
    for path in settings.AUTHENTICATION_BACKENDS:
        backend = load_backend(path)
        if isinstance(backend, ClerkBackend):
            try:
                user = backend.authenticate(request, clerk_request=state)
            except ClerkUserUnavailable as exc:
                state.user_unavailable = exc
                log.warning("django_user_unavailable", path=request.path, error=exc.error.code,
                            clerk_id=state.token_auth.user_id if state.token_auth is not None else None,
                            cause=str(exc.error),
                            answer="503 with Retry-After (ClerkMiddleware), not AnonymousUser: an outage is no "
                                   "sign-out")
                raise
            if user is None:
                return AnonymousUser()
            user.backend = path
            return user
    return AnonymousUser()


def uses_clerk_backend() -> bool:
    """Whether ``AUTHENTICATION_BACKENDS`` lists :class:`ClerkBackend` or an app's subclass of it (as the checks and
    :func:`django_user` find it): by its exact path only, a subclass was ignored by the middleware and DRF, so
    ``request.user`` never became the Clerk session's user. Cached per list (read on every request)."""
    return _lists_clerk_backend(tuple(getattr(settings, "AUTHENTICATION_BACKENDS", None) or ()))


@functools.lru_cache(maxsize=16)
def _lists_clerk_backend(paths: tuple[Any, ...]) -> bool:
    return any(_is_clerk_backend(path) for path in paths)


def _is_clerk_backend(path: Any) -> bool:
    try:  # (Django itself reports a backend that does not import)
        found = import_string(path) if isinstance(path, str) else path
    except ImportError:
        return False
    return isinstance(found, type) and issubclass(found, ClerkBackend)


def _lock_clock_ms() -> int:
    """Now (epoch ms) as the Clerk-session paths compare a lock's end with: the deny list's wall clock
    (:meth:`~clerk_sync.auth.authenticator.DenyList.now_ms`), so a lock ends for a login session when it ends for
    a Clerk session. Without session verification configured (no authenticator to build), the UTC clock."""
    try:
        authenticator = get_clerk_sync().authenticator
    except ConfigError:
        return int(utcnow().timestamp() * 1000)
    return authenticator.deny_list.now_ms()


class ClerkBackend(BaseBackend):
    """Authenticates a verified Clerk session (``authenticate(request, clerk_request=...)``).

    ``None`` (not authenticated) when the session has no usable ``users`` row, when its Django user is
    inactive, or when the Clerk id names a local user with a usable password (never taken over: see
    the module's docstring for how to resolve it). Raises :class:`~.request.ClerkUserUnavailable` when
    clerk-sync's database or Clerk is down, whether checking the session (``clerk_request.error``) or
    reading its row failed, or when Django's database is (:func:`_django_outage`) linking the Django user: nobody is
    authenticated then, and nobody is told they are signed out either.
    """

    def __init__(self) -> None:
        from clerk_sync.integrations.django.conf import require_app_installed

        require_app_installed("ClerkBackend")

    def authenticate(self, request: HttpRequest | None, clerk_request: ClerkRequest | None = None,
                     **_: Any) -> Any:
        if clerk_request is None:
            return None
        if clerk_request.token_auth is None:  # no session, or one refused; or one that could not be checked
            if is_outage(clerk_request.error):
                assert clerk_request.error is not None
                raise ClerkUserUnavailable(clerk_request.error) from clerk_request.error
            return None
        try:
            row = clerk_request.user
        except ClerkSyncError as exc:
            if is_outage(exc):  # the row (or Clerk, for JIT sync) unreachable: not a sign-out
                raise ClerkUserUnavailable(exc) from exc
            # no row (webhook late, JIT off), banned or deleted: not signed in
            if _refused_for_good(exc):
                clerk_id = clerk_request.token_auth.user_id
                # (unread or unsaved, either database down: the next request does it)
                with contextlib.suppress(StoreError, OperationalError, InterfaceError):
                    deactivate_django_user(clerk_id, read_user(get_clerk_sync().store, clerk_id))
            return None
        try:
            user = sync_django_user(row)
        except (OperationalError, InterfaceError) as exc:  # Django's database down: no sign-out either
            outage = _django_outage(exc)
            if outage is None:
                raise
            raise ClerkUserUnavailable(outage) from exc
        return user if user is not None and self.user_can_authenticate(user) else None

    def get_user(self, user_id: Any) -> Any:
        """The user of a Django login session (``login()``), refused once its Clerk user is banned, deleted
        or deprovisioned (one indexed read of the ``users`` row; a database error refuses this request), and
        else kept in step with the row as a Clerk session's is: a demoted admin loses Django admin access on
        the next request, not on their next Clerk-session request.

        Refused too while the Clerk user is locked (too many failed sign-ins), as every Clerk-session path
        refuses them (403 ``user_locked``): until the lock's end (``users.locked_until``) by the deny list's
        clock, the one those paths compare it with, or until the unlock for a lock without an end. A lock ends
        by itself, with no event, so the Django user is left as it is (not deactivated): the login session
        works again once the lock is over."""
        model = get_user_model()
        try:
            user = model._default_manager.get(pk=user_id)
        except model.DoesNotExist:
            return None
        # A linked user's row is read before is_active is judged: one deactivated by a ban is active again once
        # the ban is lifted (by another process: reconcile, clerk-sync serve), as its Clerk session is.
        if _is_linked(user):
            clerk_id = _clerk_id(user)
            try:
                row = read_user(get_clerk_sync().store, clerk_id)
            except StoreError:
                log.warning("django_session_user_unchecked", clerk_id=clerk_id, django_user_pk=user.pk)
                return None
            if row is None:  # a purged tombstone, or a user the backend never made (nothing to change then)
                log.info("django_session_user_unknown", clerk_id=clerk_id, django_user_pk=user.pk)
                return None
            if row.banned or row.is_deleted or row.deprovisioned:
                deactivate_django_user(clerk_id, row)
                return None
            if row.locked and row.is_locked(_lock_clock_ms()):
                log.info("django_session_user_locked", clerk_id=clerk_id, django_user_pk=user.pk,
                         locked_until=row.locked_until)
                return None
            _copy_fields(user, _user_fields(model, row))
        return user if self.user_can_authenticate(user) else None

    @staticmethod
    def user_can_authenticate(user: Any) -> bool:
        return getattr(user, "is_active", True) is not False
