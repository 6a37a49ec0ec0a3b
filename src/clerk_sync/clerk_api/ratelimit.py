"""The Clerk instance's request budget: a token bucket, in-process or shared through Redis.

Clerk limits the Backend API per instance (per secret key): 1000 requests / 10 s in production,
100 / 10 s in development. Every process that talks to Clerk with the same key must draw from one
budget, so with ``REDIS_URL`` set the bucket lives in Redis and is updated by one atomic Lua script
that also reads Redis' own clock (no skew between hosts).

The bucket works by *reservation*: a caller takes a token now, possibly going into debt, and is told
how long to sleep before sending. Callers are therefore served in arrival order, each with one round
trip. A reservation that would wait longer than the caller's ``max_wait`` is refused and changes
nothing, so a request with a deadline never queues behind a wait it cannot afford.

Every Redis round trip is bounded (2 s to connect, 1 s per reply by default): a Redis that
accepts connections but never answers fails the reservation like a Redis that is down, instead of hanging
every call to Clerk with it.

A 429's ``Retry-After`` blocks the budget until a moment the budget keeps (``blocked_until``). Callers
that reserved before it still hold their token; before sending they ask again (:meth:`Budget.blocked`)
and wait out a block that began after their reservation.

Staying under a *fixed window* limit of ``L`` requests per ``W`` seconds (how Clerk and the emulator
count) needs ``burst + rate * W <= L``: a full bucket plus one window of refill. Requests also reach the
server a little early or late (scheduling, network), so :class:`RateLimit` budgets the window as
``W + jitter_s``: ``rate = (L - burst) / (W + jitter_s)``.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import anyio

from clerk_sync._urls import masked_url
from clerk_sync.errors import ClerkUnavailable, ConfigError

if TYPE_CHECKING:
    from clerk_sync.config import Settings

__all__ = [
    "Budget",
    "LocalBudget",
    "RateLimit",
    "RedisBudget",
    "Reservation",
    "budget_from_settings",
    "default_rate_limit",
]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``requests`` per ``window_s`` as the server counts them, and how we spend it.

    ``burst`` tokens may be spent at once (default 2 % of the limit); ``jitter_s`` is how far a request's
    arrival may drift from its planned send time without ever tipping a server window over the limit.
    """

    requests: int
    window_s: float = 10.0
    burst: int | None = None
    jitter_s: float = 0.1

    def __post_init__(self) -> None:
        if self.requests < 1 or self.window_s <= 0 or self.jitter_s < 0:
            raise ValueError("a rate limit needs requests >= 1, window_s > 0 and jitter_s >= 0")

    @property
    def capacity(self) -> float:
        """Tokens the bucket holds when full."""
        return float(self.burst if self.burst is not None else max(1, self.requests // 50))

    @property
    def rate(self) -> float:
        """Sustained tokens per second: ``capacity + rate * (window_s + jitter_s)`` stays within the limit."""
        return max(self.requests - self.capacity, 1.0) / (self.window_s + self.jitter_s)


def default_rate_limit(secret_key: str | None) -> RateLimit:
    """Clerk's documented limit for the key's environment: ``sk_live_`` 1000 / 10 s, else 100 / 10 s."""
    live = bool(secret_key and secret_key.startswith("sk_live_"))
    return RateLimit(1000 if live else 100, 10.0)


@dataclass(frozen=True, slots=True)
class Reservation:
    """``granted``: a token is yours, send after ``wait`` seconds. Refused: ``wait`` is what it would cost."""

    granted: bool
    wait: float
    blocked_until: float = 0.0  # the block in force when reserved (budget's clock): a later one is waited out


@dataclass(frozen=True, slots=True)
class Block:
    """A 429 penalty: it ends at ``until`` (the budget's clock, a marker only), ``left`` seconds from now."""

    until: float
    left: float


class Budget(Protocol):
    """What the Clerk client needs from a budget; sync and async faces of the same operations."""

    def reserve(self, max_wait: float) -> Reservation: ...

    def penalize(self, seconds: float) -> None: ...

    def blocked(self) -> Block: ...

    async def areserve(self, max_wait: float) -> Reservation: ...

    async def apenalize(self, seconds: float) -> None: ...

    async def ablocked(self) -> Block: ...


def _take(tokens: float, rate: float, max_wait: float) -> tuple[float, Reservation]:
    """The bucket rule (mirrored in the Lua script): take one token if the wait is affordable."""
    wait = max(0.0, (1.0 - tokens) / rate)
    if wait > max_wait:
        return tokens, Reservation(False, wait)
    return tokens - 1.0, Reservation(True, wait)


class LocalBudget:
    """A token bucket for one process (threads and event loops alike; the lock is held for microseconds)."""

    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = limit.capacity
        self._stamp = clock()
        self._blocked_until = self._stamp

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self.limit.capacity, self._tokens + elapsed * self.limit.rate)
        self._stamp = now

    def available(self) -> float:
        """Tokens left right now (negative while a 429 penalty lasts): the budget gauge reads it."""
        with self._lock:
            self._refill()
            return self._tokens

    def reserve(self, max_wait: float) -> Reservation:
        with self._lock:
            self._refill()
            self._tokens, reservation = _take(self._tokens, self.limit.rate, max_wait)
            return Reservation(reservation.granted, reservation.wait, self._blocked_until)

    def penalize(self, seconds: float) -> None:
        """The server said 429: nobody may send for ``seconds`` (the next token is that far away)."""
        with self._lock:
            self._refill()
            self._tokens = min(self._tokens, 1.0 - seconds * self.limit.rate)
            self._blocked_until = max(self._blocked_until, self._stamp + seconds)

    def blocked(self) -> Block:
        """The latest penalty: callers holding an earlier reservation wait out what is ``left`` of it."""
        with self._lock:
            return Block(self._blocked_until, max(0.0, self._blocked_until - self._clock()))

    async def areserve(self, max_wait: float) -> Reservation:
        return self.reserve(max_wait)

    async def apenalize(self, seconds: float) -> None:
        self.penalize(seconds)

    async def ablocked(self) -> Block:
        return self.blocked()


# KEYS[1] = bucket hash; ARGV = rate, capacity, max_wait, penalty_s (0 = reserve, > 0 = penalize).
# Returns {granted, wait, blocked} as strings (Redis truncates Lua numbers to integers); ``blocked`` is
# the stored string as is, so the value the block check returns later compares equal to it.
_SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local penalty = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp', 'blocked')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
local blocked = state[3] or '0'
if tokens == nil or stamp == nil then
  tokens = capacity
  stamp = now
end
tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate)
local granted = 0
local wait = 0
if penalty > 0 then
  tokens = math.min(tokens, 1 - penalty * rate)
  if now + penalty > tonumber(blocked) then
    blocked = tostring(now + penalty)
  end
else
  wait = math.max(0, (1 - tokens) / rate)
  if wait <= max_wait then
    tokens = tokens - 1
    granted = 1
  end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now), 'blocked', blocked)
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 60000)
return {granted, tostring(wait), blocked}
"""

# KEYS[1] = bucket hash. Returns {blocked, left}: the latest penalty's end and its seconds left, on Redis' clock.
_BLOCKED_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local blocked = redis.call('HGET', KEYS[1], 'blocked') or '0'
return {blocked, tostring(math.max(0, tonumber(blocked) - now))}
"""


# A reservation is one tiny script on a server that answers in microseconds: a Redis that takes seconds is
# as good as down, and every Clerk call waits for it. Connect gets more: one lost SYN costs a second.
_REDIS_CONNECT_TIMEOUT_S = 2.0
_REDIS_TIMEOUT_S = 1.0


class RedisBudget:
    """The same bucket in Redis, shared by every process using the same Clerk secret key.

    Needs the ``redis`` extra. The key is derived from a hash of the secret key, never the key itself.
    Connecting waits at most ``connect_timeout_s`` and each answer ``timeout_s`` (the URL's own
    ``?socket_connect_timeout=`` / ``?socket_timeout=`` win), without retries; a Redis that is down or
    does not answer in time raises :class:`~clerk_sync.errors.ClerkUnavailable` and the call is not sent. A URL
    redis-py cannot read (a password with an unencoded ``/``, ``?`` or ``#``) raises
    :class:`~clerk_sync.errors.ConfigError`, which shows it masked and never quotes the password.
    """

    def __init__(self, url: str, limit: RateLimit, secret_key: str, *, prefix: str = "clerk_sync:budget",
                 connect_timeout_s: float = _REDIS_CONNECT_TIMEOUT_S, timeout_s: float = _REDIS_TIMEOUT_S) -> None:
        try:
            import redis
            import redis.asyncio
            from redis.asyncio.retry import Retry as AsyncRetry
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # a setting this environment cannot honour: one line from the CLI, not a traceback
            raise ConfigError(
                "REDIS_URL is set but the 'redis' package is missing: pip install 'clerk-sync[redis]' into this "
                "environment, or unset REDIS_URL to keep the rate budget in this process"
            ) from exc
        if not (connect_timeout_s > 0 and timeout_s > 0):  # also refuses nan
            raise ValueError("RedisBudget needs connect_timeout_s > 0 and timeout_s > 0: without them a Redis "
                             "that never answers hangs every Clerk call")
        self.limit = limit
        self.key = f"{prefix}:{hashlib.sha256(secret_key.encode()).hexdigest()[:16]}"
        self.url = masked_url(url)
        # No retries (redis-py 6 and 7 retry three times with backoff by default): a script that timed out
        # may have run, and a retry would take a second token; the caller's ClerkUnavailable is retryable.
        timeouts: dict[str, Any] = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": timeout_s}
        # redis-py's own parse errors may quote the password ("Port could not be cast to integer value as
        # 'pa'"): raised outside the except clause, so neither __cause__ nor __context__ carries them.
        problem: str | None = None
        try:
            if _credentials_cut_short(url):
                problem = "its password seems to hold an unencoded '/', '?' or '#'"
            else:
                self._sync = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **timeouts)
                self._async = redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **timeouts)
        except ValueError as exc:  # urllib's and redis-py's parse errors alike
            problem = str(exc) if _SAFE_PARSE_ERROR.fullmatch(str(exc)) else "it cannot be parsed"
        if problem is not None:
            message = f"REDIS_URL {self.url} is not a Redis URL redis-py can read ({problem}): {_URL_HELP}"
            raise ConfigError(message) from None
        self._script = self._sync.register_script(_SCRIPT)
        self._ascript = self._async.register_script(_SCRIPT)
        self._blocked = self._sync.register_script(_BLOCKED_SCRIPT)
        self._ablocked = self._async.register_script(_BLOCKED_SCRIPT)
        self._error_type = redis.RedisError
        self._timeout_type = redis.TimeoutError

    def _args(self, max_wait: float, penalty: float) -> list[str]:
        return [repr(self.limit.rate), repr(self.limit.capacity), repr(max_wait), repr(penalty)]

    def reserve(self, max_wait: float) -> Reservation:
        with self._redis_errors():
            return _reservation(self._script(keys=[self.key], args=self._args(max_wait, 0.0)))

    def penalize(self, seconds: float) -> None:
        with self._redis_errors():
            self._script(keys=[self.key], args=self._args(0.0, max(seconds, 1e-6)))

    def blocked(self) -> Block:
        with self._redis_errors():
            return _block(self._blocked(keys=[self.key]))

    async def areserve(self, max_wait: float) -> Reservation:
        with self._redis_errors():
            return _reservation(await self._ascript(keys=[self.key], args=self._args(max_wait, 0.0)))

    async def apenalize(self, seconds: float) -> None:
        with self._redis_errors():
            await self._ascript(keys=[self.key], args=self._args(0.0, max(seconds, 1e-6)))

    async def ablocked(self) -> Block:
        with self._redis_errors():
            return _block(await self._ablocked(keys=[self.key]))

    @contextmanager
    def _redis_errors(self) -> Iterator[None]:
        # Without the shared budget we cannot know what other processes spent: fail closed, retryably.
        try:
            yield
        except self._error_type as exc:
            raise ClerkUnavailable(self._unavailable(exc), retry_after=1.0) from exc

    def _unavailable(self, exc: Exception) -> str:
        kwargs = self._sync.connection_pool.connection_kwargs
        what = (f"did not answer in time (connect timeout {kwargs.get('socket_connect_timeout')}s, reply "
                f"timeout {kwargs.get('socket_timeout')}s)" if isinstance(exc, self._timeout_type)
                else "is unreachable")
        return (f"the shared Clerk request budget in Redis at {self.url} {what} ({exc}), so the call was not "
                "sent to Clerk: check that Redis is running and answering there (redis-cli ping) and that "
                "REDIS_URL points at it; retry later")

    def reset(self) -> None:
        """Forget the bucket (tests and benchmarks start from a full bucket)."""
        self._sync.delete(self.key)

    def close(self) -> None:
        """Close the blocking face's connections (an async user closes with :meth:`aclose`); twice is safe."""
        self._sync.close()

    async def aclose(self) -> None:
        """Close both faces' connections; twice is safe. Shielded: a close cancelled half-way (the task's
        timeout, a task group shutting down) would leave them open, warned about as "unclosed Connection"."""
        with anyio.CancelScope(shield=True):
            await self._async.aclose()
        self._sync.close()


_URL_HELP = ("the scheme is redis://, rediss:// or unix://, and a password (or user name) holding '/', '?', '#', "
             "'@' or '%' must be percent-encoded, e.g. urllib.parse.quote(password, safe='')")
# redis-py parse errors whose text is fixed (a parameter's name at most), never a piece of the URL's user part.
_SAFE_PARSE_ERROR = re.compile(r"Invalid value for '\w+' in connection URL\.|Port out of range 0-65535|"
                               r"\"max_connections\" must be a positive integer|Redis URL must specify .*")


def _credentials_cut_short(url: str) -> bool:
    """An ``@`` where a Redis URL never has one (a redis:// db path, a query parameter's name, the fragment): an
    unencoded ``/``, ``?`` or ``#`` in the password ended the host early, and redis-py would read the password's
    start as host and port without a word (``redis://:1234/x@host`` connects to localhost:1234)."""
    parts = urlsplit(url)
    # A unix:// path is the socket's and may hold an '@'; with a user part before it cut short, it is suspect.
    socket_path = parts.scheme == "unix" and not (parts.netloc and "@" not in parts.netloc)
    names = (piece.partition("=")[0] for piece in parts.query.split("&"))
    # No host but a port, and an '@' further on (a query value: ``redis://:12?ab=c@host``): the password's digits
    # were read as the port. A query value may hold an '@' (``?client_name=ops@example.com``), a host-less port
    # never does on purpose.
    hostless_port = "@" not in parts.netloc and parts.netloc.startswith(":") and "@" in parts.query
    return (("@" in parts.path and not socket_path) or "@" in parts.fragment or hostless_port
            or any("@" in name for name in names))


def _reservation(reply: Any) -> Reservation:
    granted, wait, blocked = reply
    return Reservation(bool(int(granted)), float(wait), float(blocked))


def _block(reply: Any) -> Block:
    until, left = reply
    return Block(float(until), float(left))


def budget_from_settings(settings: Settings) -> LocalBudget | RedisBudget:
    """Redis-shared when ``REDIS_URL`` is set, in-process otherwise; the limit from the settings."""
    secret = settings.clerk_secret_key.get_secret_value() if settings.clerk_secret_key else ""
    limit = default_rate_limit(secret)
    if settings.clerk_api_rate_limit is not None:
        limit = RateLimit(settings.clerk_api_rate_limit, settings.clerk_api_rate_window_s)
    if settings.redis_url:
        return RedisBudget(settings.redis_url, limit, secret)
    return LocalBudget(limit)
