"""Waiting for a JWKS fetch is bounded: one fetch's outcome answers everyone who waited for it, and the waits hold
few threads.

Review of 5c44c29 (finding 1): with the JWKS unreachable since start-up, every request that arrived while a fetch
was in flight waited on the key source's lock and then ran a fetch of its own (a failed fetch with no keys starts no
cooldown, and the floor counted from a fetch's *start*, so it had passed when the fetch timed out): the k-th request
answered after about k fetch timeouts, and the JWKS endpoint was hit once per request. Finding 2: while any fetch
was in flight, every async request with a kid not held (random kids) was sent to anyio's default thread limiter to
wait on the lock, taking all its 40 threads from the app's own threaded work.

The JWKS is real HTTP on loopback whose answers a gate the test holds delays; the key source's clock is injected
(a fetch "taking" as long as the floor is the clock moved while the gate is closed): no sleep races a threshold.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clerk_sync import errors
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import JWKSKeySource
from clerk_sync.auth.sessions import SessionVerifier
from tests._server import running
from tests.test_sessions import ISS, KEY, NOW, claims, mint

OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_WAIT = 30.0  # a bound for the test's own waits on events, never a threshold of the code under test
_FEW_THREADS = 4  # at most this many threads may wait on (or run) a fetch for a flood of unknown kids


class GatedJWKS:
    """A JWKS endpoint whose answers wait for ``gate`` (``arrived`` set when a fetch reaches it); while ``down``,
    it answers 503 (Clerk unreachable: the fetch fails)."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {"ins_1": KEY}
        self.gate = threading.Event()
        self.arrived = threading.Event()
        self.down = False
        self.fetches = 0

    def app(self) -> Starlette:
        def jwks(_: Request) -> JSONResponse:  # sync: Starlette runs it in a thread, where it may block
            self.fetches += 1
            self.arrived.set()
            assert self.gate.wait(_WAIT), "the test never opened the gate"
            if self.down:
                return JSONResponse({"error": "unavailable"}, status_code=503)
            out = [{**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}
                   for kid, key in self.keys.items()]
            return JSONResponse({"keys": out})

        return Starlette(routes=[Route("/v1/jwks", jwks)])

    def hold(self) -> None:
        """The next fetch waits at the gate."""
        self.gate.clear()
        self.arrived.clear()


class CountingLock:
    """The key source's lock, counting the threads waiting to acquire it (now, and the most at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0
        self.most = 0
        self.calls = 0
        self.changed = threading.Condition()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self.changed:
            self.waiting += 1
            self.calls += 1
            self.most = max(self.most, self.waiting)
            self.changed.notify_all()
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            with self.changed:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_: Any) -> None:
        self.release()

    def wait_for_calls(self, n: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.calls >= n, _WAIT)


@pytest.fixture
def jwks() -> Iterator[tuple[GatedJWKS, str]]:
    server = GatedJWKS()
    with running(server.app()) as url:
        try:
            yield server, f"{url}/v1/jwks"
        finally:
            server.gate.set()  # (a fetch a failed test left waiting ends before the server stops)


def _source(url: str, client: httpx.Client, clock: list[float]) -> tuple[JWKSKeySource, CountingLock]:
    source = JWKSKeySource(url, client=client, min_refetch_s=5, cooldown_s=30, ttl_s=300, now=lambda: clock[0])
    lock = CountingLock()
    source._lock = lock  # type: ignore[assignment]
    return source, lock


async def _in_flight(server: GatedJWKS) -> None:
    assert await asyncio.to_thread(server.arrived.wait, _WAIT), "the fetch never reached the JWKS"


async def _settle() -> None:
    """Let every task run up to where it waits (the loop's answer, a limiter's queue, a thread's start)."""
    for _ in range(6):
        await asyncio.sleep(0)


async def _outcome(coro: Any) -> str:
    try:
        await coro
    except Exception as exc:
        return type(exc).__name__
    return "verified"


# --- finding 1: one fetch's outcome answers everyone who waited for it ---------------------------------------

@pytest.mark.anyio
async def test_async_requests_waiting_on_a_failed_first_fetch_take_its_outcome_and_do_not_fetch_again(
        jwks: tuple[GatedJWKS, str]) -> None:
    server, url = jwks
    server.down = True
    clock = [0.0]
    with httpx.Client() as client:
        source, _ = _source(url, client, clock)
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: float(NOW))
        first = asyncio.ensure_future(_outcome(verifier.averify(mint(claims(sid="sess_0")))))
        await _in_flight(server)
        clock[0] = 5.0  # the fetch has taken as long as the floor (a connect timeout, with the defaults)
        later = [asyncio.ensure_future(_outcome(verifier.averify(mint(claims(sid=f"sess_{i}")))))
                 for i in range(1, 11)]
        await _settle()
        assert not any(t.done() for t in later), "the first fetch in flight is waited for"
        server.gate.set()
        answers = await asyncio.gather(first, *later)
        assert answers == ["TokenKeysUnavailable"] * 11
        assert server.fetches == source.fetches == 1  # not one fetch per waiter, each a timeout after the last
        # Right after the failed fetch (the floor counts from its end): 503 at once, no fetch.
        with pytest.raises(errors.TokenKeysUnavailable):
            await verifier.averify(mint(claims(sid="sess_after")))
        assert server.fetches == 1
        # A floor after its end the JWKS is tried again, and its keys serve everyone.
        server.down = False
        clock[0] = 10.0
        assert (await verifier.averify(mint(claims(sid="sess_back")))).session_id == "sess_back"
        assert server.fetches == 2


def test_sync_requests_waiting_on_the_lock_take_the_failed_fetchs_outcome(jwks: tuple[GatedJWKS, str]) -> None:
    """The sync path (WSGI): each request waited on the lock, then fetched again in turn."""
    server, url = jwks
    server.down = True
    clock = [0.0]
    with httpx.Client() as client:
        source, lock = _source(url, client, clock)
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: float(NOW))
        answers: dict[int, str] = {}

        def request(i: int) -> None:
            try:
                verifier.verify(mint(claims(sid=f"sess_{i}")))
                answers[i] = "verified"
            except Exception as exc:
                answers[i] = type(exc).__name__

        threads = [threading.Thread(target=request, args=(0,))]
        threads[0].start()
        assert server.arrived.wait(_WAIT)
        clock[0] = 5.0
        threads += [threading.Thread(target=request, args=(i,)) for i in range(1, 9)]
        for t in threads[1:]:
            t.start()
        assert lock.wait_for_calls(9), "the requests never reached the lock"
        server.gate.set()
        for t in threads:
            t.join(_WAIT)
    assert answers == {i: "TokenKeysUnavailable" for i in range(9)}
    assert server.fetches == 1


def test_a_signature_waiting_for_the_refetch_in_flight_takes_its_outcome(jwks: tuple[GatedJWKS, str]) -> None:
    """``renewed()`` (a key rotated under its kid): a caller that waited for the refetch in flight does not refetch
    once more when it brought no other key; one that brought the new key verifies."""
    server, url = jwks
    clock = [0.0]
    with httpx.Client() as client:
        source, lock = _source(url, client, clock)
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: float(NOW))
        server.gate.set()
        assert source.prefetch() == 1
        server.hold()
        clock[0] = 6.0
        answers: dict[int, str] = {}

        def request(i: int) -> None:
            try:  # signed by a key the JWKS does not publish, under the kid held
                verifier.verify(mint(claims(sid=f"sess_{i}"), key=OTHER, kid="ins_1"))
                answers[i] = "verified"
            except Exception as exc:
                answers[i] = type(exc).__name__

        threads = [threading.Thread(target=request, args=(0,))]
        threads[0].start()
        assert server.arrived.wait(_WAIT)
        clock[0] = 12.0  # the refetch took longer than the floor
        threads += [threading.Thread(target=request, args=(i,)) for i in range(1, 6)]
        for t in threads[1:]:
            t.start()
        assert lock.wait_for_calls(1 + 6), "the requests never reached the lock"  # (prefetch's, then 6)
        server.gate.set()
        for t in threads:
            t.join(_WAIT)
    assert answers == {i: "TokenSignatureInvalid" for i in range(6)}
    assert server.fetches == 2  # the prefetch and the one refetch


def test_sync_a_key_rotated_in_during_a_ttl_refresh_waits_for_it_and_verifies(jwks: tuple[GatedJWKS, str]) -> None:
    """Later review: the sync path's ``renewed()`` answered 401 at once while a TTL refresh was in flight, where
    it waited for it before (and ``get()`` still waits for an unknown kid): a token signed by the key Clerk just
    rotated in under its kid, which that refresh brings, was refused."""
    server, url = jwks
    clock = [0.0]
    with httpx.Client() as client:
        source, lock = _source(url, client, clock)
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: float(NOW))
        server.gate.set()
        assert source.prefetch() == 1
        server.hold()
        clock[0] = 400.0  # past the TTL
        server.keys = {"ins_1": OTHER}  # Clerk rotated the key under its kid
        answers: dict[str, str] = {}

        def request(name: str, key: Any) -> None:
            try:
                verifier.verify(mint(claims(sid=f"sess_{name}"), key=key, kid="ins_1"))
                answers[name] = "verified"
            except Exception as exc:
                answers[name] = type(exc).__name__

        ttl = threading.Thread(target=request, args=("old", KEY))  # starts the TTL refresh, served the old key
        ttl.start()
        assert server.arrived.wait(_WAIT)
        calls = lock.calls
        rotated = threading.Thread(target=request, args=("new", OTHER))
        rotated.start()
        assert lock.wait_for_calls(calls + 1), "the rotated key's request never reached the lock"
        server.gate.set()
        for t in (ttl, rotated):
            t.join(_WAIT)
    assert answers == {"old": "TokenSignatureInvalid", "new": "verified"}, answers  # (the refresh it made: rotated)
    assert server.fetches == 2  # the prefetch and the TTL refresh: no second fetch


# --- finding 2: a flood of kids not held holds few threads, none of the default limiter ----------------------

@pytest.mark.anyio
async def test_unknown_kids_during_a_ttl_refresh_are_answered_at_once_from_the_keys_held(
        jwks: tuple[GatedJWKS, str]) -> None:
    server, url = jwks
    clock = [0.0]
    with httpx.Client() as client:
        source, lock = _source(url, client, clock)
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: float(NOW))
        server.gate.set()
        assert source.prefetch() == 1
        server.hold()
        clock[0] = 400.0  # past the TTL: the next request with the kid held refreshes (in a thread)
        refresh = asyncio.ensure_future(verifier.averify(mint(claims(sid="sess_ttl"))))
        await _in_flight(server)
        flood = [asyncio.ensure_future(_outcome(verifier.averify(mint(claims(), kid=f"rand_{uuid.uuid4().hex}"))))
                 for _ in range(50)]
        await _settle()
        assert all(t.done() for t in flood), "an unknown kid waited for a TTL refresh"
        assert {t.result() for t in flood} == {"TokenKeyUnknown"}
        assert anyio.to_thread.current_default_thread_limiter().borrowed_tokens <= 1  # (the refresh's own)
        # the kid held: at once too
        assert (await verifier.averify(mint(claims(sid="sess_held")))).session_id == "sess_held"
        server.gate.set()
        assert (await refresh).session_id == "sess_ttl"
    assert server.fetches == 2
    assert lock.most <= 1


@pytest.mark.anyio
async def test_a_flood_of_random_kids_during_their_refetch_holds_few_threads_and_none_of_the_apps(
        jwks: tuple[GatedJWKS, str]) -> None:
    """An attacker's random kid refetches once per cooldown; the flood sent meanwhile waits for that refetch (a kid
    just rotated in would be found by it) in a few threads of its own, not in anyio's default limiter."""
    server, url = jwks
    clock = [0.0]
    with httpx.Client() as client:
        source, lock = _source(url, client, clock)
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: float(NOW))
        server.gate.set()
        assert source.prefetch() == 1
        server.hold()
        clock[0] = 100.0  # past the floor and any cooldown

        def attack() -> asyncio.Future[str]:
            return asyncio.ensure_future(_outcome(verifier.averify(mint(claims(), kid=f"rand_{uuid.uuid4().hex}"))))

        trigger = attack()
        await _in_flight(server)
        flood = [attack() for _ in range(200)]
        await _settle()
        default = anyio.to_thread.current_default_thread_limiter()
        assert default.borrowed_tokens == 0, f"{default.borrowed_tokens} of the app's threads wait on the JWKS"
        with anyio.fail_after(_WAIT):  # the app's own threaded work runs while the refetch is in flight
            assert await anyio.to_thread.run_sync(lambda: "ran") == "ran"
        assert (await verifier.averify(mint(claims(sid="sess_held")))).session_id == "sess_held"  # kid held: at once
        assert not trigger.done()
        server.gate.set()
        answers = await asyncio.gather(trigger, *flood)
    assert set(answers) == {"TokenKeyUnknown"}
    assert server.fetches == 2  # one refetch for the whole flood: the cooldown holds
    assert lock.most <= _FEW_THREADS  # threads in the lock's queue at once: the few of the limiter, at most
