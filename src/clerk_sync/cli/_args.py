"""Argument parsing shared by the commands."""

from __future__ import annotations

from datetime import UTC, datetime

from clerk_sync.errors import ConfigError

__all__ = ["parse_since"]


def parse_since(value: str | None) -> datetime | None:
    """``--since`` as ISO 8601 (``2026-01-31``, ``2026-01-31T12:00:00Z``, offsets); naive means UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since {value!r} is not an ISO 8601 date or time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
