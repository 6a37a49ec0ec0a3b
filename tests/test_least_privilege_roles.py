"""clerk-sync deployed with least-privilege database roles, on PostgreSQL and MariaDB: an owner role runs `clerk-sync
migrate` (with the app's mapped table), a runtime role runs everything else with only the RUNBOOK's GRANT statements
("Least-privilege database roles"), and a missing grant is said as one (what to grant), never taken for a bad row.

Each test makes its own roles (users) and database, named ``grants_*``, and drops them."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog

from clerk_sync import migrations
from clerk_sync.auth.users import JitUsers
from clerk_sync.config import Settings
from clerk_sync.integrations.starlette import _RolePrivileges, build_processor, create_app
from clerk_sync.store import Store, create_engine
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._grants_app import ACCOUNTS_DDL, HOOKS, MAPPING
from tests._server import running
from tests.conftest import _MYSQL_PROBLEM, _PG_PROBLEM, MYSQL_URL, PG_URL, SECRET, clerk_client, require_server
from tests.test_cli import run

RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "RUNBOOK.md"
APP = "tests._grants_app"


@dataclass(frozen=True)
class Roles:
    kind: str  # "postgresql" or "mysql"
    admin_url: str  # a superuser on the test's database
    owner_url: str  # the role that runs `clerk-sync migrate` and grants
    runtime_url: str  # the role everything else runs as
    database: str
    runtime: str  # the grantee, as a GRANT names it

    def as_owner(self, *statements: str) -> None:
        engine = sa.create_engine(self.owner_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.exec_driver_sql(_literal(self.kind, statement))
        finally:
            engine.dispose()

    def admin_read(self, statement: str) -> list[tuple[object, ...]]:
        engine = sa.create_engine(self.admin_url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.exec_driver_sql(statement)]
        finally:
            engine.dispose()


def _literal(kind: str, statement: str) -> str:
    """mysqlclient formats every statement with %: a host's '%' is written '%%' to it."""
    return statement.replace("%", "%%") if kind == "mysql" else statement


def _url(base: str, **parts: Any) -> str:
    return sa.engine.make_url(base).set(**parts).render_as_string(hide_password=False)


@contextmanager
def _postgres() -> Iterator[Roles]:
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    tag = uuid.uuid4().hex[:10]
    owner, runtime, database = f"grants_owner_{tag}", f"grants_rt_{tag}", f"grants_{tag}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    roles = Roles("postgresql", _url(PG_URL, database=database),
                  _url(PG_URL, username=owner, password="grants_pw", database=database),
                  _url(PG_URL, username=runtime, password="grants_pw", database=database), database, runtime)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE ROLE {owner} LOGIN PASSWORD 'grants_pw'")
            conn.exec_driver_sql(f"CREATE ROLE {runtime} LOGIN PASSWORD 'grants_pw'")
            conn.exec_driver_sql(f"CREATE DATABASE {database} OWNER {owner}")
        # a hardened database: PUBLIC's defaults (CONNECT, TEMPORARY, CREATE on public) revoked
        roles.as_owner(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC", "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
                       ACCOUNTS_DDL["postgresql"])
        yield roles
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {runtime}")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {owner}")
        admin.dispose()


@contextmanager
def _mariadb() -> Iterator[Roles]:
    require_server("MariaDB", MYSQL_URL, _MYSQL_PROBLEM, "CLERK_SYNC_REQUIRE_MARIADB")
    tag = uuid.uuid4().hex[:10]
    owner, runtime, database = f"grants_owner_{tag}", f"grants_rt_{tag}", f"grants_{tag}"
    admin = sa.create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT")
    roles = Roles("mysql", _url(MYSQL_URL, database=database),
                  _url(MYSQL_URL, username=owner, password="grants_pw", database=database),
                  _url(MYSQL_URL, username=runtime, password="grants_pw", database=database), database,
                  f"'{runtime}'@'%'")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            conn.exec_driver_sql(f"CREATE USER '{owner}'@'%%' IDENTIFIED BY 'grants_pw'")
            conn.exec_driver_sql(f"CREATE USER '{runtime}'@'%%' IDENTIFIED BY 'grants_pw'")
            conn.exec_driver_sql(f"GRANT ALL ON `{database}`.* TO '{owner}'@'%%' WITH GRANT OPTION")
        roles.as_owner(ACCOUNTS_DDL["mysql"])
        yield roles
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{runtime}'@'%%'")
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{owner}'@'%%'")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{database}`")
        admin.dispose()


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres),
                        pytest.param("mysql", marks=pytest.mark.mariadb)])
def roles(request: pytest.FixtureRequest) -> Iterator[Roles]:
    """Owner and runtime roles, a database the owner migrated (with the mapped table), the RUNBOOK's grants run."""
    with granted(request.param) as made:
        yield made


@contextmanager
def granted(kind: str) -> Iterator[Roles]:
    """``roles``, for a test on one store (``postgresql`` or ``mysql``)."""
    with (_postgres() if kind == "postgresql" else _mariadb()) as made:
        migrated = run("migrate", "--mapping", f"{APP}:MAPPING", env={"DATABASE_URL": made.owner_url})
        assert migrated.returncode == 0, migrated.stderr
        made.as_owner(*documented_grants(made))
        yield made


def documented_grants(roles: Roles) -> list[str]:
    """The RUNBOOK's statements for this database, for this test's names (``app``, ``clerk_runtime``)."""
    which = "postgres" if roles.kind == "postgresql" else "mysql"
    text = RUNBOOK.read_text()
    block = text.split(f"<!-- least-privilege-{which}:begin -->")[1].split(f"<!-- least-privilege-{which}:end -->")[0]
    sql = "\n".join(line for line in block.split("```")[1].splitlines()[1:] if not line.startswith("--"))
    if roles.kind == "postgresql":
        sql = sql.replace("DATABASE app ", f"DATABASE {roles.database} ").replace("clerk_runtime", roles.runtime)
    else:
        sql = re.sub(r"\bapp\.", f"`{roles.database}`.", sql).replace("'clerk_runtime'@'%'", roles.runtime)
    statements = [" ".join(s.split()) for s in sql.split(";") if s.strip()]
    assert len(statements) >= 6
    return statements


def _env(roles: Roles, emu: EmulatorServer | None = None) -> dict[str, str]:
    env = {"DATABASE_URL": roles.runtime_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    if emu is not None:
        env |= {"CLERK_SECRET_KEY": emu.secret_key, "CLERK_API_URL": emu.url}
    return env


@contextmanager
def _service(roles: Roles) -> Iterator[httpx.Client]:
    """``serve --no-migrate --mapping --hooks`` as the runtime role, on loopback."""
    settings = Settings.from_env({"DATABASE_URL": roles.runtime_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                                  "CLERK_SYNC_PRUNE_INTERVAL_S": "0"})
    store = Store(create_engine(roles.runtime_url), mapping=MAPPING, hooks=HOOKS)
    try:
        with running(create_app(settings, build_processor(settings, store))) as url, \
                httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        store.dispose()


def _deliver(client: httpx.Client, svix_id: str, event: dict[str, object]) -> httpx.Response:
    headers, body = f.signed(event, svix_id)
    return client.post("/webhooks/clerk", content=body, headers={**headers, "content-type": "application/json"})


def _privileges_line(output: str) -> str:
    return next(line for line in output.splitlines() if "privileges:" in line)


def test_the_runbook_grants_are_enough_for_every_runtime_command(roles: Roles) -> None:
    created = f.envelope("user.created", f.user("user_grants1", 5, role="admin"))
    with _service(roles) as client:
        ready = client.get("/readyz")
        answer = _deliver(client, "msg_grants1", created)
    assert ready.status_code == 200, ready.text
    assert answer.status_code == 200 and answer.json()["status"] == "applied", answer.text
    assert roles.admin_read("SELECT email, role, plan FROM accounts") == [("user_grants1@example.com", "admin",
                                                                            "free")]
    with EmulatorServer() as emu:
        jit_id = emu.create_user("clerk-side@example.com")["id"]
        store = Store(create_engine(roles.runtime_url), mapping=MAPPING)  # an auth face's JIT sync
        try:
            with clerk_client(emu) as clerk:
                assert JitUsers(store, clerk=clerk).get_auth_user(jit_id).clerk_id == jit_id
        finally:
            store.dispose()
        env = _env(roles, emu)
        for args in (["worker", "--hooks", f"{APP}:HOOKS", "--once"], ["hooks", "list"],
                     ["reconcile", "--dry-run"], ["reconcile", "--mapping", f"{APP}:MAPPING"], ["replay"],
                     ["prune"], ["users", "erase", "user_grants1", "--mapping", f"{APP}:MAPPING"]):
            done = run(*args, env=env)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        doctor = run("doctor", "--mapping", f"{APP}:MAPPING", env=env)
    # (MariaDB: a role granted table by table cannot describe the app's alembic_version; doctor took it for down)
    assert "ok    database: reachable" in doctor.stdout and "ok    mapping" in doctor.stdout, doctor.stdout
    assert _privileges_line(doctor.stdout).split()[0] == "ok", doctor.stdout


def test_doctor_prints_the_grants_missing_and_they_are_enough(roles: Roles) -> None:
    table = "hook_jobs" if roles.kind == "postgresql" else f"`{roles.database}`.hook_jobs"
    accounts = "accounts" if roles.kind == "postgresql" else f"`{roles.database}`.accounts"
    roles.as_owner(f"REVOKE DELETE ON {table} FROM {roles.runtime}",
                   f"REVOKE UPDATE (role) ON {accounts} FROM {roles.runtime}")
    doctor = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(roles))
    line = " ".join(_privileges_line(doctor.stdout).split())
    assert line.startswith("FAIL privileges:") and "hook_jobs: DELETE" in line and "accounts: UPDATE" in line, line
    grants = re.findall(r"GRANT [^;]+;", line)
    assert any("DELETE ON" in g and "hook_jobs" in g for g in grants), grants
    roles.as_owner(*(g.rstrip(";") for g in grants))
    again = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(roles))
    assert _privileges_line(again.stdout).split()[0] == "ok", again.stdout


def test_a_mapped_column_not_granted_is_a_503_until_granted_never_a_refused_row(roles: Roles) -> None:
    accounts = "accounts" if roles.kind == "postgresql" else f"`{roles.database}`.accounts"
    roles.as_owner(f"REVOKE UPDATE (role) ON {accounts} FROM {roles.runtime}")
    created = f.envelope("user.created", f.user("user_grants2", 5, role="admin"))
    with _service(roles) as client:
        with structlog.testing.capture_logs() as logs:
            refused = _deliver(client, "msg_grants2", created)
        assert refused.status_code == 503, refused.text  # Svix retries it; no row refused for good
        said = " ".join(str(e.get("reason") or e.get("cause") or "") for e in logs)
        assert "accounts" in said and "lacks a privilege" in said and "prints the GRANT statements" in said, logs
        roles.as_owner(f"GRANT UPDATE (role) ON {accounts} TO {roles.runtime}")
        retried = _deliver(client, "msg_grants2", created)
    assert retried.status_code == 200 and retried.json()["status"] == "applied", retried.text
    assert roles.admin_read("SELECT clerk_user_id, role FROM accounts") == [("user_grants2", "admin")]
    assert roles.admin_read("SELECT status, last_error FROM webhook_events") == [("applied", None)]


def test_a_missing_privilege_says_what_to_grant(roles: Roles) -> None:
    temporary = (f"REVOKE TEMPORARY ON DATABASE {roles.database} FROM {roles.runtime}" if roles.kind == "postgresql"
                 else f"REVOKE CREATE TEMPORARY TABLES ON `{roles.database}`.* FROM {roles.runtime}")
    roles.as_owner(temporary)
    with EmulatorServer() as emu:
        dry = run("reconcile", "--dry-run", env=_env(roles, emu))
    said = " ".join(dry.stderr.split())
    assert dry.returncode == 2, dry.stderr
    assert "lacks a privilege" in said and "`clerk-sync doctor`" in said and "Least-privilege" in said, said
    assert "Check DATABASE_URL" not in said, said


def test_serve_no_migrate_is_not_ready_on_a_schema_it_may_read_but_not_write(
        roles: Roles, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime role short of a GRANT (a table a new migration made, say): /readyz said ready while every
    delivery answered 503; it now answers 503 naming the missing privilege (the GRANT in the log) until granted
    (seen once its verdict, kept a minute, is asked again)."""
    now = [0.0]
    monkeypatch.setattr(_RolePrivileges, "clock", staticmethod(lambda: now[0]))
    table = "webhook_events" if roles.kind == "postgresql" else f"`{roles.database}`.webhook_events"
    roles.as_owner(f"REVOKE INSERT ON {table} FROM {roles.runtime}")
    with _service(roles) as client, structlog.testing.capture_logs() as logs:
        short = client.get("/readyz")
        roles.as_owner(f"GRANT INSERT ON {table} TO {roles.runtime}")
        now[0] += 61
        granted = client.get("/readyz")
    assert short.status_code == 503 and short.json()["privileges"] == "missing", short.text
    assert "`clerk-sync doctor` prints the GRANT statements" in short.json()["hint"]
    said = next(e for e in logs if e["event"] == "readyz_privileges_missing")
    grant = f"GRANT INSERT ON {table.replace('`', '')} TO {roles.runtime};"
    assert "webhook_events: INSERT" in said["needed"] and grant in said["grants"], said
    assert granted.status_code == 200 and granted.json() == {"database": "ok", "migrations_current": True}


def test_migrate_as_the_runtime_role_says_to_migrate_as_the_owner() -> None:
    """PostgreSQL: a step's DDL refused to a role that does not own the tables; the advice is the owner's migrate,
    not the runtime's GRANT (granting the runtime role DDL is what least privilege avoids)."""
    with _postgres() as made:
        engine = create_engine(made.owner_url)
        try:
            migrations.upgrade(engine, "0017")  # a release behind: 0018 alters hook_jobs
        finally:
            engine.dispose()
        made.as_owner(f"GRANT CONNECT ON DATABASE {made.database} TO {made.runtime}",
                      f"GRANT USAGE ON SCHEMA public TO {made.runtime}",
                      f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {made.runtime}")
        refused = run("migrate", env={"DATABASE_URL": made.runtime_url})
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 2, said
    assert "must be owner" in said and "run `clerk-sync migrate` as the role that owns them" in said, said
    assert "`clerk-sync doctor` with this DATABASE_URL prints the GRANT" not in said, said


def test_doctor_from_no_grant_at_all_prints_what_serve_needs() -> None:
    """PostgreSQL: a runtime role that may only connect (the schema's USAGE too is missing): doctor's database line
    says the role may not use the schema (its tables looked missing: "run `clerk-sync migrate`"), and the statements
    its privileges line prints (the schema's, then the tables') are enough for a delivery."""
    with _postgres() as made:
        migrated = run("migrate", "--mapping", f"{APP}:MAPPING", env={"DATABASE_URL": made.owner_url})
        assert migrated.returncode == 0, migrated.stderr
        made.as_owner(f"GRANT CONNECT ON DATABASE {made.database} TO {made.runtime}",
                      "REVOKE USAGE ON SCHEMA public FROM PUBLIC")
        doctor = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(made))
        database = " ".join(next(x for x in doctor.stdout.splitlines() if "database:" in x).split())
        assert database.startswith("FAIL database: reached, but this role may not use schema public") and \
            "lacks a privilege" in database and "run `clerk-sync migrate`" not in database, doctor.stdout
        grants = re.findall(r"GRANT [^;]+;", " ".join(_privileges_line(doctor.stdout).split()))
        assert grants[0] == f"GRANT USAGE ON SCHEMA public TO {made.runtime};", grants
        made.as_owner(*(g.rstrip(";") for g in grants))
        second = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(made))  # the tables, once they are visible
        made.as_owner(*(g.rstrip(";") for g in re.findall(r"GRANT [^;]+;", " ".join(
            _privileges_line(second.stdout).split()))))
        again = run("doctor", "--mapping", f"{APP}:MAPPING", env=_env(made))
        assert _privileges_line(again.stdout).split()[0] == "ok" and "ok    database: reachable" in again.stdout, \
            again.stdout
        with _service(made) as client:
            answer = _deliver(client, "msg_grants3", f.envelope("user.created", f.user("user_grants3", 5)))
        assert answer.status_code == 200, answer.text
        assert made.admin_read("SELECT clerk_user_id FROM accounts") == [("user_grants3",)]


def test_a_worker_that_may_not_finish_jobs_claims_none(roles: Roles) -> None:
    """Without DELETE on hook_jobs a claimed job ran, its end could not be written, and it ran again at each
    lease's end (a welcome mail a minute) until granted: now no job is claimed, and the worker says the GRANT."""
    table = "hook_jobs" if roles.kind == "postgresql" else f"`{roles.database}`.hook_jobs"
    roles.as_owner(f"REVOKE DELETE ON {table} FROM {roles.runtime}")
    with _service(roles) as client:
        assert _deliver(client, "msg_grants4", f.envelope("user.created", f.user("user_grants4", 5))).status_code == 200
    worker = ["worker", "--hooks", f"{APP}:HOOKS", "--once"]
    refused = run(*worker, env=_env(roles))
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and f"GRANT DELETE ON {table.replace('`', '')} TO {roles.runtime};" in said, said
    assert roles.admin_read("SELECT status, attempts FROM hook_jobs") == [("pending", 0)]  # never claimed
    roles.as_owner(f"GRANT DELETE ON {table} TO {roles.runtime}")
    granted = run(*worker, env=_env(roles))
    assert granted.returncode == 0 and "1 ok" in granted.stderr, (granted.stdout, granted.stderr)
    assert roles.admin_read("SELECT COUNT(*) FROM hook_jobs") == [(0,)]
