"""Review findings (session 2026-12-07): the Clerk API clients and the JWKS fetch say a redirect is not
followed, but that held only for the httpx clients they build themselves. An app's own client given to them
with ``follow_redirects=True`` followed a Clerk-side 3xx: the secret key travelled on to wherever ``Location``
pointed, and a 302 answering ``PATCH .../metadata`` became a ``GET`` whose answer was taken for the change
(a promotion reported applied that never was). Every request now asks for no redirect, whatever client. And
``doctor``'s session-keys line showed credentials in ``CLERK_JWKS_URL`` when the fetch worked."""

from __future__ import annotations

import json

import anyio
import httpx
import jwt
import pytest

from clerk_sync.auth.jwks import JWKSKeySource
from clerk_sync.clerk_api import AsyncClerkClient, ClerkClient
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.cli.doctor import _session_keys
from clerk_sync.config import Settings
from clerk_sync.errors import ClerkAPIError, TokenKeysUnavailable
from tests import factories
from tests.test_sessions import KEY

SECRET_KEY = "sk_test_never_sent_elsewhere"


class Moved:
    """A Clerk API whose every answer is a redirect to another path; what reached that path is recorded."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.elsewhere: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/elsewhere":
            self.elsewhere.append(request)
            return httpx.Response(200, json=factories.user("user_1", 5, role="member"))
        return httpx.Response(self.status, headers={"location": "https://elsewhere.example/elsewhere"})


@pytest.mark.parametrize("status", [302, 307])
def test_the_clerk_clients_never_follow_a_redirect_whatever_client_they_are_given(status: int) -> None:
    moved = Moved(status)
    budget = LocalBudget(RateLimit(1000, 1.0))
    follows = httpx.Client(transport=httpx.MockTransport(moved), follow_redirects=True)
    with ClerkClient(SECRET_KEY, http=follows, budget=budget) as clerk:
        for call in (lambda: clerk.get_user("user_1"),
                     lambda: clerk.update_user_metadata("user_1", public_metadata={"role": "admin"})):
            with pytest.raises(ClerkAPIError):
                call()

    async def main() -> None:
        afollows = httpx.AsyncClient(transport=httpx.MockTransport(moved), follow_redirects=True)
        async with AsyncClerkClient(SECRET_KEY, http=afollows, budget=budget) as aclerk:
            with pytest.raises(ClerkAPIError):
                await aclerk.update_user_metadata("user_1", public_metadata={"role": "admin"})
        await afollows.aclose()

    anyio.run(main)
    follows.close()
    assert moved.elsewhere == []  # the secret key went nowhere else, no PATCH became a GET


def _jwks(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/elsewhere":
        raise AssertionError("the JWKS fetch followed a redirect")
    if request.url.path == "/moved":
        return httpx.Response(301, headers={"location": "https://elsewhere.example/elsewhere"})
    return httpx.Response(200, json={"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())),
                                               "kid": "ins_1", "use": "sig"}]})


def test_the_jwks_fetch_never_follows_a_redirect_and_doctor_masks_its_urls_credentials() -> None:
    with httpx.Client(transport=httpx.MockTransport(_jwks), follow_redirects=True) as client:
        source = JWKSKeySource("https://proxy.example/moved", client=client)
        with pytest.raises(TokenKeysUnavailable, match="redirects are not followed"):
            source.prefetch()
        settings = Settings.from_env({"DATABASE_URL": "sqlite://",
                                      "CLERK_JWKS_URL": "https://jwksuser:JwksPW@proxy.example/jwks.json"})
        status, line = _session_keys(settings, client)
    assert "JWKS https://***@proxy.example/jwks.json (1 key(s))" in line, (status, line)
    assert "JwksPW" not in line and "jwksuser" not in line
