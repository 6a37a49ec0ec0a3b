"""Two review findings (session 2026-12-07).

Starlette's ``ClerkAuthBackend`` granted a v1 token's organization role as the token spells it: an older
instance's ``org_role: "admin"`` became the scope ``admin``, not ``org:admin``, so ``@requires("org:admin")``
refused (403) the token FastAPI's ``require_org_role("org:admin")`` let through, and the bare ``admin`` scope
could pass for an app's own admin role. The scopes now spell the role as every guard compares it
(``same_org_role``).

A token whose impersonator id (``act.sub``) was longer than any Clerk id column failed every impersonated
request's audit row on PostgreSQL and MariaDB: ``503 store_data_rejected``, with a ``Retry-After`` that never
helped (SQLite stored it). Over-long ``sub``, ``sid`` and ``act.sub`` are now a malformed token (401), and the
audit log keeps an over-long actor or impersonator id in its details, as it did an over-long target.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI

from clerk_sync._limits import CLERK_ID_CHARS
from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.auth.claims import Auth
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.tables import audit_log
from tests import factories as f
from tests.test_auth import Harness, token
from tests.test_auth_edges_starlette_org_scopes import org_scopes_app


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    yield h
    h.store.dispose()


def _get_all(app: Any, requests: list[tuple[str, str]]) -> list[httpx.Response]:
    """Each ``(path, token)`` through ``app`` in process (``httpx.ASGITransport``)."""
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return [await http.get(path, headers={"authorization": f"Bearer {tok}"}) for path, tok in requests]
    return anyio.run(run)


def _fastapi(h: Harness) -> FastAPI:
    clerk = ClerkAuth(h.auth)
    app = FastAPI()
    clerk.install(app, public_paths=set())

    @app.get("/org-admin")
    async def org_admin(auth: Auth = Depends(clerk.require_org_role("org:admin"))) -> dict[str, bool]:
        return {"ok": True}

    @app.get("/me")
    async def me(auth: Auth = Depends(clerk.current_auth)) -> dict[str, str | None]:
        return {"user": auth.user_id, "actor": auth.actor_id}

    return app


def _v1(user: str, role: str) -> str:
    return token(user, v=None, org_id="org_1", org_role=role, org_slug="acme", org_permissions=["org:invoices:read"])


@pytest.mark.parametrize("with_row", [False, True], ids=["no-membership-row-yet", "membership-row"])
def test_a_v1_tokens_legacy_admin_role_is_the_org_admin_scope(harness: Harness, with_row: bool) -> None:
    h, now = harness, int(time.time() * 1000)
    h.event("user.created", f.user("user_a", now))
    h.event("user.created", f.user("user_m", now))
    if with_row:  # stored as org:admin / org:member (the webhook maps the legacy names)
        h.event("organizationMembership.created", f.membership("orgmem_a", "org_1", "user_a", now, role="admin"))
        h.event("organizationMembership.created",
                f.membership("orgmem_m", "org_1", "user_m", now, role="basic_member"))
    admin, member = _v1("user_a", "admin"), _v1("user_m", "basic_member")
    allowed, admin_scopes, refused, member_scopes = _get_all(org_scopes_app(h), [
        ("/org-admin", admin), ("/scopes", admin), ("/org-admin", member), ("/scopes", member)])
    assert allowed.status_code == 200
    assert admin_scopes.json()["scopes"] == ["authenticated", "org:admin", "org:invoices:read"]  # no bare "admin"
    assert refused.status_code == 403
    assert member_scopes.json()["scopes"] == ["authenticated", "org:member", "org:basic_member", "org:invoices:read"]
    # and FastAPI's guard agrees on both
    assert [r.status_code for r in _get_all(_fastapi(h), [("/org-admin", admin), ("/org-admin", member)])] == [
        200, 403]


def test_a_v2_tokens_roles_keep_their_scopes(harness: Harness) -> None:
    admin = token("user_a", o={"id": "org_1", "rol": "admin", "slg": "acme"})
    member = token("user_m", o={"id": "org_1", "rol": "basic_member", "slg": "acme"})
    got = _get_all(org_scopes_app(harness), [("/scopes", admin), ("/scopes", member)])
    assert [r.json()["scopes"] for r in got] == [["authenticated", "org:admin"],
                                                 ["authenticated", "org:member", "org:basic_member"]]


def _long(prefix: str, n: int) -> str:
    return prefix + "a" * (n - len(prefix))


@pytest.mark.parametrize(("claim", "extra"), [
    ("act.sub", lambda n: {"act": {"sub": _long("user_", n)}}),
    ("sub", lambda n: {"sub": _long("user_", n)}),
    ("sid", lambda n: {"sid": _long("sess_", n)}),
], ids=["act.sub", "sub", "sid"])
def test_an_over_long_clerk_id_in_a_token_is_a_malformed_token_on_every_store(
        harness: Harness, claim: str, extra: Any) -> None:
    app = _fastapi(harness)
    fits, too_long = (token("user_1", **extra(n)) for n in (CLERK_ID_CHARS, CLERK_ID_CHARS + 1))
    ok, refused = _get_all(app, [("/me", fits), ("/me", too_long)])
    assert ok.status_code == 200, ok.text
    assert (refused.status_code, refused.json()["error"]) == (401, "token_malformed"), refused.text
    assert f"{claim!r} is {CLERK_ID_CHARS + 1} characters" in refused.json()["message"]
    assert "retry-after" not in refused.headers


def test_an_impersonated_request_with_the_longest_actor_id_is_audited(harness: Harness) -> None:
    actor = _long("user_", CLERK_ID_CHARS)
    (answer,) = _get_all(_fastapi(harness), [("/me", token("user_1", act={"sub": actor}))])
    assert answer.json() == {"user": "user_1", "actor": actor}
    with harness.store.engine.connect() as conn:
        row = conn.execute(sa.select(audit_log).where(audit_log.c.action == "impersonation.request")).one()
    assert (row.actor_clerk_id, row.impersonator_clerk_id, row.target_clerk_id) == (actor, actor, "user_1")


def test_record_audit_keeps_an_over_long_actor_and_impersonator_in_the_details(harness: Harness) -> None:
    long_actor, long_admin = _long("user_", CLERK_ID_CHARS + 1), _long("user_", 300)
    with harness.store.transaction() as w:
        record_audit(w, AuditEntry("impersonation.request", long_actor, "user_1", impersonator=long_admin,
                                   details={"path": "/me"}))
    with harness.store.engine.connect() as conn:
        row = conn.execute(sa.select(audit_log)).one()
    assert (row.actor_clerk_id, row.impersonator_clerk_id, row.target_clerk_id) == (None, None, "user_1")
    details = row.details if isinstance(row.details, dict) else {}
    assert details["path"] == "/me" and details["actor"] == repr(long_actor)  # as the target's: show()n
    assert details["impersonator"].startswith("'user_aaa") and details["impersonator"].endswith(" characters)")
