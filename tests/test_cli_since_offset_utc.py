"""``--since`` with an offset: SQLite stores a time as its clock reading and drops the offset,
so ``replay --since 2026-01-31T12:00+02:00`` selected from 12:00 UTC there, two hours late, and reconcile
kept the shifted time. The parsed value is UTC on every face now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from clerk_sync.cli._args import parse_since
from clerk_sync.ingest import replay_deliveries
from clerk_sync.store import Store
from clerk_sync.tables import webhook_events


def test_since_is_returned_in_utc_whatever_offset_it_was_written_with() -> None:
    assert parse_since("2026-01-31T12:00:00+02:00") == datetime(2026, 1, 31, 10, 0, tzinfo=UTC)
    assert parse_since("2026-01-31T12:00:00+02:00").utcoffset() == timedelta(0)  # type: ignore[union-attr]
    assert parse_since("2026-01-31T12:00:00") == datetime(2026, 1, 31, 12, 0, tzinfo=UTC)  # naive: UTC
    assert parse_since("2026-01-31T12:00:00Z") == datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_since(None) is None


@pytest.mark.parametrize("offset", ["+02:00", "-05:00"])
def test_replay_since_with_an_offset_selects_by_the_instant_on_every_store(store: Store, offset: str) -> None:
    """Failed deliveries received each hour from 06:00 to 18:00 UTC; ``--since 12:00`` in another zone
    names one instant, and replay takes exactly the deliveries received at or after it."""
    start = datetime(2026, 1, 31, 6, 0, tzinfo=UTC)
    with store.engine.begin() as conn:
        for hour in range(13):
            conn.execute(webhook_events.insert().values(
                svix_id=f"msg_since_{hour}", type="user.updated", received_at=start + timedelta(hours=hour),
                payload={"type": "user.updated", "data": {}}, status="failed", last_error="test"))
    since = parse_since(f"2026-01-31T12:00:00{offset}")
    assert since is not None
    expected = sum(1 for hour in range(13) if start + timedelta(hours=hour) >= since)
    assert 0 < expected < 13
    assert replay_deliveries(store, status="failed", since=since).total == expected


def test_settings_repr_masks_the_credentials_of_its_urls() -> None:
    """``repr(settings)`` lands in logs and tracebacks' locals: the database and Redis URLs' passwords (a
    password with an unencoded ``/`` too, and a ``?password=`` parameter) read ``***`` there, and only there."""
    from clerk_sync.config import Settings

    url = "postgresql+psycopg://app:hunter2@db.internal/app?sslpassword=keyphrase"
    settings = Settings.from_env({"DATABASE_URL": url, "REDIS_URL": "redis://:pa/ss@cache:6379/0"})
    shown = repr(settings)
    assert "hunter2" not in shown and "keyphrase" not in shown and "pa/ss" not in shown
    assert "db.internal/app" in shown and "cache:6379/0" in shown  # what the URL points at stays readable
    assert settings.database_url == url  # the value itself is untouched


def test_a_since_out_of_range_in_utc_is_a_config_error_not_a_traceback() -> None:
    from clerk_sync.errors import ConfigError

    for value in ("0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"):
        with pytest.raises(ConfigError, match="out of range"):
            parse_since(value)


def test_a_huge_since_is_not_echoed_whole() -> None:
    """Review finding: ``replay --since "2026-<100 KB>"`` printed the whole argument in its one error line."""
    from clerk_sync.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        parse_since("2026-" + "x" * 100_000)
    assert len(str(refused.value)) < 300 and "100007 characters" in str(refused.value), str(refused.value)[:300]
    with pytest.raises(ConfigError, match=r"--since 'yesterday' is not an ISO 8601 date or time"):
        parse_since("yesterday")  # a short one whole, as before
