"""``serve``'s bound on a request's head (request line and headers) under uvicorn's httptools parser.

Hand-written because no uvicorn option does it for httptools (``h11_max_incomplete_event_size`` is h11's, and
h11 cost ~15 % of the service's CPU): httptools keeps a header line until it ends, however long, and every byte
received cancels uvicorn's keep-alive timer (a fresh connection has none), so a client sending an endless header
block, or trickling one byte at a time, held the connection and what it sent for ever. Here a head larger than
:attr:`BoundedHttpTools.max_head_bytes` is answered 431 and one not complete within
:attr:`BoundedHttpTools.head_timeout_s` of its first byte (of the connection, for its first request) 408, and
the connection closed; with pipelined requests, after the answers to those before it (a read holding several
requests is counted per request). A body still coming when its request's answer is complete (an app that
answered without reading it: every byte trickled also cancelled the keep-alive timer) closes the connection.
Relies on names uvicorn has had since 0.30 (``data_received``, ``on_message_begin``, ``on_headers_complete``,
``on_message_complete``, ``on_response_complete``, ``cycle.response_complete``, ``transport``, ``parser``,
``loop``); a module-level class, so ``serve --workers N``'s spawned workers unpickle it with the
``uvicorn.Config``.
"""

from __future__ import annotations

import asyncio
import http

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BoundedHttpTools"]


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size and a time limit on each request's head."""

    max_head_bytes = 64 * 1024  # Clerk's (Svix's) heads are under 1 KiB; nginx's default allows 32 KiB
    head_timeout_s = 10.0  # Svix gives an attempt 15 s (30 s self-hosted), its body included

    _head: int | None = 0  # bytes of this request's head received so far; None from its end to the next request
    _head_timer: asyncio.TimerHandle | None = None
    _refusal: bytes | None = None  # our 431 or 408, once said or while it waits for the answers before it
    # A read is fed in pieces of at most this while in a head, so a head beginning in the read that ended the
    # request before it (pipelined) is bounded within this many bytes (its bytes in that read are not counted)
    _piece_bytes = 4 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # a body
            super().data_received(data)
            return
        if self._refusal is not None:  # (a refused head's bytes: dropped)
            return
        if self._head_timer is None:  # a keep-alive connection's next request begins
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)
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
        if self._head_timer is None:  # (a pipelined head beginning in the read that ended the request before it)
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def on_headers_complete(self) -> None:
        self._head = None
        self._stop_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0  # the next request's head is timed from its first byte (between requests: keep-alive's)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or not self.cycle.response_complete:  # (a pipelined request's turn now)
            return
        if self._head is None:  # answered before its body was in: not read on (trickled, it held the connection)
            if not self.parser.should_upgrade():
                self.transport.close()
        elif self._refusal is not None:  # the next head was refused while this answer was pending: said now
            self.transport.write(self._refusal)
            self.transport.close()

    def _head_late(self) -> None:
        self._head_timer = None
        if self._head is None or self.transport.is_closing():
            return
        if self._head or self.cycle is not None:  # (a pipelined head, begun in the read before: counted from 0)
            self._refuse(408, f"the request's head did not arrive within {self.head_timeout_s:g} s")
        else:  # nothing sent on a new connection
            self.transport.close()

    def _stop_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

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
