"""Settings: read once at the edge (CLI, service factory) and passed down; library code never reads os.environ."""

from __future__ import annotations

import base64
import binascii
import importlib.util
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clerk_sync._limits import PRUNE_BATCH_MAX
from clerk_sync._urls import masked_url
from clerk_sync.errors import ConfigError

__all__ = ["DEFAULT_DATABASE_URL", "DatabaseTimeouts", "Settings", "parse_webhook_secrets"]

DEFAULT_DATABASE_URL = "sqlite:///clerk_sync.db"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SECRET_HELP = (
    "Set CLERK_WEBHOOK_SIGNING_SECRET to the endpoint's signing secret (Clerk Dashboard -> Webhooks -> "  # noqa: S105
    "your endpoint -> Signing Secret, it starts with 'whsec_'); several secrets may be separated by "
    "spaces or commas during rotation."
)


def parse_webhook_secrets(raw: str) -> tuple[SecretStr, ...]:
    """Split a rotation list (spaces or commas) and check each is base64, ``whsec_``-prefixed or not.

    The prefix is optional as in the Svix and Standard Webhooks libraries (``Webhook(secret)`` strips it
    when present), so a secret that verifies there also verifies here. Unlike them we refuse characters
    outside base64 instead of silently dropping them (that would verify against a different key): see
    :func:`_webhook_key`, the one check for every secret (this list, ``WebhookVerifier``,
    ``StandardWebhookSink``).
    """
    secrets = tuple(s for s in re.split(r"[\s,]+", raw.strip()) if s)
    if not secrets:
        raise ConfigError(f"CLERK_WEBHOOK_SIGNING_SECRET is empty. {_SECRET_HELP}")
    for i, secret in enumerate(secrets, 1):
        _webhook_key(secret, name=f"Webhook secret #{i}", fix=_SECRET_HELP)
    return tuple(SecretStr(s) for s in secrets)


def _webhook_key(secret: str, *, name: str, fix: str) -> bytes:
    """The HMAC key of a Standard Webhooks / Svix secret (``whsec_`` + base64, the prefix optional), decoded
    strictly; a :class:`ConfigError` naming ``name`` (never quoting the secret) and ending with ``fix`` else.

    ``standardwebhooks.Webhook(secret)`` decodes leniently: it drops every character outside the standard
    base64 alphabet (``-``, ``_``, ``$``, spaces), so a URL-safe base64 secret signs and verifies with a
    different, shorter key than the one the other side holds, and nothing says so. Padding may be left off
    (as those libraries allow), and white space around it is not the secret's (a file's line break); anything
    else outside ``A-Z a-z 0-9 + /`` and trailing ``=`` is refused.
    Callers hand the returned bytes to ``Webhook``, so the key used is the one checked here.
    """
    stripped = secret.strip()  # a secret read from a file keeps its line break: not the key's
    for prefix, home in _SECRET_PREFIXES.items():  # another of Clerk's keys pasted here (base64 would fail,
        if prefix != "whsec_" and stripped.startswith(prefix):  # its hint then pointing the wrong way)
            raise ConfigError(f"{name} is a Clerk key ({prefix}...; not shown), not a webhook signing secret: it "
                              f"belongs in {home}. {fix}")
    if len(stripped) > 1 and stripped[0] in "\"'" and stripped[-1] == stripped[0]:
        raise ConfigError(f"{name} is wrapped in quotes ({stripped[0]}...{stripped[0]}; not shown): remove them "
                          f"(an env file read by `docker --env-file` keeps quotes as part of the value). {fix}")
    body = stripped.removeprefix("whsec_")
    if not body:
        said = "is empty" if not secret else "is only the 'whsec_' prefix"
        raise ConfigError(f"{name} {said}. {fix}")
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        if any(c.isspace() for c in body):
            hint = ("; it contains whitespace: pass one secret per item (a list of them while rotating), "
                    "without spaces or line breaks")
        elif "-" in body or "_" in body:
            hint = ("; it has '-' or '_', so it looks URL-safe base64: Standard Webhooks secrets are standard "
                    "base64, so convert its key, 'whsec_' + base64.b64encode(base64.urlsafe_b64decode(rest + "
                    "'==')).decode() where rest is what follows 'whsec_'")
        else:
            hint = ""
        raise ConfigError(
            f"{name} is not valid base64 (with or without its 'whsec_' prefix){hint}. The Standard Webhooks "
            f"and Svix libraries would drop the characters outside the base64 alphabet and use a different "
            f"key than the other side's. {fix}"
        ) from None
    if not key:
        raise ConfigError(f"{name} decodes to an empty key. {fix}")
    return key


# CLERK_SYNC_WEBHOOK_TOLERANCE_S: how far a delivery's svix-timestamp may be from this host's clock (Svix's
# libraries: 300 s both ways). Under 1 s every genuine delivery would be refused as "too old" (it is signed,
# sent and received in different seconds). The cap keeps a captured delivery from being replayed once the
# inbox has forgotten its svix-id: a replay within the tolerance is refused as a duplicate only while its
# inbox row is kept, and retention deletes a row CLERK_SYNC_INBOX_DELETE_AFTER_DAYS after it was received,
# at least _MIN_INBOX_DELETE_AFTER_DAYS. A fixed cap of one day is far more than any clock skew (Svix signs
# each retry afresh, so retries need no more) and stays below that shortest retention whatever the inbox's
# setting, so the two settings need no cross-check.
_MIN_TOLERANCE_S = 1
_MAX_TOLERANCE_S = 86_400
_MIN_INBOX_DELETE_AFTER_DAYS = 3  # longer than Svix's retry window (about 27 h); a test pins the cap below it


def _tolerance_problem(tolerance_s: float) -> str | None:
    """Why ``tolerance_s`` cannot be the webhook timestamp tolerance (what to do included), or None."""
    if tolerance_s < _MIN_TOLERANCE_S:
        return (f"a webhook timestamp tolerance of {tolerance_s} s is below {_MIN_TOLERANCE_S} s: every genuine "
                "delivery would be refused as too old (it is signed and received in different seconds). Use "
                f"Svix's 300 s (unset CLERK_SYNC_WEBHOOK_TOLERANCE_S), or at least {_MIN_TOLERANCE_S} s")
    if tolerance_s > _MAX_TOLERANCE_S:
        return (f"a webhook timestamp tolerance of {tolerance_s} s is above {_MAX_TOLERANCE_S} s (one day): a "
                "captured delivery could be replayed after the inbox has deleted its svix-id and be applied "
                "again. Use Svix's 300 s (unset CLERK_SYNC_WEBHOOK_TOLERANCE_S); fix the host's clock (NTP) "
                "rather than widen the window")
    return None


_DEFAULT_PORTS = {"http": 80, "https": 443}
_CLERK_API_URL = "https://api.clerk.com"
_ORIGIN_FORM = ("a token's azp is the origin it was minted for, scheme://host[:port] as the browser sends it in "
                "Origin (no path; no port when it is the scheme's default), so this entry never matches one")


def _party_problem(entry: str) -> str | None:
    """Why ``entry`` of CLERK_AUTHORIZED_PARTIES can never equal a token's ``azp`` (compared after a trailing '/'
    is dropped and :func:`_origin` has normalised both), with what to write instead; None when it can. Schemes
    other than http(s) pass (a browser extension's ``chrome-extension://<id>`` is an origin too)."""
    secret = _secret_problem(entry)
    if secret is not None:
        return f"an entry {secret}"
    shown = masked_url(entry)  # (credentials have no place in an origin; never echoed if one has them)
    if "://" not in entry:
        scheme = "http" if entry.startswith(("localhost", "127.", "[::1]")) else "https"
        fix = f"; write '{scheme}://{shown}'" if _host_like(entry) else ""
        return f"the entry {shown!r} has no scheme: {_ORIGIN_FORM}{fix}"
    if "*" in entry:
        return (f"the entry {shown!r} has a '*': azp is compared exactly, no pattern matches it; list each origin "
                "(scheme://host[:port]) separately")
    try:
        parts = urlsplit(entry)
        parts.port  # noqa: B018 - parsed for its ValueError
    except ValueError:
        return f"the entry {shown!r} has a port that is not a number: {_ORIGIN_FORM}"
    if not parts.netloc or (parts.scheme.lower() in _DEFAULT_PORTS and not parts.hostname):
        return f"the entry {shown!r} has no host: {_ORIGIN_FORM}"
    if parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        return f"the entry {shown!r} is not an origin: {_ORIGIN_FORM}; write {_origin(entry)!r}"
    return None


def _origin(entry: str) -> str:
    """An http(s) origin as a browser writes it (and so as ``azp`` carries it): scheme and host in lower case,
    the scheme's default port left out, no path or credentials. Other schemes are kept as written."""
    parts = urlsplit(entry)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # (no credentials, no path)
    return f"{scheme}://{_browser_host(parts.hostname)}" + (
        "" if parts.port in (None, _DEFAULT_PORTS[scheme]) else f":{parts.port}")


def _browser_host(host: str) -> str:
    """``host`` as an Origin header writes it: an IP address in its short form (IPv6 bracketed), a name in
    ASCII (an internationalised one in punycode)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            return host.encode("idna").decode("ascii")
        except UnicodeError:  # not a name IDNA can encode: compared as written (it then never matches)
            return host
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def _host_like(value: str) -> bool:
    """``value`` reads as host[:port][/path] with the scheme left out (a dotted name, localhost or an IP), so
    suggesting ``https://`` + it helps; anything else (a stray word, ``null``) gets no suggestion."""
    bracketed = re.match(r"\[[0-9a-fA-F:.]+\]", value)  # an IPv6 address: its colons are not a port's
    host = bracketed.group(0) if bracketed else re.split(r"[:/]", value, maxsplit=1)[0]
    return re.fullmatch(r"[\w-]+(\.[\w-]+)+|localhost|\[[0-9a-fA-F:.]+\]", host) is not None


# Prefixes of Clerk's keys and Svix's signing secrets: a value with one, found in a URL or origin setting, is
# a secret in the wrong variable, and is never echoed (settings errors reach logs and CI output).
_SECRET_PREFIXES = {"sk_test_": "CLERK_SECRET_KEY", "sk_live_": "CLERK_SECRET_KEY",
                    "pk_test_": "your front end (the publishable key)",
                    "pk_live_": "your front end (the publishable key)", "whsec_": "CLERK_WEBHOOK_SIGNING_SECRET"}


def _secret_problem(value: str) -> str | None:
    """Why ``value`` looks like a key or secret rather than a URL (without showing it), or None."""
    for prefix, home in _SECRET_PREFIXES.items():
        if value.strip().startswith(prefix):
            return (f"looks like a Clerk key or signing secret ({prefix}...; not shown), not a URL: it belongs in "
                    f"{home}")
    return None


def _require_http_url(value: str, why: str) -> str:
    """``value`` when it is an http(s) URL with a host; else a ValueError saying so (``why``: what then fails,
    and an example), never echoing a secret pasted into it."""
    try:
        parts = urlsplit(value)
        ok = parts.scheme.lower() in _DEFAULT_PORTS and bool(parts.hostname)
    except ValueError:
        ok = False
    if ok:
        return value
    secret = _secret_problem(value)
    if secret is not None:
        raise ValueError(f"the value {secret}")
    shown = masked_url(value)
    bare = _host_like(value) and re.fullmatch(r"[\w.\[\]:-]+(/\S*)?", value) is not None  # the scheme left out
    fix = f" (write 'https://{shown}', or 'http://{shown}' for a local emulator)" if bare else ""
    raise ValueError(f"{shown!r} is not an http:// or https:// URL with a host{fix}: {why}")


@dataclass(frozen=True, slots=True)
class DatabaseTimeouts:
    """Bounds on every database wait (PostgreSQL), so one stuck replica or a dead host cannot stall
    the healthy ones: a wait past a bound fails the delivery with 503 and Svix retries it. 0 disables.

    ``lock_s`` bounds waiting for a row or advisory lock; ``statement_s`` one statement;
    ``idle_in_transaction_s`` how long the server keeps a transaction whose client went quiet (its
    locks with it); ``keepalive_s`` how soon either side notices a peer that vanished without
    closing its socket (TCP keepalive idle time; the kernel default is 2 hours); ``connect_s``
    bounds opening a connection.
    """

    lock_s: float = 5.0
    statement_s: float = 15.0
    idle_in_transaction_s: float = 15.0
    keepalive_s: float = 10.0
    connect_s: float = 5.0


# Upper bounds a store or the clock can take: PostgreSQL's timeouts end at 2^31 - 1 ms (~24.8 days), a
# retention age past a million days overflows the dates it is subtracted from (0 disables either).
_MAX_DB_WAIT_S = 2_000_000.0
_MAX_KEEPALIVE_S = 32_767.0  # Linux's TCP_KEEPIDLE ends there: past it, every connection fails to open
_MAX_DAYS = 1_000_000.0
_MIN_CONSOLE_TOKEN_CHARS = 16
_MIN_CONSOLE_SECRET_CHARS = 32
_CONSOLE_SECRET_HELP = 'make one with `python -c "import secrets; print(secrets.token_urlsafe(32))"`'  # noqa: S105



# Shown masked by repr(settings): a connection URL's user part and password parameters (the Clerk API's and the
# JWKS URL's too: a proxy in front of them may take credentials in the URL; review)
_URL_FIELDS = ("database_url", "redis_url", "clerk_api_url", "clerk_jwks_url")

class Settings(BaseSettings):
    """Everything clerk-sync reads from the environment; build with :meth:`from_env`."""

    # No inf or nan (`inf`, `1e400`): an endless timeout or retention is 0 where 0 disables, or a large number
    # hide_input_in_errors: a ValidationError of Settings(...) would quote a refused secret otherwise.
    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True, allow_inf_nan=False,
                                      hide_input_in_errors=True)

    database_url: str = Field(DEFAULT_DATABASE_URL, validation_alias="DATABASE_URL")
    webhook_secret: SecretStr | None = Field(
        None, validation_alias=AliasChoices("CLERK_WEBHOOK_SIGNING_SECRET", "CLERK_WEBHOOK_SECRET")
    )
    instance_id: str | None = Field(None, validation_alias="CLERK_INSTANCE_ID")
    max_body_bytes: int = Field(1024 * 1024, gt=0, validation_alias="CLERK_SYNC_MAX_BODY_BYTES")
    # A webhook request's body must be in within this long (408 then; Svix waits 15 s for an attempt, its
    # self-hosted server 30 s): a client sending it slowly, or stalling, cannot hold the memory it sent for ever.
    webhook_read_timeout_s: float = Field(30.0, gt=0, le=3600, validation_alias="CLERK_SYNC_WEBHOOK_READ_TIMEOUT_S")
    # serve's bound on a request's head (request line and headers; cli/_uvicorn_limits.py): a larger one is answered
    # 431, one not complete this long after its first byte 408, the connection closed (Svix's heads: under 1 KiB).
    max_head_bytes: int = Field(64 * 1024, ge=1024, le=1024 * 1024, validation_alias="CLERK_SYNC_MAX_HEAD_BYTES")
    head_timeout_s: float = Field(10.0, gt=0, le=3600, validation_alias="CLERK_SYNC_HEAD_TIMEOUT_S")
    # Bounded (at least 1 s, at most a day): see _tolerance_problem.
    webhook_tolerance_s: int = Field(300, validation_alias="CLERK_SYNC_WEBHOOK_TOLERANCE_S")
    clerk_secret_key: SecretStr | None = Field(None, validation_alias="CLERK_SECRET_KEY")
    clerk_api_url: str = Field(_CLERK_API_URL, validation_alias="CLERK_API_URL")
    redis_url: str | None = Field(None, validation_alias="REDIS_URL")
    # Clerk's per-instance Backend API budget; unset: 1000 / 10 s for sk_live_ keys, else 100 / 10 s.
    clerk_api_rate_limit: int | None = Field(None, gt=0, validation_alias="CLERK_API_RATE_LIMIT")
    clerk_api_rate_window_s: float = Field(10.0, gt=0, validation_alias="CLERK_API_RATE_WINDOW_S")
    clerk_api_connect_timeout_s: float = Field(3.0, gt=0, validation_alias="CLERK_API_CONNECT_TIMEOUT_S")
    clerk_api_read_timeout_s: float = Field(10.0, gt=0, validation_alias="CLERK_API_READ_TIMEOUT_S")
    log_level: str = Field("INFO", validation_alias="CLERK_SYNC_LOG_LEVEL")
    # Session verification (auth layer): a PEM key (networkless) or JWKS from CLERK_API_URL/v1/jwks.
    clerk_jwt_key: SecretStr | None = Field(None, validation_alias="CLERK_JWT_KEY")
    clerk_jwks_url: str | None = Field(None, validation_alias="CLERK_JWKS_URL")
    clerk_issuer: str | None = Field(None, validation_alias=AliasChoices("CLERK_ISSUER", "CLERK_FRONTEND_API_URL"))
    # The front end's publishable key (public): picks this app's __session_<suffix> cookie where several
    # Clerk apps share a host (localhost), as Clerk's own backend SDKs do with it.
    clerk_publishable_key: str | None = Field(None, validation_alias=AliasChoices(
        "CLERK_PUBLISHABLE_KEY", "NEXT_PUBLIC_CLERK_PUBLISHABLE_KEY", "VITE_CLERK_PUBLISHABLE_KEY"))
    authorized_parties_raw: str | None = Field(None, validation_alias="CLERK_AUTHORIZED_PARTIES")
    # Roles an impersonating user of the app must still hold (comma-separated; unset: admin; "*": any role,
    # standing only), for apps whose support staff impersonate with actor tokens of their own.
    impersonator_roles_raw: str | None = Field(None, validation_alias="CLERK_IMPERSONATOR_ROLES")
    # Clock skew allowed on exp/nbf/iat; at most 300 s, so a typo (86400) cannot accept expired tokens for a day.
    session_leeway_s: float = Field(5.0, ge=0, le=300, validation_alias="CLERK_SYNC_SESSION_LEEWAY_S")
    # JitUsers.refresh_interval_s: the least time between two Clerk fetches of one user (POST /sync/me)
    jit_refresh_interval_s: float = Field(10.0, ge=0, validation_alias="CLERK_SYNC_JIT_REFRESH_INTERVAL_S")
    # Operations: one log line per delivery at this level (a failed one: WARNING at least), a summary line
    # at most once per delivery_summary_s (0: none); retention of the inbox and of tombstones.
    delivery_log_level: str = Field("DEBUG", validation_alias="CLERK_SYNC_DELIVERY_LOG_LEVEL")
    delivery_summary_s: float = Field(60.0, ge=0, validation_alias="CLERK_SYNC_DELIVERY_SUMMARY_S")
    # serve: concurrent deliveries share one transaction and one COMMIT (see docs/ARCHITECTURE.md).
    group_commit: bool = Field(True, validation_alias="CLERK_SYNC_GROUP_COMMIT")
    inbox_redact_after_days: float = Field(
        30.0, ge=0, le=_MAX_DAYS, validation_alias="CLERK_SYNC_INBOX_REDACT_AFTER_DAYS")
    # Longer than Svix's retry window (about 27 h), so a retried delivery is still seen as a duplicate.
    inbox_delete_after_days: float = Field(90.0, le=_MAX_DAYS, validation_alias="CLERK_SYNC_INBOX_DELETE_AFTER_DAYS")
    tombstone_clear_after_days: float = Field(
        0.0, ge=0, le=_MAX_DAYS, validation_alias="CLERK_SYNC_TOMBSTONE_CLEAR_AFTER_DAYS")
    # None: tombstones stay (cleared) for good; N: their rows are deleted N days after the deletion.
    tombstone_delete_after_days: float | None = Field(
        None, ge=0, le=_MAX_DAYS, validation_alias="CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS")
    # None: the audit log's IP addresses stay (an erasure clears those of the rows its user made); N: prune
    # clears every row's IP N days after it was written (the ids, action and details stay).
    audit_ip_clear_after_days: float | None = Field(
        None, ge=0, le=_MAX_DAYS, validation_alias="CLERK_SYNC_AUDIT_IP_CLEAR_AFTER_DAYS")
    prune_interval_s: float = Field(3600.0, ge=0, validation_alias="CLERK_SYNC_PRUNE_INTERVAL_S")
    prune_batch: int = Field(500, gt=0, le=PRUNE_BATCH_MAX, validation_alias="CLERK_SYNC_PRUNE_BATCH")
    # None: a quiet install is not stale (deliveries are judged by reconcile's drift); N: for an app whose
    # users change all day, no delivery for N seconds fails `doctor --freshness`.
    freshness_max_delivery_age_s: float | None = Field(
        None, gt=0, validation_alias="CLERK_SYNC_FRESHNESS_MAX_DELIVERY_AGE_S")
    freshness_max_hook_wait_s: float = Field(900.0, gt=0, validation_alias="CLERK_SYNC_FRESHNESS_MAX_HOOK_WAIT_S")
    freshness_max_failed: int = Field(0, ge=0, validation_alias="CLERK_SYNC_FRESHNESS_MAX_FAILED")
    freshness_max_reconcile_age_s: float = Field(
        2 * 86400.0, gt=0, validation_alias="CLERK_SYNC_FRESHNESS_MAX_RECONCILE_AGE_S")
    # A token whose kid is unknown refetches the JWKS once the last fetch is this old (key rotation).
    jwks_min_refetch_s: float = Field(5.0, ge=0, validation_alias="CLERK_SYNC_JWKS_MIN_REFETCH_S")
    # Bounds on database waits (PostgreSQL); see DatabaseTimeouts. 0 disables one.
    db_lock_timeout_s: float = Field(5.0, ge=0, le=_MAX_DB_WAIT_S, validation_alias="CLERK_SYNC_DB_LOCK_TIMEOUT_S")
    db_statement_timeout_s: float = Field(
        15.0, ge=0, le=_MAX_DB_WAIT_S, validation_alias="CLERK_SYNC_DB_STATEMENT_TIMEOUT_S")
    db_idle_in_transaction_timeout_s: float = Field(
        15.0, ge=0, le=_MAX_DB_WAIT_S, validation_alias="CLERK_SYNC_DB_IDLE_IN_TRANSACTION_TIMEOUT_S"
    )
    db_keepalive_s: float = Field(10.0, ge=0, le=_MAX_KEEPALIVE_S, validation_alias="CLERK_SYNC_DB_KEEPALIVE_S")
    db_connect_timeout_s: float = Field(
        5.0, ge=0, le=_MAX_DB_WAIT_S, validation_alias="CLERK_SYNC_DB_CONNECT_TIMEOUT_S")
    # PostgreSQL behind a pooler in transaction mode (PgBouncer pool_mode=transaction): no prepared statements,
    # no startup options (the timeouts are then the role's); see store._pooled_postgres.
    db_transaction_pooler: bool = Field(False, validation_alias="CLERK_SYNC_DB_TRANSACTION_POOLER")
    # Each process's connection pool on PostgreSQL and MySQL/MariaDB (SQLite: SQLAlchemy's own): the connections
    # it keeps, and how many more a burst may open (closed when returned). A budget to fit max_connections or a
    # pooler's size across replicas and workers (RUNBOOK, "Running on Kubernetes").
    db_pool_size: int = Field(20, ge=1, le=10_000, validation_alias="CLERK_SYNC_DB_POOL_SIZE")
    db_max_overflow: int = Field(20, ge=0, le=10_000, validation_alias="CLERK_SYNC_DB_MAX_OVERFLOW")
    # The service app factory (multi-worker `serve`) migrates in the background when set.
    migrate_on_start: bool = Field(False, validation_alias="CLERK_SYNC_MIGRATE_ON_START")
    # The operator console at /console of `clerk-sync serve` (opt-in); admins sign in with Clerk, or an
    # operator with this token (a standalone service with no Clerk front end).
    console_enabled: bool = Field(False, validation_alias="CLERK_SYNC_CONSOLE")
    console_operator_token: SecretStr | None = Field(None, validation_alias="CLERK_SYNC_CONSOLE_TOKEN")
    console_read_only: bool = Field(False, validation_alias="CLERK_SYNC_CONSOLE_READ_ONLY")
    # The console's own secret for signing its session cookies, held by nobody else (not Clerk, not Svix);
    # required when neither CLERK_SYNC_CONSOLE_TOKEN nor CLERK_SECRET_KEY is set (see console._access).
    console_secret: SecretStr | None = Field(None, validation_alias="CLERK_SYNC_CONSOLE_SECRET")
    # How long a console sign-in lasts at most (an admin's also ends with its Clerk session's revocation,
    # but Clerk sends nothing when a session merely expires: keep this near your session lifetime).
    console_session_s: int = Field(8 * 3600, ge=60, le=7 * 86400, validation_alias="CLERK_SYNC_CONSOLE_SESSION_S")

    @field_validator("instance_id", "redis_url", "webhook_secret", "clerk_secret_key", "clerk_api_rate_limit",
                     "clerk_jwt_key", "clerk_jwks_url", "clerk_issuer", "clerk_publishable_key",
                     "authorized_parties_raw",
                     "impersonator_roles_raw", "console_operator_token", "console_secret",
                     "tombstone_delete_after_days", "freshness_max_delivery_age_s", "audit_ip_clear_after_days",
                     mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `export CLERK_ISSUER=` means "not set", not "the empty issuer".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("console_operator_token")
    @classmethod
    def _long_enough_token(cls, value: SecretStr | None) -> SecretStr | None:
        # It opens the console (promotions, erasure): a short one is guessed; the message never shows it.
        if value is not None and len(value.get_secret_value().strip()) < _MIN_CONSOLE_TOKEN_CHARS:
            raise ValueError(f"must be at least {_MIN_CONSOLE_TOKEN_CHARS} characters (it signs an operator in "
                             "to the console); make one with `openssl rand -base64 24`")
        if value is not None and re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+",
                                              value.get_secret_value().strip()):
            # The console reads a Bearer shaped like this as a Clerk session token, verified off the event loop and
            # counted as a failed sign-in only after: a burst of such guesses at a token of this shape would all be
            # compared before the throttle counted one (review). No other token is refused for its shape.
            raise ValueError("must not look like a session token (three dot-separated parts: the console reads such "
                             "a Bearer as a Clerk session token); make one with `openssl rand -base64 24`")
        # stripped: one read from a file (a Kubernetes secret, `echo`) ends in a newline that no operator types
        return None if value is None else SecretStr(value.get_secret_value().strip())

    @field_validator("console_secret")
    @classmethod
    def _long_enough_console_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # It signs every console session (an admin's too): a short one is guessed; the message never shows it.
        if value is not None and len(value.get_secret_value().strip()) < _MIN_CONSOLE_SECRET_CHARS:
            raise ValueError(f"must be at least {_MIN_CONSOLE_SECRET_CHARS} characters (it signs the console's "
                             f"session cookies); {_CONSOLE_SECRET_HELP}")
        return value

    @field_validator("clerk_publishable_key")
    @classmethod
    def _publishable_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        key = value.strip()
        if not key.startswith(("pk_test_", "pk_live_")) or not key.isascii() or any(c.isspace() for c in key):
            # (never shown: a secret key or signing secret pasted here, in quotes or not, would reach the logs)
            raise ValueError("must be the publishable key, starting with 'pk_test_' or 'pk_live_' (Clerk Dashboard "
                             "-> API keys), without quotes or spaces; the value given is not (not shown)")
        return key

    @field_validator("clerk_issuer")
    @classmethod
    def _issuer_without_trailing_slash(cls, value: str | None) -> str | None:
        # Tokens carry ``iss`` without one, and it is compared exactly (as CLERK_AUTHORIZED_PARTIES strips it).
        if value is None:
            return None
        issuer = value.strip().rstrip("/")
        if not issuer:
            raise ValueError("must be your Clerk Frontend API URL, like https://clerk.example.com")
        return _require_http_url(issuer, "it is compared with the tokens' iss, your Clerk Frontend API URL like "
                                          "https://clerk.example.com, so no session token would pass")

    @field_validator("clerk_api_url", mode="before")
    @classmethod
    def _blank_api_url_is_clerks(cls, value: object) -> object:
        # `CLERK_API_URL=` (or app.config's "") means unset, as for the other URLs: Clerk's own
        return _CLERK_API_URL if isinstance(value, str) and not value.strip() else value

    @field_validator("clerk_api_url")
    @classmethod
    def _api_url_without_version(cls, value: str) -> str:
        # The base URL: every consumer (the client, the JWKS fetch, doctor) adds /v1 itself. The Clerk
        # Python SDK's server_url form (https://api.clerk.com/v1) is accepted too, not turned into /v1/v1.
        return _require_http_url(value.strip().rstrip("/").removesuffix("/v1"),
                                 "every request to Clerk's Backend API would fail; unset, it is https://api.clerk.com")

    @field_validator("clerk_jwks_url")
    @classmethod
    def _jwks_http_url(cls, value: str | None) -> str | None:
        # Kept stripped, as checked: one read from a file (a Kubernetes secret) ends with a line break, which
        # httpx refuses in a URL (every authenticated request was a 500).
        if value is None:
            return None
        return _require_http_url(value.strip(), "no key could be fetched, so no session token would verify; like "
                                 "https://clerk.example.com/.well-known/jwks.json (or unset it: CLERK_SECRET_KEY "
                                 "fetches them)")

    @field_validator("authorized_parties_raw")
    @classmethod
    def _origins(cls, value: str | None) -> str | None:
        # Compared exactly with the tokens' azp: an entry that can never equal one refuses every session.
        entries = [entry.strip() for entry in (value or "").split(",")]
        for entry in entries:
            problem = _party_problem(entry.rstrip("/")) if entry else None
            if problem is not None:
                raise ValueError(problem)
        if value is not None and value.strip() and not any(entries):
            # (a template whose parts were all empty, "${A},${B}"): no origin at all refused every session
            raise ValueError(f"no origin in it ({value!r}): list your front end's origins, comma-separated (e.g. "
                             "https://app.example.com,http://localhost:3000), or unset it")
        return value

    @field_validator("clerk_secret_key")
    @classmethod
    def _a_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Only the prefixes of Clerk's other keys are refused: the emulator (and tests) take any secret key.
        key = "" if value is None else value.get_secret_value().strip()
        where = ("CLERK_SECRET_KEY takes the secret key: Clerk Dashboard -> API keys -> Secret keys, it starts "
                 "with 'sk_test_' or 'sk_live_'")
        if key.startswith("pk_"):
            raise ValueError(f"this is the publishable key ('pk_...', the front end's); {where}")
        if key.startswith("whsec_"):
            raise ValueError(f"this is a webhook signing secret ('whsec_...', for CLERK_WEBHOOK_SIGNING_SECRET); "
                             f"{where}")
        if not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):  # no header carries it
            raise ValueError(f"has a space, a control character or a non-ASCII character (a typographic quote or "
                             f"ellipsis pasted from a document) inside it (not shown): copy it again; {where}")
        # the stripped key: a trailing newline (kubectl create secret --from-file, echo) would make every request
        # to Clerk fail, and httpx's refusal quotes the header, the key in full
        return None if value is None else SecretStr(key)

    @field_validator("database_url", mode="before")
    @classmethod
    def _blank_is_default(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        url = value.strip()  # a line break from a secret file cut the driver's message ('database "app.')
        if not url:
            return DEFAULT_DATABASE_URL
        if len(url) > 1 and url[0] == url[-1] and url[0] in "'\"":  # kept by docker's --env-file, and by systemd
            raise ValueError(f"is quoted ({url[0]}...{url[0]}): the quotes are part of the value there; remove them")
        if url.startswith("sqlite") and url.partition(":///")[2].startswith("~"):  # no shell expands it here
            raise ValueError("names a path starting with '~', which is not expanded here: write the full path")
        return url

    @field_validator("webhook_tolerance_s")
    @classmethod
    def _tolerance_in_bounds(cls, value: int) -> int:
        problem = _tolerance_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("delivery_log_level", "log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in _LEVELS:
            raise ValueError(f"must be one of {', '.join(_LEVELS)}")
        return value.upper()

    @field_validator("inbox_delete_after_days")
    @classmethod
    def _outlives_svix_retries(cls, value: float) -> float:
        if value < _MIN_INBOX_DELETE_AFTER_DAYS:
            raise ValueError(
                f"must be at least {_MIN_INBOX_DELETE_AFTER_DAYS} days, not {value:g}: Svix retries a failed "
                "delivery for about 27 hours (up to twice that when the endpoint asks for later with Retry-After), "
                "and a retry is known for a duplicate only while its inbox row is kept, so an inbox row deleted "
                f"sooner lets a late retry be applied again. Set it to {_MIN_INBOX_DELETE_AFTER_DAYS} or more "
                "(unset: 90)")
        return value

    @model_validator(mode="after")
    def _delete_after_redact(self) -> Settings:
        if self.inbox_delete_after_days < self.inbox_redact_after_days:
            default = "" if "inbox_redact_after_days" in self.model_fields_set else ", its default"
            raise ValueError(
                f"CLERK_SYNC_INBOX_DELETE_AFTER_DAYS ({self.inbox_delete_after_days:g}) must be >= "
                f"CLERK_SYNC_INBOX_REDACT_AFTER_DAYS ({self.inbox_redact_after_days:g}{default}): a row's payload "
                "is redacted before the row is deleted. Raise the first, or lower the second with it")
        hard = self.tombstone_delete_after_days
        if hard is not None and hard < self.tombstone_clear_after_days:  # else prune and serve crash later
            raise ValueError("CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS must be >= CLERK_SYNC_TOMBSTONE_CLEAR_AFTER_DAYS "
                             "(a row is cleared before it is deleted)")
        if self.db_transaction_pooler and not self.database_url.startswith(("postgresql", "postgres:")):
            scheme = self.database_url.split(":", 1)[0]  # (ignored silently, it hid a wrong DATABASE_URL)
            raise ValueError(f"CLERK_SYNC_DB_TRANSACTION_POOLER is for PostgreSQL behind a transaction pooler "
                             f"(PgBouncer pool_mode=transaction); DATABASE_URL is {scheme}: unset the setting, or "
                             "point DATABASE_URL at the pooler's PostgreSQL address")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """``repr(settings)`` (a log line, a traceback's locals) shows the URLs with their credentials masked;
        the secrets are ``SecretStr`` already."""
        for name, value in super().__repr_args__():
            yield name, masked_url(value) if name in _URL_FIELDS and value else value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``); errors name the variable."""
        env = dict(os.environ if environ is None else environ)
        known = {name for f in cls.model_fields.values() for name in _aliases(f.validation_alias)}
        values: dict[str, object] = {k: v for k, v in env.items() if k in known}
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = " " + ".".join(str(p) for p in first["loc"]) if first["loc"] else ""  # none: a pair's check
            raise ConfigError(f"Invalid setting{where}: {first['msg'].removeprefix('Value error, ')}") from None

    def webhook_secrets(self) -> tuple[SecretStr, ...]:
        """The secrets to verify against; a missing or malformed secret is a start-up error."""
        if self.webhook_secret is None:
            raise ConfigError(f"CLERK_WEBHOOK_SIGNING_SECRET is not set. {_SECRET_HELP}")
        return parse_webhook_secrets(self.webhook_secret.get_secret_value())

    def database_timeouts(self) -> DatabaseTimeouts:
        """The ``CLERK_SYNC_DB_*`` bounds, for :func:`clerk_sync.store.create_engine`."""
        return DatabaseTimeouts(lock_s=self.db_lock_timeout_s, statement_s=self.db_statement_timeout_s,
                                idle_in_transaction_s=self.db_idle_in_transaction_timeout_s,
                                keepalive_s=self.db_keepalive_s, connect_s=self.db_connect_timeout_s)

    def authorized_parties(self) -> frozenset[str] | None:
        """``CLERK_AUTHORIZED_PARTIES`` (comma-separated origins), or None when unset (azp not checked)."""
        raw = self.authorized_parties_raw or ""
        if not raw.strip():  # (blank: unset, as an empty value is)
            return None
        # as browsers write origins (a token's azp is one): "https://App.example.com:443" is https://app.example.com
        return frozenset(_origin(p.strip().rstrip("/")) for p in raw.split(",") if p.strip())

    def impersonator_roles(self) -> frozenset[str] | None:
        """``CLERK_IMPERSONATOR_ROLES`` for :class:`~clerk_sync.auth.authenticator.Authenticator` (None: any)."""
        raw = self.impersonator_roles_raw
        if raw is None:
            return frozenset({"admin"})  # auth.admin.ADMIN_ROLE: who AdminActions lets impersonate
        if raw.strip() == "*":
            return None
        return frozenset(r.strip() for r in raw.split(",") if r.strip())

    def sqlalchemy_url(self) -> str:
        """``DATABASE_URL`` with the driver we ship (psycopg 3) filled in for bare postgres URLs."""
        url = self.database_url
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                url = "postgresql+psycopg://" + url[len(prefix):]
        _check_driver(url)
        return url

    def sqlite_path(self) -> Path | None:
        """The file of a file-backed SQLite URL, for messages and the dev command."""
        url = self.database_url
        if url.startswith("sqlite:///") and ":memory:" not in url:
            return Path(url.removeprefix("sqlite:///"))
        return None


def _check_driver(url: str) -> None:
    """A driver that is not installed fails here as a ConfigError, not as a traceback from create_engine."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ValueError:  # SQLAlchemy's int(port): a traceback otherwise
        port = _port_text(url)
        raise ConfigError(f"DATABASE_URL's port {port!r} is not a number: write host:port with a numeric port "
                          "(db:5432), or leave ':port' out for the default" if port else
                          "DATABASE_URL cannot be parsed: check its host:port part") from None
    except SQLAlchemyError:  # malformed: create_engine says so, as before
        return
    if parsed.host and "@" in parsed.host:  # the password's '@' ended it early: the rest became the host
        raise ConfigError("DATABASE_URL's host contains '@': a password (or user name) with '@' in it must be "
                          "URL-encoded, '@' as %40 (and ':' as %3A, '/' as %2F, '%' as %25)")
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:  # a scheme SQLAlchemy has no dialect or driver for: its "Can't load plugin" else
        raise ConfigError(_unknown_scheme(parsed.drivername, parsed.get_backend_name())) from None
    except SQLAlchemyError:  # (other refusals: create_engine says so, as before)
        return
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql", "mariadb"):  # SQLAlchemy has it; clerk-sync's SQL does not
        raise ConfigError(f"DATABASE_URL's scheme {parsed.drivername!r} names {backend}, which clerk-sync does not "
                          f"run on. clerk-sync runs on {_SUPPORTED_SCHEMES}: begin DATABASE_URL with one of these")
    if getattr(dialect, "is_async", False):  # every path here is blocking (the async faces use threads)
        raise ConfigError(f"DATABASE_URL's driver {parsed.drivername!r} is asyncio-only, and clerk-sync's database "
                          f"calls are blocking. clerk-sync runs on {_SUPPORTED_SCHEMES}: begin DATABASE_URL with one "
                          "of these (postgresql+asyncpg:// -> postgresql+psycopg://)")
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        top = (exc.name or "").split(".")[0]
        if not top or importlib.util.find_spec(top) is not None:  # installed, but cannot load (libpq, a .so)
            raise ConfigError(f"DATABASE_URL's driver {parsed.drivername!r} cannot be loaded: {exc} (a missing "
                              "system library such as libpq or libmariadb, or a PSYCOPG_IMPL this install "
                              "lacks)") from None
        backend = parsed.get_backend_name()
        extra = {"psycopg": "postgres", "MySQLdb": "mysql", "pymysql": "pymysql"}.get(top)  # (what each extra installs)
        fix = f"pip install 'clerk-sync[{extra}]'" if extra else "pip install the driver"
        if backend == "postgresql" and top != "psycopg":  # (psycopg2, pg8000: not what clerk-sync installs)
            fix = "use postgresql+psycopg:// (psycopg 3: pip install 'clerk-sync[postgres]'), or pip install the driver"
        raise ConfigError(f"DATABASE_URL names the driver {parsed.drivername!r}, but its module "
                          f"{exc.name!r} is not installed: {fix} into this environment") from None


# The URL schemes clerk-sync runs on (README, Install), and the extra that installs each driver.
_SUPPORTED_SCHEMES = ("sqlite:///path.db, postgresql:// (= postgresql+psycopg://, pip install 'clerk-sync[postgres]'), "
                      "mysql:// or mariadb:// (= mysql+mysqldb://, 'clerk-sync[mysql]') and mysql+pymysql:// "
                      "('clerk-sync[pymysql]')")


def _unknown_scheme(scheme: str, backend: str) -> str:
    """Why DATABASE_URL's ``scheme`` (``dialect[+driver]``, never the credentials) cannot be used, and the ones
    that can."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    what = f"DATABASE_URL's scheme {scheme!r} names no database SQLAlchemy knows"
    if "+" in scheme:
        try:
            make_url(f"{backend}://").get_dialect()
        except SQLAlchemyError:
            pass
        else:  # the database is known, the driver after '+' is not
            what = (f"DATABASE_URL's scheme {scheme!r} names the driver {scheme.partition('+')[2]!r}, which "
                    f"SQLAlchemy's {backend} dialect does not have")
    return f"{what}. clerk-sync runs on {_SUPPORTED_SCHEMES}: begin DATABASE_URL with one of these"


def _port_text(url: str) -> str:
    """What follows the host's ':' (never the credentials: they end at the netloc's last '@')."""
    netloc = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    return netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]


def _aliases(alias: object) -> list[str]:
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [c for c in alias.choices if isinstance(c, str)]
    return []
