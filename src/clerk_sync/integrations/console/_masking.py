"""Personal data in delivery payloads is masked on screen unless an admin reveals it (audited).

An allow-list, not a deny-list: Clerk adds event types and fields (OTP codes and message bodies in
``email.created``/``sms.created``, IP addresses in ``session.created``), and a field we have never
heard of must be hidden by default. Kept in clear: Clerk identifiers, types, statuses, roles, permissions,
timestamps and every number or boolean; every other string is masked, and the private and unsafe
metadata blobs are masked whole. An ``id``/``*_id`` key is kept only when its value looks like a Clerk id
(``user_2x…``, ``csub_item_2x…``): ``external_id``, ``provider_user_id`` or a ``tax_id`` in public metadata
hold whatever the app or the identity provider put there (an email, a national number).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "PERSONAL_KEYS", "SAFE_KEYS", "mask"]

#: Keys whose whole value is personal (masked even when it is an object).
PERSONAL_KEYS = frozenset({"private_metadata", "unsafe_metadata"})
#: Keys whose string values are not personal; ``id`` and ``*_id`` keys are too when they hold a Clerk id.
SAFE_KEYS = frozenset({
    "object", "type", "status", "role", "role_name", "permissions", "strategy", "slug", "instance_id",
    "event_type", "abandon_at", "expire_at", "timestamp", "reason", "channel", "delivered_by_clerk",
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
    if isinstance(value, dict):
        return {k: mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key) for v in value]
    if isinstance(value, str) and not _safe(key, value):
        return _hide(value)
    return value  # numbers, booleans, None, and strings under a safe key


def _safe(key: str | None, value: str) -> bool:
    if key == "id" or (key is not None and key.endswith("_id") and key not in SAFE_KEYS):
        return _CLERK_ID.fullmatch(value) is not None
    return key is None or key in SAFE_KEYS or key.endswith("_at")


def _hide(value: Any) -> Any:
    if value is None or value in ({}, [], ""):
        return value  # "empty" is not personal, and telling it apart helps debugging
    return MASK
