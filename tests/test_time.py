"""The one place where a naive datetime means UTC: ``aware`` attaches UTC and keeps an offset, ``as_utc`` converts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from clerk_sync._time import as_utc, aware, utcnow

PLUS_2 = timezone(timedelta(hours=2))
NOON = datetime(2026, 1, 31, 12, 0, 0, 123456)


def test_utcnow_is_aware_utc_and_now() -> None:
    before = datetime.now(UTC)
    now = utcnow()
    assert now.tzinfo is UTC and before <= now <= datetime.now(UTC)


@pytest.mark.parametrize("helper", [aware, as_utc], ids=["aware", "as_utc"])
def test_a_naive_value_is_read_as_utc(helper: Callable[[datetime], datetime]) -> None:
    read = helper(NOON)
    assert read == NOON.replace(tzinfo=UTC) and read.tzinfo is UTC
    assert read.replace(tzinfo=None) == NOON  # the wall time is kept: nothing is shifted


@pytest.mark.parametrize("zone", [PLUS_2, ZoneInfo("America/New_York"), UTC], ids=["+02:00", "New_York", "UTC"])
def test_aware_keeps_an_aware_value_as_it_is(zone: timezone | ZoneInfo) -> None:
    value = NOON.replace(tzinfo=zone)
    assert aware(value) is value


@pytest.mark.parametrize("zone", [PLUS_2, ZoneInfo("America/New_York"), UTC], ids=["+02:00", "New_York", "UTC"])
def test_as_utc_converts_an_aware_value_to_the_same_instant_in_utc(zone: timezone | ZoneInfo) -> None:
    value = NOON.replace(tzinfo=zone)
    converted = as_utc(value)
    assert converted == value and converted.utcoffset() == timedelta(0) and converted.tzinfo is UTC
    assert converted.timestamp() == aware(value).timestamp()


def test_the_two_differ_only_in_the_zone_an_offset_is_shown_in() -> None:
    value = datetime(2026, 1, 31, 12, 0, tzinfo=PLUS_2)
    assert aware(value).isoformat() == "2026-01-31T12:00:00+02:00"
    assert as_utc(value).isoformat() == "2026-01-31T10:00:00+00:00"


def test_none_stays_none() -> None:
    assert aware(None) is None


def test_as_utc_raises_overflow_for_a_time_with_no_utc_one() -> None:
    with pytest.raises(OverflowError):
        as_utc(datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))))
    assert as_utc(datetime.min) == datetime.min.replace(tzinfo=UTC)  # naive: attached, never shifted
    assert as_utc(datetime.max) == datetime.max.replace(tzinfo=UTC)


def test_the_module_stands_on_the_ground() -> None:
    """Nothing of clerk_sync is imported by it, so every layer may use it (tests/test_layers.py places it at 0)."""
    import ast
    import inspect

    import clerk_sync._time as module

    tree = ast.parse(inspect.getsource(module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m and m.startswith("clerk_sync")]
