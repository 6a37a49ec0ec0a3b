"""FastAPI adapter: the same webhook endpoint as the Starlette one, as an ``APIRouter``.

Usage::

    processor = build_processor(Settings.from_env())
    app = FastAPI()
    app.include_router(webhook_router(processor))
"""

from __future__ import annotations

try:
    from fastapi import APIRouter
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("clerk_sync.integrations.fastapi needs FastAPI: pip install 'clerk-sync[fastapi]'") from exc

from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.starlette import build_processor, webhook_endpoint

__all__ = ["build_processor", "webhook_router"]


def webhook_router(processor: WebhookProcessor, path: str = "/webhooks/clerk") -> APIRouter:
    """A router with ``POST path``; signature-checked, so keep it outside your auth dependencies."""
    router = APIRouter()
    router.add_api_route(path, webhook_endpoint(processor), methods=["POST"], include_in_schema=False)
    return router
