"""The Clerk client under per-user rate limits, answers it cannot read, answers of the wrong shape."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from clerk_sync.clerk_api import AsyncClerkClient, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.errors import ClerkAPIError, ClerkUnavailable, RateLimited
from tests.conftest import FakeClock

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01, backoff_max_s=0.02, deadline_s=5.0)
TOO_MANY = {"errors": [{"message": "Too many requests", "long_message": "Too many requests, retry later",
                        "code": "too_many_requests"}]}


class _PerUserLimit:
    """Clerk's ``PATCH /users/{id}/metadata``: 10 requests / 10 s per user. The first PATCH is refused with 429
    and ``Retry-After``; everything else is answered."""

    def __init__(self, retry_after: str) -> None:
        self.retry_after = retry_after
        self.patches: list[float] = []
        self.answered_429: float | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            self.patches.append(time.monotonic())
            if len(self.patches) == 1:
                self.answered_429 = time.monotonic()
                return httpx.Response(429, headers={"retry-after": self.retry_after}, json=TOO_MANY)
        return httpx.Response(200, json={"id": request.url.path.split("/")[3], "object": "user"})


def test_a_429_of_a_per_user_limit_holds_that_call_only() -> None:
    """Fixed: Clerk limits metadata updates to 10 per 10 s *per user* (FACTS 4.4), but every 429 penalised
    the instance's shared budget: an admin promoting one user a few times in a row held every Clerk call
    of every process (sign-ins' JIT fetches included) for the Retry-After. That 429 holds its own call now:
    the shared budget stays open, and the call itself still waits out Retry-After before trying again."""
    budget = LocalBudget(RateLimit(100, 1.0), clock=FakeClock())  # stands still: a penalty would stay
    clerk_side = _PerUserLimit(retry_after="1")
    once = RetryPolicy(rate_limited_attempts=0, deadline_s=5.0)
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk_side), budget=budget, retry=once) as clerk:
        with pytest.raises(RateLimited, match=r"PATCH /users/user_a/metadata: Clerk answered 429 .*per user") as hit:
            clerk.update_user_metadata("user_a", public_metadata={"role": "admin"})
        assert (hit.value.retry_after, hit.value.status) == (1.0, 429)
        assert budget.blocked().left == 0, "one user's limit blocked the whole instance's budget"
        assert budget.reserve(max_wait=0).granted  # the next call of anyone goes at once
        assert clerk.get_user("user_b")["id"] == "user_b"

    clerk_side = _PerUserLimit(retry_after="0.2")
    budget = LocalBudget(RateLimit(100, 1.0), clock=FakeClock())
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(clerk_side), budget=budget, retry=FAST_RETRY) as clerk:
        assert clerk.update_user_metadata("user_a", public_metadata={"role": "admin"})["id"] == "user_a"
    assert clerk_side.answered_429 is not None and len(clerk_side.patches) == 2
    assert clerk_side.patches[1] - clerk_side.answered_429 >= 0.2  # Retry-After, waited by that call
    assert budget.blocked().left == 0 and clerk.stats.rate_limited == 1


def _mangled(request: httpx.Request) -> httpx.Response:
    """A proxy that says gzip and is not."""
    return httpx.Response(200, content=b'{"id": "user_x"}', headers={"content-encoding": "gzip",
                                                                     "content-type": "application/json"})


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_answer_that_cannot_be_decoded_is_a_clerk_api_error(face: str) -> None:
    """Fixed: httpx's DecodingError (a body that is not what its Content-Encoding says) is no TransportError:
    it escaped the client as an httpx exception, outside the ClerkAPIError tree (an integration's 500, not
    its 503 with Retry-After). It is a failed attempt now, retried and reported as Clerk unavailable."""
    budget = LocalBudget(RateLimit(1000, 1.0))
    transport = httpx.MockTransport(_mangled)
    if face == "sync":
        with ClerkClient("sk_test_x", transport=transport, budget=budget, retry=FAST_RETRY) as clerk:
            with pytest.raises(ClerkUnavailable, match=r"GET /users/user_x: DecodingError: .*decompress") as caught:
                clerk.get_user("user_x")
            requests = clerk.stats.requests
    else:
        async def main() -> tuple[BaseException, int]:
            async with AsyncClerkClient("sk_test_x", transport=transport, budget=budget, retry=FAST_RETRY) as aclerk:
                with pytest.raises(ClerkUnavailable, match=r"GET /users/user_x: DecodingError: .*decompress") as got:
                    await aclerk.get_user("user_x")
                return got.value, aclerk.stats.requests

        error, requests = anyio.run(main)
        assert isinstance(error, ClerkUnavailable)
    assert requests == FAST_RETRY.attempts
    if face == "sync":
        assert caught.value.path == "/users/user_x" and caught.value.retry_after > 0


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/v1/users/count", {"count": 3}, "GET /users/count: answered 200, but expected {total_count} from Clerk"),
    ("/v1/organizations", [], "GET /organizations: answered 200, but expected a JSON object from Clerk, got list"),
    ("/v1/users", {"data": []}, "GET /users: answered 200, but expected a JSON array from Clerk, got dict"),
], ids=["count", "page", "array"])
def test_an_answer_of_the_wrong_shape_names_the_call(path: str, body: Any, message: str) -> None:
    """Fixed: "expected {data, total_count} from Clerk" said neither which call nor what answered it
    (status, method and path were None): an operator could not tell which endpoint a proxy or stand-in got
    wrong. The error names the call now, as every other ClerkAPIError does."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    with ClerkClient("sk_test_x", transport=transport, budget=LocalBudget(RateLimit(1000, 1.0))) as clerk:
        calls: dict[str, Callable[[], object]] = {"/v1/users/count": clerk.count_users, "/v1/users": clerk.list_users,
                                                  "/v1/organizations": clerk.list_organizations}
        call = calls[path]
        with pytest.raises(ClerkAPIError, match=re.escape(message)) as caught:
            call()
    assert (caught.value.status, caught.value.method, caught.value.path) == (200, "GET", path.removeprefix("/v1"))
