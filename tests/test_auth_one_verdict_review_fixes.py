"""Review of this session's auth changes: two regressions of "one verdict a request".

- An outer ``ClerkAuthMiddleware``'s refusal on its public prefix was raised by a mounted app's own middleware
  holding another authenticator (another authorized party, another instance), which would have accepted the
  session: only a layer with the same authenticator takes over a refusal now (``refusal_of``).
- ``ClerkAuthBackend`` wrote the database's organization role into ``scope["clerk_auth"]``, so FastAPI's
  ``require_org_role`` judged the token against the database's role: a member promoted in the database whose
  token still said ``org:member`` passed an ``org:admin`` guard (and a demoted admin one asking for their new
  role). The scope keeps the token's; only ``request.user.auth`` shows the database's role."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from clerk_sync import migrations
from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth, ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.integrations.asgi import ClerkAuthBackend, ClerkAuthMiddleware
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.store import create_engine
from tests import factories as f
from tests._server import running
from tests.test_auth import Harness, token
from tests.test_sessions import ISS, KEY, pem


def _harness(tmp_path: Path) -> Harness:
    url = f"sqlite:///{tmp_path / 'verdict.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return Harness(url)


def test_a_mounted_app_with_its_own_authenticator_judges_a_session_the_outer_one_refused(tmp_path: Path) -> None:
    h = _harness(tmp_path)
    h.event("user.created", f.user("user_a", int(time.time() * 1000)))
    admin_site = "https://admin.example.com"  # the mounted app's only authorized party, not the outer one's
    inner = Authenticator(SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(
        issuer=ISS, authorized_parties=frozenset({admin_site}))), h.store, deny_list=DenyList(h.store, refresh_s=0))

    async def who(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.scope["clerk_auth"].user_id})

    sub = Starlette(routes=[Route("/who", who)], middleware=[Middleware(ClerkAuthMiddleware, authenticator=inner)])
    app = Starlette(routes=[Mount("/admin", app=sub), Route("/who", who)],
                    middleware=[Middleware(ClerkAuthMiddleware, authenticator=h.auth, public_prefixes=["/admin"])])
    bearer = {"authorization": f"Bearer {token('user_a', azp=admin_site)}"}
    with running(app) as url, httpx.Client(base_url=url) as client:
        answer = client.get("/admin/who", headers=bearer)
        assert (answer.status_code, answer.json()) == (200, {"user": "user_a"})
        assert client.get("/who", headers=bearer).status_code == 401  # the outer app's own path: its verdict
    h.store.dispose()


def test_a_mounted_app_with_its_own_authenticator_refuses_a_session_the_outer_one_accepted(tmp_path: Path) -> None:
    """Review: the acceptance direction of the case above. A mounted app whose authenticator allows only its own
    authorized party passed a session the outer one accepted (for another party) straight through to its views."""
    h = _harness(tmp_path)
    h.event("user.created", f.user("user_a", int(time.time() * 1000)))
    inner = Authenticator(SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(
        issuer=ISS, authorized_parties=frozenset({"https://admin.example.com"}))), h.store,
        deny_list=DenyList(h.store, refresh_s=0))

    async def who(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.scope["clerk_auth"].user_id})

    sub = Starlette(routes=[Route("/who", who)], middleware=[Middleware(ClerkAuthMiddleware, authenticator=inner)])
    app = Starlette(routes=[Mount("/admin", app=sub), Route("/who", who)],
                    middleware=[Middleware(ClerkAuthMiddleware, authenticator=h.auth)])
    bearer = {"authorization": f"Bearer {token('user_a')}"}  # the outer app's own party
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/who", headers=bearer).status_code == 200
        refused = client.get("/admin/who", headers=bearer)
        assert (refused.status_code, refused.json()["error"]) == (401, "token_invalid_authorized_parties")
    h.store.dispose()


def _app(h: Harness, *, backend: bool) -> FastAPI:
    clerk = ClerkAuth(h.auth)
    app = FastAPI()
    clerk.install(app, public_paths={"/"}, deny_by_default=False)
    if backend:
        app.add_middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(h.auth),
                           on_error=ClerkAuthBackend.on_error)

    @app.get("/org-admin")
    async def org_admin(auth: Auth = Depends(clerk.require_org_role("org:admin"))) -> dict[str, Any]:
        return {"role": auth.org_role}

    @app.get("/org-member")
    async def org_member(auth: Auth = Depends(clerk.require_org_role("org:member"))) -> dict[str, Any]:
        return {"role": auth.org_role}

    return app


def test_fastapis_org_role_guard_judges_the_token_first_behind_the_starlette_backend_too(tmp_path: Path) -> None:
    h = _harness(tmp_path)
    now = int(time.time() * 1000)
    for user, role in (("user_promoted", "org:member"), ("user_demoted", "org:admin")):
        h.event("user.created", f.user(user, now))
        h.event("organizationMembership.created", f.membership(f"orgmem_{user}", "org_1", user, now, role=role))
    tokens = {"user_promoted": token("user_promoted", o={"id": "org_1", "rol": "member", "slg": "acme"}),
              "user_demoted": token("user_demoted", o={"id": "org_1", "rol": "admin", "slg": "acme"})}
    h.event("organizationMembership.updated", f.membership("orgmem_user_promoted", "org_1", "user_promoted", now + 1,
                                                           role="org:admin"))
    h.event("organizationMembership.updated", f.membership("orgmem_user_demoted", "org_1", "user_demoted", now + 1,
                                                           role="org:member"))
    seen: dict[bool, list[int]] = {}
    for backend in (False, True):
        with running(_app(h, backend=backend)) as url, httpx.Client(base_url=url) as client:
            seen[backend] = [client.get(path, headers={"authorization": f"Bearer {tokens[user]}"}).status_code
                             for user, path in (("user_promoted", "/org-admin"), ("user_demoted", "/org-member"))]
    # a token's role and the database's must both allow it: each waits for a new token, with or without the backend
    assert seen == {False: [403, 403], True: [403, 403]}
    h.store.dispose()
