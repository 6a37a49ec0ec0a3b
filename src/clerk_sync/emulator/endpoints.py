"""Request plumbing shared by the Backend API and admin routes.

:func:`bapi_endpoint` wraps a handler with what every real Clerk BAPI call goes through:
added latency, secret-key authentication, the per-key rate limit, outage and random 5xx
faults, and translation of :class:`ClerkAPIError` into Clerk's error body.

A request carrying :data:`HELPER_HEADER` (sent by ``clerk_sync.testing.EmulatorServer``'s helpers, never by
Clerk's SDKs) is a test setting the stage, not the app under test: it is not counted against, nor refused
by, the rate limits, so a test's seeding never spends the budget the app's own calls are measured against.

Query parameters: :data:`ROUTE_PARAMS` lists, per list route, the parameters the spec documents. Those the
emulator cannot honour (it has no web3 wallets or external accounts, ...) answer a 422 naming
them, rather than being ignored and answering every record; the others reach ``users``/``orgs`` through
:data:`~clerk_sync.emulator.users.REQUEST_PARAMS`. Parameters the spec does not know are ignored, as Clerk does.

Per-object limits: Clerk limits some updates per user, organization or membership (10 requests / 10 s, FACTS
§4.4) on top of the instance's limit; :data:`PER_OBJECT_LIMITED` lists the routes the emulator serves.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .core import REQUEST_ORIGIN, Emulator
from .errors import ClerkAPIError
from .users import REQUEST_PARAMS

__all__ = [
    "API_VERSIONS",
    "HELPER_HEADER",
    "PER_OBJECT_LIMITED",
    "ROUTE_PARAMS",
    "Handler",
    "admin_endpoint",
    "api_version",
    "bapi_endpoint",
    "base_url",
    "bool_param",
    "emulator_of",
    "first_param",
    "int_param",
    "json_body",
    "list_param",
]

#: Marks a request from the test helpers (any value): exempt from the rate limit. Emulator only.
HELPER_HEADER = "X-Clerk-Emulator-Helper"
Handler = Callable[[Request], Awaitable[Any]]
Endpoint = Callable[[Request], Awaitable[Response]]

_NO_WALLETS = "the emulator's users have no web3 wallets"
_NO_ACCOUNTS = "the emulator's users have no external (OAuth) accounts"
_USER_FILTERS = {
    "email_address": "", "phone_number": "", "external_id": "", "username": "",
    "web3_wallet": _NO_WALLETS, "user_id": "", "organization_id": "", "query": "", "email_address_query": "",
    "phone_number_query": "", "username_query": "", "name_query": "", "banned": "",
    "last_active_at_before": "", "last_active_at_after": "", "last_active_at_since": "",
    "created_at_before": "", "created_at_after": "", "last_sign_in_at_before": "", "last_sign_in_at_after": "",
    "provider": _NO_ACCOUNTS, "provider_user_id": _NO_ACCOUNTS,
}
_PAGING = {"limit": "", "offset": ""}
_CREATED_AMBIGUOUS = ("the spec does not say whether it compares the user's or the membership's creation time "
                      "(its text says users'), so the emulator cannot answer as Clerk does")
#: ``"METHOD /v1/route"`` -> every query parameter the spec (2026-05-12) documents for it, each with why the
#: emulator cannot honour it ("" when it does). Routes not listed take no filters the emulator ignores.
ROUTE_PARAMS: Mapping[str, Mapping[str, str]] = {
    "GET /v1/users": {**_USER_FILTERS, **_PAGING, "starting_after": "", "order_by": ""},
    "GET /v1/users/count": _USER_FILTERS,
    "GET /v1/organizations": {
        "include_members_count": "", "query": "", "user_id": "", "organization_id": "", "order_by": "", **_PAGING,
        "include_missing_member_with_elevated_permissions":
            "the emulator has no members with elevated permissions outside their organization",
    },
    "GET /v1/organizations/{org_id}/memberships": {
        "order_by": "", "user_id": "", "email_address": "", "phone_number": "", "username": "",
        "web3_wallet": _NO_WALLETS, "role": "", "query": "", "email_address_query": "",
        "phone_number_query": "", "username_query": "", "name_query": "", "last_active_at_before": "",
        "last_active_at_after": "", "created_at_before": _CREATED_AMBIGUOUS, "created_at_after": _CREATED_AMBIGUOUS,
        **_PAGING,
    },
    "GET /v1/organization_memberships": {"order_by": "", **_PAGING},
    "GET /v1/users/{user_id}/organization_memberships": _PAGING,
    "GET /v1/sessions": {"client_id": "", "user_id": "", "status": "", "paginated": "", **_PAGING},
}
# Boolean flags the emulator honours when false (the default) only.
_FLAGS = frozenset({"include_missing_member_with_elevated_permissions"})
#: ``"METHOD /v1/route"`` -> the object Clerk limits it per (FACTS §4.4: "10 req / 10 s per user; same per org for
#: org update/metadata; same per membership for membership update/metadata"), each route its own window.
PER_OBJECT_LIMITED: Mapping[str, str] = {
    "PATCH /v1/users/{user_id}": "user",
    "PATCH /v1/users/{user_id}/metadata": "user",
    "PUT /v1/users/{user_id}/metadata": "user",
    "PATCH /v1/organizations/{org_id}": "organization",
    "PATCH /v1/organizations/{org_id}/metadata": "organization",
    "PUT /v1/organizations/{org_id}/metadata": "organization",
    "PATCH /v1/organizations/{org_id}/memberships/{user_id}": "membership",
    "PATCH /v1/organizations/{org_id}/memberships/{user_id}/metadata": "membership",
}


def emulator_of(request: Request) -> Emulator:
    emulator: Emulator = request.app.state.emulator
    return emulator


def base_url(request: Request) -> str:
    """This server's own URL as the client reached it (no trailing slash)."""
    return str(request.base_url).rstrip("/")


def _check_auth(request: Request, emulator: Emulator) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = emulator.config.secret_key.encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise ClerkAPIError.unauthorized()


#: The Backend API versions Clerk publishes ("Available versions"; 2025-03-12 is a spec release of theirs).
API_VERSIONS = frozenset({"2021-02-05", "2024-10-01", "2025-03-12", "2025-04-10", "2025-11-10", "2026-05-12"})


def api_version(request: Request) -> str | None:
    """The version asked for (``Clerk-API-Version`` header or ``__clerk_api_version`` query; None: neither).

    Clerk refuses both at once, or a version it does not have, as an invalid request (FACTS §4.1); the
    emulator once took any string, so a typo in a client's version passed every test. The status and code
    Clerk answers are not published: 400 ``api_version_invalid`` here."""
    header = request.headers.get("clerk-api-version")
    query = request.query_params.get("__clerk_api_version")
    if header is not None and query is not None:
        raise ClerkAPIError(400, "api_version_invalid", "Give the API version once",
                            "The API version was given both as the Clerk-API-Version header and as the "
                            "__clerk_api_version query parameter: give one of them.")
    version = header if header is not None else query
    if version is not None and version.strip() not in API_VERSIONS:
        raise ClerkAPIError(400, "api_version_invalid", "Invalid API version",
                            f"{version!r} is not a Clerk API version; use one of {', '.join(sorted(API_VERSIONS))}.")
    return None if version is None else version.strip()


def first_param(request: Request, name: str) -> str | None:
    """The FIRST value of a repeated query parameter, as Clerk keeps it ("if multiple order_by parameters are
    provided, we will only keep the first one"); Starlette's ``query_params.get`` gives the last."""
    values = request.query_params.getlist(name)
    return values[0] if values else None


def _check_rate_limit(request: Request, emulator: Emulator) -> None:
    if HELPER_HEADER in request.headers:
        return
    knobs = emulator.faults.settings
    retry_after = emulator.rate_limiter.check(
        emulator.config.secret_key, knobs.rate_limit_requests, knobs.rate_limit_window_s
    )
    if retry_after is not None:
        # Clerk's message, then what sets the emulator's budget (Clerk's development limit by default)
        raise ClerkAPIError(
            429,
            "too_many_requests",
            "Too many requests",
            f"Too many requests, retry later (Clerk emulator: {knobs.rate_limit_requests} Backend API requests "
            f"per {knobs.rate_limit_window_s:g} s; set with EmulatorServer(rate_limit_requests=..., "
            "rate_limit_window_s=...), set_faults(rate_limit_requests=...) or `clerk-sync emulate --rate-limit`)",
            headers={"Retry-After": str(retry_after)},
        )


def _route_key(request: Request) -> str:
    """``"METHOD /v1/route/{param}"``: the route template the request matched."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', request.url.path)}"


def _check_object_rate_limit(request: Request, emulator: Emulator, route: str) -> None:
    kind = PER_OBJECT_LIMITED.get(route)
    limit = emulator.config.object_rate_limit_requests
    if kind is None or limit is None or HELPER_HEADER in request.headers:
        return
    params = request.path_params
    org = emulator.store.slug_index.get(params.get("org_id", ""), params.get("org_id", ""))  # a slug is the org
    target = {"user": params.get("user_id", ""), "organization": org}.get(kind, f"{org}/{params.get('user_id')}")
    window = emulator.config.object_rate_limit_window_s
    retry_after = emulator.object_rate_limiter.check(f"{route} {target}", limit, window)
    if retry_after is not None:
        raise ClerkAPIError(
            429,
            "too_many_requests",
            "Too many requests",
            f"Too many requests, retry later (Clerk emulator: {limit} requests per {window:g} s per {kind} on "
            f"{route}, as Clerk limits it; set with EmulatorServer(object_rate_limit_requests=..., "
            "object_rate_limit_window_s=...), None for no limit)",
            headers={"Retry-After": str(retry_after)},
        )


def request_params(request: Request, route: str) -> dict[str, tuple[str, ...]]:
    """The documented query parameters of ``route`` in ``request`` (``name[]`` as ``name``), non-empty values
    only; a 422 for one the emulator cannot honour."""
    documented = ROUTE_PARAMS.get(route)
    if documented is None:
        return {}
    found: dict[str, tuple[str, ...]] = {}
    for raw_name, value in request.query_params.multi_items():
        name = raw_name.removesuffix("[]")
        if name in documented and value != "":
            found[name] = (*found.get(name, ()), value)
    for name, values in found.items():
        reason = documented[name]
        if not reason or (name in _FLAGS and all(v.lower() in {"false", "0"} for v in values)):
            continue
        raise ClerkAPIError(
            422,
            "emulator_not_implemented",
            f"The Clerk emulator does not implement the {name} filter",
            f"The Clerk emulator does not implement the {name} filter of {route}: {reason}. Clerk would apply it; "
            "the emulator refuses it rather than answer as if it were not there.",
            meta={"param_name": name},
        )
    return found


def _check_faults(emulator: Emulator) -> None:
    if emulator.faults.settings.outage:
        raise ClerkAPIError(
            503,
            "service_unavailable",
            "Service unavailable",
            "The Clerk emulator is simulating an outage.",
        )
    if emulator.faults.roll("error_rate"):
        raise ClerkAPIError(
            500,
            "internal_clerk_error",
            "Oops, an unexpected error occurred",
            "There was an internal error on our servers. We've been notified and are working on fixing it.",
        )


def _to_response(result: Any) -> Response:
    return result if isinstance(result, Response) else JSONResponse(result)


def _format_invalid(error: Exception) -> ClerkAPIError:
    """Clerk's 422 for a value it cannot use, e.g. ``"abc"`` where a number belongs."""
    message = f"A request parameter has the wrong type ({type(error).__name__}: {error})"
    long_message = message + "; check the request body against the Backend API reference."
    return ClerkAPIError(422, "form_param_format_invalid", message, long_message)


def bapi_endpoint(handler: Handler, *, rate_limited: bool = True) -> Endpoint:
    """Wrap ``handler`` in Clerk's auth, rate limit, fault knobs and error shape."""

    async def endpoint(request: Request) -> Response:
        emulator = emulator_of(request)
        latency = emulator.faults.settings.latency_s
        if latency > 0:
            await asyncio.sleep(latency)
        client = request.client.host if request.client else ""
        token = REQUEST_ORIGIN.set((client, request.headers.get("user-agent", "")))
        params_token = REQUEST_PARAMS.set({})
        try:
            _check_auth(request, emulator)
            api_version(request)
            route = _route_key(request)
            if rate_limited:
                _check_rate_limit(request, emulator)
                _check_object_rate_limit(request, emulator, route)
            _check_faults(emulator)
            REQUEST_PARAMS.set(request_params(request, route))
            return _to_response(await handler(request))
        except ClerkAPIError as error:
            return error.to_response()
        except (ValueError, TypeError, AttributeError) as error:  # a body value of the wrong type
            return _format_invalid(error).to_response()
        finally:
            REQUEST_PARAMS.reset(params_token)
            REQUEST_ORIGIN.reset(token)

    return endpoint


def admin_endpoint(handler: Handler) -> Endpoint:
    """Wrap an ``/_emulator`` handler: secret key required, never rate limited or faulted."""

    async def endpoint(request: Request) -> Response:
        try:
            _check_auth(request, emulator_of(request))
            return _to_response(await handler(request))
        except ClerkAPIError as error:
            return error.to_response()
        except ValueError as error:
            return ClerkAPIError(422, "invalid_request", str(error)).to_response()

    return endpoint


async def json_body(request: Request) -> dict[str, Any]:
    """The JSON object body (``{}`` when empty), or a Clerk 400."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ClerkAPIError(400, "request_body_invalid", "Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ClerkAPIError(400, "request_body_invalid", "Request body must be a JSON object")
    return body


def int_param(request: Request, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ClerkAPIError.invalid(name, f"{name} must be an integer") from None
    if maximum is None and value < minimum:
        raise ClerkAPIError.invalid(name, f"{name} must be at least {minimum}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ClerkAPIError.invalid(name, f"{name} must be between {minimum} and {maximum}")
    return value


def bool_param(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() not in {"true", "false", "1", "0"}:
        raise ClerkAPIError.invalid(name, f"{name} must be a boolean")
    return raw.lower() in {"true", "1"}


def list_param(request: Request, name: str) -> tuple[str, ...]:
    """A repeatable query parameter (``?user_id=a&user_id=b``; ``user_id[]`` also accepted)."""
    values = request.query_params.getlist(name) + request.query_params.getlist(f"{name}[]")
    return tuple(v for v in values if v)
