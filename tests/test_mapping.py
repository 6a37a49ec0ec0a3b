"""Sync into the app's own tables: the mapped tables converge on the contract tables under any delivery
order, duplicates and re-sends, on SQLite and PostgreSQL, for every delete policy; columns outside the
mapping keep what the app wrote; linking by e-mail; ``migrate_schema`` and ``check_schema``."""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clerk_sync.auth.users import JitUsers
from clerk_sync.changes import Change, Hook
from clerk_sync.engine import Entity
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.mapping import (
    Anonymise,
    Column,
    Deactivate,
    DeletePolicy,
    HardDelete,
    MappedTable,
    SchemaMapping,
    SoftDelete,
    check_schema,
    migrate_schema,
)
from clerk_sync.reconcile import Reconciler
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests._history import bodies, build_history, db_rows, specs
from tests.conftest import clerk_client
from tests.test_cli import run
from tests.test_hooks import B, deliver, jobs

POLICIES: list[DeletePolicy] = [SoftDelete("deleted_at"), Deactivate("is_active"), Anonymise(), Anonymise("deleted_at"),
                                 HardDelete()]

app_meta = sa.MetaData()
accounts = sa.Table(  # the app's own users table, before clerk-sync: no Clerk id yet
    "accounts", app_meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(320), nullable=True),
    sa.Column("email_lower", sa.String(320), nullable=True),
    sa.Column("display_name", sa.String(255), nullable=True),
    sa.Column("avatar", sa.Text, nullable=True),
    sa.Column("role", sa.String(32), nullable=False, server_default="member"),
    sa.Column("is_admin", sa.Boolean, nullable=True),
    sa.Column("plan", sa.String(32), nullable=False, server_default="free"),  # the app's own
    sa.Column("notes", sa.Text, nullable=True),  # the app's own
)
teams = sa.Table(
    "teams", app_meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=True),
    sa.Column("slug", sa.String(255), nullable=True),
    sa.Column("notes", sa.Text, nullable=True),
)
team_members = sa.Table(
    "team_members", app_meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("team", sa.String(64), nullable=True),
    sa.Column("member", sa.String(64), nullable=True),
    sa.Column("role", sa.String(64), nullable=True),
    sa.Column("notes", sa.Text, nullable=True),
)
TABLES = {"users": ("accounts", "clerk_user_id"), "organizations": ("teams", "clerk_org_id"),
          "organization_memberships": ("team_members", "clerk_membership_id")}


def mapping_for(policy: DeletePolicy, *, link: bool = False) -> SchemaMapping:
    return SchemaMapping(
        users=MappedTable("accounts", "clerk_user_id", {
            "email": "email",
            "email_lower": Column("email", transform="lower"),
            "display_name": "full_name",
            "avatar": "image_url",
            "role": Column("public_metadata.role", default="member"),
            "is_admin": Column(compute=lambda values: values.get("role") == "admin"),
        }, on_delete=policy, link_by_email="email" if link else None),
        organizations=MappedTable("teams", "clerk_org_id", {"name": "name", "slug": "slug"}, on_delete=policy),
        memberships=MappedTable("team_members", "clerk_membership_id", {
            "team": "organization_clerk_id", "member": "user_clerk_id", "role": "role"}, on_delete=policy),
    )


def expected(table: str, values: dict[str, Any]) -> dict[str, Any]:
    """The mapped columns for a contract row, written out by hand."""
    if table == "users":
        names = [n for n in (values["first_name"], values["last_name"]) if n]
        return {"email": values["email"], "email_lower": values["email"] and values["email"].lower(),
                "display_name": " ".join(names) or None, "avatar": values["image_url"],
                "role": values["public_metadata"].get("role") or "member", "is_admin": values["role"] == "admin"}
    if table == "organizations":
        return {"name": values["name"], "slug": values["slug"]}
    return {"team": values["organization_clerk_id"], "member": values["user_clerk_id"], "role": values["role"]}


@pytest.fixture
def app_db(db_url: str) -> str:
    """The test database with the app's tables, migrated for the mapping (every policy's column)."""
    engine = sa.create_engine(db_url)
    app_meta.create_all(engine)
    with engine.begin() as conn:
        assert len(check_schema(conn, mapping_for(SoftDelete()))) >= 3  # Clerk-id columns missing
        done = [d for p in POLICIES for d in migrate_schema(conn, mapping_for(p))]
        assert "added accounts.clerk_user_id" in done and "added accounts.is_active" in done
        assert migrate_schema(conn, mapping_for(SoftDelete())) == []  # idempotent
        for policy in POLICIES:
            assert check_schema(conn, mapping_for(policy)) == []
    engine.dispose()
    return db_url


def app_rows(conn: sa.Connection, ns: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for entity, (name, key) in TABLES.items():
        table = sa.Table(name, sa.MetaData(), autoload_with=conn)
        for row in conn.execute(sa.select(table).where(table.c[key].like(f"%{ns}%"))).mappings():
            out[(entity, row[key])] = dict(row)
    return out


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__ + f"_{getattr(p, 'column', None) or ''}")
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.integers(0, 3)), min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_mapped_tables_converge_on_the_contract_tables(app_db: str, steps: list[Any], seed: int,
                                                      policy: DeletePolicy) -> None:
    rng = random.Random(seed)
    ns = uuid.uuid4().hex[:8]
    events = bodies(build_history(specs(2, 2, [(0, 0), (1, 1)]), steps), ns)
    deliveries = [(f"msg_{ns}_{i}", b) for i, b in enumerate(events)]
    deliveries += rng.sample(deliveries, len(deliveries) // 2)
    deliveries += [(f"msg_{ns}_again_{i}", b) for i, b in enumerate(rng.sample(events, len(events) // 3))]
    rng.shuffle(deliveries)

    store = Store.from_url(app_db, mapping=mapping_for(policy))
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    notes: dict[tuple[str, str], str] = {}
    for n, (svix_id, body) in enumerate(deliveries):
        headers, _ = f.signed(body, svix_id)
        processor.process(headers, body)
        if rng.random() < 0.4:  # the app writes its own column on some row
            with store.transaction() as writer:
                rows = sorted(app_rows(writer.conn, ns))
                if rows:
                    entity, clerk_id = rng.choice(rows)
                    name, key = TABLES[entity]
                    table = sa.Table(name, sa.MetaData(), autoload_with=writer.conn)
                    writer.conn.execute(table.update().where(table.c[key] == clerk_id).values(notes=f"n{n}"))
                    notes[(entity, clerk_id)] = f"n{n}"

    with store.connect() as conn:
        contract, mapped = db_rows(conn, ns), app_rows(conn, ns)
    assert set(mapped) <= set(contract)  # nothing in the app's table that clerk-sync does not know
    for key, values in contract.items():
        row = mapped.get(key)
        if values is not None:  # live: the mapped columns are the contract row's, the rest the app's
            assert row is not None, key
            assert {k: row[k] for k in expected(key[0], values)} == expected(key[0], values)
            assert row.get("deleted_at") is None and row.get("is_active") in (None, True)
        elif isinstance(policy, HardDelete):
            assert row is None
        elif row is not None:
            _assert_deleted(policy, key[0], row)
        if row is not None:
            assert row["notes"] == notes.get(key)
            if key[0] == "users":
                assert row["plan"] == "free"
    store.dispose()


def _assert_deleted(policy: DeletePolicy, entity: str, row: dict[str, Any]) -> None:
    if isinstance(policy, SoftDelete):
        assert row["deleted_at"] is not None
    elif isinstance(policy, Deactivate):
        assert row["is_active"] in (False, 0) and row["is_active"] is not None  # MySQL reads BOOL as 0/1
    else:  # Anonymise: the personal columns are cleared, the rest kept; with a column, the deletion's time there
        assert isinstance(policy, Anonymise)
        assert (row["deleted_at"] is not None) is (policy.column is not None)
        if entity == "users":
            assert (row["email"], row["email_lower"], row["display_name"], row["avatar"]) == (None, None, None, None)


# -- linking existing rows, hooks alongside, doctor ---------------------------------------------------------

def test_link_by_email_adopts_the_one_matching_row_and_refuses_to_guess(app_db: str) -> None:
    engine = sa.create_engine(app_db)
    with engine.begin() as conn:
        conn.execute(accounts.insert().values(email="Ada@Example.com", plan="pro", notes="customer since 2019"))
        conn.execute(accounts.insert(), [{"email": "twin@example.com"}, {"email": "twin@example.com"}])
    seen: list[Change] = []
    store = Store.from_url(app_db, mapping=mapping_for(SoftDelete(), link=True), hooks=[Hook("welcome", seen.append)])
    statuses = deliver(store, f.envelope("user.created", f.user("user_ada", B + 1000, email="ada@example.com")),
                       f.envelope("user.created", f.user("user_twin", B + 1000, email="twin@example.com")),
                       f.envelope("user.created", f.user("user_new", B + 1000, email="new@example.com")))
    assert statuses == ["applied", "applied", "applied"]  # the twin is a user all the same (not linked)
    with engine.connect() as conn:
        rows = {r.email: r for r in conn.execute(sa.text("SELECT * FROM accounts ORDER BY id"))}
        failure = conn.execute(sa.text("SELECT last_error FROM webhook_events WHERE last_error IS NOT NULL")).scalar_one()
        assert conn.execute(sa.text("SELECT count(*) FROM users WHERE clerk_id = 'user_twin'")).scalar_one() == 1
    assert (rows["ada@example.com"].clerk_user_id, rows["ada@example.com"].plan, rows["ada@example.com"].notes) == (
        "user_ada", "pro", "customer since 2019")  # linked: one row, the app's columns kept
    assert rows["new@example.com"].clerk_user_id == "user_new"
    assert "twin@example.com" not in failure and "2 rows" in failure and "duplicates" in failure  # reported,
    assert "(email)" in failure and "--backfill" in failure  # the column named, not the address
    assert [r.clerk_user_id for r in rows.values()].count("user_twin") == 0  # never guessed
    assert [j["payload"]["clerk_id"] for j in jobs(store)] == ["user_ada", "user_twin", "user_new"]
    store.dispose()
    engine.dispose()


def test_check_schema_says_what_to_fix(app_db: str) -> None:
    broken = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"nickname": "username"}, Anonymise()),
                           organizations=MappedTable("workspaces", "clerk_id", {}))
    engine = sa.create_engine(app_db)
    with engine.connect() as conn:
        problems = [p for _, p in check_schema(conn, broken)]
    engine.dispose()
    assert any("accounts.nickname is missing" in p for p in problems)
    assert any("'workspaces' does not exist" in p for p in problems)


def test_columns_take_a_source_or_a_function() -> None:
    assert Column("public_metadata.billing.plan").value({"public_metadata": {"billing": {"plan": "pro"}}}) == "pro"
    assert Column("public_metadata.billing.plan", default="free").value({"public_metadata": {}}) == "free"
    assert Column("email", transform="strip").value({"email": " a@x "}) == "a@x"
    with pytest.raises(ValueError, match="unknown transform"):
        Column("email", transform="upper")
    with pytest.raises(ValueError, match="not both"):
        Column("email", compute=lambda v: v)
    with pytest.raises(ValueError, match="version"):
        Column("clerk_updated_at")


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__ + f"_{getattr(p, 'column', None) or ''}")
def test_every_delete_policy_and_the_membership_cascade(app_db: str, policy: DeletePolicy) -> None:
    store = Store.from_url(app_db, mapping=mapping_for(policy))
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000, role="admin")),
            f.envelope("organization.created", f.organization("org_1", B + 1000)),
            f.envelope("organizationMembership.created", f.membership("orgmem_1", "org_1", "user_1", B + 1000)),
            f.envelope("user.deleted", f.deleted("user", "user_1"), B + 2000))
    with store.connect() as conn:
        rows = app_rows(conn, "_1")
    store.dispose()
    team = rows[("organizations", "org_1")]
    assert (team["name"], team["deleted_at"], team["is_active"]) == ("Acme", None, policy_live(policy))
    if isinstance(policy, HardDelete):
        assert set(rows) == {("organizations", "org_1")}
        return
    user, member = rows[("users", "user_1")], rows[("organization_memberships", "orgmem_1")]
    _assert_deleted(policy, "users", user)
    _assert_deleted(policy, "organization_memberships", member)
    if isinstance(policy, Anonymise):
        assert (user["role"], user["is_admin"], member["role"]) == ("admin", True, "org:member")


def policy_live(policy: DeletePolicy) -> bool | None:
    """What the deactivate column holds on a live row: True, written under Deactivate, else the column's
    default (``migrate --mapping`` adds Deactivate's with DEFAULT TRUE; ``app_db`` adds every policy's)."""
    del policy  # (before, NULL under the other policies: migrate added the column without a default)
    return True


_APP_MODULE = """
from clerk_sync.mapping import MappedTable, SchemaMapping, SoftDelete
MAPPING = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"}, SoftDelete("deleted_at")))
"""


def test_migrate_and_doctor_with_a_mapping_on_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(url)
    app_meta.create_all(engine, tables=[accounts])
    (tmp_path / "appmap.py").write_text(_APP_MODULE)
    env = {"DATABASE_URL": url, "PYTHONPATH": str(tmp_path)}

    before = run("doctor", "--mapping", "appmap:MAPPING", env=env)
    assert "FAIL  mapping: accounts.clerk_user_id is missing: run `clerk-sync migrate --mapping" in before.stdout
    migrated = run("migrate", "--mapping", "appmap:MAPPING", "--backfill", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert "mapping: added accounts.clerk_user_id" in " ".join(migrated.stderr.split())
    assert "mapping: backfilled nothing" in migrated.stderr
    after = run("doctor", "--mapping", "appmap:MAPPING", env=env)
    assert "ok    mapping: accounts match the mapping" in after.stdout
    assert {c["name"] for c in sa.inspect(engine).get_columns("accounts")} >= {"clerk_user_id", "deleted_at"}
    store = Store.from_url(url, mapping=SchemaMapping(users=MappedTable(
        "accounts", "clerk_user_id", {"email": "email"}, SoftDelete("deleted_at"))))
    for n in (1, 2):
        deliver(store, f.envelope("user.created", f.user(f"user_{n}", B + n, email=f"person{n}@example.com")))
    store.dispose()
    unmapped = run("users", "erase", "user_1", env=env)  # (the CLI did not know the mapped tables)
    assert unmapped.returncode == 0 and "--mapping module:attribute" in unmapped.stdout, unmapped.stderr
    erased = run("users", "erase", "user_2", "--mapping", "appmap:MAPPING", env=env)
    assert erased.returncode == 0 and "not touched" not in erased.stdout, erased.stderr
    with engine.connect() as conn:
        emails = dict(conn.execute(sa.text("SELECT clerk_user_id, email FROM accounts")).all())
    assert emails == {"user_1": "person1@example.com", "user_2": None}
    empty = run("users", "erase", " ", env=env)
    assert empty.returncode == 2 and "Clerk user id" in empty.stderr and "Traceback" not in empty.stderr
    engine.dispose()


def test_jit_sync_and_reconcile_write_through_the_mapping(app_db: str, emu: EmulatorServer) -> None:
    store = Store.from_url(app_db, mapping=mapping_for(SoftDelete()))
    ada = emu.create_user(email="ada@example.com", first_name="Ada", public_metadata={"role": "admin"})
    bob = emu.create_user(email="bob@example.com", first_name="Bob")
    with clerk_client(emu) as clerk:
        assert JitUsers(store, clerk=clerk).get_auth_user(ada["id"]).role == "admin"  # before any webhook
        with store.connect() as conn:
            assert set(app_rows(conn, "user_")) == {("users", ada["id"])}
        emu.request("DELETE", f"/v1/users/{ada['id']}")
        Reconciler(store, clerk, page_size=50).run()
    with store.connect() as conn:
        rows = app_rows(conn, "user_")
    store.dispose()
    assert (rows[("users", bob["id"])]["email"], rows[("users", bob["id"])]["deleted_at"]) == ("bob@example.com", None)
    assert rows[("users", ada["id"])]["deleted_at"] is not None  # reconcile's tombstone, projected


def test_erasure_clears_the_mapped_row_and_the_queued_hook_jobs(app_db: str) -> None:
    store = Store.from_url(app_db, mapping=mapping_for(Deactivate("is_active")), hooks=[Hook("crm", print)])
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000, email="ada@example.com")))
    report = Retention(store).erase_user("user_1", reason="GDPR request")
    with store.connect() as conn:
        row = app_rows(conn, "user_1")[("users", "user_1")]
    queued = jobs(store)
    store.dispose()
    assert report.payloads_redacted >= 2  # the inbox row and the queued jobs
    assert (row["email"], row["display_name"], row["is_active"]) == (None, None, False)
    assert [j["type"] for j in queued] == ["user.created", "user.deleted"]  # still told, without the person
    assert all("ada@example.com" not in json.dumps(j["payload"]) for j in queued)
    assert queued[1]["payload"]["values"] == {}


# Django's auth_user as `manage.py migrate` creates it (no database defaults): what a Django
# integration would point the users mapping at (AUTH_USER_MODEL).
django_meta = sa.MetaData()
auth_user = sa.Table(
    "auth_user", django_meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("password", sa.String(128), nullable=False),
    sa.Column("last_login", sa.DateTime(timezone=True), nullable=True),
    sa.Column("is_superuser", sa.Boolean, nullable=False),
    sa.Column("username", sa.String(150), nullable=False, unique=True),
    sa.Column("first_name", sa.String(150), nullable=False),
    sa.Column("last_name", sa.String(150), nullable=False),
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("is_staff", sa.Boolean, nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False),
    sa.Column("date_joined", sa.DateTime(timezone=True), nullable=False),
)


def test_a_django_auth_user_table_needs_its_not_null_columns_mapped(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    django_meta.create_all(engine)
    partial = SchemaMapping(users=MappedTable("auth_user", "clerk_id", {"email": "email"}, Deactivate("is_active")))
    full = SchemaMapping(users=MappedTable("auth_user", "clerk_id", {
        "username": "clerk_id", "email": Column("email", default=""),
        "first_name": Column("first_name", default=""), "last_name": Column("last_name", default=""),
        "is_staff": Column(compute=lambda v: v.get("role") == "admin"),
        "is_superuser": Column(compute=lambda v: False),
        "password": Column(compute=lambda v: "!"),  # Django's unusable password: sign-in is Clerk's
        "date_joined": Column(compute=lambda v: datetime.fromtimestamp((v.get("clerk_created_at") or 0) / 1000, UTC)),
    }, on_delete=Deactivate("is_active")))
    with engine.begin() as conn:
        migrate_schema(conn, full)
        problems = [p for _, p in check_schema(conn, partial)]
        assert check_schema(conn, full) == []
    assert {p.split(" ")[0] for p in problems if "NOT NULL" in p} == {
        "auth_user.password", "auth_user.is_superuser", "auth_user.username", "auth_user.first_name",
        "auth_user.last_name", "auth_user.is_staff", "auth_user.date_joined",
        "auth_user.email"}  # mapped, but without a default: a user without an address would be refused
    store = Store.from_url(db_url, mapping=full)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000, role="admin")),
            f.envelope("user.deleted", f.deleted("user", "user_1"), B + 2000))
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT username, email, is_staff, is_active, password FROM auth_user")).one()
    store.dispose()
    engine.dispose()
    assert tuple(row) == ("user_1", "user_1@example.com", True, False, "!")


def test_backfill_projects_what_clerk_sync_already_holds(app_db: str) -> None:
    plain = Store.from_url(app_db)  # a running install, before the app adopted a mapping
    deliver(plain, f.envelope("user.created", f.user("user_1", B + 1000, role="admin")),
            f.envelope("user.created", f.user("user_2", B + 1000)),
            f.envelope("user.deleted", f.deleted("user", "user_2"), B + 2000))
    plain.dispose()
    mapping = mapping_for(SoftDelete())
    store = Store.from_url(app_db, mapping=mapping)
    with store.transaction() as writer:  # the app had linked user_2 by hand before it was deleted
        writer.conn.execute(sa.text("INSERT INTO accounts (clerk_user_id, email) VALUES ('user_2', 'b@x')"))
    for _ in range(2):  # idempotent
        assert mapping.backfill(store) == {"users": 2}
    with store.connect() as conn:
        rows = app_rows(conn, "user_")
    store.dispose()
    assert len(rows) == 2
    assert (rows[("users", "user_1")]["role"], rows[("users", "user_1")]["deleted_at"]) == ("admin", None)
    assert rows[("users", "user_2")]["deleted_at"] is not None


def test_a_clerk_id_column_without_a_unique_index_still_gets_one_row(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    sa.Table("members", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("cid", sa.String(64)), sa.Column("email", sa.String(320))).create(engine)
    mapping = SchemaMapping(users=MappedTable("members", "cid", {"email": "email"}, HardDelete()))
    with engine.connect() as conn:
        assert any("no unique index" in p for _, p in check_schema(conn, mapping))
    store = Store.from_url(db_url, mapping=mapping)
    deliver(store, f.envelope("user.updated", f.user("user_1", B + 2000, email="new@example.com")),
            f.envelope("user.created", f.user("user_1", B + 1000)),  # stale
            f.envelope("user.updated", f.user("user_1", B + 3000, email="newer@example.com")))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT cid, email FROM members")).all()
    store.dispose()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("user_1", "newer@example.com")]


def test_mapped_tables_and_hooks_converge_through_group_commit(app_db: str) -> None:
    """The committer's batches (on PostgreSQL: hooked upserts pipelined, the mapped row and the jobs
    written by the delivery's own statement) end where one-by-one delivery does: the mapped
    tables hold the contract rows, and the jobs, in order, replay to the live rows with each entity
    created once and each idempotency key queued once."""
    from clerk_sync.integrations._committer import GroupCommitter
    from clerk_sync.outbox import list_jobs
    from tests.test_hooks import fold, without_version

    store = Store.from_url(app_db, mapping=mapping_for(SoftDelete()), hooks=[Hook("all", lambda change: None)])
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    for seed in range(3):
        ns, batches = _history_batches(seed)
        for batch in batches:
            committer.write(batch)
        assert committer.retried == 0  # no batch fell back to one statement at a time
        with store.connect() as conn:
            contract, mapped = db_rows(conn, ns), app_rows(conn, ns)
            queued = [job.change for job in list_jobs(conn, status="pending", limit=10_000) if ns in job.change.clerk_id]
        for key, values in contract.items():
            if values is not None:
                assert {k: mapped[key][k] for k in expected(key[0], values)} == expected(key[0], values), key
            elif key in mapped:
                assert mapped[key]["deleted_at"] is not None
        live = {k: without_version(v) for k, v in contract.items() if v is not None}
        assert fold(queued) == live, f"seed {seed}"
        keys = [c.idempotency_key for c in queued]
        assert len(keys) == len(set(keys))
    store.dispose()


def _history_batches(seed: int) -> tuple[str, list[list[tuple[str, Any]]]]:
    """A random history of 3 users, 2 organizations and their memberships (with Svix re-sends), shuffled
    and cut into group-commit batches of 1-12 deliveries; and its namespace."""
    from clerk_sync.events import parse_envelope

    rng = random.Random(seed)
    ns = uuid.uuid4().hex[:8]
    steps = [(rng.randint(0, 5), rng.random() < 0.5, rng.randint(0, 3)) for _ in range(30)]
    events = bodies(build_history(specs(3, 2, [(0, 0), (1, 1), (2, 0)]), steps), ns)
    order = [*range(len(events)), *rng.choices(range(len(events)), k=10)]
    rng.shuffle(order)
    batches = []
    while order:
        size = rng.randint(1, 12)
        chunk, order = order[:size], order[size:]
        batches.append([(f"msg_{ns}_{i}", parse_envelope(events[i])) for i in chunk])
    return ns, batches


def _external(user_id: str, external_id: str | None, email: str) -> dict[str, Any]:
    body = f.user(user_id, B + 1000, email=email)
    body["external_id"] = external_id
    return f.envelope("user.created", body)


def test_link_by_external_id_adopts_the_row_with_the_apps_own_id_and_refuses_to_guess(db_url: str) -> None:
    """The app's own id (Clerk's ``external_id``) links first; no match falls back to the e-mail, then a
    new row; a row already linked to another Clerk user is never taken; several rows with the id fail
    the delivery (kept, replayable) and ``check_schema`` warned about them beforehand."""
    legacy = sa.Table("legacy_users", sa.MetaData(),
                      sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                      sa.Column("legacy_id", sa.String(32)), sa.Column("email", sa.String(320)),
                      sa.Column("plan", sa.String(16)))
    mapping = SchemaMapping(users=MappedTable("legacy_users", "clerk_user_id", {"email": "email"},
                                              link_by_external_id="legacy_id", link_by_email="email"))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        legacy.create(conn)
        migrate_schema(conn, mapping)
        conn.execute(legacy.insert(), [
            {"legacy_id": "L-1", "email": "old-address@example.com", "plan": "pro"},  # linked by id
            {"legacy_id": "L-2", "email": "b@example.com", "plan": "team"},  # linked to user_b below
            {"legacy_id": "L-3", "email": "c@example.com", "plan": None},
            {"legacy_id": "L-3", "email": "c2@example.com", "plan": None},
            {"legacy_id": None, "email": "e@example.com", "plan": "free"},  # linked by e-mail
        ])
        assert [s for s, _ in check_schema(conn, mapping)] == ["warn"]  # L-3 is shared: named before it fails
    store = Store.from_url(db_url, mapping=mapping)
    statuses = deliver(store, _external("user_a", "L-1", "a@example.com"),
                       _external("user_b", "L-2", "b@example.com"),
                       _external("user_thief", "L-2", "thief@example.com"),  # L-2 is taken by now
                       _external("user_c", "L-3", "c@example.com"),
                       _external("user_e", "L-404", "e@example.com"),
                       _external("user_n", None, "n@example.com"))
    assert statuses == ["applied"] * 6  # user_c is a user all the same, not linked
    with engine.connect() as conn:
        rows = {r.clerk_user_id: r for r in conn.execute(sa.select(legacy, sa.column("clerk_user_id")))}
        failure = conn.execute(sa.text("SELECT last_error FROM webhook_events WHERE last_error IS NOT NULL")).scalar_one()
    assert (rows["user_a"].legacy_id, rows["user_a"].email, rows["user_a"].plan) == ("L-1", "a@example.com", "pro")
    assert (rows["user_b"].legacy_id, rows["user_b"].plan) == ("L-2", "team")
    assert (rows["user_thief"].legacy_id, rows["user_thief"].plan) == (None, None)  # a new row, nothing taken
    assert (rows["user_e"].legacy_id, rows["user_e"].plan) == (None, "free")  # no id match: the e-mail linked
    assert rows["user_n"].legacy_id is None and "user_c" not in rows
    assert "user_c's external id (legacy_id)" in failure and "L-3" not in failure and "duplicates" in failure
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(legacy)).scalar_one() == 7  # 5 + thief + n
    store.dispose()
    engine.dispose()


def test_external_id_is_carried_not_mirrored_and_matches_an_integer_id_column() -> None:
    """``users`` has no external_id column: the record carries it for the mapping and hooks only, a change
    to it alone is no change, and an integer id column matches only a numeric external id."""
    from clerk_sync.changes import describe
    from clerk_sync.engine import Entity
    from clerk_sync.events import UserRecord, record_columns, user_record
    from clerk_sync.mapping import _as_column_value

    body = f.user("user_x", B)
    body["external_id"] = "42"
    assert user_record(body).external_id == "42"
    assert "external_id" not in record_columns(UserRecord)
    before = {n: v for n, v in dataclasses.asdict(user_record(body)).items() if n != "external_id"}
    body["external_id"], body["updated_at"] = "43", B + 1
    after = dataclasses.asdict(user_record(body))
    assert describe(Entity.USER, "user_x", B + 1, before, after) is None
    column = sa.Column("id", sa.Integer)
    assert (_as_column_value(column, "42"), _as_column_value(column, "abc")) == (42, None)
    assert _as_column_value(sa.Column("legacy", sa.String(8)), "abc") == "abc"


@pytest.mark.parametrize("policy", [SoftDelete("deleted_at"), HardDelete()], ids=lambda p: type(p).__name__)
def test_mapped_tables_without_hooks_converge_through_group_commit(app_db: str, policy: DeletePolicy,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With a mapping and no hooks, the committer's batches (on PostgreSQL: the mapped upsert is a part of
    each delivery's one statement, written only when its guarded upsert applied) end where the contract
    tables do, under re-sends, reordering and the app writing its own column in between."""
    from clerk_sync.ingest import Outcome
    from clerk_sync.integrations._committer import GroupCommitter
    from clerk_sync.outbox import Outbox

    store = Store.from_url(app_db, mapping=mapping_for(policy))
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    projected: list[str] = []  # changes projected one by one (Outbox.record), not by the delivery's statement
    record = Outbox.record

    def counting(self: Outbox, change: Change | None) -> None:
        if change is not None and change.kind != "deleted":
            projected.append(change.type)
        record(self, change)

    monkeypatch.setattr(Outbox, "record", counting)
    alone: list[str] = []  # a user or organization after its own deletion in the batch: applied after it, alone
    for seed in range(3):
        ns, batches = _history_batches(seed)
        for batch in batches:
            deleted: set[tuple[str, str]] = set()
            for _, envelope in batch:
                kind, _, op = envelope.type.partition(".")
                if op == "deleted":
                    deleted.add((kind, envelope.data["id"]))
                elif (kind, envelope.data.get("id")) in deleted and kind != "organizationMembership":
                    alone.append(envelope.type)
            results = committer.write(batch)
            assert all(isinstance(r, Outcome) for r in results), results  # none set aside, none failed
            size = len(batch)
            with store.transaction() as writer:  # the app's own column, on every row it has
                writer.conn.execute(sa.text("UPDATE accounts SET notes = :notes WHERE clerk_user_id LIKE :ns"),
                                    {"notes": f"kept {size}", "ns": f"%{ns}%"})
        with store.connect() as conn:
            contract, mapped = db_rows(conn, ns), app_rows(conn, ns)
        assert set(mapped) <= set(contract)
        for key, values in contract.items():
            if values is not None:
                assert {k: mapped[key][k] for k in expected(key[0], values)} == expected(key[0], values), key
                if key[0] == "users":
                    assert mapped[key]["notes"] is not None and mapped[key]["notes"].startswith("kept ")
            elif isinstance(policy, HardDelete):
                assert key not in mapped
            elif key in mapped:
                assert mapped[key]["deleted_at"] is not None
    if store.dialect == "postgresql":  # users and organizations went through the one-statement path
        rest = Counter(t for t in projected if not t.startswith("organizationMembership."))
        assert rest <= Counter(alone), (rest, alone)  # (those alone the tombstone refused: not projected)
    store.dispose()


@pytest.mark.postgres
def test_one_statement_projection_skips_rows_that_already_hold_the_values() -> None:
    """PostgreSQL's pipelined path writes the app's row in the delivery's own statement: a newer version
    with new mapped values rewrites it, one whose mapped values are unchanged (another field changed)
    leaves the row's tuple as it was (``xmin``: no dead tuple, no app trigger run), a stale one writes
    nothing; a ``json`` column (no equality operator) is compared as jsonb."""
    from clerk_sync.events import parse_envelope
    from clerk_sync.integrations._committer import GroupCommitter
    from tests.conftest import PG_URL, pg_schema_url

    schema = f"proj_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        conn.exec_driver_sql(f"CREATE TABLE {schema}.profiles (id serial PRIMARY KEY, "
                             "clerk_id varchar(64) UNIQUE, email varchar(320), meta json, notes text, "
                             "deleted_at timestamptz)")
    url = pg_schema_url(schema)
    store = Store.from_url(url, mapping=SchemaMapping(users=MappedTable(
        "profiles", "clerk_id", {"email": "email", "meta": "public_metadata"})))
    try:
        from clerk_sync.migrations import upgrade

        upgrade(store.engine)
        committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))

        def write(*events: dict[str, Any]) -> list[str]:
            out = committer.write([(f"msg_{uuid.uuid4().hex}", parse_envelope(json.dumps(e).encode()))
                                   for e in events])
            return [getattr(o, "status", str(o)) for o in out]

        def row() -> tuple[Any, ...]:
            with store.connect() as conn:
                return tuple(conn.execute(sa.text("SELECT xmin::text, email, meta::text, notes FROM profiles "
                                                  "WHERE clerk_id = 'user_1'")).one())

        assert write(f.envelope("user.created", f.user("user_1", B + 1000, role="admin"))) == ["applied"]
        with store.transaction() as writer:
            writer.conn.execute(sa.text("UPDATE profiles SET notes = 'mine'"))
        first = row()
        assert first[1:] == ("user_1@example.com", '{"role": "admin"}', "mine")
        # a newer version changing a field the mapping does not name: applied, the app's row untouched
        assert write(f.envelope("user.updated", f.user("user_1", B + 2000, role="admin", first_name="Bo"))) == [
            "applied"]
        assert row() == first
        # newer, with a new e-mail: rewritten (mapped columns only); then a stale one: nothing
        assert write(f.envelope("user.updated", f.user("user_1", B + 3000, email="new@example.com",
                                                       role="member"))) == ["applied"]
        second = row()
        assert second[0] != first[0] and second[1:] == ("new@example.com", '{"role": "member"}', "mine")
        assert write(f.envelope("user.updated", f.user("user_1", B + 2500, email="old@example.com"))) == [
            "skipped"]
        assert row() == second
    finally:
        store.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_engines_json_serializer_is_applied_on_sqlites_direct_paths_too(app_db: str) -> None:
    """SQLite's hot writes go to sqlite3 with SQLAlchemy's default conversions; an engine given its own
    ``json_serializer`` takes SQLAlchemy's path instead, so what it writes is what the app asked for."""
    from clerk_sync.store import create_engine

    def compact(value: Any) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    seen: list[Change] = []
    store = Store(create_engine(app_db, json_serializer=compact), hooks=[Hook("all", seen.append)],
                  mapping=mapping_for(SoftDelete()))
    user = f.user("user_ser", B + 1, role="admin")
    user["public_metadata"]["plan"] = "pro"
    assert deliver(store, f.envelope("user.created", user), f.envelope("user.updated", {**user, "updated_at": B + 2,
                   "first_name": "Grace"})) == ["applied", "applied"]
    with store.connect() as conn:
        raw = conn.exec_driver_sql("SELECT public_metadata FROM users WHERE clerk_id = 'user_ser'").scalar_one()
        mapped = conn.exec_driver_sql("SELECT display_name FROM accounts WHERE clerk_user_id = 'user_ser'").scalar()
    assert raw == '{"plan":"pro","role":"admin"}'
    assert mapped == "Grace Lovelace"
    store.dispose()
    # A JSON column of the app's own table, written by the projection.
    engine = sa.create_engine(app_db)
    profiles = sa.Table("profiles", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("meta", sa.JSON))
    profiles.create(engine)
    mapping = SchemaMapping(users=MappedTable("profiles", "clerk_user_id", {"meta": "public_metadata"}))
    with engine.begin() as conn:
        migrate_schema(conn, mapping)
    engine.dispose()
    store = Store(create_engine(app_db, json_serializer=compact), mapping=mapping)
    assert deliver(store, f.envelope("user.updated", {**user, "updated_at": B + 3})) == ["applied"]
    with store.connect() as conn:
        assert conn.exec_driver_sql("SELECT meta FROM profiles").scalar_one() == '{"plan":"pro","role":"admin"}'
    store.dispose()
    store = Store(create_engine(app_db, json_serializer=compact), hooks=[Hook("all", seen.append)])
    queued = [(j["type"], json.loads(j["payload"]) if isinstance(j["payload"], str) else j["payload"]) for j in jobs(store)]
    assert [(kind, payload["previous"]) for kind, payload in queued] == [
        ("user.created", {}), ("user.updated", {"first_name": "Ada"})]  # the row before, read back through it
    store.dispose()


def test_percent_signs_in_the_apps_table_and_column_names_reach_the_database_intact(db_url: str) -> None:
    """Review finding: a "%" in a mapped identifier was doubled once by SQLAlchemy's PostgreSQL quoting and
    again for psycopg, so the statement named another table and every delivery failed its batch."""
    engine = sa.create_engine(db_url)
    odd = sa.Table("acc%ounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                   sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("em%ail", sa.String(320)))
    odd.create(engine)
    mapping = SchemaMapping(users=MappedTable("acc%ounts", "clerk_user_id", {"em%ail": "email"}))
    with engine.begin() as conn:
        migrate_schema(conn, mapping)  # the delete policy's column
    engine.dispose()
    store = Store.from_url(db_url, mapping=mapping)
    verifier = WebhookVerifier([f.SECRET])
    committer = GroupCommitter(WebhookProcessor(store, verifier))
    events = [f.envelope("user.created", f.user("user_pct_1", B + 1)), f.envelope("user.created", f.user("user_pct_2", B + 1))]
    results = committer.write([(f"pct_{n}", parse_envelope(f.body_of(e))) for n, e in enumerate(events)])
    assert [r.status for r in results] == ["applied", "applied"] and committer.retried == 0  # type: ignore[union-attr]
    assert deliver(store, f.envelope("user.updated", f.user("user_pct_1", B + 2, email="new@example.com"))) == ["applied"]
    with store.connect() as conn:
        rows = conn.execute(sa.select(odd.c.clerk_user_id, odd.c["em%ail"]).order_by(odd.c.clerk_user_id)).all()
    assert [tuple(r) for r in rows] == [("user_pct_1", "new@example.com"), ("user_pct_2", "user_pct_2@example.com")]
    store.dispose()


@pytest.mark.parametrize(("column", "value"), [("flag", "maybe"), ("flag", [True]), ("n", {"x": 1}), ("label", {"x": 1})])
def test_a_metadata_value_the_mapped_column_cannot_take_is_reported_not_answered_503(
        db_url: str, column: str, value: Any) -> None:
    """``unsafe_metadata`` is the user's to write: a value the app's column type cannot take (a dict for a
    text column, a word for a boolean) is the app row's refusal alone, reported in the delivery's
    ``last_error``; never a 503 Svix repeats for days, batched or alone, and the contract row applies."""
    from clerk_sync.integrations._committer import ALONE, GroupCommitter

    engine = sa.create_engine(db_url)
    meta = sa.MetaData()
    sa.Table("profiles", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("flag", sa.Boolean),
             sa.Column("n", sa.Integer), sa.Column("label", sa.Text), sa.Column("deleted_at", sa.DateTime))
    meta.create_all(engine)
    engine.dispose()
    mapping = SchemaMapping(users=MappedTable("profiles", "clerk_user_id", {column: Column(f"unsafe_metadata.{column}")},
                                              on_delete=SoftDelete("deleted_at")))
    store = Store.from_url(db_url, mapping=mapping)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    poisoned = f.user("user_p", 1_800_000_002_000)
    poisoned["unsafe_metadata"] = {column: value}
    deliveries = [("msg_ok", f.envelope("user.created", f.user("user_ok", 1_800_000_001_000))),
                  ("msg_bad", f.envelope("user.created", poisoned))]
    parsed = [(svix_id, parse_envelope(json.dumps(body))) for svix_id, body in deliveries]
    results = GroupCommitter(processor).write(parsed)
    assert results[0].status == "applied"
    outcome = processor.apply_alone(*parsed[1]) if results[1] is ALONE else results[1]
    assert outcome.status == "applied"
    with store.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users WHERE clerk_id = 'user_p'")).scalar_one() == 1
    # A list or object for a column of one scalar is no value of it: the column's default (NULL), on every
    # store (PostgreSQL stored a list as its array literal, SQLite refused it); for a column of unbounded text
    # its JSON text. A word for a boolean: SQLite keeps any value in any column (and MariaDB casts some);
    # PostgreSQL refuses it.
    if isinstance(value, list | dict):
        assert outcome.error is None
        with store.connect() as conn:
            profiles = sa.table("profiles", sa.column(column), sa.column("clerk_user_id"))
            assert conn.execute(sa.select(profiles.c[column]).where(profiles.c.clerk_user_id == "user_p")).one() \
                == ((json.dumps(value, sort_keys=True) if column == "label" else None),)
    elif store.dialect == "postgresql":
        assert "the app's table refused" in (outcome.error or "") and "mapping" in (outcome.error or "")
        assert repr(value) not in (outcome.error or "")  # the user's value is not echoed into logs and answers
    headers, body = f.signed(deliveries[1][1], "msg_bad")  # re-sent by Svix: a duplicate, not a 503
    assert processor.process(headers, body).status == "duplicate"
    store.dispose()


@pytest.mark.postgres
def test_a_deferred_constraint_of_the_apps_table_fails_its_delivery_not_every_batch() -> None:
    """A constraint the app declared DEFERRABLE INITIALLY DEFERRED was checked at COMMIT, where a refusal
    names no delivery: every batch holding the delivery answered 503, and alone it did too, forever. Checked
    at each statement (SET CONSTRAINTS ALL IMMEDIATE), the refusal is the delivery's own, reported,
    its batch-mates applied (and its contract row: only the app's row is refused)."""
    from clerk_sync.integrations._committer import ALONE, GroupCommitter
    from clerk_sync.migrations import upgrade
    from tests.conftest import PG_URL, pg_schema_url

    schema = f"defer_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        conn.exec_driver_sql(
            f"CREATE TABLE {schema}.profiles (clerk_user_id varchar(64) UNIQUE, email text, deleted_at timestamptz, "
            "CONSTRAINT uq_profiles_email UNIQUE (email) DEFERRABLE INITIALLY DEFERRED)")
        conn.exec_driver_sql(f"INSERT INTO {schema}.profiles (email) VALUES ('taken@example.com')")  # noqa: S608 (our own schema name)
    store = Store.from_url(pg_schema_url(schema), mapping=SchemaMapping(users=MappedTable(
        "profiles", "clerk_user_id", {"email": "email"}, on_delete=SoftDelete("deleted_at"))))
    try:
        upgrade(store.engine)
        processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
        batch = [(f"msg_{i}", parse_envelope(json.dumps(f.envelope(
            "user.created", f.user(f"user_{i}", 1_800_000_001_000, email=email)))))
            for i, email in enumerate(["a@example.com", "taken@example.com", "b@example.com"])]
        results = GroupCommitter(processor).write(batch)
        assert [getattr(r, "status", r) for r in (results[0], results[2])] == ["applied", "applied"]
        outcome = processor.apply_alone(*batch[1]) if results[1] is ALONE else results[1]
        assert outcome.status == "applied" and "uq_profiles_email" in (outcome.error or ""), outcome
    finally:
        store.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def test_a_change_to_the_external_id_alone_reaches_the_mapped_table_one_at_a_time_too(db_url: str) -> None:
    """Setting a user's external_id in Clerk (an app linking its legacy ids after the fact) changes no
    contract column: one delivery at a time (SQLite, MariaDB, Django and Flask's webhook views) it was not
    projected, where PostgreSQL's batches wrote it. Projected on every store now, with no hook job."""
    legacy = sa.Table("legacy_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("legacy_id", sa.String(64)),
                      sa.Column("email", sa.String(320)))
    mapping = SchemaMapping(users=MappedTable("legacy_accounts", "clerk_user_id",
                                              {"legacy_id": "external_id", "email": "email"}))
    store, engine = _with_app_table(db_url, legacy, mapping, hooks=[Hook("seen", lambda change: None)])
    created = f.user("user_l", B + 1000, email="l@example.com")
    updated = {**created, "external_id": "legacy-42", "updated_at": B + 2000}
    assert deliver(store, f.envelope("user.created", created), f.envelope("user.updated", updated)) == [
        "applied", "applied"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(legacy.c.legacy_id, legacy.c.email)).one() == ("legacy-42", "l@example.com")
    assert [j["type"] for j in jobs(store)] == ["user.created"]  # no contract column changed: no hook job
    store.dispose()
    engine.dispose()


def test_a_value_the_apps_table_refuses_never_holds_back_a_ban(db_url: str) -> None:
    """The user fills ``unsafe_metadata.nick`` with more than the app's ``varchar(8)`` takes, then an admin
    bans them: the ban (and the role, a deletion) must reach clerk-sync's tables whatever the app's table
    refuses; the app's row keeps what it had, the delivery says why, and hooks still hear of the change."""
    engine = sa.create_engine(db_url)
    meta = sa.MetaData()
    nicks = sa.Table("nicks", meta, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("nick", sa.String(8)),
                     sa.Column("deleted_at", sa.DateTime))
    meta.create_all(engine)
    seen: list[Change] = []
    store = Store.from_url(db_url, hooks=[Hook("seen", seen.append)], mapping=SchemaMapping(users=MappedTable(
        "nicks", "clerk_user_id", {"nick": Column("unsafe_metadata.nick")}, on_delete=SoftDelete("deleted_at"))))
    created = f.user("user_n", B + 1000)
    created["unsafe_metadata"] = {"nick": "ada"}
    banned = {**created, "unsafe_metadata": {"nick": "x" * 20}, "banned": True, "updated_at": B + 2000}
    assert deliver(store, f.envelope("user.created", created), f.envelope("user.updated", banned)) == [
        "applied", "applied"]
    with store.connect() as conn:
        assert conn.execute(sa.text("SELECT banned FROM users WHERE clerk_id = 'user_n'")).scalar_one() in (True, 1)
        nick = conn.execute(sa.select(nicks.c.nick)).scalar_one()
        error = conn.execute(sa.text("SELECT last_error FROM webhook_events WHERE type = 'user.updated'")).scalar_one()
    # (SQLite, which does not enforce a varchar's length, stored it: every store refuses it now, naming the column)
    assert nick == "ada" and "the app's table refused" in error and "--backfill" in error and "nicks.nick" in error
    assert [j["type"] for j in jobs(store)] == ["user.created", "user.updated"]
    store.dispose()
    engine.dispose()


def test_a_refused_external_id_alone_is_reported_like_any_refusal(db_url: str) -> None:
    """A change of the external_id alone (no contract column) is projected through the same savepoint as
    any other change: the app's refusal is reported, the contract row keeps the new version."""
    legacy = sa.Table("short_ids", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("legacy_id", sa.String(4)))
    mapping = SchemaMapping(users=MappedTable("short_ids", "clerk_user_id", {"legacy_id": "external_id"}))
    store, engine = _with_app_table(db_url, legacy, mapping)
    created = f.user("user_s", B + 1000)
    updated = {**created, "external_id": "legacy-42", "updated_at": B + 2000}
    assert deliver(store, f.envelope("user.created", created), f.envelope("user.updated", updated)) == [
        "applied", "applied"]
    with store.connect() as conn:
        version = conn.execute(sa.text("SELECT clerk_updated_at FROM users WHERE clerk_id = 'user_s'")).scalar_one()
        error = conn.execute(sa.text("SELECT last_error FROM webhook_events WHERE type = 'user.updated'")).scalar_one()
    assert version == B + 2000
    if store.dialect != "sqlite":  # (SQLite keeps any length)
        assert "the app's table refused" in error
    store.dispose()
    engine.dispose()


def test_replay_reports_what_the_apps_table_still_refuses(db_url: str) -> None:
    """A delivery stored failed (by an earlier release, for the app's refusal) replayed while the app's
    table still refuses: applied to clerk-sync's tables, and its last_error says what is left to fix."""
    from clerk_sync.engine import DeliveryStatus
    from clerk_sync.ingest import replay_deliveries

    nicks = sa.Table("replay_nicks", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("nick", sa.String(4)))
    mapping = SchemaMapping(users=MappedTable("replay_nicks", "clerk_user_id", {"nick": Column("unsafe_metadata.nick")}))
    store, engine = _with_app_table(db_url, nicks, mapping)
    body = f.user("user_r", B + 1000)
    body["unsafe_metadata"] = {"nick": "far too long"}
    with store.transaction() as writer:
        writer.record_delivery("msg_old", json.dumps(f.envelope("user.created", body)), event_type="user.created",
                               instance_id=None, event_timestamp=None, status=DeliveryStatus.FAILED, error="old")
    report = replay_deliveries(store)
    assert report.by_status == {"applied": 1}
    with store.connect() as conn:
        error = conn.execute(sa.text("SELECT last_error FROM webhook_events WHERE svix_id = 'msg_old'")).scalar_one()
        assert conn.execute(sa.text("SELECT count(*) FROM users WHERE clerk_id = 'user_r'")).scalar_one() == 1
    assert "the app's table refused" in error  # (on SQLite too, which stored it: its varchar has no length)
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_apps_trigger_that_rolls_back_the_whole_transaction_holds_back_no_role(
        db_url: str, emu: EmulatorServer) -> None:
    """On SQLite an app's trigger can end the whole transaction (``RAISE(ROLLBACK)``), the mapped row's
    savepoint with it: the delivery answered 503 ("no such savepoint") on every retry and the role never
    arrived. Now the delivery is written again without the app's tables: applied, the refusal noted, the
    hook still told; its batch-mates commit; a stored failed delivery replays the same way, and JIT sync
    of such a user signs them in."""
    from clerk_sync.engine import DeliveryStatus
    from clerk_sync.ingest import replay_deliveries
    from clerk_sync.integrations._committer import ALONE

    profiles = sa.Table("guarded_profiles", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)))
    mapping = SchemaMapping(users=MappedTable("guarded_profiles", "clerk_user_id", {"email": "email"}))
    seen: list[Change] = []
    store, engine = _with_app_table(db_url, profiles, mapping, hooks=[Hook("seen", seen.append)])
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TRIGGER no_blocked BEFORE INSERT ON guarded_profiles "
                             "WHEN NEW.email LIKE 'blocked%' BEGIN SELECT RAISE(ROLLBACK, 'blocked domain'); END")
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))

    def event(n: int, email: str) -> tuple[str, Any]:
        body = f.envelope("user.created", f.user(f"user_t{n}", B + n, email=email, role="admin"))
        return f"msg_t{n}", parse_envelope(json.dumps(body))

    batch = [event(1, "a@example.com"), event(2, "blocked@example.com"), event(3, "b@example.com")]
    results = GroupCommitter(processor).write(batch)
    assert [getattr(r, "status", r) for r in results] == ["applied", ALONE, "applied"]
    outcome = processor.apply_alone(*batch[1])
    assert outcome.status == "applied"
    assert "rolled back the whole transaction" in (outcome.error or "") and "blocked domain" in (outcome.error or "")
    assert processor.apply_alone(*batch[1]).status == "duplicate"  # Svix's re-send
    with store.transaction() as writer:  # stored failed by an earlier release: replayed the same way
        user = f.user("user_t4", B + 4, email="blocked.too@example.com", role="admin")
        writer.record_delivery("msg_t4", json.dumps(f.envelope("user.created", user)), event_type="user.created",
                               instance_id=None, event_timestamp=None, status=DeliveryStatus.FAILED, error="old")
    assert replay_deliveries(store, with_hooks=True).by_status == {"applied": 1}
    with store.connect() as conn:
        roles = dict(conn.execute(sa.text("SELECT clerk_id, role FROM users")).all())
        mapped = set(conn.execute(sa.select(profiles.c.clerk_user_id)).scalars())
        errors = dict(conn.execute(sa.text("SELECT svix_id, last_error FROM webhook_events")).all())
    assert roles == {f"user_t{n}": "admin" for n in (1, 2, 3, 4)}
    assert mapped == {"user_t1", "user_t3"}
    assert errors["msg_t1"] is None and "blocked domain" in errors["msg_t4"]
    from clerk_sync.hooks import Dispatcher
    Dispatcher(store).drain()
    assert sorted(c.clerk_id for c in seen) == ["user_t1", "user_t2", "user_t3", "user_t4"]
    eve = emu.create_user(email="blocked.eve@example.com", public_metadata={"role": "admin"})
    with clerk_client(emu) as clerk:
        assert JitUsers(store, clerk=clerk).get_auth_user(eve["id"]).role == "admin"  # before any webhook
    with store.connect() as conn:
        assert eve["id"] not in set(conn.execute(sa.select(profiles.c.clerk_user_id)).scalars())
    store.dispose()
    engine.dispose()


def test_a_child_before_its_parent_in_the_apps_tables_is_retried_not_refused(db_url: str) -> None:
    """The app's memberships table refers to its users table (a foreign key): a membership delivered
    before its user is an ordering that heals, so it is retried (503, as Svix does), not refused for
    good; once the user is there the retried delivery writes both tables."""
    from clerk_sync.errors import StoreError

    meta = sa.MetaData()
    sa.Table("fk_users", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_user_id", sa.String(64), unique=True))
    sa.Table("fk_members", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_id", sa.String(64), unique=True),
             sa.Column("member", sa.String(64), sa.ForeignKey("fk_users.clerk_user_id")))
    mapping = SchemaMapping(users=MappedTable("fk_users", "clerk_user_id", {}),
                            memberships=MappedTable("fk_members", "clerk_id", {"member": "user_clerk_id"}))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        meta.create_all(conn)
        migrate_schema(conn, mapping)
    store = Store.from_url(db_url, mapping=mapping)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    membership = f.envelope("organizationMembership.created", f.membership("orgmem_fk", "org_fk", "user_fk", B + 1000))
    headers, body = f.signed(membership, "msg_member")
    with pytest.raises(StoreError, match="not there yet"):
        processor.process(headers, body)
    assert deliver(store, f.envelope("user.created", f.user("user_fk", B + 1000))) == ["applied"]
    assert processor.process(headers, body).status == "applied"  # Svix's retry
    with store.connect() as conn:
        assert conn.execute(sa.text("SELECT member FROM fk_members")).scalar_one() == "user_fk"
    store.dispose()
    engine.dispose()


def test_only_a_drivers_refusal_of_a_value_is_a_refusal_for_good() -> None:
    """A value the driver cannot send (psycopg's "cannot adapt", sqlite3's "Error binding parameter") is
    refused for good; a MySQL ProgrammingError (no SQLSTATE there either: a missing table mid-deploy) is
    not, so the delivery is retried rather than its app row dropped."""
    import MySQLdb
    import psycopg

    from clerk_sync._db_errors import store_error
    from clerk_sync.errors import StoreDataError

    def wrapped(orig: Exception) -> sa.exc.SQLAlchemyError:
        return sa.exc.ProgrammingError("INSERT ...", {}, orig)

    assert isinstance(store_error(wrapped(psycopg.ProgrammingError("cannot adapt type 'dict'"))), StoreDataError)
    assert isinstance(store_error(wrapped(sqlite3.ProgrammingError("Error binding parameter 1: type 'dict'"))),
                      StoreDataError)
    missing = store_error(wrapped(MySQLdb.ProgrammingError(1146, "Table 'app.accounts' doesn't exist")))
    assert not isinstance(missing, StoreDataError)


def _with_app_table(db_url: str, table: sa.Table | sa.MetaData, mapping: SchemaMapping,
                    **store: Any) -> tuple[Store, sa.Engine]:
    """The app's ``table`` (or every table of a MetaData) created and migrated for ``mapping``; a store
    writing through it, and an engine."""
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        if isinstance(table, sa.MetaData):
            table.create_all(conn)
        else:
            table.create(conn)
        migrate_schema(conn, mapping)
    return Store.from_url(db_url, mapping=mapping, **store), engine


def test_erasure_clears_the_columns_declared_personal_too(db_url: str) -> None:
    """A metadata path or a computed column can hold the person's data (a phone number, initials):
    declared ``personal=True`` it is cleared by erasure (and Anonymise) like the e-mail; an undeclared
    metadata path (a plan) is the app's to keep."""
    profiles = sa.Table("personal_profiles", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)),
                        sa.Column("phone", sa.String(32)), sa.Column("initials", sa.String(8)),
                        sa.Column("plan", sa.String(16)))
    mapping = SchemaMapping(users=MappedTable("personal_profiles", "clerk_user_id", {
        "email": "email",
        "phone": Column("private_metadata.phone", personal=True),
        "initials": Column(compute=lambda v: (v["first_name"] or "")[:1] + (v["last_name"] or "")[:1], personal=True),
        "plan": Column("public_metadata.plan"),
    }))
    declared = mapping.tables[Entity.USER].resolved()
    assert [n for n, c in declared.items() if c.is_personal] == ["email", "phone", "initials"]
    store, engine = _with_app_table(db_url, profiles, mapping)
    body = f.user("user_e", B + 1000, email="ada@example.com")
    body["private_metadata"], body["public_metadata"] = {"phone": "+44 20 7946 0000"}, {"plan": "pro"}
    assert deliver(store, f.envelope("user.created", body)) == ["applied"]
    Retention(store).erase_user("user_e", reason="GDPR request")
    with engine.connect() as conn:
        row = conn.execute(sa.select(profiles.c.email, profiles.c.phone, profiles.c.initials, profiles.c.plan)).one()
    assert tuple(row) == (None, None, None, "pro")
    store.dispose()
    engine.dispose()


def test_a_user_deletion_the_apps_other_tables_still_refer_to_is_applied_not_retried_forever(db_url: str) -> None:
    """HardDelete of an app row another app table refers to (orders -> accounts): the foreign key refuses
    the DELETE. That was taken for "a parent not there yet" (transient): 503 on every retry, the user never
    tombstoned. A deletion refused by a reference never heals by waiting: the row's refusal, the user deleted."""
    meta = sa.MetaData()
    owners = sa.Table("fk_owners", meta, sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)))
    orders = sa.Table("fk_orders", meta, sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("owner_id", sa.Integer, sa.ForeignKey("fk_owners.id"), nullable=False))
    mapping = SchemaMapping(users=MappedTable("fk_owners", "clerk_user_id", {"email": "email"}, on_delete=HardDelete()))
    store, engine = _with_app_table(db_url, owners, mapping)
    orders.create(engine)
    assert deliver(store, f.envelope("user.created", f.user("user_fk", B + 1000))) == ["applied"]
    with engine.begin() as conn:
        owner = conn.execute(sa.select(owners.c.id)).scalar_one()
        conn.execute(orders.insert().values(owner_id=owner))
    assert deliver(store, f.envelope("user.deleted", f.deleted("user", "user_fk"))) == ["applied"]
    with store.connect() as conn:
        assert conn.execute(sa.text("SELECT deleted_at FROM users WHERE clerk_id = 'user_fk'")).scalar_one() is not None
        error = conn.execute(sa.text("SELECT last_error FROM webhook_events WHERE type = 'user.deleted'")).scalar_one()
        assert conn.execute(sa.select(sa.func.count()).select_from(owners)).scalar_one() == 1  # the app's to sort out
    assert "the app's table refused" in error
    store.dispose()
    engine.dispose()


def test_a_compute_that_raises_on_a_missing_key_never_holds_back_a_ban(db_url: str) -> None:
    """A compute reading a metadata key the user can remove (``KeyError``) failed the whole delivery: no
    ban, no role. Any exception of the app's projection is its row's refusal, alone and in a batch."""
    from clerk_sync.integrations._committer import ALONE

    plans = sa.Table("compute_plans", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("plan", sa.String(16)))
    mapping = SchemaMapping(users=MappedTable("compute_plans", "clerk_user_id", {
        "plan": Column(compute=lambda v: v["unsafe_metadata"]["plan"])}))
    store, engine = _with_app_table(db_url, plans, mapping)
    with_plan = f.user("user_k1", B + 1000)
    with_plan["unsafe_metadata"] = {"plan": "pro"}
    assert deliver(store, f.envelope("user.created", with_plan),
                   f.envelope("user.updated", f.user("user_k1", B + 2000, banned=True))) == ["applied", "applied"]
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    batch = [(f"msg_k{n}", parse_envelope(json.dumps(f.envelope("user.created", f.user(f"user_k{n}", B + n, role="admin")))))
             for n in (2, 3)]
    results = [processor.apply_alone(*batch[i]) if r is ALONE else r
               for i, r in enumerate(GroupCommitter(processor).write(batch))]
    assert [getattr(r, "status", r) for r in results] == ["applied", "applied"]
    with store.connect() as conn:
        users_now = {r[0]: (r[1], r[2]) for r in conn.execute(sa.text("SELECT clerk_id, banned, role FROM users"))}
        errors = [r[0] for r in conn.execute(sa.text("SELECT last_error FROM webhook_events ORDER BY id"))]
    assert users_now["user_k1"][0] in (True, 1) and users_now["user_k2"][1] == users_now["user_k3"][1] == "admin"
    assert errors[0] is None and all("KeyError" in (e or "") for e in errors[1:]), errors
    store.dispose()
    engine.dispose()


@pytest.mark.postgres
def test_a_row_adopted_by_a_concurrent_delivery_is_not_taken_over() -> None:
    """Two Clerk users with the app's same legacy id (Clerk does not make ``external_id`` unique), written
    at once: the second read the row unlinked, waited on its lock, then re-linked it to itself. Now it
    sees the row taken (503, Svix retries) and, retried, gets a row of its own."""
    import threading

    from clerk_sync.engine import Upsert
    from clerk_sync.errors import StoreError
    from clerk_sync.events import user_record
    from clerk_sync.migrations import upgrade
    from tests.conftest import PG_URL, pg_schema_url

    schema = f"adopt_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    legacy = sa.Table("race_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("email", sa.String(320)))
    mapping = SchemaMapping(users=MappedTable("race_accounts", "clerk_user_id", {"email": "email"},
                                              link_by_external_id="id"))
    try:
        store, engine = _with_app_table(pg_schema_url(schema), legacy, mapping)
        upgrade(store.engine)
        with engine.begin() as conn:
            conn.execute(legacy.insert().values(id=7, email="legacy@example.com"))

        def record(clerk_id: str) -> Any:
            data = f.user(clerk_id, B + 1000, email=f"{clerk_id}@example.com")
            data["external_id"] = "7"
            return user_record(data)

        second: list[BaseException | None] = []

        def write_b() -> None:
            try:
                with store.transaction() as writer:
                    writer.apply(Upsert(Entity.USER, record("user_b")))
                second.append(None)
            except BaseException as exc:
                second.append(exc)

        with store.transaction() as writer:
            writer.apply(Upsert(Entity.USER, record("user_a")))
            thread = threading.Thread(target=write_b)
            thread.start()
            with admin.connect() as conn:  # until user_b's write waits on the row user_a's transaction holds
                # (user_b's own wait, not any other session's: a server-wide count of waiting locks let a
                # stranger's wait end this loop before user_b had read the row, and user_a committed too early)
                while not conn.execute(sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query ILIKE '%race_accounts%'")).scalar_one():
                    conn.rollback()
        thread.join()
        assert isinstance(second[0], StoreError) and "linked to another user meanwhile" in str(second[0])
        with store.transaction() as writer:  # Svix's retry
            writer.apply(Upsert(Entity.USER, record("user_b")))
        with engine.connect() as conn:
            rows = {r[1]: r[0] for r in conn.execute(sa.text("SELECT id, clerk_user_id FROM race_accounts"))}
        assert len(rows) == 2 and rows["user_a"] == 7 and rows["user_b"] != 7
        store.dispose()
        engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def test_linking_by_email_folds_case_beyond_ascii_on_every_store(db_url: str) -> None:
    """SQLite's lower() folds ASCII only: ``ÉLODIE@Example.com`` was not found for Clerk's
    ``élodie@example.com`` there (a second row was inserted) where PostgreSQL and MariaDB linked it."""
    legacy = sa.Table("unicode_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("email", sa.String(200)))
    mapping = SchemaMapping(users=MappedTable("unicode_accounts", "clerk_user_id", {"email": "email"},
                                              link_by_email="email"))
    store, engine = _with_app_table(db_url, legacy, mapping)
    with engine.begin() as conn:
        conn.execute(legacy.insert().values(id=1, email="ÉLODIE@Example.com"))
    assert deliver(store, f.envelope("user.created", f.user("user_el", B + 1000, email="élodie@example.com"))) == [
        "applied"]
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, email, clerk_user_id FROM unicode_accounts")).all()
    assert [tuple(r) for r in rows] == [(1, "élodie@example.com", "user_el")]
    store.dispose()
    engine.dispose()


def test_a_user_deletion_removes_the_apps_memberships_before_the_users_row(db_url: str) -> None:
    """The app's memberships table refers to its users table (HardDelete on both): the user's row was
    projected before the cascaded memberships, so the foreign key refused it for good and the person's
    e-mail stayed. The memberships go first now, then the user's row."""
    meta = sa.MetaData()
    people = sa.Table("fk_people", meta, sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(200)))
    seats = sa.Table("fk_seats", meta, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_id", sa.String(64), unique=True),
                     sa.Column("member", sa.String(64), sa.ForeignKey("fk_people.clerk_user_id")))
    mapping = SchemaMapping(users=MappedTable("fk_people", "clerk_user_id", {"email": "email"}, on_delete=HardDelete()),
                            memberships=MappedTable("fk_seats", "clerk_id", {"member": "user_clerk_id"},
                                                    on_delete=HardDelete()))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        meta.create_all(conn)
        migrate_schema(conn, mapping)
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_fk", B + 1000, email="ann@example.com")),
                   f.envelope("organization.created", f.organization("org_fk", B + 1000)),
                   f.envelope("organizationMembership.created",
                              f.membership("orgmem_fk", "org_fk", "user_fk", B + 1000))) == ["applied"] * 3
    assert deliver(store, f.envelope("user.deleted", f.deleted("user", "user_fk"))) == ["applied"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(people)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(seats)).scalar_one() == 0
        assert conn.execute(sa.text("SELECT last_error FROM webhook_events WHERE type = 'user.deleted'")).scalar_one() is None
    store.dispose()
    engine.dispose()


def test_a_check_constraint_of_the_apps_table_never_holds_back_a_ban_on_any_store(db_url: str) -> None:
    """Review finding: MariaDB reports a CHECK constraint's refusal (4025; MySQL 3819) as an operational error,
    not an integrity one, so it was taken for a passing failure: 503 on every retry, the ban never applied,
    where SQLite and PostgreSQL applied it and noted the app row's refusal. It is the row's refusal everywhere."""
    names = sa.Table("checked_names", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("display_name", sa.String(64)),
                     sa.CheckConstraint("display_name <> 'Bad Lovelace'", name="ck_checked_names_display"))
    mapping = SchemaMapping(users=MappedTable("checked_names", "clerk_user_id", {"display_name": "full_name"}))
    store, engine = _with_app_table(db_url, names, mapping)
    bad = f.user("user_ck", B + 1000, first_name="Bad", banned=True)
    bad["last_name"] = "Lovelace"
    assert deliver(store, f.envelope("user.created", bad)) == ["applied"]
    with store.connect() as conn:
        banned = conn.execute(sa.text("SELECT banned FROM users WHERE clerk_id = 'user_ck'")).scalar_one()
        error = conn.execute(sa.text("SELECT last_error FROM webhook_events")).scalar_one()
        rows = conn.execute(sa.select(names.c.display_name)).all()
    # the row is written again without the user's own columns (the name the CHECK refused): NULL there
    assert banned in (True, 1) and rows == [(None,)] and "the app's table refused" in error
    assert "without the columns the user can set in Clerk (display_name)" in error
    store.dispose()
    engine.dispose()
