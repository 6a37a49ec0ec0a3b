"""The Django face: a check for unset ``CLERK_AUTHORIZED_PARTIES``, the admin's replay of failed
deliveries only, the runtime's parts built once under concurrent first use, and ``manage.py clerk_sync migrate``
for an app that maps Clerk users into its own tables."""

from __future__ import annotations

import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.test import override_settings
from django.utils.html import escape

from clerk_sync import errors, migrations
from clerk_sync.auth.sessions import verifier_from_settings
from clerk_sync.config import Settings
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations.django import runtime
from clerk_sync.integrations.django.checks import check_settings
from clerk_sync.integrations.django.conf import DjangoOptions, clerk_settings
from clerk_sync.integrations.django.runtime import ClerkSync, get_clerk_sync
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import SECRET
from tests.django.conftest import World, bearer
from tests.test_auth import token
from tests.test_cli import run
from tests.test_sessions import AZP, ISS, KEY, pem

# -- manage.py check: CLERK_AUTHORIZED_PARTIES ------------------------------------------------------------

KEYS = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS}


@pytest.mark.parametrize("unset", [{}, {"CLERK_AUTHORIZED_PARTIES": ""}, {"CLERK_AUTHORIZED_PARTIES": []}],
                         ids=["left-out", "blank", "empty-list"])
def test_unset_authorized_parties_is_a_check_warning_since_a_token_for_any_origin_signs_in(
        unset: dict[str, Any]) -> None:
    """Fixed: nothing said that without ``CLERK_AUTHORIZED_PARTIES`` the ``azp`` claim is not checked: a
    session token the Clerk instance minted for another origin is accepted. A warning (W002), as ``clerk-sync
    doctor`` says it, whose hint names the setting and what goes in it."""
    with override_settings(CLERK_SYNC={**KEYS, **unset}):
        found = check_settings()
        assert [(m.id, m.is_serious()) for m in found] == [("clerk_sync.W002", False)]
        assert "azp" in found[0].msg and "any origin" in found[0].msg
        hint = str(found[0].hint)
        assert "CLERK_SYNC['CLERK_AUTHORIZED_PARTIES']" in hint and "https://" in hint
        out, err = StringIO(), StringIO()
        call_command("check", stdout=out, stderr=err)  # a warning: manage.py (runserver, migrate) still runs
        assert "clerk_sync.W002" in out.getvalue() + err.getvalue()
        # what the warning is about: the verifier these settings build takes a token minted for another origin
        with httpx.Client() as http:
            verifier = verifier_from_settings(clerk_settings({}), http=http)
            assert verifier.verify(token("user_1", azp="https://evil.example")).user_id == "user_1"


def test_authorized_parties_set_anywhere_silences_the_warning_and_refuses_other_origins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with override_settings(CLERK_SYNC={**KEYS, "CLERK_AUTHORIZED_PARTIES": [AZP]}):
        assert check_settings() == []
        with httpx.Client() as http:
            verifier = verifier_from_settings(clerk_settings({}), http=http)
            assert verifier.verify(token("user_1")).user_id == "user_1"
            with pytest.raises(errors.TokenAuthorizedPartyInvalid):
                verifier.verify(token("user_1", azp="https://evil.example"))
    monkeypatch.setenv("CLERK_AUTHORIZED_PARTIES", AZP)  # CLERK_SYNC falls back to the environment
    with override_settings(CLERK_SYNC=KEYS):
        assert check_settings() == []


@pytest.mark.parametrize("keys", [{"CLERK_JWT_KEY": pem(KEY)}, {"CLERK_SECRET_KEY": "sk_test_x"},
                                  {"CLERK_JWKS_URL": "https://clerk.example.com/.well-known/jwks.json"}],
                         ids=["pem", "secret-key", "jwks-url"])
def test_every_way_of_verifying_sessions_gets_the_warning(keys: dict[str, str]) -> None:
    with override_settings(CLERK_SYNC={"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **keys}):
        assert [m.id for m in check_settings()] == ["clerk_sync.W002"]


def test_an_app_that_verifies_no_session_is_not_warned_about_authorized_parties() -> None:
    """Webhooks only (no session key; E003 silenced): no token is ever verified, so no ``azp`` either."""
    with override_settings(CLERK_SYNC={"CLERK_WEBHOOK_SIGNING_SECRET": SECRET}):
        assert [m.id for m in check_settings()] == ["clerk_sync.E003"]
        with override_settings(SILENCED_SYSTEM_CHECKS=["clerk_sync.E003"]):
            out, err = StringIO(), StringIO()
            call_command("check", stdout=out, stderr=err)
            assert "clerk_sync" not in out.getvalue() + err.getvalue()


#: The test project (the example's settings) authenticates with all three; a webhook-only project with none.
_CLERK_MIDDLEWARE = "clerk_sync.integrations.django.middleware.ClerkMiddleware"
_NO_CLERK_AUTH = {
    "MIDDLEWARE": ["django.middleware.security.SecurityMiddleware",
                   "django.contrib.sessions.middleware.SessionMiddleware",
                   "django.middleware.csrf.CsrfViewMiddleware",
                   "django.contrib.auth.middleware.AuthenticationMiddleware",
                   "django.contrib.messages.middleware.MessageMiddleware"],
    "AUTHENTICATION_BACKENDS": ["django.contrib.auth.backends.ModelBackend"],
    "REST_FRAMEWORK": {"DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"]},
}
_WEBHOOK_ONLY = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_SECRET_KEY": "sk_test_x"}


def test_a_webhook_only_project_with_a_secret_key_is_not_warned_about_authorized_parties() -> None:
    """Fixed: ``CLERK_SECRET_KEY`` (set for webhooks' or reconcile's Backend API calls) counted as
    verifying sessions, so a project that authenticates no request with clerk-sync got W002 on upgrade and
    ``manage.py check --fail-level WARNING`` failed its CI. Without the middleware, backend or DRF class: none."""
    with override_settings(CLERK_SYNC=_WEBHOOK_ONLY, **_NO_CLERK_AUTH):
        assert check_settings() == []
        out, err = StringIO(), StringIO()
        call_command("check", "--fail-level", "WARNING", stdout=out, stderr=err)
        assert "clerk_sync" not in out.getvalue() + err.getvalue()


@pytest.mark.parametrize("auth", [
    {"MIDDLEWARE": [*_NO_CLERK_AUTH["MIDDLEWARE"], _CLERK_MIDDLEWARE]},
    {"AUTHENTICATION_BACKENDS": ["clerk_sync.integrations.django.backends.ClerkBackend",
                                 "django.contrib.auth.backends.ModelBackend"]},
    {"REST_FRAMEWORK": {"DEFAULT_AUTHENTICATION_CLASSES": [
        "clerk_sync.integrations.django.rest_framework.ClerkAuthentication"]}},
], ids=["middleware", "backend", "drf"])
def test_a_project_authenticating_with_clerk_sync_and_a_secret_key_gets_the_warning(auth: dict[str, Any]) -> None:
    # (the backend alone, without the middleware, is warned of too: W003)
    alone = ["clerk_sync.W003"] if "AUTHENTICATION_BACKENDS" in auth else []
    with override_settings(CLERK_SYNC=_WEBHOOK_ONLY, **{**_NO_CLERK_AUTH, **auth}):
        assert [m.id for m in check_settings()] == ["clerk_sync.W002", *alone]
        with pytest.raises(SystemCheckError, match=r"clerk_sync\.W002"):
            call_command("check", "--fail-level", "WARNING", stdout=StringIO(), stderr=StringIO())
    with override_settings(CLERK_SYNC={**_WEBHOOK_ONLY, "CLERK_AUTHORIZED_PARTIES": [AZP]},
                           **{**_NO_CLERK_AUTH, **auth}):
        assert [m.id for m in check_settings()] == alone


@pytest.mark.parametrize("key", [{"CLERK_JWT_KEY": pem(KEY)},
                                 {"CLERK_JWKS_URL": "https://clerk.example.com/.well-known/jwks.json"}],
                         ids=["jwt_key", "jwks_url"])
def test_a_session_only_key_is_warned_about_without_the_middleware_backend_or_drf_class(key: dict[str, str]) -> None:
    """The view decorators (``clerk_login_required``, ``require_role``) verify sessions with no middleware,
    and settings cannot show them; ``CLERK_JWT_KEY``/``CLERK_JWKS_URL`` serve sessions only, so with either
    the warning stands whatever authenticates."""
    with override_settings(CLERK_SYNC={"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **key}, **_NO_CLERK_AUTH):
        assert [m.id for m in check_settings()] == ["clerk_sync.W002"]


def test_a_subclass_of_the_middleware_counts_as_authenticating(monkeypatch: pytest.MonkeyPatch) -> None:
    from clerk_sync.integrations.django.middleware import ClerkMiddleware

    module = types.ModuleType("clerk_sync_test_app_middleware")
    module.AppMiddleware = type("AppMiddleware", (ClerkMiddleware,), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    middleware = [*_NO_CLERK_AUTH["MIDDLEWARE"], f"{module.__name__}.AppMiddleware"]
    with override_settings(CLERK_SYNC=_WEBHOOK_ONLY, **{**_NO_CLERK_AUTH, "MIDDLEWARE": middleware}):
        assert [m.id for m in check_settings()] == ["clerk_sync.W002"]


# -- the admin's replay action ----------------------------------------------------------------------------

DELIVERIES = "/django-admin/clerk_sync/webhookdelivery/"


def _statuses(world: World) -> dict[str, tuple[str, int]]:
    with world.store.connect() as conn:
        e = webhook_events.c
        return {svix_id: (status, attempts) for svix_id, status, attempts
                in conn.execute(sa.select(e.svix_id, e.status, e.attempts))}


def _replay(world: World, as_admin: dict[str, str], svix_ids: list[str]) -> list[tuple[str, str]]:
    """Run the admin action on these deliveries; the messages it left, as (level, text)."""
    from django.contrib.messages import get_messages

    with world.store.connect() as conn:
        ids = list(conn.execute(sa.select(webhook_events.c.id).where(webhook_events.c.svix_id.in_(svix_ids))).scalars())
    page = world.app.post(DELIVERIES, {"action": "replay", "_selected_action": ids}, headers=as_admin, follow=True)
    assert page.redirect_chain == [(DELIVERIES, 302)] and page.status_code == 200, page.content
    said = [(m.level_tag, m.message) for m in get_messages(page.wsgi_request)]  # as the list page showed them
    assert all(escape(text) in page.content.decode() for _, text in said)
    return said


def _audited(world: World) -> list[str]:
    with world.store.connect() as conn:
        return [details["svix_id"] for details in conn.execute(
            sa.select(audit_log.c.details).where(audit_log.c.action == "django_admin.delivery_replayed")).scalars()]


def test_the_admin_replays_failed_deliveries_only_and_says_what_it_left_and_why(client_world: World) -> None:
    """Fixed: the admin's replay re-ran every selected delivery, ``applied`` ones included (relabelled
    ``skipped``, an attempt counted, an audit row each), where the console and ``manage.py clerk_sync replay``
    replay ``failed`` ones only. Now it does too, and the messages count the replayed and the left ones."""
    clerk = client_world.clerk
    admin = clerk.create_user("root@example.com", public_metadata={"role": "admin"})
    ada = clerk.create_user("ada@example.com")
    as_admin = bearer(clerk.mint_session_token(admin["id"]))
    clerk.wait_for_deliveries()
    before = _statuses(client_world)
    selected = sorted(before)
    assert sorted(status for status, _ in before.values()) == ["applied", "applied", "ignored"]  # session.created
    with client_world.store.connect() as conn:  # ada's user.created: stored failed, her row not written yet
        e = webhook_events.c
        [failed] = [svix_id for svix_id, payload in conn.execute(sa.select(e.svix_id, e.payload))
                    if payload["type"] == "user.created" and payload["data"]["id"] == ada["id"]]
    with client_world.store.transaction() as w:
        w.conn.execute(users.delete().where(users.c.clerk_id == ada["id"]))
        w.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == failed).values(status="failed"))
    others = [s for s in selected if s != failed]

    said = _replay(client_world, as_admin, selected)
    assert said == [("success", "Replayed 1 delivery: 1 applied."),
                    ("warning", "Not replayed: 2 deliveries not failed (1 applied, 1 ignored). Only failed deliveries "
                                "are replayed, as in the console and `manage.py clerk_sync replay`: the others were "
                                "already applied, skipped or ignored.")]
    after = _statuses(client_world)
    assert after[failed] == ("applied", before[failed][1] + 1)
    assert {s: after[s] for s in others} == {s: before[s] for s in others}  # untouched: status and attempts
    assert _audited(client_world) == [failed]  # only what was replayed is audited
    with client_world.store.connect() as conn:
        assert conn.execute(sa.select(users.c.email).where(users.c.clerk_id == ada["id"])).scalar_one() == \
            "ada@example.com"

    said = _replay(client_world, as_admin, [failed])  # a second click: nothing is replayed twice
    assert said == [("warning", "Not replayed: 1 delivery not failed (1 applied). Only failed deliveries are "
                                "replayed, as in the console and `manage.py clerk_sync replay`: the others were "
                                "already applied, skipped or ignored.")]
    assert _statuses(client_world) == after and _audited(client_world) == [failed]


def test_a_delivery_replayed_meanwhile_is_not_replayed_again(client_world: World) -> None:
    """The list said ``failed``, but another admin (or the console) replayed it before this one's turn: its
    row, read locked in the replay's transaction, is no longer failed, so nothing is written."""
    from clerk_sync.integrations.django.admin import _replay_failed_audited

    bad = f.envelope("user.created", {"id": "user_bad" + "x" * 70, "object": "user"})  # no row can have that id: failed
    processor = get_clerk_sync().processor
    assert processor.process(*f.signed(bad, "msg_bad", secret=client_world.clerk.webhook_secret)).status == "failed"
    assert _replay_failed_audited("msg_bad", "user_admin", "127.0.0.1") == (True, "failed")  # still failed: replayed
    with client_world.store.transaction() as w:
        w.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == "msg_bad").values(status="applied"))
    before = _statuses(client_world)["msg_bad"]
    assert _replay_failed_audited("msg_bad", "user_admin", "127.0.0.1") == (False, "applied")
    assert _statuses(client_world)["msg_bad"] == before and _audited(client_world) == ["msg_bad"]


# -- the runtime's parts, built once ----------------------------------------------------------------------

#: ClerkSync's lazily built parts, and the name in ``runtime`` each one's build calls.
PARTS = {"processor": "build_processor", "clerk": "ClerkClient", "aclerk": "AsyncClerkClient", "jit": "JitUsers",
         "authenticator": "verifier_from_settings", "admin_actions": "AdminActions"}


@pytest.fixture
def counted_builds(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Each part's build counted, and slowed down so that concurrent first uses overlap."""
    builds: Counter[str] = Counter()

    def counting(part: str, build: Callable[..., Any]) -> Callable[..., Any]:
        def slow(*args: Any, **kwargs: Any) -> Any:
            builds[part] += 1
            time.sleep(0.05)
            return build(*args, **kwargs)

        return slow

    for part, name in PARTS.items():
        original = getattr(runtime, name)
        if name.endswith("ClerkClient"):  # built by its from_settings
            monkeypatch.setattr(runtime, name, types.SimpleNamespace(
                from_settings=counting(part, original.from_settings)))
        else:
            monkeypatch.setattr(runtime, name, counting(part, original))
    return builds


@pytest.fixture
def clerk_sync(tmp_path: Path) -> Iterator[ClerkSync]:
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'parts.db'}",
                                  "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY),
                                  "CLERK_SECRET_KEY": "sk_test_parts"})
    parts = ClerkSync(settings, DjangoOptions())
    yield parts
    parts.close()


def test_concurrent_first_uses_build_each_part_once(counted_builds: Counter[str], clerk_sync: ClerkSync) -> None:
    """Fixed: the parts were ``functools.cached_property``, which no longer locks on Python 3.12+: the first
    requests of a threaded server each built a Clerk client (one left unclosed), a JIT user loader, an
    authenticator. Threads released together by a barrier, several per part (the authenticator's build needing
    ``jit``, which needs ``clerk`` and ``aclerk``), build each part once and all get that one."""
    per_part = 6
    barrier = threading.Barrier(per_part * len(PARTS))
    got: dict[str, list[object]] = {part: [] for part in PARTS}
    failures: list[BaseException] = []

    def first_use(part: str) -> None:
        barrier.wait()
        try:
            got[part].append(getattr(clerk_sync, part))
        except BaseException as exc:  # a thread's error would otherwise be lost
            failures.append(exc)

    threads = [threading.Thread(target=first_use, args=(part,)) for part in PARTS for _ in range(per_part)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)  # no deadlock between parts built from each other
    assert failures == []
    assert counted_builds == dict.fromkeys(PARTS, 1)
    for part, values in got.items():
        assert len(values) == per_part and all(value is values[0] for value in values), part
        assert getattr(clerk_sync, part) is values[0]
    assert counted_builds == dict.fromkeys(PARTS, 1)  # read again: no lock, no build


def test_a_part_whose_build_failed_is_built_again_on_next_use(tmp_path: Path) -> None:
    """As with cached_property: a build that raised (no webhook secret) keeps nothing, so fixing the cause and
    using it again builds it."""
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'parts.db'}"})
    parts = ClerkSync(settings, DjangoOptions())
    try:
        for _ in range(2):
            with pytest.raises(errors.ConfigError, match="CLERK_WEBHOOK_SIGNING_SECRET"):
                parts.processor  # noqa: B018 - the build is the point
        parts.settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'parts.db'}",
                                            "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
        assert isinstance(parts.processor, WebhookProcessor) and parts.processor is parts.processor
    finally:
        parts.close()


# -- manage.py clerk_sync migrate with CLERK_SYNC["MAPPING"] ----------------------------------------------

#: Loaded by dotted path from CLERK_SYNC["MAPPING"] below.
MAPPING = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"}, SoftDelete("deleted_at")))
_APP_MODULE = """
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete
MAPPING = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"}, SoftDelete("deleted_at")))
"""


def _accounts(url: str) -> None:
    """The app's own table, as it was before the mapping: no Clerk-id nor delete column."""
    engine = sa.create_engine(url)
    sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),  # SERIAL, AUTO_INCREMENT..
             sa.Column("email", sa.String(320))).create(engine)
    engine.dispose()


def _schema(url: str) -> tuple[set[str], list[tuple[str | None, ...]]]:
    engine = sa.create_engine(url)
    inspector = sa.inspect(engine)
    columns = {c["name"] for c in inspector.get_columns("accounts")}
    unique = sorted(tuple(i["column_names"]) for i in inspector.get_indexes("accounts") if i["unique"])
    engine.dispose()
    return columns, unique


def _migrate(url: str, *args: str, mapped: bool = True) -> str:
    """``manage.py clerk_sync migrate`` on ``url``, with CLERK_SYNC["MAPPING"] set to the mapping above or not."""
    settings = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "DATABASE_URL": url}
    if mapped:
        settings["MAPPING"] = "tests.django.test_authorized_parties_check_and_migrate.MAPPING"
    out = StringIO()
    with override_settings(CLERK_SYNC=settings):
        call_command("clerk_sync", "migrate", *args, stdout=out)
    return out.getvalue()


def test_manage_py_migrate_adds_what_the_mapping_needs_as_the_cli_does(db_url: str, tmp_path: Path) -> None:
    """Fixed: ``manage.py clerk_sync migrate`` left the mapped table without its Clerk-id column (every delivery
    then failed on it), where ``clerk-sync migrate --mapping`` adds it. It migrates ``CLERK_SYNC["MAPPING"]``
    (the webhook view's) through the same ``migrate_schema``."""
    by_cli = f"sqlite:///{tmp_path / 'cli.db'}"
    for url in (by_cli, db_url):
        _accounts(url)
    (tmp_path / "appmap.py").write_text(_APP_MODULE)
    cli = run("migrate", "--mapping", "appmap:MAPPING", env={"DATABASE_URL": by_cli, "PYTHONPATH": str(tmp_path)})
    assert cli.returncode == 0, cli.stderr

    out = _migrate(db_url)
    assert "clerk-sync migrated a new database to" in out or "clerk-sync already current" in out, out
    for line in ("added accounts.clerk_user_id", "added accounts.deleted_at",
                 "created unique index uq_accounts_clerk_user_id"):
        assert f"mapping: {line}" in out, out
    assert _schema(db_url) == _schema(by_cli) == ({"id", "email", "clerk_user_id", "deleted_at"}, [("clerk_user_id",)])
    assert "mapping: mapped tables already have what the mapping needs" in _migrate(db_url)  # idempotent

    store = Store.from_url(db_url, mapping=MAPPING)  # what the webhook view now writes
    try:
        headers, body = f.signed(f.envelope("user.created", f.user("user_mapped", 5, email="m@example.com")), "msg_m")
        assert WebhookProcessor(store, WebhookVerifier(SECRET)).process(headers, body).status == "applied"
        with store.connect() as conn:
            assert conn.execute(sa.text("SELECT clerk_user_id, email FROM accounts")).all() == [
                ("user_mapped", "m@example.com")]
    finally:
        store.dispose()


def test_manage_py_migrate_backfill_writes_the_rows_clerk_sync_already_holds(db_url: str) -> None:
    """A mapping added to a running install: ``--backfill`` (as ``clerk-sync migrate --mapping .. --backfill``)
    writes the users clerk-sync synced before it into the app's table."""
    _accounts(db_url)
    before = Store.from_url(db_url)  # the install before the mapping
    try:
        for n in (1, 2):
            event = f.envelope("user.created", f.user(f"user_{n}", 5, email=f"person{n}@example.com"))
            WebhookProcessor(before, WebhookVerifier(SECRET)).process(*f.signed(event, f"msg_{n}"))
    finally:
        before.dispose()
    out = _migrate(db_url, "--backfill")
    assert "mapping: added accounts.clerk_user_id" in out and "mapping: backfilled {'users': 2}" in out, out
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        assert set(conn.execute(sa.text("SELECT clerk_user_id, email FROM accounts")).all()) == {
            ("user_1", "person1@example.com"), ("user_2", "person2@example.com")}
    engine.dispose()


def test_manage_py_migrate_without_a_mapping_is_unchanged_and_backfill_needs_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    engine = sa.create_engine(url)
    with pytest.raises(CommandError, match=r'--backfill needs CLERK_SYNC\["MAPPING"\]'):
        _migrate(url, "--backfill", mapped=False)
    assert not migrations.is_current(engine)  # refused before anything changed
    out = _migrate(url, mapped=False)
    assert "clerk-sync migrated a new database to" in out and "mapping" not in out, out
    assert migrations.is_current(engine)
    engine.dispose()


def test_the_backend_without_the_middleware_is_a_check_warning() -> None:
    """Fixed: with ClerkBackend listed but ClerkMiddleware left out, `check` said nothing while a
    valid Clerk token got `login_required`'s redirect and an admin no staff rights."""
    from django.conf import settings as django_settings

    base = {**KEYS, "CLERK_AUTHORIZED_PARTIES": ["https://app.example.com"]}
    without = [m for m in django_settings.MIDDLEWARE if "clerk_sync" not in m]
    backends = ["clerk_sync.integrations.django.backends.ClerkBackend", "django.contrib.auth.backends.ModelBackend"]
    with override_settings(CLERK_SYNC=base, AUTHENTICATION_BACKENDS=backends):
        assert check_settings() == []
        with override_settings(MIDDLEWARE=without):
            found = check_settings()
            assert [(m.id, m.is_serious()) for m in found] == [("clerk_sync.W003", False)]
            assert "ClerkMiddleware" in str(found[0].hint)
    with override_settings(CLERK_SYNC=base, MIDDLEWARE=without,
                           AUTHENTICATION_BACKENDS=["django.contrib.auth.backends.ModelBackend"]):
        assert check_settings() == []  # (no backend: nothing to warn of)


def _nick(values: dict[str, Any]) -> str:
    if values["clerk_id"] == "user_refused":
        raise ValueError("no nick for this one")
    return "nick"


#: A mapping whose compute refuses one user (the backfill counts it refused).
REFUSING = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email", "nick": Column(compute=_nick)},
                                           SoftDelete("deleted_at")))


def test_manage_py_migrate_backfill_exits_1_when_rows_were_refused(tmp_path: Path) -> None:
    """As ``clerk-sync migrate --mapping .. --backfill`` does (tests/test_backfill_refused_exit.py): a deploy step
    sees that the backfill left rows unwritten."""
    from clerk_sync import migrations
    from clerk_sync.engine import Entity, Upsert
    from clerk_sync.events import user_record
    from clerk_sync.store import create_engine

    url = f"sqlite:///{tmp_path / 'refusing.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    store = Store.from_url(url)
    with store.transaction() as writer:
        for clerk_id in ("user_fine", "user_refused"):
            writer.apply(Upsert(Entity.USER, user_record(f.user(clerk_id, 1_800_000_000_000))))
    store.dispose()
    engine = sa.create_engine(url)
    sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("email", sa.String(320)), sa.Column("nick", sa.String(8), nullable=False)).create(engine)
    engine.dispose()
    settings = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "DATABASE_URL": url,
                "MAPPING": "tests.django.test_authorized_parties_check_and_migrate.REFUSING"}
    out = StringIO()
    with override_settings(CLERK_SYNC=settings), pytest.raises(CommandError) as refused:
        call_command("clerk_sync", "migrate", "--backfill", stdout=out)
    assert refused.value.returncode == 1, refused.value
    assert "1 row(s) refused by the mapped tables" in str(refused.value)
    assert "1 row(s) refused, not written" in out.getvalue(), out.getvalue()
