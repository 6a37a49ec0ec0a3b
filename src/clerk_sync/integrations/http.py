"""The one error -> HTTP table: every framework adapter (Starlette, FastAPI, the ASGI middleware,
Django, Flask, the console) answers clerk-sync errors through :func:`error_response`.

The body is always ``{"error": <stable code>, "message": <what happened and what to do>}``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import (
    AccessDenied,
    AmbiguousUser,
    ClerkAPIError,
    ClerkNotFound,
    ClerkSyncError,
    ClerkUnauthorized,
    ClerkUnavailable,
    ClerkValidationError,
    ConfigError,
    CrossSiteRequest,
    EventShapeError,
    InvalidRole,
    MigrationPending,
    ParentNotThere,
    PayloadError,
    PayloadTooLarge,
    RateLimited,
    ReconcileBusy,
    StoreDataError,
    StoreError,
    StorePrivilegeMissing,
    TokenError,
    TokenKeysUnavailable,
    UnknownUser,
    UserDeleted,
    WebhookBodyTimeout,
    WebhookError,
    WebhookHeadersMissing,
    WebhookVerificationError,
    WrongInstance,
)

__all__ = ["STATUS_BY_ERROR", "ErrorResponse", "delivery_answer", "error_response", "status_for"]

#: Looked up along the exception's MRO, so the most specific class wins.
STATUS_BY_ERROR: dict[type[ClerkSyncError], int] = {
    ClerkSyncError: 500,
    ConfigError: 500,
    WebhookError: 400,
    WebhookBodyTimeout: 408,
    WebhookHeadersMissing: 400,
    WebhookVerificationError: 401,
    PayloadError: 400,
    PayloadTooLarge: 413,
    WrongInstance: 403,
    EventShapeError: 422,
    TokenError: 401,
    TokenKeysUnavailable: 503,
    AccessDenied: 403,
    CrossSiteRequest: 403,
    UserDeleted: 410,
    StoreError: 503,
    ParentNotThere: 503,  # not an outage, but retried the same way (nothing was written)
    StorePrivilegeMissing: 503,  # a setting, not an outage: still 503, so Svix retries it once granted
    MigrationPending: 503,  # the start-up migration has not run (or was refused): retried the same way
    ClerkAPIError: 502,
    ClerkNotFound: 404,
    ClerkUnauthorized: 500,
    ClerkValidationError: 422,
    RateLimited: 503,
    ClerkUnavailable: 503,
    ReconcileBusy: 409,
    UnknownUser: 404,
    AmbiguousUser: 409,
    InvalidRole: 422,
}

_STORE_RETRY_AFTER_S = 5

# What any caller may read of an outage. The cause (a driver's message names the database's host, port and
# role; a JWKS failure its URL) is the operator's: it goes to the log, never to whoever sent the request.
_PUBLIC_MESSAGES: dict[type[ClerkSyncError], str] = {  # the first class that matches (subclasses first)
    StoreDataError: "the database refused a value of this request (the cause is in the service's log)",
    ParentNotThere: "a row this change refers to in the app's tables (the organization or user of a membership) "
                    "has not arrived yet: nothing was written; Clerk retries the delivery, which applies once "
                    "it has (the table and the change are in the service's log)",
    # (no table, privilege or role name: those are the operator's, in the log and in doctor's output)
    StorePrivilegeMissing: "the database role this service runs as lacks a privilege it needs: nothing was written, "
                           "retry later (Clerk retries deliveries). The operator runs `clerk-sync doctor` as that "
                           "role (the service's DATABASE_URL), which prints the GRANT statements to run as the "
                           "tables' owner (which table and privilege: the service's log)",
    StoreError: "the database is unavailable: retry later (the cause is in the service's log)",
    TokenKeysUnavailable: "the keys that verify session tokens are unavailable: retry later (the cause is in "
                          "the service's log)",
    # Clerk's API failing this service (a just-in-time fetch, an admin action): the cause names CLERK_API_URL's
    # or REDIS_URL's host and the operator's advice, for the log (review). A Clerk answer about the request
    # itself (not found, a value refused) is the caller's and keeps its own text.
    RateLimited: "Clerk's API rate limit is reached: retry after the time Retry-After gives (the cause is in the "
                 "service's log)",
    ClerkUnavailable: "Clerk's API is unavailable: retry later (the cause is in the service's log)",
    ClerkUnauthorized: "this service's Clerk secret key was refused: the operator must set a valid "
                       "CLERK_SECRET_KEY (the cause is in the service's log)",
}
# ClerkAPIError itself (not a subclass): an answer of Clerk's this service could not use
_UNUSABLE_ANSWER = "Clerk's API gave an answer this service could not use (the cause is in the service's log)"
_LOG_EVERY_S = 10.0  # an outage answers every request: one log line per cause this often, with a count
_CAUSES_HELD = 64  # causes remembered for throttling; past it, the one logged longest ago is forgotten
# Addresses, durations, counters: not a new cause. An HTTP status the message quotes ("answered 429", "(401)")
# is one: Clerk answering 400 after 429 is another outage.
_VOLATILE = re.compile(r"0x[0-9a-f]+|(?<!\d)\d+", re.IGNORECASE)
_STATUS = re.compile(r"answered ([1-5]\d\d)(?![\d.])|\(([1-5]\d\d)\)")


def _cause_key(message: str) -> str:
    """``message`` with its volatile numbers masked and the HTTP statuses it quotes kept."""
    kept = {m.start(1) if m.group(1) else m.start(2) for m in _STATUS.finditer(message)}
    return _VOLATILE.sub(lambda m: m.group(0) if m.start() in kept and len(m.group(0)) == 3 else "#", message)


log = structlog.get_logger("clerk_sync.http")
_now: Callable[[], float] = time.monotonic  # (tests replace it)
_Cause = tuple[type[ClerkSyncError], str]  # the error class and its message, numbers left out
_logged: dict[_Cause, tuple[float, int]] = {}  # cause -> (last logged at, answers since)
_logged_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """What to answer: status, JSON body and headers (``WWW-Authenticate``, ``Retry-After``)."""

    status: int
    body: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


def status_for(exc: ClerkSyncError) -> int:
    """The HTTP status for an error: the entry of its nearest class in :data:`STATUS_BY_ERROR`."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500  # pragma: no cover - ClerkSyncError itself is in the table


def error_response(exc: ClerkSyncError) -> ErrorResponse:
    """Status, body and headers for ``exc``."""
    headers: dict[str, str] = {}
    if isinstance(exc, TokenError) and not isinstance(exc, TokenKeysUnavailable):  # 503: not signed out
        headers["WWW-Authenticate"] = "Bearer"
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int | float):
        headers["Retry-After"] = str(max(1, int(retry_after)))
    elif isinstance(exc, StoreError):
        headers["Retry-After"] = str(_STORE_RETRY_AFTER_S)
    return ErrorResponse(status_for(exc), {"error": exc.code, "message": _public_message(exc)}, headers)


def delivery_answer(svix_id: str, status: str, error: str | None = None) -> dict[str, str]:
    """The 200 body of a delivery that was received: ``{"status", "svix_id"}``, and for one stored ``failed``
    its reason and what to do, so the attempt log Svix keeps (the Clerk Dashboard shows it) says why. Reasons
    name fields and limits, never values (they are the inbox's ``last_error``)."""
    if status != DeliveryStatus.FAILED or not error:
        return {"status": status, "svix_id": svix_id}
    return {"status": status, "svix_id": svix_id, "reason": error,
            "message": "stored failed with its reason: fix what it names, then `clerk-sync replay` (or "
                       "`clerk-sync dismiss` if no fix can make it apply); Svix will not send it again"}


def _public_message(exc: ClerkSyncError) -> str:
    if isinstance(exc, MigrationPending):  # its own text says what to do, free of the driver's (pending())
        _log_cause(MigrationPending, exc)
        return str(exc)
    for cls, message in _PUBLIC_MESSAGES.items():
        if isinstance(exc, cls):
            _log_cause(cls, exc)
            return message
    if type(exc) is ClerkAPIError:
        _log_cause(ClerkAPIError, exc)
        return _UNUSABLE_ANSWER
    return str(exc)


def _log_cause(cls: type[ClerkSyncError], exc: ClerkSyncError) -> None:
    """Log the cause the public message points to: an outage's once per cause every ``_LOG_EVERY_S`` (with the
    count answered meanwhile), so a cause that changes (the operator fixed one thing, the next one shows) is
    logged at once, not after the window of the one before."""
    if cls is StoreDataError:  # about one request's data, not an outage: each one is its own story
        log.warning("answered_unavailable", error=exc.code, cause=str(exc), also_answered_since_last_line=0)
        return
    # A parent not arrived yet is an ordering Svix's retry heals (info), not an outage (warning); a missing
    # privilege is a setting to fix, said as that (its cause has the GRANT advice)
    say, event = ((log.info, "answered_parent_not_there") if cls is ParentNotThere
                  else (log.info, "answered_migration_pending") if cls is MigrationPending
                  else (log.warning, "answered_privilege_missing") if cls is StorePrivilegeMissing
                  else (log.warning, "answered_unavailable"))
    cause = (cls, _cause_key(" ".join(str(exc).split())))
    now = _now()
    with _logged_lock:
        at, since = _logged.get(cause, (float("-inf"), 0))
        if now - at < _LOG_EVERY_S:
            _logged[cause] = (at, since + 1)
            return
        _logged.pop(cause, None)
        if len(_logged) >= _CAUSES_HELD:
            del _logged[min(_logged, key=lambda held: _logged[held][0])]
        _logged[cause] = (now, 0)
    say(event, error=exc.code, cause=str(exc), also_answered_since_last_line=since)
