"""Route protection over real HTTP: deny by default, DB-confirmed roles, revocation, bans, guards."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, WebSocket

from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth, ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.auth.users import AuthUser
from clerk_sync.config import Settings
from clerk_sync.integrations.asgi import ClerkAuthBackend, ClerkAuthMiddleware
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.integrations.starlette import build_processor
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, metadata
from tests import factories as f
from tests._server import running
from tests.conftest import SECRET
from tests.test_sessions import AZP, ISS, KEY, mint, pem


def token(user_id: str, **extra: Any) -> str:
    now = int(time.time())
    claims = {"sub": user_id, "sid": f"sess_{user_id}", "iss": ISS, "azp": AZP, "iat": now, "nbf": now - 10,
              "exp": now + 60, "v": 2, **extra}
    return mint(claims)


class Harness:
    def __init__(self, db_url: str, *, authorized_parties: frozenset[str] | None = frozenset({AZP})) -> None:
        settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
        self.processor = build_processor(settings)
        self.store = self.processor.store
        verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS, authorized_parties=authorized_parties))
        self.auth = Authenticator(verifier, self.store, deny_list=DenyList(self.store, refresh_s=0))
        self.n = 0

    def event(self, event_type: str, data: dict[str, Any]) -> None:
        self.n += 1
        headers, body = f.signed(f.envelope(event_type, data), f"msg_h{self.n}")
        assert self.processor.process(headers, body).status in ("applied", "skipped")

    def counts(self) -> dict[str, int]:
        with self.store.connect() as conn:
            return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in metadata.sorted_tables}


def build_app(h: Harness, *, deny_by_default: bool = False) -> FastAPI:
    clerk = ClerkAuth(h.auth)
    app = FastAPI()
    clerk.install(app, public_paths={"/"}, deny_by_default=deny_by_default)

    @app.get("/no-dependency")
    def no_dependency() -> dict[str, str]:
        return {"page": "forgot its dependency"}

    @app.get("/")
    def home() -> dict[str, str]:
        return {"page": "public"}

    @app.get("/me")
    async def me(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
        return {"user_id": auth.user_id, "impersonated": auth.is_impersonated}

    @app.get("/admin")
    def admin(user: AuthUser = Depends(clerk.require_role("admin"))) -> dict[str, str]:
        return {"admin": user.clerk_id}

    @app.get("/org/settings")
    async def org_settings(auth: Auth = Depends(clerk.require_org_role("org:admin"))) -> dict[str, Any]:
        return {"org": auth.org_id}

    @app.get("/org/invoices")
    async def invoices(auth: Auth = Depends(clerk.require_permission("org:invoices:read"))) -> dict[str, Any]:
        return {"org": auth.org_id}

    @app.get("/billing")
    async def billing(auth: Auth = Depends(clerk.not_impersonated)) -> dict[str, Any]:
        return {"ok": True}

    return app


@pytest.fixture
def harness(db_url: str) -> Iterator[tuple[Harness, httpx.Client]]:
    h = Harness(db_url)
    app = ClerkAuthMiddleware(build_app(h), h.auth, public_paths={"/"})
    with running(app) as url, httpx.Client(base_url=url) as client:
        yield h, client
    h.store.dispose()


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def test_public_route_open_everything_else_denied_by_default(harness: tuple[Harness, httpx.Client]) -> None:
    h, client = harness
    assert client.get("/").status_code == 200
    assert client.get("/me").status_code == 401
    assert client.get("/not-declared-anywhere").status_code == 401
    before = h.counts()
    assert client.get("/me", headers=bearer("garbage")).status_code == 401
    assert h.counts() == before  # refusals write nothing


def test_signed_in_via_bearer_or_session_cookie(harness: tuple[Harness, httpx.Client]) -> None:
    h, client = harness
    h.event("user.created", f.user("user_s", 1))
    assert client.get("/me", headers=bearer(token("user_s"))).json() == {"user_id": "user_s", "impersonated": False}
    client.cookies.set("__session", token("user_s"))
    assert client.get("/me").status_code == 200
    client.cookies.clear()


def test_admin_confirmed_against_db_and_demotion_is_immediate(harness: tuple[Harness, httpx.Client]) -> None:
    h, client = harness
    h.event("user.created", f.user("user_adm", 1, role="admin"))
    tok = token("user_adm", metadata={"role": "admin"})  # the claim keeps saying admin for 60 s
    assert client.get("/admin", headers=bearer(tok)).status_code == 200
    h.event("user.updated", f.user("user_adm", 2, role="user"))
    r = client.get("/admin", headers=bearer(tok))
    assert r.status_code == 403 and r.json()["error"] == "access_denied"


def test_claim_alone_does_not_make_an_admin(harness: tuple[Harness, httpx.Client]) -> None:
    h, client = harness
    h.event("user.created", f.user("user_plain", 1))
    assert client.get("/admin", headers=bearer(token("user_plain", metadata={"role": "admin"}))).status_code == 403


def test_revoked_session_and_banned_user_are_signed_out(harness: tuple[Harness, httpx.Client]) -> None:
    h, client = harness
    h.event("user.created", f.user("user_r", 1))
    tok = token("user_r")
    assert client.get("/me", headers=bearer(tok)).status_code == 200
    h.event("session.revoked", {"id": "sess_user_r", "object": "session", "user_id": "user_r", "status": "revoked"})
    r = client.get("/me", headers=bearer(tok))
    assert r.status_code == 401 and r.json()["error"] == "session_revoked"
    h.event("user.created", f.user("user_b", 1))
    assert client.get("/me", headers=bearer(token("user_b"))).status_code == 200
    h.event("user.updated", f.user("user_b", 2, banned=True))
    r = client.get("/me", headers=bearer(token("user_b")))
    assert r.status_code == 401 and r.json()["error"] == "session_user_banned"


def test_org_role_and_permission_dependencies(harness: tuple[Harness, httpx.Client]) -> None:
    _, client = harness
    org = {"id": "org_1", "rol": "admin", "slg": "acme", "per": "read", "fpm": "1"}
    admin_tok = token("user_o", o=org, fea="o:invoices")
    member_tok = token("user_o", o={**org, "rol": "member", "fpm": "0"}, fea="o:invoices")
    assert client.get("/org/settings", headers=bearer(admin_tok)).json() == {"org": "org_1"}
    assert client.get("/org/invoices", headers=bearer(admin_tok)).status_code == 200
    assert client.get("/org/settings", headers=bearer(member_tok)).status_code == 403
    assert client.get("/org/invoices", headers=bearer(member_tok)).status_code == 403
    assert client.get("/org/settings", headers=bearer(token("user_o"))).status_code == 403


def test_impersonated_sessions_are_marked_audited_and_kept_off_sensitive_routes(harness: tuple[Harness, httpx.Client]) -> None:
    _, client = harness
    tok = token("user_t", act={"sub": "user_admin", "sid": "sess_admin"})
    assert client.get("/me", headers=bearer(tok)).json() == {"user_id": "user_t", "impersonated": True}
    assert client.get("/billing", headers=bearer(tok)).status_code == 403
    assert client.get("/billing", headers=bearer(token("user_t"))).status_code == 200
    h, _ = harness
    with h.store.connect() as conn:
        rows = conn.execute(sa.select(audit_log.c.action, audit_log.c.impersonator_clerk_id, audit_log.c.target_clerk_id,
                                      audit_log.c.details)).all()
    assert [(r[0], r[1], r[2], r[3]["path"]) for r in rows] == [
        ("impersonation.request", "user_admin", "user_t", "/me"),
        ("impersonation.request", "user_admin", "user_t", "/billing"),
    ]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_impersonated_requests_are_audited_without_the_middleware_too(db_url: str) -> None:
    """Only ClerkAuthMiddleware wrote the per-request audit row: FastAPI's dependencies alone
    (``deny_by_default=False``) and ClerkAuthBackend served impersonated requests unaudited. One row per
    request, however many dependencies read the session."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    h = Harness(db_url)
    h.event("user.created", f.user("user_t", 1))
    tok = token("user_t", act={"sub": "user_admin", "sid": "sess_admin"})

    async def me(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.user.identity})

    backend_app = Starlette(routes=[Route("/me", me)], middleware=[
        Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(h.auth))])
    both = build_app(h)  # FastAPI's dependencies behind ClerkAuthBackend: still one row a request
    both.add_middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(h.auth))
    for app, path in ((build_app(h), "/org/settings"), (backend_app, "/me"), (both, "/me")):  # (org: two dependencies)
        with running(app) as url, httpx.Client(base_url=url) as client:
            client.get(path, headers=bearer(tok))
            assert client.get("/me", headers=bearer(tok)).status_code == 200
    with h.store.connect() as conn:
        rows = conn.execute(sa.select(audit_log.c.action, audit_log.c.impersonator_clerk_id, audit_log.c.details)).all()
    assert [(r[0], r[1], r[2]["path"]) for r in rows] == [
        ("impersonation.request", "user_admin", p) for p in ("/org/settings", "/me", "/me", "/me", "/me", "/me")]
    h.store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_audit_of_impersonated_requests_can_be_turned_off_everywhere(db_url: str) -> None:
    """``audit_impersonation=False`` was an option of the middleware, Flask and Django only: FastAPI's
    ``ClerkAuth`` (its dependencies and ``install()``) and ``ClerkAuthBackend`` wrote a row regardless."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    h = Harness(db_url)
    h.event("user.created", f.user("user_t", 1))
    tok = token("user_t", act={"sub": "user_admin", "sid": "sess_admin"})

    async def me(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.user.identity})

    def fastapi_app(deny_by_default: bool) -> FastAPI:
        clerk, app = ClerkAuth(h.auth, audit_impersonation=False), FastAPI()
        clerk.install(app, public_paths={"/"}, deny_by_default=deny_by_default)

        @app.get("/me")
        async def me_route(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
            return {"impersonated": auth.is_impersonated}

        return app

    backend_app = Starlette(routes=[Route("/me", me)], middleware=[
        Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(h.auth, audit_impersonation=False))])
    for app in (fastapi_app(False), fastapi_app(True), backend_app):
        with running(app) as url, httpx.Client(base_url=url) as client:
            assert client.get("/me", headers=bearer(tok)).status_code == 200
    with h.store.connect() as conn:
        assert conn.execute(sa.select(audit_log.c.action)).all() == []
    with running(build_app(h)) as url, httpx.Client(base_url=url) as client:  # on by default
        assert client.get("/me", headers=bearer(tok)).status_code == 200
    with h.store.connect() as conn:
        assert [r[0] for r in conn.execute(sa.select(audit_log.c.action))] == ["impersonation.request"]
    h.store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_public_paths_are_matched_as_the_routes_are_under_a_root_path(db_url: str) -> None:
    """Behind ``--root-path`` or a mount, the request's path holds the prefix the app's routes do not:
    a public ``/health`` was answered 401 there (fail-closed, but the app broken)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    h = Harness(db_url)
    inner = build_app(h, deny_by_default=True)  # public: "/"
    with running(Starlette(routes=[Mount("/api", app=inner)])) as url, httpx.Client(base_url=url) as client:
        assert client.get("/api/").json() == {"page": "public"}
        assert client.get("/api/no-dependency").status_code == 401  # still protected
        assert client.get("/api/me", headers=bearer(token("user_rp"))).status_code == 200
    h.store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cors_middleware_added_after_install_answers_preflights_and_a_faked_one_runs_no_view(db_url: str) -> None:
    """A browser's preflight never carries the session: CORS middleware added after ``install()`` (so
    outside the deny-by-default middleware, as the README says) answers it. Inside, any client can send
    the preflight's headers, so deny-by-default refuses them like any other request without a session."""
    from fastapi.middleware.cors import CORSMiddleware

    h = Harness(db_url)

    def app_with(cors_outside: bool) -> FastAPI:
        app = FastAPI()
        if not cors_outside:
            app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"], allow_methods=["*"])
        ClerkAuth(h.auth).install(app, public_paths=())
        if cors_outside:
            app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"], allow_methods=["*"],
                               allow_headers=["authorization"])

        @app.api_route("/export", methods=["GET", "OPTIONS"])
        def export() -> dict[str, str]:
            return {"secret": "every customer"}

        return app

    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    with running(app_with(cors_outside=True)) as url, httpx.Client(base_url=url) as client:
        answer = client.options("/export", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
        assert client.get("/export", headers={"Origin": "https://app.example"}).status_code == 401
    with running(app_with(cors_outside=False)) as url, httpx.Client(base_url=url) as client:
        assert client.options("/export", headers=preflight).status_code == 401  # no view ran for it
    h.store.dispose()


def test_install_protects_the_app_itself_routes_without_a_dependency_included(db_url: str) -> None:
    """Regression (issue 10 #8): serving ``app`` instead of the wrapped ASGI app used to leave every
    route without a dependency open."""
    h = Harness(db_url)
    h.event("user.created", f.user("user_in", 1))
    tok = token("user_in", act={"sub": "user_admin", "sid": "sess_admin"})
    app = build_app(h, deny_by_default=True)
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/").status_code == 200
        r = client.get("/no-dependency")
        assert (r.status_code, r.json()["error"]) == (401, "token_missing")
        assert client.get("/no-dependency", headers=bearer(tok)).status_code == 200
    # Also wrapped by hand (the 0.1 README): one check, one audit row per impersonated request.
    with running(ClerkAuthMiddleware(app, h.auth, public_paths={"/"})) as url, httpx.Client(base_url=url) as client:
        assert client.get("/no-dependency", headers=bearer(tok)).status_code == 200
    with h.store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one() == 2
    h.store.dispose()


def test_handler_checks_stand_without_the_middleware(db_url: str) -> None:
    h = Harness(db_url)
    with running(build_app(h)) as url, httpx.Client(base_url=url) as client:  # no middleware at all
        assert client.get("/me").status_code == 401
        assert client.get("/admin", headers=bearer(token("nobody"))).status_code == 403
    h.store.dispose()


def test_starlette_authentication_backend_scopes(db_url: str) -> None:
    from starlette.applications import Starlette
    from starlette.authentication import requires
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route


    h = Harness(db_url)

    @requires("authenticated")
    async def me(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.user.identity, "scopes": request.auth.scopes})

    @requires("org:admin", status_code=403)
    async def org_admin(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/me", me), Route("/org", org_admin)],
                    middleware=[Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(h.auth))])
    org = {"id": "org_1", "rol": "admin", "slg": "acme", "per": "read", "fpm": "1"}
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/me").status_code == 403  # no token: unauthenticated
        assert client.get("/me", headers=bearer("garbage")).status_code == 400  # invalid token
        r = client.get("/me", headers=bearer(token("user_sb", o=org, fea="o:invoices")))
        assert r.json() == {"user": "user_sb", "scopes": ["authenticated", "org:admin", "org:invoices:read"]}
        assert client.get("/org", headers=bearer(token("user_sb"))).status_code == 403
        assert client.get("/org", headers=bearer(token("user_sb", o=org))).status_code == 200
        h.event("user.created", f.user("user_sb", 1) | {"locked": True})
        r = client.get("/me", headers=bearer(token("user_sb")))
        assert (r.status_code, r.text) == (400, "user_locked")  # Starlette's on_error answer, not a 500
    with running(Starlette(routes=[Route("/me", me)], middleware=[Middleware(
            AuthenticationMiddleware, backend=ClerkAuthBackend(h.auth), on_error=ClerkAuthBackend.on_error)])) as url, \
            httpx.Client(base_url=url) as client:  # the one error table's answers instead
        r = client.get("/me", headers=bearer("garbage"))
        assert (r.status_code, r.json()["error"], r.headers["www-authenticate"]) == (401, "token_malformed", "Bearer")
        r = client.get("/me", headers=bearer(token("user_sb")))
        assert (r.status_code, r.json()["error"]) == (403, "user_locked")
    h.store.dispose()


def test_middleware_finds_the_session_cookie_after_an_unparsable_cookie(harness: tuple[Harness, httpx.Client]) -> None:
    h, client = harness
    h.event("user.created", f.user("user_ck", 1))
    cookie = f'theme={{"a":1}}; __session={token("user_ck")}'
    assert client.get("/me", headers={"Cookie": cookie}).json()["user_id"] == "user_ck"


def test_middleware_uses_the_plain_session_cookie_when_another_app_s_comes_first(
        harness: tuple[Harness, httpx.Client]) -> None:
    """Review finding: the first ``__session*`` cookie won, so another app's suffixed cookie on the same host
    (sent first) signed the visitor out of this one."""
    h, client = harness
    h.event("user.created", f.user("user_sf", 1))
    cookie = f"__session_Ab12Cd34={token('user_elsewhere', iss='https://other.example.test')}; __session={token('user_sf')}"
    assert client.get("/me", headers={"Cookie": cookie}).json()["user_id"] == "user_sf"


def test_blank_session_settings_mean_unset() -> None:
    settings = Settings.from_env({"CLERK_ISSUER": "", "CLERK_JWT_KEY": " ", "CLERK_JWKS_URL": "", "DATABASE_URL": ""})
    assert (settings.clerk_issuer, settings.clerk_jwt_key, settings.clerk_jwks_url) == (None, None, None)
    assert settings.database_url == "sqlite:///clerk_sync.db"


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_deny_list_sees_a_revocation_that_commits_after_a_later_one(db_url: str) -> None:
    """PostgreSQL commits out of insertion order: an incremental refresh must not skip the straggler."""
    from datetime import UTC, datetime

    from clerk_sync.tables import revoked_sessions

    store = Store.from_url(db_url)
    deny = DenyList(store, refresh_s=0)
    deny.refresh()
    now = datetime.now(UTC)
    slow = store.engine.connect()
    slow_tx = slow.begin()
    slow.execute(revoked_sessions.insert().values(session_id="sess_A", reason="revoked", revoked_at=now))
    with store.transaction() as w:
        w.conn.execute(revoked_sessions.insert().values(session_id="sess_B", reason="revoked", revoked_at=now))
    assert deny.is_revoked("sess_B")
    assert not deny.is_revoked("sess_A")  # not committed yet
    slow_tx.commit()
    slow.close()
    assert deny.is_revoked("sess_A")
    store.dispose()


def test_deny_list_forgets_expired_revocations_and_unbanned_users(db_url: str) -> None:
    from datetime import UTC, datetime

    from clerk_sync.tables import revoked_sessions

    h = Harness(db_url)
    deny = DenyList(h.store, refresh_s=0)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    with h.store.transaction() as w:  # (kept past expire_at as long as a token minted before it may live: 7 min)
        for session_id, expire_at in (("sess_old", now_ms - 8 * 60_000), ("sess_recent", now_ms - 1000)):
            w.conn.execute(revoked_sessions.insert().values(session_id=session_id, reason="ended", revoked_at=w.now,
                                                            expire_at=expire_at))
    assert not deny.is_revoked("sess_old")
    assert deny.is_revoked("sess_recent")
    h.event("user.created", f.user("user_ub", 1, banned=True))
    assert deny.is_user_blocked("user_ub")
    h.event("user.updated", f.user("user_ub", 2, banned=False))
    assert not deny.is_user_blocked("user_ub")
    h.store.dispose()


# --- websockets (issue 10 #5: they used to bypass deny-by-default) -----------------------------------------------
def _ws_app(h: Harness) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    async def whoami(ws: WebSocket) -> None:
        await ws.accept()
        auth = ws.scope["clerk_auth"]
        await ws.send_json({"user_id": auth.user_id if auth else None})
        await ws.close()

    inner = Starlette(routes=[WebSocketRoute("/ws", whoami), WebSocketRoute("/public-ws", whoami)])
    return ClerkAuthMiddleware(inner, h.auth, public_paths={"/public-ws"})


def test_websocket_without_a_valid_session_is_refused_before_accept(db_url: str) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    h = Harness(db_url)
    h.event("user.created", f.user("user_ws", 1))
    with running(_ws_app(h)) as url:
        ws_url = url.replace("http://", "ws://")
        for headers in ({}, bearer("garbage")):
            with pytest.raises(InvalidStatus) as refused:
                connect(f"{ws_url}/ws", additional_headers=headers, open_timeout=5)
            assert refused.value.response.status_code == 401  # the HTTP answer, via websocket.http.response
            assert json.loads(refused.value.response.body)["error"] in ("token_missing", "token_malformed")
        with connect(f"{ws_url}/ws", additional_headers=bearer(token("user_ws")), open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5)) == {"user_id": "user_ws"}
        with connect(f"{ws_url}/public-ws", open_timeout=5) as ws:  # declared public: open, no session
            assert json.loads(ws.recv(timeout=5)) == {"user_id": None}
        h.event("user.updated", f.user("user_ws", 2, banned=True))
        with pytest.raises(InvalidStatus):
            connect(f"{ws_url}/ws", additional_headers=bearer(token("user_ws")), open_timeout=5)
    h.store.dispose()


def _ws_backend_app(h: Harness) -> Any:
    """The same socket behind Starlette's AuthenticationMiddleware with ClerkAuthBackend."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.routing import WebSocketRoute

    async def whoami(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json({"user_id": ws.user.identity if ws.user.is_authenticated else None})
        await ws.close()

    return Starlette(routes=[WebSocketRoute("/ws", whoami)], middleware=[Middleware(
        AuthenticationMiddleware, backend=ClerkAuthBackend(h.auth), on_error=ClerkAuthBackend.on_error)])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("integration", [_ws_app, _ws_backend_app], ids=["middleware", "backend"])
def test_a_cookie_websocket_from_a_foreign_origin_is_refused(db_url: str, integration: Any) -> None:
    """Review hardening: browsers attach the __session cookie to cross-site websocket handshakes, so a
    cookie-authenticated handshake must come from an authorized party's origin (ClerkAuthBackend did not
    check: another site could open a socket as the user)."""

    h = Harness(db_url)
    h.event("user.created", f.user("user_wso", 1))
    cookie = {"Cookie": f"__session={token('user_wso')}"}
    with running(integration(h)) as url:
        assert _ws_answer(url, cookie, "https://evil.example") == 403
        assert _ws_answer(url, cookie, AZP) == {"user_id": "user_wso"}
        # a Bearer token is no ambient credential
        assert _ws_answer(url, bearer(token("user_wso")), "https://evil.example") == {"user_id": "user_wso"}
        if integration is _ws_backend_app:  # no session cookie: an anonymous socket (the backend serves it so)
            assert _ws_answer(url, {}, "https://evil.example") == {"user_id": None}
    h.store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_refusal_after_the_handshake_closes_the_websocket_with_its_code(db_url: str) -> None:
    """Review finding: a route that accepts, then checks again per message, turned a refusal into an ASGI
    error (a denial response after accept): "Exception in ASGI application" and the connection dropped without
    a close frame. It closes with 1008 and the refusal's code as the reason."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    h = Harness(db_url)
    h.event("user.created", f.user("user_chat_admin", 1, role="admin"))
    h.event("user.created", f.user("user_chat", 1))
    with running(_fastapi_ws_app(h, deny_by_default=True)) as url:
        chat = f"{url.replace('http://', 'ws://')}/chat"
        with connect(chat, additional_headers=bearer(token("user_chat_admin")), open_timeout=5) as ws:
            ws.send("hi")
            assert json.loads(ws.recv(timeout=5)) == {"from": "user_chat_admin", "said": "hi"}
        with connect(chat, additional_headers=bearer(token("user_chat")), open_timeout=5) as ws:
            ws.send("hi")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "access_denied")
    h.store.dispose()


def _ws_answer(url: str, headers: dict[str, str], origin: str | None) -> Any:
    """What the ``/ws`` handshake from ``origin`` gets: the first message, or the refusal's HTTP status."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(f"{url.replace('http://', 'ws://')}/ws", additional_headers=headers, origin=origin,
                     open_timeout=5) as ws:
            return json.loads(ws.recv(timeout=5))
    except InvalidStatus as refused:
        return refused.response.status_code


def test_without_authorized_parties_a_cookie_websocket_must_come_from_the_sites_own_origin(db_url: str) -> None:
    """Without CLERK_AUTHORIZED_PARTIES there is no list to check a handshake's Origin against: the site's
    own origin (the Host it was sent to) is the one allowed, as for cookie POSTs; a client that sends no
    Origin is no browser (browsers always send it on a handshake) and rides no ambient cookie."""

    h = Harness(db_url, authorized_parties=None)
    h.event("user.created", f.user("user_wss", 1))
    cookie = {"Cookie": f"__session={token('user_wss')}"}
    with running(_ws_app(h)) as url:
        assert _ws_answer(url, cookie, "https://evil.example") == 403
        assert _ws_answer(url, cookie, url) == {"user_id": "user_wss"}
        assert _ws_answer(url, cookie, None) == {"user_id": "user_wss"}  # no Origin: no browser
    h.store.dispose()


@pytest.mark.anyio
async def test_websocket_refusal_without_the_denial_extension_closes_with_1008(tmp_path: Any) -> None:
    """Servers without ``websocket.http.response`` get a close before accept (as Starlette's own
    AuthenticationMiddleware does), with the policy-violation code and our error code as reason."""
    from clerk_sync import migrations

    url = f"sqlite:///{tmp_path / 'ws.db'}"
    migrated = Store.from_url(url)
    migrations.upgrade(migrated.engine)
    migrated.dispose()
    h = Harness(url)
    called: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [], "extensions": {}}
    await ClerkAuthMiddleware(inner, h.auth)(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "token_missing"}]
    assert called == []
    h.store.dispose()


# --- Directory Sync / lockout (issue 10 #7) ----------------------------------------------------------------------
def _set_user_flags(store: Store, clerk_id: str, **flags: bool) -> None:
    """What ``user.updated`` with ``deprovisioned: true`` writes (the event mapping lives in events.py)."""
    from clerk_sync.tables import users

    with store.transaction() as w:
        w.conn.execute(users.update().where(users.c.clerk_id == clerk_id).values(**flags, updated_at=w.now))


def test_deprovisioned_user_gets_403_at_once_and_locked_user_too(db_url: str) -> None:
    h = Harness(db_url)
    frozen = [0.0]  # the deny list refreshes only when this clock moves
    h.auth = Authenticator(h.auth.verifier, h.store, deny_list=DenyList(h.store, refresh_s=60, now=lambda: frozen[0]))
    h.auth.verifier.revocations = h.auth.deny_list
    app = ClerkAuthMiddleware(build_app(h), h.auth, public_paths={"/"})
    h.event("user.created", f.user("user_dp", 1, role="admin"))
    h.event("user.created", f.user("user_lk", 1, role="admin"))
    tok_dp, tok_lk = token("user_dp"), token("user_lk")
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/admin", headers=bearer(tok_dp)).status_code == 200
        assert client.get("/admin", headers=bearer(tok_lk)).status_code == 200
        _set_user_flags(h.store, "user_dp", deprovisioned=True)
        locked = f.user("user_lk", 2, role="admin") | {"locked": True}
        h.event("user.updated", locked)
        # At once: require_role reads the row, the deny list has not refreshed yet.
        for tok, code in ((tok_dp, "user_deprovisioned"), (tok_lk, "user_locked")):
            r = client.get("/admin", headers=bearer(tok))
            assert (r.status_code, r.json()["error"]) == (403, code)
        assert client.get("/me", headers=bearer(tok_dp)).status_code == 200  # token-only route: deny list
        frozen[0] += 60  # its next refresh
        for tok, code in ((tok_dp, "user_deprovisioned"), (tok_lk, "user_locked")):
            r = client.get("/me", headers=bearer(tok))
            assert (r.status_code, r.json()["error"]) == (403, code)
        assert client.get("/", headers=bearer(tok_dp)).status_code == 200  # public pages stay public
        _set_user_flags(h.store, "user_dp", deprovisioned=False)  # re-provisioned
        frozen[0] += 60
        assert client.get("/me", headers=bearer(tok_dp)).status_code == 200
    h.store.dispose()


def test_deny_list_first_load_includes_deprovisioned_and_locked_users(db_url: str) -> None:
    h = Harness(db_url)
    h.event("user.created", f.user("user_a", 1))
    h.event("user.created", f.user("user_b", 1) | {"locked": True})
    _set_user_flags(h.store, "user_a", deprovisioned=True)
    deny = DenyList(h.store)  # a fresh replica: the full first load
    assert (deny.blocked_reason("user_a"), deny.blocked_reason("user_b")) == ("deprovisioned", "locked")
    h.store.dispose()


def test_the_starlette_backend_keeps_anonymous_pages_up_while_the_database_is_down() -> None:
    """Review finding: ClerkAuthBackend read the deny list before looking for a token, so a database
    outage answered 500 to anonymous visitors of public pages."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from clerk_sync.auth.claims import ClaimsValidator
    from clerk_sync.auth.jwks import StaticKeySource
    from clerk_sync.auth.sessions import SessionVerifier
    from clerk_sync.integrations.asgi import ClerkAuthBackend
    from tests._server import running
    from tests.test_sessions import KEY, pem

    down = Store.from_url("postgresql+psycopg://postgres@127.0.0.1:1/nothing_listens")
    authenticator = Authenticator(SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator()), down)
    app = Starlette(routes=[Route("/", lambda _: PlainTextResponse("public home"))],
                    middleware=[Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(authenticator))])
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/").status_code == 200
        assert client.get("/", headers={"Authorization": "Bearer x.y.z"}).status_code == 400  # refused, not a 500
    down.dispose()


def test_two_authorization_headers_are_refused_not_read_two_ways(harness: tuple[Harness, httpx.Client]) -> None:
    """The middleware and the app's dependencies must see one identity: with two Authorization headers the
    middleware read the last and FastAPI the first, so an impersonated token went unaudited."""
    h, client = harness
    impersonated = token("user_x", act={"sub": "user_admin", "sid": "sess_admin"})
    r = client.get("/me", headers=[("Authorization", f"Bearer {impersonated}"),
                                   ("Authorization", f"Bearer {token('user_admin')}")])
    assert (r.status_code, r.json()["error"]) == (401, "token_malformed")
    assert client.get("/me", headers=bearer(impersonated)).json() == {"user_id": "user_x", "impersonated": True}
    with h.store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one() == 1


def test_a_public_prefix_covers_its_segment_only(db_url: str) -> None:
    h = Harness(db_url)
    app = FastAPI()
    ClerkAuth(h.auth).install(app, public_paths=set(), public_prefixes=("/public",))

    @app.get("/public/page")
    def page() -> dict[str, str]:
        return {"page": "public"}

    @app.get("/publicity-admin")
    def admin() -> dict[str, str]:
        return {"page": "admin"}

    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/public/page").status_code == 200
        assert client.get("/publicity-admin").status_code == 401
    h.store.dispose()


def test_a_mounted_apps_deny_by_default_holds_inside_an_outer_apps_public_prefix(db_url: str) -> None:
    """Review finding: an outer app with deny-by-default and ``/partner`` public ("the sub-app decides")
    marked the anonymous request ``clerk_auth = None``, and the mounted app's own middleware took that for
    a decision and let ``/partner/secret`` through (200 with no token). The inner instance decides what is
    public for its own routes; a caller the outer one authenticated is not verified twice."""
    h = Harness(db_url)
    partner = FastAPI()
    ClerkAuth(h.auth).install(partner, public_paths={"/"})

    @partner.get("/")
    def landing() -> dict[str, str]:
        return {"page": "partner landing"}

    @partner.get("/secret")  # no dependency: deny-by-default is all that guards it
    def secret() -> dict[str, str]:
        return {"secret": "partner data"}

    app = FastAPI()
    app.mount("/partner", partner)
    ClerkAuth(h.auth).install(app, public_paths={"/"}, public_prefixes=("/partner",))
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/partner/").json() == {"page": "partner landing"}
        refused = client.get("/partner/secret")
        assert refused.status_code == 401 and refused.json()["error"] == "token_missing"
        forged = client.get("/partner/secret", headers=bearer("not-a-token"))
        assert forged.status_code == 401
        assert client.get("/partner/secret", headers=bearer(token("user_partner"))).json() == {"secret": "partner data"}
    h.store.dispose()


def test_an_impersonation_ends_when_its_admin_is_banned_or_deleted(harness: tuple[Harness, httpx.Client]) -> None:
    """Review finding: the target's session kept working (and writing ``impersonation.request`` rows in the
    admin's name) after the impersonating admin was banned or deleted; only the target was checked."""
    h, client = harness
    h.event("user.created", f.user("user_imp_admin", 1, role="admin"))
    h.event("user.created", f.user("user_imp_target", 1))
    tok = token("user_imp_target", act={"sub": "user_imp_admin", "sid": "sess_imp_admin"})
    assert client.get("/me", headers=bearer(tok)).status_code == 200
    h.event("user.updated", {**f.user("user_imp_admin", 2, role="admin"), "banned": True})
    refused = client.get("/me", headers=bearer(tok))
    assert refused.status_code == 401 and "impersonation has ended" in refused.json()["message"]
    assert client.get("/me", headers=bearer(token("user_imp_target"))).status_code == 200  # their own session
    h.event("user.updated", {**f.user("user_imp_admin", 3, role="admin"), "banned": False})
    assert client.get("/me", headers=bearer(tok)).status_code == 200  # unbanned: the token is valid again
    h.event("user.deleted", f.deleted("user", "user_imp_admin"))
    assert client.get("/me", headers=bearer(tok)).status_code == 401
    dashboard = token("user_imp_target", act={"iss": "https://dashboard.clerk.com", "sub": "user_dashboard_staff"})
    assert client.get("/me", headers=bearer(dashboard)).status_code == 200  # not an app user: never blocked


@pytest.mark.parametrize("values", [("valid", "garbage"), ("garbage", "valid"), ("valid", "other")],
                         ids=["valid-first", "valid-last", "two-users"])
def test_two_values_of_the_session_cookie_are_refused_not_read_two_ways(
        harness: tuple[Harness, httpx.Client], values: tuple[str, str]) -> None:
    """Review finding (cookie tossing): ``__session=<valid>; __session=garbage`` was the last value for
    Starlette and Django but the first for Flask, so one request was 401 on one face and 200 on another."""
    h, client = harness
    h.event("user.created", f.user("user_ct", 1))
    tokens = {"valid": token("user_ct"), "garbage": "garbage", "other": token("user_other")}
    cookie = "; ".join(f"__session={tokens[v]}" for v in values)
    with running(build_app(h)) as url, httpx.Client(base_url=url) as dependency_only:
        for http in (client, dependency_only):  # the middleware, and FastAPI's dependency on its own
            r = http.get("/me", headers={"Cookie": cookie})
            assert (r.status_code, r.json()["error"]) == (401, "token_malformed")
            assert "two different __session cookies" in r.json()["message"]
        same_twice = f"__session={tokens['valid']}; theme=dark; __session={tokens['valid']}"
        assert dependency_only.get("/me", headers={"Cookie": same_twice}).json()["user_id"] == "user_ct"
        quoted_copy = f'__session="{tokens["valid"]}"; __session={tokens["valid"]}'  # the same value to the frameworks
        assert dependency_only.get("/me", headers={"Cookie": quoted_copy}).json()["user_id"] == "user_ct"
    assert client.get("/me", headers={"Cookie": cookie, **bearer(tokens["valid"])}).json()["user_id"] == "user_ct"


@pytest.mark.parametrize("variable", ["CLERK_ISSUER", "CLERK_FRONTEND_API_URL"])
def test_a_configured_issuer_with_a_trailing_slash_accepts_the_tokens_own_iss(variable: str) -> None:
    """Review finding: ``CLERK_ISSUER=https://clerk.example.com/`` refused every valid token (``iss`` has no
    trailing slash and is compared exactly)."""
    from clerk_sync.auth.sessions import verifier_from_settings
    from clerk_sync.errors import ConfigError, TokenIssuerInvalid

    settings = Settings.from_env({variable: f" {ISS}/ ", "CLERK_JWT_KEY": pem(KEY)})
    assert settings.clerk_issuer == ISS
    verifier = verifier_from_settings(settings)
    assert verifier.verify(token("user_iss")).user_id == "user_iss"
    with pytest.raises(TokenIssuerInvalid):
        verifier.verify(token("user_iss", iss="https://evil.example.test"))
    with pytest.raises(ConfigError, match=f"{variable}: must be your Clerk Frontend API URL"):
        Settings.from_env({variable: "/"})


def test_a_banned_or_deleted_user_is_signed_out_whichever_loader_reads_the_row(db_url: str) -> None:
    """Review finding: with the JIT loader (Flask's and Django's default with a secret key) a banned user's
    `require_role` answered 403 `user_banned` and a deleted one's 410, where the table loader (and the
    README) say 401: the status depended on the loader and on the deny list's timing."""
    from clerk_sync.auth.claims import auth_from_claims
    from clerk_sync.auth.users import JitUsers
    from clerk_sync.errors import SessionUserBanned
    from clerk_sync.integrations.http import status_for

    h = Harness(db_url)
    h.event("user.created", f.user("user_jb", 1, role="admin"))
    h.event("user.created", f.user("user_jd", 1, role="admin"))
    h.event("user.updated", {**f.user("user_jb", 2, role="admin"), "banned": True})
    h.event("user.deleted", f.deleted("user", "user_jd"))
    jit = Authenticator(h.auth.verifier, h.store, deny_list=DenyList(h.store, refresh_s=3600),
                        load_user=JitUsers(h.store).get_auth_user)
    for user_id in ("user_jb", "user_jd"):
        auth = auth_from_claims({"sub": user_id, "sid": f"sess_{user_id}", "exp": int(time.time()) + 60})
        for authenticator in (h.auth, jit):
            with pytest.raises(SessionUserBanned) as refused:
                authenticator.require_role(auth, "admin")
            assert status_for(refused.value) == 401
    h.store.dispose()


def test_the_webhook_path_with_a_trailing_slash_is_served_on_fastapi_behind_deny_by_default(db_url: str) -> None:
    """Review finding (of the trailing-slash fix): FastAPI's `webhook_router` still answered 307 for
    ``/webhooks/clerk/``, and deny-by-default refused it (401) with ``/webhooks/clerk`` listed public."""
    from clerk_sync.integrations.fastapi import webhook_router

    h = Harness(db_url)
    app = FastAPI()
    app.include_router(webhook_router(h.processor))
    ClerkAuth(h.auth).install(app, public_paths={"/", "/webhooks/clerk"})
    with running(app) as url, httpx.Client(base_url=url) as client:
        for n, path in enumerate(("/webhooks/clerk", "/webhooks/clerk/")):
            headers, body = f.signed(f.envelope("user.created", f.user(f"user_slash{n}", 1)), f"msg_slash{n}")
            served = client.post(path, content=body, headers=headers)
            assert (served.status_code, served.json()["status"]) == (200, "applied"), path
        assert client.get("/webhooks/clerk//").status_code == 401  # only the one twin is public
    h.store.dispose()


def test_current_user_with_the_jit_getter_signs_a_banned_or_deleted_user_out(db_url: str) -> None:
    """Review finding: `current_user` with the README's JIT getter answered 410/403 for a deleted or banned
    user where `require_role` answered 401."""
    from clerk_sync.auth.users import JitUsers

    h = Harness(db_url)
    h.event("user.created", f.user("user_cb", 1))
    h.event("user.created", f.user("user_cd", 1))
    jit = JitUsers(h.store)
    # the deny list loaded before the ban and deletion (its next refresh an hour away): the row decides
    clerk = ClerkAuth(Authenticator(h.auth.verifier, h.store, deny_list=DenyList(h.store, refresh_s=3600)),
                      get_user=lambda a: jit.get_auth_user(a.user_id))
    app = FastAPI()
    clerk.install(app, public_paths=(), deny_by_default=False)  # the error table only

    @app.get("/me")
    async def me(user: AuthUser = Depends(clerk.current_user)) -> dict[str, str]:
        return {"id": user.clerk_id}

    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/me", headers=bearer(token("user_cb"))).json() == {"id": "user_cb"}
        h.event("user.updated", {**f.user("user_cb", 2), "banned": True})
        h.event("user.deleted", f.deleted("user", "user_cd"))
        for user_id in ("user_cb", "user_cd"):
            refused = client.get("/me", headers=bearer(token(user_id)))
            assert (refused.status_code, refused.json()["error"]) == (401, "session_user_banned"), user_id
    h.store.dispose()


def test_a_ban_committed_long_after_its_transaction_began_is_seen_by_the_next_full_reload(db_url: str) -> None:
    """Review finding: refreshes read the users changed since the last one minus a 60 s margin, keyed on the
    writing transaction's start; a ban whose transaction committed later than that (database timeouts
    disabled, a long lock wait) was missed until a restart. Every ``full_every_s`` a refresh reads all."""
    from datetime import UTC, datetime, timedelta

    from clerk_sync.tables import users

    h = Harness(db_url)
    h.event("user.created", f.user("user_late_ban", 1))
    clock = [0.0]
    deny = DenyList(h.store, refresh_s=0, margin_s=60, full_every_s=600, now=lambda: clock[0])
    deny.refresh()
    assert deny.blocked_reason("user_late_ban") is None
    began = datetime.now(UTC) - timedelta(minutes=5)  # the ban's transaction began five minutes ago
    with h.store.transaction() as w:
        w.conn.execute(users.update().where(users.c.clerk_id == "user_late_ban").values(banned=True, updated_at=began))
    clock[0] = 1.0
    assert deny.blocked_reason("user_late_ban") is None  # the incremental refresh cannot see it
    clock[0] = 601.0
    assert deny.blocked_reason("user_late_ban") == "banned"  # the full reload does
    with h.store.transaction() as w:  # and an unban the same way (a full reload drops what is no longer true)
        w.conn.execute(users.update().where(users.c.clerk_id == "user_late_ban").values(banned=False, updated_at=began))
    clock[0] = 1202.0
    assert deny.blocked_reason("user_late_ban") is None
    h.store.dispose()


def test_a_revocation_outlives_its_sessions_expiry_for_as_long_as_a_token_may(
        harness: tuple[Harness, httpx.Client]) -> None:
    """Review: the deny list dropped a revoked session once its ``expire_at`` passed, but a token minted just
    before it lives its 60 s (and the leeway) after: it was accepted again, revoked. Nothing says Clerk caps a
    token's ``exp`` at its session's expiry."""
    h, client = harness
    h.event("user.created", f.user("user_x", 1))
    tok = token("user_x")  # valid for another 60 s
    expired = int(time.time() * 1000) - 30_000  # the session expired 30 s ago
    h.event("session.revoked", {"id": "sess_user_x", "object": "session", "user_id": "user_x", "status": "revoked",
                                "expire_at": expired})
    r = client.get("/me", headers=bearer(tok))
    assert (r.status_code, r.json()["error"]) == (401, "session_revoked"), r.text


def _fastapi_ws_app(h: Harness, *, deny_by_default: bool) -> Any:
    """FastAPI websocket routes guarded by ClerkAuth's dependencies (HTTP routes' dependencies, as the docs
    show them), with or without the deny-by-default middleware in front."""
    clerk = ClerkAuth(h.auth)
    app = FastAPI()
    clerk.install(app, public_paths={"/"}, deny_by_default=deny_by_default)

    @app.websocket("/ws")
    async def whoami(ws: WebSocket, auth: Auth = Depends(clerk.current_auth)) -> None:
        await ws.accept()
        await ws.send_json({"user_id": auth.user_id})
        await ws.close()

    @app.websocket("/admin-ws")
    async def admin(ws: WebSocket, user: AuthUser = Depends(clerk.require_role("admin"))) -> None:
        await ws.accept()
        await ws.send_json({"admin": user.clerk_id})
        await ws.close()

    @app.websocket("/chat")
    async def chat(ws: WebSocket) -> None:  # accepted for any session; each message checked again
        await ws.accept()
        while True:
            said = await ws.receive_text()
            user = await clerk.require_role("admin")(ws)
            await ws.send_json({"from": user.clerk_id, "said": said})

    return app


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("deny_by_default", [False, True], ids=["dependencies-only", "behind-the-middleware"])
def test_fastapi_dependencies_guard_websocket_routes(db_url: str, deny_by_default: bool) -> None:
    """Review finding: every ClerkAuth dependency took a ``Request``, which FastAPI fills on HTTP routes only: on
    a websocket route each raised TypeError (a 500), even for a handshake the middleware had let through. They
    take the connection now: a session is verified (a cookie handshake from another site refused), a refusal
    denies the handshake with its HTTP answer."""
    h = Harness(db_url)
    h.event("user.created", f.user("user_fws", 1))
    h.event("user.created", f.user("user_fadm", 1, role="admin"))
    with running(_fastapi_ws_app(h, deny_by_default=deny_by_default)) as url:
        assert _ws_answer(url, bearer(token("user_fws")), None) == {"user_id": "user_fws"}
        assert _ws_answer(url, {}, None) == 401
        assert _ws_answer(url, {"Cookie": f"__session={token('user_fws')}"}, "https://evil.example") == 403
        assert _ws_answer(url, {"Cookie": f"__session={token('user_fws')}"}, AZP) == {"user_id": "user_fws"}
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        admin_ws = f"{url.replace('http://', 'ws://')}/admin-ws"
        with pytest.raises(InvalidStatus) as refused:
            connect(admin_ws, additional_headers=bearer(token("user_fws")), open_timeout=5)
        assert refused.value.response.status_code == 403
        with connect(admin_ws, additional_headers=bearer(token("user_fadm")), open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5)) == {"admin": "user_fadm"}
    h.store.dispose()
