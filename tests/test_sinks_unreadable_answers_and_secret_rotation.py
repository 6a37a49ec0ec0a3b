"""The forwarding sink: an answer's body that cannot be read does not decide the outcome (its
status does), answers are asked for uncompressed and read as sent (never inflated), and several
secrets sign one delivery while rotating.

The receivers are real loopback servers: raw sockets where the answer must be malformed byte for byte
(``tests.test_sinks_timeout_and_secret_encoding.slow_receiver``), a Starlette app under uvicorn otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import socket
import threading
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clerk_sync.changes import Hook
from clerk_sync.errors import ConfigError, HookGaveUp
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.hooks.sinks import StandardWebhookSink
from tests import factories as f
from tests._server import running
from tests.test_hooks import B, deliver, hooked, jobs
from tests.test_sinks_timeout_and_secret_encoding import CHANGE, SECRET, slow_receiver

NEW_SECRET = "whsec_" + "bmV3LXNlY3JldC1hZnRlci10aGUtcm90YXRpb24tb2YtdGhlLWtleQ=="

Answer = Callable[[socket.socket, threading.Event], None]


def _answer(status: int, head: str, body: bytes) -> Answer:
    """An answer with this status, extra header lines and body bytes, exactly as given; then the connection closes."""
    reason = {200: "OK", 410: "Gone"}[status]

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(f"HTTP/1.1 {status} {reason}\r\n{head}Connection: close\r\n\r\n".encode() + body)

    return answer


_BAD_BODIES = {
    # gzip announced, not gzip: httpx.DecodingError while reading
    "bad-gzip": ("Content-Encoding: gzip\r\nContent-Length: 16\r\n", b"this is not gzip"),
    # 100 bytes announced, 10 sent before the connection closes: httpx.RemoteProtocolError
    "truncated": ("Content-Length: 100\r\n", b"only a bit"),
    # codecs Python knows, but not text encodings: bytes.decode raises LookupError
    "charset-rot13": ("Content-Type: text/plain; charset=rot13\r\nContent-Length: 5\r\n", b"nopqr"),
    "charset-base64": ("Content-Type: text/plain; charset=base64\r\nContent-Length: 4\r\n", b"YWJj"),
}


@pytest.mark.parametrize("problem", list(_BAD_BODIES))
def test_a_success_whose_body_cannot_be_read_is_still_a_success(problem: str) -> None:
    """Fixed: a 2xx whose body could not be read or decoded raised, so an accepted delivery was
    retried for hours and then marked dead. The receiver has accepted it: the status decides."""
    head, body = _BAD_BODIES[problem]
    with slow_receiver(_answer(200, head, body)) as (url, _):
        sink = StandardWebhookSink(url, SECRET, timeout_s=5)
        sink(CHANGE)  # no exception: delivered
        sink.close()


@pytest.mark.parametrize("problem", list(_BAD_BODIES))
def test_a_410_whose_body_cannot_be_read_still_stops_sending(problem: str) -> None:
    """The same body problems on a 410 hid the receiver's "stop sending": the job was retried as any error.
    It is :class:`HookGaveUp` (dead at once), quoting what of the body could be read."""
    head, body = _BAD_BODIES[problem]
    with slow_receiver(_answer(410, head, body)) as (url, _):
        sink = StandardWebhookSink(url, SECRET, timeout_s=5)
        with pytest.raises(HookGaveUp, match=r"/hook answered 410: .*the job is dead, not retried"):
            sink(CHANGE)
        sink.close()


def test_an_accepted_delivery_with_a_bad_gzip_body_finishes_its_job(sqlite_url: str) -> None:
    """Through the dispatcher: the job is done (deleted), not pending for a retry."""
    head, body = _BAD_BODIES["bad-gzip"]
    with slow_receiver(_answer(200, head, body)) as (url, _):
        sink = StandardWebhookSink(url, SECRET, timeout_s=5)
        store = hooked(sqlite_url, Hook("forward", sink, on=["user.*"]))
        deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
        assert Dispatcher(store, backoff=Backoff(base_s=60), heartbeat_s=0).run_once() == 1
        sink.close()
    assert jobs(store) == []
    store.dispose()


def test_answers_are_asked_for_uncompressed() -> None:
    """Fixed: httpx advertised gzip (this receiver would take it up), so a small answer could inflate
    to far more in memory, all at once. The sink asks for ``identity``."""
    seen: list[str | None] = []

    async def endpoint(request: Request) -> Response:
        seen.append(request.headers.get("accept-encoding"))
        wants_gzip = "gzip" in (seen[-1] or "")
        content = gzip.compress(b"ok " * 1000) if wants_gzip else b"ok"
        return Response(content, headers={"content-encoding": "gzip"} if wants_gzip else None)

    with running(Starlette(routes=[Route("/in", endpoint, methods=["POST"])])) as url:
        sink = StandardWebhookSink(f"{url}/in", SECRET)
        sink(CHANGE)
        sink.close()
    assert seen == ["identity"]


# -- several secrets while rotating ---------------------------------------------------------------------

def _verifying_receiver(secrets: dict[str, str], verified: list[set[str]]) -> Starlette:
    """Records, for each delivery, which of ``secrets`` (by name) verify it with the Standard Webhooks library."""

    async def endpoint(request: Request) -> Response:
        body, headers = await request.body(), dict(request.headers)
        ok: set[str] = set()
        for name, secret in secrets.items():
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            ok.add(name)
        verified.append(ok)
        return Response(status_code=204 if ok else 400)

    return Starlette(routes=[Route("/in", endpoint, methods=["POST"])])


@pytest.mark.parametrize("secrets", [
    [SECRET, NEW_SECRET],
    (SecretStr(SECRET), NEW_SECRET),
    [SecretStr(SECRET), SecretStr(NEW_SECRET)],
], ids=["list", "tuple-mixed", "secretstr"])
def test_several_secrets_sign_so_a_receiver_with_either_verifies(secrets: Any) -> None:
    """Fixed: rotating the receiver's secret needs the sender to sign with both for a while
    (Standard Webhooks: several space-separated signatures in one header). The sink took one secret; a
    list failed with an AttributeError. Each secret signs, and a receiver holding the old one or the new
    one (and nothing else) verifies the delivery."""
    verified: list[set[str]] = []
    app = _verifying_receiver({"old": SECRET, "new": NEW_SECRET, "other": "whsec_" + "b3RoZXI="}, verified)
    with running(app) as url:
        sink = StandardWebhookSink(f"{url}/in", secrets)
        sink(CHANGE)
        sink.close()
    assert verified == [{"old", "new"}]


def test_the_signatures_are_joined_by_one_space() -> None:
    headers: list[str] = []

    async def endpoint(request: Request) -> Response:
        headers.append(request.headers["webhook-signature"])
        return Response(status_code=204)

    with running(Starlette(routes=[Route("/in", endpoint, methods=["POST"])])) as url:
        sink = StandardWebhookSink(f"{url}/in", [SECRET, NEW_SECRET])
        sink(CHANGE)
        sink.close()
    (header,) = headers
    old, new = header.split(" ")
    assert old.startswith("v1,") and new.startswith("v1,") and old != new


def test_a_space_separated_secret_is_refused_with_a_way_that_works() -> None:
    """A space-separated string is still refused (a key with a space is no key): the message says to pass a
    list while rotating, and that list is accepted."""
    with pytest.raises(ConfigError, match=r"a list of them while rotating") as refused:
        StandardWebhookSink("http://receiver.test/hook", f"{SECRET} {NEW_SECRET}")
    assert SECRET.removeprefix("whsec_") not in str(refused.value)
    StandardWebhookSink("http://receiver.test/hook", f"{SECRET} {NEW_SECRET}".split()).close()


@pytest.mark.parametrize(("secrets", "said"), [
    ([], "StandardWebhookSink's secret is an empty list"),
    ([SECRET, "whsec_abc$def"], "StandardWebhookSink's secret #2 is not valid base64"),
    ([SecretStr("whsec_"), NEW_SECRET], "StandardWebhookSink's secret #1 is only the 'whsec_' prefix"),
], ids=["empty", "second-bad", "first-prefix-only"])
def test_each_secret_of_a_list_is_checked(secrets: list[str | SecretStr], said: str) -> None:
    with pytest.raises(ConfigError, match=said) as refused:
        StandardWebhookSink("http://receiver.test/hook", secrets)
    assert "Pass the receiver's Standard Webhooks secret" in str(refused.value)


# -- a compressed answer is not inflated --------------------------------------------------------------------

@functools.cache
def _gzip_bomb(megabytes: int = 200) -> bytes:
    """``megabytes`` MB of zeros, gzipped twice: a few hundred bytes (``Content-Encoding: gzip, gzip``)."""
    inner = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    once = b"".join(inner.compress(bytes(1 << 20)) for _ in range(megabytes)) + inner.flush()
    return gzip.compress(once)


def _bomb_answer(status: int) -> Answer:
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        body = _gzip_bomb()
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Encoding: gzip, gzip\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)

    return answer


def _peak_bytes(call: Callable[[], object]) -> int:
    """The most memory Python held during ``call`` beyond what it held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("status", [200, 500])
def test_a_compressed_answer_is_not_inflated(status: int) -> None:
    """Fixed: httpx decoded whatever Content-Encoding the receiver sent, stacked and without bound, so
    a 658-byte answer inflated to ~600 MB in the worker. The body is read as sent: a success is done,
    an error quotes the encoding, and the process holds no more than the few bytes it read."""
    assert len(_gzip_bomb()) < 4096  # 200 MB once inflated
    with slow_receiver(_bomb_answer(status)) as (url, _):
        sink = StandardWebhookSink(url, SECRET, timeout_s=5)
        with contextlib.suppress(RuntimeError):  # once before measuring: what is imported or cached at first use
            sink(CHANGE)
        outcome: list[object] = []

        def deliver_once() -> None:
            try:
                sink(CHANGE)
                outcome.append("done")
            except RuntimeError as exc:
                outcome.append(str(exc))

        peak = _peak_bytes(deliver_once)
        sink.close()
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MB held while reading a {len(_gzip_bomb())}-byte answer"
    assert outcome == (["done"] if status == 200 else
                       [f"{url} answered 500: (a body in Content-Encoding 'gzip, gzip', not decoded)"])


@pytest.mark.parametrize(("status", "left"), [(200, 0), (500, 1)])
def test_a_compressed_answer_finishes_or_retries_its_job_as_its_status_says(
        sqlite_url: str, status: int, left: int) -> None:
    """Through the dispatcher: a 200 is done, a 500 pending for a retry with the encoding as its last error."""
    with slow_receiver(_bomb_answer(status)) as (url, _):
        sink = StandardWebhookSink(url, SECRET, timeout_s=5)
        store = hooked(sqlite_url, Hook("forward", sink, on=["user.*"]))
        deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
        Dispatcher(store, backoff=Backoff(base_s=60), heartbeat_s=0).run_once()
        sink.close()
    left_jobs = jobs(store)
    assert len(left_jobs) == left
    if left:
        assert left_jobs[0]["attempts"] == 1
        assert "answered 500: (a body in Content-Encoding 'gzip, gzip', not decoded)" in left_jobs[0]["last_error"]
    store.dispose()


def test_a_redirect_is_not_followed_even_by_a_client_that_follows_them() -> None:
    """Review finding: FORWARDING.md says a 3xx is not followed (point the sink at the final URL), but that held
    only for the sink's own client: one given with ``follow_redirects=True`` re-sent the signed body (private
    metadata included) wherever the receiver's ``Location`` pointed, another host too, and the job counted as
    delivered. The sink asks for no redirect on every request now: the 307 is the job's error, retried."""
    elsewhere: list[bytes] = []

    async def other_host(request: Request) -> Response:
        elsewhere.append(await request.body())
        return Response(status_code=204)

    with running(Starlette(routes=[Route("/elsewhere", other_host, methods=["POST"])])) as other:
        async def moved(request: Request) -> Response:
            return Response(status_code=307, headers={"location": f"{other}/elsewhere"})

        with running(Starlette(routes=[Route("/in", moved, methods=["POST"])])) as url:
            sink = StandardWebhookSink(f"{url}/in", SECRET, client=httpx.Client(follow_redirects=True))
            with pytest.raises(RuntimeError, match=r"/in answered 307"):
                sink(CHANGE)
            sink.close()
    assert elsewhere == []
