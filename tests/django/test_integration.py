"""The rest of the Django surface: settings, checks, ``manage.py clerk_sync``, the admin pages, the
user backend, DRF, async views, guards without the middleware, CSRF and laziness."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

import pytest
import sqlalchemy as sa
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.test import Client, override_settings

from clerk_sync.auth.users import read_user
from clerk_sync.changes import Hook
from clerk_sync.config import DEFAULT_DATABASE_URL
from clerk_sync.errors import ConfigError
from clerk_sync.integrations.django.checks import check_settings
from clerk_sync.integrations.django.conf import clerk_settings, database_url_from_django, django_options
from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.tables import audit_log, webhook_events
from tests import factories as f
from tests.conftest import SECRET
from tests.django.conftest import World, bearer, emulator_settings, world_for
from tests.test_sessions import KEY, pem

# -- settings ---------------------------------------------------------------------------------------


@pytest.fixture
def app_database(tmp_path: Any) -> Iterator[None]:
    """An app's file database as ``DATABASES['default']`` (tests/django/settings.py has ``:memory:``, which
    clerk-sync refuses outside Django's test environment: a check error of its own). These tests passed in the
    full run only because an earlier test had left Django's ``default`` connection on a file."""
    database = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "app.db")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting DATABASES", UserWarning)
        with override_settings(DATABASES={"default": database}):
            yield


def test_clerk_sync_keys_win_over_the_environment_and_fall_back_to_it() -> None:
    env = {"CLERK_WEBHOOK_SECRET": "whsec_env", "CLERK_ISSUER": "https://env.example", "DATABASE_URL": "sqlite:///env.db"}
    with override_settings(CLERK_SYNC={"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_SYNC_MAX_BODY_BYTES": 10}):
        settings = clerk_settings(env)
    assert settings.webhook_secret is not None and settings.webhook_secret.get_secret_value() == SECRET
    assert (settings.clerk_issuer, settings.database_url, settings.max_body_bytes) == ("https://env.example", "sqlite:///env.db", 10)


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")
def test_database_url_defaults_to_djangos_database() -> None:
    with override_settings(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/app.db"}}):
        assert clerk_settings({}).database_url == "sqlite:////srv/app.db"
    pg = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "USER": "me", "PASSWORD": "p@ss", "HOST": "db",
          "PORT": 5433, "OPTIONS": {"options": "-csearch_path=s1"}}
    assert database_url_from_django(pg) == "postgresql+psycopg://me:p%40ss@db:5433/app?options=-csearch_path%3Ds1"
    for memory in (":memory:", "file:memorydb_default?mode=memory&cache=shared"):  # never ./clerk_sync.db instead
        with pytest.raises(ImproperlyConfigured, match=r"in-memory SQLite.*\['TEST'\].*CLERK_SYNC\['DATABASE_URL'\]"):
            database_url_from_django({"ENGINE": "django.db.backends.sqlite3", "NAME": memory})
    with override_settings(DATABASES={"default": {"ENGINE": "django.db.backends.mysql", "NAME": "app", "USER": "me",
                                                  "HOST": "db", "PORT": 3307}}):
        assert clerk_settings({}).database_url == "mysql+mysqldb://me@db:3307/app"
    tls = {"ENGINE": "django.db.backends.mysql", "NAME": "app", "HOST": "db",
           "OPTIONS": {"charset": "utf8mb4", "ssl": {"ca": "/etc/ca.pem"}, "init_command": "SET x=1"}}
    assert database_url_from_django(tls) == (  # the app's init_command kept (clerk-sync's settings run after it)
        "mysql+mysqldb://db/app?charset=utf8mb4&init_command=SET+x%3D1&ssl_ca=%2Fetc%2Fca.pem")
    with override_settings(DATABASES={"default": {"ENGINE": "django.db.backends.oracle", "NAME": "x"}}), \
            pytest.raises(ImproperlyConfigured, match=r"ENGINE 'django.db.backends.oracle'.*CLERK_SYNC\['DATABASE_URL'\]"):
        clerk_settings({})  # never a local SQLite file in place of the app's database (see test_checks_csrf_and_shared_clients)
    with override_settings(DATABASES={}):
        assert clerk_settings({}).database_url == DEFAULT_DATABASE_URL  # no database at all: clerk-sync's own


@pytest.mark.usefixtures("app_database")
def test_unknown_and_invalid_keys_are_errors_that_say_what_to_do() -> None:
    with override_settings(CLERK_SYNC={"CLERK_WEBHOOK_SIGNING_SECRT": "x"}), pytest.raises(ImproperlyConfigured, match="unknown keys"):
        clerk_settings({})
    with override_settings(CLERK_SYNC={"CLERK_SYNC_MAX_BODY_BYTES": "-1"}), pytest.raises(ConfigError, match="CLERK_SYNC_MAX_BODY_BYTES: Input should be greater than 0"):
        clerk_settings({})
    with override_settings(CLERK_SYNC={"PUBLIC_PATHS": ["/a"], "USER_FIELDS": "tests.django.test_integration.only_email"}):
        options = django_options()
    assert options.public_paths == frozenset({"/a"}) and options.user_fields is only_email


def only_email(row: Any) -> dict[str, Any]:
    return {"email": row.email or ""}


# -- system checks -------------------------------------------------------------------------------------

#: A webhook secret, a session key and the front end's origin: nothing for `manage.py check` to report.
CHECKED = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY),
           "CLERK_AUTHORIZED_PARTIES": "https://app.example.com"}


@pytest.mark.usefixtures("app_database")
def test_missing_secret_and_keys_are_check_errors_with_the_fix() -> None:
    with override_settings(CLERK_SYNC={}):
        found = {m.id: m for m in check_settings() if m.is_serious()}
        assert set(found) >= {"clerk_sync.E002", "clerk_sync.E003"}
        assert "CLERK_WEBHOOK_SIGNING_SECRET" in found["clerk_sync.E002"].msg + str(found["clerk_sync.E002"].hint)
        assert "CLERK_JWT_KEY" in str(found["clerk_sync.E003"].hint)
        with pytest.raises(SystemCheckError, match=r"clerk_sync\.E002"):
            call_command("check", stdout=StringIO(), stderr=StringIO())
    with override_settings(CLERK_SYNC={**CHECKED, "CLERK_WEBHOOK_SIGNING_SECRET": "whsec_!!"}):
        assert [m.id for m in check_settings()] == ["clerk_sync.E002"]  # malformed: not base64
    with override_settings(CLERK_SYNC=CHECKED):
        assert check_settings() == []
        call_command("check", stdout=StringIO())


@pytest.mark.usefixtures("app_database")
def test_middleware_before_authentication_middleware_is_a_check_error() -> None:
    from django.conf import settings

    order = [m for m in settings.MIDDLEWARE if "ClerkMiddleware" not in m]
    order.insert(0, "clerk_sync.integrations.django.middleware.ClerkMiddleware")
    with override_settings(MIDDLEWARE=order, CLERK_SYNC=CHECKED):
        assert [m.id for m in check_settings()] == ["clerk_sync.E004"]


@pytest.mark.usefixtures("app_database")
def test_settings_a_careful_user_could_get_wrong_are_check_errors_not_an_open_site() -> None:
    """Review findings: ``PUBLIC_PREFIXES: "/static/"`` became the prefixes ``/``, ``s``.. (every path
    public); ``REQUIRE_AUTH`` without ``ClerkMiddleware`` refused nothing; a bad ``USER_FIELDS`` path
    failed every request instead of ``check``; a list of authorized parties became ``"['https://a'"``."""
    from django.conf import settings

    base = CHECKED
    for key in ("PUBLIC_PREFIXES", "PUBLIC_PATHS"):
        with override_settings(CLERK_SYNC={**base, "REQUIRE_AUTH": True, key: "/static/"}):
            found = check_settings()
            assert [m.id for m in found] == ["clerk_sync.E001"] and "must be a list" in found[0].msg
            with pytest.raises(ImproperlyConfigured, match=key):
                django_options()
    without = [m for m in settings.MIDDLEWARE if "ClerkMiddleware" not in m]
    model_only = ["django.contrib.auth.backends.ModelBackend"]  # (ClerkBackend without the middleware: W003)
    with override_settings(MIDDLEWARE=without, AUTHENTICATION_BACKENDS=model_only,
                           CLERK_SYNC={**base, "REQUIRE_AUTH": True}):
        assert [m.id for m in check_settings()] == ["clerk_sync.E005"]
    with override_settings(MIDDLEWARE=without, AUTHENTICATION_BACKENDS=model_only, CLERK_SYNC=base):
        assert check_settings() == []  # guards alone (no REQUIRE_AUTH) need no middleware
    with override_settings(MIDDLEWARE=without, CLERK_SYNC=base):
        assert [m.id for m in check_settings()] == ["clerk_sync.W003"]  # the example's ClerkBackend, unserved
    with override_settings(CLERK_SYNC={**base, "USER_FIELDS": "tests.django.nowhere.fields"}):
        assert [m.id for m in check_settings()] == ["clerk_sync.E001"]
    parties = ["https://app.example.com", "https://admin.example.com/"]
    with override_settings(CLERK_SYNC={**base, "CLERK_AUTHORIZED_PARTIES": parties}):
        assert clerk_settings({}).authorized_parties() == {"https://app.example.com", "https://admin.example.com"}
    with override_settings(CLERK_SYNC={**base, "CLERK_ISSUER": ["https://a", "https://b"]}), \
            pytest.raises(ImproperlyConfigured, match=r"CLERK_ISSUER.*one value"):
        clerk_settings({})


def test_the_url_from_djangos_postgresql_database_keeps_tls_sockets_and_ipv6() -> None:
    """Review finding: only ``OPTIONS["options"]`` reached the URL, so a ``sslmode=verify-full`` database
    was reached with libpq's default ``prefer`` (certificate unchecked); a socket directory became part of
    the database name; an IPv6 host made the URL unreadable."""
    import sqlalchemy as sa

    tls = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "USER": "me", "HOST": "db.example.com",
           "OPTIONS": {"sslmode": "verify-full", "sslrootcert": "/etc/ca.pem", "pool": True,
                       "options": "-csearch_path=s1"}}
    url = sa.engine.make_url(str(database_url_from_django(tls)))
    assert (url.host, url.database, dict(url.query)) == (
        "db.example.com", "app", {"sslmode": "verify-full", "sslrootcert": "/etc/ca.pem", "options": "-csearch_path=s1"})
    socket = sa.engine.make_url(str(database_url_from_django(
        {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "HOST": "/var/run/postgresql"})))
    assert (socket.host, socket.database, dict(socket.query)) == (None, "app", {"host": "/var/run/postgresql"})
    ipv6 = sa.engine.make_url(str(database_url_from_django(
        {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "HOST": "::1", "PORT": "5433"})))
    assert (ipv6.host, ipv6.port) == ("::1", 5433)


# -- manage.py clerk_sync ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")
def test_manage_py_migrate_creates_clerk_syncs_tables_in_djangos_database(tmp_path: Any) -> None:
    path = tmp_path / "fresh.db"
    with override_settings(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)}},
                           CLERK_SYNC={}):
        out = StringIO()
        call_command("clerk_sync", "migrate", stdout=out)
    assert "clerk-sync migrated a new database to" in out.getvalue()
    assert {"users", "webhook_events", "audit_log"} <= set(sa.inspect(sa.create_engine(f"sqlite:///{path}")).get_table_names())


def test_manage_py_replay_promote_and_reconcile(client_world: World) -> None:
    clerk = client_world.clerk
    store = client_world.store
    processor = get_clerk_sync().processor
    bad = f.envelope("user.created", {"id": "user_bad" + "x" * 70, "object": "user"})  # no row can have that id: failed
    assert processor.process(*f.signed(bad, "msg_bad", secret=clerk.webhook_secret)).status == "failed"
    out = StringIO()
    with pytest.raises(CommandError, match="1 still failed"):  # exit 1, as `clerk-sync replay`
        call_command("clerk_sync", "replay", stdout=out)
    assert "replayed 1 deliveries: 1 failed" in out.getvalue()

    ada = clerk.create_user("ada@example.com")
    clerk.wait_for_deliveries()
    call_command("clerk_sync", "promote", "ada@example.com", "--role", "admin", stdout=out)
    assert "applied: ada@example.com" in out.getvalue()
    row = read_user(store, ada["id"])
    assert row is not None and row.role == "admin"
    with pytest.raises(CommandError, match="no live synced user"):
        call_command("clerk_sync", "promote", "nobody@example.com", stdout=out)
    # Clerk away: the change waits (exit 3, why, what pushes it), `retry-pending` pushes it once Clerk is back
    clerk.set_faults(outage=True)
    with pytest.raises(CommandError, match=r"Clerk was not reached \(.*run `manage.py clerk_sync retry-pending`") as wait:
        call_command("clerk_sync", "promote", "ada@example.com", "--role", "owner", stdout=out)
    assert wait.value.returncode == 3
    with pytest.raises(CommandError, match="still wait for Clerk") as still:
        call_command("clerk_sync", "retry-pending", stdout=out)
    assert still.value.returncode == 3
    clerk.set_faults(outage=False)
    call_command("clerk_sync", "retry-pending", stdout=out)
    assert "'applied': 1" in out.getvalue()
    row = read_user(store, ada["id"])
    assert row is not None and row.role == "owner"

    clerk.set_webhook_url(None)  # lost webhooks: reconcile repairs them
    late = clerk.create_user("late@example.com")
    assert read_user(store, late["id"]) is None
    call_command("clerk_sync", "reconcile", stdout=out)
    assert read_user(store, late["id"]) is not None


def test_manage_py_reconcile_stops_before_a_mass_delete_unless_allowed(client_world: World) -> None:
    """Review: `--allow-mass-delete`, the runbook's way past the stop, was `clerk-sync reconcile`'s only."""
    from clerk_sync.engine import Entity, Upsert
    from clerk_sync.events import user_record
    from clerk_sync.reconcile import MASS_DELETE_FLOOR

    store = client_world.store
    with store.transaction() as w:  # rows the emulator (Clerk) does not list
        for i in range(MASS_DELETE_FLOOR + 1):
            w.apply(Upsert(Entity.USER, user_record(f.user(f"user_gone_{i:03d}", 1))))
    with pytest.raises(Exception, match="--allow-mass-delete"):
        call_command("clerk_sync", "reconcile", stdout=StringIO())
    kept = read_user(store, "user_gone_000")
    assert kept is not None and kept.deleted_at is None
    call_command("clerk_sync", "reconcile", "--allow-mass-delete", stdout=StringIO())
    gone = read_user(store, "user_gone_000")
    assert gone is not None and gone.deleted_at is not None


def test_manage_py_prune_applies_retention(client_world: World) -> None:
    """Review: nothing pruned in a Django project (only `serve` runs retention), and `clerk-sync prune`
    reads no Django settings: `manage.py clerk_sync prune` runs it, from cron."""
    from datetime import UTC, datetime, timedelta

    from clerk_sync.tables import webhook_events

    store = client_world.store
    with store.transaction() as w:
        w.record_delivery("msg_old", f.envelope("user.created", f.user("user_old", 5)), event_type="user.created",
                          instance_id=None, event_timestamp=1, status="applied")
        w.conn.execute(webhook_events.update().values(received_at=datetime.now(UTC) - timedelta(days=400)))
    out = StringIO()
    call_command("clerk_sync", "prune", "--dry-run", stdout=out)
    call_command("clerk_sync", "prune", stdout=out)
    assert "would delete 1 delivery row(s)" in out.getvalue() and "deleted 1 delivery row(s)" in out.getvalue()
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(webhook_events)).scalar() == 0


# -- admin pages, the user backend --------------------------------------------------------------------


def test_admin_pages_are_read_only_and_replay_a_delivery(client_world: World) -> None:
    clerk, app = client_world.clerk, client_world.app
    admin = clerk.create_user("root@example.com", first_name="Root", public_metadata={"role": "admin"})
    bob = clerk.create_user("bob@example.com")
    clerk.wait_for_deliveries()
    as_admin, as_bob = bearer(clerk.mint_session_token(admin["id"])), bearer(clerk.mint_session_token(bob["id"]))
    page = app.get("/django-admin/clerk_sync/clerkuser/", headers=as_admin)
    assert page.status_code == 200 and b"bob@example.com" in page.content
    for model in ("clerkorganization", "clerkmembership", "webhookdelivery", "auditlogentry"):
        assert app.get(f"/django-admin/clerk_sync/{model}/", headers=as_admin).status_code == 200
    assert app.get("/django-admin/clerk_sync/clerkuser/add/", headers=as_admin).status_code == 403
    assert app.get("/django-admin/clerk_sync/clerkuser/", headers=as_bob).status_code == 302  # not staff: to login

    clerk.wait_for_deliveries()  # (the tokens' session.created too: every delivery is selected below)
    with get_clerk_sync().store.transaction() as w:
        w.conn.execute(webhook_events.update().values(status="failed"))
    with get_clerk_sync().store.connect() as conn:
        ids = list(conn.execute(sa.select(webhook_events.c.id)).scalars())
    replay = app.post("/django-admin/clerk_sync/webhookdelivery/", {"action": "replay", "_selected_action": ids},
                      headers=as_admin, follow=True)
    assert replay.status_code == 200 and f"Replayed {len(ids)} deliveries".encode() in replay.content
    assert b"Not replayed" not in replay.content  # every one selected was failed
    with get_clerk_sync().store.connect() as conn:
        assert "failed" not in set(conn.execute(sa.select(webhook_events.c.status)).scalars())
        replays = conn.execute(sa.select(audit_log.c.actor_clerk_id, audit_log.c.details)
                               .where(audit_log.c.action == "django_admin.delivery_replayed")).all()
    assert len(replays) == len(ids) and {actor for actor, _ in replays} == {admin["id"]}  # audited, by whom


def test_request_user_is_a_linked_django_user_kept_in_step_with_the_row(client_world: World) -> None:
    from django.contrib.auth import get_user_model

    clerk, app = client_world.clerk, client_world.app
    ada = clerk.create_user("ada@example.com", first_name="Ada", last_name="L", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    tok = bearer(clerk.mint_session_token(ada["id"]))
    assert app.get("/t/django-login-required").status_code == 302  # Django's own login_required
    page = app.get("/t/django-login-required", headers=tok)
    assert page.json() == {"username": ada["id"], "email": "ada@example.com", "is_staff": True}
    user = get_user_model().objects.get(username=ada["id"])
    assert (user.first_name, user.last_name, user.has_usable_password()) == ("Ada", "L", False)
    clerk.request("PATCH", f"/v1/users/{ada['id']}/metadata", json={"public_metadata": {"role": "user"}})
    clerk.wait_for_deliveries()
    assert app.get("/t/django-login-required", headers=tok).json()["is_staff"] is False  # demoted: no admin
    assert app.get("/django-admin/", headers=tok).status_code == 302
    with override_settings(CLERK_SYNC={**emulator_settings(clerk), "USER_FIELDS": "tests.django.test_integration.only_email"}):
        other = clerk.create_user("other@example.com", first_name="Other")
        clerk.wait_for_deliveries()
        app.get("/t/django-login-required", headers=bearer(clerk.mint_session_token(other["id"])))
    created = get_user_model().objects.get(username=other["id"])
    assert (created.email, created.first_name, created.is_staff) == ("other@example.com", "", False)
    assert get_user_model().objects.count() == 2


# -- DRF, async views, class-based views -------------------------------------------------------------


def test_drf_permissions_answer_with_the_one_error_table(client_world: World) -> None:
    clerk, app = client_world.clerk, client_world.app
    owner = clerk.create_user("owner@example.com", public_metadata={"role": "admin"})
    member = clerk.create_user("member@example.com")
    org = clerk.create_organization("Acme", created_by=owner["id"])
    clerk.add_membership(org["id"], member["id"])
    clerk.wait_for_deliveries()
    as_owner = bearer(clerk.mint_session_token(owner["id"], org_id=org["id"]))
    as_member = bearer(clerk.mint_session_token(member["id"], org_id=org["id"]))
    assert app.get("/t/drf/admin", headers=as_owner).json() == {"admin": owner["id"]}
    refused = app.get("/t/drf/admin", headers=as_member)
    assert refused.status_code == 403 and refused.json()["error"] == "access_denied"
    assert app.get("/t/drf/org-admin", headers=as_owner).json() == {"org": org["id"]}
    assert app.get("/t/drf/org-admin", headers=as_member).status_code == 403
    assert app.get("/t/drf/invoices", headers=as_member).status_code == 403  # no such permission
    assert app.get("/t/drf/open").json() == {"signed_in": False}
    assert app.get("/t/drf/open", headers=as_member).json() == {"signed_in": True}
    forged = app.get("/t/drf/open", headers=bearer("not.a.jwt"))
    assert (forged.status_code, forged.json()["error"], forged["WWW-Authenticate"]) == (401, "token_malformed", "Bearer")


def test_async_views_class_based_views_and_org_guards(client_world: World) -> None:
    clerk, app = client_world.clerk, client_world.app
    admin = clerk.create_user("boss@example.com", public_metadata={"role": "admin"})
    carol = clerk.create_user("carol@example.com")
    org = clerk.create_organization("Acme", created_by=admin["id"])
    clerk.wait_for_deliveries()
    as_admin = bearer(clerk.mint_session_token(admin["id"], org_id=org["id"]))
    as_carol = bearer(clerk.mint_session_token(carol["id"]))
    assert app.get("/t/async/me", headers=as_carol).json() == {"user": carol["id"], "email": "carol@example.com",
                                                               "django_user": carol["id"]}
    assert app.get("/t/async/admin", headers=as_admin).json() == {"admin": admin["id"]}
    assert app.get("/t/async/admin", headers=as_carol).status_code == 403
    assert app.get("/t/cbv/async-admin", headers=as_admin).json() == {"admin": admin["id"]}
    assert app.get("/t/cbv/async-admin", headers=as_carol).status_code == 403
    assert app.get("/t/org-admin", headers=as_admin).json() == {"org_admin": True}
    assert app.get("/t/org-admin", headers=as_carol).status_code == 403
    assert app.get("/t/cbv/invoices", headers=as_carol).status_code == 403
    impersonating = bearer(clerk.mint_session_token(carol["id"], actor=admin["id"]))
    for path in ("/t/async/billing", "/t/cbv/billing", "/billing"):
        assert app.get(path, headers=as_carol).status_code == 200, path
        refused = app.get(path, headers=impersonating)
        assert (refused.status_code, refused.json()["error"]) == (403, "access_denied"), path


def test_guards_stand_without_the_middleware_and_without_require_auth(db_url: str) -> None:
    from django.conf import settings

    without = [m for m in settings.MIDDLEWARE if "ClerkMiddleware" not in m]
    with world_for(db_url, "test-client", REQUIRE_AUTH=False) as w, override_settings(MIDDLEWARE=without):
        user = w.clerk.create_user("solo@example.com")
        w.clerk.wait_for_deliveries()
        for path in ("/dashboard", "/t/async/me", "/t/cbv/me", "/admin/users"):
            assert w.app.get(path).status_code == 401, path
        assert w.app.get("/dashboard", headers=bearer(w.clerk.mint_session_token(user["id"]))).status_code == 200
        assert w.app.get("/t/async/me", headers=bearer(w.clerk.mint_session_token(user["id"]))).status_code == 200
        # a request made while impersonating is audited by the guard as by the middleware (it was not)
        acting = bearer(w.clerk.mint_session_token(user["id"], actor={"sub": "user_support"}))
        for path in ("/dashboard", "/t/async/me"):
            assert w.app.get(path, headers=acting).status_code == 200, path
        with get_clerk_sync().store.connect() as conn:
            rows = conn.execute(sa.select(audit_log.c.impersonator_clerk_id, audit_log.c.details).where(
                audit_log.c.action == "impersonation.request")).all()
        assert [(r[0], r[1]["path"]) for r in rows] == [("user_support", "/dashboard"), ("user_support", "/t/async/me")]


# -- cookies and CSRF, laziness, no event loop on the sync path ---------------------------------------


def test_session_cookie_works_and_unsafe_cookie_requests_need_csrf(client_world: World) -> None:
    clerk = client_world.clerk
    admin = clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    token = clerk.mint_session_token(admin["id"])
    browser = Client(enforce_csrf_checks=True)
    browser.cookies["__session"] = token
    # the front end's own origin (CLERK_AUTHORIZED_PARTIES), so clerk-sync's Origin check passes: Django's
    # CSRF check is what refuses below
    same_site = {"Origin": "http://localhost:3000", "Host": "localhost:3000"}
    assert browser.get("/dashboard").json()["user"] == admin["id"]
    assert browser.post("/admin/impersonate/user_x", headers=same_site).status_code == 403  # cookie: CSRF applies
    refused = browser.post("/t/drf/open", headers=same_site)  # DRF views are CSRF-exempt: ClerkAuthentication checks it
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    # Other authentication classes than ClerkAuthentication: the permission class reads the cookie, so it
    # checks CSRF itself (it did not: another site's form could act as the admin).
    unchecked = browser.post("/t/drf/cookie-role-admin", headers=same_site)
    assert unchecked.status_code == 403 and "CSRF" in unchecked.json()["detail"]
    forged = browser.post("/t/drf/cookie-role-admin", headers={"Origin": "https://evil.example"})
    assert (forged.status_code, forged.json()["error"]) == (403, "cross_site_request")  # refused before CSRF
    api = Client(enforce_csrf_checks=True)  # a Bearer token is never sent by the browser on its own
    assert api.post("/t/drf/cookie-role-admin", headers=bearer(token)).json() == {"deleted": True}
    assert api.post("/admin/impersonate/user_x", headers=bearer(token)).status_code == 404  # past CSRF: no such user
    assert api.post("/t/drf/open", headers=bearer(token)).json() == {"signed_in": True}


@contextmanager
def sql_statements() -> Iterator[list[str]]:
    """The SQL clerk-sync's store runs meanwhile."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = get_clerk_sync().store.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_the_row_is_read_only_when_asked(client_world: World) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    clerk = client_world.clerk
    user = clerk.create_user("lazy@example.com")
    clerk.wait_for_deliveries()
    tok = bearer(clerk.mint_session_token(user["id"]))
    with override_settings(CLERK_SYNC={**emulator_settings(clerk), "DENY_LIST_REFRESH_S": 3600}), \
            sql_statements() as statements:
        app = client_world.app
        assert app.get("/t/cbv/me", headers=tok).status_code == 200
        assert any("FROM revoked_sessions" in s for s in statements)  # the first request loads the deny list
        statements.clear()
        with CaptureQueriesContext(connection) as django_queries:
            assert app.get("/t/cbv/me", headers=tok).status_code == 200
        assert (statements, len(django_queries)) == ([], 0)  # a signed-in page that never asks: no query
        assert app.get("/dashboard", headers=tok).status_code == 200
        assert any("FROM users" in s for s in statements)


def test_sync_requests_create_no_event_loop(client_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    clerk = client_world.clerk
    admin = clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    tok = bearer(clerk.mint_session_token(admin["id"]))
    created: list[int] = []
    original = asyncio.BaseEventLoop.__init__

    def spy(self: asyncio.BaseEventLoop) -> None:
        created.append(threading.get_ident())
        original(self)

    monkeypatch.setattr(asyncio.BaseEventLoop, "__init__", spy)
    for path in ("/dashboard", "/admin/users", "/api/me", "/t/drf/admin", "/t/django-login-required", "/billing"):
        assert client_world.app.get(path, headers=tok).status_code == 200, path
    assert created == []
    assert client_world.app.get("/t/async/me", headers=tok).status_code == 200
    assert len(created) == 1  # the spy sees loops: an async view under WSGI needs one per request


#: Loaded by dotted path from CLERK_SYNC["HOOKS"] in the test below.
WELCOME_HOOKS = [Hook("welcome", lambda change: None, on=["user.created"])]


def test_hooks_and_mapping_settings_reach_the_store() -> None:
    """Review finding: the Django runtime built a Store without hooks or mapping, so its JIT and admin
    writes skipped the outbox. ``CLERK_SYNC["HOOKS"]`` / ``["MAPPING"]`` (dotted paths) configure it."""
    from clerk_sync.integrations.django.runtime import ClerkSync

    with override_settings(CLERK_SYNC={"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "DATABASE_URL": "sqlite://",
                                       "HOOKS": "tests.django.test_integration.WELCOME_HOOKS"}):
        options = django_options()
        runtime = ClerkSync(clerk_settings({}), options)
    assert [hook.name for hook in options.hooks] == ["welcome"]
    assert [hook.name for hook in runtime.store.hooks] == ["welcome"]
    runtime.store.dispose()


@pytest.mark.mariadb
def test_the_url_from_djangos_mysql_database_reaches_a_socket_named_as_host() -> None:
    """Django's MySQL backend takes a ``HOST`` that is a path as the socket file (``unix_socket``); the
    derived URL made it a host name, so clerk-sync could not reach a database Django reached. Checked
    against the real MariaDB: its own socket, asked over TCP first."""
    import sqlalchemy as sa

    from tests.conftest import MYSQL_URL, mysql_database

    with mysql_database() as url:
        tcp = sa.create_engine(url)
        with tcp.connect() as conn:
            socket_path, name = conn.exec_driver_sql("SELECT @@socket, DATABASE()").one()
        tcp.dispose()
        tcp_url = sa.engine.make_url(MYSQL_URL)
        django_db = {"ENGINE": "django.db.backends.mysql", "NAME": name, "USER": tcp_url.username,
                     "HOST": socket_path, "OPTIONS": {"charset": "utf8mb4"}}
        derived = sa.engine.make_url(str(database_url_from_django(django_db)))
        assert dict(derived.query) == {"charset": "utf8mb4", "unix_socket": socket_path}
        engine = sa.create_engine(derived)
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT DATABASE()").scalar() == name
        finally:
            engine.dispose()
        chosen = {**django_db, "OPTIONS": {"unix_socket": "/elsewhere.sock"}}  # OPTIONS wins, as in Django
        assert dict(sa.engine.make_url(str(database_url_from_django(chosen))).query) == {
            "unix_socket": "/elsewhere.sock"}
