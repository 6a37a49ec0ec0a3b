"""``require_permission("org:sys_memberships:read")`` could never pass: Clerk's session tokens carry an
organization's custom permissions only, never its system ones (``org:sys_*``), so the guard answered 403 to
every member, admins included, and nothing said why (B2B walkthrough). Every face that offers it now refuses a
system permission when the guard is made, pointing to the organization-role guard; a custom one is kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.views import View

from clerk_sync.auth.authenticator import Authenticator
from clerk_sync.auth.claims import Auth
from clerk_sync.integrations.django import decorators
from clerk_sync.integrations.django.mixins import OrgPermissionRequiredMixin
from clerk_sync.integrations.django.rest_framework import HasPermission
from clerk_sync.integrations.fastapi import ClerkAuth
from clerk_sync.integrations.flask import require_permission as flask_require_permission
from tests.test_auth import Harness

SYSTEM = "org:sys_memberships:read"
ADVICE = r"system permission.*never carry.*require_org_role"


def test_every_face_refuses_a_system_permission_when_the_guard_is_made(tmp_path: Path) -> None:
    clerk = ClerkAuth(Harness(f"sqlite:///{tmp_path / 'auth.db'}").auth)
    with pytest.raises(ValueError, match=ADVICE):
        clerk.require_permission(SYSTEM)
    with pytest.raises(ValueError, match=ADVICE):
        flask_require_permission(SYSTEM)
    with pytest.raises(ValueError, match=ADVICE):
        decorators.require_permission(SYSTEM)
    with pytest.raises(ValueError, match=ADVICE):
        HasPermission.of(SYSTEM)
    with pytest.raises(ValueError, match=ADVICE):

        class Members(OrgPermissionRequiredMixin, View):
            required_permission = SYSTEM

    auth = Auth(user_id="user_1", session_id="sess_1", expires_at=2_000_000_000, org_id="org_1", org_role="org:admin",
                org_permissions=(SYSTEM,))
    with pytest.raises(ValueError, match=ADVICE):  # the direct API too (even a token that claimed one)
        Authenticator.require_permission(auth, SYSTEM)


def test_a_custom_permission_is_still_a_guard(tmp_path: Path) -> None:
    clerk = ClerkAuth(Harness(f"sqlite:///{tmp_path / 'auth.db'}").auth)
    assert callable(clerk.require_permission("org:invoices:read"))
    assert callable(flask_require_permission("org:invoices:read"))
    assert callable(decorators.require_permission("org:invoices:read"))
    assert HasPermission.of("org:invoices:read").permission == "org:invoices:read"

    class Invoices(OrgPermissionRequiredMixin, View):
        required_permission = "org:invoices:read"

    auth = Auth(user_id="user_1", session_id="sess_1", expires_at=2_000_000_000, org_id="org_1", org_role="org:admin",
                org_permissions=("org:invoices:read",))
    assert Authenticator.require_permission(auth, "org:invoices:read") is auth
