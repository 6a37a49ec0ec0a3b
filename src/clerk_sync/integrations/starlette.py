"""Starlette adapter: the webhook endpoint, health/readiness/metrics, and the standalone service app.

Usage in your own app::

    processor = build_processor(Settings.from_env())
    app = Starlette(routes=webhook_routes(processor))
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import structlog
from alembic.util.exc import CommandError
from anyio import CapacityLimiter, to_thread
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from clerk_sync import migrations
from clerk_sync._db_errors import binlog_trigger_refusal, privilege_refusal, store_error
from clerk_sync.config import Settings
from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import (
    ClerkSyncError,
    ConfigError,
    MigrationPending,
    PayloadTooLarge,
    StoreError,
    StorePrivilegeMissing,
    WebhookBodyTimeout,
    WebhookError,
    database_message,
)
from clerk_sync.events import Envelope
from clerk_sync.freshness import database_probe
from clerk_sync.ingest import Outcome, WebhookProcessor
from clerk_sync.integrations._committer import ALONE, GroupCommitter
from clerk_sync.integrations._gate import KeyGate, envelope_keys
from clerk_sync.integrations.http import ErrorResponse, delivery_answer, error_response
from clerk_sync.metrics import CONTENT_TYPE_LATEST
from clerk_sync.migrations._privileges import MISSING_TABLES_ADVICE, missing_tables
from clerk_sync.retention import PruneReport, Retention, RetentionPolicy
from clerk_sync.store import READ_ONLY_OPTION, Store
from clerk_sync.webhooks import WebhookVerifier

__all__ = [
    "PruneSchedule",
    "StartupMigration",
    "WebhookFastPath",
    "app_from_env",
    "build_processor",
    "create_app",
    "error_json",
    "read_limited_body",
    "webhook_endpoint",
    "webhook_routes",
]

log = structlog.get_logger("clerk_sync.http")
T = TypeVar("T")


def build_processor(settings: Settings, store: Store | None = None) -> WebhookProcessor:
    """Wire the processor from settings; raises ConfigError at start-up, not per request."""
    verifier = WebhookVerifier(settings.webhook_secrets(), tolerance_s=settings.webhook_tolerance_s)
    return WebhookProcessor(
        store or Store.from_settings(settings),
        verifier,
        instance_id=settings.instance_id,
        max_body_bytes=settings.max_body_bytes,
        log_level=settings.delivery_log_level,
        summary_s=settings.delivery_summary_s,
    )


def error_json(exc: ClerkSyncError) -> JSONResponse:
    """A clerk-sync error as Starlette answers it (the status and headers come from :mod:`.http`)."""
    answer = error_response(exc)
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


async def read_limited_body(request: Request, limit: int, *, timeout_s: float | None = None) -> bytes:
    """Read at most ``limit`` bytes; refuse larger bodies before reading them in full. With ``timeout_s``, a
    body not in within that many seconds raises :class:`TimeoutError` (a client stalling mid-body)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(timeout_s):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    raise _too_slow(timeout_s or 0.0, size, declared)


def _too_slow(timeout_s: float, received: int, declared: str | None) -> WebhookBodyTimeout:
    """The refusal of a body not in within ``timeout_s`` (what came of it, never its content)."""
    of = f" of {_cut(declared)} declared" if declared is not None else ""
    return WebhookBodyTimeout(f"the body did not arrive within {timeout_s:g} s ({received} bytes{of} received; "
                              "nothing was written)")


class _WebhookPath:
    """What every webhook endpoint does once the body is read (see :func:`webhook_endpoint`)."""

    def __init__(self, processor: WebhookProcessor, *, threads: int, slow_s: float, key_patience_s: float,
                 not_ready: Callable[[], str | None] | None, committer: GroupCommitter | None) -> None:
        self.processor = processor
        self.threads, self.slow_s = threads, slow_s
        self.gate = KeyGate(patience_s=key_patience_s)
        self.not_ready = not_ready
        self.committer = committer
        self._limiters: list[CapacityLimiter] = []  # created on first use, inside the event loop

    async def deliver(self, headers: Mapping[str, str], body: bytes) -> Outcome:
        """Verify and parse (on the event loop: HMAC and JSON are C code), then write: in a shared
        transaction when there is a group committer and no delivery of the same user is waiting on the
        database, else alone in a worker thread. Raises ClerkSyncError."""
        started, started_ns = time.perf_counter(), time.time_ns()
        svix_id, envelope = self.processor.verify_and_parse(headers, body)  # forged or malformed: 4xx, always
        waiting = self.not_ready() if self.not_ready is not None else None
        if waiting is not None:
            raise StoreError(waiting)  # an app's own reason: logged, answered store_unavailable (its text not public)
        keys = envelope_keys(svix_id, envelope.type, envelope.data)
        result: Outcome | object = ALONE
        if self.committer is not None and not self.gate.busy(keys):
            result = await self.committer.submit(svix_id, envelope)
        if not isinstance(result, Outcome):
            result = await _in_slot(_limiter(self._limiters, self.threads), self.slow_s, self._alone, keys,
                                    svix_id, envelope)
        self.processor.observe(envelope, result, started, started_ns)
        return result

    def _alone(self, keys: list[str], svix_id: str, envelope: Envelope) -> Outcome:
        with self.gate.hold(keys):
            return self.processor.apply_alone(svix_id, envelope)

    def refused(self, exc: ClerkSyncError, claimed: str | None) -> ErrorResponse:
        """Log and count a refusal; the answer to send."""
        self.processor.refused(exc, claimed)
        return error_response(exc)

_CLOSE = {"connection": "close"}  # an answer sent before the body was read in full: the rest is not waited for
_UNREAD = (PayloadTooLarge, WebhookBodyTimeout)  # the refusals answered so


def _cut(text: str | None) -> str | None:
    """A value the client chose, cut to a length a log line holds."""
    return text if text is None or len(text) <= 100 else f"{text[:100]}... ({len(text)} characters)"


def webhook_endpoint(processor: WebhookProcessor, *, threads: int = 4, slow_s: float = 0.5,
                     key_patience_s: float = 0.5, not_ready: Callable[[], str | None] | None = None,
                     committer: GroupCommitter | None = None, read_timeout_s: float = 30.0) -> Any:
    """An ASGI endpoint for ``POST /webhooks/clerk``.

    ``threads`` caps concurrent deliveries in the thread pool: the work is GIL-bound, and more
    threads than that only queue for the GIL (and lengthen the latency tail). A delivery still
    running after ``slow_s`` is waiting on the database (a lock held by a stuck replica), not on the
    CPU: it gives its place back so unrelated deliveries do not queue behind it (the database's own
    ``lock_timeout`` ends its wait). Deliveries for one user or organization take turns
    (:class:`~._gate.KeyGate`): while one of them is stuck, the others are refused (503) after
    ``key_patience_s``. ``not_ready()`` says why deliveries must wait (503 ``store_unavailable``, nothing written;
    its text goes to the log, not to the caller), or raises a :class:`~clerk_sync.errors.StoreError` of its own
    to answer with (:meth:`StartupMigration.gate`: ``migration_pending``, with its public text). With a
    ``committer`` (the service's :class:`~._committer.GroupCommitter`),
    concurrent deliveries share one transaction and one COMMIT. A body not in within ``read_timeout_s``
    (``CLERK_SYNC_WEBHOOK_READ_TIMEOUT_S``) is answered 408 and the connection closed, nothing written.
    """
    path = _WebhookPath(processor, threads=threads, slow_s=slow_s, key_patience_s=key_patience_s,
                        not_ready=not_ready, committer=committer)

    async def endpoint(request: Request) -> Response:
        # Unverified, but it correlates every log line of this delivery (refusals included).
        claimed = request.headers.get("svix-id") or request.headers.get("webhook-id")
        try:
            body = await read_limited_body(request, processor.max_body_bytes, timeout_s=read_timeout_s)
            outcome = await path.deliver(request.headers, body)
        except (WebhookError, StoreError) as exc:
            answer = path.refused(exc, claimed)
            headers = {**answer.headers, **_CLOSE} if isinstance(exc, _UNREAD) else answer.headers
            return JSONResponse(answer.body, status_code=answer.status, headers=headers)
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse(delivery_answer(outcome.svix_id, outcome.status, outcome.error))

    return endpoint


class WebhookFastPath:
    """Pure ASGI in front of an app: ``POST path`` is answered here (no routing, no Request/Response
    objects, the body parsed once, group commit); everything else goes to ``app``.

    The service (``clerk-sync serve``) runs behind it; apps mounting :func:`webhook_routes` keep the
    Starlette endpoint.
    """

    def __init__(self, app: Any, processor: WebhookProcessor, *, path: str = "/webhooks/clerk",
                 not_ready: Callable[[], str | None] | None = None, committer: GroupCommitter | None = None,
                 threads: int = 4, slow_s: float = 0.5, key_patience_s: float = 0.5,
                 read_timeout_s: float = 30.0) -> None:
        self.app, self.path_name = app, path
        self._paths = frozenset(with_and_without_slash(path))
        self.committer = committer
        self._path = _WebhookPath(processor, threads=threads, slow_s=slow_s, key_patience_s=key_patience_s,
                                  not_ready=not_ready, committer=self.committer)
        self._limit = processor.max_body_bytes
        self._read_timeout_s = read_timeout_s  # see webhook_endpoint

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self._paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        claimed = headers.get("svix-id") or headers.get("webhook-id")
        try:
            body = await self._body(headers, receive)
            outcome = await self._path.deliver(headers, body)
        except (WebhookError, StoreError) as exc:
            answer = self._path.refused(exc, claimed)
            headers = {**answer.headers, **_CLOSE} if isinstance(exc, _UNREAD) else answer.headers
            await _send_json(send, answer.status, answer.body, headers)
            return
        except ClientDisconnect:
            await _send_json(send, 400, {"error": "client_disconnected", "message": "the body was not received"})
            return
        if outcome.status == DeliveryStatus.FAILED:  # (rare: with its reason)
            await _send_json(send, 200, delivery_answer(outcome.svix_id, outcome.status, outcome.error))
            return
        # The 2xx every delivery gets, as _send_json would write it, without a JSON encoder per request.
        data = b'{"status":"%s","svix_id":%s}' % (outcome.status.encode(), _dumps(outcome.svix_id).encode())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [_JSON_TYPE, (b"content-length", b"%d" % len(data))]})
        await send({"type": "http.response.body", "body": data})

    async def _body(self, headers: Mapping[str, str], receive: Any) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            raise PayloadTooLarge(f"body is {declared} bytes, the limit is {self._limit}")
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self._read_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self._limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {self._limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        raise _too_slow(self._read_timeout_s, size, declared)


_JSON_TYPE = (b"content-type", b"application/json")
_dumps = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per call as json.dumps(separators=)


async def _send_json(send: Any, status: int, body: Mapping[str, str], headers: Mapping[str, str] | None = None) -> None:
    data = _dumps(body).encode()
    raw = [_JSON_TYPE, (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def _in_slot(slots: CapacityLimiter, slow_s: float, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a worker thread holding one of ``slots`` for at most ``slow_s`` (see
    :func:`webhook_endpoint`); the thread pool's own limit still bounds the threads."""
    borrower = object()
    await slots.acquire_on_behalf_of(borrower)
    held = True

    def give_back() -> None:
        nonlocal held
        if held:
            held = False
            slots.release_on_behalf_of(borrower)

    try:  # a timer on the event loop: cheaper than a watchdog task per delivery
        timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(slow_s, give_back)
    except RuntimeError:  # not asyncio (trio): the place is held to the end
        timer = None
    try:
        return await to_thread.run_sync(fn, *args)
    finally:
        if timer is not None:
            timer.cancel()
        give_back()


def _limiter(holder: list[CapacityLimiter], threads: int) -> CapacityLimiter:
    if not holder:
        holder.append(CapacityLimiter(threads))
    return holder[0]


def webhook_routes(processor: WebhookProcessor, path: str = "/webhooks/clerk", *,
                   read_timeout_s: float = 30.0) -> list[BaseRoute]:
    """The webhook route alone, for apps that mount it themselves (with and without a trailing slash); a body
    not in within ``read_timeout_s`` is answered 408 (:func:`webhook_endpoint`)."""
    endpoint = webhook_endpoint(processor, read_timeout_s=read_timeout_s)
    return [Route(one, endpoint, methods=["POST"]) for one in with_and_without_slash(path)]


def with_and_without_slash(path: str) -> list[str]:
    """``path`` and its twin with (or without) the trailing slash: an endpoint URL entered in Clerk's
    Dashboard with a slash would otherwise get Starlette's 307, which Svix does not follow (every
    delivery failing until the URL is fixed)."""
    bare = path.rstrip("/") or "/"
    return [bare] if bare == "/" else [bare, bare + "/"]


class _SaidOnChange:
    """``/readyz`` is polled every few seconds by each replica's orchestrator: a database down, a read refused or a
    standby is logged at WARNING when the poll first finds it (or its error changes), each repeat at DEBUG, and its
    end once at INFO (``readyz_state_ended``: which, and how many polls found one), rather than a warning a poll.
    Polls finish in any order (a connect timeout outlives the polls after it): each takes a ticket before its check,
    and an answer older than the last one said is not said (it would warn again after the end)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[str, str | None] | None = None
        self._polls = 0
        self._tickets = 0
        self._said_of = 0  # the ticket of the last answer said

    def ticket(self) -> int:
        with self._lock:
            self._tickets += 1
            return self._tickets

    def warning(self, ticket: int, event: str, error: str | None = None) -> None:
        with self._lock:
            if ticket < self._said_of:
                return
            new = self._last != (event, error)
            self._last, self._polls, self._said_of = (event, error), self._polls + 1, ticket
            (log.warning if new else log.debug)(event, **({} if error is None else {"error": error}))

    def ended(self, ticket: int) -> None:
        with self._lock:
            if ticket < self._said_of:
                return
            last, polls = self._last, self._polls
            self._last, self._polls, self._said_of = None, 0, ticket
            if last is not None:
                log.info("readyz_state_ended", after=last[0], polls=polls)


class StartupMigration:
    """``serve`` migrates in the background instead of refusing to start when the database is down:
    until the migration has run, ``/readyz`` and deliveries answer 503 (Svix retries); attempts back
    off from ``first_delay_s`` to ``max_delay_s``.

    A migration the database refuses for a privilege (``serve --migrate`` run as a runtime role on a schema
    behind: no retry grants it) or a database a newer release migrated is no outage: :meth:`attempt` raises
    :class:`ConfigError` (before serving: the start fails, saying what to run) and :meth:`retry` stops, ``refused``
    says why and ``on_refused`` is called (``serve`` exits 2); with no ``on_refused`` (an embedding app) the schema
    version is read every ``recheck_s`` until another process (the owner's `clerk-sync migrate`) has made it
    current. A database that is merely down is retried."""

    recheck_s = 60.0  # refused, no on_refused: how often the schema version is read (tests: theirs)

    def __init__(self, engine: Engine, *, first_delay_s: float = 0.5, max_delay_s: float = 30.0) -> None:
        self.engine = engine
        self.done = False
        self.error: str | None = None
        self.refused: str | None = None  # why the migration can never run as this role (set, it is not retried)
        self.on_refused: Callable[[], None] | None = None  # (``serve`` stops itself; set before start-up)
        self.attempts = 0
        self._first, self._max = first_delay_s, max_delay_s
        self._for_privilege = False
        self._stopping = False  # on_refused was called: this process is stopping for the refusal

    def pending(self) -> str | None:
        """Why deliveries must wait, or None once migrations are current. The driver's error (host, port,
        user) is not in it, only in the service log: this is the body of a 503 anyone may receive."""
        if self.done:
            return None
        if self.refused is not None:
            return f"database not ready: {self.refused_hint()}"
        return ("database not ready: migrations have not run yet, retrying in the background (the service log "
                "says why: migration_retry)")

    def gate(self) -> str | None:
        """The webhook route's ``not_ready``: raises :class:`MigrationPending` (its own 503 code, :meth:`pending`'s
        public text) while migrations are not current. Not a returned text: an app's own ``not_ready`` reason is
        an outage's, answered ``store_unavailable`` and counted as one, its text kept out of the answer."""
        waiting = self.pending()
        if waiting is not None:
            raise MigrationPending(waiting)
        return None

    def refused_hint(self) -> str:
        """What to do about a refusal, without the driver's text (for anyone who asks)."""
        if self._for_privilege:
            return ("the migration was refused: run `clerk-sync migrate` as the tables' owner (the service log says "
                    "why: migration_refused)")
        return "the migration was refused (the service log says why and what to do: migration_refused)"

    async def attempt(self) -> bool:
        """One try; True once migrations are current. Raises :class:`ConfigError` when no retry can help."""
        self.attempts += 1
        try:
            await to_thread.run_sync(migrations.upgrade, self.engine)
        except (SQLAlchemyError, StoreError, CommandError, ConfigError) as exc:
            # The database down, a failed step (MigrationError: which one, why), or Alembic's refusal: one
            # line in the log, and tried again (a lock wait that ran out passes). A database a newer release
            # migrated (ConfigError), or a step refused for a privilege: the start fails, saying so.
            refused = _refused(exc)
            if refused is not None:
                self.refused = self.error = refused
                self._for_privilege = not isinstance(exc, ConfigError)  # (else a newer release migrated it)
                log.error("migration_refused", attempt=self.attempts, error=refused)
                raise ConfigError(refused) from exc
            if isinstance(exc, SQLAlchemyError):
                orig = getattr(exc, "orig", None) or exc
                self.error = f"{type(orig).__name__}: {(str(orig).strip().splitlines() or [''])[0][:200]}"
            else:
                self.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:500]}"
            return False
        self.done, self.error = True, None
        log.info("migrations_current", attempts=self.attempts)
        return True

    async def retry(self) -> None:
        """Try again with backoff until it works (the service keeps answering meanwhile), or until the database
        refuses it for good (``refused``; ``on_refused`` is called)."""
        delay = self._first
        while True:
            log.warning("migration_retry", attempt=self.attempts, retry_in_s=delay, error=self.error)
            await anyio.sleep(delay)
            try:
                if await self.attempt():
                    return
            except ConfigError:
                if self.on_refused is not None:
                    self._stopping = True  # (healed() from a /readyz poll during the drain changes nothing now)
                    self.on_refused()
                    return
                await self._until_migrated()
                return
            delay = min(delay * 2, self._max)

    async def _until_migrated(self) -> None:
        """Refused, and nobody stops the process (an app embedding ``create_app(migrate=True)``): the schema version
        is read every ``recheck_s`` (one query), and once the owner has run `clerk-sync migrate` (current) deliveries
        are taken again, rather than 503 until a restart."""
        while True:
            await anyio.sleep(self.recheck_s)
            try:
                state, _ = await to_thread.run_sync(migrations.schema_state, self.engine)
            except SQLAlchemyError as exc:  # down meanwhile: read again later (migration_refused said why)
                log.debug("migration_refused_recheck_failed", error=type(exc).__name__)
                continue
            except Exception as exc:  # anything else ended the recheck (and the prune schedule beside it) for good
                log.warning("migration_refused_recheck_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            if state != "behind":
                self.healed()
                return

    def healed(self) -> None:
        """After a refusal, the schema read current, or newer (another release's migrate: a schema this one runs
        on, as `/readyz` and ``is_current`` say): deliveries are taken again. Called by the recheck, or at once by
        a `/readyz` poll that read it so (it would otherwise say ready while deliveries wait up to a recheck). Not once
        ``on_refused`` was called: that process is stopping for the refusal (and exits 2 for it)."""
        if self.refused is not None and not self._stopping:
            self.done, self.refused, self.error = True, None, None
            log.info("migrations_current", attempts=self.attempts, migrated_by="another process")


def _refused(exc: BaseException) -> str | None:
    """Why ``exc`` (of a migration) can never succeed as this role, or None when a retry may: a database a newer
    release migrated (its ConfigError says what to do), or a refusal for a privilege (what, and whose job it is)."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, StoreError) and binlog_trigger_refusal(exc):  # the server's setting, changed since its probe
        return f"the start-up migration: {' '.join(str(exc).split())}"
    denied = privilege_refusal(exc)
    if denied is None or not isinstance(store_error(denied), StorePrivilegeMissing):
        # MariaDB's 1044 at connect (no statement ran: this user may not use the database, or its name is
        # misspelled) is store_error's "database unavailable": retried, as PostgreSQL's missing CONNECT is
        return None
    if isinstance(exc, StoreError):  # a failed step (MigrationError): it names the step and the owner's migrate
        return f"the start-up migration: {' '.join(str(exc).split())}"
    orig = denied.orig or denied
    return (f"the start-up migration: the database refused it for a privilege ({type(orig).__name__}: "
            f"{database_message(orig)}): this role may not change the schema, and no retry grants it. Run "
            f"`clerk-sync migrate` as the role that owns the tables{_START_WITHOUT} (RUNBOOK, \"Least-privilege "
            "database roles\")")


# (the start-up migration is `serve --migrate`'s, or an embedding app's: both ways named)
_START_WITHOUT = (", then start this one without migrating (`serve --no-migrate`, or CLERK_SYNC_MIGRATE_ON_START=0 / "
                  "create_app(migrate=False))")


_READ_ONLY = "read-only"


def _read_only(exc: BaseException | None) -> bool:
    """The database refuses every write: PostgreSQL 25006 (a standby, ``default_transaction_read_only``), MySQL/
    MariaDB 1290 (``--read-only``), 1792 (a read-only transaction)."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    return getattr(orig, "sqlstate", None) == "25006" or bool(args and args[0] in (1290, 1792))


class _RolePrivileges:
    """What the database role lacks of what this process writes (``migrations._privileges``), for ``/readyz``: a
    role that may read the schema but not write it (``serve --no-migrate`` as a runtime role short of a GRANT)
    would answer every delivery 503 while ready. Only the deliveries' needs, and the hook dispatcher's when this
    process dispatches (``serve --hooks``): a ``serve --no-dispatch`` replica is not taken out of rotation for a
    DELETE only the dispatcher needs. The verdict is kept ``ttl_s`` either way (a probe is a few dozen statements,
    ~25 ms), so a REVOKE is seen within a minute and a missing grant is not asked at every poll; logged once per
    change (SQLite has no roles). Polls at once (two probes of a load balancer) share one probe: one log line.
    Whether this process dispatches is ``app.state.clerk_sync_dispatches`` (``serve --hooks`` sets it; an app that
    starts its own :class:`~clerk_sync.hooks.Dispatcher` sets it too).

    A poll finding a probe under way (a database that hangs on the catalog) answers the last verdict at once, however
    old (the probe under way asks the same of the same role, and a replica is not taken out of rotation because a
    catalog read is slow, nor a worker thread the webhooks share held waiting); with none yet it waits at most
    ``wait_s``, then answers ``None`` (``/readyz`` says ``"privileges": "unknown"``, not ready: never checked is
    not granted). Without the bound every poll queued behind a hung probe, each holding a worker thread, for ever.
    ``readyz_privilege_probe_slow`` is said once per probe, by a poll that waited in vain or found it running
    ``slow_s`` or more (not by two polls meeting an ordinary probe)."""

    clock: Callable[[], float] = staticmethod(time.monotonic)  # (tests inject theirs)
    wait_s = 0.5  # (no verdict yet) a probe takes ~25 ms: one that outlives this is hung (tests: theirs)
    slow_s = 1.0  # (a verdict at hand) a poll finding a probe under way this long says so, once

    def __init__(self, store: Store, ttl_s: float = 60.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.sqlite = store.engine.dialect.name == "sqlite"
        self._verdicts: dict[bool, tuple[float, list[str], list[str]]] = {}
        self._said: dict[bool, tuple[str, ...]] = {}
        self._asking = threading.Lock()  # (readyz runs in worker threads)
        self._probes = 0  # probes started (under _asking): which one a slow-probe line was said of
        self._slow_said = -1
        self._probe_started: float | None = None  # (clock) when the probe under way began; None: none under way
        # The last probe's failure (a standby after a failover, a read refused, the database down), until a probe
        # answers: a poll meeting the next probe says it again rather than the verdict from before it (a 200 from
        # a read-only database, and the log's state flapping with every two polls at once).
        self._failed: BaseException | None = None

    def missing(self, dispatches: bool = False) -> tuple[list[str], list[str]] | None:
        """(what is missing, the GRANT statements that give it); both empty when granted; None when a probe under
        way outlived ``wait_s`` and there is no verdict yet."""
        if self.sqlite:
            return [], []
        kept = self._verdicts.get(dispatches)
        if kept is not None and self.clock() - kept[0] < self.ttl_s:  # a fresh verdict: no wait behind a probe
            return kept[1], kept[2]
        # An old verdict: asked again by the first poll to get the lock, the others answer it at once (no thread
        # held waiting). None yet: a short bounded wait, under Kubernetes' 1 s probe timeout.
        got = self._asking.acquire(blocking=False) if kept is not None else self._asking.acquire(timeout=self.wait_s)
        if not got:
            return self._while_probing(dispatches)
        try:
            return self._missing(dispatches)
        finally:
            self._asking.release()

    def _while_probing(self, dispatches: bool) -> tuple[list[str], list[str]] | None:
        failed = self._failed
        if failed is not None:
            raise failed
        kept = self._verdicts.get(dispatches)
        # A probe start no later than the verdict is the verdict's own probe, and none (the last one ended, answered
        # or failed) is none under way: the poll holding the lock has not recorded its start yet, so it has just
        # begun (else a previous probe's start, a TTL ago, said "slow")
        begun = self._probe_started
        started = begun if begun is not None and (kept is None or begun > kept[0]) else self.clock()
        running_s = self.clock() - started
        slow = kept is None or running_s >= self.slow_s  # (two polls meeting a 25 ms probe: nothing to say)
        if slow and self._slow_said != self._probes:  # once per probe that hangs, not at every poll behind it
            self._slow_said = self._probes
            log.warning("readyz_privilege_probe_slow", waited_s=self.wait_s if kept is None else 0,
                        probe_running_s=round(running_s, 3),
                        answered="the last verdict" if kept is not None else "privileges unknown (not ready)",
                        hint="the database answers the privileges probe slowly or not at all (a hung catalog read, "
                             "a connection pool with none to give): check the database and its locks")
        return (kept[1], kept[2]) if kept is not None else None

    def _missing(self, dispatches: bool) -> tuple[list[str], list[str]]:
        now = self.clock()
        kept = self._verdicts.get(dispatches)
        if kept is not None and now - kept[0] < self.ttl_s:
            return kept[1], kept[2]
        from clerk_sync.migrations._privileges import DELIVERIES, DISPATCHER, missing_privileges

        self._probes += 1
        self._probe_started = now
        try:
            with self.store.connect() as conn:
                found = missing_privileges(conn, self.store.mapping,
                                           frozenset({DELIVERIES, DISPATCHER} if dispatches else {DELIVERIES}))
        except Exception as exc:
            self._failed = exc
            raise
        finally:
            self._probe_started = None  # (a failed probe is not one under way: its start said "slow" a TTL later)
        self._failed = None
        self._verdicts[dispatches] = (now, found.needed, found.grants)
        said = tuple(found.needed)
        if said != self._said.get(dispatches, ()):  # the log says what, and the GRANTs (not for the asker)
            if said:
                log.warning("readyz_privileges_missing", needed="; ".join(found.needed),
                            grants=" ".join(found.grants))
            else:
                log.info("readyz_privileges_granted")
        self._said[dispatches] = said
        return found.needed, found.grants


def _missing_tables(store: Store) -> list[str]:
    """:func:`~clerk_sync.migrations._privileges.missing_tables`, a read (SQLite: no write lock)."""
    try:
        with store.engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as conn:
            return missing_tables(conn)
    except SQLAlchemyError as exc:
        raise store_error(exc) from exc


def _service_routes(processor: WebhookProcessor, migration: StartupMigration | None,
                    committer: GroupCommitter | None, read_timeout_s: float) -> Sequence[BaseRoute]:
    store = processor.store
    privileges = _RolePrivileges(store)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    said = _SaidOnChange()

    async def readyz(request: Request) -> Response:
        dispatches = bool(getattr(request.app.state, "clerk_sync_dispatches", False))

        def check() -> dict[str, Any]:
            store.ping()
            try:
                at, _ = migrations.schema_state(store.engine)
            except SQLAlchemyError as exc:  # went down between the two queries, or its table may not be read
                raise store_error(exc) from exc
            # Newer: a newer release migrated it (a rolling deploy): this one runs on that schema, so ready.
            state: dict[str, Any] = {"database": "ok", "migrations_current": at != "behind"}
            if at != "behind" and migration is not None:
                migration.healed()  # refused before, migrated by the owner since: deliveries taken from now on
            if at == "newer":
                state["migrations"] = "newer than this release"
            if at == "current":
                gone = _missing_tables(store)
                if gone:  # a partial restore, a table dropped: every delivery fails while the version says current
                    state |= {"migrations_current": False, "tables_missing": gone}
                    return state
            if at != "behind":
                try:
                    verdict = privileges.missing(dispatches)
                except (SQLAlchemyError, StoreError) as exc:
                    if _read_only(exc.__cause__ if isinstance(exc, StoreError) else exc):
                        state["database"] = _READ_ONLY  # a standby, a read-only role: up, but no delivery written
                        return state
                    if isinstance(exc, StoreError):
                        raise
                    raise store_error(exc) from exc
                if verdict is None:  # a probe under way outlived its wait, and none has answered yet
                    state["privileges"] = "unknown"
                elif verdict[0]:
                    state["privileges"] = "missing"
            return state

        ticket = said.ticket()
        try:
            state = await to_thread.run_sync(check)
        except StorePrivilegeMissing as exc:  # reached, but a read of the schema version or the probe was refused
            said.warning(ticket, "readyz_read_refused", error=str(exc))  # (the cause: what, and the GRANT advice)
            state = {"database": "ok", "privileges": "missing",
                     "hint": "the database refused a read this check needs for a privilege the role lacks: "
                             "`clerk-sync doctor` run as this role prints the GRANT statements (the service's log "
                             "says which: readyz_read_refused)"}
            return JSONResponse(state, status_code=503)
        except StoreError as exc:
            # The driver's message (host, port, role names) goes to the log, not to whoever asks /readyz.
            said.warning(ticket, "readyz_database_down", error=str(exc))
            state = {"database": "down", "error": "the database did not answer (the service's log says why)"}
            if migration is not None and migration.refused is not None:
                state["hint"] = migration.refused_hint()
            elif migration is not None and not migration.done:
                state["hint"] = "migrations will run as soon as the database answers"
            return JSONResponse(state, status_code=503)
        waiting = migration is not None and migration.pending() is not None  # (deliveries answered 503)
        code = (200 if state["migrations_current"] and not waiting and "privileges" not in state
                and state["database"] == "ok" else 503)
        if state["database"] == _READ_ONLY:
            said.warning(ticket, "readyz_database_read_only")
            state["hint"] = "DATABASE_URL points at a standby or a read-only role: deliveries cannot be written"
        elif state.get("privileges") == "unknown":
            state["hint"] = ("the database has not answered the privileges probe yet (the service's log says more: "
                             "readyz_privilege_probe_slow); ask again")
        elif "privileges" in state:
            state["hint"] = ("the database role lacks a privilege the service needs: `clerk-sync doctor` prints the "
                             "GRANT statements (the service's log names them too)")
        elif "tables_missing" in state:
            state["hint"] = f"missing tables: {', '.join(state['tables_missing'])}; {MISSING_TABLES_ADVICE}"
        elif code != 200:
            if migration is not None and migration.refused is not None:
                state["hint"] = migration.refused_hint()
            else:
                pending = migration is not None and not migration.done
                state["hint"] = "migrating in the background" if pending else "run `clerk-sync migrate`"
        if state["database"] == "ok":
            said.ended(ticket)  # (the database answers again: a state that begins anew is logged anew)
        return JSONResponse(state, status_code=code)

    async def metrics(_: Request) -> Response:
        # Off the event loop: rendering reads the database (cached freshness series).
        return Response(await to_thread.run_sync(processor.metrics.render), media_type=CONTENT_TYPE_LATEST)

    not_ready = migration.gate if migration is not None else None
    webhook = webhook_endpoint(processor, not_ready=not_ready, committer=committer, read_timeout_s=read_timeout_s)
    return [
        *(Route(path, webhook, methods=["POST"]) for path in with_and_without_slash("/webhooks/clerk")),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]


def create_app(settings: Settings, processor: WebhookProcessor | None = None, *, migrate: bool = False) -> Starlette:
    """The standalone sync service (``clerk-sync serve``): the routes, database-backed freshness series on
    ``/metrics``, and retention (``prune``) every ``CLERK_SYNC_PRUNE_INTERVAL_S`` (0: never).
    ``migrate=True`` applies migrations in the background from start-up on (:class:`StartupMigration`),
    so the service starts while the database is down. The operator console is at ``/console`` when
    ``CLERK_SYNC_CONSOLE`` is set."""
    processor = processor or build_processor(settings)
    processor.metrics.watch_database(database_probe(processor.store))
    retention = Retention(processor.store, RetentionPolicy.from_settings(settings), metrics=processor.metrics)
    schedule = PruneSchedule(retention, settings.prune_interval_s)
    migration = StartupMigration(processor.store.engine) if migrate else None
    committer = GroupCommitter(processor) if settings.group_commit else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            # The first attempt before serving (ready from the first request when the database is
            # up); the retries behind it, while serving.
            if migration is not None and not await migration.attempt():
                tasks.start_soon(migration.retry)
            async with schedule.lifespan(app):
                yield
            tasks.cancel_scope.cancel()
        try:
            if committer is not None:  # what is queued is written (and answered) before the process ends
                await to_thread.run_sync(committer.close)
        finally:
            try:
                processor.flush_summary()
            finally:
                processor.metrics.close()  # serve --workers: this worker's live gauges leave the sums

    routes = list(_service_routes(processor, migration, committer, settings.webhook_read_timeout_s))
    if settings.console_enabled:
        from clerk_sync.integrations.console import create_console

        routes.append(Mount("/console", app=create_console(processor.store, settings, metrics=processor.metrics)))
    # POST /webhooks/clerk skips the router and Starlette's Request/Response (WebhookFastPath).
    fast = Middleware(WebhookFastPath, processor=processor, committer=committer,
                      not_ready=migration.gate if migration is not None else None,
                      read_timeout_s=settings.webhook_read_timeout_s)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[fast],
                    exception_handlers={HTTPException: _routing_error})
    app.state.clerk_sync_migration = migration  # (serve stops itself on a migration refused for good: on_refused)
    return app


async def _routing_error(request: Request, exc: Exception) -> Response:
    """The router's 404/405 in the service's error shape (``{"error", "message"}``), as every other answer,
    not Starlette's plain text; a 405 keeps its ``Allow`` header."""
    status, detail = getattr(exc, "status_code", 500), getattr(exc, "detail", "")  # (registered for HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return JSONResponse({"error": code, "message": f"{request.method} {request.url.path}: {detail}"},
                        status_code=status, headers=getattr(exc, "headers", None))


class PruneSchedule:
    """Runs :meth:`Retention.prune` now and then every ``interval_s`` while the app is up.

    Every replica runs it: prune batches skip rows another replica holds, so they share the work.
    A failed pass is logged and counted (``clerk_sync_db_errors_total{operation="prune"}``), never fatal.
    """

    def __init__(self, retention: Retention, interval_s: float) -> None:
        self.retention = retention
        self.interval_s = interval_s
        self.passes = 0

    def run_once(self) -> PruneReport | None:
        try:
            report = self.retention.prune()
        except StoreError as exc:
            log.warning("prune_failed", reason=str(exc))
            if self.retention.metrics is not None:
                self.retention.metrics.db_errors.labels(operation="prune").inc()
            return None
        except Exception:  # a bug must not take the webhook service down with it; the next pass retries
            log.exception("prune_crashed")
            return None
        finally:
            self.passes += 1
        log.info("pruned", redacted=report.redacted, deleted=report.deleted, cleared=report.cleared,
                 erased=report.erased, settling=report.settling, audit_ips=report.audit_ips)
        return report

    async def _loop(self) -> None:
        while True:
            await to_thread.run_sync(self.run_once)
            await anyio.sleep(self.interval_s)

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        if self.interval_s <= 0:
            yield
            return
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._loop)
            yield
            tasks.cancel_scope.cancel()


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` (multi-worker ``serve``): settings from the environment;
    ``CLERK_SYNC_MIGRATE_ON_START=1`` (set by ``serve --migrate``) migrates in the background."""
    settings = Settings.from_env()
    return create_app(settings, migrate=settings.migrate_on_start)
