"""Least-privilege database roles, after review: PostgreSQL's 42501 on an app's mapped table is the row's own refusal
(a row-level security policy, a trigger raising ``insufficient_privilege``) unless the role really lacks a grant
there; /readyz asks only what this process writes, and says a read-only database as that.

Each test makes its own roles (users) and database (tests/test_least_privilege_roles.py's helpers) and drops them."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog

from clerk_sync.config import Settings
from clerk_sync.engine import Entity
from clerk_sync.integrations import starlette as starlette_face
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.mapping import MappedTable, SchemaMapping, SoftDelete, lacking_privileges, mapped_reads
from clerk_sync.store import Store, create_engine
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._grants_app import HOOKS, MAPPING
from tests._server import running
from tests.conftest import PG_URL, SECRET
from tests.test_cli import run
from tests.test_least_privilege_roles import (
    APP,
    Roles,
    _deliver,
    _env,
    _mariadb,
    _postgres,
    _privileges_line,
    _service,
    granted,
)

_ROW_REFUSALS = {
    "rls": ("ALTER TABLE accounts ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY grfix_no_blocked ON accounts USING (true) WITH CHECK (position('blocked' in email) = 0)"),
    "trigger": ("CREATE FUNCTION grfix_no_blocked() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF position('blocked' in NEW.email) > 0 THEN RAISE EXCEPTION 'blocked domain' "
                "USING ERRCODE = 'insufficient_privilege'; END IF; RETURN NEW; END $$",
                "CREATE TRIGGER grfix_no_blocked BEFORE INSERT OR UPDATE ON accounts FOR EACH ROW "
                "EXECUTE FUNCTION grfix_no_blocked()"),
}


@pytest.mark.postgres
@pytest.mark.parametrize("kind", sorted(_ROW_REFUSALS))
def test_a_row_the_app_table_refuses_with_42501_is_the_rows_refusal_not_a_503(kind: str) -> None:
    """A row-level security policy's WITH CHECK, or a trigger raising insufficient_privilege, refuses one row with
    the SQLSTATE of a missing grant: the delivery was answered 503 until Svix gave up (~27 h), the user's ban, role
    and deletion never applied. The role has every grant on the table: the row's refusal, the delivery applied."""
    with granted("postgresql") as roles:
        roles.as_owner(*_ROW_REFUSALS[kind])
        blocked = f.envelope("user.created", f.user("user_grfix1", 5, email="x@blocked.example", banned=True))
        with _service(roles) as client, structlog.testing.capture_logs() as logs:
            answer = _deliver(client, "msg_grfix1", blocked)
            other = _deliver(client, "msg_grfix2", f.envelope("user.created", f.user("user_grfix2", 5)))
        assert answer.status_code == 200 and answer.json()["status"] == "applied", answer.text
        assert other.status_code == 200, other.text
        refused = next(e for e in logs if e["event"] == "mapped_row_refused")
        assert refused["clerk_id"] == "user_grfix1" and "refused the row itself" in refused["reason"], refused
        assert "prints the GRANT statements" not in refused["reason"], refused
        assert roles.admin_read("SELECT clerk_id, banned FROM users ORDER BY clerk_id") == [
            ("user_grfix1", True), ("user_grfix2", False)]
        # the trigger's refusal: the row is written again without the user's own columns (its e-mail kept back)
        kept = [("user_grfix1", None)] if kind == "trigger" else []
        assert roles.admin_read("SELECT clerk_user_id, email FROM accounts ORDER BY 1") == [
            *kept, ("user_grfix2", "user_grfix2@example.com")]


@pytest.mark.postgres
def test_reconcile_mapping_writes_the_other_users_when_a_policy_refuses_one() -> None:
    """The same refusal during `reconcile --mapping` failed the whole run (every day); the other users are written."""
    with granted("postgresql") as roles:
        roles.as_owner(*_ROW_REFUSALS["rls"])
        with EmulatorServer() as emu:
            emu.create_user("ok@example.com")
            emu.create_user("x@blocked.example")
            done = run("reconcile", "--mapping", f"{APP}:MAPPING", env=_env(roles, emu))
        assert done.returncode == 0, done.stderr
        assert roles.admin_read("SELECT email FROM accounts") == [("ok@example.com",)]
        assert sorted(roles.admin_read("SELECT email FROM users")) == [("ok@example.com",), ("x@blocked.example",)]


@contextmanager
def _serving(roles: Roles, *, dispatches: bool) -> Iterator[httpx.Client]:
    """tests/test_least_privilege_roles.py's service; ``dispatches``: as ``serve --hooks`` marks its app."""
    settings = Settings.from_env({"DATABASE_URL": roles.runtime_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    store = Store(create_engine(roles.runtime_url), mapping=MAPPING, hooks=HOOKS)
    app = create_app(settings, build_processor(settings, store))
    if dispatches:
        app.state.clerk_sync_dispatches = True
    try:
        with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        store.dispose()


def _as_admin(roles: Roles, *statements: str) -> None:
    engine = sa.create_engine(roles.admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_readyz_asks_only_what_this_process_writes_and_doctor_says_who_needs_each() -> None:
    """A DELETE only the hook dispatcher (or reconcile) needs took a `serve --no-dispatch` replica out of rotation
    while its deliveries worked; doctor said "deliveries answer 503" of every missing line."""
    with granted("postgresql") as roles:
        roles.as_owner(f"REVOKE DELETE ON hook_jobs FROM {roles.runtime}",
                       f"REVOKE DELETE ON reconcile_runs FROM {roles.runtime}")
        with _serving(roles, dispatches=False) as client:
            ready = client.get("/readyz")
            answer = _deliver(client, "msg_grfix3", f.envelope("user.created", f.user("user_grfix3", 5)))
        with _serving(roles, dispatches=True) as client:
            dispatching = client.get("/readyz")
        doctor = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(roles))
    assert ready.status_code == 200, ready.text
    assert answer.status_code == 200, answer.text
    assert dispatching.status_code == 503 and dispatching.json()["privileges"] == "missing", dispatching.text
    line = " ".join(_privileges_line(doctor.stdout).split())
    assert "hook_jobs: DELETE (for the hook dispatcher (serve --hooks, worker))" in line, line
    assert "reconcile_runs: DELETE (for reconcile)" in line and "deliveries answer 503" not in line, line
    assert "GRANT DELETE ON hook_jobs" in line and "GRANT DELETE ON reconcile_runs" in line, line


@pytest.mark.postgres
def test_a_schema_of_the_search_path_the_role_may_not_use_is_none_of_readyz_business() -> None:
    """A schema on the role's search_path it may not use, not where clerk-sync's tables are: /readyz was 503 for
    ever (privileges missing: USAGE) while every delivery worked."""
    with granted("postgresql") as roles:
        roles.as_owner("CREATE SCHEMA grfix_other")
        _as_admin(roles, f"ALTER ROLE {roles.runtime} IN DATABASE {roles.database} "
                         "SET search_path = public, grfix_other")
        with _service(roles) as client:
            ready = client.get("/readyz")
            answer = _deliver(client, "msg_grfix4", f.envelope("user.created", f.user("user_grfix4", 5)))
        doctor = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(roles))
    assert answer.status_code == 200, answer.text
    assert ready.status_code == 200, ready.text
    assert _privileges_line(doctor.stdout).split()[0] == "ok", doctor.stdout


@pytest.mark.mariadb
def test_mariadb_user_without_the_database_is_told_to_check_its_name() -> None:
    """1044 at connect (a database name DATABASE_URL misspells, or a user with no grant): the GRANT advice was
    given ("doctor prints the GRANT statements") while doctor's privileges line printed nothing."""
    with _mariadb() as roles:
        doctor = run("doctor", env=_env(roles))
        prune = run("prune", env=_env(roles))
    database = " ".join(next(x for x in doctor.stdout.splitlines() if "database:" in x).split())
    said = f"the user may not use database {roles.database}: check the database name in DATABASE_URL"
    assert said in database and "prints the GRANT statements" not in database, database
    assert said in " ".join(prune.stderr.split()) and prune.returncode == 2, prune.stderr


@pytest.mark.postgres
def test_readyz_on_a_read_only_database_says_read_only() -> None:
    """A standby or default_transaction_read_only: the probe's INSERT got 25006, said "database": "down"."""
    with granted("postgresql") as roles:
        _as_admin(roles, f"ALTER ROLE {roles.runtime} IN DATABASE {roles.database} "
                         "SET default_transaction_read_only = on")
        with _service(roles) as client:
            ready = client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["database"] == "read-only", ready.text
    assert "standby or a read-only role" in ready.json()["hint"], ready.text


@pytest.mark.postgres
def test_readyz_keeps_its_privileges_verdict_a_minute_either_way_and_logs_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each /readyz ran the whole probe (~45 statements) and logged a WARNING while something was missing; once
    granted it never asked again (a later REVOKE: readyz 200 for good)."""
    now = [1000.0]
    monkeypatch.setattr(starlette_face._RolePrivileges, "clock", staticmethod(lambda: now[0]))
    with granted("postgresql") as roles:
        roles.as_owner(f"REVOKE INSERT ON webhook_events FROM {roles.runtime}")
        with _service(roles) as client, structlog.testing.capture_logs() as logs:
            codes = [client.get("/readyz").status_code for _ in range(3)]
            roles.as_owner(f"GRANT INSERT ON webhook_events TO {roles.runtime}")
            codes.append(client.get("/readyz").status_code)  # within the minute: the verdict kept
            now[0] += 61
            codes.append(client.get("/readyz").status_code)
            roles.as_owner(f"REVOKE INSERT ON webhook_events FROM {roles.runtime}")
            codes.append(client.get("/readyz").status_code)
            now[0] += 61
            codes.append(client.get("/readyz").status_code)  # a later REVOKE is seen
    assert codes == [503, 503, 503, 503, 200, 200, 503], codes
    said = [e["event"] for e in logs if e["event"].startswith("readyz_privileges")]
    assert said == ["readyz_privileges_missing", "readyz_privileges_granted", "readyz_privileges_missing"], said


@pytest.mark.postgres
def test_the_privileges_probe_runs_no_statement_on_the_apps_table() -> None:
    """The probe ran zero-row INSERT/UPDATE on the app's mapped table: its statement-level triggers fired (at each
    /readyz and doctor). It asks PostgreSQL's catalog instead."""
    with granted("postgresql") as roles:
        # (a sequence: what a rolled-back probe cannot undo, as a trigger's mail, NOTIFY to a listener, dblink)
        roles.as_owner("CREATE SEQUENCE grfix_fired", f"GRANT USAGE ON SEQUENCE grfix_fired TO {roles.runtime}",
                       "CREATE FUNCTION grfix_note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                       "PERFORM nextval('grfix_fired'); RETURN NULL; END $$",
                       "CREATE TRIGGER grfix_note AFTER INSERT OR UPDATE OR DELETE ON accounts "
                       "FOR EACH STATEMENT EXECUTE FUNCTION grfix_note()",
                       f"REVOKE UPDATE (role) ON accounts FROM {roles.runtime}")
        with _service(roles) as client:
            ready = client.get("/readyz")
        doctor = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(roles))
        fired = roles.admin_read("SELECT is_called FROM grfix_fired")
    assert ready.status_code == 503, ready.text  # still asked: UPDATE (role) is missing
    grants = re.findall(r"GRANT [^;]+;", " ".join(_privileges_line(doctor.stdout).split()))
    assert any("UPDATE (" in g and "accounts" in g for g in grants), grants
    assert fired == [(False,)], fired


def _doctor_grants(roles: Roles) -> list[str]:
    doctor = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(roles))
    return re.findall(r"GRANT [^;]+;", " ".join(_privileges_line(doctor.stdout).split()))


def _refused_until_granted(roles: Roles, svix_id: str, event: dict[str, Any]
                           ) -> tuple[httpx.Response, httpx.Response, list[str], list[Any], httpx.Response]:
    """``event`` delivered to a service short of a grant (its answer, /readyz's, doctor's GRANTs, the inbox's
    statuses), then again once those GRANTs ran (its answer)."""
    with _service(roles) as client:
        refused = _deliver(client, svix_id, event)
        ready = client.get("/readyz")
    grants = _doctor_grants(roles)
    stored = roles.admin_read("SELECT status FROM webhook_events")
    roles.as_owner(*(g.rstrip(";") for g in grants))
    with _service(roles) as client:
        applied = _deliver(client, svix_id, event)
    return refused, ready, grants, stored, applied


@pytest.mark.postgres
def test_a_column_the_mapped_writes_read_without_select_is_a_grant_to_run_not_the_rows_refusal() -> None:
    """SELECT granted on some columns of the app's table (``GRANT SELECT (id, email)``), not those the upsert reads
    (its Clerk-id column, the written ones): PostgreSQL refuses every row with 42501, which was taken for the row's
    own refusal (a policy's): every user's row stored as refused, /readyz and doctor content."""
    with granted("postgresql") as roles:
        roles.as_owner(f"REVOKE SELECT ON accounts FROM {roles.runtime}",  # noqa: S608
                       f"GRANT SELECT (id, email) ON accounts TO {roles.runtime}")
        refused, ready, grants, stored, applied = _refused_until_granted(
            roles, "msg_grfix5", f.envelope("user.created", f.user("user_grfix5", 5, email="five@example.com")))
        rows = roles.admin_read("SELECT clerk_user_id, email FROM accounts")
    assert refused.status_code == 503 and stored == [], (refused.text, stored)
    assert ready.status_code == 503 and ready.json()["privileges"] == "missing", ready.text
    assert grants == [f"GRANT SELECT (clerk_user_id, email, name, role, deleted_at) ON accounts TO {roles.runtime};"]
    assert applied.status_code == 200 and applied.json()["status"] == "applied", applied.text
    assert rows == [("user_grfix5", "five@example.com")]


@pytest.mark.postgres
def test_a_sequence_a_column_default_calls_without_owned_by_is_asked_for_usage() -> None:
    """``DEFAULT nextval('ids')`` of a sequence created apart (no OWNED BY): only serial (owned) sequences were asked,
    so its missing USAGE was taken for the row's own refusal, every row stored as refused, /readyz and doctor ok."""
    with granted("postgresql") as roles:
        roles.as_owner("CREATE SEQUENCE grfix_ids", "ALTER TABLE accounts ALTER COLUMN id SET DEFAULT nextval('grfix_ids')")
        refused, ready, grants, stored, applied = _refused_until_granted(
            roles, "msg_grfix6", f.envelope("user.created", f.user("user_grfix6", 5, email="six@example.com")))
        rows = roles.admin_read("SELECT id, clerk_user_id FROM accounts")
    assert refused.status_code == 503 and stored == [], (refused.text, stored)
    assert ready.status_code == 503 and ready.json()["privileges"] == "missing", ready.text
    assert grants == [f"GRANT USAGE ON SEQUENCE grfix_ids TO {roles.runtime};"]
    assert applied.status_code == 200 and applied.json()["status"] == "applied", applied.text
    assert rows == [(1, "user_grfix6")]


@pytest.mark.postgres
def test_a_mixed_case_schema_the_role_may_not_use_is_named_by_doctor() -> None:
    """clerk-sync's tables in schema "Grfix" (mixed case, as quoted), the role without USAGE there: to_regnamespace
    read the name as an identifier (folded to grfix, not found), so doctor said "run `clerk-sync migrate`" instead."""
    with _postgres() as roles:
        roles.as_owner('CREATE SCHEMA "Grfix"', f"GRANT CONNECT ON DATABASE {roles.database} TO {roles.runtime}")
        _as_admin(roles, f'ALTER ROLE {roles.runtime} IN DATABASE {roles.database} SET search_path = "Grfix"')
        doctor = run("doctor", env=_env(roles))
    database = " ".join(next(x for x in doctor.stdout.splitlines() if "database:" in x).split())
    assert "may not use schema Grfix (USAGE)" in database and "run `clerk-sync migrate`" not in database, database


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_two_readyz_polls_at_once_ask_the_role_and_log_once(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two polls at once (a load balancer's probes) each ran the whole probe and each logged the missing GRANT:
    the verdict kept a minute is now decided once, the other poll waiting for it."""
    from clerk_sync.migrations import _privileges

    asked: list[object] = []
    second_probed = threading.Event()
    answers: list[int] = []
    others: list[threading.Thread] = []

    def probe(conn: sa.Connection, mapping: object = None, who: object = None) -> _privileges.Missing:
        asked.append(who)
        if len(asked) == 1:  # a second poll while this one asks (without a lock it probes too, meanwhile)
            other = threading.Thread(target=lambda: answers.append(httpx.get(f"{url}/readyz", timeout=30).status_code))
            other.start()
            others.append(other)
            second_probed.wait(timeout=1)
        else:
            second_probed.set()
        return _privileges.Missing(grants=["GRANT DELETE ON hook_jobs TO someone;"], needed=["hook_jobs: DELETE"])

    monkeypatch.setattr(_privileges, "missing_privileges", probe)
    settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    store = Store(create_engine(db_url))
    try:
        with running(create_app(settings, build_processor(settings, store))) as url, \
                structlog.testing.capture_logs() as logs:
            first = httpx.get(f"{url}/readyz", timeout=30)
            for other in others:
                other.join()
    finally:
        store.dispose()
    assert (first.status_code, answers) == (503, [503])
    assert len(asked) == 1, asked
    assert [e["event"] for e in logs if e["event"].startswith("readyz_privileges")] == ["readyz_privileges_missing"]


@pytest.mark.postgres
def test_a_linking_mapping_needs_select_on_its_link_columns_and_primary_key() -> None:
    """A mapping that links users by e-mail finds the row to link by the e-mail column and reads its primary key:
    SELECT granted on the written columns only is still a GRANT to run (its 42501 is no row's own refusal)."""
    linking = MappedTable("accounts", "clerk_user_id", {"name": "full_name"}, link_by_email="email",
                          on_delete=SoftDelete("deleted_at"))
    with granted("postgresql") as roles:
        roles.as_owner(f"REVOKE SELECT ON accounts FROM {roles.runtime}",  # noqa: S608
                       f"GRANT SELECT (clerk_user_id, name, deleted_at) ON accounts TO {roles.runtime}")
        engine = sa.create_engine(roles.runtime_url)
        try:
            with engine.connect() as conn:
                reads = mapped_reads(conn, linking)
                lacking = lacking_privileges(conn, linking)
                lacks = SchemaMapping(users=linking).role_lacks(conn, Entity.USER)
            roles.as_owner(f"GRANT SELECT (email, id) ON accounts TO {roles.runtime}")
            with engine.connect() as conn:
                after_grant = lacking_privileges(conn, linking)
        finally:
            engine.dispose()
    assert reads == ("clerk_user_id", "name", "deleted_at", "email", "id")
    assert (lacking, lacks, after_grant) == (["SELECT"], True, [])


@pytest.mark.mariadb
def test_a_linking_mapping_on_a_table_the_role_may_not_touch_is_its_grants_not_a_database_error() -> None:
    """MariaDB: a runtime role with no privilege at all on the mapped table (only on another one of the database)
    may not even SHOW it: the primary key a linking mapping reads is not asked of the inspector (1142, "SHOW
    command denied", was doctor's privileges line and /readyz's "database down"), the grants are said missing."""
    linking = MappedTable("accounts", "clerk_user_id", {"name": "full_name"}, link_by_email="email",
                          on_delete=SoftDelete("deleted_at"))
    with _mariadb() as roles:
        roles.as_owner("CREATE TABLE fix3_other (id INT)", f"GRANT SELECT ON fix3_other TO {roles.runtime}")
        engine = sa.create_engine(roles.runtime_url)
        try:
            with engine.connect() as conn:
                lacking = lacking_privileges(conn, linking)
                reads = mapped_reads(conn, linking)
        finally:
            engine.dispose()
    assert lacking == ["SELECT", "INSERT", "UPDATE"]
    assert reads == ("clerk_user_id", "name", "deleted_at", "email")  # no primary key to be read: none named


@pytest.mark.postgres
@pytest.mark.parametrize("link", ["link_by_email", "link_by_external_id"])
def test_a_linking_mapping_whose_table_is_not_there_yet_lacks_nothing(link: str) -> None:
    """A mapped table not created yet (the app's migration behind) is said missing elsewhere: its privileges are
    none of lacking_privileges' business, a linking mapping's too (its primary key was asked of the inspector:
    NoSuchTableError)."""
    linking = MappedTable("fix3_no_such_accounts", "clerk_user_id", {"name": "full_name"},
                          on_delete=SoftDelete("deleted_at"), **{link: "email"})
    engine = sa.create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            lacking = lacking_privileges(conn, linking)
            reads = mapped_reads(conn, linking)
    finally:
        engine.dispose()
    assert (lacking, reads) == ([], ("clerk_user_id", "name", "deleted_at", "email"))
