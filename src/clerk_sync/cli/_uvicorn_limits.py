"""``serve``'s bound on a request's head (request line and headers) under uvicorn's httptools parser.

Hand-written because no uvicorn option does it for httptools (``h11_max_incomplete_event_size`` is h11's, and
h11 cost ~15 % of the service's CPU): httptools keeps a header line until it ends, however long, and every byte
received cancels uvicorn's keep-alive timer (a fresh connection has none), so a client sending an endless header
block, or trickling one byte at a time, held the connection and what it sent for ever. Here a head larger than
``max_head_bytes`` (``CLERK_SYNC_MAX_HEAD_BYTES``) is answered 431 and one not complete within ``head_timeout_s``
(``CLERK_SYNC_HEAD_TIMEOUT_S``) of its first byte (of the connection, for its first request) 408, and the
connection closed; with pipelined requests, after the answers to those before it (a read holding several requests
is counted per request). The head's time counts only while the server reads: not while uvicorn holds reading
paused behind the answers before it. Empty lines before a request line are ignored (RFC 9112 §2.2): they do not
start a head, and the connection stays idle (keep-alive's timer runs on). A body still coming when its request's
answer is complete (an app that answered without reading it: every byte trickled also cancelled the keep-alive
timer) ends the connection with a lingering close, as nginx's: writing shut down once the answer is out, what
arrives read and dropped until the client stops sending (``linger_idle_s``) or ``linger_s`` at most, then closed
(closed at once, the unread bytes reset the connection, and the client could lose the answer).
Past ``--limit-concurrency`` a liveness probe (``GET /healthz``) is still answered, as nothing else is.
Relies on names uvicorn has had since 0.30 (``data_received``, ``on_message_begin``, ``on_headers_complete``,
``on_message_complete``, ``on_response_complete``, ``cycle.response_complete``, ``flow`` and its
``FlowControl``, ``transport``, ``parser``, ``loop``, ``url``, ``limit_concurrency``); a module-level class,
so ``serve --workers N``'s spawned workers unpickle it (a ``functools.partial`` of it with the settings,
:func:`bounded_httptools`) with the ``uvicorn.Config``.
"""

from __future__ import annotations

import asyncio
import functools
import http
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BoundedHttpTools", "bounded_httptools"]

_EMPTY_LINE = b"\r\n"
LIVENESS_PATH = b"/healthz"  # answered past --limit-concurrency (BoundedHttpTools.on_headers_complete)


def bounded_httptools(max_head_bytes: int, head_timeout_s: float) -> Any:
    """uvicorn's ``http=`` for :class:`BoundedHttpTools` with these limits (picklable: ``--workers N``)."""
    return functools.partial(BoundedHttpTools, max_head_bytes=max_head_bytes, head_timeout_s=head_timeout_s)


class _FlowTellingReads(FlowControl):
    """uvicorn's flow control, telling the protocol when reading pauses and resumes (the head's clock)."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedHttpTools) -> None:
        super().__init__(transport)
        self._protocol = protocol

    def pause_reading(self) -> None:
        super().pause_reading()
        self._protocol._reading_paused()

    def resume_reading(self) -> None:
        super().resume_reading()
        self._protocol._reading_resumed()


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size and a time limit on each request's head."""

    max_head_bytes = 64 * 1024  # Clerk's (Svix's) heads are under 1 KiB; nginx's default allows 32 KiB
    head_timeout_s = 10.0  # Svix gives an attempt 15 s (30 s self-hosted), its body included
    linger_s = 5.0  # a lingering close lasts this long at most (nginx's lingering_time: 30 s)...
    linger_idle_s = 1.0  # ...and ends once the client sent nothing for this long (nginx's lingering_timeout: 5 s)

    _head: int | None = 0  # bytes of this request's head received so far; None from its end to the next request
    _head_timer: asyncio.TimerHandle | None = None
    _head_left: float | None = None  # the head's time left while reading is paused (its timer then stopped)
    _between = True  # no request begun since the last one ended: empty lines are ignored
    _refusal: bytes | None = None  # our 431 or 408, once said or while it waits for the answers before it
    _linger_ends: float | None = None  # when a lingering close ends at the latest (loop time); None: not lingering
    _linger_timer: asyncio.TimerHandle | None = None
    # A read is fed in pieces of at most this while in a head, so a head beginning in the read that ended the
    # request before it (pipelined) is bounded within this many bytes (its bytes in that read are not counted)
    _piece_bytes = 4 * 1024

    def __init__(self, *args: Any, max_head_bytes: int | None = None, head_timeout_s: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if max_head_bytes is not None:
            self.max_head_bytes = max_head_bytes
        if head_timeout_s is not None:
            self.head_timeout_s = head_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _FlowTellingReads(transport, self)
        self._start_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._linger_ends is not None:  # the client is done sending: the lingering close is over
            self.transport.close()
        # (returning None: the transport closes itself then)

    def data_received(self, data: bytes) -> None:
        if self._linger_ends is not None:  # (read and dropped)
            self._linger()
            return
        if self._head is None:  # a body
            super().data_received(data)
            return
        if self._refusal is not None:  # (a refused head's bytes: dropped)
            return
        if self._between and self._head == 0:  # empty lines before a request line: not a head (RFC 9112 §2.2)
            data = data.lstrip(_EMPTY_LINE)
            if not data:
                return
        if not self._timing():  # a keep-alive connection's next request begins
            self._start_timer()
        if len(data) <= self._piece_bytes and self._head + len(data) <= self.max_head_bytes:
            self._head += len(data)
            super().data_received(data)
        else:
            self._feed_heads(memoryview(data))

    def _feed_heads(self, data: memoryview) -> None:
        """Feed a read beginning in a head piece by piece, each counted against the head being received when
        it is fed: a head may end within the read, its body or more (pipelined) requests following."""
        while data:
            if self._head is None:  # a body: the rest of the read at once
                if not self.parser.should_upgrade():  # (an upgrade's bytes after its head: dropped, as uvicorn does)
                    super().data_received(data)  # type: ignore[arg-type]  # (httptools reads any buffer)
                return
            piece = min(self._piece_bytes, self.max_head_bytes - self._head)
            if piece <= 0:
                self._refuse(431, f"the request's head (request line and headers) is over {self.max_head_bytes} bytes")
                return
            self._head += piece
            super().data_received(data[:piece])  # type: ignore[arg-type]
            if self.transport.is_closing():  # (a malformed head: uvicorn answered 400)
                return
            data = data[piece:]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._between = False
        if not self._timing():  # (a pipelined head beginning in the read that ended the request before it)
            self._start_timer()

    def on_headers_complete(self) -> None:
        self._head = None
        self._stop_timer()
        limit = self.limit_concurrency
        if limit is None or not self._is_liveness_probe():
            super().on_headers_complete()
            return
        # Past --limit-concurrency uvicorn answers every request 503, the liveness probe's too: held connections
        # (load, or idle ones anyone can open) would have Kubernetes restart a pod that is up, its deliveries
        # and hook handlers cut (review). /healthz costs no body and no database: it is answered. /readyz is
        # not (a pod past its limit is rightly taken out of rotation).
        self.limit_concurrency = None
        try:
            super().on_headers_complete()
        finally:
            self.limit_concurrency = limit

    def _is_liveness_probe(self) -> bool:
        path = self.url.partition(b"?")[0]
        return path == LIVENESS_PATH and self.parser.get_method() in (b"GET", b"HEAD")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0  # the next request's head is timed from its first byte (between requests: keep-alive's)
        self._between = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or not self.cycle.response_complete:  # (a pipelined request's turn now)
            return
        if self._head is None:  # answered before its body was in: not read on (trickled, it held the connection)
            if not self.parser.should_upgrade():
                self._start_lingering()
        elif self._refusal is not None:  # the next head was refused while this answer was pending: said now
            self.transport.write(self._refusal)
            self.transport.close()

    def _start_lingering(self) -> None:
        """Close as nginx's lingering close: writing shut down once the answer is out (``write_eof`` waits for
        it), the client's bytes read and dropped until it stops sending for ``linger_idle_s``, ends its side, or
        ``linger_s`` passed. A close with unread bytes resets the connection, which may destroy the answer
        before the client read it. Bounded: the connection is held ``linger_s`` at most, its bytes not kept."""
        self._unset_keepalive_if_required()
        if not self.transport.can_write_eof():  # (TLS: no half-close; closed as before)
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_ends = self.loop.time() + self.linger_s
        self._linger()

    def _linger(self) -> None:
        """(Re)arm the lingering close's timer: ``linger_idle_s`` from now, never past its end."""
        assert self._linger_ends is not None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._linger_timer = self.loop.call_at(min(self._linger_ends, self.loop.time() + self.linger_idle_s),
                                               self.transport.close)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._head is None or self.transport.is_closing():
            return
        if self._head or self.cycle is not None:  # (a pipelined head, begun in the read before: counted from 0)
            self._refuse(408, f"the request's head did not arrive within {self.head_timeout_s:g} s")
        else:  # nothing sent on a new connection
            self.transport.close()

    # -- the head's clock, which runs only while the server reads ---------------------------------------------
    def _timing(self) -> bool:
        return self._head_timer is not None or self._head_left is not None

    def _start_timer(self) -> None:
        self._head_left = self.head_timeout_s
        if not self.flow.read_paused:
            self._reading_resumed()

    def _stop_timer(self) -> None:
        self._head_left = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _reading_paused(self) -> None:
        if self._head_timer is not None:
            self._head_left = max(0.0, self._head_timer.when() - self.loop.time())
            self._head_timer.cancel()
            self._head_timer = None

    def _reading_resumed(self) -> None:
        if self._head_left is not None and self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_left, self._head_late)
            self._head_left = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close: now, or once the answers to the requests before this one are written
        (uvicorn pipelines: an answer of ours written now would be read as theirs), what comes meanwhile dropped."""
        self._stop_timer()
        body = message.encode()
        self._refusal = (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n%s" % (status, http.HTTPStatus(status).phrase.encode(),
                                                           len(body), body))
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.pause_reading()
            return
        self.transport.write(self._refusal)
        self.transport.close()
