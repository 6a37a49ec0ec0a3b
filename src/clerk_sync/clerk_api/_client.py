"""Thin sync and async shells over the sans-IO policy: they execute steps, nothing else.

Usage::

    clerk = ClerkClient.from_settings(settings)            # or AsyncClerkClient
    user = clerk.get_user("user_2abc")                     # JSON dict, Clerk's User object
    page = clerk.list_organizations(limit=500, offset=0)   # Page(data, total_count)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import anyio
import httpx

from clerk_sync._http_deadline import attempt_until, install
from clerk_sync.clerk_api import _endpoints as ep
from clerk_sync.clerk_api._endpoints import JSON, MAX_PAGE, Page
from clerk_sync.clerk_api._flights import AsyncFlights, SyncFlights
from clerk_sync.clerk_api._policy import (
    Acquire,
    ApiRequest,
    CircuitBreaker,
    Hold,
    Penalize,
    RetryPolicy,
    Send,
    Sleep,
    Stats,
    Step,
    _Context,
    call_flow,
)
from clerk_sync.clerk_api.ratelimit import Block, Budget, LocalBudget, budget_from_settings, default_rate_limit
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.metrics import Metrics
from clerk_sync.tracing import span

__all__ = ["API_VERSION", "DEFAULT_API_URL", "DEFAULT_TIMEOUT", "AsyncClerkClient", "ClerkClient"]

T = TypeVar("T")
API_VERSION = "2026-05-12"
DEFAULT_API_URL = "https://api.clerk.com"
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=3.0)


def _user_agent() -> str:
    try:
        return f"clerk-sync/{version('clerk-sync')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "clerk-sync"


_NO_BLOCK = Block(0.0, 0.0)
# An attempt that got no usable answer: the transport failed, or the body is not what its Content-Encoding
# says (httpx's DecodingError is no TransportError; it escaped the ClerkAPIError tree, review).
_FAILED = (httpx.TransportError, httpx.DecodingError)
_Failed = httpx.TransportError | httpx.DecodingError


def _v1_base(api_url: str) -> str:
    """``CLERK_API_URL`` plus ``/v1``, once: the Clerk Python SDK's ``server_url`` form
    (``https://api.clerk.com/v1``) is accepted too, rather than every call 404ing on ``/v1/v1/...``."""
    return api_url.rstrip("/").removesuffix("/v1") + "/v1"


def _server(base_url: str) -> dict[str, str | int]:
    """``server.address`` and ``server.port`` of the calls' spans (the port httpx leaves out: the scheme's)."""
    url = httpx.URL(base_url)
    return {"server.address": url.host, "server.port": url.port or (443 if url.scheme == "https" else 80)}


class _Traced:
    """A call's span, named and attributed as OpenTelemetry's HTTP client conventions say: kind CLIENT, named
    ``{method} {url.template}`` (``GET /users/{id}``), and once the call ends the last answer's
    ``http.response.status_code``, ``http.request.resend_count`` when it was sent more than once, and on a
    failed call ``error.type``: the status code it failed on, else the class of the transport error of its
    last attempt, else that of the error that refused it unsent (the circuit breaker, our budget). One span
    covers the call, its retries included."""

    __slots__ = ("_last", "_sends", "_span")

    def __init__(self, current: Any) -> None:
        self._span = current if current is not None and current.is_recording() else None
        self._sends = 0
        self._last: httpx.Response | BaseException | None = None

    @staticmethod
    def start(req: ApiRequest[Any], server: dict[str, str | int]) -> AbstractContextManager[Any]:
        attributes = {"http.request.method": req.method, "url.template": req.endpoint, **server}
        return span(f"{req.method} {req.endpoint}", attributes, client=True)

    def sent(self, outcome: httpx.Response | BaseException) -> None:
        self._sends += 1
        self._last = outcome

    def end(self, error: BaseException | None) -> None:
        if self._span is None:  # no OpenTelemetry, or a span nobody records
            return
        last = self._last
        if isinstance(last, httpx.Response):
            self._span.set_attribute("http.response.status_code", last.status_code)
        if self._sends > 1:
            self._span.set_attribute("http.request.resend_count", self._sends - 1)
        if error is None:
            return
        if isinstance(last, httpx.Response) and last.status_code >= 400:
            kind = str(last.status_code)
        else:
            cause = last if isinstance(last, BaseException) else error
            kind = f"{type(cause).__module__}.{type(cause).__qualname__}"
        self._span.set_attribute("error.type", kind)


def _late(step: Send) -> httpx.ReadTimeout:
    return httpx.ReadTimeout(f"the answer was still arriving when the {step.left:.2f}s left of the call's "
                             "deadline ran out", request=step.request)


def _late_or(exc: _Failed, until: float, step: Send) -> _Failed:
    """A timeout that the deadline cut (not the configured timeout) reads as the async face's does."""
    return _late(step) if isinstance(exc, httpx.TimeoutException) and time.monotonic() >= until else exc


class _ReadBy(httpx.SyncByteStream):
    """The answer's body, read only until ``until`` (monotonic); then it is a read timeout."""

    def __init__(self, stream: httpx.SyncByteStream, until: float, step: Send) -> None:
        self._stream, self._until, self._step = stream, until, step

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            if time.monotonic() > self._until:
                raise _late(self._step)
            yield chunk

    def close(self) -> None:
        self._stream.close()


class _Base:
    """Configuration shared by both faces; the faces differ only in how they execute steps."""

    def __init__(
        self,
        secret_key: str,
        *,
        api_url: str = DEFAULT_API_URL,
        budget: Budget | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        owns_budget: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        secret_key = (secret_key or "").strip()  # a key read from a file ends in a newline no header may carry
        if not secret_key:
            raise ConfigError("CLERK_SECRET_KEY is not set (Clerk Dashboard -> API keys -> Secret keys)")
        if not secret_key.isascii() or any(c.isspace() or not c.isprintable() for c in secret_key):
            # as Settings refuses it: httpx would raise UnicodeEncodeError (or quote the header) on every call
            raise ConfigError("the Clerk secret key has a space, a control character or a non-ASCII character "
                              "(a typographic quote or ellipsis pasted from a document) inside it (not shown): "
                              "copy it again from Clerk Dashboard -> API keys -> Secret keys")
        self.budget: Budget = budget or LocalBudget(default_rate_limit(secret_key))
        self._owns_budget = owns_budget  # from_settings may create a Redis budget: close it with us
        self.breaker = breaker or CircuitBreaker(clock=clock)
        self.retry = retry or RetryPolicy()
        self.stats = Stats()
        headers = {
            "Authorization": f"Bearer {secret_key}",
            "Clerk-API-Version": API_VERSION,
            "User-Agent": _user_agent(),
            "Accept": "application/json",
        }
        self._ctx = _Context(_v1_base(api_url), headers, timeout, self.retry, self.breaker,
                             self.stats, clock, rng, metrics.api_call if metrics is not None else None)
        self._server = _server(self._ctx.base_url)
        if metrics is not None:
            # A local budget knows its tokens; asking Redis would cost a round trip per scrape.
            local = hasattr(self.budget, "available")
            metrics.watch_clerk_client(breaker_open=lambda: self.breaker.refusing(),
                                       budget_tokens=(lambda: float(self.budget.available())) if local else None)  # type: ignore[attr-defined]

    @staticmethod
    def _settings_kwargs(settings: Settings, budget: Budget | None) -> dict[str, Any]:
        if settings.clerk_secret_key is None:
            raise ConfigError("CLERK_SECRET_KEY is not set (Clerk Dashboard -> API keys -> Secret keys)")
        return {
            "secret_key": settings.clerk_secret_key.get_secret_value(),
            "api_url": settings.clerk_api_url,
            "budget": budget or budget_from_settings(settings),
            "owns_budget": budget is None,
            "timeout": httpx.Timeout(settings.clerk_api_read_timeout_s,
                                     connect=settings.clerk_api_connect_timeout_s),
        }

    def _timeout(self, deadline_s: float | None) -> float:
        return deadline_s if deadline_s is not None else self.retry.deadline_s


class ClerkClient(_Base):
    """Blocking face; thread-safe. Pass ``http`` (an :class:`httpx.Client` you own) or a ``transport``.

    An attempt ends by the call's deadline, as the async face's cancel scope ends it: the sockets of
    ``http``'s own transports (httpx's ``HTTPTransport``, proxies too) wait no longer than what is left
    (:mod:`clerk_sync._http_deadline`); any other transport's answer is still read by the deadline."""

    def __init__(self, secret_key: str, *, http: httpx.Client | None = None,
                 transport: httpx.BaseTransport | None = None, **options: Any) -> None:
        super().__init__(secret_key, **options)
        self._owns_http = http is None
        self._http = http or httpx.Client(transport=transport, timeout=DEFAULT_TIMEOUT)
        install(self._http)
        self._flights = SyncFlights()

    @classmethod
    def from_settings(cls, settings: Settings, *, http: httpx.Client | None = None,
                      budget: Budget | None = None, **options: Any) -> ClerkClient:
        return cls(http=http, **cls._settings_kwargs(settings, budget), **options)

    def close(self) -> None:
        """Close what this client opened (its HTTP client, the budget ``from_settings`` made); twice is safe."""
        try:
            if self._owns_http:
                self._http.close()
        finally:
            close_budget = getattr(self.budget, "close", None)
            if self._owns_budget and close_budget is not None:
                close_budget()

    def __enter__(self) -> ClerkClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, req: ApiRequest[T], deadline_s: float | None = None) -> T:
        """Run one request through budget, retries and breaker (coalesced if ``req.coalesce``)."""
        if req.coalesce:
            total = self._timeout(deadline_s)
            return self._flights.do(req.key, lambda left: self._run(req, left), total,
                                    min_left=self.retry.floor(total))
        return self._run(req, deadline_s)

    def _run(self, req: ApiRequest[T], deadline_s: float | None) -> T:
        flow = call_flow(self._ctx, req, deadline_s)
        reply: Any = None
        error: BaseException | None = None
        with _Traced.start(req, self._server) as current:
            traced = _Traced(current)
            try:
                while True:
                    try:
                        step = flow.send(reply)
                    except StopIteration as stop:
                        return stop.value  # type: ignore[no-any-return]
                    reply = self._execute(step)
                    if isinstance(step, Send):
                        traced.sent(reply)
            except BaseException as exc:
                error = exc
                raise
            finally:
                flow.close()  # a call given up mid-flow (cancelled, interrupted) frees its probe slot now
                traced.end(error)

    def _execute(self, step: Step) -> Any:
        if isinstance(step, Acquire):
            return self.budget.reserve(step.max_wait)
        if isinstance(step, Hold):  # a Budget of the app's own from before blocked() existed: no block known
            return self.budget.blocked() if hasattr(self.budget, "blocked") else _NO_BLOCK
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
        elif isinstance(step, Penalize):
            self.budget.penalize(step.seconds)
        else:
            return self._send(step)
        return None

    def _send(self, step: Send) -> httpx.Response | _Failed:
        """Send, and have the answer by the deadline: each phase's own timeout (connect, write, read) would
        otherwise let the attempt run past it, and so would headers or a body trickling in faster than the
        read timeout. A late answer is closed and reported as a timeout, as the async face reports it."""
        until = time.monotonic() + step.left
        with attempt_until(until):
            try:
                # (never a redirect, whatever client was given: a 302 would turn a PATCH into a GET, and the
                # secret key would travel on to wherever Location points; review)
                response = self._http.send(step.request, stream=True, follow_redirects=False)
            except _FAILED as exc:
                return _late_or(exc, until, step)
            try:
                assert isinstance(response.stream, httpx.SyncByteStream)
                response.stream = _ReadBy(response.stream, until, step)
                response.read()
            except _FAILED as exc:
                return _late_or(exc, until, step)
            finally:
                response.close()
        return response

    # -- endpoints (one line each; the requests are built in _endpoints) ----------------------
    def get_user(self, user_id: str, *, deadline_s: float | None = None) -> JSON:
        return self.send(ep.get_user(user_id), deadline_s)

    def list_users(self, *, limit: int = MAX_PAGE, offset: int = 0, order_by: str | None = "-created_at",
                   user_ids: Sequence[str] = (), starting_after: str | None = None,
                   created_at_after: int | None = None, deadline_s: float | None = None) -> list[JSON]:
        """A page of users; ``starting_after`` (the last id of the previous page, ``created_at`` orderings
        only) pages by cursor, which Clerk recommends past a few pages: a deep ``offset`` times out.
        ``created_at_after``: only users created after it (ms since the epoch)."""
        req = ep.list_users(limit, offset, order_by, user_ids, starting_after, created_at_after)
        return self.send(req, deadline_s)

    def count_users(self, *, deadline_s: float | None = None) -> int:
        return self.send(ep.count_users(), deadline_s)

    def get_instance(self, *, deadline_s: float | None = None) -> JSON:
        """The Clerk instance the secret key belongs to (``{"object": "instance", "id": "ins_..", ..}``)."""
        return self.send(ep.get_instance(), deadline_s)

    def get_organization(self, org_id: str, *, deadline_s: float | None = None) -> JSON:
        return self.send(ep.get_organization(org_id), deadline_s)

    def list_organizations(self, *, limit: int = MAX_PAGE, offset: int = 0, order_by: str | None = "-created_at",
                           org_ids: Sequence[str] = (), deadline_s: float | None = None) -> Page:
        return self.send(ep.list_organizations(limit, offset, order_by, org_ids), deadline_s)

    def list_organization_memberships(self, org_id: str, *, limit: int = MAX_PAGE, offset: int = 0,
                                      order_by: str | None = None, user_ids: Sequence[str] = (),
                                      deadline_s: float | None = None) -> Page:
        return self.send(ep.list_organization_memberships(org_id, limit, offset, order_by, user_ids), deadline_s)

    def list_all_organization_memberships(self, *, limit: int = MAX_PAGE, offset: int = 0,
                                          order_by: str | None = None, deadline_s: float | None = None) -> Page:
        return self.send(ep.list_all_organization_memberships(limit, offset, order_by), deadline_s)

    def update_user_metadata(self, user_id: str, *, public_metadata: JSON | None = None,
                             private_metadata: JSON | None = None, unsafe_metadata: JSON | None = None,
                             deadline_s: float | None = None) -> JSON:
        """Deep-merge metadata (``None`` values delete keys); returns the updated User."""
        req = ep.update_user_metadata(user_id, public_metadata, private_metadata, unsafe_metadata)
        return self.send(req, deadline_s)

    def create_actor_token(self, user_id: str, actor: JSON, *, expires_in_seconds: int | None = None,
                           session_max_duration_in_seconds: int | None = None,
                           deadline_s: float | None = None) -> JSON:
        req = ep.create_actor_token(user_id, actor, expires_in_seconds, session_max_duration_in_seconds)
        return self.send(req, deadline_s)

    def create_sign_in_token(self, user_id: str, *, expires_in_seconds: int | None = None,
                             deadline_s: float | None = None) -> JSON:
        return self.send(ep.create_sign_in_token(user_id, expires_in_seconds), deadline_s)

    def revoke_session(self, session_id: str, *, deadline_s: float | None = None) -> JSON:
        return self.send(ep.revoke_session(session_id), deadline_s)


class AsyncClerkClient(_Base):
    """Async face (asyncio or trio); use from one event loop. Pass ``http`` or a ``transport``."""

    def __init__(self, secret_key: str, *, http: httpx.AsyncClient | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> None:
        super().__init__(secret_key, **options)
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(transport=transport, timeout=DEFAULT_TIMEOUT)
        self._flights = AsyncFlights()

    @classmethod
    def from_settings(cls, settings: Settings, *, http: httpx.AsyncClient | None = None,
                      budget: Budget | None = None, **options: Any) -> AsyncClerkClient:
        return cls(http=http, **cls._settings_kwargs(settings, budget), **options)

    async def aclose(self) -> None:
        """Close what this client opened (its HTTP client, the budget ``from_settings`` made); twice is safe.

        Shielded: ``async with`` exits through here when its task is cancelled (a timeout, a task group
        shutting down), and a cancelled close left the Redis budget's connections open ("unclosed
        Connection", review)."""
        with anyio.CancelScope(shield=True):
            try:
                if self._owns_http:
                    await self._http.aclose()
            finally:
                close_budget = getattr(self.budget, "aclose", None)
                if self._owns_budget and close_budget is not None:
                    await close_budget()

    async def __aenter__(self) -> AsyncClerkClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def send(self, req: ApiRequest[T], deadline_s: float | None = None) -> T:
        """Run one request through budget, retries and breaker (coalesced if ``req.coalesce``)."""
        if req.coalesce:
            total = self._timeout(deadline_s)
            return await self._flights.do(req.key, lambda left: self._run(req, left), total,
                                          min_left=self.retry.floor(total))
        return await self._run(req, deadline_s)

    async def _run(self, req: ApiRequest[T], deadline_s: float | None) -> T:
        flow = call_flow(self._ctx, req, deadline_s)
        reply: Any = None
        error: BaseException | None = None
        with _Traced.start(req, self._server) as current:
            traced = _Traced(current)
            try:
                while True:
                    try:
                        step = flow.send(reply)
                    except StopIteration as stop:
                        return stop.value  # type: ignore[no-any-return]
                    reply = await self._execute(step)
                    if isinstance(step, Send):
                        traced.sent(reply)
            except BaseException as exc:
                error = exc
                raise
            finally:
                flow.close()  # a call given up mid-flow (cancelled, interrupted) frees its probe slot now
                traced.end(error)

    async def _execute(self, step: Step) -> Any:
        if isinstance(step, Acquire):
            return await self.budget.areserve(step.max_wait)
        if isinstance(step, Hold):
            return await self.budget.ablocked() if hasattr(self.budget, "ablocked") else _NO_BLOCK
        if isinstance(step, Sleep):
            await anyio.sleep(step.seconds)
        elif isinstance(step, Penalize):
            await self.budget.apenalize(step.seconds)
        else:
            return await self._send(step)
        return None

    async def _send(self, step: Send) -> httpx.Response | _Failed:
        """Send, and read the answer by the deadline (httpx's timeouts bound each read, not the answer)."""
        try:
            with anyio.fail_after(step.left):
                return await self._http.send(step.request, follow_redirects=False)  # (as the blocking client)
        except TimeoutError:
            return _late(step)
        except _FAILED as exc:
            return exc

    # -- endpoints -------------------------------------------------------------------------
    async def get_user(self, user_id: str, *, deadline_s: float | None = None) -> JSON:
        return await self.send(ep.get_user(user_id), deadline_s)

    async def list_users(self, *, limit: int = MAX_PAGE, offset: int = 0, order_by: str | None = "-created_at",
                         user_ids: Sequence[str] = (), starting_after: str | None = None,
                         created_at_after: int | None = None, deadline_s: float | None = None) -> list[JSON]:
        """A page of users (see :meth:`ClerkClient.list_users`)."""
        req = ep.list_users(limit, offset, order_by, user_ids, starting_after, created_at_after)
        return await self.send(req, deadline_s)

    async def count_users(self, *, deadline_s: float | None = None) -> int:
        return await self.send(ep.count_users(), deadline_s)

    async def get_instance(self, *, deadline_s: float | None = None) -> JSON:
        return await self.send(ep.get_instance(), deadline_s)

    async def get_organization(self, org_id: str, *, deadline_s: float | None = None) -> JSON:
        return await self.send(ep.get_organization(org_id), deadline_s)

    async def list_organizations(self, *, limit: int = MAX_PAGE, offset: int = 0,
                                 order_by: str | None = "-created_at", org_ids: Sequence[str] = (),
                                 deadline_s: float | None = None) -> Page:
        return await self.send(ep.list_organizations(limit, offset, order_by, org_ids), deadline_s)

    async def list_organization_memberships(self, org_id: str, *, limit: int = MAX_PAGE, offset: int = 0,
                                            order_by: str | None = None, user_ids: Sequence[str] = (),
                                            deadline_s: float | None = None) -> Page:
        req = ep.list_organization_memberships(org_id, limit, offset, order_by, user_ids)
        return await self.send(req, deadline_s)

    async def list_all_organization_memberships(self, *, limit: int = MAX_PAGE, offset: int = 0,
                                                order_by: str | None = None,
                                                deadline_s: float | None = None) -> Page:
        return await self.send(ep.list_all_organization_memberships(limit, offset, order_by), deadline_s)

    async def update_user_metadata(self, user_id: str, *, public_metadata: JSON | None = None,
                                   private_metadata: JSON | None = None, unsafe_metadata: JSON | None = None,
                                   deadline_s: float | None = None) -> JSON:
        """Deep-merge metadata (``None`` values delete keys); returns the updated User."""
        req = ep.update_user_metadata(user_id, public_metadata, private_metadata, unsafe_metadata)
        return await self.send(req, deadline_s)

    async def create_actor_token(self, user_id: str, actor: JSON, *, expires_in_seconds: int | None = None,
                                 session_max_duration_in_seconds: int | None = None,
                                 deadline_s: float | None = None) -> JSON:
        req = ep.create_actor_token(user_id, actor, expires_in_seconds, session_max_duration_in_seconds)
        return await self.send(req, deadline_s)

    async def create_sign_in_token(self, user_id: str, *, expires_in_seconds: int | None = None,
                                   deadline_s: float | None = None) -> JSON:
        return await self.send(ep.create_sign_in_token(user_id, expires_in_seconds), deadline_s)

    async def revoke_session(self, session_id: str, *, deadline_s: float | None = None) -> JSON:
        return await self.send(ep.revoke_session(session_id), deadline_s)

