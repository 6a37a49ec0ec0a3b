"""A bound on guessing the operator token: failed sign-ins per client address.

The operator token is any text of 16 characters or more (``CLERK_SYNC_CONSOLE_TOKEN``), and a wrong one was
answered 401 as fast as the server could (about 400 guesses a second on the login form, 1,200 as ``Bearer``,
from one client). :class:`SignInThrottle` remembers each address's failed sign-ins of the last ``window_s``
seconds; once ``limit`` of them failed, that address gets 429 with ``Retry-After`` and its token is not even
compared, until the oldest failure leaves the window. A success forgets nothing: failures only age out of the
window, so a guesser sharing an address (a NAT, a proxy) with a client that signs in often does not get fresh
guesses after each of its sign-ins.

The caller checks (:meth:`SignInThrottle.retry_after`), compares and records (:meth:`SignInThrottle.failed`) a
guess with no ``await`` in between (:meth:`Console.sign_in` compares the operator token on the event loop), so a
burst of concurrent guesses cannot all pass the check before any has failed; and a right token is never held
back by other requests still being answered (only by failures).

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

__all__ = ["SignInThrottle", "address_key"]


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
        self._lock = threading.Lock()

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

    def __len__(self) -> int:
        """How many addresses are remembered."""
        return len(self._failures)

