"""The second service, in any language in real life: it receives the app's changes signed with
Standard Webhooks (``webhook-id`` / ``-timestamp`` / ``-signature``) and keeps a customer list."""

from __future__ import annotations

from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_billing(secret: str) -> Starlette:
    customers: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    verifier = Webhook(secret)

    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            message = verifier.verify(body, dict(request.headers))
        except WebhookVerificationError:
            return Response(status_code=400)
        if message["idempotency_key"] in seen:  # at-least-once delivery: deduplicate
            return Response(status_code=204)
        seen.add(message["idempotency_key"])
        data = message["data"]
        if data["kind"] == "deleted":
            customers.pop(data["clerk_id"], None)
        else:
            customers[data["clerk_id"]] = {"email": data["values"]["email"], "role": data["values"]["role"]}
        return Response(status_code=204)

    async def list_customers(_: Request) -> Response:
        return JSONResponse(customers)

    return Starlette(routes=[Route("/clerk-changes", receive, methods=["POST"]),
                             Route("/customers", list_customers)])
