"""A 429's ``Retry-After`` holds every caller of the budget, those that already hold a token included."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import anyio
import httpx
import pytest

from clerk_sync.clerk_api import AsyncClerkClient, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import Budget, LocalBudget, RateLimit, RedisBudget
from clerk_sync.errors import RateLimited
from tests.conftest import FakeClock

REDIS_URL = os.environ.get("CLERK_SYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _local() -> LocalBudget:
    return LocalBudget(RateLimit(100, 1.0), clock=FakeClock())


def _redis() -> RedisBudget:
    return RedisBudget(REDIS_URL, RateLimit(100, 1.0), "sk_test_x",
                       prefix=f"clerk_sync_test:{os.getpid()}:{time.monotonic_ns()}")


@pytest.mark.parametrize("make", [_local, _redis], ids=["local", "redis"])
def test_the_budget_marks_each_penalty_for_callers_already_holding_a_token(make: Callable[[], Budget]) -> None:
    budget = make()
    try:
        before = budget.reserve(max_wait=60)
        assert budget.blocked().left == 0 and budget.blocked().until == before.blocked_until
        budget.penalize(3.0)
        block = budget.blocked()
        assert block.until > before.blocked_until and 2.5 < block.left <= 3.0  # Redis' clock moves on
        after = budget.reserve(max_wait=60)
        assert after.blocked_until == block.until and after.wait >= 2.5  # already behind this block
        budget.penalize(1.0)  # a shorter penalty does not end the longer one early
        assert budget.blocked().until == block.until
    finally:
        if isinstance(budget, RedisBudget):
            budget.reset()
            budget.close()


class _FirstIs429:
    """Answers the first request 429 (Retry-After: 1) once the other caller holds its token (the budget
    in debt), and records when the other request arrives, counted from that answer."""

    def __init__(self, budget: LocalBudget) -> None:
        self.budget = budget
        self.answered: float | None = None
        self.later: list[float] = []
        self._first = threading.Lock()

    def _is_first(self) -> bool:
        return self._first.acquire(blocking=False)

    def _answer(self) -> httpx.Response:
        self.answered = time.monotonic()
        return httpx.Response(429, headers={"retry-after": "1"}, json={"errors": []})

    def _other(self) -> httpx.Response:
        assert self.answered is not None, "the other caller sent before the 429 came back"
        self.later.append(time.monotonic() - self.answered)
        return httpx.Response(200, json=[])

    def _other_has_reserved(self) -> bool:
        return self.budget.available() < -0.5

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self._is_first():
            return self._other()
        give_up = time.monotonic() + 5.0
        while not self._other_has_reserved() and time.monotonic() < give_up:
            time.sleep(0.001)
        return self._answer()

    async def asynchronous(self, request: httpx.Request) -> httpx.Response:
        if not self._is_first():
            return self._other()
        with anyio.fail_after(5.0):
            while not self._other_has_reserved():
                await anyio.sleep(0.001)
        return self._answer()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_retry_after_that_comes_while_a_caller_waits_for_its_token_holds_that_caller_too(face: str) -> None:
    """Review: a penalty only pushed back later reservations, so callers that had reserved a token before
    Clerk's 429 came back still sent inside the window Clerk had asked us to keep quiet (each earning
    another 429). They wait out the block now, in both faces."""
    budget = LocalBudget(RateLimit(3, 1.0, burst=1))  # one token, then one every 0.55 s
    clerk_side = _FirstIs429(budget)
    retry = RetryPolicy(rate_limited_attempts=0, deadline_s=5.0)  # the 429's caller gives up at once
    outcomes: list[type] = []

    if face == "sync":
        def call(clerk: ClerkClient) -> None:
            try:
                outcomes.append(type(clerk.list_users(limit=1)))
            except RateLimited as exc:
                outcomes.append(type(exc))

        with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk_side), budget=budget, retry=retry) as clerk:
            threads = [threading.Thread(target=call, args=(clerk,)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    else:
        async def main() -> None:
            transport = httpx.MockTransport(clerk_side.asynchronous)
            async with AsyncClerkClient("sk_test_x", transport=transport, budget=budget, retry=retry) as aclerk:

                async def acall() -> None:
                    try:
                        outcomes.append(type(await aclerk.list_users(limit=1)))
                    except RateLimited as exc:
                        outcomes.append(type(exc))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(acall)
                    tg.start_soon(acall)

        anyio.run(main)
    assert sorted(outcomes, key=str) == sorted([list, RateLimited], key=str)
    later = clerk_side.later
    assert len(later) == 1 and later[0] >= 1.0, f"sent {later[0]:.2f}s after a 429 asking for 1 s"


def test_a_budget_of_the_apps_own_without_blocked_still_works() -> None:
    """A Budget written against the protocol before ``blocked()`` existed (reserve/penalize only) keeps
    working: no block is known, a caller that waited for its token sends."""
    inner = LocalBudget(RateLimit(20, 1.0, burst=1))

    class OldBudget:
        def reserve(self, max_wait: float) -> object:
            return inner.reserve(max_wait)

        def penalize(self, seconds: float) -> None:
            inner.penalize(seconds)

        async def areserve(self, max_wait: float) -> object:
            return inner.reserve(max_wait)

        async def apenalize(self, seconds: float) -> None:
            inner.penalize(seconds)

    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=[]))
    budget: Budget = OldBudget()  # type: ignore[assignment]
    with ClerkClient("sk_test_x", transport=transport, budget=budget) as clerk:
        assert [clerk.list_users(limit=1) for _ in range(3)] == [[], [], []]  # the 2nd and 3rd waited

    async def main() -> list[object]:
        async with AsyncClerkClient("sk_test_x", transport=transport, budget=budget) as aclerk:
            return [await aclerk.list_users(limit=1) for _ in range(2)]

    assert anyio.run(main) == [[], []]


def test_a_call_refused_while_a_429_holds_the_budget_names_clerks_retry_after() -> None:
    """Review: it said "our Clerk request budget (not Clerk) is the limit", sending the reader to tune a
    budget that was not the cause."""
    answers = iter([httpx.Response(429, headers={"retry-after": "120"})])
    transport = httpx.MockTransport(lambda request: next(answers, httpx.Response(200, json={"id": "user_1"})))
    with ClerkClient("sk_test_x", api_url="https://api.clerk.com", transport=transport,
                     budget=LocalBudget(RateLimit(100, 1.0))) as clerk:
        with pytest.raises(RateLimited, match="Clerk answered 429 Too Many Requests"):
            clerk.get_user("user_1")
        with pytest.raises(RateLimited, match=r"Clerk answered 429 to this client earlier and its Retry-After holds "
                                              r"every call for 1[12]\d\.\d\ds more") as caught:
            clerk.get_user("user_2")
        assert caught.value.retry_after > 110 and clerk.stats.requests == 1
