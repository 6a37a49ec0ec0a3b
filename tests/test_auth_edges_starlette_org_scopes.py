"""Starlette's ``ClerkAuthBackend`` and organization roles (security review, session 2026-12-05): the backend
granted the scope ``org:<role>`` from the session token alone, so ``@requires("org:admin")`` let a member
demoted or removed since the token was minted through until it expired, where every other face's org-role
guard confirms the role against ``organization_memberships`` (``confirm_org_role``). Now the scope is granted
only once confirmed (no row yet: the token stands, as the guards judge it), and so are the permission scopes
(see ``tests/test_org_standing_permissions.py``). One indexed read per request with an active organization role,
none for the others; a database outage is a 503, not a demotion."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clerk_sync.errors import StoreError
from clerk_sync.integrations.asgi import ClerkAuthBackend
from tests import factories as f
from tests._server import running
from tests.test_auth import Harness, token

ORG = {"id": "org_1", "rol": "admin", "slg": "acme", "per": "read", "fpm": "1"}
FEATURES = "o:invoices"  # with ``per``/``fpm`` above: the permission org:invoices:read


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    yield h
    h.store.dispose()


def org_scopes_app(h: Harness) -> Starlette:
    """``/org-admin`` (``@requires("org:admin")``), ``/scopes`` and ``/who`` (the session's org role) behind
    ``ClerkAuthBackend`` on ``h``."""
    @requires("org:admin")
    async def org_admin(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    @requires("authenticated")
    async def scopes(request: Request) -> JSONResponse:
        return JSONResponse({"scopes": list(request.auth.scopes)})

    @requires("authenticated")
    async def who(request: Request) -> JSONResponse:
        return JSONResponse({"org_role": request.user.auth.org_role})

    return Starlette(routes=[Route("/org-admin", org_admin), Route("/scopes", scopes), Route("/who", who)],
                     middleware=[Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(h.auth),
                                            on_error=ClerkAuthBackend.on_error)])


@contextmanager
def _client(h: Harness) -> Iterator[httpx.Client]:
    """The app on a real server on loopback (the worker threads, the event loop)."""
    app = org_scopes_app(h)
    with running(app) as url, httpx.Client(base_url=url) as client:
        yield client


def _get(client: httpx.Client, path: str, tok: str) -> Any:
    return client.get(path, headers={"authorization": f"Bearer {tok}"})


def test_the_org_role_scope_is_confirmed_against_the_database(harness: Harness) -> None:
    h, now = harness, int(time.time() * 1000)
    for user in ("user_kept", "user_demoted", "user_removed", "user_late"):
        h.event("user.created", f.user(user, now))
    for i, user in enumerate(("user_kept", "user_demoted", "user_removed")):
        h.event("organizationMembership.created", f.membership(f"orgmem_{i}", "org_1", user, now, role="org:admin"))
    # each token minted as an org admin; then one demoted, one removed (webhooks applied), one's row not arrived
    tokens = {user: token(user, o=ORG, fea=FEATURES)
              for user in ("user_kept", "user_demoted", "user_removed", "user_late")}
    h.event("organizationMembership.updated", f.membership("orgmem_1", "org_1", "user_demoted", now + 1000))
    h.event("organizationMembership.deleted", f.membership("orgmem_2", "org_1", "user_removed", now + 1000,
                                                           role="org:admin"))
    with _client(h) as client:
        for user in ("user_kept", "user_late"):  # confirmed; no row yet: the token stands
            assert _get(client, "/org-admin", tokens[user]).status_code == 200, user
            assert _get(client, "/scopes", tokens[user]).json()["scopes"] == [
                "authenticated", "org:admin", "org:invoices:read"]
        for user in ("user_demoted", "user_removed"):
            assert _get(client, "/org-admin", tokens[user]).status_code == 403, user
            # still signed in; no permission scope: removed, or the row's new role does not list the token's
            # (tests/test_org_standing_permissions.py tells the rest of that story)
            assert _get(client, "/scopes", tokens[user]).json()["scopes"] == ["authenticated"]
        h.event("organizationMembership.updated", f.membership("orgmem_1", "org_1", "user_demoted", now + 2000,
                                                               role="org:admin"))  # promoted back
        assert _get(client, "/org-admin", tokens["user_demoted"]).status_code == 200


def test_a_request_without_an_org_role_reads_no_membership_and_an_outage_is_a_503(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h, now = harness, int(time.time() * 1000)
    h.event("user.created", f.user("user_m", now))
    h.event("organizationMembership.created", f.membership("orgmem_1", "org_1", "user_m", now, role="org:admin"))
    confirmed: list[str | None] = []
    confirm = h.auth.standing_org_role

    def spy(auth: Any) -> Any:
        confirmed.append(auth.org_role)
        return confirm(auth)

    monkeypatch.setattr(h.auth, "standing_org_role", spy)
    with _client(h) as client:
        assert _get(client, "/scopes", token("user_m")).json()["scopes"] == ["authenticated"]
        assert confirmed == []  # no active organization: nothing to confirm, no read
        assert _get(client, "/org-admin", token("user_m", o=ORG)).status_code == 200
        assert confirmed == ["org:admin"]

        def down(auth: Any) -> Any:
            raise StoreError("database unavailable")

        monkeypatch.setattr(h.auth, "standing_org_role", down)
        answer = _get(client, "/scopes", token("user_m", o=ORG))
        assert (answer.status_code, answer.json()["error"]) == (503, StoreError.code)  # not taken for a demotion
        assert "retry-after" in answer.headers


def test_request_user_shows_the_databases_org_role_not_the_tokens(harness: Harness) -> None:
    """``request.user.auth.org_role`` was the token's: a view reading it saw a demoted admin as ``org:admin``
    (and a removed member as still one) until the token expired, while ``@requires`` refused them. It is the
    database's role now (None once the membership is deleted); no row yet, the token's."""
    h, now = harness, int(time.time() * 1000)
    for user in ("user_kept", "user_demoted", "user_removed", "user_late"):
        h.event("user.created", f.user(user, now))
    for i, user in enumerate(("user_kept", "user_demoted", "user_removed")):
        h.event("organizationMembership.created", f.membership(f"orgmem_{i}", "org_1", user, now, role="org:admin"))
    tokens = {user: token(user, o=ORG) for user in ("user_kept", "user_demoted", "user_removed", "user_late")}
    h.event("organizationMembership.updated", f.membership("orgmem_1", "org_1", "user_demoted", now + 1000))
    h.event("organizationMembership.deleted", f.membership("orgmem_2", "org_1", "user_removed", now + 1000,
                                                           role="org:admin"))
    with _client(h) as client:
        seen = {user: _get(client, "/who", tok).json()["org_role"] for user, tok in tokens.items()}
    assert seen == {"user_kept": "org:admin", "user_demoted": "org:member", "user_removed": None,
                    "user_late": "org:admin"}
