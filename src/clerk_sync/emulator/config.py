"""Settings for the local Clerk emulator.

The emulator is configured once, at the edge, with an immutable :class:`EmulatorConfig`.
Knobs that tests flip at run time (faults, latency, outage) are copied from it into the
mutable :class:`~clerk_sync.emulator.faults.FaultSettings` owned by the running emulator.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

__all__ = [
    "DEFAULT_ROLE_PERMISSIONS",
    "SVIX_RETRY_SCHEDULE_S",
    "EmulatorConfig",
    "generate_webhook_secret",
    "webhook_signer",
]

#: Delays before each delivery attempt, as Svix documents them (immediately, 5 s, 5 min,
#: 30 min, 2 h, 5 h, 10 h, 10 h): eight attempts over about 27.6 hours.
SVIX_RETRY_SCHEDULE_S: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)

_SYSTEM_PERMISSIONS: tuple[str, ...] = (
    "org:sys_profile:manage",
    "org:sys_profile:delete",
    "org:sys_memberships:read",
    "org:sys_memberships:manage",
    "org:sys_domains:read",
    "org:sys_domains:manage",
    "org:sys_billing:read",
    "org:sys_billing:manage",
)

#: Permissions each role grants, as Clerk's default roles do.  Custom roles and custom
#: (non-``org:sys_*``) permissions can be added through ``EmulatorConfig.role_permissions``.
DEFAULT_ROLE_PERMISSIONS: Mapping[str, tuple[str, ...]] = {
    "org:admin": _SYSTEM_PERMISSIONS,
    "org:member": ("org:sys_memberships:read", "org:sys_billing:read"),
}


def generate_webhook_secret() -> str:
    """Return a fresh ``whsec_`` secret of 24 random bytes, the size the Svix server uses."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def webhook_signer(secret: str) -> Webhook:
    """standardwebhooks' signer for ``secret``, or a ``ValueError`` saying how to fix the secret.

    Built once at start-up: a secret it cannot use fails there, not at the first delivery.
    """
    try:
        return Webhook(secret)
    except (EmptyWebhookSecretError, ValueError) as exc:  # binascii.Error is a ValueError
        raise ValueError(
            f"the webhook signing secret cannot sign ({exc}): give 'whsec_' followed by base64 key bytes "
            "(as generate_webhook_secret() makes), or leave it unset to have one generated"
        ) from None


def _env_positive(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:  # NaN too
        raise ValueError(f"{name} must be a number greater than 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything the emulator needs to know before it starts.

    ``webhook_secret=None`` means "generate one"; read the effective secret from
    :attr:`effective_webhook_secret` (it is fixed when the config object is created, so
    every copy made with :func:`dataclasses.replace` keeps it).
    """

    secret_key: str = "sk_test_emulator"  # noqa: S105 (the emulator's well-known test key)
    webhook_url: str | None = None
    webhook_secret: str | None = None
    instance_id: str = "ins_emulator0000000000000000000"
    # Backend API rate limit, per secret key (Clerk development instances: 100 / 10 s).
    rate_limit_requests: int = 100
    rate_limit_window_s: float = 10.0
    # Clerk's per-object limits (FACTS §4.4): PATCH /users/{id}, PATCH|PUT /users/{id}/metadata 10 requests / 10 s per
    # user; the same per organization for its update/metadata, per membership for its update/metadata; each route
    # its own window, on the emulator's clock. None: no per-object limit.
    object_rate_limit_requests: int | None = 10
    object_rate_limit_window_s: float = 10.0
    # Actor tokens (impersonation) a month before POST /actor_tokens answers 402, as on plans that limit
    # them (Clerk's free plans: 5); None: no limit.
    actor_tokens_per_month: int | None = None
    # The deepest ``GET /users`` offset answered; a deeper one times out (504), as Clerk's spec warns a large
    # offset "gets progressively slower and eventually times out" (cursor paging, ``starting_after``, does not).
    # None: any offset is answered.
    max_user_offset: int | None = None
    # Divides the Svix retry delays, so tests can run the whole schedule in milliseconds.
    time_scale: float = 1.0
    retry_schedule_s: tuple[float, ...] = SVIX_RETRY_SCHEDULE_S
    # Each retry delay times a random factor in [1 - retry_jitter, 1 + retry_jitter]; Svix's is 0.2. Off by
    # default so a test can name the next attempt's time exactly.
    retry_jitter: float = 0.0
    delivery_timeout_s: float = 15.0
    # Webhook deliveries in flight at once. Svix delivers a regular endpoint's messages independently and
    # concurrently, in no guaranteed order (FACTS §2.3); 1 (the default) sends them one at a time, in order.
    # Test a receiver with more than 1 (e.g. 4) to meet the interleavings Clerk's webhooks produce. Also settable
    # at run time (``set_faults(delivery_concurrency=4)``, ``POST /_emulator/faults``); ``reset()`` restores it.
    delivery_concurrency: int = 1
    # Backend API fault knobs (also settable at run time).
    latency_s: float = 0.0
    error_rate: float = 0.0
    outage: bool = False
    # Webhook delivery fault knobs, each a probability in [0, 1].
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    drop_then_redeliver_rate: float = 0.0
    fail_rate: float = 0.0
    # How long a message picked for reordering waits for a successor before it is sent anyway.
    reorder_hold_s: float = 0.5
    seed: int | None = None
    # Frontend API URL used as the ``iss`` claim; None means "this server's own base URL".
    frontend_url: str | None = None
    authorized_party: str | None = "http://localhost:3000"
    session_token_lifetime_s: int = 60
    # The instance's session token claims: 2 (Clerk's default since 2025-04-14: ``v``, ``sts``, ``o``/``fea``) or 1
    # (instances not yet updated in the Dashboard: top-level ``org_id``/``org_slug``/``org_role``/``org_permissions``).
    session_token_version: int = 2
    session_token_template: Mapping[str, Any] | None = None
    jwt_templates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    role_permissions: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ROLE_PERMISSIONS))
    # How long a rotated-out signing key stays in the JWKS.
    key_grace_s: float = 3600.0
    _generated_secret: str = field(default_factory=generate_webhook_secret, repr=False)

    @property
    def effective_webhook_secret(self) -> str:
        """The ``whsec_`` secret deliveries are signed with."""
        return self.webhook_secret or self._generated_secret

    @property
    def webhook_secret_was_generated(self) -> bool:
        """True when no secret was configured, so the caller should show the generated one."""
        return self.webhook_secret is None

    def __post_init__(self) -> None:
        if not self.rate_limit_requests >= 1:  # 0 refused every request with a 429, never saying why
            raise ValueError(f"rate_limit_requests must be at least 1 (Backend API requests allowed per "
                             f"{self.rate_limit_window_s:g} s; Clerk's development instances allow 100), "
                             f"got {self.rate_limit_requests!r}")
        if not self.rate_limit_window_s > 0:
            raise ValueError(f"rate_limit_window_s must be greater than 0, got {self.rate_limit_window_s!r}")
        if self.object_rate_limit_requests is not None and not self.object_rate_limit_requests >= 1:
            raise ValueError(f"object_rate_limit_requests must be at least 1, or None for no per-object limit, "
                             f"got {self.object_rate_limit_requests!r}")
        if not self.object_rate_limit_window_s > 0:
            raise ValueError(f"object_rate_limit_window_s must be greater than 0, got "
                             f"{self.object_rate_limit_window_s!r}")
        if isinstance(self.delivery_concurrency, bool) or not (
                isinstance(self.delivery_concurrency, int) and self.delivery_concurrency >= 1):
            raise ValueError(f"delivery_concurrency must be an integer of at least 1 (webhook deliveries in flight "
                             f"at once), got {self.delivery_concurrency!r}")
        if self.session_token_version not in (1, 2) or isinstance(self.session_token_version, bool):
            raise ValueError(f"session_token_version must be 1 or 2 (Clerk's session token claims), got "
                             f"{self.session_token_version!r}")
        if not 0 <= self.retry_jitter < 1:  # NaN too
            raise ValueError(f"retry_jitter must be at least 0 and below 1 (Svix's is 0.2), got {self.retry_jitter!r}")
        if not self.time_scale > 0:  # NaN too; 0 would divide the retry delays by zero
            raise ValueError(f"time_scale must be greater than 0 (it divides the Svix retry delays), "
                             f"got {self.time_scale!r}")
        webhook_signer(self.effective_webhook_secret)

    def replace(self, **changes: Any) -> EmulatorConfig:
        """Return a copy with ``changes`` applied (the generated secret is kept)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> EmulatorConfig:
        """Build a config from ``CLERK_SECRET_KEY``, ``CLERK_WEBHOOK_SIGNING_SECRET`` and friends.

        Also read: ``CLERK_EMULATOR_WEBHOOK_URL``, ``CLERK_EMULATOR_TIME_SCALE``,
        ``CLERK_EMULATOR_SEED``.  Explicit ``overrides`` win over the environment.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("CLERK_SECRET_KEY"):
            values["secret_key"] = env["CLERK_SECRET_KEY"]
        if env.get("CLERK_WEBHOOK_SIGNING_SECRET"):
            values["webhook_secret"] = env["CLERK_WEBHOOK_SIGNING_SECRET"]
            try:
                webhook_signer(values["webhook_secret"])
            except ValueError as exc:  # say where the secret came from
                raise ValueError(f"CLERK_WEBHOOK_SIGNING_SECRET: {exc}") from None
        if env.get("CLERK_EMULATOR_WEBHOOK_URL"):
            values["webhook_url"] = env["CLERK_EMULATOR_WEBHOOK_URL"]
        if "time_scale" not in overrides:
            values["time_scale"] = _env_positive(env, "CLERK_EMULATOR_TIME_SCALE", 1.0)
        seed = env.get("CLERK_EMULATOR_SEED")
        if seed and "seed" not in overrides:
            try:
                values["seed"] = int(seed)
            except ValueError:
                raise ValueError(f"CLERK_EMULATOR_SEED must be an integer, got {seed!r}") from None
        values.update(overrides)
        return cls(**values)
