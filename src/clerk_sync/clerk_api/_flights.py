"""Single-flight: concurrent identical calls share one request (threads, or tasks of one event loop).

The first caller (the leader) makes the call; the others wait for its result, bounded by their own
timeout. Followers get a deep copy of the result, so nobody sees another caller's mutations.

A leader's answer is shared, and so is an error that says what Clerk answered (404, 401, 422...). A
transient one (:class:`~clerk_sync.errors.ClerkUnavailable`, :class:`~clerk_sync.errors.RateLimited`) is
the leader's: it was bounded by the leader's deadline and retries, and a follower may have time left for
its own. Followers with at least ``min_left`` seconds of their own timeout left try again, as a new flight:
one of them leads it, with what is left of its timeout, and the others follow that one. A leader that
never finished (an async leader cancelled, a thread interrupted) is taken over the same way.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import anyio

from clerk_sync.errors import ClerkUnavailable, RateLimited

__all__ = ["AsyncFlights", "SyncFlights"]

T = TypeVar("T")


class _Call:
    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        # Threads only: the flight this call's followers fly again in. A follower that wakes late (twenty
        # threads waking for one GIL) still joins it, even when it has ended, instead of a third request.
        self.successor: tuple[_Call, threading.Event] | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise copy.copy(self.error) from self.error
        return copy.deepcopy(self.value)

    def fly_again(self, left: float, min_left: float, timeout: float) -> bool:
        """Whether a follower with ``left`` seconds should start a flight of its own instead of sharing this
        call's outcome."""
        if self.abandoned:
            if left <= 0:
                raise _timed_out(timeout)
            return True
        return isinstance(self.error, ClerkUnavailable | RateLimited) and left > 0 and left >= min_left


def _timed_out(timeout: float) -> ClerkUnavailable:
    return ClerkUnavailable(f"waited {timeout:.1f}s for a shared Clerk request", retry_after=1.0)


class SyncFlights:
    """Thread-based single-flight groups."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, tuple[_Call, threading.Event]] = {}

    def do(self, key: Hashable, fn: Callable[[float], T], timeout: float, *, min_left: float = 0.0) -> T:
        """``fn(seconds)`` once for concurrent callers of ``key``; each caller waits ``timeout`` at most."""
        deadline = time.monotonic() + timeout
        left = timeout
        failed: _Call | None = None  # the flight this caller followed and flies again after
        while True:
            with self._lock:
                entry = failed.successor if failed is not None else None
                leader = False
                if entry is None:
                    entry = self._calls.get(key)
                    if entry is None:
                        entry = self._calls[key] = (_Call(), threading.Event())
                        leader = True
                    if failed is not None:
                        failed.successor = entry
            # Only the forward link stays: this frame (kept by a leader's stored traceback) holding the flight
            # before would keep every earlier failed flight alive in a chain.
            failed = None
            call, done = entry
            if leader:
                return self._lead(key, call, done, fn, left)
            if not done.wait(max(0.0, deadline - time.monotonic())):
                raise _timed_out(timeout)
            left = deadline - time.monotonic()
            if not call.fly_again(left, min_left, timeout):
                result: T = call.outcome()
                return result
            failed = call

    def _lead(self, key: Hashable, call: _Call, done: threading.Event, fn: Callable[[float], T], left: float) -> T:
        try:
            call.value = fn(left)
            return call.value  # type: ignore[no-any-return]
        except Exception as exc:
            call.error = exc
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: this thread's, not the followers'
            call.abandoned = True
            raise
        finally:
            with self._lock:
                del self._calls[key]
            done.set()


class AsyncFlights:
    """Single-flight groups for tasks of one event loop (asyncio or trio, through anyio)."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, tuple[_Call, anyio.Event]] = {}

    async def do(self, key: Hashable, fn: Callable[[float], Awaitable[T]], timeout: float, *,
                 min_left: float = 0.0) -> T:
        """``await fn(seconds)`` once for concurrent callers of ``key``; each waits ``timeout`` at most."""
        deadline = anyio.current_time() + timeout
        left = timeout
        while (entry := self._calls.get(key)) is not None:
            call, done = entry
            with anyio.move_on_after(deadline - anyio.current_time()) as scope:
                await done.wait()
            if scope.cancelled_caught:
                raise _timed_out(timeout)
            left = deadline - anyio.current_time()
            if not call.fly_again(left, min_left, timeout):
                result: T = call.outcome()
                return result
        return await self._lead(key, fn, left)

    async def _lead(self, key: Hashable, fn: Callable[[float], Awaitable[T]], left: float) -> T:
        call, done = self._calls[key] = (_Call(), anyio.Event())
        try:
            call.value = await fn(left)
            return call.value  # type: ignore[no-any-return]
        except Exception as exc:
            call.error = exc
            raise
        except BaseException:  # cancelled (or KeyboardInterrupt): a waiting follower takes over
            call.abandoned = True
            raise
        finally:
            del self._calls[key]
            done.set()
