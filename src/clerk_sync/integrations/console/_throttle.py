"""A bound on guessing the operator token: failed sign-ins per client address.

The operator token is any text of 16 characters or more (``CLERK_SYNC_CONSOLE_TOKEN``), and a wrong one was
answered 401 as fast as the server could (about 400 guesses a second on the login form, 1,200 as ``Bearer``,
from one client). :class:`SignInThrottle` remembers each address's failed sign-ins of the last ``window_s``
seconds; once ``limit`` of them failed, that address gets 429 with ``Retry-After`` and its token is not even
compared, until the oldest failure leaves the window. A successful sign-in forgets the address's failures.

A sign-in is checked and reserved in one step (:meth:`SignInThrottle.begin`), under the throttle's lock: the
attempts of an address still being compared count against its limit too, so a burst of concurrent guesses is
compared ``limit`` at a time at most, not in full because none of them has failed yet. Each reserved
:class:`Attempt` ends once: :meth:`Attempt.failed`, :meth:`Attempt.succeeded` or :meth:`Attempt.release`.

The address is the request's client address: behind a proxy, set ``FORWARDED_ALLOW_IPS`` to the proxy's
addresses so it is the browser's (else every client shares the proxy's, and one guesser locks everyone out for
``window_s``). IPv6 addresses count by their /64, which one host usually holds whole.

Memory is bounded: at most ``max_addresses`` addresses are remembered (each with at most ``limit`` times), the
least recently failed forgotten first, so a guesser with more addresses than that can evade the limit, but
never exhaust the process's memory. Each process (``serve --workers N``) counts its own.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["Attempt", "SignInThrottle", "address_key"]


def address_key(address: str | None) -> str:
    """What failures are counted by: the address, an IPv6 one's /64 (an IPv4-mapped one as IPv4)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]  # not an IP (a test client's name, a unix socket): as it is, bounded
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SignInThrottle:
    """Failed sign-ins per client address (:func:`address_key`) in a sliding window; thread-safe."""

    def __init__(self, *, limit: int = 10, window_s: float = 600.0, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0 or max_addresses < 1:
            raise ValueError("limit and max_addresses must be at least 1, window_s above 0")
        self.limit, self.window_s, self.max_addresses, self.clock = limit, window_s, max_addresses, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # least recently failed first
        self._pending: dict[str, int] = {}  # attempts reserved by begin() and not ended yet, per address
        self._lock = threading.Lock()

    def begin(self, address: str | None) -> Attempt:
        """Check and reserve a sign-in of ``address`` at once: an :class:`Attempt` whose ``wait`` is None when
        it may compare its token now (end it with ``failed``, ``succeeded`` or ``release``), else the whole
        seconds to wait (nothing reserved). Attempts still in flight count as failures until they end."""
        now = self.clock()
        key = address_key(address)
        with self._lock:
            times = self._failures.get(key)
            while times and times[0] + self.window_s <= now:
                times.popleft()
            if times is not None and not times:
                del self._failures[key]  # every failure left the window
            failures = len(times) if times else 0
            pending = self._pending.get(key, 0)
            if failures + pending < self.limit:
                self._pending[key] = pending + 1
                return Attempt(self, key, None)
            # else the limit is held by attempts still being compared, which end in a moment
            wait = max(1, math.ceil(times[0] + self.window_s - now)) if times and failures >= self.limit else 1
        return Attempt(self, key, wait)

    def _end(self, key: str, *, failed: bool, succeeded: bool) -> int:
        with self._lock:
            pending = self._pending.pop(key, 0) - 1
            if pending > 0:
                self._pending[key] = pending
            if succeeded:
                self._failures.pop(key, None)
            return self._record(key) if failed else 0

    def retry_after(self, address: str | None) -> int | None:
        """Whole seconds until ``address`` may sign in again, or None when it may now."""
        now = self.clock()
        with self._lock:
            times = self._failures.get(address_key(address))
            if times is None or len(times) < self.limit:
                return None
            wait = times[0] + self.window_s - now
        return max(1, math.ceil(wait)) if wait > 0 else None

    def failed(self, address: str | None) -> int:
        """Record a failed sign-in of ``address``; how many it has in the window now (``limit``: throttled)."""
        with self._lock:
            return self._record(address_key(address))

    def _record(self, key: str) -> int:
        """(Under the lock.) A failure of ``key`` now; its failures in the window."""
        now = self.clock()
        times = self._failures.pop(key, None)
        if times is None:
            times = deque(maxlen=self.limit)
        while times and times[0] + self.window_s <= now:
            times.popleft()
        times.append(now)
        self._failures[key] = times  # now the most recently failed
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        return len(times)

    def succeeded(self, address: str | None) -> None:
        """A sign-in of ``address`` succeeded: its failures are forgotten."""
        with self._lock:
            self._failures.pop(address_key(address), None)

    def __len__(self) -> int:
        """How many addresses are remembered."""
        return len(self._failures)


class Attempt:
    """One sign-in reserved by :meth:`SignInThrottle.begin` (``wait`` None), or refused (``wait``: seconds to
    wait, nothing reserved). Ending it a second time, or ending a refused one, does nothing."""

    __slots__ = ("_ended", "_key", "_throttle", "wait")

    def __init__(self, throttle: SignInThrottle, key: str, wait: int | None) -> None:
        self._throttle, self._key, self.wait = throttle, key, wait
        self._ended = wait is not None

    def failed(self) -> int:
        """The token was wrong: a failure of the address (how many it has in the window now)."""
        return self._finish(failed=True, succeeded=False)

    def succeeded(self) -> None:
        """The sign-in succeeded: the address's failures are forgotten."""
        self._finish(failed=False, succeeded=True)

    def release(self) -> None:
        """Neither (no guess: a genuine token refused for its age or its user, an error): the slot is freed."""
        self._finish(failed=False, succeeded=False)

    def _finish(self, *, failed: bool, succeeded: bool) -> int:
        if self._ended:
            return 0
        self._ended = True
        return self._throttle._end(self._key, failed=failed, succeeded=succeeded)
