"""An attempt deadline for blocking httpx clients: every socket wait of an attempt is cut to what is left of it.

httpx's timeouts bound each connect, write and read on its own, so an attempt whose phases each kept within
their timeout could outlast its deadline: a connect, then headers or a body trickling in one read at a time
(review: the Clerk client's ``deadline_s=0.3`` took 1.5 s; a forwarding sink's ``timeout_s=1.0`` took 8 s
against a receiver dripping its header block, or sending ``100 Continue`` forever). An async client bounds the
whole attempt with a cancel scope; a blocking socket has no such thing, so the caller sets the attempt's end
(:func:`attempt_until`) and :class:`DeadlineBackend`, installed in the client's HTTP transports
(:func:`install`), cuts every connect, TLS handshake, read and write to what is left of it and times out once
nothing is.

One place for both users: the Clerk API's blocking client (``clerk_api/_client.py``) and the Standard
Webhooks forwarding sink (``hooks/sinks.py``); the same two read a server's ``Retry-After`` here
(:func:`retry_after`). It sits at the bottom layer (it imports nothing of
clerk_sync) so the sink need not import the Clerk client to use it.
"""

from __future__ import annotations

import email.utils
import math
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

from clerk_sync._time import as_utc

__all__ = ["DeadlineBackend", "attempt_until", "install", "retry_after"]

_until: ContextVar[float | None] = ContextVar("clerk_sync_attempt_until", default=None)
_NOTHING_LEFT = "the attempt's deadline ran out"


@contextmanager
def attempt_until(until: float) -> Iterator[None]:
    """Socket waits of this thread's attempt end by ``until`` (``time.monotonic()``)."""
    token = _until.set(until)
    try:
        yield
    finally:
        _until.reset(token)


def _cut(timeout: float | None, error: type[httpcore.TimeoutException]) -> float | None:
    until = _until.get()
    if until is None:  # not one of our attempts (a client the app shares with us, used by the app)
        return timeout
    left = until - time.monotonic()
    if left <= 0:
        raise error(_NOTHING_LEFT)
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _cut(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _cut(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _cut(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend (``backend``), its waits cut to the attempt's deadline where one is set."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(host, port, _cut(timeout, httpcore.ConnectTimeout), local_address,
                                           socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        stream = self._backend.connect_unix_socket(path, _cut(timeout, httpcore.ConnectTimeout), socket_options)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:  # httpcore's connect retries (HTTPTransport(retries=...))
        until = _until.get()
        self._backend.sleep(seconds if until is None else max(0.0, min(seconds, until - time.monotonic())))


def install(http: httpx.Client) -> int:
    """Put :class:`DeadlineBackend` under the connection pools of ``http``'s transports (httpx's own
    ``HTTPTransport``, mounted proxies too); returns how many it holds. A transport with no socket of its
    own (``MockTransport``, WSGI) is left as it is: the client still reads the body by the deadline.

    httpx has no public way to pass a network backend to its transport, so this reaches the pool through
    ``_transport``/``_mounts``/``_pool``/``_network_backend`` (httpx 0.27 to 0.29, httpcore 1.x); a test
    checks it, so a release that renames them fails there instead of silently losing the bound."""
    transports = [getattr(http, "_transport", None), *getattr(http, "_mounts", {}).values()]
    installed = 0
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, DeadlineBackend):
            installed += 1
        elif isinstance(backend, httpcore.NetworkBackend):
            pool._network_backend = DeadlineBackend(backend)  # type: ignore[union-attr]
            installed += 1
    return installed


def retry_after(headers: Mapping[str, str], *, default: float, cap: float) -> float:
    """A server's ``Retry-After`` (seconds, or an HTTP date) as seconds from now, within 0 .. ``cap``;
    ``default`` when absent or unreadable. "inf", "nan" or a date in the year 9999 is the server's mistake:
    it must not park a client (or a hook job) for longer than ``cap``."""
    raw = headers.get("retry-after")
    if raw is None:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return min(max(0.0, seconds), cap) if math.isfinite(seconds) else default
    try:  # a malformed date ("99999999999999999999:00:00") overflows rather than failing to parse
        # (an HTTP date is GMT: the asctime form, "Sun Nov  6 08:49:37 1994", parses naive, read as UTC here,
        # not in the host's zone)
        delay = as_utc(email.utils.parsedate_to_datetime(raw)).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        return default
    return min(max(0.0, delay), cap)
