"""The webhook endpoint as a Django view: the same core and statuses as the standalone service.

It is a plain sync view, so under WSGI no event loop is involved; under ASGI Django runs it in a
worker thread. Bodies over ``CLERK_SYNC_MAX_BODY_BYTES`` are refused from ``Content-Length`` or while
reading, before they are held in full.
"""

from __future__ import annotations

import json

import structlog
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import (
    ClerkSyncError,
    ConfigError,
    PayloadTooLarge,
    StoreError,
    WebhookError,
    database_message,
)
from clerk_sync.integrations.django.request import clerk_request
from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.integrations.http import delivery_answer, error_response

__all__ = ["error_json", "read_limited_body", "sync_me", "webhook"]

log = structlog.get_logger("clerk_sync.http")


def error_json(exc: ClerkSyncError) -> JsonResponse:
    """A clerk-sync error as Django answers it (status and headers from the one table in ``http.py``)."""
    answer = error_response(exc)
    response = JsonResponse(answer.body, status=answer.status)
    for name, value in answer.headers.items():
        response[name] = value
    return response


def read_limited_body(request: HttpRequest, limit: int) -> bytes:
    """At most ``limit`` bytes of the body; a larger one is refused without reading it all."""
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {declared} bytes, the limit is {limit}")
    body = _chunked_wsgi_body(request, limit) if not declared else None
    if body is None:
        body = request.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
    return body


def _chunked_wsgi_body(request: HttpRequest, limit: int) -> bytes | None:
    """A chunked body (no Content-Length) under WSGI, where Django reads the body as empty (its stream is capped
    at CONTENT_LENGTH, 0 when absent): every signed delivery a proxy forwarded chunked was refused as forged.
    Read from the server's own stream when it says the body ends there (``wsgi.input_terminated``: gunicorn,
    werkzeug), refused with what to do otherwise; None: not such a request (ASGI reads chunked bodies itself)."""
    meta = request.META
    if "chunked" not in request.headers.get("Transfer-Encoding", "").lower() or "wsgi.input" not in meta:
        return None
    if not meta.get("wsgi.input_terminated"):
        raise WebhookError("a chunked body (no Content-Length) cannot be read under this WSGI server (it does not "
                           "set wsgi.input_terminated): have the proxy send Content-Length, or serve the app with "
                           "gunicorn or under ASGI")
    return bytes(meta["wsgi.input"].read(limit + 1))


@csrf_exempt  # authenticated by its Svix signature, not by a browser session
@login_not_required  # nor by a Django login: LoginRequiredMiddleware would redirect it, and Svix follows none
@require_POST
def webhook(request: HttpRequest) -> HttpResponse:
    """``POST``: verify, store and apply one Clerk delivery (``{"status": ..., "svix_id": ...}``)."""
    claimed = request.headers.get("svix-id") or request.headers.get("webhook-id")
    with structlog.contextvars.bound_contextvars(svix_id=claimed):
        runtime = get_clerk_sync()
        try:
            processor = runtime.processor
        except ConfigError as exc:
            log.error("webhook_misconfigured", reason=str(exc))
            return error_json(exc)
        try:
            body = read_limited_body(request, processor.max_body_bytes)
            outcome = processor.process(dict(request.headers), body)
        except (WebhookError, StoreError) as exc:
            # logged and counted as the other frameworks' endpoints do; a missing table names the database
            processor.refused(runtime.naming_database(exc), claimed)
            return error_json(exc)
        if outcome.status == DeliveryStatus.APPLIED and outcome.event_type.startswith("user."):
            _refresh_django_user(body)
    return JsonResponse(delivery_answer(outcome.svix_id, outcome.status, outcome.error))


def _refresh_django_user(body: bytes) -> None:
    """After a committed apply of a ``user.*`` delivery: the linked Django user in step with the row now
    (:func:`~.backends.refresh_django_user`: a deleted or banned admin is no live superuser in ``auth_user`` until
    their next request). Only with ``ClerkBackend`` configured (it made those users). The delivery is stored and
    applied whatever happens here: a failure is logged, and the next request or ``prune`` brings the user in step."""
    from clerk_sync.integrations.django.backends import refresh_django_user, uses_clerk_backend

    if not uses_clerk_backend():
        return

    clerk_id = None
    try:
        data = json.loads(body).get("data")
        clerk_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(clerk_id, str) and clerk_id:
            refresh_django_user(clerk_id)
    except Exception as exc:  # (the delivery is applied: its answer stays 200)
        log.error("django_user_refresh_failed", clerk_id=clerk_id, error=type(exc).__name__,
                  cause=database_message(exc.__cause__ or exc),  # (first line, quoted values out: no address)
                  fix="its next request, or manage.py clerk_sync prune, brings the Django user in step")


webhook.clerk_public = True  # type: ignore[attr-defined]  # signed deliveries carry no session


# A JSON endpoint for the front end: Django's CSRF token is not what it sends, and clerk-sync's own Origin check
# (in clerk_request) refuses a cross-site POST riding on the __session cookie, as on every face.
@csrf_exempt
@require_POST
def sync_me(request: HttpRequest) -> HttpResponse:
    """``POST``: Flow A, the front end calls it right after sign-up so the user's row exists before the
    ``user.created`` webhook (one Clerk fetch a user per ``CLERK_SYNC_JIT_REFRESH_INTERVAL_S``, the webhook's
    guarded upsert): ``{"user_id", "email", "role"}``. Route it yourself, signed-in users only by its own
    check: ``path("sync/me", sync_me)`` (FastAPI's ``sync_me_router``, Flask's ``sync_me_path``)."""
    try:
        auth = clerk_request(request).require_auth()
        jit = get_clerk_sync().jit
        if jit is None:
            raise ConfigError(f"{request.path} fetches the signed-in user from Clerk: set "
                              "CLERK_SYNC['CLERK_SECRET_KEY'] (and keep JIT on)")
        user = jit.refresh_user(auth.user_id)
    except ClerkSyncError as exc:
        return error_json(exc)
    return JsonResponse({"user_id": user.clerk_id, "email": user.email, "role": user.role})
