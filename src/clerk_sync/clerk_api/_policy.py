"""The request policy, sans I/O: budget, retries with jitter, ``Retry-After``, circuit breaker.

:func:`call_flow` is a generator that *describes* one API call as steps (:class:`Acquire` a token,
:class:`Sleep`, :class:`Hold` for a 429's block, :class:`Send`, :class:`Penalize` the budget) and receives
each step's outcome; the sync and async clients only execute steps. All decisions live here once, so both
faces behave the same and the policy is testable with a fake clock.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from clerk_sync._http_deadline import retry_after
from clerk_sync.clerk_api.ratelimit import Block, Reservation
from clerk_sync.errors import (
    ClerkAPIError,
    ClerkNotFound,
    ClerkPaymentRequired,
    ClerkUnauthorized,
    ClerkUnavailable,
    ClerkValidationError,
    RateLimited,
)

__all__ = [
    "UNREACHABLE",
    "Acquire",
    "ApiRequest",
    "CircuitBreaker",
    "Hold",
    "Penalize",
    "RetryPolicy",
    "Send",
    "Sleep",
    "Stats",
    "Step",
    "call_flow",
    "unreachable_advice",
]

T = TypeVar("T")
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class ApiRequest(Generic[T]):
    """One Backend API call: path under ``/v1``, how to parse the JSON answer, how it may be retried.

    ``idempotent=False`` (creating tokens) is retried only when the request surely never reached Clerk
    (connect errors, 429). ``coalesce=True`` lets concurrent identical calls share one request.
    ``per_object_limit=True``: Clerk also limits the endpoint per user, organization or membership (10
    requests / 10 s), so its 429 holds this call only, not the instance's shared budget.
    """

    method: str
    path: str
    parse: Callable[[Any], T]
    params: tuple[tuple[str, str], ...] = ()
    json: Any = None
    idempotent: bool = True
    coalesce: bool = False
    per_object_limit: bool = False
    route: str = ""  # the path template for metrics and spans (``/users/{id}``); default: ``path``

    @property
    def endpoint(self) -> str:
        return self.route or self.path

    @property
    def key(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        return (self.method, self.path, self.params)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries on 5xx/timeouts with full-jitter exponential backoff,
    plus up to ``rate_limited_attempts`` waits on 429. ``deadline_s`` bounds the whole call.

    An attempt is sent only with ``min_attempt_s`` of the deadline left (or the whole deadline, if
    shorter): waiting for our own budget must not leave Clerk a few milliseconds to answer in.
    """

    attempts: int = 3
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    rate_limited_attempts: int = 5
    deadline_s: float = 30.0
    min_attempt_s: float = 0.5

    def backoff(self, attempt: int, rng: Callable[[], float]) -> float:
        return rng() * min(self.backoff_max_s, self.backoff_s * 2.0**attempt)

    def floor(self, deadline_s: float) -> float:
        """The least time an attempt is sent with (a short deadline still waits half of itself for a token,
        rather than being refused whenever the budget is busy)."""
        return min(self.min_attempt_s, deadline_s / 2)


class CircuitBreaker:
    """Fail fast while Clerk is down: ``threshold`` consecutive failures open the circuit for ``reset_s``.

    Then one probe is let through (half-open); its success closes the circuit, its failure re-opens it.
    Shared by all threads of a client; state changes happen under a lock.
    """

    def __init__(self, threshold: int = 5, reset_s: float = 5.0, *, clock: Clock = time.monotonic) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_at: float | None = None
        self._probe = 0  # numbers the probes, so a call frees only its own slot (release)

    @property
    def is_open(self) -> bool:
        """The circuit tripped and no call has succeeded since: half-open included (``reset_s`` has passed
        and the next call goes through as a probe). :meth:`refusing` says whether calls are refused now."""
        with self._lock:
            return self._opened_at is not None

    def refusing(self) -> bool:
        """``True`` while :meth:`check` would refuse a call, by the breaker's own clock: within ``reset_s``
        of the circuit opening, or of a probe still in flight. Unlike :meth:`check` it takes no probe slot.
        ``clerk_sync_clerk_api_circuit_open`` reads this: once ``reset_s`` has passed with no call, the next
        call is let through, and the circuit is no longer reported open (it opens again if that call fails)."""
        with self._lock:
            if self._opened_at is None:
                return False
            now = self._clock()
            if now < self._opened_at + self.reset_s:
                return True
            return self._probe_at is not None and now - self._probe_at < self.reset_s

    def check(self) -> float | None:
        """``None`` when a request may go out, else seconds until the circuit lets a probe through."""
        return self.admit()[0]

    def admit(self) -> tuple[float | None, int | None]:
        """:meth:`check`, and the probe's number when this call is the half-open probe: it must end in
        :meth:`success`, :meth:`failure` or :meth:`release`, or every other call waits ``reset_s`` for it."""
        with self._lock:
            if self._opened_at is None:
                return None, None
            now = self._clock()
            wait = self._opened_at + self.reset_s - now
            if wait > 0:
                return wait, None
            if self._probe_at is not None and now - self._probe_at < self.reset_s:
                return self._probe_at + self.reset_s - now, None  # a probe is in flight
            self._probe_at, self._probe = now, self._probe + 1
            return None, self._probe

    def release(self, probe: int) -> None:
        """Probe ``probe`` ended without a verdict on Clerk (our budget refused it, the deadline ran out, the
        caller gave up): the next call probes instead of waiting out ``reset_s``."""
        with self._lock:
            if self._probe_at is not None and self._probe == probe:
                self._probe_at = None

    def success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._probe_at = 0, None, None

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._opened_at is not None or self._failures >= self.threshold:
                self._opened_at, self._probe_at = self._clock(), None


@dataclass
class Stats:
    """Counters of one client: what went over the wire and what came back."""

    requests: int = 0
    rate_limited: int = 0
    retries: int = 0
    failures: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def sent(self, status: int | None) -> None:
        with self._lock:
            self.requests += 1
            if status is None:
                self.failures += 1
            else:
                self.by_status[status] = self.by_status.get(status, 0) + 1
                self.rate_limited += status == 429

    def retried(self) -> None:
        with self._lock:
            self.retries += 1


@dataclass(frozen=True, slots=True)
class Acquire:
    """Reserve a budget token; the shell answers with a :class:`~clerk_sync.clerk_api.ratelimit.Reservation`."""

    max_wait: float


@dataclass(frozen=True, slots=True)
class Penalize:
    """Clerk said 429: block the (shared) budget for ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Hold:
    """Before sending on a token we waited for: the shell answers with the budget's latest
    :class:`~clerk_sync.clerk_api.ratelimit.Block` (a 429 may have come in meanwhile)."""


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``request`` and read its answer within ``left`` seconds (httpx's timeouts bound each read, not
    the whole answer); the shell answers with the :class:`httpx.Response` or the transport error."""

    request: httpx.Request
    left: float


Step = Acquire | Hold | Penalize | Sleep | Send
Flow = Generator[Step, Any, T]


@dataclass(frozen=True, slots=True)
class _Context:
    base_url: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    retry: RetryPolicy
    breaker: CircuitBreaker
    stats: Stats
    clock: Clock
    rng: Callable[[], float] = random.random
    on_response: Callable[[str, int | None], None] | None = None  # (endpoint, status): the metrics hook


def _retryable(status: int) -> bool:
    """Any 5xx (Cloudflare's 520-524 too) but 501 and 505, which say the request can never work."""
    return 500 <= status < 600 and status not in (501, 505)


def call_flow(ctx: _Context, req: ApiRequest[T], deadline_s: float | None = None) -> Flow[T]:
    """Drive one call to a parsed result or a :class:`~clerk_sync.errors.ClerkAPIError`."""
    total = deadline_s if deadline_s is not None else ctx.retry.deadline_s
    deadline = ctx.clock() + total
    floor = ctx.retry.floor(total)
    probes: list[int] = []  # the half-open probes this call took: freed at its end, verdict or not
    try:
        return (yield from _attempts(ctx, req, total, deadline, floor, probes))
    finally:
        for probe in probes:
            ctx.breaker.release(probe)


def _attempts(ctx: _Context, req: ApiRequest[T], total: float, deadline: float, floor: float,
              probes: list[int]) -> Flow[T]:
    attempt = limited = 0
    where = {"method": req.method, "path": req.path}
    while True:
        blocked, probe = ctx.breaker.admit()
        if probe is not None:
            probes.append(probe)
        if blocked is not None:
            raise ClerkUnavailable("Clerk is unavailable (circuit open)", retry_after=blocked, **where)
        reservation: Reservation = yield Acquire(max_wait=max(0.0, deadline - ctx.clock() - floor))
        if not reservation.granted:
            block: Block = yield Hold()
            if block.left > 0:  # a 429's Retry-After holds the budget, not our own rate
                raise RateLimited(
                    f"{req.method} {req.path}: Clerk answered 429 to this client earlier and its Retry-After holds "
                    f"every call for {block.left:.2f}s more, past the {total:g}s deadline: retry after that",
                    retry_after=reservation.wait, status=429, **where)
            raise RateLimited(
                f"{req.method} {req.path}: our Clerk request budget (not Clerk) is the limit: the next token "
                f"is {reservation.wait:.2f}s away, which would leave less than {floor:.2f}s of the "
                f"{total:g}s deadline to send in", retry_after=reservation.wait, **where)
        if reservation.wait > 0:
            yield Sleep(reservation.wait)
            yield from _hold(ctx, req, reservation.blocked_until, deadline, floor)
        left = deadline - ctx.clock()
        outcome = yield Send(_build(ctx, req, left), max(left, 0.001))
        status = outcome.status_code if isinstance(outcome, httpx.Response) else None
        ctx.stats.sent(status)
        if ctx.on_response is not None:
            ctx.on_response(req.endpoint, status)
        if isinstance(outcome, httpx.Response) and 200 <= outcome.status_code < 300:
            ctx.breaker.success()
            return _parsed(outcome, req)
        if status == 429:
            ctx.breaker.success()  # Clerk answered: it is up (its limit is not an outage)
            limited += 1
            retry_after = _retry_after(outcome, default=1.0)
            if not req.per_object_limit:  # the instance's limit: every caller of the (shared) budget waits
                yield Penalize(retry_after)
            if limited > ctx.retry.rate_limited_attempts or retry_after + floor > deadline - ctx.clock():
                raise RateLimited(f"{req.method} {req.path}: Clerk answered 429 Too Many Requests"
                                  + (_PER_OBJECT if req.per_object_limit else ""), retry_after=retry_after,
                                  status=429, **where)
            ctx.stats.retried()
            if req.per_object_limit:  # one user's (organization's) limit: this call waits, nobody else
                yield Sleep(retry_after)
            continue
        if status is not None and not _retryable(status):
            ctx.breaker.success()  # Clerk is up; the request was refused
            raise _error(outcome, req)
        if _cut_short(ctx, outcome, left, total):
            raise ClerkUnavailable(f"{req.method} {req.path}: no answer within the {max(left, 0.0):.2f}s left of "
                                   f"the {total:g}s deadline (the rest went waiting for our budget or earlier "
                                   f"attempts)", retry_after=1.0, **where)
        ctx.breaker.failure()
        attempt += 1
        pause = _pause(ctx, req, outcome, attempt)
        if pause is None or pause + floor > deadline - ctx.clock():
            raise _unavailable(outcome, req, ctx.base_url, retry_after=max(pause or 0.0, 1.0))
        ctx.stats.retried()
        yield Sleep(pause)


def _hold(ctx: _Context, req: ApiRequest[Any], seen: float, deadline: float, floor: float) -> Flow[None]:
    """Wait out a 429's ``Retry-After`` that began after our reservation: the penalty only pushed later
    reservations back, and a token taken before it would otherwise be spent inside the blocked window."""
    while True:
        block: Block = yield Hold()
        if block.until <= seen or block.left <= 0:
            return
        if block.left + floor > deadline - ctx.clock():
            raise RateLimited(f"{req.method} {req.path}: Clerk answered 429 to this client meanwhile, asking it to "
                              f"wait {block.left:.2f}s more, past the deadline", retry_after=block.left,
                              status=429, method=req.method, path=req.path)
        yield Sleep(block.left)
        seen = block.until


_TOO_SHORT_S = 1.0  # under this, a timeout says nothing about Clerk (its answers take ~0.1-0.3 s)
_TIMEOUT_OF = {httpx.ConnectTimeout: "connect", httpx.ReadTimeout: "read", httpx.WriteTimeout: "write",
               httpx.PoolTimeout: "pool"}


def _cut_short(ctx: _Context, outcome: Any, left: float, total: float) -> bool:
    """A timeout at the deadline's cap (not the configured timeout), with under a second left (or twice
    ``min_attempt_s``) after our own waiting (the budget, earlier attempts) took a tenth of the deadline or
    more: too little time to say anything about Clerk, so the breaker does not count it. A call that had
    a second or more, or (nearly) its whole deadline, still counts: a hung Clerk must open the circuit,
    also while the budget is busy and every caller waits for a token first (review)."""
    kind = _TIMEOUT_OF.get(type(outcome))
    if kind is None:
        return False
    configured = getattr(ctx.timeout, kind)
    too_short = max(_TOO_SHORT_S, 2 * ctx.retry.min_attempt_s)
    return (configured is None or left < configured) and left < 0.9 * total and left < too_short


def _pause(ctx: _Context, req: ApiRequest[Any], outcome: Any, attempt: int) -> float | None:
    """Seconds to wait before retrying a failed attempt, or ``None`` when it must not be retried."""
    if attempt >= ctx.retry.attempts:
        return None
    if not req.idempotent and not isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout):
        return None
    pause = ctx.retry.backoff(attempt - 1, ctx.rng)
    if isinstance(outcome, httpx.Response):
        pause = max(pause, _retry_after(outcome, default=0.0))
    return pause


_PER_OBJECT = " (Clerk's limit of 10 per 10 s per user, organization or membership: other calls go on)"


def _parsed(response: httpx.Response, req: ApiRequest[T]) -> T:
    """The 2xx answer, parsed; an answer of the wrong shape names the call it answered."""
    body = _json(response, req)
    try:
        return req.parse(body)
    except ClerkAPIError as exc:  # the parsers know the shape, not the call
        raise ClerkAPIError(f"{req.method} {req.path}: answered {response.status_code}, but {exc}",
                            status=response.status_code, method=req.method, path=req.path) from None


def _json(response: httpx.Response, req: ApiRequest[Any]) -> Any:
    """The 2xx answer's JSON (``None`` when empty); an HTML page from a proxy is a ClerkAPIError, not a crash."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        kind = response.headers.get("content-type", "no content-type")
        raise ClerkAPIError(f"{req.method} {req.path}: Clerk answered {response.status_code} with a body that is "
                            f"not JSON ({kind})", status=response.status_code, method=req.method,
                            path=req.path) from None


def _build(ctx: _Context, req: ApiRequest[Any], remaining: float) -> httpx.Request:
    # Never wait on one attempt longer than the whole call may take.
    cap = max(remaining, 0.001)
    t = ctx.timeout
    timeout = httpx.Timeout(
        connect=min(t.connect or cap, cap), read=min(t.read or cap, cap),
        write=min(t.write or cap, cap), pool=min(t.pool or cap, cap),
    )
    return httpx.Request(
        req.method, ctx.base_url + req.path, params=list(req.params) or None, json=req.json,
        headers=ctx.headers, extensions={"timeout": timeout.as_dict()},
    )


_MAX_RETRY_AFTER_S = 3600.0  # the longest Retry-After believed (Clerk's own windows are 10 s)


def _retry_after(response: httpx.Response, default: float) -> float:
    """``Retry-After`` as seconds (integer or HTTP date); ``default`` when absent or unreadable."""
    return retry_after(response.headers, default=default, cap=_MAX_RETRY_AFTER_S)


def _clerk_error(response: httpx.Response) -> tuple[str, str | None, str | None]:
    """Message, Clerk error code and trace id from a ``ClerkErrors`` body (tolerating any body)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return f"HTTP {response.status_code}", None, response.headers.get("cf-ray")
    errors = body.get("errors")
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    message = first.get("long_message") or first.get("message") or f"HTTP {response.status_code}"
    trace = body.get("clerk_trace_id") or response.headers.get("cf-ray")
    return str(message), first.get("code"), trace


_BY_STATUS: dict[int, type[ClerkAPIError]] = {
    400: ClerkValidationError, 401: ClerkUnauthorized, 402: ClerkPaymentRequired, 403: ClerkUnauthorized,
    404: ClerkNotFound, 422: ClerkValidationError,
}


def _error(response: httpx.Response, req: ApiRequest[Any]) -> ClerkAPIError:
    if 300 <= response.status_code < 400:  # not followed: the URL is wrong, and a 302 would make a POST a GET
        target = response.headers.get("location", "elsewhere")
        return ClerkAPIError(f"{req.method} {req.path}: answered {response.status_code}, a redirect to {target}: "
                             f"CLERK_API_URL must be the API's own address (https://api.clerk.com)",
                             status=response.status_code, method=req.method, path=req.path)
    message, code, trace = _clerk_error(response)
    cls = _BY_STATUS.get(response.status_code, ClerkAPIError)
    return cls(f"{req.method} {req.path}: {message}", status=response.status_code, clerk_code=code,
               trace_id=trace, method=req.method, path=req.path)


# The failures :func:`unreachable_advice` words (LocalProtocolError: the request could not be written, never
# sent; its text quotes the header it refused).
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def unreachable_advice(exc: BaseException, base_url: str) -> str:
    """Why the Backend API at ``base_url`` could not be reached, naming the setting (the likeliest thing to be
    wrong) and what else to check: one wording for every caller (reconcile, doctor)."""
    shown = httpx.URL(base_url).copy_with(username=None, password=None)  # never echo credentials
    if isinstance(exc, httpx.LocalProtocolError):  # its text quotes the refused header: the key, in full
        return (f"could not send a request to {shown}: a header value holds a character HTTP cannot carry, most "
                "likely CLERK_SECRET_KEY (a newline or space inside it, from the file or command that set it): "
                "set it again")
    return (f"could not connect to {shown} ({type(exc).__name__}: {exc}): check CLERK_API_URL (Clerk's is "
            "https://api.clerk.com) and that this host can reach it (DNS, proxy, firewall)")


def _unavailable(outcome: Any, req: ApiRequest[Any], base_url: str, retry_after: float) -> ClerkUnavailable:
    where = {"method": req.method, "path": req.path}
    if isinstance(outcome, httpx.Response):
        message, code, trace = _clerk_error(outcome)
        return ClerkUnavailable(f"{req.method} {req.path}: Clerk answered {outcome.status_code}: {message}",
                                retry_after=retry_after, status=outcome.status_code, clerk_code=code,
                                trace_id=trace, **where)
    if isinstance(outcome, UNREACHABLE):
        return ClerkUnavailable(f"{req.method} {req.path}: {unreachable_advice(outcome, base_url)}",
                                retry_after=retry_after, **where)
    return ClerkUnavailable(f"{req.method} {req.path}: {type(outcome).__name__}: {outcome}",
                            retry_after=retry_after, **where)
