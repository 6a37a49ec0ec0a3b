"""Fixes from the Django adopter walkthrough: the models' database check (W004), AuthenticationMiddleware missing
(E004), the app missing from INSTALLED_APPS, ``manage.py clerk_sync`` taking Django's options after the action and
exiting as ``clerk-sync`` does (1 undone, 2 a setting, 3 unavailable), and a deleted, banned or demoted Clerk admin
leaving ``auth_user``'s is_active/is_staff/is_superuser whoever applied the delivery."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from clerk_sync.config import Settings
from clerk_sync.integrations.django.backends import ClerkBackend
from clerk_sync.integrations.django.checks import check_settings
from clerk_sync.integrations.django.management.commands.clerk_sync import Command
from clerk_sync.integrations.django.middleware import ClerkMiddleware
from clerk_sync.integrations.starlette import create_app
from tests._server import running
from tests.conftest import SECRET
from tests.django.conftest import World, bearer
from tests.test_sessions import ISS, KEY, pem

CHECKED = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS,
           "CLERK_AUTHORIZED_PARTIES": ["http://localhost:3000"]}
APP = "clerk_sync.integrations.django"
AUTH_MW = "django.contrib.auth.middleware.AuthenticationMiddleware"
CLERK_MW = "clerk_sync.integrations.django.middleware.ClerkMiddleware"
BACKEND = "clerk_sync.integrations.django.backends.ClerkBackend"
ROOT = Path(__file__).resolve().parents[2]
# (the check tests give Django a database file of their own: the session's is in memory, or another test's)
pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")


def _ids(**settings: Any) -> list[str]:
    with override_settings(**settings):
        return [m.id for m in check_settings() if m.id is not None]


# -- W004: clerk-sync's DATABASE_URL is not the database its models read -----------------------------------------


def _sqlite(path: Path) -> dict[str, Any]:
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)}


def test_a_database_url_other_than_the_one_the_models_read_is_a_check_warning(tmp_path: Path) -> None:
    """Fixed (walkthrough §2): ``CLERK_SYNC['DATABASE_URL']`` naming another database passed ``check``; webhooks
    landed there while the admin and ``ClerkUser.objects`` read ``default`` (stale rows, or 'no such table')."""
    default = {"default": _sqlite(tmp_path / "app.db")}
    other = f"sqlite:///{tmp_path / 'clerk_only.db'}"
    with override_settings(DATABASES=default, CLERK_SYNC={**CHECKED, "DATABASE_URL": other}):
        found = [m for m in check_settings() if m.id == "clerk_sync.W004"]
    assert len(found) == 1 and not found[0].is_serious()
    assert "clerk_only.db" in found[0].msg and "app.db" in found[0].msg and "DATABASE_ROUTERS" in str(found[0].hint)
    # the same database, however spelled: no warning
    assert "clerk_sync.W004" not in _ids(DATABASES=default, CLERK_SYNC=CHECKED)
    same = f"sqlite:///{tmp_path}/./app.db"
    assert "clerk_sync.W004" not in _ids(DATABASES=default, CLERK_SYNC={**CHECKED, "DATABASE_URL": same})


def test_a_database_url_in_the_environment_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside tests clerk-sync falls back to the environment's ``DATABASE_URL`` (a dj-database-url setup)."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert "clerk_sync.W004" in _ids(DATABASES={"default": _sqlite(tmp_path / "app.db")}, CLERK_SYNC=CHECKED)


class ClerkSyncRouter:
    """What the hint describes: the app label ``clerk_sync`` read from clerk-sync's own database."""

    def db_for_read(self, model: Any, **_: Any) -> str | None:
        return "clerk" if model._meta.app_label == "clerk_sync" else None


def test_a_router_sending_the_models_to_clerk_syncs_database_silences_the_warning(tmp_path: Path) -> None:
    databases = {"default": _sqlite(tmp_path / "app.db"), "clerk": _sqlite(tmp_path / "clerk_only.db")}
    other = {**CHECKED, "DATABASE_URL": f"sqlite:///{tmp_path / 'clerk_only.db'}"}
    router = [f"{__name__}.ClerkSyncRouter"]
    assert "clerk_sync.W004" not in _ids(DATABASES=databases, DATABASE_ROUTERS=router, CLERK_SYNC=other)
    assert "clerk_sync.W004" in _ids(DATABASES=databases, DATABASE_ROUTERS=[], CLERK_SYNC=other)


# -- E004: ClerkMiddleware with ClerkBackend but without AuthenticationMiddleware --------------------------------


def test_clerk_middleware_and_backend_without_authentication_middleware_is_a_check_error(tmp_path: Path) -> None:
    """Fixed (walkthrough §3): ``check`` passed, then every signed-out request reading ``request.user`` was a 500."""
    from django.conf import settings

    without = [m for m in settings.MIDDLEWARE if m != AUTH_MW]
    assert CLERK_MW in without
    db = {"default": _sqlite(tmp_path / "app.db")}
    with override_settings(DATABASES=db, MIDDLEWARE=without, AUTHENTICATION_BACKENDS=[BACKEND], CLERK_SYNC=CHECKED):
        found = check_settings()
    assert [m.id for m in found] == ["clerk_sync.E004"]
    assert found[0].is_serious() and "AuthenticationMiddleware is not" in found[0].msg and AUTH_MW in str(found[0].hint)
    # the middleware alone (an API signing in with DRF's class) never sets request.user: nothing to say
    assert _ids(DATABASES=db, MIDDLEWARE=without, AUTHENTICATION_BACKENDS=[], CLERK_SYNC=CHECKED) == []
    assert _ids(DATABASES=db, MIDDLEWARE=list(settings.MIDDLEWARE), AUTHENTICATION_BACKENDS=[BACKEND],
                CLERK_SYNC=CHECKED) == []


# -- the app missing from INSTALLED_APPS -------------------------------------------------------------------------


def test_the_middleware_and_the_backend_refuse_to_run_without_the_app_installed() -> None:
    """Fixed (walkthrough §10): without the app every clerk_sync check was silently off (the app registers
    them), ``manage.py check`` said nothing. The middleware refuses at start-up, as Django's own refuse a setup
    they cannot work in, and so does the backend, naming the entry to add."""
    from django.conf import settings

    ClerkMiddleware(lambda request: None)  # installed: fine
    ClerkBackend()
    with override_settings(INSTALLED_APPS=[a for a in settings.INSTALLED_APPS if a != APP]):
        with pytest.raises(ImproperlyConfigured, match=r"ClerkMiddleware needs 'clerk_sync.integrations.django' in "
                                                       r"INSTALLED_APPS"):
            ClerkMiddleware(lambda request: None)
        with pytest.raises(ImproperlyConfigured, match=r"ClerkBackend needs 'clerk_sync\.integrations\.django'"):
            ClerkBackend()


# -- manage.py clerk_sync: Django's options after the action; exit codes ---------------------------------------


def test_djangos_common_options_are_taken_after_the_action_too() -> None:
    """Fixed (walkthrough §4): ``manage.py clerk_sync migrate --settings=...`` (how deploy scripts write it),
    ``-v 2`` and ``--traceback`` after the action were "unrecognized arguments"."""
    parser = Command().create_parser("manage.py", "clerk_sync")
    after = parser.parse_args(["migrate", "--settings=config.settings.prod", "-v", "2", "--traceback",
                               "--pythonpath", "/srv/app", "--no-color", "--skip-checks"])
    assert (after.action, after.settings, after.verbosity, after.traceback, after.pythonpath, after.no_color,
            after.skip_checks) == ("migrate", "config.settings.prod", 2, True, "/srv/app", True, True)
    before = parser.parse_args(["--settings=a.b", "-v", "3", "--traceback", "replay"])  # as before: not overwritten
    assert (before.action, before.settings, before.verbosity, before.traceback) == ("replay", "a.b", 3, True)
    plain = parser.parse_args(["prune", "--dry-run"])
    assert (plain.verbosity, plain.settings, plain.traceback, plain.dry_run) == (1, None, False, True)


def _project(tmp_path: Path, clerk_sync: dict[str, Any]) -> dict[str, str]:
    """A settings module on disk for a real ``django-admin`` process; returns its environment."""
    (tmp_path / "walk_settings.py").write_text(textwrap.dedent(f"""
        SECRET_KEY = "x"
        USE_TZ = True
        INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", {APP!r}]
        DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {str(tmp_path / 'app.db')!r}}}}}
        CLERK_SYNC = {clerk_sync!r}
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k not in ("DATABASE_URL",
                                                                                           "DJANGO_SETTINGS_MODULE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)  # (as this process)
    return env


def _manage(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "django", "clerk_sync", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_real_manage_py_run_takes_settings_after_the_action_and_exits_as_the_cli(tmp_path: Path) -> None:
    """End to end, a ``django-admin`` process: the options after the action work (the settings module is found
    from ``--settings``/``--pythonpath`` there), and the exit codes are the CLI's: 3 with the database down, 2
    for a setting to fix (walkthrough §5: both were 1, which cron could not tell from deliveries still failed)."""
    env = _project(tmp_path, {**CHECKED})
    done = _manage(tmp_path, env, "migrate", "--settings=walk_settings", f"--pythonpath={tmp_path}", "-v", "2",
                   "--traceback", "--skip-checks")
    assert done.returncode == 0, done.stderr
    assert "clerk-sync migrated a new database to" in done.stdout, done.stdout
    env = _project(tmp_path, {**CHECKED, "DATABASE_URL": "postgresql+psycopg://clerk:pw@127.0.0.1:1/app"})
    down = _manage(tmp_path, env, "replay", "--settings=walk_settings", f"--pythonpath={tmp_path}", "--skip-checks")
    assert down.returncode == 3, down.stderr
    assert "database error" in down.stderr
    setting = _manage(tmp_path, env, "migrate", "--backfill", "--settings=walk_settings", f"--pythonpath={tmp_path}",
                      "--skip-checks")
    assert setting.returncode == 2 and "MAPPING" in setting.stderr, setting.stderr


@pytest.mark.parametrize("action", [["migrate"], ["replay"], ["prune"], ["erase", "user_x"],
                                    ["promote", "a@example.com"]])
def test_the_database_down_exits_3_from_every_action(action: list[str]) -> None:
    down = "postgresql+psycopg://clerk:Pw-s3cret-9@127.0.0.1:1/app"  # nothing listens on port 1
    with override_settings(CLERK_SYNC={**CHECKED, "DATABASE_URL": down, "CLERK_SECRET_KEY": "sk_test_x"}), \
            pytest.raises(CommandError, match="database error") as failed:
        call_command("clerk_sync", *action, stdout=StringIO())
    assert failed.value.returncode == 3 and "Pw-s3cret-9" not in str(failed.value)


def test_clerk_down_exits_3_and_a_setting_2(client_world: World) -> None:
    client_world.clerk.set_faults(outage=True)
    with pytest.raises(CommandError) as failed:
        call_command("clerk_sync", "reconcile", "--dry-run", stdout=StringIO())
    assert failed.value.returncode == 3
    client_world.clerk.set_faults(outage=False)
    with pytest.raises(CommandError, match="MAPPING") as refused:
        call_command("clerk_sync", "migrate", "--backfill", stdout=StringIO())
    assert refused.value.returncode == 2
    with override_settings(CLERK_SYNC={"NOT_A_KEY": 1}), pytest.raises(CommandError, match="unknown keys") as typo:
        call_command("clerk_sync", "replay", stdout=StringIO())
    assert typo.value.returncode == 2


def test_erase_of_an_unknown_id_says_force_once_and_exits_1(client_world: World) -> None:
    """Walkthrough §12: the message named the library's ``allow_unknown`` and then said ``--force`` twice."""
    with pytest.raises(CommandError) as refused:
        call_command("clerk_sync", "erase", "user_doesnotexist123", stdout=StringIO())
    message = str(refused.value)
    assert refused.value.returncode == 1
    assert message.count("--force") == 1 and "allow_unknown" not in message and "nothing was changed" in message


# -- auth_user follows a deletion, ban or demotion whoever applied it --------------------------------------------


def _flags(clerk_id: str) -> tuple[bool, bool, bool]:
    user: Any = get_user_model().objects.get(username=clerk_id)
    return user.is_active, user.is_staff, user.is_superuser


def _admin_signed_in(world: World, email: str) -> str:
    clerk = world.clerk
    user = clerk.create_user(email, public_metadata={"role": "admin"})
    clerk.wait_for_deliveries()
    token = clerk.mint_session_token(user["id"])
    assert world.app.get("/t/django-login-required", headers=bearer(token)).status_code == 200
    assert _flags(user["id"]) == (True, True, True)
    return str(user["id"])


def test_the_webhook_view_deactivates_a_deleted_or_banned_admin_and_demotes_at_once(client_world: World) -> None:
    """Fixed (walkthrough §7): the Django user of a Clerk admin deleted or banned by webhook stayed active staff
    superuser in auth_user (the admin's user list, ``User.objects.filter(is_superuser=True)``) until their next
    request or a prune."""
    clerk = client_world.clerk
    zed, bob, dee = (_admin_signed_in(client_world, f"{n}@example.com") for n in ("zed", "bob", "dee"))
    clerk.request("DELETE", f"/v1/users/{zed}")
    clerk.request("POST", f"/v1/users/{bob}/ban")
    clerk.request("PATCH", f"/v1/users/{dee}/metadata", json={"public_metadata": {"role": "user"}})
    clerk.wait_for_deliveries()
    assert _flags(zed) == (False, False, False)
    assert _flags(bob) == (False, False, False)
    assert _flags(dee) == (True, False, False)  # demoted: no admin flags, still a user
    clerk.request("POST", f"/v1/users/{bob}/unban")
    clerk.wait_for_deliveries()
    assert _flags(bob) == (True, True, True)  # the ban lifted: back in step


def test_deliveries_applied_by_the_standalone_service_are_followed_by_prune(client_world: World) -> None:
    """The standalone service (``clerk-sync serve``'s app, on loopback) applies the deliveries, not Django's view:
    it cannot see auth_user, so ``manage.py clerk_sync prune`` (hourly, from cron) brings the Django users in step."""
    clerk = client_world.clerk
    zed, bob, dee = (_admin_signed_in(client_world, f"{n}@example.com") for n in ("zed", "bob", "dee"))
    settings = Settings.from_env({"DATABASE_URL": client_world.store.engine.url.render_as_string(hide_password=False),
                                  "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret})
    with running(create_app(settings)) as service:
        clerk.set_webhook_url(f"{service}/webhooks/clerk")
        clerk.request("DELETE", f"/v1/users/{zed}")
        clerk.request("POST", f"/v1/users/{bob}/ban")
        clerk.request("PATCH", f"/v1/users/{dee}/metadata", json={"public_metadata": {"role": "user"}})
        clerk.wait_for_deliveries()
    assert [d["status"] for d in clerk.deliveries()[-3:]] == ["succeeded"] * 3
    assert _flags(zed) == _flags(bob) == _flags(dee) == (True, True, True)  # the Django side never heard of it
    out = StringIO()
    call_command("clerk_sync", "prune", stdout=out)
    assert _flags(zed) == (False, False, False) and _flags(bob) == (False, False, False)
    assert _flags(dee) == (True, False, False)
    assert "Django users brought in step: 2" in out.getvalue()  # (zed: cleared as a tombstone, the line before)


def _row_locked_elsewhere(user_pk: Any) -> bool:
    """Whether another connection holds a lock that keeps a write to the Django user ``user_pk`` waiting: its row
    (PostgreSQL, MariaDB: ``FOR UPDATE NOWAIT`` is refused), or SQLite's one write lock (``BEGIN IMMEDIATE`` with
    no busy timeout is refused). Asked without waiting."""
    import sqlite3

    from django.db import DatabaseError, connections, transaction

    connection = connections["default"]
    if connection.vendor == "sqlite":
        probe = sqlite3.connect(connection.settings_dict["NAME"], timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
    try:
        with transaction.atomic():
            list(get_user_model().objects.select_for_update(nowait=True).filter(pk=user_pk))
        return False
    except DatabaseError:
        return True


def test_two_refreshes_of_one_user_do_not_interleave(client_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of f14fc5b (finding 3): delivery A (an admin's unban) read the Django user and the ``users`` row; B (a
    demotion) was applied and refreshed meanwhile; A then saved what it had computed from the old row, leaving the
    demoted user staff and superuser in auth_user. The refresh now locks the Django user (SQLite: the write lock)
    before it reads the row: B runs inside A's window only as far as the database lets it, and ends after A.
    A is paused by the test between its read of the row and its save (an event, no sleep)."""
    import threading

    from django.db import connections

    from clerk_sync.auth.users import read_user
    from clerk_sync.integrations.django import backends

    wait = 30.0  # a bound for the test's own waits, never a threshold of the code under test
    clerk = client_world.clerk
    bob = _admin_signed_in(client_world, "bob@example.com")
    clerk.request("POST", f"/v1/users/{bob}/ban")
    clerk.wait_for_deliveries()
    assert _flags(bob) == (False, False, False)
    clerk.set_webhook_url("http://127.0.0.1:9/nowhere")  # later deliveries are held: the test drives the refreshes
    clerk.request("POST", f"/v1/users/{bob}/unban")
    call_command("clerk_sync", "reconcile", stdout=StringIO())  # A's apply: the row unbanned, still admin
    row = read_user(client_world.store, bob)
    assert row is not None and row.role == "admin" and not row.banned

    read_a, go_on = threading.Event(), threading.Event()
    real = backends.read_user

    def paused(store: Any, clerk_id: str) -> Any:  # A's refresh: read the row, then wait before saving
        found = real(store, clerk_id)
        if threading.current_thread().name == "A":
            read_a.set()
            assert go_on.wait(wait), "the test never let A go on"
        return found

    monkeypatch.setattr(backends, "read_user", paused)
    failures: list[BaseException] = []

    def thread(name: str, work: Any) -> threading.Thread:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # (reported by the test, not lost in the thread)
                failures.append(exc)
            finally:
                connections.close_all()

        return threading.Thread(target=run, name=name)

    def b() -> None:  # B: the demotion applied, then its refresh
        call_command("clerk_sync", "reconcile", stdout=StringIO())
        backends.refresh_django_user(bob)

    a_thread = thread("A", lambda: backends.refresh_django_user(bob))
    a_thread.start()
    assert read_a.wait(wait)
    clerk.request("PATCH", f"/v1/users/{bob}/metadata", json={"public_metadata": {"role": "user"}})
    locked = _row_locked_elsewhere(get_user_model().objects.get(username=bob).pk)
    b_thread = thread("B", b)
    b_thread.start()
    if not locked:  # nothing holds B back: it applies and refreshes wholly inside A's window
        b_thread.join(wait)
        assert not b_thread.is_alive()
    go_on.set()
    a_thread.join(wait)
    b_thread.join(wait)
    assert not failures
    row = read_user(client_world.store, bob)
    assert row is not None and row.role == "user"
    assert _flags(bob) == (True, False, False), "a demoted user is staff and superuser in auth_user again"


def test_a_user_never_signed_in_here_takes_no_lock(client_world: World) -> None:
    """Review: every applied ``user.*`` delivery took SQLite's write lock in the webhook view's refresh, even for a
    Clerk user with no Django user; inside an outer transaction (a TestCase's, ATOMIC_REQUESTS) it was held to its
    end, and clerk-sync's next write to the same file waited its busy timeout."""
    import sqlite3

    from django.db import connections, transaction

    from clerk_sync.integrations.django import backends

    if connections["default"].vendor != "sqlite":
        pytest.skip("SQLite's database-wide write lock")

    def locked() -> bool:
        probe = sqlite3.connect(connections["default"].settings_dict["NAME"], timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()

    with transaction.atomic():  # a TestCase's transaction
        assert backends.refresh_django_user("user_never_signed_in_here") is False
        held = locked()
    assert not held
