"""The forwarding sink: ``timeout_s`` bounds the whole attempt, the wait for the answer's status
and headers included (a receiver dripping its header block, or sending ``100 Continue`` forever, held the
dispatcher as long as it liked), and a secret outside standard base64 is refused, not used as another key.

The slow receivers are raw sockets on loopback: what they send is exactly what the test says, byte by byte.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from clerk_sync.changes import Change, Hook
from clerk_sync.engine import Entity
from clerk_sync.errors import ConfigError
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.hooks.sinks import StandardWebhookSink
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs
from tests import factories as f
from tests.test_hooks import B, deliver

SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtYXBwLXRoYXQtcmVjZWl2ZXM="
TIMEOUT_S = 1.0
BOUND_S = TIMEOUT_S + 2.0  # generous: a loaded 2-core box schedules the threads late
DRIP_FOR_S = 10.0  # how long the receivers would go on: far past the bound
CHANGE = Change(Entity.USER, "user_1", "created", B, {"id": "user_1"})


def recording_client(seen: list[httpx.Request]) -> httpx.Client:
    """A client whose receiver answers 204 at once and keeps each request."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    return httpx.Client(transport=httpx.MockTransport(answer))


def _read_request(conn: socket.socket) -> None:
    """The request's head and its Content-Length body (the sink sends both at once, no Expect header)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


def _drip_headers(conn: socket.socket, stop: threading.Event) -> None:
    """The status line, then a header's value one byte every 0.1 s: each read well within the read timeout."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    started = time.monotonic()
    while time.monotonic() - started < DRIP_FOR_S and not stop.is_set():
        conn.sendall(b"a")
        time.sleep(0.1)
    conn.sendall(b"\r\nContent-Length: 0\r\n\r\n")


def _continue_forever(conn: socket.socket, stop: threading.Event) -> None:
    """``100 Continue`` every 0.2 s (an interim answer: the client waits for the final one), never the final."""
    started = time.monotonic()
    while time.monotonic() - started < DRIP_FOR_S and not stop.is_set():
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.2)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


@contextmanager
def slow_receiver(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[tuple[str, threading.Event]]:
    """A loopback receiver answering every connection with ``answer``; yields its URL and an event set once
    an answer went all the way to its end (the sink waited for it)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    stop, finished = threading.Event(), threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    _read_request(conn)
                    answer(conn, stop)
                    if not stop.is_set():
                        finished.set()
                except OSError:  # the sink hung up: what the test wants
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook", finished
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize("answer", [_drip_headers, _continue_forever], ids=["header-drip", "100-continue-loop"])
def test_timeout_s_bounds_the_wait_for_the_answers_headers(answer: Callable[[socket.socket, threading.Event], None],
                                                          ) -> None:
    """Fixed: httpx's timeouts bound each socket read, and the sink checked its deadline only while
    reading the body, so a receiver that dripped its header block (or sent ``100 Continue`` every half second)
    kept the handler running 8 s with ``timeout_s=1.0``, as long as the receiver liked. Every socket wait of
    the attempt is cut to what is left of ``timeout_s`` now: the attempt fails with a timeout, not a success."""
    with slow_receiver(answer) as (url, finished):
        sink = StandardWebhookSink(url, SECRET, timeout_s=TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"/hook gave no answer within timeout_s=1s \(ReadTimeout"):
            sink(CHANGE)
        took = time.monotonic() - started
        sink.close()
        assert not finished.is_set()  # the receiver was still going when the sink gave up
    assert TIMEOUT_S * 0.9 <= took < BOUND_S, f"timeout_s={TIMEOUT_S} took {took:.1f}s"


@pytest.mark.parametrize("answer", [_drip_headers, _continue_forever], ids=["header-drip", "100-continue-loop"])
def test_a_receiver_holding_its_headers_is_a_retried_failure_naming_the_timeout(
        store: Store, answer: Callable[[socket.socket, threading.Event], None]) -> None:
    """Through the dispatcher: the job's attempt ends within about ``timeout_s`` (its lease is not extended
    for as long as the receiver likes, holding the dispatcher and the entity's later jobs), and is recorded
    as a failure to retry (pending, not dead, not done) whose last error names the bound."""
    with slow_receiver(answer) as (url, finished):
        sink = StandardWebhookSink(url, SECRET, timeout_s=TIMEOUT_S)
        hooked = Store(store.engine, hooks=[Hook("forward", sink, on=["user.*"])])
        deliver(hooked, f.envelope("user.created", f.user("user_1", B + 1000)))
        dispatcher = Dispatcher(hooked, backoff=Backoff(base_s=60))
        started = time.monotonic()
        assert dispatcher.run_once() == 1
        took = time.monotonic() - started
        sink.close()
        assert not finished.is_set()
    with store.connect() as conn:
        (job,) = conn.execute(sa.select(hook_jobs.c.status, hook_jobs.c.attempts, hook_jobs.c.last_error)).all()
    assert (job.status, job.attempts) == ("pending", 1)
    assert job.last_error.startswith(f"TimeoutError: {url} gave no answer within timeout_s=1s"), job.last_error
    assert took < BOUND_S, f"the attempt took {took:.1f}s with timeout_s={TIMEOUT_S}"


def test_the_bound_is_each_attempts_own() -> None:
    """The deadline belongs to one attempt: the same sink's next delivery, to a receiver answering at once,
    succeeds (no deadline left over from the attempt cut short), and other requests on the client, outside
    an attempt, keep only their own timeouts."""
    calls: list[int] = []

    def drip_then_answer(conn: socket.socket, stop: threading.Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            _drip_headers(conn, stop)
        else:
            conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")  # a new connection each

    with slow_receiver(drip_then_answer) as (url, _):
        sink = StandardWebhookSink(url, SECRET, timeout_s=TIMEOUT_S)
        with pytest.raises(TimeoutError):
            sink(CHANGE)
        time.sleep(TIMEOUT_S)  # past the first attempt's deadline
        started = time.monotonic()
        sink(CHANGE)
        assert time.monotonic() - started < BOUND_S
        assert sink._client.post(url, content=b"{}").status_code == 204  # no attempt: no deadline
        sink.close()
    assert len(calls) == 3


# -- the secret ----------------------------------------------------------------------------------

KEY = bytes(range(200, 224))  # its URL-safe base64 has '-' and '_'
URLSAFE = "whsec_" + base64.urlsafe_b64encode(KEY).decode()


@pytest.mark.parametrize(("secret", "hint"), [
    (URLSAFE, "URL-safe base64"),
    ("whsec_" + base64.b64encode(KEY).decode()[:16] + " " + base64.b64encode(KEY).decode()[16:], "whitespace"),
    ("whsec_abc$def", "not valid base64"),
    ("whsec_", "only the 'whsec_' prefix"),
    ("", "is empty"),
], ids=["urlsafe", "space", "dollar", "prefix-only", "empty"])
def test_a_secret_outside_standard_base64_is_refused_by_the_sink(secret: str, hint: str) -> None:
    """Fixed: ``Webhook(secret)`` decodes leniently, dropping ``-``, ``_``, ``$`` and spaces, so the
    sink signed with a different, shorter key than the receiver's and every delivery was refused there
    (retried for hours). The sink checks the secret as the settings do (one function), and says what to do."""
    with pytest.raises(ConfigError, match="StandardWebhookSink's secret") as refused:
        StandardWebhookSink("http://receiver.test/hook", secret)
    message = str(refused.value)
    assert hint in message
    assert "Pass the receiver's Standard Webhooks secret" in message
    if secret:
        assert secret.removeprefix("whsec_") not in message or secret == "whsec_"  # the secret is not quoted


def test_the_urlsafe_hint_converts_to_the_key_meant() -> None:
    """The conversion the message gives signs with the key the URL-safe secret stood for."""
    rest = URLSAFE.removeprefix("whsec_").rstrip("=")
    converted = "whsec_" + base64.b64encode(base64.urlsafe_b64decode(rest + "==")).decode()
    assert StandardWebhookSink("http://receiver.test/hook", converted)._signers[0]._whsecret == KEY


@pytest.mark.parametrize("secret", [SECRET, SECRET.removeprefix("whsec_"), SECRET.rstrip("=")],
                         ids=["whsec", "no-prefix", "unpadded"])
def test_a_valid_secret_signs_what_the_standard_webhooks_library_verifies(secret: str) -> None:
    seen: list[httpx.Request] = []
    sink = StandardWebhookSink("http://receiver.test/hook", secret, client=recording_client(seen))
    sink(CHANGE)
    (request,) = seen
    message = Webhook(SECRET).verify(request.content, dict(request.headers))
    assert message["idempotency_key"] == CHANGE.idempotency_key
    sink.close()


def test_a_receiver_that_cannot_be_reached_is_a_retried_failure_naming_it(store: Store) -> None:
    """Walkthrough finding (2026-12-05): a refused connection left only ``ConnectError: [Errno 111] Connection
    refused`` as the job's last error, where a 500 or a timeout names the receiver. Its URL is said without the
    credentials or query a URL may carry."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    url = f"http://user:pw@127.0.0.1:{port}/changes?token=t0ken"
    sink = StandardWebhookSink(url, SECRET, timeout_s=TIMEOUT_S)
    hooked = Store(store.engine, hooks=[Hook("forward", sink, on=["user.*"])])
    deliver(hooked, f.envelope("user.created", f.user("user_1", B + 1000)))
    assert Dispatcher(hooked, backoff=Backoff(base_s=60)).run_once() == 1
    sink.close()
    with store.connect() as conn:
        (job,) = conn.execute(sa.select(hook_jobs.c.status, hook_jobs.c.attempts, hook_jobs.c.last_error)).all()
    assert (job.status, job.attempts) == ("pending", 1)
    assert job.last_error.startswith(f"ConnectionError: http://127.0.0.1:{port}/changes could not be reached "
                                     "(ConnectError: "), job.last_error
    assert "pw" not in job.last_error and "t0ken" not in job.last_error


@pytest.mark.parametrize("timeout_s", [None, 0, -1, float("nan"), float("inf"), 1e12, "10"])
def test_a_timeout_no_attempt_could_keep_is_refused_when_built(timeout_s: object) -> None:
    """Fixed: ``timeout_s`` was not checked, so ``None`` raised a TypeError on every attempt, 0 and -1 timed
    out before connecting, NaN, inf and 1e12 overflowed a socket's timeout: each delivery failed, retried for
    hours, then dead. It is refused when the sink is built, as RabbitMQSink refuses it."""
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds more than 0 and at most 86400"):
        StandardWebhookSink("https://example.com/hook", SECRET, timeout_s=timeout_s)  # type: ignore[arg-type]


def test_a_timeout_up_to_a_day_is_taken() -> None:
    for timeout_s in (0.001, 30, 86400):
        StandardWebhookSink("https://example.com/hook", SECRET, timeout_s=timeout_s).close()


@pytest.mark.parametrize(("url", "why"), [
    ("localhost:8080/hook", "no scheme: it starts with neither 'https://' nor 'http://'"),
    ("", "no scheme"),
    ("example.com/hook", "no scheme"),
    ("ftp://example.com/x", "the scheme is 'ftp', not http or https"),
    ("http://", "it names no host"),
    ("https:///hook", "it names no host"),
    ("http://exa mple.com/", "it contains whitespace"),
    ("https://[::1/x", "InvalidURL: Invalid port"),
    ("http://user:s3cret@127.0.0.1:99999/", "the port 99999 is not 1-65535"),
])
def test_a_url_no_delivery_could_reach_is_a_config_error_when_built(url: str, why: str) -> None:
    """Fixed: any string was taken, and every delivery then failed (``UnsupportedProtocol``, a refused port),
    retried for hours, then dead. The sink refuses it when built, saying why, never quoting the URL."""
    with pytest.raises(ConfigError, match=r"StandardWebhookSink: not a URL a webhook can be sent to") as refused:
        StandardWebhookSink(url, SECRET)
    assert why in str(refused.value)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "https://example.com", "HTTPS://Example.com/x?t=1",
                                 "http://[::1]:8080/", "https://user:pw@hooks.example.com/in#frag"])
def test_an_http_url_with_a_host_is_taken(url: str) -> None:
    StandardWebhookSink(url, SECRET).close()


def test_a_path_on_a_clients_base_url_is_taken_as_that_client_sends_it() -> None:
    """Review: the URL check refused ``"/clerk-hooks"`` with ``httpx.Client(base_url=...)``, which delivers it."""
    got: list[str] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        got.append(str(request.url))
        return httpx.Response(204)

    client = httpx.Client(base_url="https://receiver.internal", transport=httpx.MockTransport(receiver))
    sink = StandardWebhookSink("/clerk-hooks", SECRET, client=client)
    sink(Change(Entity.USER, "user_1", "created", 1, {"clerk_id": "user_1"}))
    assert got == ["https://receiver.internal/clerk-hooks"]
    with pytest.raises(ConfigError, match="no scheme"):  # without a base_url, still refused
        StandardWebhookSink("/clerk-hooks", SECRET, client=httpx.Client())


def test_a_path_on_a_clients_base_url_is_named_whole_in_the_jobs_last_error() -> None:
    """Review: every refusal named the receiver ``:///clerk-hooks`` (the path alone, parsed as a URL): with
    sinks on several base URLs, which receiver failed could not be told. The whole URL, secrets left out."""
    client = httpx.Client(base_url="https://ops:s3cret@receiver.internal/v1/",
                          transport=httpx.MockTransport(lambda request: httpx.Response(500, text="boom")))
    sink = StandardWebhookSink("clerk-hooks?token=t0k", SECRET, client=client)
    with pytest.raises(RuntimeError) as refused:
        sink(Change(Entity.USER, "user_1", "created", 1, {"clerk_id": "user_1"}))
    assert str(refused.value).startswith("https://receiver.internal/v1/clerk-hooks answered 500"), refused.value
    assert "s3cret" not in str(refused.value) and "t0k" not in str(refused.value)

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    down = StandardWebhookSink("/in", SECRET, client=httpx.Client(base_url="http://127.0.0.1:9",
                                                                 transport=httpx.MockTransport(unreachable)))
    with pytest.raises(ConnectionError, match=r"^http://127\.0\.0\.1:9/in could not be reached"):
        down(Change(Entity.USER, "user_1", "created", 1, {"clerk_id": "user_1"}))
