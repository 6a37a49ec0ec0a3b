"""Organization roles confirmed against ``organization_memberships``, as app roles are against ``users``: a
member removed from an organization (``organizationMembership.deleted`` applied) or demoted loses an org-role
guarded route on the next request, not when the session token expires; a member whose membership webhook has
not arrived yet passes on the token. Real servers on loopback, real tokens and webhooks from the emulator
(FastAPI, Flask here; Django's faces in ``tests/django/test_org_role_confirmed.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from flask import Flask

from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import Auth
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.config import Settings
from clerk_sync.errors import AccessDenied
from clerk_sync.integrations.fastapi import ClerkAuth, webhook_router
from clerk_sync.integrations.flask import ClerkSync, clerk_state, current_clerk, require_org_role
from clerk_sync.integrations.starlette import build_processor
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._flask import running_wsgi
from tests._reads import membership_reads
from tests._server import free_port, running
from tests.test_auth import Harness, token

FRONTEND = "http://localhost:3000"
ADMIN_ONLY, ANY_ROLE = ("org:admin",), ("org:admin", "org:member")

Get = Callable[[str, str], Any]  # (path, token) -> a response with .status_code and .json()


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def emulator_env(clerk: EmulatorServer, db_url: str) -> dict[str, str]:
    return {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
            "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url, "CLERK_ISSUER": clerk.url,
            "CLERK_AUTHORIZED_PARTIES": FRONTEND}


def _denied(answer: Any, words: str) -> None:
    assert answer.status_code == 403, (answer.status_code, answer.content)
    assert words in str(answer.json()), answer.json()


def org_role_scenario(clerk: EmulatorServer, get: Get, admin_paths: list[str], any_paths: list[str]) -> None:
    """The one story every face must tell: ``admin_paths`` require ``org:admin``, ``any_paths`` either role.

    An admin passes; demoted to member (webhook applied), the same still-valid admin token is refused the admin
    routes (the DB's role wins) and keeps the member ones; removed (webhook applied), it is refused them all;
    a member whose membership has no row yet (webhook late) passes on the token."""
    owner = clerk.create_user("owner@example.com")
    admin = clerk.create_user("admin@example.com")
    late = clerk.create_user("late@example.com")
    org = clerk.create_organization("Acme", created_by=owner["id"])
    clerk.add_membership(org["id"], admin["id"], role="org:admin")
    clerk.wait_for_deliveries()
    owner_tok = clerk.mint_session_token(owner["id"], org_id=org["id"])
    admin_tok = clerk.mint_session_token(admin["id"], org_id=org["id"])
    for path in admin_paths + any_paths:
        assert get(path, owner_tok).status_code == 200, path
        assert get(path, admin_tok).status_code == 200, path

    membership = f"/v1/organizations/{org['id']}/memberships/{admin['id']}"
    clerk.request("PATCH", membership, json={"role": "org:member"})  # demoted; the token still says admin
    clerk.wait_for_deliveries()
    for path in admin_paths:
        _denied(get(path, admin_tok), "org:member")
        _denied(get(path, admin_tok), "no older than the session token")
    for path in any_paths:  # the DB's role is a member's: the routes open to members stay open, and the view
        answer = get(path, admin_tok)  # is handed the database's role, not the token's (answered as "role")
        assert answer.status_code == 200, path
        assert answer.json()["role"] == "org:member", (path, answer.json())

    clerk.request("DELETE", membership)  # removed from the organization; the token still names it
    clerk.wait_for_deliveries()
    for path in admin_paths + any_paths:
        _denied(get(path, admin_tok), "no longer a member")
        assert get(path, owner_tok).status_code == 200, path  # the other members are untouched

    clerk.set_webhook_url(None)  # organizationMembership.created is late: no row for the new member yet
    clerk.add_membership(org["id"], late["id"], role="org:admin")
    late_tok = clerk.mint_session_token(late["id"], org_id=org["id"])
    for path in admin_paths + any_paths:
        assert get(path, late_tok).status_code == 200, path  # the token stands until the row arrives


# -- FastAPI -------------------------------------------------------------------------------------
def fastapi_app(settings: Settings) -> tuple[FastAPI, Store]:
    processor = build_processor(settings)
    authenticator = Authenticator(verifier_from_settings(settings), processor.store,
                                  deny_list=DenyList(processor.store, refresh_s=0))
    clerk = ClerkAuth(authenticator)
    app = FastAPI()
    clerk.install(app, public_paths={"/webhooks/clerk"})
    app.include_router(webhook_router(processor))

    @app.get("/org/admin")
    async def org_admin(auth: Auth = Depends(clerk.require_org_role(*ADMIN_ONLY))) -> dict[str, Any]:
        return {"org": auth.org_id}

    @app.get("/org/any")
    def org_any(auth: Auth = Depends(clerk.require_org_role(*ANY_ROLE))) -> dict[str, Any]:
        return {"org": auth.org_id, "role": auth.org_role}

    # the guard in the route's dependencies, the view reading current_auth: the same confirmed role
    @app.get("/org/any-current", dependencies=[Depends(clerk.require_org_role(*ANY_ROLE))])
    async def org_any_current(auth: Auth = Depends(clerk.current_auth)) -> dict[str, Any]:
        return {"org": auth.org_id, "role": auth.org_role}

    return app, processor.store


def test_fastapi_org_role_is_confirmed_against_the_membership_row(db_url: str) -> None:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk", rate_limit_requests=1000) as clerk:
        app, store = fastapi_app(Settings.from_env(emulator_env(clerk, db_url)))
        try:
            with running(app, port=port) as url, httpx.Client(base_url=url, timeout=30) as http:
                org_role_scenario(clerk, lambda path, tok: http.get(path, headers=bearer(tok)),
                                  ["/org/admin"], ["/org/any", "/org/any-current"])
        finally:
            store.dispose()


# -- Flask ---------------------------------------------------------------------------------------
def flask_app(config: dict[str, Any]) -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = config
    ClerkSync(app, deny_by_default=True, revocation_refresh_s=0)

    @app.get("/org/admin")
    @require_org_role(*ADMIN_ONLY)
    def org_admin() -> dict[str, Any]:
        return {"org": current_clerk.org_id}

    @app.get("/org/any")
    @require_org_role(*ANY_ROLE)
    def org_any() -> dict[str, Any]:
        return {"org": current_clerk.org_id, "role": current_clerk.org_role}

    return app


def test_flask_org_role_is_confirmed_against_the_membership_row(db_url: str) -> None:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk", rate_limit_requests=1000) as clerk:
        app = flask_app(emulator_env(clerk, db_url))
        try:
            with running_wsgi(app, port) as url, httpx.Client(base_url=url, timeout=30) as http:
                org_role_scenario(clerk, lambda path, tok: http.get(path, headers=bearer(tok)),
                                  ["/org/admin"], ["/org/any"])
        finally:
            clerk_state(app).close()


# -- the Authenticator itself --------------------------------------------------------------------
@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    yield h
    h.store.dispose()


def _auth(h: Harness, user_id: str, org_id: str, role: str) -> Auth:
    tok = token(user_id, o={"id": org_id, "rol": role, "slg": "acme"})
    return h.auth.authenticate({"authorization": f"Bearer {tok}"}, {})


def _membership_queries(store: Store) -> tuple[list[str], Callable[[], None]]:
    """The membership reads on ``store`` from here until the returned function is called (tests._reads)."""
    reads = membership_reads(store)
    seen = reads.__enter__()
    return seen, lambda: reads.__exit__(None, None, None)


def test_confirm_org_role_reads_one_row_and_the_database_wins(harness: Harness) -> None:
    h = harness
    admin = _auth(h, "user_c", "org_c", "admin")  # a v2 token: "admin", normalised to "org:admin"
    # The rows are written after the token was issued (Clerk's updated_at after its iat): the database is newer
    after = int(admin.claims["iat"]) * 1000 + 1_000
    h.event("organizationMembership.created", f.membership("orgmem_1", "org_c", "user_c", after, role="org:admin"))
    seen, stop = _membership_queries(h.store)
    try:
        assert h.auth.confirm_org_role(admin, "org:admin") is admin
        assert len(seen) == 1  # one indexed read per guarded request
        with pytest.raises(AccessDenied):  # the token says no: nothing read
            h.auth.confirm_org_role(_auth(h, "user_c", "org_c", "member"), "org:admin")
        assert len(seen) == 1
    finally:
        stop()

    h.event("organizationMembership.updated", f.membership("orgmem_1", "org_c", "user_c", after + 1,
                                                                role="org:member"))
    with pytest.raises(AccessDenied, match=r"'org:member' in the database.*no older than the session token"):
        h.auth.confirm_org_role(admin, "org:admin")
    assert Authenticator.require_org_role(admin, "org:admin") is admin  # the static check: the token only, as before
    # A promotion waits for its webhook, as require_role's does: the row says member, the token admin. The
    # guard admitting both hands back the database's role, the rest of the session as the token has it.
    confirmed = h.auth.confirm_org_role(admin, "org:admin", "org:member")
    assert confirmed.org_role == "org:member" and admin.org_role == "org:admin"
    assert (confirmed.user_id, confirmed.org_id, confirmed.session_id) == (admin.user_id, admin.org_id, admin.session_id)

    h.event("organizationMembership.deleted", f.deleted("organization_membership", "orgmem_1"))
    with pytest.raises(AccessDenied, match="no longer a member"):
        h.auth.confirm_org_role(admin, "org:admin", "org:member")

    # Removed, then added again: a new membership id, its row live beside the old tombstone.
    h.event("organizationMembership.created", f.membership("orgmem_2", "org_c", "user_c", after + 2,
                                                                role="org:admin"))
    assert h.auth.confirm_org_role(admin, "org:admin") is admin


def test_no_membership_row_yet_the_token_stands_and_other_orgs_rows_do_not_count(harness: Harness) -> None:
    h = harness
    h.event("organizationMembership.created", f.membership("orgmem_o", "org_other", "user_n", 1, role="org:member"))
    h.event("organizationMembership.deleted", f.deleted("organization_membership", "orgmem_o"))
    h.event("organizationMembership.created", f.membership("orgmem_p", "org_n", "user_peer", 1, role="org:member"))
    auth = _auth(h, "user_n", "org_n", "admin")
    assert h.auth.confirm_org_role(auth, "org:admin") is auth
    with pytest.raises(AccessDenied):  # no active organization: refused on the token, as before
        h.auth.confirm_org_role(h.auth.authenticate({"authorization": f"Bearer {token('user_n')}"}, {}), "org:admin")


def test_an_organization_deleted_ends_its_members_org_roles(harness: Harness) -> None:
    h = harness
    h.event("organization.created", f.organization("org_d", 1))
    h.event("organizationMembership.created", f.membership("orgmem_d", "org_d", "user_d", 1, role="org:admin"))
    auth = _auth(h, "user_d", "org_d", "admin")
    assert h.auth.confirm_org_role(auth, "org:admin") is auth
    h.event("organization.deleted", f.deleted("organization", "org_d"))  # its memberships are tombstoned with it
    with pytest.raises(AccessDenied, match="no longer a member"):
        h.auth.confirm_org_role(auth, "org:admin")
