"""The Django face: async JIT under WSGI, DRF's user protocol and public views,
the management commands' store, banned users' Django accounts."""

from __future__ import annotations

import time
from io import StringIO

import jwt
import sqlalchemy as sa
from django.core.management import call_command
from django.test import Client, override_settings

from clerk_sync.auth.claims import Auth
from clerk_sync.changes import Hook
from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.mapping import MappedTable, SchemaMapping
from clerk_sync.tables import hook_jobs, users, webhook_events
from tests import factories as f
from tests.django.conftest import World, bearer, emulator_settings, world_for


def test_async_views_sync_users_just_in_time_request_after_request(world: World) -> None:
    """Fixed: one async Clerk client served every request, but under WSGI each async view runs
    on a new event loop, so the second JIT fetch failed with "Event loop is closed" (500). Under ASGI
    the fetch still runs on the server's one loop."""
    clerk, app = world.clerk, world.app
    clerk.set_webhook_url(None)  # no rows: each request fetches its user from Clerk
    users = [clerk.create_user(f"u{i}@example.com") for i in range(3)]
    for user in users:
        page = app.get("/t/async/me", headers=bearer(clerk.mint_session_token(user["id"])))
        assert page.status_code == 200, page.content
        assert page.json()["user"] == user["id"]
    assert (get_clerk_sync()._aclerk_loop is not None) is (world.transport == "asgi")


def test_drf_throttles_and_admin_checks_work_for_a_clerk_principal(client_world: World) -> None:
    """Fixed: without ``ClerkBackend``, ``request.user`` is a ``ClerkPrincipal``, which had no
    ``pk`` or ``is_staff``: DRF's ``UserRateThrottle`` and ``IsAdminUser`` answered 500."""
    from django.core.cache import cache

    from clerk_sync.integrations.django.rest_framework import ClerkPrincipal

    clerk, app = client_world.clerk, client_world.app
    ada, bob = clerk.create_user("ada@example.com"), clerk.create_user("bob@example.com")
    clerk.wait_for_deliveries()
    as_ada, as_bob = bearer(clerk.mint_session_token(ada["id"])), bearer(clerk.mint_session_token(bob["id"]))
    cache.clear()
    with override_settings(AUTHENTICATION_BACKENDS=["django.contrib.auth.backends.ModelBackend"]):
        assert [app.get("/t/drf/throttled", headers=as_ada).status_code for _ in range(3)] == [200, 200, 429]
        assert app.get("/t/drf/throttled", headers=as_bob).json() == {"user": bob["id"]}  # per user: bob's own
        refused = app.get("/t/drf/staff-only", headers=as_ada)
        assert refused.status_code == 403  # signed in, not staff: no 500, no 401
    principal = ClerkPrincipal(Auth(user_id="user_1", session_id="sess_1", expires_at=0))
    assert (principal.pk, principal.get_username(), principal.is_active) == ("user_1", "user_1", True)
    assert not (principal.is_staff or principal.is_superuser or principal.has_perm("auth.add_user")
                or principal.has_perms(["auth.add_user"]) or principal.has_module_perms("auth"))


def _expired(world: World, user_id: str) -> str:
    claims = jwt.decode(world.clerk.mint_session_token(user_id), options={"verify_signature": False})
    now = int(time.time())
    return world.clerk.emulator.keys.sign({**claims, "exp": now - 60, "iat": now - 120, "nbf": now - 130})


def test_drf_public_views_serve_an_expired_cookie_as_anonymous(db_url: str) -> None:
    """Fixed: a DRF view open to all (``AllowAny``) answered 401 ``token_expired`` to a visitor
    with an expired ``__session`` cookie, where Django, FastAPI and Flask serve them signed out. Protected
    views still answer 401 with the cookie's error; an expired Bearer token is still refused."""
    with world_for(db_url, "test-client", REQUIRE_AUTH=False) as world:  # DRF decides, not the middleware
        ada = world.clerk.create_user("ada@example.com", public_metadata={"role": "admin"})
        world.clerk.wait_for_deliveries()
        expired = _expired(world, ada["id"])
        browser = Client()
        browser.cookies["__session"] = expired
        assert browser.get("/t/drf/open").json() == {"signed_in": False}
        for path in ("/t/drf/admin", "/t/drf/org-admin"):  # Clerk permission classes: the cookie's error
            refused = browser.get(path)
            assert (refused.status_code, refused.json()["error"]) == (401, "token_expired"), path
        drf_own = browser.get("/t/drf/django-authenticated")  # DRF's IsAuthenticated: 401, not 403
        assert (drf_own.status_code, drf_own["WWW-Authenticate"]) == (401, "Bearer")
        forged = Client().get("/t/drf/open", headers=bearer(expired))
        assert (forged.status_code, forged.json()["error"]) == (401, "token_expired")
        browser.cookies["__session"] = world.clerk.mint_session_token(ada["id"])
        assert browser.get("/t/drf/open").json() == {"signed_in": True}
        assert browser.get("/t/drf/admin").json() == {"admin": ada["id"]}


def _django_flags(clerk_id: str) -> tuple[bool, bool, bool]:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username=clerk_id)
    return user.is_active, user.is_staff, user.is_superuser


def test_a_banned_or_deleted_clerk_user_loses_its_django_account_and_login_session(client_world: World) -> None:
    """Fixed: the backend refused a banned or deleted row before copying its flags, so the Django
    user stayed active (and staff), and a Django login session (``login()``) outlived the ban."""
    from django.contrib.auth import get_user_model

    clerk, app = client_world.clerk, client_world.app
    backend = "clerk_sync.integrations.django.backends.ClerkBackend"
    ada = clerk.create_user("ada@example.com", public_metadata={"role": "admin"})
    bob = clerk.create_user("bob@example.com", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    as_bob = bearer(clerk.mint_session_token(bob["id"]))
    with override_settings(CLERK_SYNC={**emulator_settings(clerk), "DENY_LIST_REFRESH_S": 3600}):
        for who in (ada, bob):
            page = app.get("/t/django-login-required", headers=bearer(clerk.mint_session_token(who["id"])))
            assert page.json()["is_staff"] is True
        logged_in = Client()  # a Django login session, as an app's own login() makes
        logged_in.force_login(get_user_model().objects.get(username=ada["id"]), backend=backend)
        assert logged_in.get("/t/django-login-required").status_code == 200

        clerk.request("POST", f"/v1/users/{ada['id']}/ban")
        clerk.request("DELETE", f"/v1/users/{bob['id']}")
        clerk.wait_for_deliveries()
        assert logged_in.get("/t/django-login-required").status_code == 302  # to the login page
        assert _django_flags(ada["id"]) == (False, False, False)
        # bob's token passes the (stale) deny list; the row refuses it, and the backend deactivates him
        assert app.get("/t/django-login-required", headers=as_bob).status_code == 302
        assert _django_flags(bob["id"]) == (False, False, False)


def only_email(row: object) -> dict[str, object]:
    """A USER_FIELDS that leaves is_active and the staff flags to the app."""
    return {"email": getattr(row, "email", None) or ""}


def test_a_login_session_ends_with_its_purged_row_and_an_unban_lets_the_user_back(client_world: World) -> None:
    """A gap in the fix above: ``get_user`` let a login session through once the user's row was purged
    (hard-deleted tombstone); and with a USER_FIELDS that does not copy ``is_active``, the deactivation of a
    ban was never undone (locked out for good after the unban)."""
    from django.contrib.auth import get_user_model

    clerk, app = client_world.clerk, client_world.app
    backend = "clerk_sync.integrations.django.backends.ClerkBackend"
    cy = clerk.create_user("cy@example.com")
    di = clerk.create_user("di@example.com")
    clerk.wait_for_deliveries()
    fields = {**emulator_settings(clerk), "USER_FIELDS": "tests.django.test_async_jit_drf_and_banned_users.only_email"}
    with override_settings(CLERK_SYNC=fields):
        for who in (cy, di):
            assert app.get("/t/django-login-required",
                           headers=bearer(clerk.mint_session_token(who["id"]))).status_code == 200
        purged, banned = Client(), Client()
        purged.force_login(get_user_model().objects.get(username=cy["id"]), backend=backend)
        banned.force_login(get_user_model().objects.get(username=di["id"]), backend=backend)
        with get_clerk_sync().store.transaction() as w:  # the tombstone purged by retention
            w.conn.execute(users.delete().where(users.c.clerk_id == cy["id"]))
        assert purged.get("/t/django-login-required").status_code == 302
        assert _django_flags(cy["id"])[0] is True  # refused, not rewritten: no row says what it should be

        clerk.request("POST", f"/v1/users/{di['id']}/ban")
        clerk.wait_for_deliveries()
        assert banned.get("/t/django-login-required").status_code == 302
        assert _django_flags(di["id"])[0] is True  # is_active is the app's here: left alone
        clerk.request("POST", f"/v1/users/{di['id']}/unban")
        clerk.wait_for_deliveries()
        assert banned.get("/t/django-login-required").status_code == 200  # back in once unbanned


def test_require_auth_with_a_subclass_of_clerk_middleware_is_no_check_error() -> None:
    """Fixed (E005): an app's own subclass of ClerkMiddleware was taken for no middleware at all."""
    from django.conf import settings

    from clerk_sync.integrations.django.checks import check_settings
    from tests.conftest import SECRET
    from tests.test_sessions import KEY, pem

    order = [m if "ClerkMiddleware" not in m else "tests.django.test_async_jit_drf_and_banned_users.MyClerkMiddleware"
             for m in settings.MIDDLEWARE]
    base = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY), "REQUIRE_AUTH": True,
            "CLERK_AUTHORIZED_PARTIES": "https://app.example.com"}
    with override_settings(MIDDLEWARE=order, CLERK_SYNC=base):
        assert check_settings() == []
    with override_settings(CLERK_SYNC={**base, "CLERK_WEBHOOK_SECRET": [SECRET, SECRET]}):
        assert check_settings() == []  # a rotation list under the alias too


from clerk_sync.integrations.django.middleware import ClerkMiddleware  # noqa: E402


class MyClerkMiddleware(ClerkMiddleware):
    """An app's own (the check above)."""


#: Loaded by dotted path from CLERK_SYNC["MAPPING"] / ["HOOKS"] in the test below.
ACCOUNTS = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"}))
HOOKS = [Hook("welcome", lambda change: None, on=["user.created"]),
         Hook("roles", lambda change: None, on=["user.updated"])]


def test_manage_py_commands_write_the_mapped_table_and_queue_hooks_as_configured(db_url: str) -> None:
    """Fixed: ``manage.py clerk_sync replay|reconcile|promote`` built a store without
    ``CLERK_SYNC["MAPPING"]``/``["HOOKS"]``: a replay never wrote the app's table, a promotion queued
    no hook. Replay and reconcile fire hooks only with ``--with-hooks``, as the CLI does."""
    from clerk_sync.mapping import migrate_schema

    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("email", sa.String(320)))
    paths = {"MAPPING": "tests.django.test_async_jit_drf_and_banned_users.ACCOUNTS", "HOOKS": "tests.django.test_async_jit_drf_and_banned_users.HOOKS"}
    with world_for(db_url, "test-client", **paths) as world:
        clerk, store = world.clerk, world.store
        with store.engine.begin() as conn:
            accounts.create(conn)
            migrate_schema(conn, ACCOUNTS)
        clerk.set_webhook_url(None)  # deliveries arrive by hand below

        def mapped() -> set[str]:
            with store.connect() as conn:
                return set(conn.execute(sa.text("SELECT email FROM accounts")).scalars())

        def jobs() -> list[str]:
            with store.connect() as conn:
                return list(conn.execute(sa.select(hook_jobs.c.hook).order_by(hook_jobs.c.id)).scalars())

        def stored_failed(email: str, svix_id: str) -> None:
            """A ``user.created`` delivery stored ``failed`` that nothing was written for (yet)."""
            user = clerk.create_user(email)
            event = f.envelope("user.created", clerk.request("GET", f"/v1/users/{user['id']}"))
            assert get_clerk_sync().processor.process(*f.signed(event, svix_id, secret=clerk.webhook_secret)).status == "applied"
            with store.transaction() as w:
                w.conn.execute(users.delete().where(users.c.clerk_id == user["id"]))
                w.conn.execute(sa.text("DELETE FROM accounts WHERE clerk_user_id = :id"), {"id": user["id"]})
                w.conn.execute(hook_jobs.delete())
                w.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == svix_id).values(status="failed"))

        out = StringIO()
        stored_failed("ada@example.com", "msg_ada")
        call_command("clerk_sync", "replay", stdout=out)
        assert (mapped(), jobs()) == ({"ada@example.com"}, [])  # mapped; no hook fires on a replay
        stored_failed("bob@example.com", "msg_bob")
        call_command("clerk_sync", "replay", "--with-hooks", stdout=out)
        assert (mapped(), jobs()) == ({"ada@example.com", "bob@example.com"}, ["welcome"])

        call_command("clerk_sync", "promote", "bob@example.com", "--role", "admin", stdout=out)
        assert jobs() == ["welcome", "roles"]  # an admin action queues the hooks, as in the admin

        clerk.create_user("late@example.com")
        call_command("clerk_sync", "reconcile", stdout=out)
        assert "late@example.com" in mapped() and jobs() == ["welcome", "roles"]
        clerk.create_user("later@example.com")
        call_command("clerk_sync", "reconcile", "--with-hooks", stdout=out)
        assert "later@example.com" in mapped() and jobs()[-1] == "welcome"


def test_two_values_of_the_session_cookie_are_refused_as_on_the_other_faces(world: World) -> None:
    """Fixed (cookie tossing): Django keeps the last of two ``__session`` cookies where werkzeug
    keeps the first, so ``__session=<valid>; __session=garbage`` was 401 here and 200 under Flask."""
    clerk, app = world.clerk, world.app
    ada = clerk.create_user("ada@example.com")
    valid = clerk.mint_session_token(ada["id"])
    for values in ([valid, "garbage"], ["garbage", valid]):
        refused = app.get("/t/async/me", headers={"Cookie": "; ".join(f"__session={v}" for v in values)})
        assert (refused.status_code, refused.json()["error"]) == (401, "token_malformed"), values
    assert app.get("/t/async/me", headers={"Cookie": f"__session={valid}"}).json()["user"] == ada["id"]
