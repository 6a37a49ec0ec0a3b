"""``serve``'s bound on a request's head (request line and headers) under uvicorn's httptools parser.

Hand-written because no uvicorn option does it for httptools (``h11_max_incomplete_event_size`` is h11's, and
h11 cost ~15 % of the service's CPU): httptools keeps a header line until it ends, however long, and every byte
received cancels uvicorn's keep-alive timer (a fresh connection has none), so a client sending an endless header
block, or trickling one byte at a time, held the connection and what it sent for ever. Here a head larger than
:attr:`BoundedHttpTools.max_head_bytes` is answered 431 and one not complete within
:attr:`BoundedHttpTools.head_timeout_s` of its first byte (of the connection, for its first request) 408, and
the connection closed. Relies on names uvicorn has had since 0.30 (``data_received``, ``on_headers_complete``,
``on_message_complete``, ``transport``, ``parser``, ``loop``); a module-level class, so ``serve --workers N``'s
spawned workers unpickle it with the ``uvicorn.Config``.
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
        if self._head_timer is None:  # a keep-alive connection's next request begins
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)
        room = self.max_head_bytes - self._head
        self._head += len(data)
        if len(data) <= room:
            super().data_received(data)
            return
        if room > 0:  # the head may end within the limit, its body following in the same read
            super().data_received(data[:room])
        if self.transport.is_closing():  # (a malformed head: uvicorn answered 400)
            return
        if self._head is not None:
            self._refuse(431, f"the request's head (request line and headers) is over {self.max_head_bytes} bytes")
        elif not self.parser.should_upgrade():  # (an upgrade's bytes after its head: dropped, as uvicorn does)
            super().data_received(data[room:])

    def on_headers_complete(self) -> None:
        self._head = None
        self._stop_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0  # the next request's head is timed from its first byte (between requests: keep-alive's)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._head is None or self.transport.is_closing():
            return
        if self._head:
            self._refuse(408, f"the request's head did not arrive within {self.head_timeout_s:g} s")
        else:  # nothing sent on a new connection
            self.transport.close()

    def _stop_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, message: str) -> None:
        self._head = None
        self._stop_timer()
        body = message.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, http.HTTPStatus(status).phrase.encode(),
                                                               len(body), body))
        self.transport.close()
