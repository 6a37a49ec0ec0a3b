"""Starlette adapter: the webhook endpoint, health/readiness/metrics, and the standalone service app.

Usage in your own app::

    processor = build_processor(Settings.from_env())
    app = Starlette(routes=webhook_routes(processor))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from anyio import CapacityLimiter, to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkSyncError, PayloadTooLarge, StoreError, WebhookError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.http import error_response
from clerk_sync.metrics import CONTENT_TYPE_LATEST
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier

__all__ = [
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
            processor.metrics.events.labels(type="unknown", status=exc.code).inc()
            return error_json(exc)
        except StoreError as exc:
            log.warning("webhook_store_error", reason=str(exc))
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
        return Response(processor.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [
        *webhook_routes(processor),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]


def create_app(settings: Settings, processor: WebhookProcessor | None = None) -> Starlette:
    """The standalone sync service (``clerk-sync serve``), with the console at ``/console`` when
    ``CLERK_SYNC_CONSOLE`` is set."""
    processor = processor or build_processor(settings)
    routes = list(_service_routes(processor))
    if settings.console_enabled:
        from clerk_sync.integrations.console import create_console

        routes.append(Mount("/console", app=create_console(processor.store, settings)))
    return Starlette(routes=routes)


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` (multi-worker ``serve``): settings from the environment."""
    return create_app(Settings.from_env())
