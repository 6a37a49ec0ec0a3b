"""Session tokens: RS256 v2 claims, verifiable with PyJWT against the emulator's JWKS."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest

from clerk_sync.emulator import EmulatorConfig
from clerk_sync.emulator.tokens import org_claims
from clerk_sync.testing import EmulatorServer


def _verify(clerk: EmulatorServer, token: str, jwks_path: str = "/v1/jwks") -> dict[str, Any]:
    """Verify like an app would: fetch the JWKS over HTTP, pick the key by ``kid``."""
    headers = {"Authorization": f"Bearer {clerk.secret_key}"}
    jwks = httpx.get(clerk.url + jwks_path, headers=headers).json()
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        issuer=clerk.url,
        options={"require": ["exp", "nbf", "iat", "sub", "sid"]},
    )
    return claims


def test_session_token_claims(clerk: EmulatorServer) -> None:
    user = clerk.create_user("tok@example.com")
    token = clerk.mint_session_token(user["id"])
    claims = _verify(clerk, token)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["kid"] == clerk.config.instance_id
    assert claims["sub"] == user["id"]
    assert claims["sid"].startswith("sess_")
    assert claims["exp"] - claims["iat"] == 60
    assert claims["nbf"] == claims["iat"] - 10
    assert claims["v"] == 2
    assert claims["azp"] == "http://localhost:3000"
    assert claims["fva"] == [0, -1]
    assert "o" not in claims
    assert "act" not in claims
    assert claims["sts"] == "active"  # a v2 default claim (Clerk docs: "active", "pending")
    assert _verify(clerk, token, "/.well-known/jwks.json") == claims


def test_pending_session_token_as_the_readme_promises(clerk: EmulatorServer) -> None:
    """Regression (issue 10 #8): ``mint_session_token(uid, pending=True)`` raised TypeError."""
    user = clerk.create_user("pending@example.com")
    claims = _verify(clerk, clerk.mint_session_token(user["id"], pending=True))
    assert (claims["sub"], claims["sts"]) == (user["id"], "pending")
    assert _verify(clerk, clerk.mint_session_token(user["id"]))["sts"] == "active"
    events = [d["type"] for d in clerk.deliveries()]
    assert "session.pending" in events
    with pytest.raises(ValueError, match="never pending"):
        clerk.mint_session_token(user["id"], actor=user["id"], pending=True)


def test_org_claims_with_custom_permissions() -> None:
    perms = {"org:member": ("org:sys_memberships:read", "org:posts:read", "org:posts:write", "org:billing:read")}
    with EmulatorServer(EmulatorConfig(role_permissions=perms)) as clerk:
        user = clerk.create_user("org@example.com")
        owner = clerk.create_user("owner@example.com")
        org = clerk.create_organization("Acme", created_by=owner["id"], slug="acme")
        clerk.add_membership(org["id"], user["id"], "org:member")
        claims = _verify(clerk, clerk.mint_session_token(user["id"], org_id=org["id"]))
        owner_claims = _verify(clerk, clerk.mint_session_token(owner["id"], org_id=org["id"]))
    assert claims["o"] == {"id": org["id"], "rol": "member", "slg": "acme", "per": "read,write", "fpm": "3,1"}
    assert claims["fea"] == "o:posts,o:billing"
    assert owner_claims["o"] == {"id": org["id"], "rol": "admin", "slg": "acme"}
    assert "fea" not in owner_claims


def test_fpm_encoding_is_a_bitmask_over_per() -> None:
    claim, fea = org_claims("org_1", "s", "org:editor", ("org:a:x", "org:b:y", "org:a:y", "org:sys_profile:manage"))
    assert fea == "o:a,o:b"
    assert claim == {"id": "org_1", "rol": "editor", "slg": "s", "per": "x,y", "fpm": "3,2"}


def test_impersonation_token_carries_act(clerk: EmulatorServer) -> None:
    admin = clerk.create_user("admin@example.com")
    user = clerk.create_user("target@example.com")
    claims = _verify(clerk, clerk.mint_session_token(user["id"], actor=admin["id"]))
    assert claims["sub"] == user["id"]
    assert claims["act"] == {"sub": admin["id"]}
    session = clerk.request("GET", f"/v1/sessions/{claims['sid']}")
    assert session["actor"] == {"sub": admin["id"]}


def test_actor_token_single_use(clerk: EmulatorServer) -> None:
    admin = clerk.create_user("admin@example.com")
    user = clerk.create_user("target@example.com")
    ticket = clerk.request("POST", "/v1/actor_tokens", json={"user_id": user["id"], "actor": {"sub": admin["id"]}})
    clerk.request("POST", f"/_emulator/actor_tokens/{ticket['id']}/accept")
    with pytest.raises(httpx.HTTPStatusError) as info:
        clerk.request("POST", f"/_emulator/actor_tokens/{ticket['id']}/accept")
    assert info.value.response.status_code == 400


def test_pending_session_has_sts(clerk: EmulatorServer) -> None:
    user = clerk.create_user("pending@example.com")
    claims = _verify(clerk, clerk.emulator.mint_session_token(user["id"], pending=True))
    assert claims["sts"] == "pending"


def test_session_token_template_custom_claims() -> None:
    template = {
        "metadata": "{{user.public_metadata}}",
        "email": "{{user.primary_email_address}}",
        "greeting": "hi {{user.first_name}}!",
        "missing": "{{user.no_such_field}}",
        "org_role": "{{org.role}}",
    }
    with EmulatorServer(session_token_template=template) as clerk:
        user = clerk.create_user("tpl@example.com", first_name="Ada", public_metadata={"role": "admin", "tier": 2})
        claims = _verify(clerk, clerk.mint_session_token(user["id"]))
    assert claims["metadata"] == {"role": "admin", "tier": 2}
    assert claims["email"] == "tpl@example.com"
    assert claims["greeting"] == "hi Ada!"
    assert claims["missing"] is None
    assert claims["org_role"] is None


def test_session_token_template_can_change_at_run_time(clerk: EmulatorServer) -> None:
    user = clerk.create_user("rt@example.com", public_metadata={"role": "editor"})
    clerk.request("PUT", "/_emulator/session_token_template", json={"role": "{{user.public_metadata.role}}"})
    assert _verify(clerk, clerk.mint_session_token(user["id"]))["role"] == "editor"


def test_jwt_template_endpoint() -> None:
    templates = {"supabase": {"role": "authenticated", "email": "{{user.primary_email_address}}"}}
    with EmulatorServer(jwt_templates=templates) as clerk:
        user = clerk.create_user("tmpl@example.com")
        session = clerk.create_session(user["id"])
        token = clerk.session_token(session["id"], template_name="supabase", expires_in_seconds=300)
        claims = _verify_template(clerk, token)
        assert claims["role"] == "authenticated"
        assert claims["email"] == "tmpl@example.com"
        assert claims["exp"] - claims["iat"] == 300
        assert jwt.get_unverified_header(token)["cat"] == "cl_B7d4PD222AAA"
        with pytest.raises(httpx.HTTPStatusError) as info:
            clerk.session_token(session["id"], template_name="nope")
        assert info.value.response.status_code == 404


def _verify_template(clerk: EmulatorServer, token: str) -> dict[str, Any]:
    key = jwt.PyJWKSet.from_dict(clerk.jwks())[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=["RS256"], issuer=clerk.url)
    return claims


def test_expires_in_seconds(clerk: EmulatorServer) -> None:
    user = clerk.create_user("exp@example.com")
    token = clerk.mint_session_token(user["id"], expires_in_seconds=120)
    claims = _verify(clerk, token)
    assert claims["exp"] - claims["iat"] == 120


def test_no_tokens_for_revoked_sessions_and_ban_revokes(clerk: EmulatorServer) -> None:
    user = clerk.create_user("ban@example.com")
    session = clerk.create_session(user["id"])
    clerk.request("POST", f"/v1/users/{user['id']}/ban")
    assert clerk.request("GET", f"/v1/sessions/{session['id']}")["status"] == "revoked"
    with pytest.raises(httpx.HTTPStatusError) as info:
        clerk.session_token(session["id"])
    assert info.value.response.status_code == 404


def test_key_rotation_keeps_old_key_for_the_grace_period() -> None:
    now = [time.time()]
    with EmulatorServer(key_grace_s=1.0, clock=lambda: now[0]) as clerk:
        user = clerk.create_user("rotate@example.com")
        old = clerk.mint_session_token(user["id"])
        rotated = clerk.request("POST", "/_emulator/keys/rotate")
        new = clerk.mint_session_token(user["id"])
        assert jwt.get_unverified_header(new)["kid"] == rotated["kid"] != clerk.config.instance_id
        assert [k["kid"] for k in clerk.jwks()["keys"]] == [rotated["kid"], clerk.config.instance_id]
        assert _verify(clerk, old)["sub"] == _verify(clerk, new)["sub"] == user["id"]
        now[0] += 0.999
        assert len(clerk.jwks()["keys"]) == 2  # still within the grace period
        now[0] += 0.002
        assert [k["kid"] for k in clerk.jwks()["keys"]] == [rotated["kid"]]
