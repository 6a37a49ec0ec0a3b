"""``serve`` against clients that send slowly, or too much head (adversarial walkthrough 2026-12-05, F1 and F1b).

Fixed: an unauthenticated client could hold ``CLERK_SYNC_MAX_BODY_BYTES`` of memory per connection for ever by
stalling mid-body (the signature is only checked once the body is in), and without limit by sending an endless
header block (uvicorn's httptools parser has no head limit, and every byte received cancels its keep-alive
timer). Now a body not in within ``CLERK_SYNC_WEBHOOK_READ_TIMEOUT_S`` is answered 408 (nothing written,
counted, a WARNING line), a head over 64 KiB 431, a head not complete within 10 s of its first byte 408 (and a
connection that sends nothing is closed then), each connection closed; ``--limit-concurrency`` (1000) answers 503
past it. Real servers on loopback: uvicorn in a thread (short deadlines), and ``clerk-sync serve`` processes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing
import uvicorn
from starlette.applications import Starlette

from clerk_sync.cli._uvicorn_limits import BoundedHttpTools
from clerk_sync.config import Settings
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.starlette import build_processor, create_app, webhook_routes
from clerk_sync.tables import webhook_events
from tests import factories as f
from tests._server import free_port, wait_for_http
from tests.conftest import SECRET


class _ShortHead(BoundedHttpTools):
    head_timeout_s = 1.0
    linger_s = 1.0


@contextmanager
def _serving(app: Any, *, limit_concurrency: int | None = None, http: Any = _ShortHead,
             keep_alive_s: float = 5) -> Iterator[int]:
    """``app`` served by uvicorn (httptools, the bounded protocol with a 1 s head deadline) in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           http=http, limit_concurrency=limit_concurrency,
                                           timeout_keep_alive=keep_alive_s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _app(kind: str, processor: WebhookProcessor, settings: Settings) -> Any:
    """The service (its fast path) or an app mounting the webhook route (``webhook_routes``)."""
    if kind == "service":
        return create_app(settings, processor)
    return Starlette(routes=webhook_routes(processor, read_timeout_s=settings.webhook_read_timeout_s))


def _settings(url: str, read_timeout_s: float) -> Settings:
    return Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                              "CLERK_SYNC_WEBHOOK_READ_TIMEOUT_S": str(read_timeout_s),
                              "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})


def _head(headers: dict[str, str], length: int) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /webhooks/clerk HTTP/1.1\r\nhost: x\r\n{lines}content-length: {length}\r\n\r\n".encode()


def _until_closed(sock: socket.socket, within_s: float) -> tuple[float, bytes]:
    """What the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(within_s)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        pytest.fail(f"still open after {within_s} s; received {got[:200]!r}")
    except ConnectionResetError:
        pass
    return time.monotonic() - started, got


def _send_until_cut(sock: socket.socket, data: bytes, *, pause_s: float) -> tuple[float, int]:
    """Send ``data`` again and again (``pause_s`` apart) until the server cuts the connection (10 s, 100 MiB
    at most); how long that took, and how many bytes were sent."""
    started, sent = time.monotonic(), 0
    while time.monotonic() - started < 10 and sent < 100 * 1024 * 1024:
        try:
            sock.sendall(data)
        except OSError:  # reset, or a broken pipe
            return time.monotonic() - started, sent
        sent += len(data)
        time.sleep(pause_s)
    pytest.fail(f"the connection was not cut: {sent} bytes sent in {time.monotonic() - started:.1f} s")


def _stored(processor: WebhookProcessor) -> int:
    with processor.store.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(webhook_events)).scalar_one())


@pytest.mark.parametrize("kind", ["service", "routes"])
def test_a_stalled_body_is_answered_408_closed_counted_and_nothing_written(sqlite_url: str, kind: str) -> None:
    settings = _settings(sqlite_url, 1.0)
    processor = build_processor(settings)
    headers, body = f.signed(f.envelope("user.created", f.user("user_slow", 1)), "msg_slow")
    with structlog.testing.capture_logs() as logs, _serving(_app(kind, processor, settings)) as port, \
            socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_head(headers, len(body)) + body[: len(body) // 2])  # then nothing more
        took, answer = _until_closed(sock, within_s=10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower() and b'"error":"body_timeout"' in answer.replace(b" ", b"")
    assert 0.9 < took < 8, took
    assert _stored(processor) == 0
    assert processor.metrics.registry.get_sample_value("clerk_sync_webhook_refused_total",
                                                       {"code": "body_timeout"}) == 1
    # said as every refusal that may be an outage: a DEBUG line per delivery, a WARNING line per code, throttled
    [line] = [line for line in logs if line["event"] == "webhook_refused"]
    assert (line["log_level"], line["svix_id"], line["code"]) == ("debug", "msg_slow", "body_timeout")
    assert f"{len(body) // 2} bytes of {len(body)} declared received" in line["reason"]
    [warned] = [line for line in logs if line["event"] == "webhooks_refused"]
    assert (warned["log_level"], warned["code"], warned["refused"]) == ("warning", "body_timeout", 1)
    assert "CLERK_SYNC_WEBHOOK_READ_TIMEOUT_S" in warned["check"]
    assert not any(b"user_slow" in repr(value).encode() for entry in (line, warned) for value in entry.values())
    processor.store.dispose()


@pytest.mark.parametrize("kind", ["service", "routes"])
def test_a_body_sent_in_parts_within_the_deadline_applies(sqlite_url: str, kind: str) -> None:
    settings = _settings(sqlite_url, 5.0)
    processor = build_processor(settings)
    headers, body = f.signed(f.envelope("user.created", f.user("user_parts", 1)), "msg_parts")
    with _serving(_app(kind, processor, settings)) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_head(headers, len(body)) + body[:10])
        time.sleep(0.3)
        sock.sendall(body[10:])
        sock.settimeout(10)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"applied"' in answer, answer
    assert _stored(processor) == 1
    processor.store.dispose()


@pytest.mark.parametrize("kind", ["service", "routes"])
def test_a_body_refused_as_too_large_before_it_is_read_closes_the_connection(sqlite_url: str, kind: str) -> None:
    """A 413 answered from the declared length, kept alive, left the client sending (or trickling) the rest of
    its body with no deadline: the connection is closed with the answer now."""
    settings = _settings(sqlite_url, 5.0)
    processor = build_processor(settings)
    headers = {"svix-id": "msg_big", "svix-timestamp": str(int(time.time())), "svix-signature": "v1,AAAA"}
    with _serving(_app(kind, processor, settings)) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_head(headers, 2 * 1024 * 1024) + b"x" * 1000)  # then nothing more
        took, answer = _until_closed(sock, within_s=10)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower(), answer
    assert took < 5, took
    processor.store.dispose()


def test_an_oversized_head_is_answered_431_and_closed(sqlite_url: str) -> None:
    settings = _settings(sqlite_url, 5.0)
    processor = build_processor(settings)
    with _serving(create_app(settings, processor)) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:  # 100 KiB of head, not ended
            sock.sendall(b"POST /webhooks/clerk HTTP/1.1\r\nhost: x\r\nx-a: " + b"a" * 100 * 1024 + b"\r\n")
            took, answer = _until_closed(sock, within_s=10)
        assert answer.startswith(b"HTTP/1.1 431 ") and took < 5, (took, answer)
        with socket.create_connection(("127.0.0.1", port)) as sock:  # one sending on and on is cut off
            sock.sendall(b"POST /webhooks/clerk HTTP/1.1\r\nhost: x\r\n")
            took, sent = _send_until_cut(sock, b"x-a: " + b"a" * 64 * 1024 + b"\r\n", pause_s=0)
            assert took < 5 and sent < 20 * 1024 * 1024, (took, sent)  # (what the sockets buffer)
    processor.store.dispose()


def test_a_head_and_a_large_body_in_one_read_are_no_large_head_and_the_connection_is_kept(sqlite_url: str) -> None:
    """The head's bytes are counted, not the body's that follow it in the same read; the next request on the
    kept-alive connection is timed and bounded afresh."""
    settings = _settings(sqlite_url, 5.0)
    processor = build_processor(settings)
    forged = {"svix-id": "msg_forged", "svix-timestamp": str(int(time.time())), "svix-signature": "v1,AAAA"}
    big = b"{" + b" " * 600_000 + b"}"
    headers, body = f.signed(f.envelope("user.created", f.user("user_after", 1)), "msg_after")
    with _serving(create_app(settings, processor)) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        sock.sendall(_head(forged, len(big)) + big)
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        time.sleep(1.5)  # longer than the head deadline: between requests it is not running
        sock.sendall(_head(headers, len(body)) + body)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"applied"' in answer, answer
    processor.store.dispose()


def test_a_trickling_head_is_closed_after_its_deadline(sqlite_url: str) -> None:
    settings = _settings(sqlite_url, 5.0)
    processor = build_processor(settings)
    with _serving(create_app(settings, processor)) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /webhooks/clerk HTTP/1.1\r\nx-slow: ")
        took, _ = _send_until_cut(sock, b"a", pause_s=0.1)  # each byte cancelled uvicorn's keep-alive timer
        sock.settimeout(5)
        answer = sock.recv(65536)  # (said before the close)
    assert 0.9 < took < 8, took
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    processor.store.dispose()


def test_a_connection_that_sends_nothing_is_closed_after_the_head_deadline(sqlite_url: str) -> None:
    settings = _settings(sqlite_url, 5.0)
    processor = build_processor(settings)
    with _serving(create_app(settings, processor)) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        took, answer = _until_closed(sock, within_s=10)
    assert answer == b"" and 0.9 < took < 8, (took, answer)
    processor.store.dispose()


def test_limit_concurrency_answers_503_past_it_but_to_the_liveness_probe(sqlite_url: str) -> None:
    """Past the limit every request is 503 (Svix retries), but ``GET``/``HEAD /healthz``: held connections
    (load, or idle ones anyone can open) made the liveness probe fail, and Kubernetes restarted a pod that was
    up (review). ``/readyz`` stays 503 there: a pod past its limit is rightly out of rotation."""
    settings = _settings(sqlite_url, 5.0)
    processor = build_processor(settings)
    with _serving(create_app(settings, processor), limit_concurrency=2) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            assert _first_answer(port).startswith(b"HTTP/1.1 503 ")
            for head in (b"GET /healthz", b"HEAD /healthz", b"GET /healthz?probe=1", b"GET /readyz",
                         b"POST /healthz"):
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.settimeout(5)
                    sock.sendall(head + b" HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
                    status = sock.recv(65536).split(b"\r\n", 1)[0]
                alive = head.startswith((b"GET /healthz", b"HEAD /healthz"))
                assert status == (b"HTTP/1.1 200 OK" if alive else b"HTTP/1.1 503 Service Unavailable"), head
        finally:
            for sock in held:
                sock.close()
    processor.store.dispose()


def _first_answer(port: int) -> bytes:
    """The answer to ``GET /metrics`` on a new connection (tried until 503, 5 s at most: the held connections
    are counted once the server accepted them)."""
    deadline = time.monotonic() + 5
    while True:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = sock.recv(65536)
        if answer.startswith(b"HTTP/1.1 503 ") or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_bounds_slow_bodies_large_heads_and_concurrency(tmp_path: Path, workers: str) -> None:
    """The real ``clerk-sync serve`` (its workers too: the protocol class and the settings reach them). The head
    limit is a setting (``CLERK_SYNC_MAX_HEAD_BYTES``, here with 2 workers) and an option (``--max-head-bytes``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_")) and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                "CLERK_SYNC_WEBHOOK_READ_TIMEOUT_S": "1", "CLERK_SYNC_LIMIT_CONCURRENCY": "3"})
    head_limit = ["--max-head-bytes", "4096"] if workers == "1" else []
    if workers == "2":
        env["CLERK_SYNC_MAX_HEAD_BYTES"] = "4096"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from clerk_sync.cli import main; main()", "serve", "--port",
                             str(port), "--workers", workers, *head_limit], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.err", "wb"))  # noqa: SIM115
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=60, proc=proc)
        headers, body = f.signed(f.envelope("user.created", f.user("user_slow", 1)), "msg_slow")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_head(headers, len(body)) + body[:20])
            took, answer = _until_closed(sock, within_s=10)
        assert answer.startswith(b"HTTP/1.1 408 ") and took < 8, (took, answer)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-a: " + b"a" * 100_000 + b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 431 ")
        for pad, status in ((3000, b"200"), (5000, b"431")):  # the 4 KiB limit, not the default 64 KiB
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(10)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: " + b"a" * pad + b"\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 " + status), pad
        if workers == "1":  # (with 2 the kernel picks which worker accepts a connection)
            held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            try:
                assert _first_answer(port).startswith(b"HTTP/1.1 503 ")
            finally:
                for sock in held:
                    sock.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _paths(scope: Any, receive: Any, send: Any) -> None:
    """Answers 200 with the request's path: at once (not reading a body), after 1.5 s for ``/slow``, after the
    whole body for ``/read``."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)  # (longer than the head deadline)
    elif scope["path"] == "/read":
        while (await receive()).get("more_body"):
            pass
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def _answers(sock: socket.socket, count: int, within_s: float = 10) -> list[tuple[int, bytes]]:
    """The next ``count`` answers on ``sock`` (status, body), each with a content-length."""
    sock.settimeout(within_s)
    got, answers = b"", []
    while len(answers) < count:
        head_end = got.find(b"\r\n\r\n")
        if head_end >= 0:
            head = got[:head_end].decode("latin-1").lower().split("\r\n")
            [length] = [int(line.split(":", 1)[1]) for line in head if line.startswith("content-length:")]
            if len(got) >= head_end + 4 + length:
                answers.append((int(head[0].split()[1]), got[head_end + 4: head_end + 4 + length]))
                got = got[head_end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {answers}, then {got[:200]!r}"
        got += chunk
    assert got == b"", got
    return answers


def test_pipelined_requests_over_the_head_limit_in_one_send_are_all_answered_in_order() -> None:
    """213 pipelined GETs (71 KiB) in one send were answered one 431, ahead of their answers, and the connection
    closed (the limit was counted across the requests of a read); the connection is kept alive after them."""
    requests = [b"GET /p%d HTTP/1.1\r\nhost: x\r\nx-pad: %s\r\n\r\n" % (i, b"a" * 300) for i in range(213)]
    assert len(b"".join(requests)) > 70 * 1024
    with _serving(_paths) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"".join(requests))
        assert _answers(sock, 213) == [(200, b"/p%d" % i) for i in range(213)]
        for path in (b"/again", b"/read"):  # sequential requests, a pause past the head deadline before each
            time.sleep(1.3)
            sock.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello" % path)
            assert _answers(sock, 1) == [(200, path)]


def test_a_pipelined_head_over_the_limit_is_answered_431_after_the_answer_before_it() -> None:
    """The 431 was written at once, ahead of the pending answer to the request before it, which was lost; and
    the head's bytes in the read that ended that request were not counted (a 100 KiB head was let in)."""
    with _serving(_paths) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET /big HTTP/1.1\r\nhost: x\r\nx-a: "
                     + b"a" * 100 * 1024 + b"\r\n\r\n")
        [first, (status, _)] = _answers(sock, 2)
        assert (first, status) == ((200, b"/slow"), 431)
        assert sock.recv(65536) == b""  # (closed)


def test_a_stalled_pipelined_head_is_answered_408_after_the_answer_before_it() -> None:
    """A head begun in the read that ended the request before it was not timed (the connection was closed by
    keep-alive's 5 s, silently); its 408 waits for the answer before it."""
    with _serving(_paths) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET /stalled HTTP/1.1\r\nx-a: a")  # then nothing more
        started = time.monotonic()
        [first, (status, _)] = _answers(sock, 2)
        assert (first, status) == ((200, b"/slow"), 408)
        assert sock.recv(65536) == b""
    assert time.monotonic() - started < 3  # (the answer to /slow, 1.5 s, then the 1 s deadline's 408 at once)


def test_a_body_still_coming_after_the_answer_closes_the_connection() -> None:
    """An app answering without reading the body (``/healthz``, ``/metrics``, console pages) left uvicorn
    reading the declared body, each byte trickled cancelling its keep-alive timer: held for ever."""
    with _serving(_paths) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /read HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n01234")
        time.sleep(0.3)
        sock.sendall(b"56789")
        assert _answers(sock, 1) == [(200, b"/read")]  # (read by the app: kept alive)
        sock.sendall(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")
        assert _answers(sock, 1) == [(200, b"/x")]
        took, _ = _send_until_cut(sock, b"x", pause_s=0.2)
    assert took < 3, took


# -- review lows: empty lines, paused reading, the lingering close, the limits as settings ------------------------
def test_empty_lines_between_requests_are_ignored_not_a_head() -> None:
    """A bare CRLF after a request (RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a
    request line) armed the head deadline: the idle connection got an unsolicited 408 after it. Now the
    connection stays idle (closed silently by keep-alive's timer), and a request after empty lines is served."""
    with _serving(_paths, keep_alive_s=2) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"\r\n\r\nGET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _answers(sock, 1) == [(200, b"/a")]
        sock.sendall(b"\r\n")
        sock.sendall(b"\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _answers(sock, 1) == [(200, b"/b")]
        sock.sendall(b"\r\n\r\n")  # then nothing: idle, not a head begun
        _, said = _until_closed(sock, within_s=10)
    assert said == b"", said  # (was: HTTP/1.1 408 Request Timeout, after the 1 s head deadline)
    with _serving(_paths, keep_alive_s=2) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _answers(sock, 1) == [(200, b"/a")]
        took, _ = _send_until_cut(sock, b"\r\n", pause_s=0.2)  # empty lines do not hold the connection either
    assert took < 8, took


def _gated(gate: threading.Event) -> Any:
    """``_paths``, where ``/gate`` answers only once ``gate`` is set."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/gate":
            while not gate.is_set():
                await asyncio.sleep(0.01)
        await _paths(scope, receive, send)

    return app


def test_a_pipelined_head_is_not_timed_while_reading_waits_for_the_answers_before_it() -> None:
    """uvicorn stops reading behind a pipelined request until the answer before it is out: the head after it,
    begun in the same read and sent in full at once, was answered 408 when that answer took longer than the
    head deadline. Its time counts only while the server reads."""
    gate = threading.Event()
    with _serving(_gated(gate)) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /gate HTTP/1.1\r\nhost: x\r\n\r\nGET /p2 HTTP/1.1\r\nhost: x\r\n\r\n"
                     b"GET /p3 HTTP/1.1\r\nhost: x\r\n")
        time.sleep(0.2)
        sock.sendall(b"\r\n")  # /p3's head, complete: in the socket, not read while /gate's answer is pending
        time.sleep(3)  # three head deadlines (one-sided: longer only makes the old failure surer)
        gate.set()
        assert _answers(sock, 3) == [(200, b"/gate"), (200, b"/p2"), (200, b"/p3")]  # (was: 408 for /p3)


async def _large_answer(scope: Any, receive: Any, send: Any) -> None:
    """8 MiB at once, the request's body not read."""
    if scope["type"] != "http":
        return
    body = b"x" * (8 * 1024 * 1024)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def test_a_body_still_coming_after_the_answer_is_drained_so_the_client_reads_the_answer() -> None:
    """A connection closed while its body still came (unread bytes in the server's socket) was reset: the
    kernel dropped what of the answer it had not sent yet, and the client read a cut answer, then ECONNRESET.
    Now a lingering close: the answer whole, then the end of the stream, the body read and dropped meanwhile."""
    with _serving(_large_answer) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")

        def upload() -> None:  # 16 MiB of the body, while the answer comes
            for _ in range(256):
                try:
                    sock.sendall(b"b" * 65536)
                except OSError:
                    return

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        time.sleep(0.5)  # (the answer is written meanwhile, not read yet)
        sock.settimeout(10)
        got = b""
        try:
            while chunk := sock.recv(1 << 20):
                got += chunk
        except ConnectionResetError:
            pass
        sender.join(10)
    head_end = got.find(b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and len(got) - head_end - 4 == 8 * 1024 * 1024, (got[:100], len(got))


def test_the_limits_are_settings(sqlite_url: str) -> None:
    """``CLERK_SYNC_MAX_HEAD_BYTES`` and ``CLERK_SYNC_HEAD_TIMEOUT_S`` (were class attributes: 64 KiB, 10 s)."""
    from clerk_sync.cli._serve import bounded_http

    settings = Settings.from_env({"DATABASE_URL": sqlite_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_MAX_HEAD_BYTES": "2048", "CLERK_SYNC_HEAD_TIMEOUT_S": "0.5"})
    assert (settings.max_head_bytes, settings.head_timeout_s) == (2048, 0.5)
    defaults = Settings.from_env({"DATABASE_URL": sqlite_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    assert (defaults.max_head_bytes, defaults.head_timeout_s) == (64 * 1024, 10.0)
    with _serving(_paths, http=bounded_http(settings.max_head_bytes, settings.head_timeout_s)) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: " + b"a" * 3000 + b"\r\n\r\n")
            assert _answers(sock, 1)[0][0] == 431
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nx-a: a")  # then nothing
            took, said = _until_closed(sock, within_s=10)
        assert said.startswith(b"HTTP/1.1 408 ") and took < 5, (took, said)
