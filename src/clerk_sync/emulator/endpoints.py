"""Request plumbing shared by the Backend API and admin routes.

:func:`bapi_endpoint` wraps a handler with what every real Clerk BAPI call goes through:
added latency, secret-key authentication, the per-key rate limit, outage and random 5xx
faults, and translation of :class:`ClerkAPIError` into Clerk's error body.

A request carrying :data:`HELPER_HEADER` (sent by ``clerk_sync.testing.EmulatorServer``'s helpers, never by
Clerk's SDKs) is a test setting the stage, not the app under test: it is not counted against, nor refused
by, the rate limit, so a test's seeding never spends the budget the app's own calls are measured against.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .core import REQUEST_ORIGIN, Emulator
from .errors import ClerkAPIError

__all__ = [
    "HELPER_HEADER",
    "Handler",
    "admin_endpoint",
    "bapi_endpoint",
    "base_url",
    "bool_param",
    "emulator_of",
    "int_param",
    "json_body",
    "list_param",
]

#: Marks a request from the test helpers (any value): exempt from the rate limit. Emulator only.
HELPER_HEADER = "X-Clerk-Emulator-Helper"
Handler = Callable[[Request], Awaitable[Any]]
Endpoint = Callable[[Request], Awaitable[Response]]


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
        try:
            _check_auth(request, emulator)
            if rate_limited:
                _check_rate_limit(request, emulator)
            _check_faults(emulator)
            return _to_response(await handler(request))
        except ClerkAPIError as error:
            return error.to_response()
        except (ValueError, TypeError, AttributeError) as error:  # a body value of the wrong type
            return _format_invalid(error).to_response()
        finally:
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
