"""examples/saas end to end against the emulator: sign-up -> webhook -> pages, JIT, roles, impersonation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from examples.saas.app import create_app

from clerk_sync.config import Settings
from clerk_sync.testing import EmulatorServer
from tests._server import free_port, running


@dataclass
class World:
    clerk: EmulatorServer
    app: httpx.Client


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk", rate_limit_requests=1000) as clerk:
        settings = Settings.from_env({
            "DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
            "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url, "CLERK_ISSUER": clerk.url,
            "CLERK_AUTHORIZED_PARTIES": "http://localhost:3000",
        })
        with running(create_app(settings), port=port) as url, httpx.Client(base_url=url, timeout=30) as app:
            yield World(clerk, app)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_sign_up_webhook_then_protected_page(world: World) -> None:
    user = world.clerk.create_user("ada@example.com", first_name="Ada")
    world.clerk.wait_for_deliveries()
    assert world.app.get("/").status_code == 200
    assert world.app.get("/dashboard").status_code == 401
    page = world.app.get("/dashboard", headers=bearer(world.clerk.mint_session_token(user["id"])))
    assert page.status_code == 200
    assert page.json()["email"] == "ada@example.com"


def test_first_request_before_the_webhook_is_synced_just_in_time(world: World) -> None:
    world.clerk.set_webhook_url(None)  # the webhook is late
    user = world.clerk.create_user("late@example.com")
    page = world.app.get("/dashboard", headers=bearer(world.clerk.mint_session_token(user["id"])))
    assert page.status_code == 200
    assert page.json()["email"] == "late@example.com"


def test_promotion_and_immediate_demotion(world: World) -> None:
    admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    bob = world.clerk.create_user("bob@example.com")
    world.clerk.wait_for_deliveries()
    admin_tok = world.clerk.mint_session_token(admin["id"])
    bob_tok = world.clerk.mint_session_token(bob["id"])
    assert world.app.get("/admin/users", headers=bearer(bob_tok)).status_code == 403
    r = world.app.post(f"/admin/users/{bob['id']}/role", params={"role": "admin"}, headers=bearer(admin_tok))
    assert r.json() == {"user": bob["id"], "role": "admin", "status": "applied", "previous": "user"}
    assert world.app.get("/admin/users", headers=bearer(bob_tok)).status_code == 200  # same token, DB says admin
    world.app.post(f"/admin/users/{bob['id']}/role", params={"role": "user"}, headers=bearer(admin_tok))
    assert world.app.get("/admin/users", headers=bearer(bob_tok)).status_code == 403  # demotion is immediate
    assert world.clerk.request("GET", f"/v1/users/{bob['id']}")["public_metadata"]["role"] == "user"
    actions = [a["action"] for a in world.app.get("/admin/audit", headers=bearer(admin_tok)).json()]
    assert actions[:2] == ["role.changed", "role.changed"]


def test_org_page_lists_members_from_our_tables(world: World) -> None:
    owner = world.clerk.create_user("owner@example.com")
    member = world.clerk.create_user("member@example.com")
    org = world.clerk.create_organization("Acme", created_by=owner["id"])
    world.clerk.add_membership(org["id"], member["id"])
    world.clerk.wait_for_deliveries()
    page = world.app.get("/org", headers=bearer(world.clerk.mint_session_token(member["id"], org_id=org["id"])))
    assert page.status_code == 200
    assert page.json()["members"] == [{"email": "member@example.com", "role": "org:member"},
                                      {"email": "owner@example.com", "role": "org:admin"}]
    assert world.app.get("/org", headers=bearer(world.clerk.mint_session_token(member["id"]))).status_code == 403


def test_a_member_removed_from_the_org_is_refused_with_a_token_from_before(world: World) -> None:
    owner = world.clerk.create_user("owner@example.com")
    leaver = world.clerk.create_user("leaver@example.com")
    org = world.clerk.create_organization("Acme", created_by=owner["id"])
    world.clerk.add_membership(org["id"], leaver["id"])
    world.clerk.wait_for_deliveries()
    token = bearer(world.clerk.mint_session_token(leaver["id"], org_id=org["id"]))  # org claims for 60 s
    assert world.app.get("/org", headers=token).json()["your_role"] == "org:member"
    world.clerk.request("DELETE", f"/v1/organizations/{org['id']}/memberships/{leaver['id']}")
    world.clerk.wait_for_deliveries()  # organizationMembership.deleted applied
    refused = world.app.get("/org", headers=token)
    assert (refused.status_code, refused.json()["error"]) == (403, "access_denied")
    owner_page = world.app.get("/org", headers=bearer(world.clerk.mint_session_token(owner["id"], org_id=org["id"])))
    assert owner_page.json()["members"] == [{"email": "owner@example.com", "role": "org:admin"}]


def test_impersonation_is_granted_marked_guarded_and_audited(world: World) -> None:
    admin = world.clerk.create_user("boss@example.com", public_metadata={"role": "admin"})
    carol = world.clerk.create_user("carol@example.com")
    world.clerk.wait_for_deliveries()
    admin_tok = world.clerk.mint_session_token(admin["id"])
    grant = world.app.post(f"/admin/impersonate/{carol['id']}", headers=bearer(admin_tok)).json()
    assert grant["method"] == "actor_token"
    assert grant["expires_in_s"] <= 300
    audit = world.app.get("/admin/audit", headers=bearer(admin_tok)).json()
    granted = next(a for a in audit if a["action"] == "impersonation.granted")
    session = world.clerk.request("POST", f"/_emulator/actor_tokens/{granted['details']['grant_id']}/accept")
    as_carol = bearer(session["jwt"])
    page = world.app.get("/dashboard", headers=as_carol).json()
    assert (page["user"], page["impersonated_by"]) == (carol["id"], admin["id"])
    assert world.app.get("/billing", headers=as_carol).status_code == 403
    assert world.app.post(f"/admin/impersonate/{admin['id']}", headers=as_carol).status_code == 403
    carol_tok = world.clerk.mint_session_token(carol["id"])
    assert world.app.post(f"/admin/impersonate/{admin['id']}", headers=bearer(carol_tok)).status_code == 403
    actions = [a["action"] for a in world.app.get("/admin/audit", headers=bearer(admin_tok)).json()]
    assert "impersonation.request" in actions
    assert "impersonation.granted" in actions
    refused = next(a for a in world.app.get("/admin/audit", headers=bearer(admin_tok)).json()
                   if a["action"] == "impersonation.refused")
    assert (refused["actor_clerk_id"], refused["target_clerk_id"]) == (carol["id"], admin["id"])


def test_sync_me_right_after_sign_up_creates_the_row_before_the_webhook(world: World) -> None:
    world.clerk.set_webhook_url(None)
    user = world.clerk.create_user("fresh@example.com", public_metadata={"role": "user"})
    tok = bearer(world.clerk.mint_session_token(user["id"]))
    assert world.app.post("/sync/me").status_code == 401
    synced = world.app.post("/sync/me", headers=tok)
    assert synced.json() == {"user_id": user["id"], "email": "fresh@example.com", "role": "user"}
    world.clerk.request("PATCH", f"/v1/users/{user['id']}", json={"public_metadata": {"role": "admin"}})
    again = world.app.post("/sync/me", headers=tok)  # asked again at once: the stored row, no Clerk call
    assert again.json() == synced.json()  # (JitUsers.refresh_interval_s: one fetch per user per 10 s)
    other = world.clerk.create_user("other@example.com")
    other_tok = bearer(world.clerk.mint_session_token(other["id"]))
    world.clerk.request("DELETE", f"/v1/users/{other['id']}")
    gone = world.app.post("/sync/me", headers=other_tok)
    assert gone.status_code == 410  # deleted in Clerk: UserDeleted


def test_one_command_runs_the_example_seeded_before_it_prints_tokens(tmp_path: Path) -> None:
    """``python -m examples.saas``: the app listens before the seed, the seed is applied before the tokens
    are printed (the member's /org lists both members at once), and no database is left in the cwd."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k not in ("DATABASE_URL", "EXAMPLE_DB")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "examples.saas", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout is None:
            raise AssertionError("no stdout pipe")
        lines: list[str] = []
        while not any(line.startswith("try:") for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        tokens = {m[1]: m[2] for m in re.finditer(r"^(admin|member) token +\(60 s\): (\S+)$", "".join(lines), re.M)}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            org = http.get("/org", headers=bearer(tokens["member"]))
            page = http.get("/dashboard", headers=bearer(tokens["admin"]))
        assert org.status_code == 200, org.text
        assert [m["email"] for m in org.json()["members"]] == ["admin@example.com", "member@example.com"]
        assert (page.status_code, page.json()["role"]) == (200, "admin")
        assert list(tmp_path.iterdir()) == []  # a fresh database elsewhere each run, nothing stale in the cwd
    finally:
        proc.terminate()
        proc.wait(10)
