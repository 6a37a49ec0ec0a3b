"""The clerk-sync parts of a Django process, built once from ``settings.CLERK_SYNC`` and shared.

:func:`get_clerk_sync` returns them; each part is built on first use (once: concurrent first uses wait for
it), so a missing webhook secret fails the webhook view (and ``manage.py check``) but not pages that only
verify sessions. Changing ``CLERK_SYNC`` (``override_settings`` in tests) drops them, and the next use
rebuilds them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Self, TypeVar, overload

import httpx
from asgiref.sync import sync_to_async
from django.core.signals import setting_changed
from django.dispatch import receiver

from clerk_sync._urls import masked_url
from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.authenticator import Authenticator, DenyList, signed_out_if_banned
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.auth.users import AuthUser, JitUsers
from clerk_sync.clerk_api import AsyncClerkClient, CircuitBreaker, ClerkClient
from clerk_sync.clerk_api.ratelimit import Budget, budget_from_settings
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError, StoreError
from clerk_sync.freshness import database_probe
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.django.conf import DjangoOptions, clerk_settings, django_options
from clerk_sync.integrations.starlette import build_processor
from clerk_sync.metrics import Metrics
from clerk_sync.store import Store

__all__ = ["ClerkSync", "get_clerk_sync", "reset_clerk_sync"]

_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)
_SCHEMA_BEHIND = "the schema is not current"  # (clerk_sync._db_errors.store_error's words for a missing table)


class _built_once(Generic[_T]):  # lower case: a decorator, as functools.cached_property
    """``functools.cached_property`` that builds under a lock: the first use builds, concurrent first uses wait
    for it and share the result. cached_property itself stopped locking in Python 3.12, so two threads' first
    requests each built a Clerk client (one never closed, each with its own connections) or an authenticator.

    One lock per part and instance (``ClerkSync._build_locks``): a part built from another (the authenticator
    from ``jit``, from ``clerk``) takes that one's lock inside its own, always in that order, and the webhook
    view's ``processor`` never waits on a Clerk client. A build that raises keeps nothing: the next use tries
    again. Once built, the value sits in the instance's ``__dict__`` and is read without any lock."""

    _name: str

    def __init__(self, build: Callable[[Any], _T]) -> None:
        self._build = build
        self.__doc__ = build.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> _T | Self:
        if instance is None:
            return self
        built: dict[str, Any] = instance.__dict__
        # dict.setdefault is atomic: two threads get the same lock (a Lock made and dropped at most)
        with built["_build_locks"].setdefault(self._name, threading.Lock()):
            if self._name not in built:
                built[self._name] = self._build(instance)
            value: _T = built[self._name]
        return value


class ClerkSync:
    """Settings, store, webhook processor, authenticator, JIT users and admin actions of one process, and the
    one :class:`~clerk_sync.metrics.Metrics` they all count in (``processor.metrics``, as in the README's
    "Metrics in your own app": deliveries, Clerk API calls and 429s, the circuit breaker, JIT fetches)."""

    def __init__(self, settings: Settings, options: DjangoOptions) -> None:
        self.settings = settings
        self.options = options
        self.store = Store.from_settings(settings, hooks=options.hooks, mapping=options.mapping)  # lazy connect
        self._http = httpx.Client()
        self._aclerk_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None  # see _aclerk_usable
        # One rate budget and one breaker for the sync and the async client (WSGI and ASGI views, admin
        # actions): two would let one process spend twice the documented limit, and count Clerk's failures
        # apart. Built on first use (a bad REDIS_URL must not fail the webhook view or pages without JIT),
        # under a lock: two threads' first uses must not build two.
        self._budget: Budget | None = None
        self._budget_lock = threading.Lock()
        self._breaker = CircuitBreaker()
        self._build_locks: dict[str, threading.Lock] = {}  # one per part (see _built_once)

    @_built_once
    def metrics(self) -> Metrics:
        """The process's metrics, also ``processor.metrics``; made on first use by either, so the Clerk clients
        and JIT users count in it even when the processor cannot be built (no webhook secret)."""
        return Metrics()

    @_built_once
    def processor(self) -> WebhookProcessor:
        """Raises ConfigError (naming the variable) when the webhook secret is missing or malformed."""
        processor = build_processor(self.settings, self.store)
        processor.metrics = self.metrics  # one registry for the process: the Clerk clients' and JIT's series too
        # the freshness series (database up, schema current, lag, hook jobs), read at scrape time, as serve's
        processor.metrics.watch_database(database_probe(processor.store))
        return processor

    @_built_once
    def clerk(self) -> ClerkClient | None:
        budget = self._shared_budget()
        if budget is None:
            return None
        return ClerkClient.from_settings(self.settings, budget=budget, breaker=self._breaker, metrics=self.metrics)

    @_built_once
    def aclerk(self) -> AsyncClerkClient | None:
        budget = self._shared_budget()
        if budget is None:
            return None
        return AsyncClerkClient.from_settings(self.settings, budget=budget, breaker=self._breaker,
                                              metrics=self.metrics)

    def _shared_budget(self) -> Budget | None:
        if not self.settings.clerk_secret_key:
            return None
        with self._budget_lock:
            if self._budget is None:
                self._budget = budget_from_settings(self.settings)
            return self._budget

    @_built_once
    def jit(self) -> JitUsers | None:
        """JIT sync when enabled and a secret key is set; else rows come from webhooks only."""
        if not self.options.jit or self.clerk is None:
            return None
        return JitUsers(self.store, clerk=self.clerk, aclerk=self.aclerk, metrics=self.metrics,
                        refresh_interval_s=self.settings.jit_refresh_interval_s)

    @_built_once
    def authenticator(self) -> Authenticator:
        """Raises ConfigError when neither CLERK_JWT_KEY nor CLERK_SECRET_KEY is set."""
        verifier = verifier_from_settings(self.settings, http=self._http)
        deny_list = DenyList(self.store, refresh_s=self.options.deny_list_refresh_s)
        jit = self.jit
        return Authenticator(verifier, self.store, deny_list=deny_list,
                             load_user=jit.get_auth_user if jit is not None else None,
                             impersonator_roles=self.settings.impersonator_roles(), metrics=self.metrics)

    @_built_once
    def admin_actions(self) -> AdminActions:
        if self.clerk is None:
            raise ConfigError("admin actions call Clerk: set CLERK_SECRET_KEY in settings.CLERK_SYNC")
        return AdminActions(self.store, self.clerk, impersonator_roles=self.settings.impersonator_roles())

    def naming_database(self, error: _E) -> _E:
        """:func:`naming_database` with this process's database."""
        return naming_database(error, self.settings.database_url)

    def user(self, auth: Auth) -> AuthUser:
        """The caller's row: JIT-synced when enabled, else the table (403 until the webhook lands)."""
        return self.authenticator.user(auth)

    async def auser(self, auth: Auth, *, asgi: bool = False) -> AuthUser:
        """Async :meth:`user`: database reads in worker threads; a JIT fetch on the event loop under ASGI
        (``asgi=True``), else the blocking fetch in a worker thread too (see :meth:`_aclerk_usable`)."""
        if self.jit is not None and asgi and self._aclerk_usable():
            with signed_out_if_banned():  # 401 for a banned/deleted user, as authenticator.user under WSGI
                return await self.jit.aget_auth_user(auth.user_id)
        return await sync_to_async(self.authenticator.user, thread_sensitive=False)(auth)

    def _aclerk_usable(self) -> bool:
        """Whether the async Clerk client may run on this event loop: its connections belong to the first
        loop that used it (an ASGI server's one loop). Under WSGI, or in tests, each async view gets a
        new loop that is closed after it, and a client shared with it fails ("Event loop is closed")."""
        loop = asyncio.get_running_loop()
        with _lock:
            if self._aclerk_loop is None:
                self._aclerk_loop = weakref.ref(loop)
            return self._aclerk_loop() is loop

    def close(self) -> None:
        """Release connections and HTTP clients (the next :func:`get_clerk_sync` builds anew); the Clerk
        clients only if they were built."""
        self._http.close()
        built: dict[str, Any] = self.__dict__
        try:
            if built.get("clerk") is not None:
                built["clerk"].close()
            if built.get("aclerk") is not None:
                self._close_async(built["aclerk"])
        finally:
            close_budget = getattr(self._budget, "close", None)  # shared, so no client owns it (Redis: sockets)
            if close_budget is not None:
                close_budget()
            self.store.dispose()

    def _close_async(self, aclerk: AsyncClerkClient) -> None:
        """Close the async client and the shared budget's async face (Redis) on the loop their connections
        belong to (see :meth:`_aclerk_usable`). From that loop's own thread the close is scheduled on it (a
        sync caller there cannot wait for it); from another thread it is awaited for up to ``_ACLOSE_WAIT_S``;
        a loop that is not running runs it. Never used (or its loop gone), it closes on a new loop. A loop
        that has ended (``asyncio.run`` returned) can no longer close anything: its sockets are left to the
        garbage collector, as before."""
        loop = self._aclerk_loop() if self._aclerk_loop is not None else None
        if loop is not None and loop.is_closed():
            return
        here = _running_loop()
        if loop is not None and loop is here:
            task = loop.create_task(self._aclose(aclerk))
            _closing.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(_closing.discard)
        elif loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._aclose(aclerk), loop)
            with contextlib.suppress(concurrent.futures.TimeoutError):  # a busy loop: the close goes on there
                future.result(_ACLOSE_WAIT_S)
        else:
            _run_on(loop, self._aclose(aclerk), elsewhere=here is not None)

    async def _aclose(self, aclerk: AsyncClerkClient) -> None:
        try:
            await aclerk.aclose()  # its HTTP client; the budget is shared, not its own
        finally:
            aclose_budget = getattr(self._budget, "aclose", None)
            if aclose_budget is not None:
                await aclose_budget()


def naming_database(error: _E, database_url: str) -> _E:
    """``error`` itself, its message naming ``database_url`` (password masked) when it says the schema is not
    current: "run clerk-sync's migrations on this database" must say which one (under Django's test runner the
    test database, not the one ``settings.py`` names). Any other error is left as it is."""
    if isinstance(error, StoreError) and len(error.args) == 1 and isinstance(error.args[0], str) \
            and _SCHEMA_BEHIND in error.args[0] and _NAMED not in error.args[0]:
        error.args = (f"{error.args[0]}; {_NAMED} {masked_url(database_url)}",)
    return error


_NAMED = "clerk-sync's database is"
_ACLOSE_WAIT_S = 5.0
_closing: set[asyncio.Task[None]] = set()  # closes scheduled on a running loop, until they finish


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _run_on(loop: asyncio.AbstractEventLoop | None, coro: Coroutine[Any, Any, None], *, elsewhere: bool) -> None:
    """Run ``coro`` to its end on ``loop`` (a new loop if ``None``); in a thread of its own if this thread
    is already running a loop (``elsewhere``), as a loop cannot be run from inside another."""
    def run() -> None:
        if loop is None:
            asyncio.run(coro)
        else:
            loop.run_until_complete(coro)

    if not elsewhere:
        run()
        return
    failed: list[BaseException] = []

    def run_catching() -> None:
        try:
            run()
        except BaseException as exc:  # re-raised in the caller's thread below
            failed.append(exc)

    worker = threading.Thread(target=run_catching, name="clerk-sync-aclose")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]


# One per process, as Django's own settings and connections are; built lazily and replaceable (tests,
# override_settings), so nothing is read at import time.
_lock = threading.Lock()
_current: list[ClerkSync] = []


def get_clerk_sync() -> ClerkSync:
    """The process's :class:`ClerkSync`, built from ``settings.CLERK_SYNC`` on first use."""
    if _current:
        return _current[0]
    with _lock:
        if not _current:
            _current.append(ClerkSync(clerk_settings(), django_options()))
        return _current[0]


def reset_clerk_sync() -> None:
    """Drop the current parts (closing them); called when ``CLERK_SYNC`` or ``DATABASES`` change."""
    with _lock:
        gone = _current.pop() if _current else None
    if gone is not None:  # closed outside the lock: its async close may need the server's loop, which takes it
        gone.close()


@receiver(setting_changed)
def _on_setting_changed(*, setting: str, **_: Any) -> None:
    if setting in ("CLERK_SYNC", "DATABASES"):
        reset_clerk_sync()
