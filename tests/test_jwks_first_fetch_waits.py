"""The async path waits for a JWKS fetch already in flight, as the sync path waits on the lock.

Regression (Django walkthrough, section 1): under ASGI, requests arriving while a worker's first JWKS fetch was
in flight were refused at once, 503 ``token_keys_unavailable`` (no key held yet), because ``get(allow_fetch=False)``
saw the fetch's attempt inside the refetch floor and refused instead of sending the caller off the event loop to
wait. The JWKS here is real HTTP on loopback whose answer a gate the test holds delays: no sleep races a threshold.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clerk_sync import errors, migrations
from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import JWKSKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.integrations.asgi import ClerkAuthMiddleware
from clerk_sync.store import Store, create_engine
from tests._server import running
from tests.test_sessions import ISS, KEY, NOW, claims, mint

OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_WAIT = 30.0  # a bound for the test's own waits on events, never a threshold of the code under test


class GatedJWKS:
    """A JWKS endpoint whose answers wait for ``gate``; ``arrived`` is set when a fetch reaches it."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {"ins_1": KEY}
        self.gate = threading.Event()
        self.arrived = threading.Event()
        self.fetches = 0

    def app(self) -> Starlette:
        def jwks(_: Request) -> JSONResponse:  # sync: Starlette runs it in a thread, where it may block
            self.fetches += 1
            self.arrived.set()
            assert self.gate.wait(_WAIT), "the test never opened the gate"
            out = [{**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}
                   for kid, key in self.keys.items()]
            return JSONResponse({"keys": out})

        return Starlette(routes=[Route("/v1/jwks", jwks)])


@pytest.fixture
def jwks() -> Iterator[tuple[GatedJWKS, str]]:
    server = GatedJWKS()
    with running(server.app()) as url:
        try:
            yield server, f"{url}/v1/jwks"
        finally:
            server.gate.set()  # (a fetch a failed test left waiting ends before the server stops)


async def _in_flight(server: GatedJWKS) -> None:
    """Until the first fetch has reached the JWKS endpoint (and waits there at the gate)."""
    assert await asyncio.to_thread(server.arrived.wait, _WAIT), "the first fetch never reached the JWKS"


async def _decided(tasks: list[asyncio.Task[object]]) -> None:
    """Let every task run up to its first suspension: the key source's answer on the loop is given by then."""
    for _ in range(3):
        await asyncio.sleep(0)
    refused = [t.exception() for t in tasks if t.done()]
    assert not refused, f"refused while the first JWKS fetch was in flight: {refused}"


@pytest.mark.anyio
async def test_tokens_arriving_while_the_first_fetch_is_in_flight_wait_for_it(jwks: tuple[GatedJWKS, str]) -> None:
    server, url = jwks
    with httpx.Client() as client:
        verifier = SessionVerifier(JWKSKeySource(url, client=client), ClaimsValidator(issuer=ISS),
                                   now=lambda: float(NOW))
        first = asyncio.ensure_future(verifier.averify(mint(claims(sid="sess_first"))))
        await _in_flight(server)
        later: list[asyncio.Task[object]] = [
            asyncio.ensure_future(verifier.averify(mint(claims(sub=f"user_{i}", sid=f"sess_{i}"))))
            for i in range(12)]
        await _decided(later)
        server.gate.set()
        answers = await asyncio.gather(first, *later)
    assert [a.user_id for a in answers] == ["user_1", *(f"user_{i}" for i in range(12))]  # type: ignore[attr-defined]
    assert server.fetches == 1  # they waited for the one fetch, none fetched again


@pytest.mark.anyio
async def test_a_kid_rotated_in_waits_for_the_refetch_in_flight(jwks: tuple[GatedJWKS, str]) -> None:
    """Keys held, a new kid: the request after the one that refetches waits for that refetch too (401 before)."""
    server, url = jwks
    mono = [0.0]
    with httpx.Client() as client:
        source = JWKSKeySource(url, client=client, min_refetch_s=5, now=lambda: mono[0])
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: float(NOW))
        server.gate.set()
        assert source.prefetch() == 1
        server.gate.clear()
        server.arrived.clear()
        server.keys["ins_2"] = OTHER
        mono[0] = 6.0  # past the floor: the first token of the new kid refetches
        first = asyncio.ensure_future(verifier.averify(mint(claims(sid="sess_a"), key=OTHER, kid="ins_2")))
        await _in_flight(server)
        later: list[asyncio.Task[object]] = [asyncio.ensure_future(
            verifier.averify(mint(claims(sid="sess_b"), key=OTHER, kid="ins_2")))]
        await _decided(later)
        server.gate.set()
        answers = await asyncio.gather(first, *later)
    assert [a.session_id for a in answers] == ["sess_a", "sess_b"]  # type: ignore[attr-defined]
    assert server.fetches == 2


@pytest.mark.anyio
async def test_a_failed_first_fetch_still_answers_503_at_once_within_the_floor(tmp_path: Path) -> None:
    """What stays: no keys and the JWKS unreachable, with no fetch in flight, refuses at once (503, retry)
    rather than queueing every request behind another fetch inside the floor."""
    with httpx.Client() as client:
        source = JWKSKeySource("http://127.0.0.1:9/v1/jwks", client=client)  # port 9: nothing listens
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: float(NOW))
        with pytest.raises(errors.TokenKeysUnavailable):
            await verifier.averify(mint())
        with pytest.raises(errors.TokenKeysUnavailable):
            verifier.verify(mint(), allow_fetch=False)  # decided on the loop: no fetch in flight
        assert source.fetches == 1


@pytest.mark.anyio
async def test_concurrent_asgi_requests_of_a_fresh_worker_all_pass(jwks: tuple[GatedJWKS, str], tmp_path: Path) -> None:
    """The Starlette/FastAPI face (and Django's ``aclerk_request``, over the same ``aauthenticate``): a blast
    of signed-in requests at a worker that holds no key yet all answer 200 once the one fetch lands."""
    server, url = jwks
    db = f"sqlite:///{tmp_path / 'clerk_sync.db'}"
    engine = create_engine(db)
    migrations.upgrade(engine)
    engine.dispose()
    store = Store.from_url(db)

    async def whoami(request: Request) -> Response:
        return JSONResponse({"user": request.scope["clerk_auth"].user_id})

    with httpx.Client() as client:
        verifier = SessionVerifier(JWKSKeySource(url, client=client), ClaimsValidator(issuer=ISS, authorized_parties=None),
                                   now=lambda: float(NOW))
        authenticator = Authenticator(verifier, store, deny_list=DenyList(store, refresh_s=60))
        await asyncio.to_thread(authenticator.deny_list.refresh)  # (its first read: not what this test is about)
        app = ClerkAuthMiddleware(Starlette(routes=[Route("/me", whoami)]), authenticator)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            def get(i: int) -> asyncio.Task[httpx.Response]:
                token = mint(claims(sub=f"user_{i}", sid=f"sess_{i}"))
                return asyncio.ensure_future(http.get("/me", headers={"authorization": f"Bearer {token}"}))

            first = get(0)
            await _in_flight(server)
            later = [get(i) for i in range(1, 13)]
            await _decided(later)  # type: ignore[arg-type]
            server.gate.set()
            answers = await asyncio.gather(first, *later)
    store.dispose()
    assert [(r.status_code, r.json()) for r in answers] == [(200, {"user": f"user_{i}"}) for i in range(13)]
    assert server.fetches == 1
