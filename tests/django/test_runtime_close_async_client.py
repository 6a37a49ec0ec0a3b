"""The Django runtime's close: the async Clerk client (``aclerk``), when it was built, is closed
too, with the shared Redis budget's async face, on the event loop its connections belong to; one never
built is not built to be closed. A real emulator on loopback, the local Redis, real loops and threads."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import redis

from clerk_sync.config import Settings
from clerk_sync.integrations.django.conf import DjangoOptions
from clerk_sync.integrations.django.runtime import ClerkSync
from clerk_sync.testing import EmulatorServer

REDIS_URL = os.environ.get("CLERK_SYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@dataclass
class Parts:
    runtime: ClerkSync
    user_id: str
    name: str  # the Redis client name of the budget's connections

    def redis_connections(self) -> int:
        with redis.Redis.from_url(REDIS_URL) as admin:
            return sum(c.get("name") == self.name for c in admin.client_list())

    async def fetch_on_this_loop(self) -> None:
        """What an ASGI request with JIT sync does: claim the async client for this loop, call Clerk."""
        assert self.runtime._aclerk_usable()
        aclerk = self.runtime.aclerk
        assert aclerk is not None
        assert (await aclerk.get_user(self.user_id))["id"] == self.user_id


@pytest.fixture
def parts() -> Iterator[Parts]:
    name = f"clerk-sync-runtime-review3-{uuid.uuid4().hex[:8]}"
    with EmulatorServer() as emu:
        user = emu.create_user(email="ada@example.com")
        settings = Settings.from_env({"CLERK_SECRET_KEY": emu.secret_key, "CLERK_API_URL": emu.url,
                                      "DATABASE_URL": "sqlite:///:memory:",
                                      "REDIS_URL": f"{REDIS_URL}?client_name={name}"})
        runtime = ClerkSync(settings, DjangoOptions())
        try:
            yield Parts(runtime, user["id"], name)
        finally:
            runtime.close()  # twice is safe


@contextmanager
def _no_unclosed_warnings() -> Iterator[None]:
    # Garbage an earlier test left (a connection in a reference cycle) is collected before recording,
    # so that only what this block leaks is counted.
    gc.collect()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
        gc.collect()
    unclosed = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning) or "nclosed" in str(w.message)]
    assert unclosed == []


@contextmanager
def _server_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as an ASGI server's."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_close_does_not_build_the_async_client(parts: Parts) -> None:
    assert parts.runtime.clerk is not None
    parts.runtime.close()
    assert "aclerk" not in parts.runtime.__dict__


def test_close_closes_an_async_client_built_but_never_used(parts: Parts) -> None:
    aclerk = parts.runtime.aclerk
    assert aclerk is not None
    with _no_unclosed_warnings():
        parts.runtime.close()
    assert aclerk._http.is_closed


def test_close_from_another_thread_closes_it_on_the_servers_loop(parts: Parts) -> None:
    """Fixed: ``close()`` (``reset_clerk_sync``, a settings change) closed the blocking client only: the async
    client's HTTP connections and the budget's async Redis connections stayed open on the server's loop."""
    with _no_unclosed_warnings(), _server_loop() as loop:
        asyncio.run_coroutine_threadsafe(parts.fetch_on_this_loop(), loop).result(30)
        assert parts.redis_connections() == 1
        aclerk = parts.runtime.aclerk
        assert aclerk is not None and not aclerk._http.is_closed
        parts.runtime.close()
        assert aclerk._http.is_closed
        assert parts.redis_connections() == 0


def test_close_called_on_the_loop_itself_closes_once_the_loop_runs_on(parts: Parts) -> None:
    """A sync ``close()`` inside the loop (a settings override in an async test) cannot wait for the loop:
    the close is scheduled on it and done by the time the caller's task yields a few times."""

    async def main() -> None:
        await parts.fetch_on_this_loop()
        assert parts.redis_connections() == 1
        parts.runtime.close()
        aclerk = parts.runtime.aclerk
        assert aclerk is not None
        for _ in range(100):
            if aclerk._http.is_closed and parts.redis_connections() == 0:
                break
            await asyncio.sleep(0.01)
        assert aclerk._http.is_closed
        assert parts.redis_connections() == 0

    with _no_unclosed_warnings():
        asyncio.run(main())


def test_close_from_a_thread_with_its_own_loop_closes_an_unused_client(parts: Parts) -> None:
    """Built, never used, and closed from inside an unrelated running loop: a new loop in a thread closes it."""
    aclerk = parts.runtime.aclerk
    assert aclerk is not None

    async def main() -> None:
        parts.runtime.close()

    with _no_unclosed_warnings():
        asyncio.run(main())
    assert aclerk._http.is_closed


def test_close_after_the_clients_loop_ended_still_closes_the_rest(parts: Parts) -> None:
    """``asyncio.run`` returned: its loop is closed and can close nothing; ``close()`` must not fail on it
    (the blocking parts and the store are still closed)."""
    asyncio.run(parts.fetch_on_this_loop())
    clerk = parts.runtime.clerk
    assert clerk is not None
    parts.runtime.close()
    assert clerk._http.is_closed
