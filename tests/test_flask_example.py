"""examples/flask_saas end to end against the emulator, through Flask's test client and a real server.

The emulator delivers webhooks over HTTP to the app served on loopback (werkzeug); the pages are
requested either through ``app.test_client()`` or over HTTP to the same server.
"""

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
from examples.flask_saas.app import create_app

from clerk_sync.config import Settings
from clerk_sync.integrations.flask import clerk_state
from clerk_sync.testing import EmulatorServer
from tests._flask import Pages, running_wsgi
from tests._server import free_port


@dataclass
class World:
    clerk: EmulatorServer
    app: Pages


@pytest.fixture(params=["test_client", "server"])
def world(request: pytest.FixtureRequest, db_url: str) -> Iterator[World]:
    port = free_port()
    with EmulatorServer(webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk", rate_limit_requests=1000) as clerk:
        settings = Settings.from_env({
            "DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
            "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url, "CLERK_ISSUER": clerk.url,
            "CLERK_AUTHORIZED_PARTIES": "http://localhost:3000",
        })
        app = create_app(settings)
        with running_wsgi(app, port) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield World(clerk, Pages(app, http if request.param == "server" else None))
        clerk_state(app).close()


def test_sign_up_webhook_then_protected_page(world: World) -> None:
    user = world.clerk.create_user("ada@example.com", first_name="Ada")
    world.clerk.wait_for_deliveries()
    assert world.app.get("/").status == 200
    assert world.app.get("/dashboard").status == 401
    assert world.app.get("/not-a-page").status == 401  # deny by default, before revealing what exists
    page = world.app.get("/dashboard", world.clerk.mint_session_token(user["id"]))
    assert page.status == 200
    assert (page.json["email"], page.json["role"], page.json["impersonated_by"]) == ("ada@example.com", "user", None)


def test_first_request_before_the_webhook_is_synced_just_in_time(world: World) -> None:
    world.clerk.set_webhook_url(None)  # the webhook is late
    user = world.clerk.create_user("late@example.com")
    page = world.app.get("/dashboard", world.clerk.mint_session_token(user["id"]))
    assert page.status == 200
    assert page.json["email"] == "late@example.com"


def test_promotion_and_demotion_on_the_next_request(world: World) -> None:
    admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    bob = world.clerk.create_user("bob@example.com")
    world.clerk.wait_for_deliveries()
    admin_tok = world.clerk.mint_session_token(admin["id"])
    bob_tok = world.clerk.mint_session_token(bob["id"])
    assert world.app.get("/admin/users", bob_tok).status == 403
    r = world.app.post(f"/admin/users/{bob['id']}/role", admin_tok, role="admin")
    assert r.json == {"user": bob["id"], "role": "admin", "status": "applied", "previous": "user"}
    assert world.app.get("/admin/users", bob_tok).status == 200  # same token, the DB says admin
    world.app.post(f"/admin/users/{bob['id']}/role", admin_tok, role="user")
    refused = world.app.get("/admin/users", bob_tok)
    assert (refused.status, refused.json["error"]) == (403, "access_denied")  # demotion: the next request
    assert world.clerk.request("GET", f"/v1/users/{bob['id']}")["public_metadata"]["role"] == "user"
    actions = [a["action"] for a in world.app.get("/admin/audit", admin_tok).json]
    assert actions[:2] == ["role.changed", "role.changed"]


def test_org_page_lists_members_from_our_tables(world: World) -> None:
    owner = world.clerk.create_user("owner@example.com")
    member = world.clerk.create_user("member@example.com")
    org = world.clerk.create_organization("Acme", created_by=owner["id"])
    world.clerk.add_membership(org["id"], member["id"])
    world.clerk.wait_for_deliveries()
    page = world.app.get("/org", world.clerk.mint_session_token(member["id"], org_id=org["id"]))
    assert page.status == 200
    assert page.json["members"] == [{"email": "member@example.com", "role": "org:member"},
                                    {"email": "owner@example.com", "role": "org:admin"}]
    assert world.app.get("/org", world.clerk.mint_session_token(member["id"])).status == 403


def test_a_member_removed_from_the_org_is_refused_with_a_token_from_before(world: World) -> None:
    owner = world.clerk.create_user("owner@example.com")
    leaver = world.clerk.create_user("leaver@example.com")
    org = world.clerk.create_organization("Acme", created_by=owner["id"])
    world.clerk.add_membership(org["id"], leaver["id"])
    world.clerk.wait_for_deliveries()
    token = world.clerk.mint_session_token(leaver["id"], org_id=org["id"])  # org claims for 60 s
    assert world.app.get("/org", token).json["your_role"] == "org:member"
    world.clerk.request("DELETE", f"/v1/organizations/{org['id']}/memberships/{leaver['id']}")
    world.clerk.wait_for_deliveries()  # organizationMembership.deleted applied
    refused = world.app.get("/org", token)
    assert (refused.status, refused.json["error"]) == (403, "access_denied")
    owner_page = world.app.get("/org", world.clerk.mint_session_token(owner["id"], org_id=org["id"]))
    assert owner_page.json["members"] == [{"email": "owner@example.com", "role": "org:admin"}]


def test_a_role_change_without_a_role_is_a_bad_request(world: World) -> None:
    admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    world.clerk.wait_for_deliveries()
    answer = world.app.post(f"/admin/users/{admin['id']}/role", world.clerk.mint_session_token(admin["id"]))
    assert (answer.status, answer.json["error"]) == (400, "bad_request")


def test_impersonation_is_granted_marked_guarded_and_audited(world: World) -> None:
    admin = world.clerk.create_user("boss@example.com", public_metadata={"role": "admin"})
    carol = world.clerk.create_user("carol@example.com")
    world.clerk.wait_for_deliveries()
    admin_tok = world.clerk.mint_session_token(admin["id"])
    grant = world.app.post(f"/admin/impersonate/{carol['id']}", admin_tok).json
    assert grant["method"] == "actor_token"
    assert grant["expires_in_s"] <= 300
    audit = world.app.get("/admin/audit", admin_tok).json
    granted = next(a for a in audit if a["action"] == "impersonation.granted")
    assert (granted["actor_clerk_id"], granted["target_clerk_id"]) == (admin["id"], carol["id"])
    session = world.clerk.request("POST", f"/_emulator/actor_tokens/{granted['details']['grant_id']}/accept")
    as_carol = session["jwt"]
    page = world.app.get("/dashboard", as_carol).json
    assert (page["user"], page["impersonated_by"]) == (carol["id"], admin["id"])
    assert world.app.get("/billing", as_carol).status == 403  # refused while impersonating
    assert world.app.get("/billing", world.clerk.mint_session_token(carol["id"])).status == 200
    requests = [(a["impersonator_clerk_id"], a["target_clerk_id"], a["details"]["path"])
                for a in world.app.get("/admin/audit", admin_tok).json if a["action"] == "impersonation.request"]
    assert requests == [(admin["id"], carol["id"], "/billing"), (admin["id"], carol["id"], "/dashboard")]


def test_a_non_admin_is_refused_and_the_refusal_audited(world: World) -> None:
    admin = world.clerk.create_user("chief@example.com", public_metadata={"role": "admin"})
    dave = world.clerk.create_user("dave@example.com")
    world.clerk.wait_for_deliveries()
    refused = world.app.post(f"/admin/impersonate/{admin['id']}", world.clerk.mint_session_token(dave["id"]))
    assert (refused.status, refused.json["error"]) == (403, "access_denied")
    assert world.app.post(f"/admin/users/{admin['id']}/role", world.clerk.mint_session_token(dave["id"]),
                          role="user").status == 403
    audit = world.app.get("/admin/audit", world.clerk.mint_session_token(admin["id"])).json
    entry = next(a for a in audit if a["action"] == "impersonation.refused")
    assert (entry["actor_clerk_id"], entry["target_clerk_id"]) == (dave["id"], admin["id"])
    assert world.clerk.request("GET", f"/v1/users/{admin['id']}")["public_metadata"]["role"] == "admin"


def test_sync_me_right_after_sign_up_creates_the_row_before_the_webhook(world: World) -> None:
    world.clerk.set_webhook_url(None)
    user = world.clerk.create_user("fresh@example.com", public_metadata={"role": "user"})
    tok = world.clerk.mint_session_token(user["id"])
    assert world.app.post("/sync/me").status == 401
    assert world.app.post("/sync/me", tok).json == {"user_id": user["id"], "email": "fresh@example.com", "role": "user"}
    world.clerk.request("PATCH", f"/v1/users/{user['id']}", json={"public_metadata": {"role": "admin"}})
    # asked again at once: the stored row, no Clerk call (JitUsers.refresh_interval_s: one fetch a user per 10 s)
    assert world.app.post("/sync/me", tok).json["role"] == "user"
    other = world.clerk.create_user("other@example.com")
    other_tok = world.clerk.mint_session_token(other["id"])
    world.clerk.request("DELETE", f"/v1/users/{other['id']}")
    assert world.app.post("/sync/me", other_tok).status == 410  # deleted in Clerk: UserDeleted


def test_one_command_runs_the_example_against_the_emulator(tmp_path: Path) -> None:
    """Serving before the seed, the seed applied before the tokens are printed (the member's /org lists
    both members at once), and no database left in the working directory."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k not in ("DATABASE_URL", "EXAMPLE_DB")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "examples.flask_saas", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout is None:
            raise AssertionError("no stdout pipe")
        lines: list[str] = []
        while not any(line.startswith("try:") for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        out = "".join(lines)
        assert f"example app (Flask): http://127.0.0.1:{port}" in out, out
        tokens = {m[1]: m[2] for m in re.finditer(r"^(admin|member) token +\(60 s\): (\S+)$", out, re.M)}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/").status_code == 200
            page = http.get("/dashboard", headers={"Authorization": f"Bearer {tokens['admin']}"})
            assert (page.status_code, page.json()["email"], page.json()["role"]) == (200, "admin@example.com", "admin")
            org = http.get("/org", headers={"Authorization": f"Bearer {tokens['member']}"})
            assert org.status_code == 200, org.text
            assert [m["email"] for m in org.json()["members"]] == ["admin@example.com", "member@example.com"]
        assert list(tmp_path.iterdir()) == []  # a fresh database elsewhere each run, nothing stale in the cwd
    finally:
        proc.terminate()
        proc.wait(10)
