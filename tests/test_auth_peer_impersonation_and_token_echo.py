"""Auth security: no impersonating a peer admin, public paths' slash twins, token values not echoed whole, odd claims."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI

from clerk_sync import errors
from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import JWKSKeySource, StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier, is_public_path
from clerk_sync.auth.users import read_user
from clerk_sync.errors import AccessDenied, ClerkNotFound
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests._server import running
from tests.test_admin import audit_rows, synced_user
from tests.test_auth import Harness
from tests.test_sessions import ISS, KEY, NOW, claims, mint, pem

# -- 1. impersonating someone who may administer or impersonate --------------------------------------


def test_an_admin_cannot_impersonate_a_peer_admin_or_an_impersonator_and_the_refusal_is_audited(
        emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    """Fixed: only the actor was checked, so admin A could take admin B's identity (or a support
    agent's, who may impersonate in turn) and act with that role under B's name."""
    admin = synced_user(emu, store, "a@example.com", role="admin")
    peer = synced_user(emu, store, "b@example.com", role="admin")
    support = synced_user(emu, store, "s@example.com", role="support")
    with pytest.raises(AccessDenied, match=r"holds the role 'admin'.*demote the user first"):
        actions.start_impersonation(admin, peer, ip="198.51.100.7")
    assert actions.start_impersonation(admin, support).target == support  # support may not impersonate here
    with_support = AdminActions(store, actions.clerk, impersonator_roles=frozenset({"admin", "support"}))
    with pytest.raises(AccessDenied, match="holds the role 'support'"):
        with_support.start_impersonation(admin, support)  # CLERK_IMPERSONATOR_ROLES=admin,support
    rows = audit_rows(store)
    assert [(r["action"], r["actor_clerk_id"], r["target_clerk_id"]) for r in rows] == [
        ("impersonation.refused", admin, peer), ("impersonation.granted", admin, support),
        ("impersonation.refused", admin, support)]
    assert "may administer or impersonate" in rows[0]["details"]["reason"]
    assert rows[0]["ip"] == "198.51.100.7"
    user = synced_user(emu, store, "u@example.com")  # an ordinary user still can be
    assert with_support.start_impersonation(admin, user).target == user


def test_a_target_with_no_row_is_judged_by_its_role_in_clerk(
        emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    """A JIT sync on the impersonated session's first request would store the Clerk role: judged before."""
    admin = synced_user(emu, store, "root@example.com", role="admin")
    unsynced = str(emu.create_user("new@example.com", public_metadata={"role": "admin"})["id"])
    plain = str(emu.create_user("plain@example.com", public_metadata={"role": "user"})["id"])
    assert read_user(store, unsynced) is None and read_user(store, plain) is None
    with pytest.raises(AccessDenied, match=r"holds the role 'admin'.*demote the user first"):
        actions.start_impersonation(admin, unsynced)
    assert actions.start_impersonation(admin, plain).target == plain
    with pytest.raises(ClerkNotFound):
        actions.start_impersonation(admin, "user_nobody")
    assert [r["action"] for r in audit_rows(store)] == [
        "impersonation.refused", "impersonation.granted", "impersonation.failed"]


# -- 2. a public path's trailing-slash twin ----------------------------------------------------------


def test_a_public_paths_slash_twin_is_public_only_where_the_face_serves_it() -> None:
    """Fixed: ``/health`` public opened a separate protected ``/health/`` route; the twin is meant
    for the webhook route, which the faces serve with and without the slash."""
    public = {"/health", "/webhooks/clerk"}
    assert not is_public_path("/health/", public, (), slash_twins={"/webhooks/clerk"})
    assert is_public_path("/webhooks/clerk/", public, (), slash_twins={"/webhooks/clerk"})
    assert is_public_path("/health", public, (), slash_twins=())
    assert not is_public_path("/webhooks/clerk/", public, (), slash_twins=())
    assert not is_public_path("/other/", public, (), slash_twins={"/other"})  # a twin of a path not public
    assert is_public_path("/pub/x/", public, ("/pub",), slash_twins=())  # prefixes unchanged


# -- 3. unbounded echo of token values in 401 answers -----------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _with_header(header: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims()).encode())}.{_b64(b'sig')}"


HUGE = "x" * 100_000


@pytest.fixture
def protected(db_url: str) -> Iterator[httpx.Client]:
    h = Harness(db_url)
    app = FastAPI()
    ClerkAuth(h.auth).install(app, public_paths={"/"})

    @app.get("/private")
    def private() -> dict[str, str]:
        return {"page": "private"}

    with running(app) as url, httpx.Client(base_url=url) as client:
        yield client
    h.store.dispose()


@pytest.mark.parametrize("header", [{"alg": HUGE, "kid": "ins_1"}, {"alg": "RS256", "kid": "ins_1", "cat": HUGE}],
                         ids=["alg", "cat"])
def test_a_huge_header_value_is_not_echoed_whole_in_the_401(protected: httpx.Client, header: dict[str, Any]) -> None:
    answer = protected.get("/private", headers={"Authorization": f"Bearer {_with_header(header)}"})
    assert answer.status_code == 401
    assert len(answer.content) < 1_000, answer.content[:300]
    assert "100002 characters" in answer.json()["message"]  # says how long it was, not what


def test_a_huge_unknown_kid_is_not_echoed_whole() -> None:
    calls: list[httpx.Request] = []

    def jwks(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())),
                                                   "kid": "ins_1", "use": "sig"}]})

    with httpx.Client(transport=httpx.MockTransport(jwks)) as client:
        source = JWKSKeySource("https://clerk.example.test/v1/jwks", client=client)
        verifier = SessionVerifier(source, ClaimsValidator(issuer=ISS), now=lambda: NOW)
        assert verifier.verify(mint()).user_id == "user_1"
        for _ in range(2):  # the refetch, then the cooldown's message
            with pytest.raises(errors.TokenKeyUnknown) as refused:
                verifier.verify(mint(kid=HUGE))
            assert len(str(refused.value)) < 300 and "100002 characters" in str(refused.value)


@pytest.mark.parametrize("claim", ["iss", "azp"])
def test_a_huge_iss_or_azp_is_not_echoed_whole(claim: str) -> None:
    validator = ClaimsValidator(issuer=ISS, authorized_parties=frozenset({"https://app.example.test"}))
    with pytest.raises(errors.TokenError) as refused:
        validator.validate_static(claims(**{claim: HUGE}))
    assert len(str(refused.value)) < 300


# -- 4. odd claim types and magnitudes ----------------------------------------------------------------


@pytest.mark.parametrize("sid", [12345, ["sess_1"], {"id": "sess_1"}], ids=["int", "list", "dict"])
def test_a_non_string_sid_is_a_malformed_token(sid: Any) -> None:
    """Fixed: the sid was str()-ed for the revocation lookup, so no revoked session id could match."""
    with pytest.raises(errors.TokenMalformed, match="'sid' is not a string"):
        ClaimsValidator(issuer=ISS).validate_static(claims(sid=sid))


def _signed(payload: str) -> str:
    head = _b64(json.dumps({"alg": "RS256", "kid": "ins_1", "typ": "JWT"}).encode())
    body = _b64(payload.encode())
    signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(f"{head}.{body}".encode(), KEY)
    return f"{head}.{body}.{_b64(signature)}"


@pytest.mark.parametrize(("claim", "literal", "error"), [
    ("exp", "1e300", None), ("exp", "1" + "0" * 400, None), ("exp", "1" + "0" * 5000, errors.TokenMalformed),
    ("nbf", "1e300", errors.TokenNotYetValid), ("iat", "1" + "0" * 400, errors.TokenIssuedInFuture),
    ("exp", "1e400", errors.TokenMalformed)])
def test_huge_time_claims_are_handled_as_token_answers(claim: str, literal: str,
                                                        error: type[errors.TokenError] | None) -> None:
    payload = json.dumps({k: v for k, v in claims().items() if k != claim})[:-1] + f', "{claim}": {literal}}}'
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS), now=lambda: NOW)
    if error is None:
        assert verifier.verify(_signed(payload)).user_id == "user_1"  # far future: valid, no OverflowError
    else:
        with pytest.raises(error):
            verifier.verify(_signed(payload))
