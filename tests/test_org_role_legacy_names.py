"""Clerk's legacy organization role names, spelled differently by each source: webhooks store them mapped
(``basic_member`` → ``org:member``, ``admin`` → ``org:admin``), v2 session tokens only prefix ``org:``
(``org:basic_member``), v1 tokens carry them bare (``admin``), and routes name any of these. Found by review:
the org-role guards compared the token's spelling with the database's, so a legacy-role member was refused by
every route naming one spelling ("changed since the session token was issued"), and a v1 route
``require_org_role("admin")`` that served admins before answered 403. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.errors import AccessDenied
from clerk_sync.events import same_org_role
from tests import factories as f
from tests.test_auth import Harness, token


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    yield h
    h.store.dispose()


def _authenticate(h: Harness, tok: str) -> Auth:
    return h.auth.authenticate({"authorization": f"Bearer {tok}"}, {})


@pytest.mark.parametrize("route", [("org:basic_member",), ("org:member",), ("basic_member",)])
def test_a_v2_legacy_member_passes_every_spelling_of_the_member_guard(harness: Harness, route: tuple[str]) -> None:
    harness.event("organizationMembership.created", f.membership("orgmem_l", "org_l", "user_l", 1, role="basic_member"))
    auth = _authenticate(harness, token("user_l", o={"id": "org_l", "rol": "basic_member", "slg": "acme"}))
    assert harness.auth.confirm_org_role(auth, *route) is auth
    with pytest.raises(AccessDenied):
        harness.auth.confirm_org_role(auth, "org:admin")


@pytest.mark.parametrize("route", [("admin",), ("org:admin",)])
def test_a_v1_legacy_admin_passes_the_admin_guard_either_way(harness: Harness, route: tuple[str]) -> None:
    harness.event("organizationMembership.created", f.membership("orgmem_a", "org_a", "user_a", 1, role="admin"))
    auth = _authenticate(harness, token("user_a", v=1, org_id="org_a", org_role="admin", org_slug="acme"))
    assert harness.auth.confirm_org_role(auth, *route) is auth


def test_a_demoted_legacy_admin_is_still_refused(harness: Harness) -> None:
    """The spellings are one role, not a looser check: the database's role still wins."""
    harness.event("organizationMembership.created", f.membership("orgmem_d", "org_d", "user_d", 1, role="admin"))
    auth = _authenticate(harness, token("user_d", o={"id": "org_d", "rol": "admin", "slg": "acme"}))
    after = int(auth.claims["iat"]) * 1000 + 1_000  # the demotion's webhook is newer than the token
    harness.event("organizationMembership.updated",
                  f.membership("orgmem_d", "org_d", "user_d", after, role="basic_member"))
    with pytest.raises(AccessDenied, match="org:member"):
        harness.auth.confirm_org_role(auth, "admin", "org:admin")


def test_one_spelling_per_role() -> None:
    assert {same_org_role(r) for r in ("admin", "org:admin")} == {"org:admin"}
    assert {same_org_role(r) for r in ("basic_member", "org:basic_member", "org:member")} == {"org:member"}
    assert same_org_role("org:billing") == same_org_role("billing") == "org:billing"
    assert Authenticator.require_org_role(Auth(user_id="u", session_id="s", expires_at=0, org_id="o", org_role="admin"),
                                          "org:admin").org_role == "admin"
