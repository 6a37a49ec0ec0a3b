"""clerk_sync.testing as an adopter's test suite uses it (review: an adopter writing their own app's tests).

Findings: ``reset()`` forgot a webhook URL set at run time and ``wait_for_deliveries()`` then returned as if
all was delivered; a refused helper call said only "422 Unprocessable Entity"; the helpers spent the app's
rate-limit budget; a delivery timeout named message ids only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from clerk_sync.errors import ClerkAPIError, ClerkSyncError
from clerk_sync.testing import EmulatorServer
from tests.emulator.support import Receiver, served_receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with served_receiver() as recv:
        yield recv


# -- 1. reset() keeps the webhook URL; wait_for_deliveries() says when there is none ----------------------------


def test_reset_keeps_the_webhook_url_set_at_run_time(receiver: Receiver) -> None:
    """The usual pattern: the app's port is known only after the emulator started, so the URL is set later;
    the per-test reset used to restore the configured (no) URL, and every later delivery went nowhere."""
    with EmulatorServer(seed=1, time_scale=1000.0) as clerk:
        clerk.set_webhook_url(receiver.url)
        clerk.reset()
        user = clerk.create_user("after-reset@example.com")
        clerk.wait_for_deliveries()
        assert [entry["status"] for entry in clerk.deliveries()] == ["succeeded"]
        assert [r.json()["data"]["id"] for r in receiver.received] == [user["id"]]
        assert clerk.request("GET", "/_emulator/state")["webhook_url"] == receiver.url


def test_a_pause_holds_the_messages_the_wait_says_so_and_the_reset_drops_them(receiver: Receiver) -> None:
    """``set_webhook_url(None)`` is a test's "the webhook is late": the messages are held (they used to be
    logged ``no_endpoint`` and lost, the wait silent); waiting for them raises, saying what to do; the next
    test (after the reset) does not get them, and gets its own deliveries again."""
    with EmulatorServer(seed=1, time_scale=1000.0, webhook_url=receiver.url) as clerk:
        clerk.set_webhook_url(None)
        clerk.create_user("late@example.com")
        with pytest.raises(RuntimeError, match=r"1 webhook message\(s\) are held.*set_webhook_url\(.*reset\(\)"):
            clerk.wait_for_deliveries()
        assert [entry["status"] for entry in clerk.deliveries()] == ["pending"]
        clerk.reset()
        clerk.create_user("next-test@example.com")
        clerk.wait_for_deliveries()
        assert [entry["status"] for entry in clerk.deliveries()] == ["succeeded"]
        assert len(receiver.received) == 1
        assert receiver.received[0].json()["data"]["email_addresses"][0]["email_address"] == "next-test@example.com"


def test_waiting_for_messages_that_had_no_webhook_url_says_so() -> None:
    with EmulatorServer(seed=1) as clerk:
        user = clerk.create_user("nowhere@example.com")
        with pytest.raises(RuntimeError, match=r"1 webhook message\(s\) were not delivered: no webhook URL is set") \
                as info:
            clerk.wait_for_deliveries()
        message = str(info.value)
        assert clerk.deliveries()[0]["id"] in message and "(user.created)" in message
        assert "set_webhook_url(" in message
        clerk.wait_for_deliveries()  # each message is reported once
        clerk.emulator.mint_session_token(user["id"])  # in-process, the same check
        with pytest.raises(RuntimeError, match=r"\(session.created\).*set_webhook_url"):
            clerk.emulator.wait_for_deliveries()


# -- 2. a refused helper call carries Clerk's reason ------------------------------------------------------------


def _refusal(call: Any) -> ClerkAPIError:
    with pytest.raises(ClerkAPIError) as info:
        call()
    error = info.value
    assert isinstance(error, ClerkSyncError)
    assert isinstance(error, httpx.HTTPStatusError)  # what the helpers raised before: `except` clauses still match
    assert error.response.status_code == error.status
    return error


def test_a_refused_helper_call_names_clerks_code_message_and_parameter() -> None:
    with EmulatorServer(seed=1) as clerk:
        user = clerk.create_user("taken@example.com")
        org = clerk.create_organization("Elsewhere")
        taken = _refusal(lambda: clerk.create_user("taken@example.com"))
        assert (taken.status, taken.clerk_code, taken.method, taken.path) == (
            422, "form_identifier_exists", "POST", "/v1/users")
        assert getattr(taken, "param_name", None) == "email_address"
        assert getattr(taken, "long_message", None) == "That email address is taken. Please try another."
        assert str(taken) == ("POST /v1/users answered 422 form_identifier_exists: That email address is taken. "
                              "Please try another. (param_name: email_address)")
        assert taken.trace_id

        outsider = _refusal(lambda: clerk.mint_session_token(user["id"], org["id"]))
        assert (outsider.clerk_code, getattr(outsider, "param_name", None)) == (
            "form_param_value_invalid", "active_organization_id")
        assert "user is not a member" in str(outsider)

        knob = _refusal(lambda: clerk.set_faults(bogus=1))
        assert (knob.status, knob.path) == (422, "/_emulator/faults")
        assert "unknown fault setting 'bogus'" in str(knob)

        short = _refusal(lambda: clerk.mint_session_token(user["id"], expires_in_seconds=5))
        assert getattr(short, "param_name", None) == "expires_in_seconds"
        assert "expires_in_seconds must be at least 30" in str(short)
        assert short.path is not None and short.path.endswith("/tokens")


# -- 3. the helpers do not spend the app's rate-limit budget ----------------------------------------------------


def test_the_helpers_do_not_spend_the_apps_rate_limit_budget() -> None:
    """A test signing in many users got 429 from the helper, and the app's own JIT calls 429 -> 503
    depending on timing. The helpers are exempt; the app's calls are limited as Clerk limits them."""
    with EmulatorServer(seed=1, rate_limit_requests=3, rate_limit_window_s=3600) as clerk, \
            httpx.Client(base_url=clerk.api_url, headers={"Authorization": f"Bearer {clerk.secret_key}"}) as app:
        for i in range(10):  # 30 helper calls, ten times the budget
            user = clerk.create_user(f"user{i}@example.com")
            clerk.mint_session_token(user["id"])
        assert [app.get(f"/users/{user['id']}").status_code for _ in range(3)] == [200, 200, 200]
        refused = app.get(f"/users/{user['id']}")  # the app's own budget, untouched by the helpers, is spent now
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) > 0
        error = refused.json()["errors"][0]
        assert error["code"] == "too_many_requests"
        assert error["long_message"].startswith("Too many requests, retry later")  # Clerk's, then the knob
        assert "3 Backend API requests per 3600 s" in error["long_message"]
        assert "EmulatorServer(rate_limit_requests=" in error["long_message"]
        assert clerk.create_user("still@example.com")["id"]  # the helpers still work, the app still waits
        assert app.get("/users").status_code == 429


# -- 4. a delivery timeout says why -----------------------------------------------------------------------------


def test_a_delivery_timeout_names_each_messages_url_last_error_and_next_attempt() -> None:
    now = 1_700_000_000.0  # the emulator's clock stands still: the retry after the first failure never comes
    with socket.socket() as closed:  # bound (nobody else gets the port), never listening: connection refused
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/webhooks/clerk"
        with EmulatorServer(seed=1, webhook_url=dead, clock=lambda: now) as clerk:
            clerk.create_user("unreachable@example.com")
            deadline = time.monotonic() + 10
            while not clerk.deliveries()[0]["attempts"]:  # the first attempt's outcome, not a time threshold
                assert time.monotonic() < deadline, "the first delivery attempt was never made"
                time.sleep(0.01)
            msg_id = clerk.deliveries()[0]["id"]
            with pytest.raises(TimeoutError) as info:
                clerk.wait_for_deliveries(timeout=0.05)
    message = str(info.value)
    assert message.startswith("webhook deliveries still pending after 0.05 s:")
    line = next(line for line in message.splitlines() if msg_id in line)
    assert f"{msg_id} (user.created) -> {dead}: attempt 1 error ConnectError(" in line
    assert "next attempt in 5.0 s, at 2023-11-14T22:13:25+00:00 (next_attempt_at=1700000005.000)" in line
    assert "divided by time_scale=1" in message and "EmulatorServer(time_scale=1000)" in message


def test_a_retry_that_comes_due_during_a_pause_is_held_not_left_pending(receiver: Receiver) -> None:
    """Review of the helpers' fixes: a message whose retry came due while deliveries were paused was skipped
    and never rescheduled, so it stayed ``pending`` and every later wait ran into its timeout (then it was
    logged ``no_endpoint`` and lost). It is held with the pause: the wait raises at once, the next URL gets it."""
    now = [1_700_000_000.0]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/webhooks/clerk"
        with EmulatorServer(seed=1, webhook_url=dead, clock=lambda: now[0]) as clerk:
            clerk.create_user("paused-retry@example.com")
            deadline = time.monotonic() + 10
            while not clerk.deliveries()[0]["attempts"]:  # the first attempt's outcome, not a time threshold
                assert time.monotonic() < deadline, "the first delivery attempt was never made"
                time.sleep(0.01)
            clerk.set_webhook_url(None)
            now[0] += 60  # the retry (5 s after the failure) is due, in the pause
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="are held"):
                clerk.wait_for_deliveries(timeout=10)
            assert time.monotonic() - started < 5  # at once, not the timeout
            clerk.set_webhook_url(receiver.url)
            clerk.wait_for_deliveries(timeout=10)
            assert [entry["status"] for entry in clerk.deliveries()] == ["succeeded"]
            assert receiver.ids() == [clerk.deliveries()[0]["id"]]
