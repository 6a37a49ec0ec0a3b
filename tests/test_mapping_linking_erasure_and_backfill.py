"""The mapped tables, each once broken: exact linking on MariaDB, erasure of NOT NULL personal columns, a
membership whose app parent was refused for good, a mapping naming a missing column, deferred constraints
outside Store.run, uuid external ids, backfill refusals, boolean text in batches, the doctor's folding."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.engine import Entity, Upsert
from clerk_sync.events import parse_envelope, user_record
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import ALONE, GroupCommitter
from clerk_sync.mapping import Column, Deactivate, MappedTable, SchemaMapping, SoftDelete, check_schema, migrate_schema
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table, auth_user, django_meta


def _scalar(store: Store, sql: str) -> Any:
    with store.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def test_linking_compares_exactly_under_a_case_and_accent_insensitive_collation(db_url: str) -> None:
    """MariaDB compared the link columns with their collation: under utf8mb4_general_ci a new Clerk user
    ``élodie@example.com`` adopted the row of ``elodie@example.com`` (another person's account), and an
    external id ``ABC`` the row ``abc``. Compared exactly now; the doctor warns about such a column."""
    legacy = sa.Table("ci_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("legacy_id", sa.String(64)), sa.Column("email", sa.String(200)),
                      mysql_charset="utf8mb4", mysql_collate="utf8mb4_general_ci")
    mapping = SchemaMapping(users=MappedTable("ci_accounts", "clerk_user_id", {"email": "email"},
                                              link_by_email="email", link_by_external_id="legacy_id"))
    store, engine = _with_app_table(db_url, legacy, mapping)
    with engine.begin() as conn:
        conn.execute(legacy.insert(), [{"id": 1, "email": "elodie@example.com"},
                                       {"id": 2, "legacy_id": "abc", "email": "someone@example.com"},
                                       {"id": 3, "email": "Ann@Example.com"}])
    other = f.user("user_x", B + 1000, email="x@example.com")
    other["external_id"] = "ABC"
    assert deliver(store, f.envelope("user.created", f.user("user_el", B + 1000, email="élodie@example.com")),
                   f.envelope("user.created", other),
                   f.envelope("user.created", f.user("user_ann", B + 1000, email="ann@example.com"))) == ["applied"] * 3
    with engine.connect() as conn:
        linked = dict(conn.execute(sa.text("SELECT id, clerk_user_id FROM ci_accounts WHERE id <= 3")).all())
        warnings = [p for _, p in check_schema(conn, mapping)]
    assert linked == {1: None, 2: None, 3: "user_ann"}  # the same address in other case is still linked
    if store.dialect == "mysql":
        assert any("ci_accounts.email compares without regard" in w for w in warnings), warnings
        assert any("ci_accounts.legacy_id compares without regard" in w for w in warnings), warnings
    store.dispose()
    engine.dispose()


def _django_mapping() -> SchemaMapping:
    return SchemaMapping(users=MappedTable("auth_user", "clerk_id", {
        "username": "clerk_id", "email": Column("email", default=""),
        "first_name": Column("first_name", default=""), "last_name": "last_name",  # (no default: "" for a string)
        "is_staff": Column(compute=lambda v: v.get("role") == "admin"),
        "is_superuser": Column(compute=lambda v: False),
        "password": Column(compute=lambda v: "!"),
        "date_joined": Column(compute=lambda v: datetime.fromtimestamp((v.get("clerk_created_at") or 0) / 1000, UTC)),
    }, on_delete=Deactivate("is_active")))


def test_erasure_clears_not_null_personal_columns_to_empty_not_null(db_url: str) -> None:
    """Django's auth_user has NOT NULL e-mail and names: erasure set them NULL and the whole erasure rolled
    back (StoreError) on every store. They are cleared to the Column's default, else "" now, the user erased;
    the doctor fails a NOT NULL personal column with nothing to clear it to, whatever the policy."""
    engine = sa.create_engine(db_url)
    django_meta.create_all(engine)
    mapping = _django_mapping()
    with engine.begin() as conn:
        migrate_schema(conn, mapping)
        assert [p for _, p in check_schema(conn, mapping)] == [  # (the one warning: a user without a last name)
            "auth_user.last_name is NOT NULL and its source 'last_name' can be empty: those rows are refused (the "
            "rest of the delivery applies); give the mapping's Column a default, Column('last_name', default=...), "
            "or let the column be NULL"]
        conn.execute(sa.text("ALTER TABLE auth_user ADD COLUMN age integer NOT NULL DEFAULT 0"))
        aged = SchemaMapping(users=MappedTable("auth_user", "clerk_id", {
            **mapping.tables[Entity.USER].columns, "age": Column("private_metadata.age", personal=True)},
            on_delete=mapping.tables[Entity.USER].on_delete))
        assert any("auth_user.age is NOT NULL and holds personal data" in p for _, p in check_schema(conn, aged))
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_1", B + 1000, first_name="Ada"))) == ["applied"]
    Retention(store).erase_user("user_1", reason="GDPR request")
    with engine.connect() as conn:
        row = conn.execute(sa.select(auth_user.c.username, auth_user.c.email, auth_user.c.first_name,
                                     auth_user.c.last_name)).one()
    assert tuple(row) == ("user_1", "", "", "")
    assert _scalar(store, "SELECT deleted_at FROM users WHERE clerk_id = 'user_1'") is not None
    store.dispose()
    engine.dispose()


def test_a_membership_whose_apps_parent_row_was_refused_for_good_is_applied_not_retried_forever(db_url: str) -> None:
    """The app's users table refused the user's row for good (a CHECK on an admin's value): its memberships
    table's foreign key
    then refused the membership, taken for "a parent not there yet", 503 forever, the role never written.
    With the contract parents there, it is the membership row's refusal and the role applies."""
    meta = sa.MetaData()
    people = sa.Table("fkc_people", meta, sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("tier", sa.String(64)),
                      sa.CheckConstraint("tier <> 'Bad'", name="ck_fkc_people_tier"))
    seats = sa.Table("fkc_seats", meta, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_id", sa.String(64), unique=True),
                     sa.Column("member", sa.String(64), sa.ForeignKey("fkc_people.clerk_user_id")))
    mapping = SchemaMapping(users=MappedTable("fkc_people", "clerk_user_id", {"tier": "public_metadata.tier"}),
                            memberships=MappedTable("fkc_seats", "clerk_id", {"member": "user_clerk_id"}))
    store, engine = _with_app_table(db_url, meta, mapping)
    membership = f.membership("orgmem_c", "org_c", "user_c", B + 1000, role="org:admin")
    user = f.user("user_c", B + 1000)
    user["public_metadata"] = {"tier": "Bad"}  # (an admin's value: no column of the user's to leave out)
    assert deliver(store, f.envelope("user.created", user),
                   f.envelope("organization.created", f.organization("org_c", B + 1000)),
                   f.envelope("organizationMembership.created", membership)) == ["applied"] * 3
    assert _scalar(store, "SELECT role FROM organization_memberships WHERE clerk_id = 'orgmem_c'") == "org:admin"
    error = _scalar(store, "SELECT last_error FROM webhook_events WHERE type = 'organizationMembership.created'")
    assert "the app's table refused" in error and "have arrived" in error
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(seats)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(people)).scalar_one() == 0
    store.dispose()
    engine.dispose()


def test_a_membership_whose_key_refers_to_a_row_the_app_makes_itself_is_retried_until_it_is_there(
        db_url: str) -> None:
    """A gap in the fix above: a foreign key to a row the app creates itself (a workspace its own hook
    makes) became a final refusal as soon as clerk-sync's parents were there, though it heals once the app
    has made the row. Only a mapped parent's missing app row (refused for good) is final now."""
    from clerk_sync.errors import StoreError

    meta = sa.MetaData()
    workspaces = sa.Table("fkw_workspaces", meta, sa.Column("id", sa.Integer, primary_key=True),
                          sa.Column("org", sa.String(64), unique=True))
    sa.Table("fkw_seats", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_id", sa.String(64), unique=True),
             sa.Column("org", sa.String(64), sa.ForeignKey("fkw_workspaces.org")))
    mapping = SchemaMapping(memberships=MappedTable("fkw_seats", "clerk_id", {"org": "organization_clerk_id"}))
    store, engine = _with_app_table(db_url, meta, mapping)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    assert deliver(store, f.envelope("user.created", f.user("user_w", B + 1000)),
                   f.envelope("organization.created", f.organization("org_w", B + 1000))) == ["applied"] * 2
    membership = f.signed(f.envelope("organizationMembership.created",
                                     f.membership("orgmem_w", "org_w", "user_w", B + 1000)), "msg_w")
    with pytest.raises(StoreError, match="not there yet"):  # 503: Svix retries
        processor.process(*membership)
    with engine.begin() as conn:  # the app's hook makes the workspace
        conn.execute(workspaces.insert().values(org="org_w"))
    assert processor.process(*membership).status == "applied"
    assert _scalar(store, "SELECT count(*) FROM fkw_seats") == 1
    store.dispose()
    engine.dispose()


def test_a_mapping_naming_a_missing_column_never_holds_back_a_ban(db_url: str) -> None:
    """PostgreSQL built the one-statement projection outside the refusal guard: a mapped column the table
    lacks raised KeyError there, the delivery was stored failed and its ban not applied (SQLite and
    MariaDB applied it). Now every store applies the ban and notes the app table's refusal."""
    nicks = sa.Table("short_nicks", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True))
    store, engine = _with_app_table(db_url, nicks, SchemaMapping(users=MappedTable(
        "short_nicks", "clerk_user_id", {})))
    store.dispose()
    store = Store.from_url(db_url, mapping=SchemaMapping(users=MappedTable(
        "short_nicks", "clerk_user_id", {"nick": Column("unsafe_metadata.nick")})))
    assert deliver(store, f.envelope("user.created", f.user("user_m", B + 1000, banned=True))) == ["applied"]
    assert _scalar(store, "SELECT banned FROM users WHERE clerk_id = 'user_m'") in (True, 1)
    assert "the app's table refused" in _scalar(store, "SELECT last_error FROM webhook_events")
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.postgres
def test_a_deferred_constraint_is_checked_at_once_in_any_mapped_transaction(db_url: str) -> None:
    """Store.run checked the app's DEFERRABLE constraints at each statement, a plain Store.transaction()
    (a reconcile page, an admin write) did not: the refusal came at COMMIT and rolled the whole page
    back, every run. Now it is the row's refusal there too, and the other users of the page commit."""
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE profiles (clerk_user_id varchar(64) UNIQUE, email text, deleted_at timestamptz, "
            "CONSTRAINT uq_profiles_email UNIQUE (email) DEFERRABLE INITIALLY DEFERRED)")
        conn.exec_driver_sql("INSERT INTO profiles (email) VALUES ('taken@example.com')")
    engine.dispose()
    store = Store.from_url(db_url, mapping=SchemaMapping(users=MappedTable(
        "profiles", "clerk_user_id", {"email": "email"}, on_delete=SoftDelete("deleted_at"))))
    with store.transaction() as writer:  # as a reconcile page writes
        for n, email in enumerate(["a@example.com", "taken@example.com"]):
            writer.apply(Upsert(Entity.USER, user_record(f.user(f"user_d{n}", B + 1000, email=email))))
        refused = list(writer.refused)
    assert len(refused) == 1 and "uq_profiles_email" in refused[0]
    assert _scalar(store, "SELECT count(*) FROM users") == 2
    store.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.postgres
def test_link_by_external_id_matches_a_uuid_id_column(db_url: str) -> None:
    """The app's id column is a uuid: the external id (a string) never matched it. Converted now; an
    external id that is no uuid matches nothing (a row of its own), without an error."""
    legacy = sa.Table("uuid_accounts", sa.MetaData(),
                      sa.Column("id", sa.Uuid, primary_key=True, server_default=sa.text("gen_random_uuid()")),
                      sa.Column("email", sa.String(200)))
    mapping = SchemaMapping(users=MappedTable("uuid_accounts", "clerk_user_id", {"email": "email"},
                                              link_by_external_id="id"))
    store, engine = _with_app_table(db_url, legacy, mapping)
    known = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(legacy.insert().values(id=known, email="legacy@example.com"))
    linked, other = f.user("user_u1", B + 1000), f.user("user_u2", B + 1000)
    linked["external_id"], other["external_id"] = str(known).upper(), "not-a-uuid"
    assert deliver(store, f.envelope("user.created", linked), f.envelope("user.created", other)) == ["applied"] * 2
    with engine.connect() as conn:
        rows = {r[1]: r[0] for r in conn.execute(sa.text("SELECT id, clerk_user_id FROM uuid_accounts"))}
    assert len(rows) == 2 and rows["user_u1"] == known
    store.dispose()
    engine.dispose()


def test_backfill_writes_what_it_can_and_keeps_the_first_deletion_time(db_url: str) -> None:
    """One row the app's table refused rolled the whole backfill back; each row is its own now (a value of the
    user's the table refuses: written without the user's columns, counted as kept back). A soft-deleted row's
    deleted_at was rewritten by every run; it keeps the first now."""
    names = sa.Table("bf_names", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("first", sa.String(64)),
                     sa.Column("deleted_at", sa.DateTime(timezone=True)),
                     sa.CheckConstraint("first <> 'Bad'", name="ck_bf_names_first"))
    plain = Store.from_url(db_url)
    deliver(plain, f.envelope("user.created", f.user("user_b1", B + 1000, first_name="Bad")),
            f.envelope("user.created", f.user("user_b2", B + 1000, first_name="Ada")),
            f.envelope("user.created", f.user("user_b3", B + 1000, first_name="Bo")),
            f.envelope("user.deleted", f.deleted("user", "user_b3"), B + 2000))
    plain.dispose()
    mapping = SchemaMapping(users=MappedTable("bf_names", "clerk_user_id", {"first": "first_name"}))
    store, engine = _with_app_table(db_url, names, mapping)
    with engine.begin() as conn:
        conn.execute(names.insert().values(clerk_user_id="user_b3", first="Bo"))
    first = datetime(2030, 1, 1, tzinfo=UTC)
    for n in range(2):
        at = first + timedelta(days=n)
        assert mapping.backfill(Store(store.engine, now=lambda at=at: at)) == {"users": 3, "kept_back": 1}
    with engine.connect() as conn:
        rows = {r[0]: (r[1], r[2]) for r in conn.execute(sa.select(names.c.clerk_user_id, names.c.first,
                                                                   names.c.deleted_at))}
    assert set(rows) == {"user_b1", "user_b2", "user_b3"} and rows["user_b2"] == ("Ada", None)
    assert rows["user_b1"] == (None, None)  # the name the CHECK refused left out
    assert rows["user_b3"][1] is not None and rows["user_b3"][1].replace(tzinfo=UTC).day == 1
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.postgres
def test_a_boolean_written_as_text_is_refused_batched_and_alone_alike(db_url: str) -> None:
    """PostgreSQL's batches passed ``"true"`` from metadata to a Boolean column (cast there), where a
    delivery alone (SQLAlchemy's Boolean), SQLite and MariaDB refused it: the app's row depended on how
    busy the endpoint was. Refused on both paths now; the contract row (the ban) applies either way."""
    flags = sa.Table("text_flags", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("flag", sa.Boolean))
    mapping = SchemaMapping(users=MappedTable("text_flags", "clerk_user_id", {"flag": Column("unsafe_metadata.flag")}))
    store, engine = _with_app_table(db_url, flags, mapping)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))

    def event(n: int) -> tuple[str, Any]:
        body = f.user(f"user_f{n}", B + 1000, banned=True)
        body["unsafe_metadata"] = {"flag": "true"}
        return f"msg_f{n}", parse_envelope(json.dumps(f.envelope("user.created", body)))

    batched = [event(1), event(2)]
    outcomes = [processor.apply_alone(*batched[i]) if r is ALONE else r
                for i, r in enumerate(GroupCommitter(processor).write(batched))]
    outcomes.append(processor.apply_alone(*event(3)))
    assert [o.status for o in outcomes] == ["applied"] * 3
    assert all("the app's table refused" in (o.error or "") for o in outcomes), outcomes
    assert _scalar(store, "SELECT count(*) FROM users WHERE banned") == 3
    with engine.connect() as conn:
        # written again without the user's own column (the flag): NULL there, the same batched and alone
        assert conn.execute(sa.select(flags.c.flag)).all() == [(None,)] * 3
    store.dispose()
    engine.dispose()


def test_the_doctor_folds_link_e_mails_as_linking_does(db_url: str) -> None:
    """SQLite's lower() folds ASCII only: the doctor missed ``ÉLODIE@`` and ``élodie@`` shared by two rows
    without a Clerk id, which linking (Python's lower()) finds ambiguous."""
    legacy = sa.Table("doctor_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("email", sa.String(200)))
    mapping = SchemaMapping(users=MappedTable("doctor_accounts", "clerk_user_id", {"email": "email"},
                                              link_by_email="email"))
    store, engine = _with_app_table(db_url, legacy, mapping)
    with engine.begin() as conn:
        conn.execute(legacy.insert(), [{"id": 1, "email": "ÉLODIE@Example.com"}, {"id": 2, "email": "élodie@example.com"}])
        problems = [p for _, p in check_schema(conn, mapping)]
    assert any("1 e-mail value(s) are shared" in p for p in problems), problems
    store.dispose()
    engine.dispose()


def test_what_the_app_table_refuses_to_clear_is_reported_and_audited(db_url: str) -> None:
    """The erasure of clerk-sync's rows holds when the app's table refuses its cleared values (a CHECK
    here); what is left for the app to clear is in the report, the audit row and the CLI's warning."""
    from clerk_sync.tables import audit_log

    engine = sa.create_engine(db_url)
    meta = sa.MetaData()
    checked = sa.Table("checked_accounts", meta, sa.Column("id", sa.Integer, primary_key=True),
                       sa.Column("clerk_user_id", sa.String(64), unique=True),
                       sa.Column("email", sa.String(320), nullable=False), sa.Column("first", sa.String(100)),
                       sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
                       sa.CheckConstraint("email LIKE '%@example.com'", name="ck_checked_accounts_email"))
    meta.create_all(engine)
    mapping = SchemaMapping(users=MappedTable("checked_accounts", "clerk_user_id",
                                              {"email": "email", "first": "first_name"},
                                              on_delete=Deactivate("active")))
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_c", B + 1000, email="c@example.com"))) == ["applied"]
    report = Retention(store).erase_user("user_c", reason="GDPR request")
    assert len(report.mapped_refused) == 1 and "checked_accounts refused clearing" in report.mapped_refused[0]
    assert "c@example.com" not in report.mapped_refused[0]
    with store.connect() as conn:
        details = conn.execute(sa.select(audit_log.c.details).where(audit_log.c.action == "user.erased")).scalar_one()
        # the e-mail is the app's to clear; the name, which the table takes, is cleared (one column at a time)
        assert tuple(conn.execute(sa.select(checked.c.email, checked.c.first)).one()) == ("c@example.com", None)
    assert (json.loads(details) if isinstance(details, str) else details)["mapped_refused"] == list(report.mapped_refused)
    assert _scalar(store, "SELECT email FROM users WHERE clerk_id = 'user_c'") is None  # clerk-sync's erased
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("db_url", ["mariadb"], indirect=True)
def test_exact_linking_by_external_id_still_uses_the_columns_index(db_url: str) -> None:
    """A gap in the fix above: comparing only the binary casts made MariaDB scan the whole app table for
    every new Clerk user (EXPLAIN: type ALL); the plain equality comes first now, so the index serves it."""
    legacy = sa.Table("ix_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("legacy_id", sa.String(64), index=True), sa.Column("email", sa.String(200)),
                      mysql_charset="utf8mb4", mysql_collate="utf8mb4_general_ci")
    mapping = SchemaMapping(users=MappedTable("ix_accounts", "clerk_user_id", {"email": "email"},
                                              link_by_external_id="legacy_id"))
    store, engine = _with_app_table(db_url, legacy, mapping)
    with engine.begin() as conn:
        conn.execute(legacy.insert(), [{"id": i, "legacy_id": f"L-{i}", "email": f"u{i}@example.com"}
                                       for i in range(1, 2001)])
        conn.exec_driver_sql("ANALYZE TABLE ix_accounts")
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "ix_accounts" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    linked = f.user("user_l7", B + 1000, email="new@example.com")
    linked["external_id"] = "L-7"
    assert deliver(store, f.envelope("user.created", linked)) == ["applied"]
    sa.event.remove(store.engine, "before_cursor_execute", capture)
    lookups = [(sql, params) for sql, params in seen if "legacy_id" in sql]
    assert lookups, seen
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT clerk_user_id FROM ix_accounts WHERE id = 7")).scalar_one() == "user_l7"
        raw = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        for sql, params in lookups:
            raw.execute("EXPLAIN " + sql, params)
            columns = [d[0] for d in raw.description]
            plans = [dict(zip(columns, row, strict=True)) for row in raw.fetchall()]
            assert all(p["type"] != "ALL" for p in plans if p["table"] == "ix_accounts"), plans
    store.dispose()
    engine.dispose()


def test_erasing_two_users_clears_a_unique_not_null_e_mail_to_values_of_their_own(db_url: str) -> None:
    """A gap in the fix above: a UNIQUE NOT NULL e-mail (a custom user model's) was cleared to "" for the
    first erased user, and the second's erasure was refused (the same ""), so their address stayed. Each
    gets a placeholder of their own now (an address at the reserved .invalid domain)."""
    engine = sa.create_engine(db_url)
    meta = sa.MetaData()
    accounts = sa.Table("uq_accounts", meta, sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("clerk_user_id", sa.String(64), unique=True),
                        sa.Column("email", sa.String(320), nullable=False, unique=True),
                        sa.Column("first", sa.String(100)),
                        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()))
    meta.create_all(engine)
    mapping = SchemaMapping(users=MappedTable("uq_accounts", "clerk_user_id",
                                              {"email": "email", "first": "first_name"},
                                              on_delete=Deactivate("active")))
    with engine.connect() as conn:
        assert [p for p in check_schema(conn, mapping) if p[0] == "fail"] == []
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_a", B + 1000, email="a@example.com")),
                   f.envelope("user.created", f.user("user_b", B + 1000, email="b@example.com"))) == ["applied"] * 2
    reports = [Retention(store).erase_user(user) for user in ("user_a", "user_b")]
    assert [r.mapped_refused for r in reports] == [(), ()]
    with engine.connect() as conn:
        rows = conn.execute(sa.select(accounts.c.clerk_user_id, accounts.c.email, accounts.c.first)
                            .order_by(accounts.c.clerk_user_id)).all()
    assert [(r.clerk_user_id, r.first) for r in rows] == [("user_a", None), ("user_b", None)]
    emails = [r.email for r in rows]
    assert len(set(emails)) == 2 and all(e.startswith("erased-") and e.endswith("@erased.invalid") for e in emails)
    assert not any("example.com" in e for e in emails)
    store.dispose()
    engine.dispose()


def test_a_backfill_a_sqlite_trigger_rolls_back_says_so_and_counts_nothing_written(tmp_path: Any) -> None:
    """A gap in the backfill fix: a trigger's RAISE(ROLLBACK) ended the whole transaction, and the rows
    before it were lost while counted as written; it is an AppTableRolledBack now."""
    from clerk_sync.mapping import AppTableRolledBack

    url = f"sqlite:///{tmp_path}/b.db"
    store = Store.from_url(url)
    from clerk_sync import migrations
    migrations.upgrade(store.engine)
    assert deliver(store, *[f.envelope("user.created", f.user(f"user_{i}", B + 1000, first_name=name))
                            for i, name in enumerate(["Ada", "Bad", "Cy"])]) == ["applied"] * 3
    store.dispose()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE tr_accounts (id INTEGER PRIMARY KEY, clerk_user_id VARCHAR(64) UNIQUE, "
                             "first VARCHAR(100), deleted_at TIMESTAMP)")
        conn.exec_driver_sql("CREATE TRIGGER no_bad BEFORE INSERT ON tr_accounts WHEN NEW.first = 'Bad' "
                             "BEGIN SELECT RAISE(ROLLBACK, 'no Bad'); END")
    mapping = SchemaMapping(users=MappedTable("tr_accounts", "clerk_user_id", {"first": "first_name"}))
    with pytest.raises(AppTableRolledBack, match="RAISE"):
        mapping.backfill(Store(engine))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM tr_accounts").scalar_one() == 0
    engine.dispose()


def test_an_inline_or_expression_unique_e_mail_is_erased_to_placeholders_too(db_url: str) -> None:
    """A gap in the placeholder fix: SQLAlchemy reflects no inline ``UNIQUE`` on SQLite (Django's DDL) and
    no expression index (``lower(email)``), so the second erased user's "" was refused there and the doctor
    said the Clerk-id column had no unique index. Both are seen (or retried with the placeholder) now."""
    engine = sa.create_engine(db_url)
    pk = {"sqlite": "INTEGER PRIMARY KEY", "postgresql": "SERIAL PRIMARY KEY"}.get(engine.dialect.name,
                                                                                 "INTEGER AUTO_INCREMENT PRIMARY KEY")
    with engine.begin() as conn:  # as Django writes them: UNIQUE inline
        conn.exec_driver_sql(f"CREATE TABLE dj_accounts (id {pk}, clerk_user_id VARCHAR(64) NULL UNIQUE, "
                             "email VARCHAR(254) NOT NULL UNIQUE, active BOOLEAN NOT NULL DEFAULT TRUE)")
        conn.exec_driver_sql(f"CREATE TABLE ex_accounts (id {pk}, clerk_user_id VARCHAR(64) NULL UNIQUE, "
                             "email VARCHAR(254) NOT NULL, active BOOLEAN NOT NULL DEFAULT TRUE)")
        if engine.dialect.name != "mysql":  # (MariaDB has no expression indexes)
            conn.exec_driver_sql("CREATE UNIQUE INDEX ex_accounts_email_lower ON ex_accounts (lower(email))")
    tables = ["dj_accounts"] + (["ex_accounts"] if engine.dialect.name != "mysql" else [])
    for name in tables:
        mapping = SchemaMapping(users=MappedTable(name, "clerk_user_id", {"email": "email"},
                                                 on_delete=Deactivate("active")))
        with engine.connect() as conn:
            assert [p for p in check_schema(conn, mapping) if p[0] == "fail"] == [], name
        store = Store.from_url(db_url, mapping=mapping)
        a, b = f"user_{name}_a", f"user_{name}_b"
        assert deliver(store, f.envelope("user.created", f.user(a, B + 1000, email=f"a@{name}.example.com")),
                       f.envelope("user.created", f.user(b, B + 1000, email=f"b@{name}.example.com"))) == ["applied"] * 2
        assert [Retention(store).erase_user(u).mapped_refused for u in (a, b)] == [(), ()], name
        with engine.connect() as conn:
            emails = conn.execute(sa.select(sa.table(name, sa.column("email")).c.email)).scalars().all()
        assert len(set(emails)) == 2 and not any("example.com" in e for e in emails), (name, emails)
        store.dispose()
    engine.dispose()


def test_a_backfill_that_meets_a_deadlock_fails_whole_not_as_a_refused_row(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: on MySQL a deadlock rolls the whole transaction back; the backfill counted it as one
    refused row and went on, earlier rows lost but counted as written. A deadlock or lock wait (or a lost
    connection) is a StoreError now: the backfill is run again."""
    from clerk_sync import migrations
    from clerk_sync.errors import StoreDataError, StoreError

    url = f"sqlite:///{tmp_path}/d.db"
    store = Store.from_url(url)
    migrations.upgrade(store.engine)
    assert deliver(store, *[f.envelope("user.created", f.user(f"user_{i}", B + 1000)) for i in range(3)]) == ["applied"] * 3
    store.dispose()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE dl_accounts (id INTEGER PRIMARY KEY, clerk_user_id VARCHAR(64) UNIQUE, "
                             "first VARCHAR(100))")
    mapping = SchemaMapping(users=MappedTable("dl_accounts", "clerk_user_id", {"first": "first_name"}))

    class Deadlock(Exception):
        pass

    def project(self: SchemaMapping, conn: Any, now: Any, change: Any, **_: Any) -> None:
        if change.clerk_id == "user_1":
            raise sa.exc.OperationalError("UPDATE dl_accounts ..", {}, Deadlock(1213, "Deadlock found"))

    monkeypatch.setattr(SchemaMapping, "project", project)
    with pytest.raises(StoreError, match="deadlock") as failed:
        mapping.backfill(Store(engine))
    assert not isinstance(failed.value, StoreDataError)

    def savepoint_gone(self: SchemaMapping, conn: Any, now: Any, change: Any, **_: Any) -> None:
        """As on a real MariaDB: the deadlock rolled the savepoint back with the transaction,
        so leaving begin_nested() fails on ROLLBACK TO SAVEPOINT, the deadlock only in the context."""
        if change.clerk_id == "user_1":
            try:
                raise sa.exc.OperationalError("UPDATE dl_accounts ..", {}, Deadlock(1213, "Deadlock found"))
            except sa.exc.OperationalError:
                raise sa.exc.OperationalError("ROLLBACK TO SAVEPOINT sa_savepoint_1", {},
                                              Deadlock(1305, "SAVEPOINT sa_savepoint_1 does not exist")) from None

    monkeypatch.setattr(SchemaMapping, "project", savepoint_gone)
    with pytest.raises(StoreError) as failed:
        mapping.backfill(Store(engine))
    assert not isinstance(failed.value, StoreDataError)
    engine.dispose()


def test_the_doctor_says_linking_by_email_reads_a_large_table_whole_on_mariadb(db_url: str) -> None:
    """MariaDB: linking by e-mail compares lower() of the column as bytes, which no index serves (under
    utf8mb4_bin too, where only the _ci warning said so before): the doctor says every new user's lookup
    reads the table once it is large. SQLite and PostgreSQL (an index on lower(email) serves it) never do."""
    legacy = sa.Table("bin_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("email", sa.String(200), index=True),
                      mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin")
    mapping = SchemaMapping(users=MappedTable("bin_accounts", "clerk_user_id", {"email": "email"},
                                              link_by_email="email"))
    store, engine = _with_app_table(db_url, legacy, mapping)

    def scan_warnings() -> list[str]:
        with engine.connect() as conn:
            return [p for _, p in check_schema(conn, mapping) if "reads every row" in p]

    with engine.begin() as conn:
        conn.execute(legacy.insert(), [{"email": f"u{n}@example.com"} for n in range(50)])
    assert scan_warnings() == []  # a small table: nothing to say
    if store.dialect == "mysql":
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO bin_accounts (email) SELECT CONCAT('v', seq, '@example.com') "
                                 "FROM seq_1_to_60000")
            conn.exec_driver_sql("ANALYZE TABLE bin_accounts")
        (warning,) = scan_warnings()
        assert warning.startswith("bin_accounts.email: linking by e-mail reads every row of bin_accounts (about ")
        assert warning.endswith("its exact comparison after lower() uses no index"), warning
    store.dispose()
    engine.dispose()
