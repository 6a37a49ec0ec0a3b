"""An app that has its own ``users`` (and ``organizations``) table: clerk-sync's tables in a schema (PostgreSQL)
or database (MariaDB) of their own, the mapping naming the app's tables with theirs (``app.users``); and the
migrate error that says so when the names clash. SQLite has no schemas: a qualified name is refused.

Fixed: ``clerk-sync migrate`` failed with "relation users already exists ... fix the cause", and a mapping
could not name ``public.users`` (doctor: "table 'public.users' does not exist").
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.errors import ConfigError
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.mapping import (
    Column,
    Deactivate,
    MappedTable,
    SchemaMapping,
    SoftDelete,
    check_schema,
    migrate_schema,
)
from clerk_sync.store import Store, create_engine
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import (
    _MYSQL_PROBLEM,
    _PG_PROBLEM,
    MYSQL_URL,
    PG_URL,
    mysql_database_url,
    pg_schema_url,
    require_server,
)
from tests.test_cli import run
from tests.test_hooks import B, deliver

_MAPPING_MODULE = """
from clerk_sync.mapping import Column, Deactivate, MappedTable, SchemaMapping, SoftDelete
APP = {app!r}
MAPPING = SchemaMapping(
    users=MappedTable(f"{{APP}}.users", "clerk_user_id", {{
        "email": Column("email", transform="lower", default=""),
        "display_name": Column("full_name", default=""),
    }}, on_delete=SoftDelete("deleted_at"), link_by_email="email"),
    organizations=MappedTable(f"{{APP}}.organizations", "clerk_org_id", {{"name": Column("name", default=""), "slug": "slug"}},
                              on_delete=Deactivate("is_active")),
)
"""


def mapping(app: str) -> SchemaMapping:
    return SchemaMapping(
        users=MappedTable(f"{app}.users", "clerk_user_id", {
            "email": Column("email", transform="lower", default=""),
            "display_name": Column("full_name", default=""),
        }, on_delete=SoftDelete("deleted_at"), link_by_email="email"),
        organizations=MappedTable(f"{app}.organizations", "clerk_org_id", {"name": Column("name", default=""), "slug": "slug"},
                                  on_delete=Deactivate("is_active")),
    )


def app_tables(schema: str | None) -> sa.MetaData:
    """The app's own ``users`` and ``organizations``, before clerk-sync: integer keys, NOT NULL columns with
    defaults, a column of the app's that no mapping names (``notes``)."""
    meta = sa.MetaData(schema=schema)
    sa.Table("users", meta,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("email", sa.String(320), nullable=False),
             sa.Column("display_name", sa.String(255), nullable=False, server_default=""),
             sa.Column("plan", sa.String(32), nullable=False, server_default="free"),
             sa.Column("notes", sa.Text, nullable=True))
    sa.Table("organizations", meta,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("name", sa.String(255), nullable=False, server_default=""),
             sa.Column("slug", sa.String(255), nullable=True),
             sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
             sa.Column("notes", sa.Text, nullable=True))
    return meta


@dataclass
class Split:
    """clerk-sync's database URL (its own schema or database), the app's schema or database, and an admin
    engine on the server."""

    url: str
    app: str
    admin: sa.Engine


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])
def split(request: pytest.FixtureRequest) -> Iterator[Split]:
    """The app's tables in a schema (database) of its own, with rows; clerk-sync's URL on another, empty one."""
    tag = uuid.uuid4().hex[:10]
    app, ours = f"app_{tag}", f"cs_{tag}"
    if request.param == "postgres":
        require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        create, drop, url = 'CREATE SCHEMA "{}"', 'DROP SCHEMA IF EXISTS "{}" CASCADE', pg_schema_url(ours)
    else:
        require_server("MariaDB", MYSQL_URL, _MYSQL_PROBLEM, "CLERK_SYNC_REQUIRE_MARIADB")
        admin = sa.create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT")
        create = "CREATE DATABASE `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        drop, url = "DROP DATABASE IF EXISTS `{}`", mysql_database_url(ours)
    with admin.connect() as conn:
        for name in (app, ours):
            conn.exec_driver_sql(create.format(name))
    try:
        meta = app_tables(app)
        meta.create_all(admin)
        with admin.begin() as conn:
            users = meta.tables[f"{app}.users"]
            conn.execute(users.insert().values(email="ada@example.com", display_name="Ada (legacy)", plan="pro",
                                               notes="since 2019"))
            conn.execute(users.insert().values(email="bob@example.com", plan="team", notes="no Clerk account yet"))
            conn.execute(meta.tables[f"{app}.organizations"].insert(), [{"name": "Legacy Ltd", "notes": "theirs"}])
        yield Split(url, app, admin)
    finally:
        with admin.connect() as conn:
            for name in (app, ours):
                conn.exec_driver_sql(drop.format(name))
        admin.dispose()


def rows(split: Split, table: str) -> dict[int, dict[str, object]]:
    t = sa.Table(table, sa.MetaData(), schema=split.app, autoload_with=split.admin)
    with split.admin.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.select(t).order_by(t.c.id)).mappings()}


def test_migrate_doctor_and_deliveries_through_the_cli_with_the_apps_users_table_qualified(
        split: Split, tmp_path: Path) -> None:
    module = f"appmap_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(_MAPPING_MODULE.format(app=split.app))
    env = {"DATABASE_URL": split.url, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    migrated = run("migrate", "--mapping", f"{module}:MAPPING", env=env)
    said = " ".join((migrated.stdout + migrated.stderr).split())
    assert migrated.returncode == 0, said
    assert f"mapping: added {split.app}.users.clerk_user_id" in said, said
    assert f"mapping: added {split.app}.users.deleted_at" in said
    assert f"mapping: added {split.app}.organizations.clerk_org_id" in said
    assert "created unique index uq_users_clerk_user_id" in said
    inspector = sa.inspect(split.admin)
    assert {c["name"] for c in inspector.get_columns("users", schema=split.app)} == {
        "id", "email", "display_name", "plan", "notes", "clerk_user_id", "deleted_at"}
    ours = sa.inspect(create_engine(split.url))
    assert "email_addresses" in {c["name"] for c in ours.get_columns("users")}  # clerk-sync's, in its own
    again = run("migrate", "--mapping", f"{module}:MAPPING", env=env)
    assert again.returncode == 0 and "mapped tables already have what the mapping needs" in again.stderr, again.stderr

    doctor = run("doctor", "--mapping", f"{module}:MAPPING", env=env)
    assert f"ok    mapping: {split.app}.users, {split.app}.organizations match the mapping" in doctor.stdout, (
        doctor.stdout)

    store = Store.from_url(split.url, mapping=mapping(split.app))
    try:
        assert deliver(store,
                       f.envelope("user.created", f.user("user_ada", B + 1000, email="Ada@Example.com")),
                       f.envelope("user.created", f.user("user_cy", B + 1000, email="cy@example.com",
                                                         first_name="Cy")),
                       f.envelope("user.updated", f.user("user_ada", B + 2000, email="ada@example.com",
                                                         first_name="Augusta")),
                       f.envelope("user.deleted", f.deleted("user", "user_cy"), B + 3000)) == ["applied"] * 4
        committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
        organizations = [f.envelope("organization.created", f.organization("org_1", B + 1000)),  # (PostgreSQL:
                         f.envelope("organization.created", f.organization("org_2", B + 1000, name="Beta")),  # the
                         f.envelope("organization.updated", f.organization("org_1", B + 2000, name="Acme Two"))]
        results = committer.write([(f"msg_org_{n}", parse_envelope(f.body_of(event)))  # wave's statement)
                                   for n, event in enumerate(organizations)])
        assert [getattr(r, "status", r) for r in results] == ["applied"] * 3 and committer.retried == 0, results
        assert deliver(store, f.envelope("organization.deleted", f.deleted("organization", "org_2"), B + 3000),
                       f.envelope("organization.updated", f.organization("org_1", B + 3000, name="Acme Three"))
                       ) == ["applied"] * 2
        with store.connect() as conn:  # clerk-sync's own users table has them (its schema, its database)
            assert set(conn.execute(sa.text("SELECT clerk_id FROM users")).scalars()) == {"user_ada", "user_cy"}
    finally:
        store.dispose()

    users = rows(split, "users")
    ada, bob = users[1], users[2]
    assert (ada["clerk_user_id"], ada["email"], ada["display_name"], ada["plan"], ada["notes"], ada["deleted_at"]) == (
        "user_ada", "ada@example.com", "Augusta Lovelace", "pro", "since 2019", None)  # linked by e-mail, kept
    assert (bob["clerk_user_id"], bob["plan"], bob["notes"]) == (None, "team", "no Clerk account yet")  # untouched
    (cy,) = [u for u in users.values() if u["clerk_user_id"] == "user_cy"]
    assert (cy["email"], cy["display_name"], cy["plan"], cy["notes"]) == ("cy@example.com", "Cy Lovelace", "free",
                                                                           None)
    assert cy["deleted_at"] is not None  # SoftDelete
    orgs = {o["clerk_org_id"]: o for o in rows(split, "organizations").values()}
    assert (orgs[None]["name"], orgs[None]["notes"], orgs[None]["is_active"]) == ("Legacy Ltd", "theirs", True)
    assert (orgs["org_1"]["name"], orgs["org_1"]["slug"], orgs["org_1"]["is_active"]) == ("Acme Three", "acme three", True)
    assert (orgs["org_2"]["name"], orgs["org_2"]["is_active"]) == ("Beta", False)  # Deactivate


def test_backfill_and_erasure_reach_the_qualified_table(split: Split) -> None:
    """A mapping added to a running install: migrate_schema adds the columns, the backfill writes what
    clerk-sync holds into the app's qualified table, an erasure clears its personal columns there."""
    from clerk_sync.retention import Retention

    engine = create_engine(split.url)
    migrations.upgrade(engine)
    engine.dispose()
    plain = Store.from_url(split.url)
    deliver(plain, f.envelope("user.created", f.user("user_dee", B + 1000, email="dee@example.com")))
    plain.dispose()
    unlinked = SchemaMapping(users=MappedTable(f"{split.app}.users", "clerk_user_id", {
        "email": Column("email", default=""), "display_name": Column("full_name", default="")}, on_delete=SoftDelete("deleted_at")))
    store = Store.from_url(split.url, mapping=unlinked)
    try:
        with store.engine.begin() as conn:
            assert any("clerk_user_id is missing" in p for _, p in check_schema(conn, unlinked))
            done = migrate_schema(conn, unlinked)
            assert f"added {split.app}.users.clerk_user_id" in done and "created unique index uq_users_clerk_user_id" in done
        with store.connect() as conn:
            assert check_schema(conn, unlinked) == []
        assert unlinked.backfill(store) == {"users": 1}
        dee = next(u for u in rows(split, "users").values() if u["clerk_user_id"] == "user_dee")
        assert (dee["email"], dee["display_name"], dee["plan"]) == ("dee@example.com", "Ada Lovelace", "free")
        report = Retention(store).erase_user("user_dee")
        assert report.mapped_refused == ()
    finally:
        store.dispose()
    dee = next(u for u in rows(split, "users").values() if u["clerk_user_id"] == "user_dee")
    assert (dee["email"], dee["display_name"]) == ("", "")  # NOT NULL: cleared to ""


def test_sqlite_refuses_a_qualified_table_saying_what_to_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    with pytest.raises(ConfigError, match=r"SQLite has no[^:]*: name the table alone \('users'\).*RENAME TO"):
        Store.from_url(url, mapping=mapping("main"))
    engine = create_engine(url)
    with engine.connect() as conn:
        problems = check_schema(conn, mapping("main"))
        assert problems and problems[0][0] == "fail" and "SQLite has no" in problems[0][1]
        with pytest.raises(ConfigError, match="SQLite has no"):
            migrate_schema(conn, mapping("main"))
    engine.dispose()
    with pytest.raises(ValueError, match=r"'users' or 'public\.users'"):
        MappedTable("a.b.users", "clerk_id", {})


def test_an_unqualified_name_of_clerk_syncs_own_table_is_refused(db_url: str) -> None:
    """With clerk-sync's tables on the connection, an unqualified ``users`` is clerk-sync's own: migrate would
    add the app's columns to it and deliveries write the app's rows there."""
    ours = SchemaMapping(users=MappedTable("users", "clerk_user_id", {"email": "email"}, SoftDelete("deleted_at")))
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            problems = check_schema(conn, ours)
            assert [s for s, _ in problems] == ["fail"], problems
            assert "table 'users' is clerk-sync's own users table on this connection, not your app's" in problems[0][1]
            with pytest.raises(ConfigError, match="clerk-sync's own users table"):
                migrate_schema(conn, ours)
        assert "clerk_user_id" not in {c["name"] for c in sa.inspect(engine).get_columns("users")}
    finally:
        engine.dispose()


# -- the clash: the app's table holds one of clerk-sync's names ------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])
def crowded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A database URL whose schema (database) holds the app's ``users`` and ``organizations``; its dialect."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.db'}"
        engine = sa.create_engine(url)
        app_tables(None).create_all(engine)
        engine.dispose()
        yield url, "sqlite"
        return
    name = f"app_{uuid.uuid4().hex[:10]}"
    if request.param == "postgres":
        require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        create, drop, url = 'CREATE SCHEMA "{}"', 'DROP SCHEMA IF EXISTS "{}" CASCADE', pg_schema_url(name)
    else:
        require_server("MariaDB", MYSQL_URL, _MYSQL_PROBLEM, "CLERK_SYNC_REQUIRE_MARIADB")
        admin = sa.create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT")
        create = "CREATE DATABASE `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        drop, url = "DROP DATABASE IF EXISTS `{}`", mysql_database_url(name)
    with admin.connect() as conn:
        conn.exec_driver_sql(create.format(name))
    try:
        app_tables(name).create_all(admin)
        yield url, request.param
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(drop.format(name))
        admin.dispose()


WAY_OUT = {"sqlite": ["SQLite has no schemas", "rename your table (ALTER TABLE users RENAME TO app_users)"],
           "postgres": ["CREATE SCHEMA clerk_sync", "?options=-csearch_path%3Dclerk_sync", 'MappedTable("public.users"'],
           "mariadb": ["give clerk-sync a database of its own", 'MappedTable("app.users"']}


def test_migrate_names_the_clash_and_the_way_out_and_a_retry_after_the_fix_works(crowded: tuple[str, str]) -> None:
    url, store = crowded
    result = run("migrate", env={"DATABASE_URL": url})
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in said, said
    assert ("the database already has a table users, organizations that clerk-sync did not create: clerk-sync's "
            "own tables need the names users, organizations, organization_memberships, webhook_events") in said, said
    for advice in WAY_OUT[store]:
        assert advice in said, (advice, said)
    assert "fix the cause" not in said and said.endswith("then run `clerk-sync migrate` again")
    engine = create_engine(url)
    try:
        names = set(sa.inspect(engine).get_table_names())
        assert names == {"users", "organizations"}, names  # nothing created, not even the version table (MariaDB)
        with engine.begin() as conn:  # the fix that works on every store: the app's tables renamed
            conn.exec_driver_sql("ALTER TABLE users RENAME TO app_users")
            conn.exec_driver_sql("ALTER TABLE organizations RENAME TO app_organizations")
    finally:
        engine.dispose()
    retried = run("migrate", env={"DATABASE_URL": url})
    assert retried.returncode == 0, retried.stdout + retried.stderr


def test_a_later_step_that_finds_its_table_taken_names_the_clash(crowded: tuple[str, str]) -> None:
    """A clash in a step past the first (the preflight checks a new database only): the step's failure says it."""
    url, store = crowded
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE users")
            conn.exec_driver_sql("DROP TABLE organizations")
        migrations.upgrade(engine, "0008_console")
        with engine.begin() as conn:  # the app's own hook_jobs, made after clerk-sync's first migrations
            conn.exec_driver_sql("CREATE TABLE hook_jobs (id INTEGER)")
        with pytest.raises(migrations.MigrationError) as failed:
            migrations.upgrade(engine)
    finally:
        engine.dispose()
    message = str(failed.value)
    assert message.startswith("migration 0009 failed: database error: "), message
    assert "the database already has a table hook_jobs that clerk-sync did not create" in message, message
    assert WAY_OUT[store][0] in message
    assert message.endswith("fix the cause, then run `clerk-sync migrate` again")
