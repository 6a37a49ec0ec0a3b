"""Time, in one place: now is aware UTC, and a naive datetime means UTC.

SQLite and MySQL/MariaDB hand stored times back naive (what they hold is UTC), and a time a user writes without
an offset (``--since 2026-01-31``) is read as UTC too. :func:`aware` only attaches UTC to a naive value and keeps
an aware one in its own zone; :func:`as_utc` also converts an aware one to UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

__all__ = ["as_utc", "aware", "utcnow"]


def utcnow() -> datetime:
    """Now, aware, in UTC."""
    return datetime.now(UTC)


@overload
def aware(value: datetime) -> datetime: ...


@overload
def aware(value: None) -> None: ...


def aware(value: datetime | None) -> datetime | None:
    """``value`` with a time zone: a naive one is read as UTC, an aware one is returned as it is (not converted);
    ``None`` stays ``None``."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC: a naive one is read as UTC, an aware one converted. Raises ``OverflowError`` for an
    aware time whose UTC one falls outside the years 1-9999 (``0001-01-01T00:30+01:00``)."""
    return aware(value).astimezone(UTC)
