"""Personal data in delivery payloads is masked on screen unless an admin reveals it (audited)."""

from __future__ import annotations

from typing import Any

__all__ = ["MASK", "PERSONAL_KEYS", "mask"]

#: Keys whose values are personal: emails, names, phone numbers, images, and private metadata whole.
PERSONAL_KEYS = frozenset({
    "email_address", "email", "first_name", "last_name", "username", "phone_number",
    "image_url", "profile_image_url", "identifier", "private_metadata", "unsafe_metadata",
})
MASK = "•••"


def mask(value: Any) -> Any:
    """A copy of ``value`` with every personal key's value replaced by :data:`MASK` (None stays None)."""
    if isinstance(value, dict):
        return {k: (_hide(v) if k in PERSONAL_KEYS else mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def _hide(value: Any) -> Any:
    if value is None or value in ({}, [], ""):
        return value  # "empty" is not personal, and telling it apart helps debugging
    return MASK
