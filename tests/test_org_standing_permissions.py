"""What every face shows the app of a session's organization is the database's, not the token's (security
review, 2026-12-05): a member removed from the organization kept the token's ``org_id``/``org_role``/
``org_permissions`` in Starlette's ``request.user.auth`` (and its permission scopes), FastAPI's ``current_auth``,
Flask's ``current_clerk``, Django's ``request.clerk.auth`` and DRF's ``request.auth`` until the token expired, and
``require_permission`` on every face passed on the token alone. Now a removed member has no active organization,
no role, no permissions; a member whose role changed has the database's role and only the token's permissions
that the membership row (the webhook that changed the role) also lists; an unchanged member keeps the token's.

Real servers on loopback, real tokens and webhooks from the emulator (whose roles grant custom permissions);
Django's faces in ``tests/django/test_org_standing_permissions.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from flask import Flask
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.config import Settings
from clerk_sync.emulator.config import DEFAULT_ROLE_PERMISSIONS
from clerk_sync.integrations.asgi import ClerkAuthBackend
from clerk_sync.integrations.fastapi import ClerkAuth, webhook_router
from clerk_sync.integrations.flask import ClerkSync, clerk_state, current_clerk, require_permission
from clerk_sync.integrations.starlette import build_processor, webhook_routes
from clerk_sync.testing import EmulatorServer
from tests._flask import running_wsgi
from tests._server import free_port, running
from tests.test_org_role_confirmed import bearer, emulator_env

READ, MANAGE = "org:invoices:read", "org:invoices:manage"
#: The emulator's roles, with custom permissions: an admin may read and manage invoices, a member read them.
ROLE_PERMISSIONS = {"org:admin": (*DEFAULT_ROLE_PERMISSIONS["org:admin"], READ, MANAGE),
                    "org:member": (*DEFAULT_ROLE_PERMISSIONS["org:member"], READ)}

Get = Callable[[str, str], Any]  # (path, token) -> a response with .status_code and .json()


def emulator(port: int, *, token_version: int = 2) -> EmulatorServer:
    return EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk", rate_limit_requests=1000,
                          role_permissions=ROLE_PERMISSIONS, session_token_version=token_version)


def seen(auth: Auth) -> dict[str, Any]:
    """What a view answers: the session's organization as the face shows it."""
    return {"org_id": auth.org_id, "org_slug": auth.org_slug, "org_role": auth.org_role,
            "permissions": sorted(auth.org_permissions)}


def standing_scenario(clerk: EmulatorServer, get: Get) -> None:
    """The story every face must tell. ``/who`` answers :func:`seen` of the auth the face shows the view;
    ``/read`` and ``/manage`` are guarded by the face's permission guard on ``READ`` and ``MANAGE``.

    Four members, each with a token minted before anything changes: one kept, one demoted (admin to member),
    one promoted (member to admin), one removed; webhooks applied, the same tokens asked again."""
    owner = clerk.create_user("owner@example.com")
    org = clerk.create_organization("Acme", created_by=owner["id"])
    members = {name: clerk.create_user(f"{name}@example.com")["id"] for name in ("kept", "demoted", "promoted",
                                                                                 "removed")}
    for name, user_id in members.items():
        clerk.add_membership(org["id"], user_id, role="org:member" if name == "promoted" else "org:admin")
    clerk.wait_for_deliveries()
    tokens = {name: clerk.mint_session_token(user_id, org_id=org["id"]) for name, user_id in members.items()}
    as_admin = {"org_id": org["id"], "org_slug": org["slug"], "org_role": "org:admin", "permissions": [MANAGE, READ]}
    as_member = {**as_admin, "org_role": "org:member", "permissions": [READ]}
    for name, tok in tokens.items():  # before: the token's, confirmed
        assert get("/who", tok).json() == (as_member if name == "promoted" else as_admin), name
        assert get("/read", tok).status_code == 200, name
        assert get("/manage", tok).status_code == (403 if name == "promoted" else 200), name

    for name, role in (("demoted", "org:member"), ("promoted", "org:admin")):
        clerk.request("PATCH", f"/v1/organizations/{org['id']}/memberships/{members[name]}", json={"role": role})
    clerk.request("DELETE", f"/v1/organizations/{org['id']}/memberships/{members['removed']}")
    clerk.wait_for_deliveries()

    after = {name: get("/who", tok).json() for name, tok in tokens.items()}
    assert after == {
        "kept": as_admin,  # unchanged: the token's permissions stand
        "demoted": as_member,  # the member's role; the admin's MANAGE gone, READ (both roles grant it) kept
        "promoted": {**as_member, "org_role": "org:admin"},  # the admin's role; MANAGE waits for a new token
        "removed": {"org_id": None, "org_slug": None, "org_role": None, "permissions": []},
    }
    statuses = {name: (get("/read", tok).status_code, get("/manage", tok).status_code)
                for name, tok in tokens.items()}
    assert statuses == {"kept": (200, 200), "demoted": (200, 403), "promoted": (200, 403), "removed": (403, 403)}
    fresh = clerk.mint_session_token(members["promoted"], org_id=org["id"])  # a new token carries MANAGE
    assert (get("/who", fresh).json(), get("/manage", fresh).status_code) == (as_admin, 200)


# -- FastAPI -------------------------------------------------------------------------------------
def fastapi_app(settings: Settings) -> tuple[FastAPI, Callable[[], None]]:
    processor = build_processor(settings)
    authenticator = Authenticator(verifier_from_settings(settings), processor.store,
                                  deny_list=DenyList(processor.store, refresh_s=0))
    clerk = ClerkAuth(authenticator)
    app = FastAPI()
    clerk.install(app, public_paths={"/webhooks/clerk"})
    app.include_router(webhook_router(processor))

    @app.get("/who")
    async def who(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
        return seen(auth)

    @app.get("/read")
    def read(auth: Auth = Depends(clerk.require_permission(READ))) -> dict[str, Any]:
        return seen(auth)

    @app.get("/manage")
    async def manage(auth: Auth = Depends(clerk.require_permission(MANAGE))) -> dict[str, Any]:
        return seen(auth)

    return app, processor.store.dispose


@pytest.mark.parametrize("token_version", [2, 1], ids=["v2-tokens", "v1-tokens"])
def test_fastapi_shows_and_guards_on_the_standing_membership(db_url: str, token_version: int) -> None:
    """(v1 tokens too: their top-level ``org_permissions``, as an instance not yet on v2 issues them.)"""
    port = free_port()
    with emulator(port, token_version=token_version) as clerk:
        app, dispose = fastapi_app(Settings.from_env(emulator_env(clerk, db_url)))
        try:
            with running(app, port=port) as url, httpx.Client(base_url=url, timeout=30) as http:
                standing_scenario(clerk, lambda path, tok: http.get(path, headers=bearer(tok)))
        finally:
            dispose()


# -- Starlette's AuthenticationBackend -----------------------------------------------------------
def test_starlette_backend_shows_and_scopes_the_standing_membership(db_url: str) -> None:
    """``request.user.auth`` and the permission scopes (``@requires(READ)``) are the standing ones."""
    port = free_port()
    with emulator(port) as clerk:
        settings = Settings.from_env(emulator_env(clerk, db_url))
        processor = build_processor(settings)
        store = processor.store
        authenticator = Authenticator(verifier_from_settings(settings), store, deny_list=DenyList(store, refresh_s=0))

        @requires("authenticated")
        async def who(request: Request) -> JSONResponse:
            return JSONResponse(seen(request.user.auth))

        def guarded(permission: str) -> Callable[[Request], Any]:
            @requires(permission)
            async def view(request: Request) -> JSONResponse:
                assert permission in request.auth.scopes
                return JSONResponse(seen(request.user.auth))

            return view

        protected = Starlette(routes=[Route("/who", who), Route("/read", guarded(READ)),
                                      Route("/manage", guarded(MANAGE))],
                              middleware=[Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(authenticator),
                                                     on_error=ClerkAuthBackend.on_error)])
        app = Starlette(routes=[*webhook_routes(processor), Mount("/", protected)])
        try:
            with running(app, port=port) as url, httpx.Client(base_url=url, timeout=30) as http:
                standing_scenario(clerk, lambda path, tok: http.get(path, headers=bearer(tok)))
        finally:
            store.dispose()


# -- Flask ---------------------------------------------------------------------------------------
def test_flask_shows_and_guards_on_the_standing_membership(db_url: str) -> None:
    port = free_port()
    with emulator(port) as clerk:
        app = Flask(__name__)
        app.config["CLERK_SYNC"] = emulator_env(clerk, db_url)
        ClerkSync(app, deny_by_default=True, revocation_refresh_s=0)

        @app.get("/who")
        def who() -> dict[str, Any]:
            return seen(current_clerk)

        @app.get("/read")
        @require_permission(READ)
        def read() -> dict[str, Any]:
            return seen(current_clerk)

        @app.get("/manage")
        @require_permission(MANAGE)
        def manage() -> dict[str, Any]:
            return seen(current_clerk)

        try:
            with running_wsgi(app, port) as url, httpx.Client(base_url=url, timeout=30) as http:
                standing_scenario(clerk, lambda path, tok: http.get(path, headers=bearer(tok)))
        finally:
            clerk_state(app).close()
