"""Clerk Backend API client: one policy (budget, retries, ``Retry-After``, circuit breaker,
single-flight) with a blocking face, :class:`ClerkClient`, and an async one, :class:`AsyncClerkClient`.

Errors are the ``ClerkAPIError`` branch of :mod:`clerk_sync.errors`: ``ClerkNotFound``,
``ClerkUnauthorized``, ``ClerkValidationError``, ``RateLimited`` and ``ClerkUnavailable`` (both retryable,
with ``retry_after``).
"""

from __future__ import annotations

from clerk_sync.clerk_api._client import (
    API_VERSION,
    DEFAULT_API_URL,
    DEFAULT_TIMEOUT,
    AsyncClerkClient,
    ClerkClient,
)
from clerk_sync.clerk_api._endpoints import JSON, MAX_PAGE, Page
from clerk_sync.clerk_api._policy import UNREACHABLE, ApiRequest, CircuitBreaker, RetryPolicy, Stats, unreachable_advice

__all__ = [
    "API_VERSION",
    "DEFAULT_API_URL",
    "DEFAULT_TIMEOUT",
    "JSON",
    "MAX_PAGE",
    "UNREACHABLE",
    "ApiRequest",
    "AsyncClerkClient",
    "CircuitBreaker",
    "ClerkClient",
    "Page",
    "RetryPolicy",
    "Stats",
    "unreachable_advice",
]
