"""The Flask extension's request-time auth against the emulator: the token attack matrix (nothing
written), guards, deny by default, lazy evaluation, errors through the one table, settings from app.config."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask

from clerk_sync.errors import ConfigError
from clerk_sync.integrations.flask import (
    ClerkSync,
    clerk_login_required,
    clerk_state,
    current_clerk,
    current_user,
    not_impersonated,
    optional_clerk,
    public,
    require_org_role,
    require_permission,
    require_role,
    settings_from_config,
)
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, metadata
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._flask import Pages, running_wsgi
from tests._server import free_port
from tests.conftest import SECRET

OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
FRONTEND = "http://localhost:3000"
ROLE_PERMISSIONS = {"org:admin": ("org:sys_memberships:manage",), "org:member": ("org:invoices:read",)}


def build_app(config: dict[str, Any], **options: Any) -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = config
    ClerkSync(app, **{"deny_by_default": True, "revocation_refresh_s": 0, "public_endpoints": {"status"}, **options})

    @app.get("/status")
    def status() -> dict[str, str]:  # public through public_endpoints
        return {"status": "ok"}

    @app.get("/")
    @public
    def home() -> dict[str, Any]:
        auth = optional_clerk()
        return {"page": "public", "user": auth.user_id if auth else None}

    @app.get("/me")
    @clerk_login_required
    def me() -> dict[str, Any]:
        return {"user": current_clerk.user_id, "email": current_user.email, "role": current_user.role,
                "impersonated": current_clerk.is_impersonated}

    @app.route("/export", methods=["GET", "OPTIONS"])  # a view that answers OPTIONS itself
    def export() -> dict[str, str]:
        return {"secret": "every customer"}

    @app.get("/session")
    def session() -> dict[str, Any]:  # no decorator: deny by default alone protects it
        return {"user": current_clerk.user_id}

    @app.get("/admin")
    @require_role("admin")
    def admin() -> dict[str, Any]:
        return {"admin": current_user.clerk_id}

    @app.get("/org/settings")
    @require_org_role("org:admin")
    def org_settings() -> dict[str, Any]:
        return {"org": current_clerk.org_id}

    @app.get("/org/invoices")
    @require_permission("org:invoices:read")
    def org_invoices() -> dict[str, Any]:
        return {"org": current_clerk.org_id}

    @app.get("/billing")
    @not_impersonated
    def billing() -> dict[str, Any]:
        return {"billing": current_clerk.user_id}

    return app


@dataclass
class World:
    clerk: EmulatorServer
    app: Pages
    store: Store

    def counts(self) -> dict[str, int]:
        if not self.clerk.request("GET", "/_emulator/state")["webhook_paused"]:  # paused: nothing will arrive
            self.clerk.wait_for_deliveries()
        with self.store.connect() as conn:
            return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                    for t in metadata.sorted_tables}


def emulator_config(clerk: EmulatorServer, db_url: str) -> dict[str, Any]:
    return {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
            "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url, "CLERK_ISSUER": clerk.url,
            "CLERK_AUTHORIZED_PARTIES": FRONTEND}


@pytest.fixture(params=["test_client", "server"])
def world(request: pytest.FixtureRequest, db_url: str) -> Iterator[World]:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk", rate_limit_requests=1000,
                        role_permissions=ROLE_PERMISSIONS) as clerk:
        app = build_app(emulator_config(clerk, db_url))
        with running_wsgi(app, port) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield World(clerk, Pages(app, http if request.param == "server" else None), clerk_state(app).store)
        clerk_state(app).close()


# -- the attack matrix -------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _resign(clerk: EmulatorServer, token: str, **changes: Any) -> str:
    """The token's claims, changed, signed with the emulator's real key (only the claims are wrong)."""
    claims = {**_unsigned(token), **changes}
    return clerk.emulator.keys.sign({k: v for k, v in claims.items() if v is not None})


def _alg_none(clerk: EmulatorServer, token: str) -> str:
    head = {"alg": "none", "kid": jwt.get_unverified_header(token)["kid"], "typ": "JWT"}
    return f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(_unsigned(token)).encode())}."


def _hs256_with_public_key(clerk: EmulatorServer, token: str) -> str:
    head = _b64(json.dumps({"alg": "HS256", "kid": jwt.get_unverified_header(token)["kid"], "typ": "JWT"}).encode())
    body = _b64(json.dumps(_unsigned(token)).encode())
    sig = hmac.new(clerk.emulator.keys.public_key_pem().encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _tampered(clerk: EmulatorServer, token: str) -> str:
    head, _, sig = token.split(".")
    return f"{head}.{_b64(json.dumps({**_unsigned(token), 'sub': 'user_someone_else'}).encode())}.{sig}"


NOW = int(time.time())
Forger = Callable[[EmulatorServer, str], str]
ATTACKS: dict[str, tuple[Forger, str]] = {
    "alg-none": (_alg_none, "token_algorithm_not_allowed"),
    "hs256-with-public-key": (_hs256_with_public_key, "token_algorithm_not_allowed"),
    "unknown-kid": (lambda c, t: jwt.encode(_unsigned(t), OTHER_KEY, "RS256", headers={"kid": "ins_unknown"}),
                    "token_key_unknown"),
    "other-key-known-kid": (lambda c, t: jwt.encode(_unsigned(t), OTHER_KEY, "RS256",
                                                    headers={"kid": jwt.get_unverified_header(t)["kid"]}),
                            "token_signature_invalid"),
    "expired": (lambda c, t: _resign(c, t, exp=int(time.time()) - 60, iat=int(time.time()) - 120,
                                     nbf=int(time.time()) - 130), "token_expired"),
    "nbf-in-future": (lambda c, t: _resign(c, t, nbf=int(time.time()) + 120), "token_not_active_yet"),
    "wrong-azp": (lambda c, t: _resign(c, t, azp="https://evil.example"), "token_invalid_authorized_parties"),
    "wrong-iss": (lambda c, t: _resign(c, t, iss="https://evil.clerk.example"), "token_invalid_issuer"),
    "tampered": (_tampered, "token_signature_invalid"),
    "missing-sub": (lambda c, t: _resign(c, t, sub=None), "token_claim_missing"),
    "pending": (lambda c, t: c.emulator.mint_session_token(_unsigned(t)["sub"], pending=True), "session_pending"),
    "garbage": (lambda c, t: "not.a.jwt", "token_malformed"),
}


def test_every_forged_or_unusable_token_is_refused_and_nothing_is_written(world: World) -> None:
    world.clerk.set_webhook_url(None)  # the user is in Clerk but not in our DB: an accepted token would JIT-write
    user = world.clerk.create_user("victim@example.com")
    valid = world.clerk.mint_session_token(user["id"])
    before = world.counts()
    answers = {}
    for name, (forge, _) in ATTACKS.items():
        token = forge(world.clerk, valid)
        answers[name] = [(p.status, p.json["error"]) for p in (world.app.get(path, token) for path in ("/me", "/admin"))]
    assert answers == {name: [(401, code), (401, code)] for name, (_, code) in ATTACKS.items()}
    assert world.counts() == before
    assert world.app.get("/me", valid).status == 200  # the untouched token works (and JIT-writes the row)


def test_revoked_session_and_banned_user_are_refused_on_the_next_request(world: World) -> None:
    user = world.clerk.create_user("ros@example.com")
    token = world.clerk.mint_session_token(user["id"])
    world.clerk.wait_for_deliveries()
    assert world.app.get("/me", token).status == 200
    world.clerk.request("POST", f"/v1/sessions/{_unsigned(token)['sid']}/revoke")
    before = world.counts()  # waits for session.revoked
    revoked = world.app.get("/me", token)
    assert (revoked.status, revoked.json["error"]) == (401, "session_revoked")
    assert world.counts() == before

    other = world.clerk.create_user("ban@example.com")
    token = world.clerk.mint_session_token(other["id"])
    world.clerk.wait_for_deliveries()
    assert world.app.get("/me", token).status == 200
    world.clerk.request("POST", f"/v1/users/{other['id']}/ban")
    before = world.counts()
    banned = world.app.get("/me", token)
    assert banned.status == 401 and banned.json["error"] in {"session_user_banned", "session_revoked"}
    assert world.app.get("/admin", token).status == 401
    assert world.counts() == before


# -- guards --------------------------------------------------------------------------------------------
def test_deny_by_default_public_views_and_unknown_paths(world: World) -> None:
    user = world.clerk.create_user("pub@example.com")
    token = world.clerk.mint_session_token(user["id"])
    assert world.app.get("/").json == {"page": "public", "user": None}
    assert world.app.get("/", token).json == {"page": "public", "user": user["id"]}
    assert world.app.get("/", "garbage").json["user"] is None  # a bad token on a public page: signed out
    assert world.app.get("/status").json == {"status": "ok"}
    missing = world.app.get("/session")
    assert (missing.status, missing.json["error"]) == (401, "token_missing")
    assert world.app.get("/session", token).json == {"user": user["id"]}
    assert world.app.get("/nowhere").status == 401  # what exists is not revealed to the signed-out
    assert world.app.get("/nowhere", token).status == 404
    # A browser's CORS preflight carries no session by design: a bare 200 answers it, not 401
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    if world.app.http is not None:
        answers = tuple(world.app.http.options(path, headers=headers).status_code
                        for path, headers in (("/session", preflight), ("/session", {}), ("/export", preflight)))
    else:
        with world.app.app.test_client() as client:
            answers = tuple(client.options(path, headers=headers).status_code
                            for path, headers in (("/session", preflight), ("/session", {}), ("/export", preflight)))
    # a plain OPTIONS is still refused; a "preflight" to a view that takes OPTIONS itself gets the same bare 200
    # (any client can fake one: the view does not run for it)
    assert answers == (200, 401, 200)


def test_role_is_confirmed_against_the_row_and_demotion_applies_on_the_next_request(world: World) -> None:
    user = world.clerk.create_user("adm@example.com", public_metadata={"role": "admin"})
    token = world.clerk.mint_session_token(user["id"])  # carries no role claim: the row decides
    world.clerk.wait_for_deliveries()
    assert world.app.get("/admin", token).json == {"admin": user["id"]}
    world.clerk.request("PATCH", f"/v1/users/{user['id']}/metadata", json={"public_metadata": {"role": "user"}})
    world.clerk.wait_for_deliveries()
    refused = world.app.get("/admin", token)
    assert (refused.status, refused.json["error"]) == (403, "access_denied")


def test_org_role_and_permission_guards(world: World) -> None:
    owner = world.clerk.create_user("own@example.com")
    member = world.clerk.create_user("mem@example.com")
    org = world.clerk.create_organization("Acme", created_by=owner["id"])
    world.clerk.add_membership(org["id"], member["id"])
    owner_tok = world.clerk.mint_session_token(owner["id"], org_id=org["id"])
    member_tok = world.clerk.mint_session_token(member["id"], org_id=org["id"])
    assert world.app.get("/org/settings", owner_tok).json == {"org": org["id"]}
    assert world.app.get("/org/settings", member_tok).status == 403
    assert world.app.get("/org/invoices", member_tok).json == {"org": org["id"]}
    assert world.app.get("/org/invoices", owner_tok).status == 403  # the admin role lacks this permission
    assert world.app.get("/org/invoices", world.clerk.mint_session_token(member["id"])).status == 403  # no org


def test_impersonated_requests_are_audited_once_each_and_kept_off_sensitive_routes(world: World) -> None:
    admin = world.clerk.create_user("imp@example.com", public_metadata={"role": "admin"})
    target = world.clerk.create_user("tgt@example.com")
    world.clerk.wait_for_deliveries()
    as_target = world.clerk.mint_session_token(target["id"], actor=admin["id"])
    assert world.app.get("/me", as_target).json == {"user": target["id"], "email": "tgt@example.com",
                                                   "role": "user", "impersonated": True}
    refused = world.app.get("/billing", as_target)
    assert (refused.status, refused.json["error"]) == (403, "access_denied")
    assert world.app.get("/billing", world.clerk.mint_session_token(target["id"])).status == 200
    with world.store.connect() as conn:
        rows = conn.execute(sa.select(audit_log.c.action, audit_log.c.impersonator_clerk_id,
                                      audit_log.c.target_clerk_id, audit_log.c.details)
                            .order_by(audit_log.c.id)).all()
    assert [(r[0], r[1], r[2], r[3]["method"], r[3]["path"]) for r in rows] == [
        ("impersonation.request", admin["id"], target["id"], "GET", "/me"),
        ("impersonation.request", admin["id"], target["id"], "GET", "/billing"),
    ]


# -- laziness ----------------------------------------------------------------------------------------
def test_the_session_is_verified_without_a_query_and_the_row_read_only_when_asked(db_url: str) -> None:
    with EmulatorServer(rate_limit_requests=1000) as clerk:
        app = build_app(emulator_config(clerk, db_url), revocation_refresh_s=3600)
        state = clerk_state(app)
        queries: list[str] = []
        sa.event.listen(state.store.engine, "before_cursor_execute", lambda *a: queries.append(a[2].split()[0]))
        user = clerk.create_user("lazy@example.com")
        token = clerk.mint_session_token(user["id"])
        pages = Pages(app, None)
        assert pages.get("/session", token).status == 200  # warms the deny list (one load per refresh_s)
        queries.clear()
        assert pages.get("/session", token).json == {"user": user["id"]}
        assert pages.get("/", token).status == 200
        assert [q for q in queries if q != "BEGIN"] == []  # verified from cached keys and the cached deny list: no query
        assert pages.get("/me", token).json["email"] == "lazy@example.com"  # JIT: the row, fetched and stored
        queries.clear()
        assert pages.get("/me", token).status == 200
        assert [q for q in queries if q != "BEGIN"] == ["SELECT"]  # current_user used twice: one query
        state.close()


# -- configuration -----------------------------------------------------------------------------------
def test_settings_come_from_the_clerk_sync_dict_then_config_keys_then_the_environment() -> None:
    env = {"DATABASE_URL": "sqlite:///env.db", "CLERK_WEBHOOK_SECRET": "whsec_ZW52", "CLERK_ISSUER": "https://env",
           "CLERK_SYNC_MAX_BODY_BYTES": "10"}
    config = {"CLERK_SYNC": {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "clerk_issuer": "https://dict"},
              "DATABASE_URL": "sqlite:///config.db", "CLERK_SYNC_MAX_BODY_BYTES": 20, "SECRET_KEY": "flask's own"}
    settings = settings_from_config(config, environ=env)
    assert settings.database_url == "sqlite:///config.db"
    assert settings.webhook_secret is not None and settings.webhook_secret.get_secret_value() == SECRET
    assert (settings.clerk_issuer, settings.max_body_bytes) == ("https://dict", 20)
    assert settings_from_config({}, environ=env).webhook_secret is not None  # the alternative name, from env
    with pytest.raises(ConfigError, match="CLERK_WEBHOOK_SIGNNG_SECRET"):
        settings_from_config({"CLERK_SYNC": {"CLERK_WEBHOOK_SIGNNG_SECRET": SECRET}}, environ={})
    with pytest.raises(ConfigError, match="CLERK_SYNC_MAX_BODY_BYTES"):
        settings_from_config({"CLERK_SYNC": {"CLERK_SYNC_MAX_BODY_BYTES": 0}}, environ={})


def test_a_missing_secret_or_key_fails_at_start_up_and_says_what_to_set(tmp_path: Any) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(ConfigError, match="CLERK_WEBHOOK_SIGNING_SECRET is not set"):
        build_app({"DATABASE_URL": db})
    app = build_app({"DATABASE_URL": db, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})  # webhooks only: no session keys
    refused = Pages(app, None).get("/session", "a.b.c")
    assert (refused.status, refused.json["error"]) == (500, "config_error")
    assert "CLERK_JWT_KEY" in refused.json["message"]
    with pytest.raises(RuntimeError, match="already set up"):
        ClerkSync(app)
    clerk_state(app).close()


def test_database_down_public_pages_stay_up_protected_ones_answer_503() -> None:
    from tests.test_auth import token
    from tests.test_sessions import AZP, ISS, KEY, pem

    down = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1"
    app = build_app({"DATABASE_URL": down, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY),
                     "CLERK_ISSUER": ISS, "CLERK_AUTHORIZED_PARTIES": AZP})
    pages = Pages(app, None)
    tok = token("user_down")
    assert pages.get("/", tok).json == {"page": "public", "user": None}  # the deny list is unreadable: signed out
    refused = pages.get("/session", tok)
    assert (refused.status, refused.json["error"]) == (503, "store_unavailable")
    with app.test_client() as client:
        r = client.post("/webhooks/clerk", data=b"{}", headers={"svix-id": "m", "svix-timestamp": str(int(time.time())),
                                                                "svix-signature": "v1,x"})
        assert r.status_code == 401  # refused before the database is needed
        headers, body = f.signed(f.envelope("user.created", f.user("user_down", 1)), "msg_down")
        r = client.post("/webhooks/clerk", data=body, headers=headers)
        assert (r.status_code, r.get_json()["error"], r.headers["Retry-After"]) == (503, "store_unavailable", "5")
    clerk_state(app).close()


@pytest.mark.parametrize("valid_first", [True, False], ids=["valid-first", "valid-last"])
def test_two_values_of_the_session_cookie_are_refused_as_on_the_other_faces(db_url: str, valid_first: bool) -> None:
    """Review finding (cookie tossing): werkzeug kept the first of two ``__session`` cookies where Starlette
    and Django keep the last, so ``__session=<valid>; __session=garbage`` was 200 here and 401 there."""
    from tests.test_auth import token
    from tests.test_sessions import AZP, ISS, KEY, pem

    app = build_app({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY),
                     "CLERK_ISSUER": ISS, "CLERK_AUTHORIZED_PARTIES": AZP})
    valid = token("user_ct")
    values = [valid, "garbage"] if valid_first else ["garbage", valid]
    with app.test_client(use_cookies=False) as client:
        r = client.get("/session", headers={"Cookie": "; ".join(f"__session={v}" for v in values)})
        assert (r.status_code, r.get_json()["error"]) == (401, "token_malformed")
        assert client.get("/session", headers={"Cookie": f"__session={valid}"}).get_json() == {"user": "user_ct"}
    clerk_state(app).close()
