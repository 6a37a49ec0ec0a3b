"""The half-open probe: any answer from Clerk (a 429 too) closes the circuit, and a probe that ends without
a verdict (our budget refused it, the caller gave up) frees its slot for the next call."""

from __future__ import annotations

import anyio
import httpx
import pytest

from clerk_sync.clerk_api import AsyncClerkClient, CircuitBreaker, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.errors import ClerkUnavailable, RateLimited
from tests.conftest import FakeClock

_USER = {"id": "user_1", "object": "user"}


def _tripped(clock: FakeClock) -> CircuitBreaker:
    """A breaker whose circuit opened ``reset_s`` ago: the next call is the probe."""
    breaker = CircuitBreaker(threshold=1, reset_s=5.0, clock=clock)
    breaker.failure()
    clock.t += 5.0
    return breaker


def _busy_then_up() -> httpx.MockTransport:
    answers = iter([httpx.Response(429, headers={"retry-after": "0"})])
    return httpx.MockTransport(lambda request: next(answers, httpx.Response(200, json=_USER)))


def test_a_probe_answered_429_closes_the_circuit_and_the_call_goes_on() -> None:
    """Review: the 429 left the probe in flight, the retry met the breaker's own probe (ClerkUnavailable
    "circuit open" at once), and the breaker refused every call for another reset_s."""
    breaker = _tripped(FakeClock())
    with ClerkClient("sk_test_x", api_url="https://api.clerk.com", transport=_busy_then_up(), breaker=breaker,
                     budget=LocalBudget(RateLimit(1000, 1.0))) as clerk:
        assert clerk.get_user("user_1")["id"] == "user_1"
        assert clerk.stats.by_status == {429: 1, 200: 1}
    assert not breaker.is_open and not breaker.refusing()


def test_an_async_probe_answered_429_closes_the_circuit() -> None:
    breaker = _tripped(FakeClock())

    async def main() -> None:
        async with AsyncClerkClient("sk_test_x", api_url="https://api.clerk.com", transport=_busy_then_up(),
                                    breaker=breaker, budget=LocalBudget(RateLimit(1000, 1.0))) as clerk:
            assert (await clerk.get_user("user_1"))["id"] == "user_1"

    anyio.run(main)
    assert not breaker.is_open


def test_a_probe_our_budget_refuses_frees_the_slot_for_the_next_call() -> None:
    clock = FakeClock()
    breaker = _tripped(clock)
    budget = LocalBudget(RateLimit(10, 60.0), clock=FakeClock())  # frozen: drained stays drained
    while budget.reserve(max_wait=0).wait == 0:
        pass
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200, json=_USER))
    clerk = ClerkClient("sk_test_x", api_url="https://api.clerk.com", transport=transport, breaker=breaker,
                        budget=budget, retry=RetryPolicy(deadline_s=1.0))
    with clerk, pytest.raises(RateLimited, match="our Clerk request budget"):
        clerk.get_user("user_1")
    assert sent == [] and breaker.is_open  # no verdict on Clerk either way...
    assert not breaker.refusing() and breaker.check() is None  # ...and the next call probes at once


def test_releasing_a_probe_frees_only_its_own_slot() -> None:
    clock = FakeClock()
    breaker = _tripped(clock)
    wait, first = breaker.admit()
    assert wait is None and first is not None
    breaker.failure()  # the first probe's verdict: open again
    clock.t += 5.0
    second = breaker.admit()[1]
    breaker.release(first)  # late: the first call ends after its verdict
    assert second is not None and breaker.refusing()  # the second probe still holds the slot
    breaker.release(second)
    assert not breaker.refusing()


def test_a_session_revoke_whose_answer_was_lost_is_not_sent_again() -> None:
    """Review: after a read timeout the revoke was sent again; Clerk had revoked it, answered the second one
    400 "not active", and the caller got ClerkValidationError for a revocation that was done. Sent once (as
    the token-creating POSTs): the caller learns Clerk's state was not confirmed (ClerkUnavailable)."""
    sent: list[str] = []

    def answer_lost(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.method} {request.url.path}")
        raise httpx.ReadTimeout("the answer was lost", request=request)

    with ClerkClient("sk_test_x", api_url="https://api.clerk.com", transport=httpx.MockTransport(answer_lost),
                     budget=LocalBudget(RateLimit(1000, 1.0))) as clerk, pytest.raises(ClerkUnavailable):
        clerk.revoke_session("sess_1")
    assert sent == ["POST /v1/sessions/sess_1/revoke"]
