"""``deadline_s`` bounds the whole call, reading the answer included."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest

from clerk_sync.clerk_api import AsyncClerkClient, ClerkClient
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.errors import ClerkUnavailable

BODY = b'{"id": "user_x", "object": "user"}' + b" " * 66  # 100 bytes, one every 0.05 s: 5 s in all
STILL_ARRIVING = r"ReadTimeout: the answer was still arriving when the 0\.\d\ds left of the call's deadline ran out"


def _trickle(sent: list[int]) -> Iterator[bytes]:
    for byte in BODY:
        sent.append(byte)
        time.sleep(0.05)
        yield bytes([byte])


async def _atrickle(sent: list[int]) -> AsyncIterator[bytes]:
    for byte in BODY:
        sent.append(byte)
        await anyio.sleep(0.05)
        yield bytes([byte])


@pytest.mark.parametrize("face", ["sync", "async"])
def test_deadline_bounds_a_trickling_answer(face: str) -> None:
    """Review: httpx's read timeout bounds each read, so an answer trickling in faster than that ran past
    the deadline (``deadline_s=1.0`` took 8.9 s). The answer is read by the deadline now, then closed."""
    sent: list[int] = []
    budget = LocalBudget(RateLimit(1000, 1.0))
    started = time.monotonic()
    if face == "sync":
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=_trickle(sent)))
        with (ClerkClient("sk_test_x", transport=transport, budget=budget) as clerk,
              pytest.raises(ClerkUnavailable, match=STILL_ARRIVING)):
            clerk.get_user("user_x", deadline_s=0.3)
    else:
        async def main() -> None:
            transport = httpx.MockTransport(lambda request: httpx.Response(200, content=_atrickle(sent)))
            async with AsyncClerkClient("sk_test_x", transport=transport, budget=budget) as aclerk:
                with pytest.raises(ClerkUnavailable, match=STILL_ARRIVING):
                    await aclerk.get_user("user_x", deadline_s=0.3)

        anyio.run(main)
    took = time.monotonic() - started
    assert took < 2.0, f"a call with deadline_s=0.3 took {took:.1f}s (the answer takes 5 s)"
    assert len(sent) < len(BODY) // 2  # the answer was dropped, not read to its end


def test_an_answer_read_in_time_is_whole() -> None:
    """Reading by the deadline streams the body; a prompt answer, compressed or not, parses as before."""
    user = {"id": "user_x", "object": "user", "first_name": "Ada"}

    def answer(request: httpx.Request) -> httpx.Response:
        body = gzip.compress(json.dumps(user).encode())
        return httpx.Response(200, content=body, headers={"content-encoding": "gzip",
                                                          "content-type": "application/json"})

    budget = LocalBudget(RateLimit(1000, 1.0))
    with ClerkClient("sk_test_x", transport=httpx.MockTransport(answer), budget=budget) as clerk:
        assert clerk.get_user("user_x", deadline_s=0.3) == user
