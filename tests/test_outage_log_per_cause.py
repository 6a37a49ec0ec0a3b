"""The 503 body says the cause is in the service's log: an outage's log line is throttled per cause, not per
error class, so a cause that changes is logged at once (and a repeating one stays throttled)."""

from __future__ import annotations

import pytest
import structlog

from clerk_sync.errors import ClerkSyncError, StoreError, TokenKeysUnavailable
from clerk_sync.integrations import http as error_table


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(error_table, "_logged", {})
    monkeypatch.setattr(error_table, "_now", clock, raising=False)
    return clock


def _causes_logged(*errors: ClerkSyncError) -> list[tuple[str, int]]:
    with structlog.testing.capture_logs() as logs:
        for exc in errors:
            error_table.error_response(exc)
    return [(entry["cause"], entry["also_answered_since_last_line"])
            for entry in logs if entry["event"] == "answered_unavailable"]


def test_a_new_cause_of_the_same_error_class_is_logged_at_once(clock: Clock) -> None:
    """Walkthrough: the operator fixed CLERK_API_URL's scheme, then the wrong secret key made the JWKS answer
    401; the 401 was only counted for the rest of the first cause's window (the body pointed at the log)."""
    scheme = TokenKeysUnavailable("no signing keys yet: the JWKS fetch from ftp://api.clerk.com/v1/jwks failed")
    refused = TokenKeysUnavailable("no signing keys yet: Clerk refused CLERK_SECRET_KEY (401)")
    assert _causes_logged(scheme, scheme, scheme) == [(str(scheme), 0)]
    clock.now += 1
    assert _causes_logged(refused, refused) == [(str(refused), 0)]  # at once, then throttled
    clock.now += error_table._LOG_EVERY_S
    assert _causes_logged(refused, scheme) == [(str(refused), 1), (str(scheme), 2)]  # each with its own count


def test_numbers_in_a_message_do_not_make_a_new_cause(clock: Clock) -> None:
    """A duration or an address that changes with every answer is the same outage: one line per window."""
    errors = [StoreError(f"database timeout: statement_timeout (canceling statement after {ms}.{ms % 7} ms at "
                         f"0x7f{ms:x}); nothing was applied, retry later") for ms in range(5000, 5020)]
    assert _causes_logged(*errors) == [(str(errors[0]), 0)]
    clock.now += error_table._LOG_EVERY_S
    assert _causes_logged(errors[-1]) == [(str(errors[-1]), 19)]


def test_the_causes_held_are_bounded(clock: Clock) -> None:
    """Causes whose words differ (hosts named by letters) are all logged, and memory stays bounded."""
    hosts = [f"db-{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(300)]
    logged = _causes_logged(*(StoreError(f"database error: could not translate host name {h}") for h in hosts))
    assert len(logged) == 300 and len(error_table._logged) == error_table._CAUSES_HELD


def test_an_http_status_the_message_quotes_is_part_of_the_cause(clock: Clock) -> None:
    """Review: every number was masked, so the JWKS fetch's "answered 429" then "answered 400" (a different
    outage) were one cause, the second only counted."""
    busy = TokenKeysUnavailable("no signing keys yet: https://api.clerk.com/v1/jwks answered 429")
    bad = TokenKeysUnavailable("no signing keys yet: https://api.clerk.com/v1/jwks answered 400")
    refused = TokenKeysUnavailable("no signing keys yet: Clerk refused CLERK_SECRET_KEY (403)")
    assert _causes_logged(busy, bad, refused, busy) == [(str(busy), 0), (str(bad), 0), (str(refused), 0)]


def test_numbers_stuck_to_units_or_ids_do_not_make_a_new_cause(clock: Clock) -> None:
    """Review of the fix above: ``\\b\\d+\\b`` left "2.53s" as "#.53s" (a digit after a dot is no word start? it
    is; but "53s" is not a word): each duration became a cause of its own."""
    errors = [StoreError(f"database timeout: waited {n / 100:.2f}s on user_{n}x for the lock (12ms budget)")
              for n in range(250, 260)]
    assert _causes_logged(*errors) == [(str(errors[0]), 0)]


def test_a_figure_in_parentheses_is_not_a_status(clock: Clock) -> None:
    """Review: every number right after "(" was kept, so "(12345 ms)" made each answer a cause of its own."""
    errors = [StoreError(f"database timeout: canceling statement ({ms} ms); nothing was applied, retry later")
              for ms in (12345, 12346, 15000)]
    assert _causes_logged(*errors) == [(str(errors[0]), 0)]
