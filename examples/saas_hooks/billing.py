"""The second service, in any language in real life: it receives the app's changes signed with
Standard Webhooks (``webhook-id`` / ``-timestamp`` / ``-signature``) and keeps a customer list.

Delivery is at least once: a message answered with an error (or not answered) is sent again with the
same ``webhook-id``. So a message is recorded as seen only once it has been handled: one whose handling
failed (500) is handled again on the retry, not answered 204 as a duplicate and lost. With a database,
write the seen id in the same transaction as the change it applies.

Order is kept per object only, and not after a failure: a change that went dead (410, or every retry failed)
no longer holds its object back, so ``clerk-sync hooks retry`` delivers it after newer ones, say a
``user.created`` after the ``user.deleted``. So the service keeps, per Clerk id, the last version it applied
(a deletion's included: a tombstone) and ignores a change with an older one. With a database, a column
beside the row (kept on the deleted row, or in a table of tombstones) written in the same transaction."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_billing(secret: str, customers: MutableMapping[str, dict[str, Any]] | None = None) -> Starlette:
    """The service; ``customers`` is its store (a dict unless given: a test passes one that fails)."""
    if customers is None:
        customers = {}
    seen: set[str] = set()
    applied: dict[str, tuple[int, bool]] = {}  # Clerk id -> (the version last applied, whether it deleted)
    verifier = Webhook(secret)

    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            message = verifier.verify(body, dict(request.headers))
        except WebhookVerificationError:
            return Response(status_code=400)
        key = message["idempotency_key"]
        if key in seen:  # at-least-once delivery: a message already handled is a duplicate
            return Response(status_code=204)
        data = message["data"]
        clerk_id, version, deleted = data["clerk_id"], data["version"], data["kind"] == "deleted"
        last = applied.get(clerk_id)
        if last is not None and (version < last[0] or (version == last[0] and last[1])):
            # Older than what we hold (a retried change arriving late): handled, nothing to do. A deletion
            # wins a tie; a change of the same version as an applied one is that state again.
            seen.add(key)
            return Response(status_code=204)
        if deleted:
            customers.pop(clerk_id, None)
        elif data.get("redacted"):  # queued before its user was erased: nothing of theirs left to keep (their
            pass  # deletion follows); reading values["email"] would fail it until it died, holding later ones
        else:  # an exception here answers 500: the sink retries, and the message is not yet seen
            customers[clerk_id] = {"email": data["values"]["email"], "role": data["values"]["role"]}
        applied[clerk_id] = (version, deleted)
        seen.add(key)  # only now: handled (no await in between, so no other request interleaves)
        return Response(status_code=204)

    async def list_customers(_: Request) -> Response:
        return JSONResponse(customers)

    return Starlette(routes=[Route("/clerk-changes", receive, methods=["POST"]),
                             Route("/customers", list_customers)])
