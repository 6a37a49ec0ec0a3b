"""Personal data in delivery payloads is masked on screen unless an admin reveals it (audited).

An allow-list, not a deny-list: Clerk adds event types and fields (OTP codes and message bodies in
``email.created``/``sms.created``, IP addresses in ``session.created``), and a field we have never
heard of must be hidden by default. Kept in clear: Clerk's field names, identifiers, types, statuses,
roles, permissions, booleans, and numbers only where Clerk puts them (its ``*_at`` millisecond timestamps,
counts and amounts: a phone number can be a number too); every other value is masked. A ``*_at`` string
is no Clerk timestamp (a birth date). The private and unsafe metadata blobs are masked whole; in public
metadata, the app's own object, the keys are the app's words (an e-mail can be one) and are masked too,
all but the ``role`` clerk-sync reads. An ``id``/``*_id`` key is kept only when its value looks like a
Clerk id (``user_2x…``, ``csub_item_2x…``): ``external_id``, ``provider_user_id`` or a ``tax_id`` hold
whatever the app or the identity provider put there (an email, a national number).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "NUMBER_KEYS", "PERSONAL_KEYS", "SAFE_KEYS", "mask"]

#: Keys whose whole value is personal (masked even when it is an object).
PERSONAL_KEYS = frozenset({"private_metadata", "unsafe_metadata"})
#: Keys whose string values are not personal; ``id`` and ``*_id`` keys are too when they hold a Clerk id.
SAFE_KEYS = frozenset({
    "object", "type", "status", "role", "role_name", "permissions", "strategy", "slug", "instance_id",
    "event_type", "reason", "channel", "delivered_by_clerk",
})
#: Keys whose numbers are Clerk's own (besides its ``*_at`` timestamps): counts, amounts, billing periods.
NUMBER_KEYS = frozenset({
    "timestamp", "attempts", "members_count", "max_allowed_memberships", "pending_invitations_count",
    "total_pending_invitations", "total_pending_suggestions", "total_count", "create_organizations_limit",
    "verification_attempts_remaining", "lockout_expires_in_seconds", "amount", "amount_per_block",
    "annual_monthly_amount", "next_payment_amount", "lifetime_paid", "quantity", "block_size",
    "starts_at_block", "ends_after_block", "interval", "billing_date", "next_payment_date", "period_start",
    "period_end", "cycle_days_remaining", "cycle_days_total", "cycle_remaining_percent",
})
MASK = "•••"
# A Clerk id: one of Clerk's object prefixes (those of its API spec and example payloads), "_", base62.
# Any other "word_word" under an *_id key ("john_smith", "emp_4471", a tax id "de_DE123456789") is masked
# like any value: an unknown prefix errs on the side of hiding.
_CLERK_PREFIXES = ("activity", "apl", "client", "cpa", "cpayee", "cpayer", "cplan", "cprd", "cps", "csub_item",
                   "csub", "eac", "ema", "idn", "ins", "inv", "mch", "org", "orgdm", "orgdmn", "orginv", "orgmem",
                   "pa", "perm", "pi", "pm", "role", "samlacc", "samlc", "sess", "sia", "sms", "stmt", "sua",
                   "user", "wle")
_CLERK_ID = re.compile(rf"(?:{'|'.join(_CLERK_PREFIXES)})_[A-Za-z0-9]+")


def mask(value: Any, key: str | None = None) -> Any:
    """A copy of ``value`` with personal values replaced by :data:`MASK` (None and empty values stay)."""
    if key in PERSONAL_KEYS:
        return _hide(value)
    if key is not None and key.endswith("metadata"):
        return _app_object(value, top=True)
    if isinstance(value, dict):
        return {k: mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return value if key is not None and (key in NUMBER_KEYS or key.endswith("_at")) else _hide(value)
    if isinstance(value, str) and not _safe(key, value):
        return _hide(value)
    return value  # strings under a safe key


def _safe(key: str | None, value: str) -> bool:
    if key == "id" or (key is not None and key.endswith("_id") and key not in SAFE_KEYS):
        return _CLERK_ID.fullmatch(value) is not None
    return key is None or key in SAFE_KEYS


def _app_object(value: Any, *, top: bool) -> Any:
    """Public metadata: every key and value masked (numbered, so keys stay apart), but its ``role``."""
    if isinstance(value, dict):
        shown: dict[str, Any] = {}
        for n, (k, v) in enumerate(value.items(), 1):
            if top and k == "role" and isinstance(v, str):
                shown[k] = v
            else:
                shown[f"{MASK}{n}"] = _app_object(v, top=False)
        return shown
    if isinstance(value, list):
        return [_app_object(v, top=False) for v in value]
    return value if isinstance(value, bool) else _hide(value)


def _hide(value: Any) -> Any:
    if value is None or value in ({}, [], ""):
        return value  # "empty" is not personal, and telling it apart helps debugging
    return MASK
