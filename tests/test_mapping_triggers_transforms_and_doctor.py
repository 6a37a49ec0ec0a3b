"""The mapped tables, each once broken: an app trigger's refusal (PostgreSQL RAISE EXCEPTION,
MariaDB SIGNAL), a partial unique index on SQLite, the ``int`` and ``bool`` transforms, the delete-policy
column on updates, what the doctor misses (NOT NULL sources that can be empty, a primary key without a
database default, a narrow Clerk-id column), migrate under the service's statement bound, and a naive
timestamp on PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import ALONE, GroupCommitter
from clerk_sync.mapping import Column, Deactivate, MappedTable, SchemaMapping, SoftDelete
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table

# An app trigger that refuses a row, as each store spells it: none of these is an integrity error on
# PostgreSQL (P0001) or MariaDB (1644), which were taken for passing failures (503 on every retry).
_TRIGGERS = {
    "sqlite": ["CREATE TRIGGER no_blocked BEFORE INSERT ON guarded WHEN NEW.email LIKE 'blocked%' "
               "BEGIN SELECT RAISE(ABORT, 'blocked domain'); END",
               "CREATE TRIGGER no_blocked_u BEFORE UPDATE ON guarded WHEN NEW.email LIKE 'blocked%' "
               "BEGIN SELECT RAISE(ABORT, 'blocked domain'); END"],
    "postgresql": ["CREATE FUNCTION no_blocked() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "IF NEW.email LIKE 'blocked%%' THEN RAISE EXCEPTION 'blocked domain'; END IF; RETURN NEW; END $$",
                   "CREATE TRIGGER no_blocked BEFORE INSERT OR UPDATE ON guarded FOR EACH ROW "
                   "EXECUTE FUNCTION no_blocked()"],
    "mysql": [f"CREATE TRIGGER no_blocked{suffix} BEFORE {op} ON guarded FOR EACH ROW IF NEW.email LIKE "
              "'blocked%%' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'blocked domain'; END IF"
              for suffix, op in (("", "INSERT"), ("_u", "UPDATE"))],
}


def _refused(store: Any) -> list[bool]:
    """Per delivery in the order written: whether its ``last_error`` says the app's table refused its row."""
    with store.connect() as conn:
        errors = conn.execute(sa.text("SELECT last_error FROM webhook_events ORDER BY id")).scalars().all()
    return ["the app's table refused" in (e or "") and "blocked domain" in (e or "") for e in errors]


def test_an_app_triggers_refusal_holds_back_no_role_or_ban_alone_or_batched(db_url: str) -> None:
    """Fixed: a trigger of the app's table that refuses a row (PL/pgSQL ``RAISE EXCEPTION``, MariaDB
    ``SIGNAL SQLSTATE '45000'``) was classed as a passing failure: 503 on every retry, the role and the ban
    never written. Any error the database gives inside the mapped row's savepoint is that row's refusal now,
    unless it is the connection's, a bounded wait's, a deadlock's or the server's; in a PostgreSQL batch the
    wave statement fails whole, and the batch written again one delivery at a time ends the same way."""
    guarded = sa.Table("guarded", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                       sa.Column("email", sa.String(320)))
    mapping = SchemaMapping(users=MappedTable("guarded", "clerk_user_id", {"email": "email"}))
    store, engine = _with_app_table(db_url, guarded, mapping)
    with engine.begin() as conn:
        for sql in _TRIGGERS[store.dialect]:
            conn.exec_driver_sql(sql)
    alone = f.user("user_g1", B + 1000, email="blocked@example.com", role="admin")
    ok_then_blocked = f.user("user_g2", B + 1000, email="fine@example.com")
    blocked_update = f.user("user_g2", B + 2000, email="blocked@example.com", banned=True)
    assert deliver(store, f.envelope("user.created", alone), f.envelope("user.created", ok_then_blocked),
                   f.envelope("user.updated", blocked_update)) == ["applied"] * 3

    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    batch = [(f"msg_b{n}", parse_envelope(json.dumps(f.envelope("user.created", f.user(
        f"user_b{n}", B + 1000, email=email, role="admin"))))) for n, email in
        enumerate(["a@example.com", "blocked@example.com", "b@example.com"])]
    committer = GroupCommitter(processor)
    results = [processor.apply_alone(*batch[i]) if r is ALONE else r for i, r in enumerate(committer.write(batch))]
    assert [getattr(r, "status", r) for r in results] == ["applied"] * 3
    if store.dialect == "postgresql":  # the wave statement failed, and the batch was written again
        assert committer.retried == 1

    with store.connect() as conn:
        rows = {r[0]: (r[1], r[2]) for r in conn.execute(sa.text("SELECT clerk_id, role, banned FROM users"))}
    assert rows["user_g1"][0] == "admin" and rows["user_g2"][1] in (True, 1)
    assert {r for r, (role, _) in rows.items() if role == "admin"} == {"user_g1", "user_b0", "user_b1", "user_b2"}
    assert _refused(store) == [True, False, True, False, True, False]  # user_g1, g2, g2's update; then b0..2
    with engine.connect() as conn:
        emails = set(conn.execute(sa.select(guarded.c.email, sa.column("clerk_user_id")).select_from(guarded)).all())
    # the rows the trigger refused are written again without the user's own columns (the e-mail): NULL there,
    # and user_g2's keeps its earlier address
    assert emails == {("fine@example.com", "user_g2"), ("a@example.com", "user_b0"), ("b@example.com", "user_b2"),
                      (None, "user_g1"), (None, "user_b1")}
    store.dispose()
    engine.dispose()


def test_only_the_databases_passing_state_is_retried_inside_the_mapped_savepoint() -> None:
    """What :func:`passing_cause` retries (the unit of work fails, 503) and what it leaves to the row's
    refusal: a trigger's error, on either server, is the row's; a bounded wait, a deadlock, a cancelled
    statement, a full disk, a lost connection and a savepoint a deadlock took with it are not."""
    import MySQLdb
    import psycopg

    from clerk_sync._db_errors import passing_cause

    def pg(sqlstate: str) -> sa.exc.DBAPIError:
        return sa.exc.OperationalError("UPDATE ..", {}, psycopg.errors.lookup(sqlstate)())

    def my(errno: int, message: str = "") -> sa.exc.DBAPIError:
        return sa.exc.OperationalError("UPDATE ..", {}, MySQLdb.OperationalError(errno, message))

    assert passing_cause(pg("P0001")) is None and passing_cause(my(1644, "blocked domain")) is None
    assert passing_cause(pg("23505")) is None and passing_cause(my(4025)) is None
    for state in ("55P03", "57014", "40P01", "40001", "25P02", "53100", "57P01", "08006", "42P01"):
        assert passing_cause(pg(state)) is not None, state
    for errno in (1205, 1213, 1969, 1021, 1146):
        assert passing_cause(my(errno)) is not None, errno
    full = sa.exc.OperationalError("UPDATE ..", {}, sqlite3.OperationalError("database or disk is full"))
    aborted = sa.exc.IntegrityError("UPDATE ..", {}, sqlite3.IntegrityError("blocked domain"))
    assert passing_cause(full) is full and passing_cause(aborted) is None
    assert passing_cause(my(1305, "SAVEPOINT sa_savepoint_1 does not exist")) is not None
    leaving = my(1064, "ROLLBACK TO SAVEPOINT ..")  # the chain is read: what leaving the savepoint met, its cause
    leaving.__context__ = pg("40P01")
    assert passing_cause(leaving) is leaving.__context__
    lost = sa.exc.OperationalError("UPDATE ..", {}, psycopg.OperationalError("server closed the connection"),
                                   connection_invalidated=True)
    assert passing_cause(lost) is lost


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_partial_unique_clerk_id_index_takes_the_row_by_row_path_and_the_doctor_says_so(db_url: str) -> None:
    """Fixed: with a partial unique index on the Clerk-id column (``WHERE clerk_user_id IS NOT NULL``,
    Django's ``UniqueConstraint(condition=...)``) SQLite's prebuilt ``ON CONFLICT (clerk_user_id) DO UPDATE``
    failed every delivery (only PostgreSQL's predicate was read). Both stores read it now and write such a
    table row by row; the doctor warns that a plain unique index is faster. (MariaDB has no partial index.)"""
    from clerk_sync.mapping import check_schema
    from clerk_sync.store import Store

    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        pk = "SERIAL PRIMARY KEY" if conn.dialect.name == "postgresql" else "INTEGER PRIMARY KEY"
        conn.exec_driver_sql(f"CREATE TABLE acc_p (id {pk}, email TEXT, clerk_user_id VARCHAR(64), deleted_at TIMESTAMP)")
        conn.exec_driver_sql("CREATE UNIQUE INDEX acc_p_clerk ON acc_p (clerk_user_id) WHERE clerk_user_id IS NOT NULL")
        conn.exec_driver_sql("INSERT INTO acc_p (email) VALUES ('app@example.com'), ('own@example.com')")
    mapping = SchemaMapping(users=MappedTable("acc_p", "clerk_user_id", {"email": "email"}))
    with engine.connect() as conn:
        problems = check_schema(conn, mapping)
    assert [s for s, _ in problems] == ["warn"] and "unique only through a partial index" in problems[0][1]
    assert "CREATE UNIQUE INDEX uq_acc_p_clerk_user_id ON acc_p (clerk_user_id)" in problems[0][1]
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_p", B)),
                   f.envelope("user.updated", f.user("user_p", B + 1, email="new@example.com"))) == ["applied"] * 2
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT email, clerk_user_id FROM acc_p ORDER BY id")).all()
        errors = conn.execute(sa.text("SELECT last_error FROM webhook_events")).scalars().all()
    assert [tuple(r) for r in rows] == [("app@example.com", None), ("own@example.com", None), ("new@example.com", "user_p")]
    assert errors == [None, None]
    store.dispose()
    engine.dispose()


def test_the_int_and_bool_transforms_are_total() -> None:
    """Fixed: ``int`` raised ValueError on texts ``str.isdigit`` lets through ("--5", "²") and on
    more than 4,300 digits, and ``bool`` made True of "false" and "0". Both give None for what is not one."""
    from clerk_sync.mapping import TRANSFORMS, Column

    as_int, as_bool = TRANSFORMS["int"], TRANSFORMS["bool"]
    assert [as_int(v) for v in ("--5", "²", "٣", "1.5", "1" * 5000, "9" * 19, 2**63, 5.0, True, [], {"a": 1})] == [
        None] * 11
    assert [as_int(v) for v in ("42", " -7 ", "+3", 0, -(2**63), 2**63 - 1)] == [42, -7, 3, 0, -(2**63), 2**63 - 1]
    assert [as_bool(v) for v in ("false", "0", "no", "off", "", " FALSE ", 0, 0.0, False)] == [False] * 9
    assert [as_bool(v) for v in ("true", "1", "yes", "on", "On", 1, 2, True)] == [True] * 8
    assert [as_bool(v) for v in ("maybe", "2", [], {}, [True])] == [None] * 5
    assert Column("unsafe_metadata.age", transform="int", default=0).value({"unsafe_metadata": {"age": "--5"}}) == 0


def test_a_user_writable_value_the_int_transform_cannot_read_leaves_the_role_current(db_url: str) -> None:
    """The row of a user who wrote "--5" (or "²", or 5,000 digits) into their ``unsafe_metadata`` was refused
    for good: the app's own role column kept "admin" after Clerk demoted them. The value is None now."""
    from clerk_sync.mapping import Column

    t = sa.Table("acc_int", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("role", sa.String(32)), sa.Column("age", sa.Integer), sa.Column("news", sa.Boolean))
    mapping = SchemaMapping(users=MappedTable("acc_int", "clerk_user_id", {
        "role": Column("public_metadata.role", default="member"),
        "age": Column("unsafe_metadata.age", transform="int"),
        "news": Column("unsafe_metadata.news", transform="bool")}))
    store, engine = _with_app_table(db_url, t, mapping)
    admin = f.user("user_i", B + 1000, role="admin")
    admin["unsafe_metadata"] = {"age": "41", "news": "true"}
    events = [f.envelope("user.created", admin)]
    for n, (age, news) in enumerate([("--5", "false"), ("²", "0"), ("1" * 5000, "off")], start=2):
        demoted = f.user("user_i", B + n * 1000, role="member" if n % 2 == 0 else "admin")
        demoted["unsafe_metadata"] = {"age": age, "news": news}
        events.append(f.envelope("user.updated", demoted))
    for event in events:
        assert deliver(store, event) == ["applied"]
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT role, age, news FROM acc_int WHERE clerk_user_id = 'user_i'")).one()
            error = conn.execute(sa.text("SELECT last_error FROM webhook_events ORDER BY id DESC")).scalars().first()
        user = event["data"]
        assert (row[0], error) == (user["public_metadata"]["role"], None)
        assert (row[1], row[2] in (True, 1)) == ((41, True) if event is events[0] else (None, False))
    store.dispose()
    engine.dispose()


def _naive_utc(value: Any) -> Any:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).replace(tzinfo=None) if value is not None and value.tzinfo else value


@pytest.mark.parametrize("policy", [Deactivate("is_active"), SoftDelete("deleted_at")], ids=lambda p: type(p).__name__)
def test_an_apps_own_deactivation_survives_the_users_next_profile_edit(db_url: str, policy: Any) -> None:
    """Fixed: every applied update wrote the delete policy's live value again (``is_active = TRUE``,
    ``deleted_at = NULL``), undoing the app's own suspension at the user's next profile edit, which the user
    can make themself. The live value goes with a new (or linked) row only; an update fills the column only
    where it holds nothing (``is_active`` NULL: added by migrate to rows already there). Alone, and in a
    PostgreSQL batch's wave statement; a deletion still sets the marker."""
    t = sa.Table("acc_d", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("first", sa.String(200)), sa.Column("is_active", sa.Boolean),
                 sa.Column("deleted_at", sa.DateTime(timezone=True)))
    mapping = SchemaMapping(users=MappedTable("acc_d", "clerk_user_id", {"first": "first_name"}, on_delete=policy))
    store, engine = _with_app_table(db_url, t, mapping)
    t = sa.Table("acc_d", sa.MetaData(), autoload_with=engine)  # (with the Clerk-id column migrate added)
    assert deliver(store, *[f.envelope("user.created", f.user(f"user_d{n}", B)) for n in (1, 2, 3)]) == ["applied"] * 3
    with engine.connect() as conn:
        created = conn.execute(sa.select(t.c.is_active, t.c.deleted_at)).all()
    assert created == [(True if isinstance(policy, Deactivate) else None, None)] * 3
    suspended = datetime(2026, 1, 1, 12, tzinfo=UTC)
    with engine.begin() as conn:  # the app suspends two users; the third row predates the policy column
        conn.execute(t.update().where(t.c.clerk_user_id.in_(["user_d1", "user_d2"])).values(
            is_active=False, deleted_at=suspended))
        conn.execute(t.update().where(t.c.clerk_user_id == "user_d3").values(is_active=None))
    assert deliver(store, f.envelope("user.updated", f.user("user_d1", B + 1, first_name="Eve"))) == ["applied"]
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    batch = [(f"msg_d{n}", parse_envelope(json.dumps(f.envelope("user.updated", f.user(
        f"user_d{n}", B + 1, first_name=name))))) for n, name in ((2, "Bob"), (3, "Cy"))]
    committer = GroupCommitter(processor)
    assert [getattr(r, "status", r) for r in committer.write(batch)] == ["applied"] * 2
    assert committer.retried == 0
    with engine.connect() as conn:
        rows = {r[0]: (r[1], r[2], _naive_utc(r[3])) for r in conn.execute(
            sa.select(t.c.clerk_user_id, t.c.first, t.c.is_active, t.c.deleted_at))}
    kept = _naive_utc(suspended)
    live = (True if isinstance(policy, Deactivate) else None, None)
    assert rows == {"user_d1": ("Eve", False, kept), "user_d2": ("Bob", False, kept), "user_d3": ("Cy", *live)}
    assert deliver(store, f.envelope("user.deleted", f.deleted("user", "user_d3"), B + 2)) == ["applied"]
    with engine.connect() as conn:
        gone = conn.execute(sa.select(t.c.is_active, t.c.deleted_at).where(t.c.clerk_user_id == "user_d3")).one()
    assert (gone[0] is False or gone[0] == 0) if isinstance(policy, Deactivate) else gone[1] is not None
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("policy", [Deactivate("is_active"), SoftDelete("deleted_at")], ids=lambda p: type(p).__name__)
def test_linking_keeps_the_apps_own_deactivation_of_the_legacy_row(db_url: str, policy: Any) -> None:
    """A gap in the fix above: linking still wrote the live value, so a legacy account the app had
    deactivated (or soft-deleted) was re-enabled by anyone signing up in Clerk with its e-mail. The row's
    policy column stays as the app left it; a NULL ``is_active`` gets the live value, as on update."""
    t = sa.Table("acc_l", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", sa.String(320)), sa.Column("is_active", sa.Boolean),
                 sa.Column("deleted_at", sa.DateTime(timezone=True)))
    mapping = SchemaMapping(users=MappedTable("acc_l", "clerk_user_id", {"email": "email"}, on_delete=policy,
                                              link_by_email="email"))
    store, engine = _with_app_table(db_url, t, mapping)
    suspended = datetime(2026, 1, 1, 12, tzinfo=UTC)
    with engine.begin() as conn:  # the app's own: one suspended account, one whose column predates the policy
        conn.execute(t.insert(), [{"email": "banned@example.com", "is_active": False, "deleted_at": suspended},
                                  {"email": "old@example.com", "is_active": None, "deleted_at": None}])
    assert deliver(store, *[f.envelope("user.created", f.user(uid, B, email=mail))
                            for uid, mail in (("user_b", "banned@example.com"), ("user_o", "old@example.com"))]) \
        == ["applied"] * 2
    t = sa.Table("acc_l", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        rows = {r[0]: (r[1], _naive_utc(r[2])) for r in conn.execute(
            sa.select(t.c.clerk_user_id, t.c.is_active, t.c.deleted_at))}
    live = True if isinstance(policy, Deactivate) else None
    assert rows == {"user_b": (False, _naive_utc(suspended)), "user_o": (live, None)}
    store.dispose()
    engine.dispose()


def test_a_policy_column_that_is_also_mapped_still_links(db_url: str) -> None:
    """A gap in the fix above: with the Deactivate column also a mapped Column, the link's UPDATE named it
    twice (TypeError) and the legacy row was never linked. A mapped flag is the mapping's, on a link as on
    every update (kept as the app left it at the link, the user's next update rewrote it anyway)."""
    t = sa.Table("acc_m", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", sa.String(320)), sa.Column("is_active", sa.Boolean))
    mapping = SchemaMapping(users=MappedTable("acc_m", "clerk_user_id", {
        "email": "email", "is_active": Column(compute=lambda values: True)}, on_delete=Deactivate("is_active"),
        link_by_email="email"))
    store, engine = _with_app_table(db_url, t, mapping)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"email": "a@example.com", "is_active": False}])
    assert deliver(store, f.envelope("user.created", f.user("user_a", B, email="a@example.com"))) == ["applied"]
    t = sa.Table("acc_m", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(sa.select(t.c.clerk_user_id, t.c.is_active))] == [("user_a", True)]
    store.dispose()
    engine.dispose()


def test_the_doctor_warns_of_a_not_null_column_whose_source_can_be_empty(db_url: str) -> None:
    """Fixed: the doctor said OK for Django's ``auth_user`` mapped with ``last_name`` and no default,
    and every user without a last name was refused at runtime. It warns now (a user with one is written), and
    fails a NOT NULL SoftDelete column, whose live value is NULL (every row refused)."""
    from clerk_sync.mapping import check_schema, migrate_schema
    from clerk_sync.store import Store
    from tests.test_mapping import django_meta
    from tests.test_mapping_linking_erasure_and_backfill import _django_mapping

    engine = sa.create_engine(db_url)
    django_meta.create_all(engine)
    mapping = _django_mapping()
    with engine.begin() as conn:
        migrate_schema(conn, mapping)
        problems = check_schema(conn, mapping)
        soft = SchemaMapping(users=MappedTable("auth_user", "clerk_id", {"username": "clerk_id"},
                                               on_delete=SoftDelete("date_joined")))
        soft_problems = check_schema(conn, soft)
    assert [(s, p.split(" ")[0]) for s, p in problems] == [("warn", "auth_user.last_name")]
    assert "Column('last_name', default=...)" in problems[0][1]
    assert ("fail", "auth_user.date_joined is NOT NULL, and a live row's deletion time is NULL: every new row is "
                    "refused; let the column be NULL") in soft_problems
    store = Store.from_url(db_url, mapping=mapping)
    nameless = f.user("user_nolast", B + 1000)
    nameless["last_name"] = None
    assert deliver(store, f.envelope("user.created", nameless), f.envelope("user.created", f.user("user_ln", B))) == [
        "applied"] * 2
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT username FROM auth_user")).scalars().all()
        errors = conn.execute(sa.text("SELECT last_error FROM webhook_events ORDER BY id")).scalars().all()
    assert rows == ["user_ln"] and "last_name" in errors[0] and errors[1] is None  # as the doctor said
    store.dispose()
    engine.dispose()


def test_the_doctor_fails_a_primary_key_the_database_gives_no_value(db_url: str) -> None:
    """Fixed: primary keys were left out of the doctor's NOT NULL check, so a key whose default is the
    app's code (Django's ``UUIDField(primary_key=True, default=uuid.uuid4)``) passed, and every new user was
    refused. It fails now, with the database default to give it; given it, rows are written."""
    from clerk_sync.mapping import check_schema

    t = sa.Table("acc_u", sa.MetaData(), sa.Column("id", sa.String(36), primary_key=True, nullable=False),
                 sa.Column("email", sa.String(200)))
    mapping = SchemaMapping(users=MappedTable("acc_u", "clerk_user_id", {"email": "email"}))
    store, engine = _with_app_table(db_url, t, mapping)
    with engine.connect() as conn:
        problems = check_schema(conn, mapping)
    assert [(s, p.split(" ")[0]) for s, p in problems] == [("fail", "acc_u.id")], problems
    assert "is the primary key and the database gives it no value" in problems[0][1]
    if store.dialect != "sqlite":  # (SQLite: a new table; the advice says so)
        fix = problems[0][1].split("give it a database default: ")[1]
        with engine.begin() as conn:
            conn.exec_driver_sql(fix)
        with engine.connect() as conn:
            assert check_schema(conn, mapping) == []
        assert deliver(store, f.envelope("user.created", f.user("user_u", B))) == ["applied"]
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM acc_u")).scalar_one() == 1
    store.dispose()
    engine.dispose()


def test_the_doctor_fails_a_clerk_id_column_too_narrow_for_clerks_ids(db_url: str) -> None:
    """Fixed: the doctor never read the Clerk-id column's width: a VARCHAR(32) (sized from user ids)
    passed, and every membership (``orgmem_`` ids are 34 characters) was refused on PostgreSQL and MariaDB.
    Too narrow for today's ids fails; narrower than clerk-sync's own 64 warns. SQLite enforces no length."""
    from clerk_sync.mapping import check_schema

    meta = sa.MetaData()
    sa.Table("tm32", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_membership_id", sa.String(32), unique=True), sa.Column("role", sa.String(64)))
    sa.Table("tu32", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("clerk_user_id", sa.String(32), unique=True))
    mapping = SchemaMapping(memberships=MappedTable("tm32", "clerk_membership_id", {"role": "role"}),
                            users=MappedTable("tu32", "clerk_user_id", {}))
    store, engine = _with_app_table(db_url, meta, mapping)
    with engine.connect() as conn:
        problems = check_schema(conn, mapping)
    if store.dialect == "sqlite":
        assert problems == []
    else:
        assert [(s, p.split(" ")[0]) for s, p in problems] == [
            ("warn", "tu32.clerk_user_id"), ("fail", "tm32.clerk_membership_id")], problems
        assert "(orgmem_...) have 34: every row is refused; widen it: ALTER TABLE tm32" in problems[1][1]
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_migrate_builds_the_unique_index_of_a_populated_table_past_the_services_statement_bound(
        db_url: str) -> None:
    """Fixed: ``clerk-sync migrate --mapping`` runs on the service's engine, whose statement bound
    (15 s by default) cut off the unique index built on a large app table. migrate_schema lifts it for its
    DDL and puts it back (shown here with a 10 ms bound and 200,000 rows)."""
    from clerk_sync.config import DatabaseTimeouts
    from clerk_sync.mapping import migrate_schema
    from clerk_sync.store import Store

    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("CREATE TABLE big (id serial PRIMARY KEY, email text, clerk_user_id varchar(64))")
            conn.exec_driver_sql("INSERT INTO big (email, clerk_user_id) SELECT 'u' || g || '@x', 'user_' || g "
                                 "FROM generate_series(1, 200000) g")
        else:
            conn.exec_driver_sql("CREATE TABLE big (id int AUTO_INCREMENT PRIMARY KEY, email text, "
                                 "clerk_user_id varchar(64))")
            conn.exec_driver_sql("INSERT INTO big (email, clerk_user_id) SELECT CONCAT('u', seq, '@x'), "
                                 "CONCAT('user_', seq) FROM seq_1_to_200000")
    engine.dispose()
    mapping = SchemaMapping(users=MappedTable("big", "clerk_user_id", {"email": "email"}))
    store = Store.from_url(db_url, timeouts=DatabaseTimeouts(statement_s=0.01))
    show = ("SHOW statement_timeout" if store.dialect == "postgresql" else "SELECT @@SESSION.max_statement_time")
    try:
        with store.engine.begin() as conn:  # as `clerk-sync migrate` does
            before = conn.exec_driver_sql(show).scalar()
            assert migrate_schema(conn, mapping) == ["added big.deleted_at", "created unique index uq_big_clerk_user_id"]
            assert conn.exec_driver_sql(show).scalar() == before  # the bound is back for what follows
    finally:
        store.dispose()


def test_a_naive_timestamp_policy_column_gets_utc_on_every_store(db_url: str) -> None:
    """Fixed: the deletion time went into an app's naive ``timestamp`` column as the PostgreSQL
    session's TimeZone wall time (an aware value converted by the server), where SQLite and MariaDB stored
    UTC's. It is bound as naive UTC for such a column now, whatever the server's TimeZone."""
    from clerk_sync.mapping import migrate_schema
    from clerk_sync.store import Store

    if db_url.startswith("postgresql"):  # a server whose TimeZone is not UTC (initdb takes the host's)
        assert "options=" in db_url
        db_url += "%20-ctimezone%3DAmerica%2FNew_York"
    t = sa.Table("acc_tz", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", sa.String(200)), sa.Column("deleted_at", sa.DateTime()))
    mapping = SchemaMapping(users=MappedTable("acc_tz", "clerk_user_id", {"email": "email"},
                                              on_delete=SoftDelete("deleted_at")))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        t.create(conn)
        migrate_schema(conn, mapping)
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_t", B)),
                   f.envelope("user.deleted", f.deleted("user", "user_t"), B + 1)) == ["applied"] * 2
    with engine.connect() as conn:
        contract = conn.execute(sa.text("SELECT deleted_at FROM users WHERE clerk_id = 'user_t'")).scalar_one()
        app = conn.execute(sa.text("SELECT deleted_at FROM acc_tz")).scalar_one()
    store.dispose()
    engine.dispose()
    assert abs((_naive_utc(app) - _naive_utc(contract)).total_seconds()) < 1, (contract, app)


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_a_lock_the_apps_row_is_held_under_still_fails_the_delivery_for_a_retry(db_url: str) -> None:
    """The other side of the trigger's refusal: a bounded wait that runs out inside the mapped row's savepoint
    (the app holds the row's lock) is the database's passing state, not the row's: the delivery fails whole
    (StoreError, 503) and Svix's retry applies it, the app's row included."""
    from clerk_sync.config import DatabaseTimeouts
    from clerk_sync.errors import StoreDataError, StoreError

    t = sa.Table("held", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", sa.String(320)))
    mapping = SchemaMapping(users=MappedTable("held", "clerk_user_id", {"email": "email"}))
    store, engine = _with_app_table(db_url, t, mapping, timeouts=DatabaseTimeouts(lock_s=0.2))
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    assert deliver(store, f.envelope("user.created", f.user("user_h", B))) == ["applied"]
    headers, body = f.signed(f.envelope("user.updated", f.user("user_h", B + 1, email="new@example.com")), "msg_h")
    with engine.connect() as holder:
        holder.execute(sa.text("SELECT id FROM held WHERE clerk_user_id = 'user_h' FOR UPDATE"))
        with pytest.raises(StoreError) as failed:
            processor.process(headers, body)
        holder.rollback()
    assert not isinstance(failed.value, StoreDataError) and "timeout" in str(failed.value)
    assert processor.process(headers, body).status == "applied"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT email FROM held")).scalar_one() == "new@example.com"
    store.dispose()
    engine.dispose()
