"""A JWKS fetch keeps to ``fetch_timeout_s`` as a whole, and a ``CLERK_JWKS_URL`` read with a line break works.

Review (finding 1): the fetch passed ``fetch_timeout_s`` to httpx, which bounds each socket read on its own, so a
JWKS answer dripping a byte every few seconds held the fetch, the key source's lock and every request waiting on
it for minutes (``fetch_timeout_s=5``: 8 async requests at start-up still waiting after 25 s). The whole fetch,
connect to the body's last byte, ends by ``fetch_timeout_s`` now, and a body of more than 1 MiB is refused; both
are the JWKS-unavailable 503 a connect failure gives. Finding 2: ``CLERK_JWKS_URL`` was checked stripped but kept
as given, so one read from a file (``...jwks.json\\n``, a Kubernetes secret) passed the settings and then every
authenticated request was a 500 (httpx's ``InvalidURL``, which the fetch did not catch): the settings keep it
stripped now, and a URL httpx refuses is the same 503.

The slow JWKS is a raw socket on loopback (what it sends is exactly what the test says, byte by byte); the others
are real HTTP servers on loopback.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from clerk_sync import migrations
from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth, ClaimsValidator
from clerk_sync.auth.jwks import JWKSKeySource
from clerk_sync.auth.sessions import SessionVerifier, verifier_from_settings
from clerk_sync.cli.doctor import run_checks
from clerk_sync.config import Settings
from clerk_sync.errors import TokenKeysUnavailable
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.store import create_engine
from tests import factories as f
from tests._server import running
from tests.test_auth import AZP, Harness, token
from tests.test_sessions import ISS, KEY

TIMEOUT_S = 0.5
BOUND_S = 5.0  # generous: a loaded 2-core box schedules the threads late; the old code went on for DRIP_FOR_S
DRIP_FOR_S = 20.0  # how long the slow JWKS would go on: far past the bound
DRIP_EVERY_S = 0.1  # each byte well within httpx's per-read timeout (TIMEOUT_S)
JWKS = json.dumps({"keys": [{**json.loads(RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "ins_1", "use": "sig",
                             "alg": "RS256"}]}).encode()


def _drip_body(conn: socket.socket, stop: threading.Event) -> None:
    """Status and headers at once, then the JWKS one byte every DRIP_EVERY_S."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(JWKS))
    _drip(conn, stop, JWKS)


def _drip_headers(conn: socket.socket, stop: threading.Event) -> None:
    """The status line, then the header block one byte every DRIP_EVERY_S."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    _drip(conn, stop, b"X-Slow: " + b"a" * 1000 + b"\r\nContent-Length: %d\r\n\r\n" % len(JWKS) + JWKS)


def _drip(conn: socket.socket, stop: threading.Event, data: bytes) -> None:
    started = time.monotonic()
    for i in range(len(data)):
        if stop.is_set() or time.monotonic() - started > DRIP_FOR_S:
            return
        conn.sendall(data[i:i + 1])
        time.sleep(DRIP_EVERY_S)


@contextmanager
def slow_jwks(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[tuple[str, list[int]]]:
    """A loopback JWKS answering every connection with ``answer`` (each in a thread of its own); yields its URL and
    a list of the connections it took."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()
    connections: list[int] = []
    threads: list[threading.Thread] = []

    def one(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)  # a GET: its head comes in one piece
                answer(conn, stop)
            except OSError:  # the fetch hung up: what the test wants
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connections.append(1)
            thread = threading.Thread(target=one, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/.well-known/jwks.json", connections
    finally:
        stop.set()
        for thread in [acceptor, *threads]:
            thread.join(5)
        server.close()


def _verifier(url: str, client: httpx.Client) -> tuple[SessionVerifier, JWKSKeySource]:
    source = JWKSKeySource(url, client=client, fetch_timeout_s=TIMEOUT_S)
    return SessionVerifier(source, ClaimsValidator(issuer=ISS, authorized_parties=frozenset({AZP}))), source


@pytest.mark.parametrize("answer", [_drip_body, _drip_headers], ids=["body-drip", "header-drip"])
def test_a_dripping_jwks_is_given_up_after_fetch_timeout_s_in_all(
        answer: Callable[[socket.socket, threading.Event], None]) -> None:
    with slow_jwks(answer) as (url, _), httpx.Client() as client:
        verifier, _ = _verifier(url, client)
        outcome: dict[str, BaseException | float] = {}

        def verify() -> None:
            started = time.monotonic()
            try:
                verifier.verify(token("user_a"))
            except BaseException as exc:  # (whatever it is, the assertion below shows it)
                outcome["error"] = exc
            outcome["took"] = time.monotonic() - started

        thread = threading.Thread(target=verify, daemon=True)
        thread.start()
        thread.join(BOUND_S)
        assert "took" in outcome, f"fetch_timeout_s={TIMEOUT_S}: still fetching after {BOUND_S} s"
    error = outcome["error"]
    assert isinstance(error, TokenKeysUnavailable), repr(error)
    assert f"got no full answer within its total time of {TIMEOUT_S:g} s (fetch_timeout_s" in str(error), str(error)
    assert "check CLERK_JWKS_URL and the network" in str(error)
    assert TIMEOUT_S * 0.9 <= float(outcome["took"]) < BOUND_S


def test_async_requests_at_start_up_all_answer_when_the_dripping_fetch_is_given_up() -> None:
    """Eight ``averify`` calls before any key is held: one fetch, and each answers 503 once it has run out of its
    time (they waited for it off the event loop)."""
    with slow_jwks(_drip_body) as (url, connections), httpx.Client() as client:
        verifier, source = _verifier(url, client)

        async def one() -> BaseException | None:
            try:
                await verifier.averify(token("user_a"))
            except Exception as exc:  # (the assertion below shows what it was)
                return exc
            return None

        async def all_of_them() -> tuple[list[BaseException | None], int]:
            tasks = [asyncio.create_task(one()) for _ in range(8)]
            done, pending = await asyncio.wait(tasks, timeout=BOUND_S)
            for task in pending:
                task.cancel()
            return [task.result() for task in done], len(pending)

        answers, waiting = asyncio.run(all_of_them())
        assert waiting == 0, f"{waiting} of 8 requests still waiting after {BOUND_S} s (fetch_timeout_s={TIMEOUT_S})"
    assert all(isinstance(answer, TokenKeysUnavailable) for answer in answers), answers
    assert (source.fetches, len(connections)) == (1, 1)


def _big_jwks(request: Request) -> Response:
    """A valid JWKS padded past 1 MiB: with the length declared, or streamed in chunks without one."""
    padded = JWKS[:-1] + b', "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    if request.path_params["how"] == "declared":
        return Response(padded, media_type="application/json")
    return StreamingResponse((padded[i:i + 65536] for i in range(0, len(padded), 65536)),
                             media_type="application/json")


@pytest.mark.parametrize("how", ["declared", "chunked"])
def test_a_jwks_of_more_than_1_mib_is_refused(how: str) -> None:
    app = Starlette(routes=[Route("/{how}/jwks.json", _big_jwks)])
    with running(app) as base, httpx.Client() as client:
        verifier, source = _verifier(f"{base}/{how}/jwks.json", client)
        with pytest.raises(TokenKeysUnavailable) as caught:
            verifier.verify(token("user_a"))
    assert f"{base}/{how}/jwks.json answered a body of more than 1 MiB, the most read" in str(caught.value)
    assert "CLERK_JWKS_URL should name the instance's JWKS" in str(caught.value)
    assert source.fetches == 1


@pytest.mark.parametrize("around", ["{}\n", " {}", "{} ", "\t{}\r\n"])
def test_clerk_jwks_url_is_kept_without_the_space_around_it(around: str) -> None:
    url = "https://clerk.example.com/.well-known/jwks.json"
    settings = Settings.from_env({"DATABASE_URL": "sqlite://", "CLERK_JWKS_URL": around.format(url)})
    assert settings.clerk_jwks_url == url
    keys = verifier_from_settings(settings, http=httpx.Client()).keys
    assert isinstance(keys, JWKSKeySource) and keys.url == url


def _harness(tmp_path: Path) -> Harness:
    url = f"sqlite:///{tmp_path / 'jwks_url.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return Harness(url)


def _app(auth: Authenticator) -> FastAPI:
    clerk = ClerkAuth(auth)
    app = FastAPI()
    clerk.install(app, public_paths={"/"})

    @app.get("/me")
    async def me(who: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
        return {"user": who.user_id}

    return app


def test_a_jwks_url_read_from_a_file_with_its_line_break_verifies_sessions(tmp_path: Path) -> None:
    """Was: every authenticated request a 500 (and ``clerk-sync doctor`` a traceback)."""
    h = _harness(tmp_path)
    h.event("user.created", f.user("user_a", int(time.time() * 1000)))
    jwks = Starlette(routes=[Route("/.well-known/jwks.json", lambda _: Response(JWKS, media_type="application/json"))])
    with running(jwks) as jwks_url, httpx.Client() as http:
        settings = Settings.from_env({"DATABASE_URL": "sqlite://", "CLERK_ISSUER": ISS, "CLERK_AUTHORIZED_PARTIES": AZP,
                                      "CLERK_JWKS_URL": f"{jwks_url}/.well-known/jwks.json\n"})
        auth = Authenticator(verifier_from_settings(settings, http=http), h.store,
                             deny_list=DenyList(h.store, refresh_s=0))
        with running(_app(auth)) as url, httpx.Client(base_url=url) as client:
            answer = client.get("/me", headers={"authorization": f"Bearer {token('user_a')}"})
    assert (answer.status_code, answer.json()) == (200, {"user": "user_a"})
    h.store.dispose()


def test_doctor_reads_a_jwks_url_with_its_line_break() -> None:
    """Was: ``clerk-sync doctor`` ended in httpx's ``InvalidURL`` traceback."""
    jwks = Starlette(routes=[Route("/.well-known/jwks.json", lambda _: Response(JWKS, media_type="application/json"))])
    with running(jwks) as jwks_url:
        settings = Settings.from_env({"DATABASE_URL": "sqlite://", "CLERK_JWKS_URL": f"{jwks_url}/.well-known/jwks.json\n"})
        (line,) = [check for check in run_checks(settings) if check.name == "session keys"]
    assert line.status in ("ok", "warn") and f"JWKS {jwks_url}/.well-known/jwks.json (1 key(s))" in line.detail, line


def test_a_jwks_url_httpx_cannot_fetch_is_a_503_not_a_500(tmp_path: Path) -> None:
    """A key source given such a URL in code (Settings strips it now) answers as an unreachable JWKS does."""
    h = _harness(tmp_path)
    h.event("user.created", f.user("user_a", int(time.time() * 1000)))
    with httpx.Client() as http:
        verifier, _ = _verifier("https://clerk.example.com/.well-known/jwks.json\n", http)
        with pytest.raises(TokenKeysUnavailable) as caught:
            verifier.verify(token("user_a"))
        assert "the JWKS URL 'https://clerk.example.com/.well-known/jwks.json\\n' cannot be fetched" in str(caught.value)
        assert "set CLERK_JWKS_URL again, without spaces or line breaks" in str(caught.value)
        auth = Authenticator(verifier, h.store, deny_list=DenyList(h.store, refresh_s=0))
        with running(_app(auth)) as url, httpx.Client(base_url=url) as client:
            answer = client.get("/me", headers={"authorization": f"Bearer {token('user_a')}"})
    assert answer.status_code == 503, answer.text
    h.store.dispose()
