"""A JWKS holding one RSA entry PyJWT cannot load (``n``/``e`` too small, no ``n``): that entry is skipped and the
rest serve. Fixed (review): PyJWT raises ``InvalidKeyError`` there, not the ``PyJWKError`` caught, so every fetch
with such an entry answered 500 and never replaced the keys held: a key Clerk had withdrawn kept verifying."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import structlog
from jwt.algorithms import RSAAlgorithm

from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import JWKSKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.errors import TokenKeysUnavailable, TokenSignatureInvalid
from clerk_sync.integrations.http import status_for
from tests.test_sessions import ISS, KEY, NOW, OTHER_KEY, claims, mint

MALFORMED = [
    {"kty": "RSA", "kid": "ins_old", "use": "sig", "n": "AQAB", "e": "AQAB"},  # e must be >= 3 and < n
    {"kty": "RSA", "kid": "ins_old", "use": "sig", "e": "AQAB"},  # no n
    {"kty": "RSA", "kid": "ins_old", "use": "sig", "n": 12345, "e": "AQAB"},  # n not a string
]


def _jwk(key: Any, kid: str = "ins_1") -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return jwk | {"kid": kid, "use": "sig", "alg": "RS256"}


@pytest.fixture
def published() -> Iterator[tuple[str, dict[str, Any]]]:
    """A JWKS served on loopback from a document the test changes."""
    document: dict[str, Any] = {"keys": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", document
    finally:
        server.shutdown()
        server.server_close()


def _verifier(url: str, client: httpx.Client, clock: list[float]) -> SessionVerifier:
    keys = JWKSKeySource(url, client=client, now=lambda: clock[0])
    return SessionVerifier(keys, ClaimsValidator(issuer=ISS, authorized_parties=None), now=lambda: float(NOW))


@pytest.mark.parametrize("bad", MALFORMED, ids=["too-small", "no-n", "n-not-a-string"])
def test_a_malformed_entry_is_skipped_and_the_good_key_verifies(published: tuple[str, dict[str, Any]],
                                                                bad: dict[str, Any]) -> None:
    url, document = published
    document["keys"] = [bad, _jwk(KEY)]
    with httpx.Client() as client, structlog.testing.capture_logs() as logs:
        verifier = _verifier(url, client, [1000.0])
        assert verifier.verify(mint(claims())).user_id == claims()["sub"]
        assert verifier.keys.prefetch() == 1  # type: ignore[attr-defined]
    skipped = [entry for entry in logs if entry["event"] == "jwks_key_skipped"]
    assert skipped and skipped[0]["kid"] == "ins_old" and skipped[0]["reason"]


def test_only_malformed_entries_are_a_jwks_without_keys_not_a_500(published: tuple[str, dict[str, Any]]) -> None:
    url, document = published
    document["keys"] = MALFORMED
    with httpx.Client() as client, pytest.raises(TokenKeysUnavailable, match="holds no RSA signing key") as caught:
        _verifier(url, client, [1000.0]).verify(mint(claims()))
    assert status_for(caught.value) == 503


def test_a_rotation_beside_a_malformed_entry_withdraws_the_old_key(published: tuple[str, dict[str, Any]]) -> None:
    url, document = published
    clock = [1000.0]
    document["keys"] = [_jwk(KEY)]
    with httpx.Client() as client:
        verifier = _verifier(url, client, clock)
        old = mint(claims())
        assert verifier.verify(old).user_id == claims()["sub"]
        # Clerk rotates (same kid, its instance id) and the answer also holds an entry PyJWT cannot load
        document["keys"] = [_jwk(OTHER_KEY), MALFORMED[0]]
        clock[0] += 301  # past the TTL
        with pytest.raises(TokenSignatureInvalid):
            verifier.verify(old)
        assert verifier.verify(mint(claims(), key=OTHER_KEY)).user_id == claims()["sub"]
