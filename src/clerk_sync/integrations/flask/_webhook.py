"""The webhook blueprint: ``POST /webhooks/clerk`` into ``WebhookProcessor.process``, as the service answers."""

from __future__ import annotations

import dataclasses

import structlog
from flask import Blueprint, Response, jsonify, request
from flask.blueprints import BlueprintSetupState

from clerk_sync.errors import ConfigError, PayloadTooLarge, StoreError, WebhookError
from clerk_sync.integrations.flask._core import EXTENSION_KEY, ClerkSyncState, clerk_state, error_json
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
    if processor is None:  # (registering the blueprint builds it: only if the app's state was replaced since)
        raise ConfigError("the webhook has no processor: register webhook_blueprint() after ClerkSync(app)")
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


def webhook_blueprint(path: str = "/webhooks/clerk", *, name: str = "clerk_sync") -> Blueprint:
    """A blueprint named ``name`` with ``POST path`` (endpoint ``<name>.webhook``).

    :class:`~clerk_sync.integrations.flask.ClerkSync` registers it, unless ``webhook_path=None``: then
    register it yourself, after ``ClerkSync(app)`` (or ``init_app``), e.g. under another name when the app
    has a blueprint named ``clerk_sync`` of its own::

        ClerkSync(app, webhook_path=None, deny_by_default=True)
        app.register_blueprint(webhook_blueprint("/webhooks/clerk", name="clerk_webhook"))

    Registering it builds the webhook processor if ``ClerkSync`` did not (a missing
    ``CLERK_WEBHOOK_SIGNING_SECRET`` fails there, at start-up) and makes its endpoint public under
    ``deny_by_default`` (the signature is its check), whatever name it is registered under.
    With CSRF protection (Flask-WTF), exempt it, or every delivery is refused (400):
    ``csrf.exempt(app.blueprints["clerk_sync"])`` (the name it is registered under).
    """
    blueprint = Blueprint(name, __name__)
    # First: a refusal leaves no route behind. strict_slashes off: a Dashboard URL entered with a trailing
    # slash is served too (Svix follows no redirect).
    blueprint.record(_set_up_webhook)
    blueprint.add_url_rule(path, "webhook", receive, methods=["POST"], strict_slashes=False)
    return blueprint


def _set_up_webhook(setup: BlueprintSetupState) -> None:
    """At registration: the app's state gets a processor and this endpoint as public, or the app does not start."""
    app = setup.app
    name = f"{setup.name_prefix}.{setup.name}".lstrip(".")
    try:
        state = app.extensions.get(EXTENSION_KEY)
        if not isinstance(state, ClerkSyncState):
            raise RuntimeError("register webhook_blueprint() after ClerkSync(app) or ClerkSync().init_app(app): "
                               "the webhook needs the app's clerk-sync settings and store")
        endpoint = f"{name}.webhook"
        if state.processor is not None and endpoint in state.public_endpoints:
            return  # ClerkSync's own (webhook_path)
        processor = state.processor
        if processor is None:
            from clerk_sync.integrations.starlette import build_processor

            processor = build_processor(state.settings, state.store)  # ConfigError without the webhook secret
            state.closers.append(processor.flush_summary)
    except Exception:
        if app.blueprints.get(name) is setup.blueprint:  # registered before its callbacks run: a corrected
            del app.blueprints[name]  # retry must not be refused as "already registered"
        raise
    app.extensions[EXTENSION_KEY] = dataclasses.replace(
        state, processor=processor, public_endpoints=state.public_endpoints | {endpoint})
