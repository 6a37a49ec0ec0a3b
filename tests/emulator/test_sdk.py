"""The official Python SDK (``clerk_backend_api``) works against the emulator unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from clerk_backend_api import Clerk, models
from clerk_backend_api.security import authenticate_request, verify_token
from clerk_backend_api.security.types import AuthenticateRequestOptions, VerifyTokenOptions

from clerk_sync.testing import EmulatorServer

# The SDK reads its own deprecated query fields (``last_active_at_since``) on every list call.
pytestmark = pytest.mark.filterwarnings("ignore:.*DEPRECATED.*:DeprecationWarning")


@pytest.fixture
def sdk(clerk: EmulatorServer) -> Iterator[Clerk]:
    with Clerk(bearer_auth=clerk.secret_key, server_url=clerk.api_url) as client:
        yield client


def test_users_round_trip(sdk: Clerk) -> None:
    created = sdk.users.create(
        email_address=["grace@example.com"],
        first_name="Grace",
        last_name="Hopper",
        public_metadata={"role": "admin"},
        skip_password_checks=True,
    )
    assert created.id.startswith("user_")
    assert created.email_addresses[0].email_address == "grace@example.com"
    assert created.primary_email_address_id == created.email_addresses[0].id
    listed = sdk.users.list(request={"email_address": ["grace@example.com"], "limit": 5})
    assert [u.id for u in listed] == [created.id]
    assert sdk.users.count(request={}).total_count == 1
    merged = sdk.users.update_metadata(user_id=created.id, public_metadata={"plan": "pro", "role": None})
    assert merged.public_metadata == {"plan": "pro"}
    assert merged.updated_at > created.updated_at
    assert sdk.users.get(user_id=created.id).first_name == "Grace"
    deleted = sdk.users.delete(user_id=created.id)
    assert deleted.deleted is True
    with pytest.raises(models.ClerkErrors) as info:
        sdk.users.get(user_id=created.id)
    assert info.value.data.errors[0].code == "resource_not_found"


def test_organizations_and_memberships(sdk: Clerk) -> None:
    owner = sdk.users.create(email_address=["owner@example.com"])
    member = sdk.users.create(email_address=["member@example.com"])
    org = sdk.organizations.create(request={"name": "Acme", "created_by": owner.id})
    membership = sdk.organization_memberships.create(organization_id=org.id, user_id=member.id, role="org:member")
    assert membership.role == "org:member"
    assert membership.public_user_data is not None
    assert membership.public_user_data.user_id == member.id
    page = sdk.organization_memberships.list(organization_id=org.id, limit=10)
    assert page.total_count == 2
    roles = {m.public_user_data.user_id: m.role for m in page.data if m.public_user_data}
    assert roles == {owner.id: "org:admin", member.id: "org:member"}
    orgs = sdk.organizations.list(limit=10)
    assert orgs.total_count == 1
    assert orgs.data[0].id == org.id
    fetched = sdk.organizations.get(organization_id=org.slug)
    assert fetched.id == org.id
    assert fetched.members_count == 2
    merged = sdk.organizations.merge_metadata(organization_id=org.id, public_metadata={"plan": "team"})
    assert merged.public_metadata == {"plan": "team"}
    assert sdk.organizations.delete(organization_id=org.id).deleted is True


def test_actor_and_sign_in_tokens(sdk: Clerk, clerk: EmulatorServer) -> None:
    admin = sdk.users.create(email_address=["admin@example.com"])
    user = sdk.users.create(email_address=["user@example.com"])
    actor = sdk.actor_tokens.create(request={"user_id": user.id, "actor": {"sub": admin.id}})
    assert actor.status == "pending"
    assert actor.user_id == user.id
    sign_in = sdk.sign_in_tokens.create(request={"user_id": user.id, "expires_in_seconds": 600})
    assert sign_in.status == "pending"
    assert sign_in.token
    accepted = clerk.request("POST", f"/_emulator/sign_in_tokens/{sign_in.id}/accept")
    assert accepted["session"]["user_id"] == user.id
    session = sdk.sessions.get(session_id=accepted["session"]["id"])
    assert session.status == "active"
    token = sdk.sessions.create_token(session_id=session.id)
    assert token.jwt is not None
    options = VerifyTokenOptions(secret_key=clerk.secret_key, api_url=clerk.url)
    claims = verify_token(token.jwt, options)
    assert claims["sub"] == user.id
    assert claims["sid"] == session.id


def test_sdk_authenticate_request_with_emulator_key(sdk: Clerk, clerk: EmulatorServer) -> None:
    user = sdk.users.create(email_address=["auth@example.com"])
    org = sdk.organizations.create(request={"name": "Team", "created_by": user.id})
    token = clerk.mint_session_token(user.id, org_id=org.id)
    request = httpx.Request("GET", "http://app.local/", headers={"Authorization": f"Bearer {token}"})
    options = AuthenticateRequestOptions(
        jwt_key=clerk.emulator.keys.public_key_pem(), authorized_parties=["http://localhost:3000"]
    )
    state = authenticate_request(request, options)
    assert state.is_signed_in, state.reason
    assert state.payload is not None
    assert state.payload["org_id"] == org.id
    assert state.payload["org_role"] == "admin"
