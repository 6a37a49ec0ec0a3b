"""The Django face on par with the other frameworks: the database it derives, the types of
its own options, public ViewSets, CSRF and Origin checks, the webhook URL's slash twin, the JWT key in
``manage.py check``, the deny list under async views, and unknown paths under ``REQUIRE_AUTH``."""

from __future__ import annotations

import asyncio
import threading
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.middleware.csrf import CsrfViewMiddleware
from django.test import Client, RequestFactory, override_settings

from clerk_sync.auth.users import read_user
from clerk_sync.errors import SessionRevoked
from clerk_sync.integrations.django.checks import check_settings
from clerk_sync.integrations.django.conf import clerk_settings, database_url_from_django, django_options
from clerk_sync.integrations.django.request import aclerk_request, clerk_request
from clerk_sync.integrations.django.runtime import get_clerk_sync
from tests import factories as f
from tests.conftest import SECRET
from tests.django.conftest import World, bearer, django_database, world_for
from tests.test_sessions import KEY, pem

BASE = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY)}
#: BASE as a deployment checks clean with: without authorized parties `manage.py check` warns (W002).
CHECKED = {**BASE, "CLERK_AUTHORIZED_PARTIES": "https://app.example.com"}

# -- the database clerk-sync writes ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")
def test_geodjango_engines_map_to_their_database_and_an_unknown_engine_is_a_check_error() -> None:
    """Fixed: a GeoDjango (PostGIS, SpatiaLite, GIS MySQL) or wrapped engine (django-prometheus) got
    ``DATABASE_URL=sqlite:///clerk_sync.db``: webhooks wrote a local file per host, the app never saw a user."""
    db = {"NAME": "app", "USER": "me", "HOST": "db"}
    assert database_url_from_django({"ENGINE": "django.contrib.gis.db.backends.postgis", **db}) == \
        "postgresql+psycopg://me@db/app"
    assert database_url_from_django({"ENGINE": "django.contrib.gis.db.backends.mysql", **db}) == "mysql+mysqldb://me@db/app"
    assert database_url_from_django({"ENGINE": "django.contrib.gis.db.backends.spatialite", "NAME": "/srv/geo.db"}) == \
        "sqlite:////srv/geo.db"
    wrapped = {"ENGINE": "django_prometheus.db.backends.postgresql", **db}
    with override_settings(DATABASES={"default": wrapped}, CLERK_SYNC=CHECKED):
        with pytest.raises(ImproperlyConfigured, match=r"django_prometheus.*CLERK_SYNC\['DATABASE_URL'\]"):
            clerk_settings({})
        found = check_settings()
        assert [m.id for m in found] == ["clerk_sync.E001"] and "CLERK_SYNC['DATABASE_URL']" in found[0].msg
    url = "postgresql+psycopg://me@db/app"
    with override_settings(DATABASES={"default": wrapped}, CLERK_SYNC={**CHECKED, "DATABASE_URL": url}):
        assert (clerk_settings({}).database_url, check_settings()) == (url, [])


# -- the Django-only options ------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [
    ("DENY_LIST_REFRESH_S", "5"), ("DENY_LIST_REFRESH_S", -1), ("DENY_LIST_REFRESH_S", float("nan")),
    ("DENY_LIST_REFRESH_S", float("inf")), ("DENY_LIST_REFRESH_S", True), ("REQUIRE_AUTH", "false"),
    ("JIT", "false"), ("AUDIT_IMPERSONATION", 0),
], ids=["refresh-string", "refresh-negative", "refresh-nan", "refresh-inf", "refresh-bool", "require-auth-string",
        "jit-string", "audit-int"])
def test_django_only_options_of_the_wrong_type_are_check_errors(key: str, value: Any) -> None:
    """Fixed: ``DENY_LIST_REFRESH_S: "5"`` (read from the environment) passed ``manage.py check``,
    then every request carrying a session answered 500; ``"false"`` switched ``REQUIRE_AUTH``/``JIT`` on."""
    with override_settings(CLERK_SYNC={**CHECKED, key: value}):
        found = check_settings()
        assert [m.id for m in found] == ["clerk_sync.E001"] and repr(key) in found[0].msg
        with pytest.raises(ImproperlyConfigured, match=key):
            django_options()


def test_django_only_options_of_the_right_type_are_taken() -> None:
    with override_settings(CLERK_SYNC={**CHECKED, "DENY_LIST_REFRESH_S": 0, "REQUIRE_AUTH": False, "JIT": False,
                                       "AUDIT_IMPERSONATION": True}):
        options = django_options()
        assert check_settings() == []
    assert (options.deny_list_refresh_s, options.require_auth, options.jit) == (0.0, False, False)
    with override_settings(CLERK_SYNC={**BASE, "DENY_LIST_REFRESH_S": 2.5}):
        assert django_options().deny_list_refresh_s == 2.5


# -- deny by default ------------------------------------------------------------------------------------


def test_clerk_public_opens_a_drf_viewset_routed_by_a_router(db_url: str) -> None:
    """Fixed: ``ViewSet.as_view`` sets ``cls``, not ``view_class``: a ``@clerk_public`` ViewSet was
    refused (401) under ``REQUIRE_AUTH``."""
    with django_database(db_url), override_settings(CLERK_SYNC={**BASE, "REQUIRE_AUTH": True}):
        anonymous = Client()
        assert anonymous.get("/t/drf/public-viewset/").json() == {"public": True}
        refused = anonymous.get("/t/drf/private-viewset/")
        assert (refused.status_code, refused.json()["error"]) == (401, "token_missing")


def test_unknown_paths_are_refused_under_require_auth_as_on_the_other_faces(client_world: World) -> None:
    """Fixed: a path that resolved to nothing went through to Django's 404 under ``REQUIRE_AUTH``,
    where ASGI and Flask answer 401 (what does not exist is not told to a stranger)."""
    clerk, app = client_world.clerk, client_world.app
    user = clerk.create_user("ada@example.com")
    assert app.get("/no/such/page").status_code == 401
    assert app.get("/no/such/page", headers=bearer(clerk.mint_session_token(user["id"]))).status_code == 404
    redirect = app.get("/t/public-slash")  # APPEND_SLASH still redirects to a public view
    assert (redirect.status_code, redirect["Location"]) == (301, "/t/public-slash/")
    assert app.get("/t/public-slash/").json() == {"public": True}
    with override_settings(CLERK_SYNC={**BASE, "REQUIRE_AUTH": False}):
        assert app.get("/no/such/page").status_code == 404  # no deny-by-default: Django's own answer


# -- CSRF and Origin ----------------------------------------------------------------------------------


def test_a_bearer_header_does_not_switch_off_csrf_for_a_django_login_session(db_url: str) -> None:
    """Fixed: any valid Clerk Bearer token (the attacker's own) set ``_dont_enforce_csrf_checks``,
    so a POST riding on the victim's ``sessionid`` cookie passed Django's CSRF check: here the Django admin
    created a superuser. A Bearer request without a Django session cookie still needs no CSRF token."""
    with world_for(db_url, "test-client", REQUIRE_AUTH=False) as world, \
            override_settings(AUTHENTICATION_BACKENDS=["django.contrib.auth.backends.ModelBackend"]):
        attacker = world.clerk.create_user("mallory@example.com")
        admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
        world.clerk.wait_for_deliveries()
        model = get_user_model()
        victim = model.objects.create_superuser("root", "root@example.com", "pw-123-xyz")
        browser = Client(enforce_csrf_checks=True)
        browser.force_login(victim)
        form = {"username": "backdoor", "password1": "S3cret-pass-99", "password2": "S3cret-pass-99",
                "usable_password": "true"}
        forged = browser.post("/django-admin/auth/user/add/", form,
                              headers=bearer(world.clerk.mint_session_token(attacker["id"])))
        assert forged.status_code == 403 and b"CSRF" in forged.content
        assert not model.objects.filter(username="backdoor").exists()
        api = Client(enforce_csrf_checks=True)  # no session cookie: past CSRF, to the view's own 404
        assert api.post("/admin/impersonate/user_x",
                        headers=bearer(world.clerk.mint_session_token(admin["id"]))).status_code == 404


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_a_cross_site_post_on_the_session_cookie_is_refused_on_csrf_exempt_views(db_url: str, transport: str) -> None:
    """Fixed: Django never passed the request's method and scheme, so the Origin check of FastAPI,
    Starlette and Flask (403 ``cross_site_request``) never ran: a ``csrf_exempt`` view (or a project
    without CSRF middleware) ran an admin action for another site's form. Sync and async paths both."""
    with world_for(db_url, transport) as world:
        admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
        world.clerk.wait_for_deliveries()
        token = world.clerk.mint_session_token(admin["id"])
        cookie = {"Cookie": f"__session={token}"}
        for path in ("/t/csrf-exempt/admin", "/t/csrf-exempt/async-admin"):
            for sent in ({"Origin": "https://evil.example"}, {"Referer": "https://evil.example/form"}, {}):
                refused = world.app.post(path, headers={**cookie, **sent})
                assert (refused.status_code, refused.json()["error"]) == (403, "cross_site_request"), (path, sent)
            own = world.app.post(path, headers={**cookie, "Origin": "http://localhost:3000"})  # the front end's
            assert own.json() == {"deleted_by": admin["id"]}, path
            api = world.app.post(path, headers={**bearer(token), "Origin": "https://elsewhere.example"})
            assert api.json() == {"deleted_by": admin["id"]}, path  # a Bearer token is no ambient credential


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_a_same_site_cookie_post_behind_a_proxy_is_this_sites_own(db_url: str, transport: str) -> None:
    """A gap in the fix above: this site's own origin was built from the raw Host header, not from
    ``request.get_host()``, so behind a proxy (``USE_X_FORWARDED_HOST``) every same-site cookie POST was
    refused 403, where Django's own CSRF check accepts it."""
    with world_for(db_url, transport, CLERK_AUTHORIZED_PARTIES="") as world, override_settings(
            USE_X_FORWARDED_HOST=True, SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"),
            ALLOWED_HOSTS=["app.example.com", "web", "127.0.0.1", "localhost", "testserver"]):
        admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
        world.clerk.wait_for_deliveries()
        proxied = {"Cookie": f"__session={world.clerk.mint_session_token(admin['id'])}", "Host": "web:8000",
                   "X-Forwarded-Host": "app.example.com", "X-Forwarded-Proto": "https"}
        for path in ("/t/csrf-exempt/admin", "/t/csrf-exempt/async-admin"):
            own = world.app.post(path, headers={**proxied, "Origin": "https://app.example.com"})
            assert own.json() == {"deleted_by": admin["id"]}, path
            inner = world.app.post(path, headers={**proxied, "Origin": "https://web:8000"})
            assert (inner.status_code, inner.json()["error"]) == (403, "cross_site_request"), path


@pytest.mark.parametrize("transport", ["test-client", "asgi"])
def test_csrf_trusted_origins_are_trusted_for_the_session_cookie_too(db_url: str, transport: str) -> None:
    """A gap in the fixes above, closed: a front end listed in Django's ``CSRF_TRUSTED_ORIGINS`` (an
    origin, or ``https://*.domain`` for its subdomains) got 403 on its cookie POSTs where Django's own CSRF
    check accepts it; its neighbours stay refused."""
    with world_for(db_url, transport) as world, override_settings(
            CSRF_TRUSTED_ORIGINS=["https://admin.example.org", "https://*.example.com"]):
        admin = world.clerk.create_user("root@example.com", public_metadata={"role": "admin"})
        world.clerk.wait_for_deliveries()
        cookie = {"Cookie": f"__session={world.clerk.mint_session_token(admin['id'])}"}
        for path in ("/t/csrf-exempt/admin", "/t/csrf-exempt/async-admin"):
            for origin in ("https://admin.example.org", "https://app.example.com", "https://example.com",
                           "https://ADMIN.example.org:443", "http://localhost:3000"):
                trusted = world.app.post(path, headers={**cookie, "Origin": origin})
                assert trusted.json() == {"deleted_by": admin["id"]}, (path, origin)
            for origin in ("http://admin.example.org", "https://evil.example.org", "https://badexample.com",
                           "http://app.example.com", "https://app.example.com.evil.net"):
                refused = world.app.post(path, headers={**cookie, "Origin": origin})
                assert (refused.status_code, refused.json()["error"]) == (403, "cross_site_request"), (path, origin)


class ProjectCsrf(CsrfViewMiddleware):
    """A project's own CSRF middleware: it protects as Django's does."""


def test_a_project_without_csrf_middleware_gets_a_check_warning() -> None:
    from django.conf import settings

    without = [m for m in settings.MIDDLEWARE if m != "django.middleware.csrf.CsrfViewMiddleware"]
    with override_settings(MIDDLEWARE=without, CLERK_SYNC=CHECKED):
        found = check_settings()
        assert [(m.id, m.is_serious()) for m in found] == [("clerk_sync.W001", False)]
        assert "CsrfViewMiddleware" in found[0].msg and "SILENCED_SYSTEM_CHECKS" in str(found[0].hint)
    own = [*without, "tests.django.test_checks_csrf_and_shared_clients.ProjectCsrf"]
    with override_settings(MIDDLEWARE=own, CLERK_SYNC=CHECKED):
        assert check_settings() == []


# -- the webhook URL --------------------------------------------------------------------------------


def test_the_webhook_url_with_a_trailing_slash_is_served_and_public(db_url: str) -> None:
    """Fixed: ``/webhooks/clerk/`` (entered with a slash in Clerk's Dashboard) was a 404 where the
    other faces serve it; Svix follows no redirect. It must stay open under ``REQUIRE_AUTH`` too."""
    with django_database(db_url), override_settings(CLERK_SYNC={**BASE, "REQUIRE_AUTH": True}):
        for n, path in enumerate(("/webhooks/clerk/", "/webhooks/clerk")):
            headers, body = f.signed(f.envelope("user.created", f.user(f"user_slash{n}", 1)), f"msg_slash{n}")
            r = Client().post(path, data=body, content_type="application/json", headers=headers)
            assert (r.status_code, r.json()["status"]) == (200, "applied"), path
            assert read_user(get_clerk_sync().store, f"user_slash{n}") is not None


# -- manage.py check ---------------------------------------------------------------------------------


def test_manage_py_check_reports_a_malformed_jwt_key() -> None:
    """Fixed: the check looked at presence only: a truncated PEM passed ``manage.py check``, then
    every protected view answered 500. Flask fails at start-up for the same key."""
    for key in ("-----BEGIN PUBLIC KEY-----\nnot a key", pem(KEY).replace("\n", "")[:-40]):
        with override_settings(CLERK_SYNC={**CHECKED, "CLERK_JWT_KEY": key}):
            found = check_settings()
            assert [m.id for m in found] == ["clerk_sync.E006"]
            assert "CLERK_JWT_KEY is not a PEM public key" in found[0].msg and "JWKS Public Key" in str(found[0].hint)
            with pytest.raises(SystemCheckError, match=r"clerk_sync\.E006"):
                call_command("check", stdout=StringIO(), stderr=StringIO())
    with override_settings(CLERK_SYNC={"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_SECRET_KEY": "sk_test_x",
                                   "CLERK_AUTHORIZED_PARTIES": CHECKED["CLERK_AUTHORIZED_PARTIES"]}):
        assert check_settings() == []  # JWKS from the Backend API: built without fetching anything


# -- the deny list under async views ----------------------------------------------------------------


def test_async_requests_never_read_the_deny_list_on_the_event_loop(client_world: World,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: with ``DENY_LIST_REFRESH_S: 0`` the async path refreshed in a worker thread, then
    read the database again on the event loop (the revocation and blocked-user checks). It still sees a
    revocation on the next request; the sync path keeps refreshing in its own thread."""
    clerk = client_world.clerk
    ada = clerk.create_user("ada@example.com")
    session = clerk.create_session(ada["id"])
    token = clerk.session_token(session["id"])
    clerk.wait_for_deliveries()
    deny_list = get_clerk_sync().authenticator.deny_list
    refresh, readers = deny_list.refresh, []

    def spy() -> None:
        readers.append(threading.get_ident())
        refresh()

    monkeypatch.setattr(deny_list, "refresh", spy)

    async def requests() -> tuple[int, list[Any]]:
        results = []
        for _ in range(3):
            state = await aclerk_request(RequestFactory().get("/", headers=bearer(token)))
            results.append(state.auth.user_id if state.auth else state.error)
        clerk.request("POST", f"/v1/sessions/{session['id']}/revoke")
        clerk.wait_for_deliveries()
        state = await aclerk_request(RequestFactory().get("/", headers=bearer(token)))
        results.append(state.error)
        return threading.get_ident(), results

    loop_thread, results = asyncio.run(requests())
    assert results[:3] == [ada["id"]] * 3 and isinstance(results[3], SessionRevoked)
    assert len(readers) >= 4 and loop_thread not in readers
    readers.clear()
    assert isinstance(clerk_request(RequestFactory().get("/", headers=bearer(token))).error, SessionRevoked)
    assert readers == [threading.get_ident()]  # sync: in the request's own thread, as before


def test_the_sync_and_async_clerk_clients_share_one_budget_and_one_breaker() -> None:
    """Fixed: `clerk` (WSGI views, admin actions) and `aclerk` (ASGI views' JIT) each built their own
    budget and breaker, so one process could spend twice the documented limit and Clerk's failures were
    counted apart. What one client spends, the other can no longer spend."""
    from clerk_sync.config import Settings
    from clerk_sync.integrations.django.conf import DjangoOptions
    from clerk_sync.integrations.django.runtime import ClerkSync

    settings = Settings.from_env({"CLERK_SECRET_KEY": "sk_test_x", "DATABASE_URL": "sqlite:///:memory:",
                                  "CLERK_API_RATE_LIMIT": "3"})
    runtime = ClerkSync(settings, DjangoOptions())
    assert runtime.clerk is not None and runtime.aclerk is not None
    spent = 0
    while runtime.clerk.budget.reserve(max_wait=0).granted:
        spent += 1
    assert spent >= 1
    assert not asyncio.run(runtime.aclerk.budget.areserve(max_wait=0)).granted
    for _ in range(5):
        runtime.clerk.breaker.failure()
    assert runtime.aclerk.breaker.is_open


def test_close_releases_the_shared_redis_budget() -> None:
    """A gap in the shared budget: passed in, no client owned it, so `close()` left its Redis sockets
    open (test resets, settings overrides)."""
    from clerk_sync.config import Settings
    from clerk_sync.integrations.django.conf import DjangoOptions
    from clerk_sync.integrations.django.runtime import ClerkSync

    settings = Settings.from_env({"CLERK_SECRET_KEY": "sk_test_x", "DATABASE_URL": "sqlite:///:memory:",
                                  "REDIS_URL": "redis://127.0.0.1:6379/15"})
    runtime = ClerkSync(settings, DjangoOptions())
    assert runtime.clerk is not None
    budget: Any = runtime.clerk.budget
    budget.reserve(max_wait=60)  # opens a pooled connection
    pool = budget._sync.connection_pool
    assert any(c._sock is not None for c in pool._available_connections)
    runtime.close()
    assert all(c._sock is None for c in pool._available_connections), "a Redis socket outlived close()"


def test_a_bad_redis_url_fails_only_what_calls_clerk() -> None:
    """A gap in the shared budget: built at start-up, a malformed REDIS_URL (or a missing redis package)
    failed the runtime itself, so the webhook view and pages without JIT answered 500 too. It is built on
    first use now, by what calls Clerk."""
    from clerk_sync.config import Settings
    from clerk_sync.integrations.django.conf import DjangoOptions
    from clerk_sync.integrations.django.runtime import ClerkSync

    settings = Settings.from_env({"CLERK_SECRET_KEY": "sk_test_x", "DATABASE_URL": "sqlite:///:memory:",
                                  "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "REDIS_URL": "localhost:6379"})
    runtime = ClerkSync(settings, DjangoOptions(jit=False))
    assert runtime.processor is not None and runtime.jit is None  # the webhook path and pages without JIT
    from clerk_sync.errors import ConfigError

    with pytest.raises(ConfigError, match="scheme"):
        _ = runtime.clerk  # what calls Clerk says what is wrong
    runtime.close()


def test_drf_not_impersonated_refuses_an_admin_acting_as_the_user(db_url: str) -> None:
    """Parity: Django views had `not_impersonated` and its mixin, DRF had no permission class."""
    with world_for(db_url, "test-client") as world:
        admin = world.clerk.create_user("boss@example.com", public_metadata={"role": "admin"})
        carol = world.clerk.create_user("carol@example.com")
        world.clerk.wait_for_deliveries()
        own = world.app.get("/t/drf/billing", headers=bearer(world.clerk.mint_session_token(carol["id"])))
        assert own.json() == {"billing": carol["id"]}
        acting = world.app.get("/t/drf/billing",
                               headers=bearer(world.clerk.mint_session_token(carol["id"], actor=admin["id"])))
        assert acting.status_code == 403, acting.content


@pytest.mark.parametrize(("roles", "served"), [(None, False), (["admin", "support"], True), ("*", True)])
def test_impersonator_roles_is_a_django_setting(db_url: str, roles: Any, served: bool) -> None:
    """A gap in the impersonation fix: only a hand-built Authenticator could name the roles an impersonating
    user must hold, so a Django app whose support staff impersonate had no way to keep them working."""
    extra = {} if roles is None else {"CLERK_IMPERSONATOR_ROLES": roles}
    with world_for(db_url, "test-client", **extra) as world:
        support = world.clerk.create_user("help@example.com", public_metadata={"role": "support"})
        customer = world.clerk.create_user("cust@example.com")
        world.clerk.wait_for_deliveries()
        token = world.clerk.mint_session_token(customer["id"], actor=support["id"])
        answer = world.app.get("/t/cbv/me", headers=bearer(token))
        if served:
            assert answer.status_code == 200, answer.content
        else:
            assert (answer.status_code, answer.json()["error"]) == (401, "impersonation_ended")
