"""Emulator-only routes under ``/_emulator`` (secret key required) and the public JWKS.

These stand in for things Clerk does outside the Backend API (a user following a sign-in
or impersonation link, signing out, the Dashboard's replay button) and expose the knobs.

========================================  ===========================================================
``GET  /_emulator/state``                 record counts, knobs, webhook URL (paused?), signing kid
``GET  /_emulator/faults``                current fault knobs
``POST /_emulator/faults``                change knobs: ``{"latency_s": .2, "outage": true, ...}``
``POST /_emulator/webhook``               ``{"url": "http://..."}`` (``null`` pauses deliveries: held, sent
                                          in order at the next URL; reset drops them)
``POST /_emulator/webhook/rotate_secret``  ``{"secret"?, "grace_s"?}``: sign with a new secret (returned), the
                                          old one too for grace_s (Svix: 24 h): ``v1,<new> v1,<old>``
``GET  /_emulator/deliveries``            delivery log (``?include_payload=true`` adds bodies)
``POST /_emulator/deliveries/replay``     ``{"message_ids": [...]}`` and/or ``{"status": "failed"}``
``POST /_emulator/keys/rotate``           new signing key; the old one stays in the JWKS (grace);
                                          ``?keep_kid=true``: under the same kid, replacing it
``POST /_emulator/reset``                 forget all data and messages, restore configured knobs (the
                                          webhook URL stays the last one set; a pause ends,
                                          its held messages dropped)
``POST /_emulator/seed``                  ``{"users": 10, "organizations": 3}`` demo data
``POST /_emulator/bulk_users``            ``{"count": 100000}`` users without webhooks
``PUT  /_emulator/session_token_template``  claims template for session tokens (or ``null``)
``POST /_emulator/actor_tokens/{id}/accept``    impersonated session + token carrying ``act``
``POST /_emulator/sign_in_tokens/{id}/accept``  session (+ token) from a sign-in token
``POST /_emulator/sessions``             ``{"user_id", "active_organization_id"?, "pending"?}``: a user
                                          signs in (``pending``: must still choose an organization);
                                          session + token
``POST /_emulator/sessions/{id}/end``     user signs out: ``session.ended``
``POST /_emulator/sessions/{id}/remove``  session removed: ``session.removed``
``POST /_emulator/users/{id}/deprovision``  SCIM: the IdP removed the user (``{"deprovisioned": false}``
                                          restores): ``user.updated`` with ``deprovisioned``; no sign-in
``POST /_emulator/lockout``               ``{"duration_s": 600}`` (``null``: locks never expire): how long
                                          ``POST /v1/users/{id}/lock`` locks (default one hour; reset restores)
``GET  /.well-known/jwks.json``           Frontend-API JWKS (public, no key needed)
========================================  ===========================================================
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import sessions, users
from .core import Emulator
from .delivery import SECRET_ROTATION_GRACE_S
from .endpoints import admin_endpoint, base_url, bool_param, emulator_of, json_body
from .errors import ClerkAPIError

__all__ = ["admin_routes"]


def _state(emulator: Emulator) -> dict[str, Any]:
    log = emulator.delivery.log()
    statuses: dict[str, int] = {}
    for message in log:
        statuses[message["status"]] = statuses.get(message["status"], 0) + 1
    return {
        "instance_id": emulator.config.instance_id,
        "records": emulator.store.summary(),
        "faults": emulator.faults.settings.as_dict(),
        "webhook_url": emulator.delivery.url,
        "webhook_paused": emulator.delivery.paused,  # set_webhook_url(None): messages held until the next URL
        "deliveries": statuses,
        "deliveries_idle": emulator.delivery.is_idle(),
        "signing_kid": emulator.keys.current_kid,
    }


async def state(request: Request) -> Any:
    return _state(emulator_of(request))


async def get_faults(request: Request) -> Any:
    return emulator_of(request).faults.settings.as_dict()


async def set_faults(request: Request) -> Any:
    return emulator_of(request).faults.update(await json_body(request)).as_dict()


async def set_webhook(request: Request) -> Any:
    body = await json_body(request)
    url = body.get("url")
    if url is not None and not isinstance(url, str):
        raise ValueError("url must be a string or null")
    emulator_of(request).set_webhook_url(url)
    return {"webhook_url": url}


async def rotate_webhook_secret(request: Request) -> Any:
    """``{"secret"?: "whsec_..", "grace_s"?: 86400}``: the new secret signs, the old one too for ``grace_s``."""
    body = await json_body(request)
    secret, grace = body.get("secret"), body.get("grace_s", SECRET_ROTATION_GRACE_S)
    if secret is not None and not isinstance(secret, str):
        raise ValueError("secret must be a whsec_ string, or omitted for a fresh one")
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
        raise ValueError("grace_s must be a number of seconds, at least 0")
    return {"secret": emulator_of(request).rotate_webhook_secret(secret, grace_s=float(grace))}


async def deliveries(request: Request) -> Any:
    include = bool(bool_param(request, "include_payload"))
    return {"data": emulator_of(request).delivery.log(include_payload=include)}


async def replay(request: Request) -> Any:
    body = await json_body(request)
    ids = body.get("message_ids")
    replayed = emulator_of(request).delivery.replay(ids, status=body.get("status"))
    return {"replayed": replayed}


async def rotate_keys(request: Request) -> Any:
    emulator = emulator_of(request)
    kid = emulator.keys.rotate(keep_kid=request.query_params.get("keep_kid") in ("1", "true"))
    return {"kid": kid, "jwks": emulator.keys.jwks()}


async def reset(request: Request) -> Any:
    emulator = emulator_of(request)
    emulator.reset()
    return _state(emulator)


async def seed(request: Request) -> Any:
    body = await json_body(request)
    return emulator_of(request).seed_demo(int(body.get("users", 10)), int(body.get("organizations", 3)))


async def bulk_users(request: Request) -> Any:
    body = await json_body(request)
    return {"created": emulator_of(request).bulk_create_users(int(body.get("count", 0)))}


async def set_template(request: Request) -> Any:
    raw = await request.body()
    body = None if raw.strip() in {b"", b"null"} else await json_body(request)
    emulator_of(request).session_token_template = body
    return {"session_token_template": body}


def _with_token(request: Request, session: dict[str, Any]) -> dict[str, Any]:
    emulator = emulator_of(request)
    jwt = emulator.session_token(session["id"], issuer=emulator.issuer(base_url(request)))
    return {"object": "session_with_token", "session": session, "jwt": jwt}


async def accept_actor_token(request: Request) -> Any:
    store = emulator_of(request).store
    return _with_token(request, sessions.accept_actor_token(store, request.path_params["token_id"]))


async def accept_sign_in_token(request: Request) -> Any:
    store = emulator_of(request).store
    return _with_token(request, sessions.accept_sign_in_token(store, request.path_params["token_id"]))


async def sign_in(request: Request) -> Any:
    body = await json_body(request)
    user_id, org_id, pending = body.get("user_id"), body.get("active_organization_id"), body.get("pending", False)
    if not isinstance(user_id, str):
        raise ClerkAPIError.missing("user_id")
    if not isinstance(pending, bool):
        raise ClerkAPIError.invalid("pending", "pending must be a boolean")
    store = emulator_of(request).store
    return _with_token(request, sessions.create_session(store, user_id, organization_id=org_id, pending=pending))


async def deprovision(request: Request) -> Any:
    """What SCIM Directory Sync does when the IdP removes a user: ``user.updated`` with ``deprovisioned: true``
    (not ``user.deleted``); the user may no longer sign in."""
    raw = await request.body()
    body = await json_body(request) if raw.strip() else {}
    value = body.get("deprovisioned", True)
    if not isinstance(value, bool):
        raise ClerkAPIError.invalid("deprovisioned", "deprovisioned must be a boolean")
    return users.set_flag(emulator_of(request).store, request.path_params["user_id"], "deprovisioned", value)


async def set_lockout(request: Request) -> Any:
    body = await json_body(request)
    duration = body.get("duration_s")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int | float)
                                 or not duration > 0):
        raise ClerkAPIError.invalid("duration_s", "duration_s must be a positive number of seconds or null")
    store = emulator_of(request).store
    store.lockout_duration_s = None if duration is None else float(duration)
    return {"duration_s": store.lockout_duration_s}


def _end_as(status: str) -> Any:
    async def handler(request: Request) -> Any:
        store = emulator_of(request).store
        return sessions.end_session(store, request.path_params["session_id"], status)

    return handler


async def public_jwks(request: Request) -> Response:
    """FAPI ``/.well-known/jwks.json``: public, not rate limited, unaffected by faults."""
    return JSONResponse(emulator_of(request).keys.jwks())


def _route(path: str, handler: Any, *methods: str) -> Route:
    return Route("/_emulator" + path, admin_endpoint(handler), methods=list(methods))


def admin_routes() -> list[Route]:
    return [
        Route("/.well-known/jwks.json", public_jwks, methods=["GET"]),
        _route("/state", state, "GET"),
        _route("/faults", get_faults, "GET"),
        _route("/faults", set_faults, "POST"),
        _route("/webhook", set_webhook, "POST"),
        _route("/webhook/rotate_secret", rotate_webhook_secret, "POST"),
        _route("/deliveries", deliveries, "GET"),
        _route("/deliveries/replay", replay, "POST"),
        _route("/keys/rotate", rotate_keys, "POST"),
        _route("/reset", reset, "POST"),
        _route("/seed", seed, "POST"),
        _route("/bulk_users", bulk_users, "POST"),
        _route("/session_token_template", set_template, "PUT"),
        _route("/actor_tokens/{token_id}/accept", accept_actor_token, "POST"),
        _route("/sign_in_tokens/{token_id}/accept", accept_sign_in_token, "POST"),
        _route("/sessions", sign_in, "POST"),
        _route("/sessions/{session_id}/end", _end_as("ended"), "POST"),
        _route("/sessions/{session_id}/remove", _end_as("removed"), "POST"),
        _route("/users/{user_id}/deprovision", deprovision, "POST"),
        _route("/lockout", set_lockout, "POST"),
    ]
