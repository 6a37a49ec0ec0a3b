"""Organization claims of v2 session tokens (security review, session 2026-12-05): a v2 token (``v`` >= 2) with
no ``o`` claim took its organization from v1's top-level ``org_id``/``org_role``/``org_permissions``. Clerk's
own parsers read a v2 token's organization from ``o`` only, and in v2 those top-level names are no default
claims: only custom session claims can carry them, perhaps built from what the user writes
(``unsafe_metadata``). They became the session's org role and permissions (``require_permission`` trusts the
token; ``confirm_org_role`` lets the token stand for an org with no membership row, an invented one too). Now a
v2 token's organization comes from ``o`` only; v1 tokens are read as before."""

from __future__ import annotations

from typing import Any

import pytest

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import ClaimsValidator, auth_from_claims
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.errors import AccessDenied
from tests.test_sessions import AZP, ISS, KEY, NOW, claims, mint, pem

V1_ORG = {"org_id": "org_x", "org_role": "org:admin", "org_slug": "acme", "org_permissions": ["org:billing:manage"]}
BASE = {"sub": "user_1", "sid": "sess_1", "exp": 9_000_000_000}


def _org(claims: dict[str, Any]) -> tuple[Any, ...]:
    auth = auth_from_claims(claims)
    return auth.org_id, auth.org_role, auth.org_slug, auth.org_permissions


@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("o", ["absent", None, "org_x", ["org_x"]], ids=["no-o", "o-null", "o-string", "o-list"])
def test_a_v2_token_without_an_o_object_has_no_organization(v: int, o: Any) -> None:
    claims = {**BASE, "v": v, **V1_ORG, **({} if o == "absent" else {"o": o})}
    assert _org(claims) == (None, None, None, ())
    auth = auth_from_claims(claims)
    with pytest.raises(AccessDenied):
        Authenticator.require_permission(auth, "org:billing:manage")
    with pytest.raises(AccessDenied):
        Authenticator.require_org_role(auth, "org:admin")


def test_a_v2_tokens_organization_is_its_o_claim_only() -> None:
    o = {"id": "org_real", "rol": "member", "slg": "real", "per": "read", "fpm": "1"}
    claims = {**BASE, "v": 2, "fea": "o:posts", "o": o, **V1_ORG}  # the top-level names change nothing
    assert _org(claims) == ("org_real", "org:member", "real", ("org:posts:read",))


def test_v1_tokens_keep_their_top_level_organization_claims() -> None:
    for payload in ({**BASE, **V1_ORG}, {**BASE, "v": 1, **V1_ORG}, {**BASE, "v": "2", **V1_ORG}):
        assert _org(payload) == ("org_x", "org:admin", "acme", ("org:billing:manage",))


def test_through_the_verifier_too() -> None:
    """End to end: a signed v2 token carrying the v1 names as custom claims gets no organization; a v1 one does."""
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS, authorized_parties=frozenset({AZP})),
                               now=lambda: NOW)
    auth = verifier.verify(mint(claims(v=2, **V1_ORG)))
    assert (auth.version, auth.org_id, auth.org_role, auth.org_permissions) == (2, None, None, ())
    auth = verifier.verify(mint(claims(v=None, **V1_ORG)))
    assert (auth.version, auth.org_id, auth.org_role, auth.org_permissions) == (1, "org_x", "org:admin",
                                                                                ("org:billing:manage",))
