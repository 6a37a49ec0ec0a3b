"""Single-flight: concurrent identical calls share one request (threads, or tasks of one event loop).

The first caller (the leader) makes the call; the others wait for its result, bounded by their own
timeout. Followers get a deep copy of the result, so nobody sees another caller's mutations. If the
async leader is cancelled, a waiting follower takes over instead of inheriting the cancellation.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import anyio

from clerk_sync.errors import ClerkUnavailable

__all__ = ["AsyncFlights", "SyncFlights"]

T = TypeVar("T")


class _Call:
    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.abandoned = False

    def outcome(self) -> Any:
        if self.error is not None:
            raise copy.copy(self.error) from self.error
        return copy.deepcopy(self.value)


def _timed_out(timeout: float) -> ClerkUnavailable:
    return ClerkUnavailable(f"waited {timeout:.1f}s for a shared Clerk request", retry_after=1.0)


class SyncFlights:
    """Thread-based single-flight groups."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, tuple[_Call, threading.Event]] = {}

    def do(self, key: Hashable, fn: Callable[[], T], timeout: float) -> T:
        with self._lock:
            entry = self._calls.get(key)
            if entry is None:
                entry = self._calls[key] = (_Call(), threading.Event())
                leader = True
            else:
                leader = False
        call, done = entry
        if not leader:
            if not done.wait(timeout):
                raise _timed_out(timeout)
            result: T = call.outcome()
            return result
        try:
            call.value = fn()
            return call.value  # type: ignore[no-any-return]
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                del self._calls[key]
            done.set()


class AsyncFlights:
    """Single-flight groups for tasks of one event loop (asyncio or trio, through anyio)."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, tuple[_Call, anyio.Event]] = {}

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]], timeout: float) -> T:
        while (entry := self._calls.get(key)) is not None:
            call, done = entry
            with anyio.move_on_after(timeout) as scope:
                await done.wait()
            if scope.cancelled_caught:
                raise _timed_out(timeout)
            if not call.abandoned:
                result: T = call.outcome()
                return result
        call, done = self._calls[key] = (_Call(), anyio.Event())
        try:
            call.value = await fn()
            return call.value  # type: ignore[no-any-return]
        except anyio.get_cancelled_exc_class():
            call.abandoned = True
            raise
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            del self._calls[key]
            done.set()
