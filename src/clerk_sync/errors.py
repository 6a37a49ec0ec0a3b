"""One exception tree for clerk-sync.

Branch by what the caller does next::

    ClerkSyncError                      code
    ├── ConfigError                     config_error      fix the setting named in the message
    ├── WebhookError                                       reject the delivery, write nothing
    │   ├── WebhookHeadersMissing       webhook_headers_missing   -> 400
    │   ├── WebhookVerificationError    webhook_signature_invalid -> 401
    │   ├── WebhookBodyTimeout          body_timeout              -> 408 (the body did not arrive in time)
    │   ├── PayloadError                payload_invalid           -> 400
    │   │   └── PayloadTooLarge         payload_too_large         -> 413
    │   └── WrongInstance               wrong_instance            -> 403
    ├── EventShapeError                 event_shape_invalid  the event verified but cannot be applied
    ├── TokenError                      token_invalid        session token refused -> 401 (leaves below)
    │   ├── TokenMissing, TokenMalformed, TokenAlgorithmNotAllowed, TokenKeyUnknown,
    │   ├── TokenSignatureInvalid, TokenExpired, TokenNotYetValid, TokenIssuedInFuture,
    │   ├── TokenIssuerInvalid, TokenAuthorizedPartyInvalid, TokenClaimMissing,
    │   └── SessionRevoked, SessionPending, SessionUserBanned (ImpersonationEnded)
    ├── AccessDenied                    access_denied        signed in but not allowed -> 403
    │   ├── CrossSiteRequest            cross_site_request   cookie-authenticated unsafe request from another origin
    │   ├── UserBanned                  user_banned
    │   │   ├── UserLocked              user_locked          locked out in Clerk (failed sign-ins)
    │   │   └── UserDeprovisioned       user_deprovisioned   removed by the company's identity provider (SCIM)
    │   └── UserDeleted                 user_deleted         the user was deleted in Clerk -> 410
    ├── StoreError                      store_unavailable    transient DB failure: 5xx, Svix retries
    │   ├── ParentNotThere              parent_not_there     a row an app table refers to has not arrived: 503, retried
    │   ├── MigrationPending            migration_pending    the start-up migration has not run (or was refused): 503
    │   └── StorePrivilegeMissing       store_privilege_missing  the role lacks a GRANT: 503, applied once granted
    ├── ClerkAPIError                   clerk_api_error      Clerk's Backend API refused or failed
    │   ├── ClerkNotFound               clerk_not_found      404: the object does not exist (any more)
    │   ├── ClerkUnauthorized           clerk_unauthorized   401/403: CLERK_SECRET_KEY is wrong
    │   ├── ClerkValidationError        clerk_validation     400/422: our request was invalid
    │   ├── RateLimited                 clerk_rate_limited   budget spent: retry after ``retry_after``
    │   └── ClerkUnavailable            clerk_unavailable    Clerk down/5xx/timeouts: 503, Retry-After
    ├── HookGaveUp                      hook_gave_up         raised by a hook handler: its job is dead at once
    ├── HookRetryLater                  hook_retry_later     raised by a hook handler: retried after ``after_s``
    ├── ReconcileBusy                   reconcile_busy       another reconcile run is making progress
    └── UnknownUser                     unknown_user         erasure of an id never seen here: nothing changed

HTTP status codes are chosen in one table, ``clerk_sync.integrations.http`` (every framework adapter uses it).
Warnings: :class:`ClerkSyncDeprecationWarning` (a ``UserWarning``, so users see it) for moved names.
"""

from __future__ import annotations

import re

__all__ = [
    "AccessDenied",
    "AmbiguousUser",
    "ClerkAPIError",
    "ClerkNotFound",
    "ClerkPaymentRequired",
    "ClerkSyncDeprecationWarning",
    "ClerkSyncError",
    "ClerkUnauthorized",
    "ClerkUnavailable",
    "ClerkValidationError",
    "ConfigError",
    "CrossSiteRequest",
    "EventShapeError",
    "HookGaveUp",
    "HookRetryLater",
    "ImpersonationEnded",
    "InvalidRole",
    "MigrationPending",
    "ParentNotThere",
    "PayloadError",
    "PayloadTooLarge",
    "RateLimited",
    "ReconcileBusy",
    "SessionPending",
    "SessionRevoked",
    "SessionUserBanned",
    "StoreDataError",
    "StoreError",
    "StorePrivilegeMissing",
    "TokenAlgorithmNotAllowed",
    "TokenAuthorizedPartyInvalid",
    "TokenClaimMissing",
    "TokenError",
    "TokenExpired",
    "TokenIssuedInFuture",
    "TokenIssuerInvalid",
    "TokenKeyUnknown",
    "TokenKeysUnavailable",
    "TokenMalformed",
    "TokenMissing",
    "TokenNotYetValid",
    "TokenSignatureInvalid",
    "UnknownUser",
    "UserBanned",
    "UserDeleted",
    "UserDeprovisioned",
    "UserLocked",
    "WebhookBodyTimeout",
    "WebhookError",
    "WebhookHeadersMissing",
    "WebhookVerificationError",
    "WrongInstance",
]


class ClerkSyncError(Exception):
    """Root of every error clerk-sync raises on purpose."""

    code = "clerk_sync_error"


class ClerkSyncDeprecationWarning(UserWarning):
    """A name or module path that moved; the message names the new one and the removal version."""


class ConfigError(ClerkSyncError):
    """A setting is missing or malformed; the message names it and where to find it."""

    code = "config_error"


class WebhookError(ClerkSyncError):
    """A delivery was refused before anything was written."""

    code = "webhook_error"


class WebhookBodyTimeout(WebhookError):
    """The body did not arrive within ``CLERK_SYNC_WEBHOOK_READ_TIMEOUT_S`` of the headers (a client stalling
    mid-body; no Svix attempt takes that long): answered 408, the connection closed, nothing written."""

    code = "body_timeout"


class WebhookHeadersMissing(WebhookError):
    """One of ``svix-id``, ``svix-timestamp``, ``svix-signature`` is absent."""

    code = "webhook_headers_missing"


class WebhookVerificationError(WebhookError):
    """The signature does not match any configured secret, or the timestamp is outside tolerance."""

    code = "webhook_signature_invalid"


class PayloadError(WebhookError):
    """The body verified but is not a Clerk event envelope (not JSON, missing ``type``/``data``)."""

    code = "payload_invalid"


class PayloadTooLarge(PayloadError):
    """The body exceeds the configured limit; refused before it is read in full."""

    code = "payload_too_large"


class WrongInstance(WebhookError):
    """The event comes from a Clerk instance other than ``CLERK_INSTANCE_ID``."""

    code = "wrong_instance"


class EventShapeError(ClerkSyncError):
    """An event of a known type lacks a field we need; stored as ``failed`` and replayable."""

    code = "event_shape_invalid"


class StoreError(ClerkSyncError):
    """The database failed transiently (down, deadlock, lock timeout); the delivery must be retried."""

    code = "store_unavailable"


class ParentNotThere(StoreError):
    """An app's mapped table refused a row for a foreign key to a row it does not hold yet (a membership that
    arrived before its organization or user): not an outage but an ordering that heals. Nothing was written;
    the delivery is answered 503 and Svix retries it, and it applies once the parent has arrived. ``refused``
    says which table refused which change. (Raised only while the parent may still arrive: see
    :meth:`clerk_sync.mapping.SchemaMapping.parents_arrived`.)"""

    code = "parent_not_there"

    def __init__(self, message: str, refused: str = "") -> None:
        super().__init__(message)
        self.refused = refused


class MigrationPending(StoreError):
    """A delivery arrived before the start-up migration (``serve --migrate``, ``create_app(migrate=True)``) has made
    the schema current: it is retrying in the background, or the database refused it (the message says what to
    run). Not an outage: nothing was written, the delivery is answered 503 so Svix retries it, and it applies once
    migrated. The message is public (the 503's body): it never carries the driver's text."""

    code = "migration_pending"


class StorePrivilegeMissing(StoreError):
    """The database refused a statement because the role clerk-sync runs as lacks a privilege (a GRANT to run
    as the tables' owner; ``clerk-sync doctor`` with the same DATABASE_URL prints it): not an outage, a setting.
    Nothing was written; a webhook delivery is answered 503 so Svix retries it, and it applies once granted."""

    code = "store_privilege_missing"


class StoreDataError(StoreError):
    """The database refused a value for good (too long, out of range, an escape JSONB rejects).

    Retrying cannot help: the webhook path stores the delivery as ``failed`` (replayable) and answers 200.
    """

    code = "store_data_rejected"


class TokenError(ClerkSyncError):
    """A session token was refused; treat the request as signed out (401)."""

    code = "token_invalid"


class TokenMissing(TokenError):
    """No Bearer header and no __session cookie."""

    code = "token_missing"


class TokenMalformed(TokenError):
    """Not a decodable JWT."""

    code = "token_malformed"


class TokenAlgorithmNotAllowed(TokenError):
    """Header alg is not RS256 (alg none, HS256...)."""

    code = "token_algorithm_not_allowed"


class TokenKeyUnknown(TokenError):
    """No key with this kid, even after a refetch."""

    code = "token_key_unknown"


class TokenKeysUnavailable(TokenKeyUnknown):
    """No signing key is known yet and the JWKS could not be fetched (Clerk or the network is down):
    the token may be fine, so the answer is 503 with ``Retry-After``, not 401 (which tells a client
    it is signed out). Retry after ``retry_after`` seconds; check ``clerk-sync doctor`` if it lasts."""

    code = "token_keys_unavailable"
    retry_after = 5


class TokenSignatureInvalid(TokenError):
    """Signature does not verify."""

    code = "token_signature_invalid"


class TokenExpired(TokenError):
    """exp is in the past (beyond the leeway)."""

    code = "token_expired"


class TokenNotYetValid(TokenError):
    """nbf is in the future."""

    code = "token_not_active_yet"


class TokenIssuedInFuture(TokenError):
    """iat is in the future."""

    code = "token_iat_in_the_future"


class TokenIssuerInvalid(TokenError):
    """iss is not the expected issuer."""

    code = "token_invalid_issuer"


class TokenAuthorizedPartyInvalid(TokenError):
    """azp is not in CLERK_AUTHORIZED_PARTIES."""

    code = "token_invalid_authorized_parties"


class TokenClaimMissing(TokenError):
    """A required claim (sub, sid, exp) is absent."""

    code = "token_claim_missing"


class SessionRevoked(TokenError):
    """The session was revoked/ended/removed."""

    code = "session_revoked"


class SessionPending(TokenError):
    """sts is pending: treated as signed out."""

    code = "session_pending"


class SessionUserBanned(TokenError):
    """The token is valid but its user is banned or deleted in our mirror: treated as signed out."""

    code = "session_user_banned"


class ImpersonationEnded(SessionUserBanned):
    """The session is an impersonation whose admin is no longer one (demoted, banned, deleted, locked or
    deprovisioned since the actor token was minted): it is over, so the session is signed out."""

    code = "impersonation_ended"


class AccessDenied(ClerkSyncError):
    """Signed in, but not allowed here (role, permission, impersonation guard) -> 403."""

    code = "access_denied"


class CrossSiteRequest(AccessDenied):
    """A POST (or other unsafe method) authenticated by the ``__session`` cookie came from another origin,
    or said nowhere where it came from (no ``Origin``, no ``Referer``): refused as cross-site request
    forgery -> 403. Cross-origin callers send the token as ``Authorization: Bearer``; a front end on
    another origin that relies on the cookie is listed in ``CLERK_AUTHORIZED_PARTIES``."""

    code = "cross_site_request"


class UserBanned(AccessDenied):
    """The user is banned in Clerk (mirrored in ``users.banned``)."""

    code = "user_banned"


class UserLocked(UserBanned):
    """The user is locked in Clerk (``users.locked``: too many failed sign-ins), refused like a banned one."""

    code = "user_locked"


class UserDeprovisioned(UserBanned):
    """The company's identity provider removed the user (Directory Sync/SCIM: ``users.deprovisioned``);
    Clerk sends ``user.updated``, not ``user.deleted``, so the row stays but the user is refused."""

    code = "user_deprovisioned"


class UserDeleted(AccessDenied):
    """The user was deleted in Clerk (tombstoned in ``users``, or Clerk answers 404) -> 410."""

    code = "user_deleted"


class HookGaveUp(ClerkSyncError):
    """Raised by a hook handler: retrying cannot deliver this change (the receiver answered 410 Gone or
    asked not to be sent it again). Its job is dead at once, with this message as its last error, instead
    of retried for hours; ``clerk-sync hooks retry`` queues it again once the cause is fixed."""

    code = "hook_gave_up"


class HookRetryLater(ClerkSyncError):
    """Raised by a hook handler: the receiver asked for a pause (HTTP 429 or 503 with ``Retry-After``, a
    provider's rate limit). The job is tried again no earlier than ``after_s`` seconds from now, and no
    earlier than its backoff's own delay, nor later than the backoff's ``max_s``; the attempt counts toward
    ``max_attempts`` like any failure, so a receiver that always says "later" still ends the job dead."""

    code = "hook_retry_later"

    def __init__(self, message: str, *, after_s: float) -> None:
        super().__init__(message)
        # (a NaN or negative pause from a handler's own arithmetic is no pause: the backoff's delay stands)
        self.after_s = after_s if after_s == after_s and after_s > 0 else 0.0


class ClerkAPIError(ClerkSyncError):
    """Clerk's Backend API answered with an error; ``status``, ``clerk_code`` and ``trace_id`` say which.

    ``method`` and ``path`` name the request (never its body or the secret key).
    """

    code = "clerk_api_error"

    def __init__(self, message: str, *, status: int | None = None, clerk_code: str | None = None,
                 trace_id: str | None = None, method: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.clerk_code = clerk_code
        self.trace_id = trace_id
        self.method = method
        self.path = path


class ClerkNotFound(ClerkAPIError):
    """404: the user/organization/session does not exist in Clerk (deleted, or never existed)."""

    code = "clerk_not_found"


class ClerkUnauthorized(ClerkAPIError):
    """401/403 from Clerk: ``CLERK_SECRET_KEY`` is missing, wrong, or for another instance."""

    code = "clerk_unauthorized"


class ClerkValidationError(ClerkAPIError):
    """400/422 from Clerk: the request was invalid (a bad parameter, a taken identifier...)."""

    code = "clerk_validation_error"


class ClerkPaymentRequired(ClerkAPIError):
    """402 from Clerk: the instance's plan does not include this, or its monthly allowance is spent (actor
    tokens: 5 impersonations a month on free plans). Upgrade the plan, or wait for the next month."""

    code = "clerk_payment_required"


class RateLimited(ClerkAPIError):
    """The Clerk budget is spent (Clerk said 429, or waiting for a token would pass the deadline).

    Retry after ``retry_after`` seconds; integrations answer 503 with ``Retry-After``.
    """

    code = "clerk_rate_limited"

    # retry_after has a default so copy.copy (single-flight followers) can rebuild the exception;
    # the copied __dict__ then restores the real value.
    def __init__(self, message: str, *, retry_after: float = 1.0, **context: str | int | None) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ClerkUnavailable(ClerkAPIError):
    """Clerk is down or failing (5xx, timeouts, open circuit): retry after ``retry_after`` seconds (503)."""

    code = "clerk_unavailable"

    # retry_after has a default so copy.copy (single-flight followers) can rebuild the exception;
    # the copied __dict__ then restores the real value.
    def __init__(self, message: str, *, retry_after: float = 1.0, **context: str | int | None) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ReconcileBusy(ClerkSyncError):
    """Another ``clerk-sync reconcile`` is running (its heartbeat is recent); try again later."""

    code = "reconcile_busy"


class InvalidRole(ClerkSyncError, ValueError):
    """A role to set (``AdminActions.promote``) that Clerk would store but this database could not hold as
    given: blank, longer than the column, with surrounding whitespace or control characters. Nothing was
    changed; pass the role as the app checks it (e.g. ``admin``)."""

    code = "invalid_role"


class AmbiguousUser(ClerkSyncError, LookupError):
    """An e-mail address given to name one user (``users promote EMAIL``) is the primary address of several live
    users here: an address moved from one user to another and the first one's update has not arrived yet (or
    rows came from another Clerk instance). Nothing was changed; name the user by its Clerk id instead."""

    code = "ambiguous_user"


class UnknownUser(ClerkSyncError, LookupError):
    """``Retention.erase_user`` was given an id this database has never seen (a typo, an e-mail address):
    nothing was changed; check the id, or pass ``allow_unknown`` (CLI: ``--force``)."""

    code = "unknown_user"


# Where a database error's first line quotes the refused value. MySQL/MariaDB: "Duplicate entry '..' for key",
# "Incorrect .. value: '..' for column", "Truncated incorrect .. value: '..'" (mysqlclient shows the message as a
# tuple's repr, so the quotes around the value may be ' or ", escaped or not: the value is cut up to the last
# "for key"/"for column", or to the end). PostgreSQL: a data exception (SQLSTATE class 22: `invalid input syntax
# for type integer: ".."`, `value ".." is out of range`) quotes the value, every other class only names.
_MYSQL_VALUE = re.compile(r"(Duplicate entry |value: )(.*)(?P<after> for (?:key|column) )|(value: ).*$", re.DOTALL)
# From the first quote to the end of the line (a value's own quotes, or its closing quote on a later line, are
# not a boundary), but for the tail PostgreSQL writes after a value: `value ".." is out of range for type x`.
_QUOTED = re.compile(r'"(?:.*"(?P<tail> is out of range for type [\w ]+)$|.*)')


def database_message(orig: BaseException) -> str:
    """The first line of a database error, without the values it may quote (e-mails, metadata):
    it goes into answers, logs, spans and ``last_error``. (A helper of the store and the mapping, not an
    error: not in ``__all__``, which lists the tree.)"""
    line = (str(orig).strip().splitlines() or [""])[0]
    if str(getattr(orig, "sqlstate", None) or "").startswith("22"):
        line = _QUOTED.sub(lambda m: f'"…"{m["tail"] or ""}', line)
    line = _MYSQL_VALUE.sub(lambda m: f"{m[1]}'…'{m['after']}" if m[1] else f"{m[4]}'…'", line)
    return line[:200]
