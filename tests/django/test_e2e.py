"""examples/django_saas end to end against the emulator, through Django's real request handling:
the test client, the WSGI app under a threaded server and the ASGI app under uvicorn."""

from __future__ import annotations

from clerk_sync.auth.users import read_user
from tests.django.conftest import World, bearer


def test_sign_up_webhook_then_protected_page(world: World) -> None:
    user = world.clerk.create_user("ada@example.com", first_name="Ada")
    world.clerk.wait_for_deliveries()
    assert read_user(world.store, user["id"]) is not None  # the webhook reached the Django view
    assert world.app.get("/").status_code == 200
    refused = world.app.get("/dashboard")
    assert refused.status_code == 401 and refused.json()["error"] == "token_missing"
    page = world.app.get("/dashboard", headers=bearer(world.clerk.mint_session_token(user["id"])))
    assert page.status_code == 200
    assert page.json() == {"user": user["id"], "email": "ada@example.com", "role": "user", "plan": "free",
                           "impersonated_by": None, "django_user": user["id"]}
    api = world.app.get("/api/me", headers=bearer(world.clerk.mint_session_token(user["id"])))
    assert api.json() == {"user": user["id"], "django_user": user["id"]}


def test_first_request_before_the_webhook_is_synced_just_in_time(world: World) -> None:
    world.clerk.set_webhook_url(None)  # the webhook is late
    user = world.clerk.create_user("late@example.com")
    assert read_user(world.store, user["id"]) is None
    page = world.app.get("/dashboard", headers=bearer(world.clerk.mint_session_token(user["id"])))
    assert page.status_code == 200
    assert page.json()["email"] == "late@example.com"
    row = read_user(world.store, user["id"])
    assert row is not None and row.email == "late@example.com"


def test_promotion_and_demotion_on_the_next_request(world: World) -> None:
    admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    bob = world.clerk.create_user("bob@example.com")
    world.clerk.wait_for_deliveries()
    admin_tok = bearer(world.clerk.mint_session_token(admin["id"]))
    bob_tok = bearer(world.clerk.mint_session_token(bob["id"]))
    assert world.app.get("/admin/users", headers=bob_tok).status_code == 403
    r = world.app.post(f"/admin/users/{bob['id']}/role?role=admin", headers=admin_tok)
    assert r.json() == {"user": bob["id"], "role": "admin", "status": "applied", "previous": "user"}
    assert world.app.get("/admin/users", headers=bob_tok).status_code == 200  # same token, DB says admin
    world.app.post(f"/admin/users/{bob['id']}/role?role=user", headers=admin_tok)
    assert world.app.get("/admin/users", headers=bob_tok).status_code == 403  # demotion: the next request
    assert world.clerk.request("GET", f"/v1/users/{bob['id']}")["public_metadata"]["role"] == "user"
    actions = [a["action"] for a in world.app.get("/admin/audit", headers=admin_tok).json()]
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


def test_impersonation_granted_guarded_and_audited_and_non_admin_refused(world: World) -> None:
    admin = world.clerk.create_user("boss@example.com", public_metadata={"role": "admin"})
    carol = world.clerk.create_user("carol@example.com")
    world.clerk.wait_for_deliveries()
    admin_tok = bearer(world.clerk.mint_session_token(admin["id"]))
    grant = world.app.post(f"/admin/impersonate/{carol['id']}", headers=admin_tok).json()
    assert grant["method"] == "actor_token" and grant["expires_in_s"] <= 300
    audit = world.app.get("/admin/audit", headers=admin_tok).json()
    granted = next(a for a in audit if a["action"] == "impersonation.granted")
    assert (granted["actor_clerk_id"], granted["target_clerk_id"]) == (admin["id"], carol["id"])
    session = world.clerk.request("POST", f"/_emulator/actor_tokens/{granted['details']['grant_id']}/accept")
    as_carol = bearer(session["jwt"])
    page = world.app.get("/dashboard", headers=as_carol).json()
    assert (page["user"], page["impersonated_by"]) == (carol["id"], admin["id"])
    assert world.app.get("/billing", headers=as_carol).status_code == 403
    assert world.app.post(f"/admin/impersonate/{admin['id']}", headers=as_carol).status_code == 403
    carol_tok = bearer(world.clerk.mint_session_token(carol["id"]))
    refused = world.app.post(f"/admin/impersonate/{admin['id']}", headers=carol_tok)
    assert refused.status_code == 403 and refused.json()["error"] == "access_denied"
    audit = world.app.get("/admin/audit", headers=admin_tok).json()
    requests = [a for a in audit if a["action"] == "impersonation.request"]
    assert {(a["actor_clerk_id"], a["impersonator_clerk_id"], a["target_clerk_id"]) for a in requests} == {
        (admin["id"], admin["id"], carol["id"])}
    # one row per request (the middleware audited a second time what clerk_request had: review)
    assert sorted(a["details"]["path"] for a in requests) == sorted(
        ["/dashboard", "/billing", f"/admin/impersonate/{admin['id']}"])
    refusal = next(a for a in audit if a["action"] == "impersonation.refused")
    assert (refusal["actor_clerk_id"], refusal["target_clerk_id"]) == (carol["id"], admin["id"])


def test_sync_me_right_after_sign_up_creates_the_row_before_the_webhook(world: World) -> None:
    world.clerk.set_webhook_url(None)
    user = world.clerk.create_user("fresh@example.com", public_metadata={"role": "user"})
    tok = bearer(world.clerk.mint_session_token(user["id"]))
    assert world.app.post("/sync/me").status_code == 401
    synced = world.app.post("/sync/me", headers=tok)
    assert synced.json() == {"user_id": user["id"], "email": "fresh@example.com", "role": "user"}
    world.clerk.request("PATCH", f"/v1/users/{user['id']}", json={"public_metadata": {"role": "admin"}})
    again = world.app.post("/sync/me", headers=tok)  # asked again at once: the stored row, no Clerk call
    assert again.json() == synced.json()  # (JitUsers.refresh_interval_s: one fetch a user per 10 s)
    other = world.clerk.create_user("other@example.com")
    other_tok = bearer(world.clerk.mint_session_token(other["id"]))
    world.clerk.request("DELETE", f"/v1/users/{other['id']}")
    assert world.app.post("/sync/me", headers=other_tok).status_code == 410  # deleted in Clerk: UserDeleted
