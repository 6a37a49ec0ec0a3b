"""Argument parsing shared by the commands."""

from __future__ import annotations

from datetime import UTC, datetime

from clerk_sync.engine import DeliveryStatus
from clerk_sync.errors import ConfigError

__all__ = ["STORED_STATUSES", "parse_since"]

#: What ``replay --status`` takes on every face: the statuses a delivery is stored with (a typo replayed nothing
#: and exited 0, as if nothing were failed).
STORED_STATUSES = sorted(s.value for s in DeliveryStatus if s is not DeliveryStatus.DUPLICATE)


def parse_since(value: str | None) -> datetime | None:
    """``--since`` as ISO 8601 (``2026-01-31``, ``2026-01-31T12:00:00Z``, offsets); naive means UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since {value!r} is not an ISO 8601 date or time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
