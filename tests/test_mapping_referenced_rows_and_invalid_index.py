"""The mapped tables: a referenced row is no missing parent, an INVALID index no unique one. A change to a value another app table's foreign key
still refers to (an e-mail the app's orders point at) was read on PostgreSQL and SQLite as "a parent not
there yet": 503 on every retry, and the role and ban the same delivery carried never applied (MariaDB tells
the two apart by number, 1451). And on PostgreSQL an INVALID unique index on the Clerk-id column (what a
failed CREATE UNIQUE INDEX CONCURRENTLY leaves) was taken for a valid one: ON CONFLICT refused every
delivery to the table; the doctor said only that the column had no unique index."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.cli.hooks import migrate_mapping
from clerk_sync.errors import StoreError
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import ALONE, GroupCommitter
from clerk_sync.mapping import Column, MappedTable, SchemaMapping
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import _PG_PROBLEM, PG_URL, require_server
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table
from tests.test_mapping_concurrent_unique_index import App


def _scalar(store: Store, sql: str, **params: Any) -> Any:
    with store.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


def _last_error(store: Store, svix_id: str) -> str:
    return str(_scalar(store, "SELECT last_error FROM webhook_events WHERE svix_id = :s", s=svix_id))


def test_a_change_to_a_value_another_app_table_refers_to_is_refused_not_retried(db_url: str) -> None:
    """The app's orders refer to its accounts' e-mail; the user changes their e-mail. The foreign key refuses
    the accounts row's UPDATE, which PostgreSQL and SQLite reported as a missing parent (ParentNotThere): 503
    on every retry, the ban in the same event never applied. No event heals it: it is the row's refusal now,
    naming the referring table (and on PostgreSQL its constraint, from the error's diagnostics), the change
    applied to clerk-sync's tables; alone and in a batch (on PostgreSQL the wave statement, then one by one)."""
    meta = sa.MetaData()
    accounts = sa.Table("rv4_accounts", meta, sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("clerk_user_id", sa.String(64), unique=True),
                        sa.Column("email", sa.String(200), unique=True))
    orders = sa.Table("rv4_orders", meta, sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("email", sa.String(200), sa.ForeignKey("rv4_accounts.email", name="fk_rv4_orders_email")))
    mapping = SchemaMapping(users=MappedTable("rv4_accounts", "clerk_user_id", {"email": "email"}))
    store, engine = _with_app_table(db_url, meta, mapping)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    created = [f.envelope("user.created", f.user(f"user_o{n}", B + 1000, email=f"o{n}@example.com")) for n in range(3)]
    assert deliver(store, *created) == ["applied"] * 3
    with engine.begin() as conn:
        conn.execute(orders.insert(), [{"email": f"o{n}@example.com"} for n in range(3)])

    changed = f.envelope("user.updated", f.user("user_o0", B + 2000, email="new0@example.com", banned=True))
    outcome = processor.process(*f.signed(changed, "msg_rv4_alone"))  # raised ParentNotThere (503) before
    assert outcome.status == "applied"

    batch = [(f"msg_rv4_b{n}", parse_envelope(json.dumps(f.envelope("user.updated", f.user(
        f"user_o{n}", B + 2000, email=f"new{n}@example.com", role="admin"))))) for n in (1, 2)]
    committer = GroupCommitter(processor)
    results = [processor.apply_alone(*batch[i]) if r is ALONE else r for i, r in enumerate(committer.write(batch))]
    assert [getattr(r, "status", r) for r in results] == ["applied"] * 2

    assert _scalar(store, "SELECT banned FROM users WHERE clerk_id = 'user_o0'") in (True, 1)
    assert _scalar(store, "SELECT count(*) FROM users WHERE role = 'admin'") == 2
    for n, svix_id in enumerate(["msg_rv4_alone", "msg_rv4_b1", "msg_rv4_b2"]):
        assert _scalar(store, "SELECT email FROM users WHERE clerk_id = :c", c=f"user_o{n}") == f"new{n}@example.com"
        error = _last_error(store, svix_id)
        assert error.startswith(f"the app's table refused the change (rv4_accounts refused user.updated for user_o{n}")
        assert "rv4_orders" in error and "not there yet" not in error, error
        if store.dialect == "sqlite":  # (its message names nothing: the referring table and column, looked up)
            assert "; rv4_orders (email) still refers to the value it replaces: fix the table or the mapping" in error
        else:  # PostgreSQL's from the diagnostics, MariaDB's in its own message
            assert "fk_rv4_orders_email" in error, error
        if store.dialect == "postgresql":
            assert "; rv4_orders (foreign key fk_rv4_orders_email) still refers to the value it replaces" in error
    with engine.connect() as conn:  # the app's rows as they were: the app's to sort out
        assert sorted(conn.execute(sa.select(accounts.c.email)).scalars()) == [f"o{n}@example.com" for n in range(3)]
    store.dispose()
    engine.dispose()


def test_a_self_referencing_key_tells_the_referred_row_from_a_missing_parent(db_url: str) -> None:
    """A key of the mapped table referring to the table itself (a manager's e-mail): PostgreSQL's diagnostics
    name the same table and constraint either way. The row is the one referred to when the mapping writes
    none of the key's own columns (its e-mail changed under a report's row: refused, not retried); when the
    mapping writes them (a manager not synced yet), it is a parent not there yet: retried until it arrives."""
    meta = sa.MetaData()
    staff = sa.Table("rv4_staff", meta, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True),
                     sa.Column("email", sa.String(200), unique=True),
                     sa.Column("manager", sa.String(200), sa.ForeignKey("rv4_staff.email", name="fk_rv4_staff_manager")))
    mapping = SchemaMapping(users=MappedTable("rv4_staff", "clerk_user_id", {"email": "email"}))
    store, engine = _with_app_table(db_url, meta, mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_boss", B + 1000, email="boss@example.com"))) == [
        "applied"]
    with engine.begin() as conn:  # the app's own row (no Clerk id) reporting to the user
        conn.execute(staff.insert().values(email="legacy@example.com", manager="boss@example.com"))
    changed = f.envelope("user.updated", f.user("user_boss", B + 2000, email="chief@example.com", role="admin"))
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    assert processor.process(*f.signed(changed, "msg_rv4_self")).status == "applied"
    error = _last_error(store, "msg_rv4_self")
    assert "the app's table refused" in error and "rv4_staff" in error and "not there yet" not in error, error
    if store.dialect != "mysql":  # (MariaDB's own message, 1451, says it)
        assert "still refers to the value it replaces" in error, error
    assert _scalar(store, "SELECT role FROM users WHERE clerk_id = 'user_boss'") == "admin"
    store.dispose()
    engine.dispose()

    reports = sa.Table("rv4_reports", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                       sa.Column("clerk_user_id", sa.String(64), unique=True),
                       sa.Column("email", sa.String(200), unique=True),
                       sa.Column("manager", sa.String(200),
                                 sa.ForeignKey("rv4_reports.email", name="fk_rv4_reports_manager")))
    mapping = SchemaMapping(users=MappedTable("rv4_reports", "clerk_user_id", {
        "email": "email", "manager": Column("public_metadata.manager")}))
    store, engine = _with_app_table(db_url, reports, mapping)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    report = f.user("user_rep", B + 1000, email="rep@example.com")
    report["public_metadata"] = {"manager": "mgr@example.com"}
    signed = f.signed(f.envelope("user.created", report), "msg_rv4_rep")
    with pytest.raises(StoreError, match="not there yet"):  # 503: Svix retries
        processor.process(*signed)
    assert deliver(store, f.envelope("user.created", f.user("user_mgr", B + 1000, email="mgr@example.com"))) == [
        "applied"]
    assert processor.process(*signed).status == "applied"
    assert _last_error(store, "msg_rv4_rep") == "None"
    with engine.connect() as conn:
        assert conn.execute(sa.select(reports.c.manager).where(reports.c.email == "rep@example.com")).scalar_one() == (
            "mgr@example.com")
    store.dispose()
    engine.dispose()


# -- an INVALID unique index on the Clerk-id column (PostgreSQL) ------------------------------------------

@pytest.fixture
def app() -> Iterator[App]:
    """The app table of ``tests.test_mapping_concurrent_unique_index`` in a private schema, with clerk-sync's own tables migrated there too."""
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    schema = f"r4_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    made = App(schema)
    migrations.upgrade(made.engine)
    try:
        yield made
    finally:
        made.engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def _clerk_ids(app: App) -> list[str]:
    with app.engine.connect() as conn:
        return sorted(conn.execute(sa.select(app.t.c.clerk_user_id).where(app.t.c.clerk_user_id.is_not(None))).scalars())


@pytest.mark.postgres
def test_an_invalid_clerk_id_index_is_not_taken_for_a_unique_one(app: App) -> None:
    """A failed CONCURRENTLY build's INVALID unique index on the Clerk-id column: SQLAlchemy reflects it as a
    valid one (2.1 flags it, 2.0 does not), so the mapped write used ON CONFLICT (clerk_user_id), which
    PostgreSQL refuses ("no unique or exclusion constraint matching"): every delivery to the table failed,
    alone and in a batch. It is not counted now (read from pg_index): the rows are written with an UPDATE,
    then an INSERT, a created Clerk id already there updates its row (the index, never ready, would not have
    caught the duplicate), and the doctor says the index is INVALID and what to do."""
    app.leave_an_invalid_index()  # (one row with Clerk id user_dup stays)
    store = Store.from_url(app.url, mapping=app.mapping)
    try:
        assert deliver(store, f.envelope("user.created", f.user("user_new", B + 1000, email="new@example.com")),
                       f.envelope("user.updated", f.user("user_new", B + 2000, email="newer@example.com")),
                       f.envelope("user.created", f.user("user_dup", B + 1000, email="dup@example.com"))) == [
            "applied"] * 3
        processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
        batch = [(f"msg_rv4_i{n}", parse_envelope(json.dumps(f.envelope("user.created", f.user(
            f"user_i{n}", B + 1000, email=f"i{n}@example.com"))))) for n in range(3)]
        results = [processor.apply_alone(*batch[i]) if r is ALONE else r
                   for i, r in enumerate(GroupCommitter(processor).write(batch))]
        assert [getattr(r, "status", r) for r in results] == ["applied"] * 3
        assert _scalar(store, "SELECT count(*) FROM webhook_events WHERE last_error IS NOT NULL") == 0
        assert _clerk_ids(app) == ["user_dup", "user_i0", "user_i1", "user_i2", "user_new"]
        with app.engine.connect() as conn:
            emails = dict(conn.execute(sa.select(app.t.c.clerk_user_id, app.t.c.email)).all())
        assert (emails["user_new"], emails["user_dup"]) == ("newer@example.com", "dup@example.com")

        invalid = (f"{app.table}.clerk_user_id: its unique index {app.index} is INVALID (a CREATE UNIQUE INDEX "
                   "CONCURRENTLY that failed or was interrupted): it enforces nothing reliably and ON CONFLICT cannot "
                   "use it; each delivery's row is written with an UPDATE, then an INSERT: drop it (DROP INDEX "
                   f"CONCURRENTLY {app.index}) and re-run `clerk-sync migrate --mapping ...`")
        assert app.doctor() == [
            ("fail", f"{app.table}.clerk_user_id has no unique index: run `clerk-sync migrate --mapping ...`"),
            ("fail", invalid)]

        # A valid unique index under another name serves the writes; the INVALID one is still worth a warning.
        with app.engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE UNIQUE INDEX {app.table}_other ON {app.table} (clerk_user_id)")
        [(severity, problem)] = app.doctor()
        assert severity == "warn" and problem.startswith(f"{app.table}.clerk_user_id: its unique index {app.index} "
                                                         "is INVALID"), problem
        assert problem.endswith(f"another, valid, serves the writes; this one still costs each of them: drop it "
                                f"(DROP INDEX CONCURRENTLY {app.index})")
        with app.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP INDEX {app.table}_other")

        assert migrate_mapping(store, app.mapping).lines == [  # what the doctor's fix does
            f"mapping: dropped invalid index {app.index} (a build that failed or was interrupted)",
            f"mapping: created unique index {app.index}"]
        assert app.doctor() == []
    finally:
        store.dispose()


@pytest.mark.postgres
def test_invalid_indexes_are_read_from_the_catalog_not_from_reflection(app: App) -> None:
    """Whatever SQLAlchemy's reflection says of an INVALID index (2.0 reports it as a valid one), the write
    path's reflected table marks it from pg_index, and only it."""
    app.leave_an_invalid_index()
    with app.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE INDEX {app.table}_email ON {app.table} (email)")
        table = app.mapping.table(conn, app.table)
    assert {i.name: i.info.get("invalid") for i in table.indexes} == {app.index: True, f"{app.table}_email": False}
    assert table.info["schema"] == app.url.rsplit("%3D", 1)[1]  # (the app's private schema, on the search path)


@pytest.mark.postgres
def test_a_partitioned_tables_missing_parent_is_still_retried() -> None:
    """Fixed: a partitioned table's foreign key error names the leaf partition the row went to
    (``people_p1``), not the mapped table, so a parent not there yet (a team the app creates later) was taken
    for "another table refers to this row" and the delivery applied with the app's row refused for good. The
    partitions are this table too: retried, as before the change."""
    from clerk_sync.mapping import ParentNotThere, migrate_schema
    from clerk_sync.store import create_engine
    from tests.conftest import pg_schema_url

    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    schema = f"r4p_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        url = pg_schema_url(schema)
        own = create_engine(url)
        migrations.upgrade(own)
        own.dispose()
        mapping = SchemaMapping(users=MappedTable("people", "clerk_user_id",
                                                  {"email": "email", "team": Column("public_metadata.team")}))
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE teams (slug text PRIMARY KEY)")
            conn.exec_driver_sql("CREATE TABLE people (clerk_user_id varchar(64) NOT NULL, email text, team text "
                                 "REFERENCES teams(slug), PRIMARY KEY (clerk_user_id)) PARTITION BY HASH (clerk_user_id)")
            for rest in (0, 1):
                conn.exec_driver_sql(f"CREATE TABLE people_p{rest} PARTITION OF people "
                                     f"FOR VALUES WITH (MODULUS 2, REMAINDER {rest})")
            migrate_schema(conn, mapping)
        store = Store.from_url(url, mapping=mapping)
        try:
            processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
            user = f.user("user_p1", B + 1000, email="p1@example.com")
            user["public_metadata"] = {"team": "t1"}
            with pytest.raises(ParentNotThere, match="not there yet"):
                processor.process(*f.signed(f.envelope("user.created", user), "msg_p1"))
            with engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO teams VALUES ('t1')")
            assert str(processor.process(*f.signed(f.envelope("user.created", user), "msg_p1")).status) == "applied"
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT team FROM people WHERE clerk_user_id = 'user_p1'").scalar_one() == "t1"
        finally:
            store.dispose()
            engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()
