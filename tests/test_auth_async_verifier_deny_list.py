"""The async path checks revocations against the verifier's own deny list too.

``aauthenticate`` refreshed only the authenticator's list, then read in snapshot mode (no refresh on the event
loop), so a verifier given its own :class:`DenyList` (``verifier_from_settings(..., revocations=...)``), or one
shared by two authenticators, was never read there: every revoked session was let in on the async path while
the sync path refused it (review)."""

from __future__ import annotations

import asyncio

import pytest

from clerk_sync.auth.authenticator import Authenticator, DenyList
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.errors import SessionRevoked
from tests import factories as f
from tests.test_auth import ISS, Harness, token
from tests.test_sessions import KEY, pem


def _headers() -> dict[str, str]:
    return {"authorization": f"Bearer {token('user_r')}"}  # (minted now: a token lives 60 s)


def _verifier(revocations: DenyList | None = None) -> SessionVerifier:
    return SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS), revocations=revocations)


@pytest.fixture
def harness(db_url: str) -> Harness:
    h = Harness(db_url)
    h.event("user.created", f.user("user_r", 1))
    h.event("session.revoked", {"id": "sess_user_r", "object": "session", "user_id": "user_r", "status": "revoked"})
    return h


def test_a_verifier_with_its_own_deny_list_refuses_a_revoked_session_async(harness: Harness) -> None:
    authenticator = Authenticator(_verifier(DenyList(harness.store)), harness.store)
    with pytest.raises(SessionRevoked):
        authenticator.authenticate(_headers(), {}, method="GET")
    fresh = Authenticator(_verifier(DenyList(harness.store)), harness.store)  # (nothing read by a sync call first)
    with pytest.raises(SessionRevoked):
        asyncio.run(fresh.aauthenticate(_headers(), {}, method="GET"))


def test_a_verifier_shared_by_two_authenticators_refuses_a_revoked_session_async(harness: Harness) -> None:
    shared = _verifier()
    Authenticator(shared, harness.store)  # the first: the verifier's list is its own (another face's, unused)
    second = Authenticator(shared, harness.store)
    with pytest.raises(SessionRevoked):
        asyncio.run(second.aauthenticate(_headers(), {}, method="GET"))
    assert asyncio.run(second.aauthenticate({"authorization": f"Bearer {token('user_ok')}"}, {},
                                            method="GET")).user_id == "user_ok"
