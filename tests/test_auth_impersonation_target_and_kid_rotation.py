"""Auth security: an impersonation ends when its target becomes an admin or an impersonator; a role to set
is checked before Clerk stores it; a key rotated in under the same ``kid`` is refetched once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from clerk_sync.auth.admin import AdminActions
from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import ClaimsValidator
from clerk_sync.auth.jwks import JWKSKeySource, StaticKeySource
from clerk_sync.auth.sessions import SessionVerifier
from clerk_sync.auth.users import read_user
from clerk_sync.errors import ImpersonationEnded, InvalidRole, TokenSignatureInvalid
from clerk_sync.integrations.http import status_for
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests.test_admin import audit_rows, synced_user
from tests.test_sessions import ISS, KEY, NOW, claims, mint, pem


def _authenticator(store: Store, **options: object) -> Authenticator:
    verifier = SessionVerifier(StaticKeySource(pem(KEY)), ClaimsValidator(issuer=ISS, authorized_parties=None),
                               now=lambda: float(NOW))
    return Authenticator(verifier, store, **options)  # type: ignore[arg-type]


def _impersonated(authenticator: Authenticator, target: str, actor: str) -> object:
    token = mint(claims(sub=target, act={"sub": actor}))
    return authenticator.authenticate({"authorization": f"Bearer {token}"}, {}, method="GET")


def test_an_impersonation_ends_when_its_target_becomes_an_admin_or_an_impersonator(
        emu: EmulatorServer, store: Store, actions: AdminActions) -> None:
    """Fixed: the target was judged at the grant only; promoted afterwards (or its admin role arriving
    by a late webhook), the impersonating admin kept acting with admin powers under the target's name."""
    admin = synced_user(emu, store, "a@example.com", role="admin")
    peer = synced_user(emu, store, "p@example.com", role="admin")
    target = synced_user(emu, store, "t@example.com")
    assert actions.start_impersonation(admin, target).target == target
    authenticator = _authenticator(store, impersonator_roles=frozenset({"admin", "support"}))
    assert _impersonated(authenticator, target, admin) is not None  # a plain user: the impersonation goes on
    for role in ("support", "admin"):
        assert actions.promote(target, role, by=peer).status == "applied"
        with pytest.raises(ImpersonationEnded, match=f"holds the role '{role}'") as ended:
            _impersonated(authenticator, target, admin)
        assert status_for(ended.value) == 401
    assert actions.promote(target, "user", by=peer).status == "applied"
    assert _impersonated(authenticator, target, admin) is not None
    dashboard = _impersonated(authenticator, peer, "user_clerk_dashboard_staff")  # no row here: not ours to judge
    assert dashboard is not None


@pytest.mark.parametrize(("role", "why"), [
    ("", "blank"), ("   ", "blank"), ("a" * 65, "65 characters"), (" admin", "whitespace around it"),
    ("admin\n", "whitespace around it"), ("ad\x00min", "control character"), (7, "a string, not int"),
])
def test_promote_refuses_a_role_the_users_table_cannot_hold_before_clerk_stores_it(
        emu: EmulatorServer, store: Store, actions: AdminActions, role: object, why: str) -> None:
    """Fixed: any string went to Clerk; one longer than the column failed the database write after
    Clerk had stored it, and the webhook then applied the least-privileged role in its place."""
    admin = synced_user(emu, store, "a@example.com", role="admin")
    target = synced_user(emu, store, "t@example.com")
    before = audit_rows(store)
    with pytest.raises(InvalidRole, match=why) as refused:
        actions.promote(target, role, by=admin)  # type: ignore[arg-type]
    assert status_for(refused.value) == 422
    assert emu.request("GET", f"/v1/users/{target}")["public_metadata"] == {"role": "user"}  # Clerk untouched
    assert read_user(store, target).role == "user"  # type: ignore[union-attr]
    assert audit_rows(store) == before
    assert actions.promote(target, "a" * 64, by=admin).status == "applied"  # the column's length is fine


@contextmanager
def _jwks_verifier(emu: EmulatorServer, clock: list[float]) -> Iterator[tuple[JWKSKeySource, SessionVerifier]]:
    """The emulator's JWKS behind a key source on the injected ``clock``, and a verifier over it."""
    with httpx.Client() as client:
        keys = JWKSKeySource(f"{emu.url}/v1/jwks", client=client, headers={"Authorization": f"Bearer {emu.secret_key}"},
                             now=lambda: clock[0])
        yield keys, SessionVerifier(keys, ClaimsValidator(issuer=emu.url, authorized_parties=None))


def test_a_key_rotated_in_under_the_same_kid_verifies_after_one_refetch(emu: EmulatorServer) -> None:
    """Fixed (FACTS 5.3: Clerk's kid is the instance id; 5.4: Clerk's SDK refetches once on a signature
    failure): a new key under the cached kid was refused until the 300 s TTL ran out. The emulator rotated
    with a new kid only; ``keys/rotate?keep_kid=true`` rotates as Clerk does."""
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    clock = [1000.0]
    user = emu.create_user("rot@example.com")
    with _jwks_verifier(emu, clock) as (keys, verifier):
        assert verifier.verify(emu.mint_session_token(user["id"])).user_id == user["id"]
        kid = emu.request("POST", "/_emulator/keys/rotate", params={"keep_kid": "true"})["kid"]
        assert kid == emu.config.instance_id
        fresh = emu.mint_session_token(user["id"])
        assert pyjwt.get_unverified_header(fresh)["kid"] == kid
        clock[0] += 6  # past the refetch floor, within the TTL
        assert verifier.verify(fresh).user_id == user["id"]
        assert keys.fetches == 2
        # A forged signature under the kid: one refetch finds the same key, then the cooldown holds
        forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = pyjwt.encode(pyjwt.decode(fresh, options={"verify_signature": False}), forger, algorithm="RS256",
                              headers={"kid": kid})
        clock[0] += 6
        for _ in range(3):
            with pytest.raises(TokenSignatureInvalid):
                verifier.verify(forged)
        assert keys.fetches == 3


def test_a_cached_token_signed_by_a_key_since_replaced_under_its_kid_is_refused(emu: EmulatorServer) -> None:
    """Left alone last session: the verifier's cache remembered the kid only, so a token signed by a key Clerk
    had since withdrawn under the same kid (a rotation after a leak) stayed valid until its exp. The cache entry
    now keeps the key that verified it; a key merely fetched again keeps its object (no verify again)."""
    clock = [1000.0]
    user = emu.create_user("leak@example.com")
    with _jwks_verifier(emu, clock) as (keys, verifier):
        leaked = emu.mint_session_token(user["id"])
        assert verifier.verify(leaked).user_id == user["id"]  # cached
        held = keys.get(emu.config.instance_id)
        clock[0] += 301  # past the TTL: the same JWKS fetched again keeps the key object
        assert verifier.verify(leaked).user_id == user["id"]
        assert keys.fetches == 2 and keys.get(emu.config.instance_id) is held
        emu.request("POST", "/_emulator/keys/rotate", params={"keep_kid": "true"})
        clock[0] += 301  # the TTL refresh brings the new key under the same kid
        fresh = emu.mint_session_token(user["id"])
        assert verifier.verify(fresh).user_id == user["id"]
        assert keys.get(emu.config.instance_id) is not held
        with pytest.raises(TokenSignatureInvalid):
            verifier.verify(leaked)
        with pytest.raises(TokenSignatureInvalid):  # and it did not come back into the cache
            verifier.verify(leaked)
