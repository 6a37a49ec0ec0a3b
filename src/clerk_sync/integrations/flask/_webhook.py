"""The webhook blueprint: ``POST /webhooks/clerk`` into ``WebhookProcessor.process``, as the service answers."""

from __future__ import annotations

import structlog
from flask import Blueprint, Response, jsonify, request

from clerk_sync.errors import PayloadTooLarge, StoreError, WebhookError
from clerk_sync.integrations.flask._core import clerk_state, error_json
from clerk_sync.integrations.http import delivery_answer

__all__ = ["read_limited_body", "webhook_blueprint"]

log = structlog.get_logger("clerk_sync.http")
_CHUNK = 64 * 1024


def read_limited_body(limit: int) -> bytes:
    """The request body, refused (413) before it is read in full when it is larger than ``limit``.

    An empty stream falls back to ``request.get_data()``: an app's ``before_request`` that read the body
    first (a logging hook, ``request.get_json()``) leaves the stream consumed but the body cached, and every
    delivery was refused as unsigned (401) until Svix gave up. (The processor checks that copy's size.)
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body is {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while chunk := request.stream.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks) if chunks else request.get_data()


def receive() -> Response:
    """Signature-checked, so it is public; deliveries refused here write nothing."""
    processor = clerk_state().processor
    assert processor is not None  # the blueprint is registered only with a processor
    headers = {k.lower(): v for k, v in request.headers.items()}
    # Unverified, but it correlates every log line of this delivery (refusals included).
    claimed = headers.get("svix-id") or headers.get("webhook-id")
    with structlog.contextvars.bound_contextvars(svix_id=claimed):
        try:
            outcome = processor.process(headers, read_limited_body(processor.max_body_bytes))
        except (WebhookError, StoreError) as exc:
            processor.refused(exc, claimed)  # logged and counted as the other frameworks' endpoints do
            return error_json(exc)
    return jsonify(delivery_answer(outcome.svix_id, outcome.status, outcome.error))


def webhook_blueprint(path: str = "/webhooks/clerk") -> Blueprint:
    """A blueprint named ``clerk_sync`` with ``POST path`` (endpoint ``clerk_sync.webhook``).

    :class:`~clerk_sync.integrations.flask.ClerkSync` registers it; with CSRF protection (Flask-WTF),
    exempt it, or every delivery is refused (400): ``csrf.exempt(app.blueprints["clerk_sync"])``.
    """
    blueprint = Blueprint("clerk_sync", __name__)
    # strict_slashes off: a Dashboard URL entered with a trailing slash is served too (Svix follows no redirect)
    blueprint.add_url_rule(path, "webhook", receive, methods=["POST"], strict_slashes=False)
    return blueprint
