"""The token attack matrix against the Django app: every forged, expired, misdirected, revoked,
pending or banned session is refused (401/403) on every kind of view, and nothing is written."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from clerk_sync.integrations.django.runtime import get_clerk_sync
from tests import factories as f
from tests.django.conftest import World, bearer

OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PATHS = ["/dashboard", "/api/me", "/t/async/me", "/t/cbv/me", "/t/drf/admin"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def forgeries(world: World, victim: str) -> dict[str, str]:
    """Each attack's token, built from a genuine session of ``victim`` and the emulator's signing key."""
    clerk = world.clerk
    genuine = clerk.mint_session_token(victim)
    base = _claims(genuine)
    now = int(time.time())

    def signed(**change: Any) -> str:
        claims = {**base, **change}
        return clerk.emulator.keys.sign({k: v for k, v in claims.items() if v is not None})

    def unsigned(alg: str, sign: Callable[[bytes], bytes]) -> str:
        head = _b64(json.dumps({"alg": alg, "kid": jwt.get_unverified_header(genuine)["kid"], "typ": "JWT"}).encode())
        body = _b64(json.dumps(base).encode())
        return f"{head}.{body}.{_b64(sign(f'{head}.{body}'.encode()))}"

    public_pem = clerk.emulator.keys.public_key_pem().encode()
    head, _, sig = genuine.split(".")
    revoked_session = clerk.create_session(victim)
    revoked = clerk.session_token(revoked_session["id"])
    clerk.request("POST", f"/v1/sessions/{revoked_session['id']}/revoke")
    banned_user = clerk.create_user("banned@example.com")
    banned = clerk.mint_session_token(banned_user["id"])
    clerk.wait_for_deliveries()
    # Clerk revokes a banned user's sessions too; deliver only the ban, so the ban check itself is tested.
    clerk.set_webhook_url(None)
    clerk.request("POST", f"/v1/users/{banned_user['id']}/ban")
    update = f.envelope("user.updated", clerk.request("GET", f"/v1/users/{banned_user['id']}"))
    assert get_clerk_sync().processor.process(*f.signed(update, "msg_ban", secret=clerk.webhook_secret)).status == "applied"
    return {
        "alg-none": unsigned("none", lambda _: b""),
        "hs256-with-public-key": unsigned("HS256", lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()),
        "unknown-kid": jwt.encode(base, OTHER_KEY, algorithm="RS256", headers={"kid": "ins_unknown"}),
        "expired": signed(exp=now - 60, iat=now - 120, nbf=now - 130),
        "nbf-in-future": signed(nbf=now + 120, iat=now),
        "wrong-azp": signed(azp="https://evil.example"),
        "wrong-iss": signed(iss="https://evil.clerk.example"),
        "tampered": f"{head}.{_b64(json.dumps({**base, 'sub': 'user_someone_else'}).encode())}.{sig}",
        "missing-sub": signed(sub=None),
        "revoked": revoked,
        "pending": signed(sts="pending"),
        "banned": banned,
    }


def test_attack_matrix_is_refused_and_writes_nothing(world: World) -> None:
    victim = world.clerk.create_user("victim@example.com", public_metadata={"role": "admin"})
    tokens = forgeries(world, victim["id"])
    before = world.counts()
    statuses = {(name, path): world.app.get(path, headers=bearer(token)).status_code
                for name, token in tokens.items() for path in PATHS}
    refused = {key: status for key, status in statuses.items() if status not in (401, 403)}
    assert refused == {}
    assert world.counts() == before
    # The same victim with a genuine token gets in: the refusals were about the tokens.
    assert world.app.get("/dashboard", headers=bearer(world.clerk.mint_session_token(victim["id"]))).status_code == 200


def test_each_attack_is_refused_for_its_own_reason(client_world: World) -> None:
    victim = client_world.clerk.create_user("victim@example.com")
    tokens = forgeries(client_world, victim["id"])
    errors = {name: client_world.app.get("/dashboard", headers=bearer(token)).json()["error"]
              for name, token in tokens.items()}
    assert errors == {
        "alg-none": "token_algorithm_not_allowed",
        "hs256-with-public-key": "token_algorithm_not_allowed",
        "unknown-kid": "token_key_unknown",
        "expired": "token_expired",
        "nbf-in-future": "token_not_active_yet",
        "wrong-azp": "token_invalid_authorized_parties",
        "wrong-iss": "token_invalid_issuer",
        "tampered": "token_signature_invalid",
        "missing-sub": "token_claim_missing",
        "revoked": "session_revoked",
        "pending": "session_pending",
        "banned": "session_user_banned",
    }
