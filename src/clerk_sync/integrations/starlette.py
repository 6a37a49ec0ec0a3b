"""Starlette adapter: the webhook endpoint, health/readiness/metrics, and the standalone service app.

Usage in your own app::

    processor = build_processor(Settings.from_env())
    app = Starlette(routes=webhook_routes(processor))
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import structlog
from anyio import CapacityLimiter, to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkSyncError, PayloadTooLarge, StoreError, WebhookError
from clerk_sync.freshness import database_probe
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.http import error_response
from clerk_sync.metrics import CONTENT_TYPE_LATEST
from clerk_sync.retention import PruneReport, Retention, RetentionPolicy
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier

__all__ = [
    "PruneSchedule",
    "app_from_env",
    "build_processor",
    "create_app",
    "error_json",
    "read_limited_body",
    "webhook_endpoint",
    "webhook_routes",
]

log = structlog.get_logger("clerk_sync.http")


def build_processor(settings: Settings, store: Store | None = None) -> WebhookProcessor:
    """Wire the processor from settings; raises ConfigError at start-up, not per request."""
    verifier = WebhookVerifier(settings.webhook_secrets(), tolerance_s=settings.webhook_tolerance_s)
    return WebhookProcessor(
        store or Store.from_url(settings.sqlalchemy_url()),
        verifier,
        instance_id=settings.instance_id,
        max_body_bytes=settings.max_body_bytes,
        log_level=settings.delivery_log_level,
    )


def error_json(exc: ClerkSyncError) -> JSONResponse:
    """A clerk-sync error as Starlette answers it (the status and headers come from :mod:`.http`)."""
    answer = error_response(exc)
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


async def read_limited_body(request: Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes; refuse larger bodies before reading them in full."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def webhook_endpoint(processor: WebhookProcessor, *, threads: int = 4) -> Any:
    """An ASGI endpoint for ``POST /webhooks/clerk``.

    ``threads`` caps concurrent deliveries in the thread pool: the work is GIL-bound, and more
    threads than that only queue for the GIL (and lengthen the latency tail).
    """
    limiters: list[CapacityLimiter] = []  # created on first use, inside the event loop

    async def endpoint(request: Request) -> Response:
        # Unverified, but it correlates every log line of this delivery (refusals included).
        claimed = request.headers.get("svix-id") or request.headers.get("webhook-id")
        with structlog.contextvars.bound_contextvars(svix_id=claimed):
            return await _handle(request)

    async def _handle(request: Request) -> Response:
        try:
            body = await read_limited_body(request, processor.max_body_bytes)
            # The store is synchronous (SQLAlchemy Core): run it off the event loop.
            outcome = await to_thread.run_sync(processor.process, dict(request.headers), body,
                                               limiter=_limiter(limiters, threads))
        except WebhookError as exc:
            log.info("webhook_refused", code=exc.code, reason=str(exc))
            processor.metrics.refused.labels(code=exc.code).inc()
            return error_json(exc)
        except StoreError as exc:
            log.warning("webhook_store_error", reason=str(exc))
            processor.metrics.db_errors.labels(operation="webhook").inc()
            processor.metrics.unavailable.inc()
            return error_json(exc)
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse({"status": outcome.status, "svix_id": outcome.svix_id})

    return endpoint


def _limiter(holder: list[CapacityLimiter], threads: int) -> CapacityLimiter:
    if not holder:
        holder.append(CapacityLimiter(threads))
    return holder[0]


def webhook_routes(processor: WebhookProcessor, path: str = "/webhooks/clerk") -> list[BaseRoute]:
    """The webhook route alone, for apps that mount it themselves."""
    return [Route(path, webhook_endpoint(processor), methods=["POST"])]


def _service_routes(processor: WebhookProcessor) -> Sequence[BaseRoute]:
    store = processor.store

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        def check() -> dict[str, Any]:
            store.ping()
            return {"database": "ok", "migrations_current": migrations.is_current(store.engine)}

        try:
            state = await to_thread.run_sync(check)
        except StoreError as exc:
            return JSONResponse({"database": "down", "error": str(exc)}, status_code=503)
        code = 200 if state["migrations_current"] else 503
        if code != 200:
            state["hint"] = "run `clerk-sync migrate`"
        return JSONResponse(state, status_code=code)

    async def metrics(_: Request) -> Response:
        # Off the event loop: rendering reads the database (cached freshness series).
        return Response(await to_thread.run_sync(processor.metrics.render), media_type=CONTENT_TYPE_LATEST)

    return [
        *webhook_routes(processor),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]


def create_app(settings: Settings, processor: WebhookProcessor | None = None) -> Starlette:
    """The standalone sync service (``clerk-sync serve``): the routes, database-backed freshness
    series on ``/metrics``, and retention (``prune``) every ``CLERK_SYNC_PRUNE_INTERVAL_S`` (0: never)."""
    processor = processor or build_processor(settings)
    processor.metrics.watch_database(database_probe(processor.store))
    retention = Retention(processor.store, RetentionPolicy.from_settings(settings), metrics=processor.metrics)
    schedule = PruneSchedule(retention, settings.prune_interval_s)
    return Starlette(routes=list(_service_routes(processor)), lifespan=schedule.lifespan)


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
        log.info("pruned", redacted=report.redacted, deleted=report.deleted, cleared=report.cleared)
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
    """Factory for ``uvicorn --factory`` (multi-worker ``serve``): settings from the environment."""
    return create_app(Settings.from_env())
