"""The default retry schedule keeps a failing hook job for hours, not minutes: a downstream's outage of an hour
or two (a mail provider, the app behind a forwarding sink) must not kill its jobs. With 10 attempts from 2 s
the last one came 17 minutes after the first, while the docs promised about 4 hours."""

from __future__ import annotations

from datetime import timedelta

from clerk_sync.hooks import Backoff


def test_the_default_backoff_spans_about_four_hours() -> None:
    backoff = Backoff()
    waits = [backoff.delay(attempt) for attempt in range(1, backoff.max_attempts)]  # between the attempts
    assert timedelta(hours=3.5) <= sum(waits, timedelta()) <= timedelta(hours=5)
    assert max(waits) == timedelta(hours=1)  # never more than an hour between two tries
