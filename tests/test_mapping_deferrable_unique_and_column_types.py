"""The mapped tables: a PostgreSQL DEFERRABLE unique constraint is no ON CONFLICT arbiter,
and the doctor compares a mapped source's type with its column's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from clerk_sync.mapping import TRANSFORMS, Column, MappedTable, SchemaMapping, check_schema, migrate_schema
from clerk_sync.store import Store
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table

POSTGRES_ONLY = pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                                        indirect=True)


def _rows(engine: sa.Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql)).all())


def _last_errors(engine: sa.Engine) -> list[Any]:
    return _rows(engine, "SELECT last_error FROM webhook_events")


# -- Bug A: a DEFERRABLE unique constraint on the Clerk-id column ------------------------------------

@POSTGRES_ONLY
@pytest.mark.parametrize("plain_beside", [False, True], ids=["alone", "plain-index-beside"])
def test_a_deferrable_unique_clerk_id_is_reported_and_rows_are_written(db_url: str, plain_beside: bool) -> None:
    """Django's ``UniqueConstraint(deferrable=Deferrable.DEFERRED)``: ON CONFLICT refuses it as an arbiter,
    and ``ON CONFLICT (col)`` infers it beside a plain unique index on the column too. The doctor warns with
    the statement that makes it NOT DEFERRABLE; migrate adds nothing (the column is unique); rows are written
    (an UPDATE, then an INSERT); once the constraint is made NOT DEFERRABLE, the doctor is quiet and the
    rows still are written (one upsert)."""
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE acc_def (id serial PRIMARY KEY, email varchar(320), clerk_user_id "
                             "varchar(64), deleted_at timestamptz, CONSTRAINT uq_acc_def UNIQUE (clerk_user_id) "
                             "DEFERRABLE INITIALLY DEFERRED)")
        if plain_beside:
            conn.exec_driver_sql("CREATE UNIQUE INDEX acc_def_plain ON acc_def (clerk_user_id)")
    mapping = SchemaMapping(users=MappedTable("acc_def", "clerk_user_id", {"email": "email"}))
    with engine.begin() as conn:
        problems = check_schema(conn, mapping)
        assert migrate_schema(conn, mapping) == []
    assert [severity for severity, _ in problems] == ["warn"], problems
    message = problems[0][1]
    assert "DEFERRABLE constraint uq_acc_def" in message and "ON CONFLICT" in message
    fix = message.split("NOT DEFERRABLE: ", 1)[1].split(" (Django", 1)[0]
    assert fix == ("ALTER TABLE acc_def DROP CONSTRAINT uq_acc_def, ADD CONSTRAINT uq_acc_def UNIQUE "
                   "(clerk_user_id)")

    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_d1", B + 1000)),
                   f.envelope("user.updated", f.user("user_d1", B + 2000, email="new@example.com")),
                   f.envelope("user.created", f.user("user_d2", B + 1000))) == ["applied"] * 3
    assert _last_errors(engine) == [(None,)] * 3
    assert sorted(_rows(engine, "SELECT clerk_user_id, email FROM acc_def")) == [
        ("user_d1", "new@example.com"), ("user_d2", "user_d2@example.com")]

    with engine.begin() as conn:  # the doctor's fix
        conn.exec_driver_sql(fix)
        assert check_schema(conn, mapping) == []
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.updated", f.user("user_d2", B + 2000, email="d2@example.com")),
                   f.envelope("user.created", f.user("user_d3", B + 1000))) == ["applied"] * 2
    assert _last_errors(engine) == [(None,)] * 5
    assert sorted(_rows(engine, "SELECT clerk_user_id, email FROM acc_def")) == [
        ("user_d1", "new@example.com"), ("user_d2", "d2@example.com"), ("user_d3", "user_d3@example.com")]


@POSTGRES_ONLY
def test_a_deferrable_constraint_elsewhere_keeps_target_less_on_conflict_out(db_url: str) -> None:
    """A Clerk-id column unique through a partial index (rows written with an INSERT .. ON CONFLICT DO NOTHING,
    then an UPDATE) and a DEFERRABLE unique constraint on another column: ON CONFLICT without a target takes
    every unique index as its arbiter, and refused the deferrable one, so every new row was refused."""
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE acc_def2 (id serial PRIMARY KEY, email varchar(320) UNIQUE DEFERRABLE, "
                             "clerk_user_id varchar(64), deleted_at timestamptz)")
        conn.exec_driver_sql("CREATE UNIQUE INDEX acc_def2_clerk ON acc_def2 (clerk_user_id) "
                             "WHERE clerk_user_id IS NOT NULL")
    mapping = SchemaMapping(users=MappedTable("acc_def2", "clerk_user_id", {"email": "email"}))
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_e1", B + 1000)),
                   f.envelope("user.updated", f.user("user_e1", B + 2000, email="e1@example.com"))) == ["applied"] * 2
    assert _last_errors(engine) == [(None,)] * 2
    assert _rows(engine, "SELECT clerk_user_id, email FROM acc_def2") == [("user_e1", "e1@example.com")]


# -- Bug B: a mapped source's type against its column's -----------------------------------------------

def test_b_doctor_fails_a_source_the_column_type_cannot_take(db_url: str) -> None:
    """``last_sign_in_at`` and ``clerk_created_at`` are epoch milliseconds (ints): in a date-time column
    SQLite and PostgreSQL refused every row and MariaDB stored '0170-00-00 00:00:00', the doctor saying OK.
    A text field in an integer column likewise. A metadata path (any JSON value) is not checked."""
    t = sa.Table("acc_ty", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", sa.String(320)), sa.Column("last_seen", sa.DateTime(timezone=True)),
                 sa.Column("created", sa.DateTime(timezone=True)), sa.Column("name_no", sa.Integer),
                 sa.Column("plan_until", sa.DateTime(timezone=True)))
    mapping = SchemaMapping(users=MappedTable("acc_ty", "clerk_user_id", {
        "email": "email", "last_seen": "last_sign_in_at", "created": "clerk_created_at",
        "name_no": "first_name", "plan_until": "public_metadata.plan_until"}))
    _, engine = _with_app_table(db_url, t, mapping)
    with engine.connect() as conn:
        problems = check_schema(conn, mapping)
    assert [severity for severity, _ in problems] == ["fail"] * 3, problems
    seen, created, name_no = (message for _, message in problems)
    assert seen.startswith("acc_ty.last_seen is ") and "'last_sign_in_at' gives an int, epoch milliseconds" in seen
    assert "BIGINT" in seen and "transform='timestamp'" in seen
    assert created.startswith("acc_ty.created is ") and "'clerk_created_at'" in created
    assert name_no.startswith("acc_ty.name_no is ") and "'first_name' gives a str" in name_no
    assert "text column" in name_no


def test_b_a_bigint_column_or_the_timestamp_transform_pass_and_write_the_value(db_url: str) -> None:
    """The two right mappings of an epoch-milliseconds field: as it is into a BIGINT column, or through the
    ``timestamp`` transform (an aware UTC datetime, exact to the millisecond) into a date-time column."""
    t = sa.Table("acc_ty2", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", sa.String(320)), sa.Column("last_seen_ms", sa.BigInteger),
                 sa.Column("last_seen", sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=3), "mysql",
                                                                                "mariadb")),  # (milliseconds)
                 sa.Column("created", sa.DateTime(timezone=True)))
    mapping = SchemaMapping(users=MappedTable("acc_ty2", "clerk_user_id", {
        "email": "email", "last_seen_ms": "last_sign_in_at",
        "last_seen": Column("last_sign_in_at", transform="timestamp"),
        "created": Column("clerk_created_at", transform="timestamp")}))
    store, engine = _with_app_table(db_url, t, mapping)
    with engine.connect() as conn:
        assert check_schema(conn, mapping) == []
    u = f.user("user_t1", B + 1000)
    u["last_sign_in_at"] = 1_700_000_000_123
    assert deliver(store, f.envelope("user.created", u)) == ["applied"]
    assert _last_errors(engine) == [(None,)]
    with engine.connect() as conn:  # (typed: SQLite's text read back as a datetime)
        [(ms, seen, created)] = conn.execute(sa.select(t.c.last_seen_ms, t.c.last_seen, t.c.created)).all()

    def utc(value: datetime) -> datetime:  # SQLite and MariaDB give it back naive (UTC), PostgreSQL aware
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    assert ms == 1_700_000_000_123
    assert utc(seen) == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert utc(created) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def test_b_the_timestamp_transform_is_total() -> None:
    timestamp = TRANSFORMS["timestamp"]
    assert timestamp(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert timestamp(-1) == datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    for value in (True, "1700000000000", 1.5, None, {}, 10**20, -(10**20)):
        assert timestamp(value) is None
