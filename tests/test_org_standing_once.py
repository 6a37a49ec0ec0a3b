"""The session's organization as ``organization_memberships`` has it, read once a request and believed only when
it is no older than the token (review of the standing-membership work, 2026-12-06):

- a membership row is only as fresh as its last webhook, and Svix retries a failing delivery for about a day: a
  row written before the token was issued (``clerk_updated_at`` < ``iat``) no longer overrode the newer token
  (a late demotion showed ``org:admin``; a late promotion refused a new admin token 403). A deletion still wins;
- FastAPI read the membership twice on a route with an org guard and ``current_auth`` (and Flask with two org
  guards); ``not_impersonated`` returns the standing too (a removed member's view got the token's organization
  back from it, review 3 M2), its refusal judged from the token alone;
- while the database is down, the read answers 503 on FastAPI and Flask (Django's in
  ``tests/django/test_org_standing_once.py``).

Real servers on loopback, real tokens; statements counted on the store's engine."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from flask import Flask
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware

from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth, ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.errors import AccessDenied, StoreError
from clerk_sync.integrations.asgi import ClerkAuthBackend
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.integrations.flask import ClerkSync, clerk_state, current_clerk, require_org_role, require_permission
from clerk_sync.store import Store
from tests import factories as f
from tests._flask import running_wsgi
from tests._reads import membership_reads
from tests._server import free_port, running, unreachable_engine
from tests.test_auth import Harness, token
from tests.test_org_role_confirmed import bearer, emulator_env
from tests.test_org_standing_permissions import MANAGE, READ, emulator, seen
from tests.test_sessions import AZP, ISS, KEY, pem

ORG, MEMBER = "org_s", "user_s"


def _token(role: str, *permissions: str) -> str:
    return token(MEMBER, v=1, org_id=ORG, org_role=role, org_slug="acme", org_permissions=list(permissions))


def _row(h: Harness, role: str, updated_ms: int, *permissions: str, mem_id: str = "orgmem_s") -> None:
    data = f.membership(mem_id, ORG, MEMBER, updated_ms, role=role)
    data["permissions"] = list(permissions)
    h.event("organizationMembership.updated" if h.n else "organizationMembership.created", data)


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    yield h
    h.store.dispose()


def _authenticator(store: Store) -> Authenticator:
    """An authenticator whose deny list, once read, is not read again for the test (so a database taken down
    is met by the membership read, not by the deny list's refresh)."""
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS, authorized_parties=frozenset({AZP})))
    return Authenticator(verifier, store, deny_list=DenyList(store, refresh_s=3600))



@contextmanager
def database_down(store: Store, db_url: str, tmp_path: Path) -> Iterator[None]:
    up = store.engine
    store.engine = unreachable_engine(db_url, tmp_path)
    try:
        with pytest.raises(StoreError):  # really down
            store.ping()
        yield
    finally:
        store.engine.dispose()
        store.engine = up


# -- M3: a row older than the token does not override it --------------------------------------------------
def test_a_late_demotion_webhook_does_not_override_a_newer_member_token(harness: Harness) -> None:
    h = harness
    now_ms = int(time.time()) * 1000
    _row(h, "org:admin", now_ms - 60_000, READ, MANAGE)  # the row: admin, a minute before the token
    member = h.auth.authenticate({"authorization": f"Bearer {_token('org:member', READ)}"}, {})  # a member since
    standing = h.auth.standing_org_role(member)
    assert (standing.org_role, standing.org_permissions) == ("org:member", (READ,))
    with pytest.raises(AccessDenied):
        h.auth.confirm_org_role(member, "org:admin")
    assert h.auth.confirm_org_role(member, "org:member").org_role == "org:member"


def test_a_late_promotion_webhook_does_not_refuse_a_newer_admin_token(harness: Harness) -> None:
    h = harness
    _row(h, "org:member", int(time.time()) * 1000 - 60_000, READ)
    admin = h.auth.authenticate({"authorization": f"Bearer {_token('org:admin', READ, MANAGE)}"}, {})
    assert h.auth.standing_org_role(admin) is admin  # the token's role and permissions
    assert h.auth.confirm_org_role(admin, "org:admin") is admin
    assert h.auth.confirm_permission(admin, MANAGE) is admin


def test_a_row_newer_than_the_token_still_wins(harness: Harness) -> None:
    h = harness
    admin = h.auth.authenticate({"authorization": f"Bearer {_token('org:admin', READ, MANAGE)}"}, {})
    _row(h, "org:member", int(admin.claims["iat"]) * 1000 + 1_000, READ)  # demoted after the token was issued
    standing = h.auth.standing_org_role(admin)
    assert (standing.org_role, standing.org_permissions) == ("org:member", (READ,))
    with pytest.raises(AccessDenied, match="no older than the session token"):
        h.auth.confirm_org_role(admin, "org:admin")
    with pytest.raises(AccessDenied, match="no older than the session token"):
        h.auth.confirm_permission(admin, MANAGE)


def test_a_deletion_wins_whatever_its_time(harness: Harness) -> None:
    h = harness
    _row(h, "org:admin", int(time.time()) * 1000 - 60_000, READ, MANAGE)
    h.event("organizationMembership.deleted", f.deleted("organization_membership", "orgmem_s"))
    admin = h.auth.authenticate({"authorization": f"Bearer {_token('org:admin', READ, MANAGE)}"}, {})
    assert h.auth.standing_org_role(admin).org_id is None
    with pytest.raises(AccessDenied, match="the membership is deleted in the database"):
        h.auth.confirm_org_role(admin, "org:admin")


# -- FastAPI: one read a request, none for not_impersonated, 503 while down ---------------------------------
def _fastapi(authenticator: Authenticator, *, backend: bool = False) -> FastAPI:
    clerk = ClerkAuth(authenticator)
    app = FastAPI(middleware=[Middleware(AuthenticationMiddleware, backend=ClerkAuthBackend(authenticator),
                                         on_error=ClerkAuthBackend.on_error)] if backend else [])
    clerk.install(app, public_paths={"/public"}, deny_by_default=not backend)

    @app.get("/who")
    async def who(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
        return seen(auth)

    @app.get("/guard-then-auth", dependencies=[Depends(clerk.require_org_role("org:admin"))])
    async def guard_then_auth(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
        return seen(auth)

    @app.get("/permission-then-auth", dependencies=[Depends(clerk.require_permission(READ))])
    def permission_then_auth(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
        return seen(auth)

    @app.get("/two-guards", dependencies=[Depends(clerk.require_org_role("org:admin")),
                                          Depends(clerk.require_permission(MANAGE))])
    async def two_guards(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
        return seen(auth)

    @app.get("/not-impersonated")
    async def not_impersonated(auth: Auth = Depends(clerk.not_impersonated)) -> dict[str, Any]:
        return seen(auth)

    return app


@pytest.mark.parametrize("backend", [False, True], ids=["fastapi", "with-starlette-backend"])
def test_fastapi_reads_the_membership_once_a_request(harness: Harness, db_url: str, tmp_path: Path,
                                                     backend: bool) -> None:
    """Once with FastAPI's dependencies alone, and once under Starlette's ClerkAuthBackend (whose read they reuse)."""
    h = harness
    authenticator = _authenticator(h.store)
    tok = _token("org:admin", READ, MANAGE)
    _row(h, "org:admin", int(time.time()) * 1000 + 1_000, READ, MANAGE)
    with running(_fastapi(authenticator, backend=backend)) as url, httpx.Client(base_url=url, timeout=30) as http:
        for path in ("/who", "/guard-then-auth", "/permission-then-auth", "/two-guards"):
            with membership_reads(h.store) as reads:
                answer = http.get(path, headers=bearer(tok))
            assert answer.status_code == 200, (path, answer.text)
            assert answer.json()["org_role"] == "org:admin"
            assert len(reads) == 1, (path, reads)
        with membership_reads(h.store) as reads:  # the token judged, then the standing: one read (the backend's)
            assert http.get("/not-impersonated", headers=bearer(tok)).status_code == 200
        assert len(reads) == 1

        with database_down(h.store, db_url, tmp_path):
            for path in ("/who", "/guard-then-auth", "/permission-then-auth", "/two-guards"):
                answer = http.get(path, headers=bearer(tok))
                assert answer.status_code == 503, (path, answer.status_code, answer.text)
                assert answer.json()["error"] == "store_unavailable"
            assert http.get("/not-impersonated", headers=bearer(tok)).status_code == 503  # its standing needs it


# -- Flask: one read a request with two guards, 503 while down ---------------------------------------------
def test_flask_reads_the_membership_once_a_request_and_answers_503_while_down(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    with emulator(port) as clerk:
        app = Flask(__name__)
        app.config["CLERK_SYNC"] = emulator_env(clerk, db_url)
        ClerkSync(app, deny_by_default=True, revocation_refresh_s=3600)

        @app.get("/who")
        def who() -> dict[str, Any]:
            return seen(current_clerk)

        @app.get("/two-guards")
        @require_org_role("org:admin")
        @require_permission(MANAGE)
        def two_guards() -> dict[str, Any]:
            return seen(current_clerk)

        store = clerk_state(app).store
        try:
            with running_wsgi(app, port) as url, httpx.Client(base_url=url, timeout=30) as http:
                owner = clerk.create_user("owner@example.com")
                org = clerk.create_organization("Acme", created_by=owner["id"])
                admin = clerk.create_user("admin@example.com")["id"]
                clerk.add_membership(org["id"], admin, role="org:admin")
                clerk.wait_for_deliveries()
                tok = clerk.mint_session_token(admin, org_id=org["id"])
                get: Callable[[str], httpx.Response] = lambda path: http.get(path, headers=bearer(tok))  # noqa: E731
                for path in ("/who", "/two-guards"):
                    with membership_reads(store) as reads:
                        answer = get(path)
                    assert answer.status_code == 200, (path, answer.text)
                    assert answer.json()["org_role"] == "org:admin"
                    assert len(reads) == 1, (path, reads)
                with database_down(store, db_url, tmp_path):
                    for path in ("/who", "/two-guards"):
                        answer = get(path)
                        assert answer.status_code == 503, (path, answer.status_code, answer.text)
                        assert answer.json()["error"] == "store_unavailable"
        finally:
            clerk_state(app).close()


def test_fastapi_shows_and_guards_on_a_newer_token_than_the_row(harness: Harness) -> None:
    """The reviewer's two stories on the face: a late demotion webhook no longer shows a member ``org:admin``, and
    a late promotion webhook no longer refuses a new admin token (403 "changed since the session token")."""
    h = harness
    _row(h, "org:admin", int(time.time()) * 1000 - 60_000, READ, MANAGE)
    with running(_fastapi(_authenticator(h.store))) as url, httpx.Client(base_url=url, timeout=30) as http:
        member = bearer(_token("org:member", READ))
        assert http.get("/who", headers=member).json() == {"org_id": ORG, "org_slug": "acme", "org_role": "org:member",
                                                            "permissions": [READ]}
        assert http.get("/guard-then-auth", headers=member).status_code == 403
        _row(h, "org:member", int(time.time()) * 1000 - 30_000, READ)  # the demotion's webhook, late
        admin = bearer(_token("org:admin", READ, MANAGE))  # promoted again since: a new token says admin
        answer = http.get("/two-guards", headers=admin)
        assert answer.status_code == 200, answer.text
        assert answer.json()["org_role"] == "org:admin"
        assert answer.json()["permissions"] == sorted([READ, MANAGE])


def test_fastapi_not_impersonated_shows_a_removed_member_no_organization(harness: Harness) -> None:
    """Review 3 M2: ``Depends(clerk.not_impersonated)`` returned the token's session, so a member removed from the
    organization got ``org_id``/``org_role``/permissions back while ``current_auth`` showed none."""
    h = harness
    _row(h, "org:admin", int(time.time()) * 1000 - 60_000, READ, MANAGE)
    h.event("organizationMembership.deleted", f.deleted("organization_membership", "orgmem_s"))
    with running(_fastapi(_authenticator(h.store))) as url, httpx.Client(base_url=url, timeout=30) as http:
        admin = bearer(_token("org:admin", READ, MANAGE))
        none: dict[str, Any] = {"org_id": None, "org_slug": None, "org_role": None, "permissions": []}
        assert http.get("/who", headers=admin).json() == none
        assert http.get("/not-impersonated", headers=admin).json() == none


def test_a_demotion_within_the_accepted_clock_skew_is_not_older_than_the_token(harness: Harness) -> None:
    """Review 3 L2: the token check accepts an ``iat`` up to its leeway (5 s) ahead of this host's clock, so a
    token minted by a host whose clock runs ahead can carry an ``iat`` later than a demotion written after it:
    the row, 2 s "before" such an iat, was taken as older and ignored for the token's life. A row older than the
    iat by more than the leeway is still a late webhook, the token standing (the tests above: 30 s, 60 s)."""
    h = harness
    now = int(time.time())
    _row(h, "org:member", now * 1000 + 2_000, READ)
    skewed = token(MEMBER, v=1, org_id=ORG, org_role="org:admin", org_slug="acme", org_permissions=[READ, MANAGE],
                   iat=now + 4)
    admin = h.auth.authenticate({"authorization": f"Bearer {skewed}"}, {})
    assert h.auth.standing_org_role(admin).org_role == "org:member"
    with pytest.raises(AccessDenied, match="no older than the session token"):
        h.auth.confirm_org_role(admin, "org:admin")
    assert h.auth.verifier.claims.leeway_s == 5.0  # (the skew the token check accepted above)


def test_a_standing_of_another_session_is_refused(harness: Harness) -> None:
    """Review 3 L3: ``confirm_org_role``/``confirm_permission`` judged any ``standing=`` they were given: another
    session's (an admin's) passed the database half of the guard for this one."""
    h = harness
    _row(h, "org:member", int(time.time()) * 1000 + 1_000, READ)  # demoted after the tokens were issued
    mine = h.auth.authenticate({"authorization": f"Bearer {_token('org:admin', READ, MANAGE)}"}, {})
    other = h.auth.authenticate({"authorization": "Bearer " + token(
        MEMBER, sid="sess_other", v=1, org_id=ORG, org_role="org:admin", org_slug="acme", org_permissions=[READ])}, {})
    assert other.claims is not mine.claims
    with pytest.raises(ValueError, match="not this session's"):
        h.auth.confirm_org_role(mine, "org:admin", standing=other)
    with pytest.raises(ValueError, match="not this session's"):
        h.auth.confirm_permission(mine, MANAGE, standing=other)
    standing = h.auth.standing_org_role(mine)  # its own: judged (the row's demotion refuses it)
    with pytest.raises(AccessDenied):
        h.auth.confirm_org_role(mine, "org:admin", standing=standing)
