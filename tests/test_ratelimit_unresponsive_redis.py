"""The Redis budget against an unresponsive Redis: a Redis that accepts connections but never answers (or stops answering
mid-way) ends a reservation within the budget's timeouts, as ``ClerkUnavailable``, in the blocking and the
async client alike, instead of hanging every call to Clerk. Real loopback sockets, a real Redis."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
import redis

from clerk_sync.clerk_api import AsyncClerkClient, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import RateLimit, RedisBudget
from clerk_sync.errors import ClerkUnavailable

REDIS_URL = os.environ.get("CLERK_SYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REDIS_ADDRESS = (redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs.get("host", "127.0.0.1"),
                 int(redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs.get("port", 6379)))
TIMEOUT_S = 0.3  # the budget's connect and reply timeouts in these tests
DEFAULT_TIMEOUT_S = 1.0  # the budget's own reply timeout (redis-py's: none before 8, 5 s since)
MARGIN_S = 3.0  # a loaded CI box: the bound is the timeouts plus this, the hang it catches is endless
USER = b'{"id": "user_x", "object": "user"}'


def _prefix() -> str:
    return f"clerk_sync_test:review3:{uuid.uuid4().hex[:8]}"


def _budget(url: str, **timeouts: float) -> RedisBudget:
    return RedisBudget(url, RateLimit(100, 1.0), "sk_test_x", prefix=_prefix(), **timeouts)


@contextmanager
def _silent_server() -> Iterator[tuple[int, threading.Event]]:
    """A loopback server that accepts and reads every connection but never writes a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            held.append(conn)
            accepted.set()
            threading.Thread(target=_drain, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        listener.close()
        for conn in held:
            conn.close()


def _drain(conn: socket.socket) -> None:
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


@contextmanager
def _proxy_to_redis() -> Iterator[tuple[int, threading.Event]]:
    """A loopback proxy to the real Redis that stops passing its answers on once the event is set:
    a Redis that answered and then hangs (a stalled server, a half-dead network path)."""
    listener = socket.create_server(("127.0.0.1", 0))
    hang = threading.Event()
    held: list[socket.socket] = []

    def pipe(src: socket.socket, dst: socket.socket, stoppable: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (stoppable and hang.is_set()):
                    dst.sendall(data)
        except OSError:
            pass

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(REDIS_ADDRESS)
            held.extend((client, upstream))
            threading.Thread(target=pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client, True), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], hang
    finally:
        listener.close()
        for conn in held:
            conn.close()


def _ends_within(bound_s: float, call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """Run ``call`` in a thread; fail (instead of hanging the suite) if it is still running after ``bound_s``."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test, which asserts on it
            outcome.append(exc)
        else:
            outcome.append(None)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(bound_s)
    elapsed = time.monotonic() - started
    assert not worker.is_alive(), f"still waiting for Redis after {elapsed:.1f}s (bound {bound_s:.1f}s)"
    return outcome[0], elapsed


def _never_sent(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"{request.url} was sent to Clerk without a budget token")


def _assert_budget_unavailable(exc: BaseException | None, port: int) -> None:
    assert isinstance(exc, ClerkUnavailable), repr(exc)
    message = str(exc)
    assert f"Redis at redis://***@127.0.0.1:{port}/15" in message and "s3cret" not in message
    assert "did not answer in time" in message and "check that Redis is running" in message
    assert exc.retry_after == 1.0


# -- a silent Redis ---------------------------------------------------------------------------------


TIMEOUTS = pytest.mark.parametrize("timeouts", [{"connect_timeout_s": TIMEOUT_S, "timeout_s": TIMEOUT_S}, {}],
                                   ids=["configured", "default"])


def _bound(timeouts: dict[str, float]) -> float:
    """The longest a reservation may take on a silent Redis: it connects at once, then waits for a reply."""
    return timeouts.get("timeout_s", DEFAULT_TIMEOUT_S) + MARGIN_S


@pytest.mark.timeout(30)
@TIMEOUTS
def test_a_blocking_call_ends_when_redis_never_answers(timeouts: dict[str, float]) -> None:
    with _silent_server() as (port, accepted):
        budget = _budget(f"redis://:s3cret@127.0.0.1:{port}/15", **timeouts)
        clerk = ClerkClient("sk_test_x", budget=budget, transport=httpx.MockTransport(_never_sent),
                            retry=RetryPolicy(deadline_s=30.0))
        try:
            exc, elapsed = _ends_within(_bound(timeouts), lambda: clerk.get_user("user_x"))
        finally:
            clerk.close()
            budget.close()
        assert accepted.is_set()  # it did connect: the reply is what never came
        _assert_budget_unavailable(exc, port)
        assert elapsed >= TIMEOUT_S * 0.9  # it waited for the reply, then gave up


@pytest.mark.timeout(30)
@TIMEOUTS
def test_an_async_call_ends_when_redis_never_answers(timeouts: dict[str, float]) -> None:
    with _silent_server() as (port, accepted):
        budget = _budget(f"redis://:s3cret@127.0.0.1:{port}/15", **timeouts)

        async def call() -> None:
            async with AsyncClerkClient("sk_test_x", budget=budget, transport=httpx.MockTransport(_never_sent),
                                        retry=RetryPolicy(deadline_s=30.0)) as aclerk:
                try:
                    await aclerk.get_user("user_x")
                finally:
                    await budget.aclose()

        exc, elapsed = _ends_within(_bound(timeouts), lambda: anyio.run(call))
        assert accepted.is_set()
        _assert_budget_unavailable(exc, port)
        assert elapsed >= TIMEOUT_S * 0.9


@pytest.mark.timeout(30)
def test_the_urls_own_timeout_wins() -> None:
    with _silent_server() as (port, _):
        budget = _budget(f"redis://:s3cret@127.0.0.1:{port}/15?socket_timeout=0.2", timeout_s=60.0)
        try:
            exc, _ = _ends_within(0.2 + MARGIN_S, lambda: budget.reserve(max_wait=60))
        finally:
            budget.close()
        _assert_budget_unavailable(exc, port)
        assert "reply timeout 0.2s" in str(exc)


# -- a Redis that stops answering mid-way, and one that is down --------------------------------------


@pytest.mark.timeout(30)
def test_redis_that_stops_answering_midway_ends_both_faces() -> None:
    with _proxy_to_redis() as (port, hang):
        budget = _budget(f"redis://127.0.0.1:{port}/15", connect_timeout_s=TIMEOUT_S, timeout_s=TIMEOUT_S)

        async def areserve() -> None:
            try:
                await budget.areserve(max_wait=60)
            finally:
                await budget.aclose()

        try:
            assert budget.reserve(max_wait=60).granted  # answering: pooled connections are open
            hang.set()
            exc, _ = _ends_within(TIMEOUT_S + MARGIN_S, lambda: budget.reserve(max_wait=60))
            assert isinstance(exc, ClerkUnavailable) and "did not answer in time" in str(exc)
            exc, _ = _ends_within(2 * TIMEOUT_S + MARGIN_S, lambda: anyio.run(areserve))
            assert isinstance(exc, ClerkUnavailable) and "did not answer in time" in str(exc)
        finally:
            budget.close()


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])  # closed on exit: nothing listens there


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:{port}/15", "redis://***@127.0.0.1:{port}/15"),
    ("redis://user:s3cret%40x@127.0.0.1:{port}/15", "redis://***@127.0.0.1:{port}/15"),
    ("redis://s3cret@127.0.0.1:{port}/15", "redis://***@127.0.0.1:{port}/15"),  # a provider's token as the user
    ("unix:///nonexistent/redis.sock?db=1&password=s3cret", "unix:///nonexistent/redis.sock?db=1&password=***"),
    ("rediss://127.0.0.1:{port}/15?ssl_password=s3cret", "rediss://127.0.0.1:{port}/15?ssl_password=***"),
    ("redis://127.0.0.1:{port}/15?socket_timeout=3", "redis://127.0.0.1:{port}/15?socket_timeout=3"),
], ids=["password", "user-and-password", "token-as-user", "query-password", "ssl-password", "no-password"])
def test_a_redis_that_is_down_says_so_without_the_password(url: str, shown: str) -> None:
    port = _closed_port()
    budget = _budget(url.format(port=port))
    try:
        with pytest.raises(ClerkUnavailable) as info:
            budget.reserve(max_wait=60)
    finally:
        budget.close()
    message = str(info.value)
    assert f"Redis at {shown.format(port=port)} is unreachable" in message, message
    assert "s3cret" not in message and "REDIS_URL" in message and info.value.retry_after == 1.0


# -- a Redis that answers ------------------------------------------------------------------------------


def test_a_normal_redis_still_serves_both_faces() -> None:
    budget = _budget(REDIS_URL)
    calls: list[str] = []

    def clerk_api(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200, content=USER, headers={"content-type": "application/json"})

    async def async_calls() -> None:
        async with AsyncClerkClient("sk_test_x", budget=budget, transport=httpx.MockTransport(clerk_api)) as aclerk:
            assert (await aclerk.get_user("user_x"))["id"] == "user_x"
            assert (await budget.areserve(max_wait=60)).granted
        await budget.aclose()

    try:
        with ClerkClient("sk_test_x", budget=budget, transport=httpx.MockTransport(clerk_api)) as clerk:
            assert clerk.get_user("user_x")["id"] == "user_x"
        assert budget.reserve(max_wait=60).granted
        budget.penalize(0.5)
        assert 0 < budget.blocked().left <= 0.5
        anyio.run(async_calls)
    finally:
        budget.reset()
        budget.close()
    assert calls == ["/v1/users/user_x"] * 2


@pytest.mark.parametrize("timeouts", [{"timeout_s": 0.0}, {"connect_timeout_s": float("nan")}], ids=["zero", "nan"])
def test_a_budget_without_a_timeout_is_refused(timeouts: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="never answers"):
        _budget(REDIS_URL, **timeouts)
