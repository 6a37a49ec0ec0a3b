"""The mapped tables (review): a true/false into a text column is one text on every store, and the doctor
fails a column that cannot take it, or a Clerk-id column that is not text."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from clerk_sync.mapping import Column, Deactivate, MappedTable, SchemaMapping, SoftDelete, check_schema
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table


def _accounts(name: str, flag: sa.types.TypeEngine[str]) -> sa.Table:
    return sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("banned", flag),
                    sa.Column("vip", sa.String(16)), sa.Column("deleted_at", sa.DateTime))


def test_a_true_or_false_into_a_text_column_is_the_same_text_on_every_store(db_url: str) -> None:
    """``banned`` and a metadata ``true`` into text columns: PostgreSQL wrote 'true', SQLite and MariaDB '1'
    (an app's `WHERE vip = '1'` broke on the move to PostgreSQL). 'true'/'false' everywhere now, as PostgreSQL's
    batched path and JSON write it."""
    mapping = SchemaMapping(users=MappedTable("acc_bt", "clerk_user_id", {"banned": "banned",
                                                                         "vip": "public_metadata.vip"}))
    store, engine = _with_app_table(db_url, _accounts("acc_bt", sa.String(16)), mapping)
    ada, bob = f.user("user_ada", B), f.user("user_bob", B)
    ada["public_metadata"], ada["banned"] = {"vip": True}, False
    bob["public_metadata"], bob["banned"] = {"vip": False}, True
    assert deliver(store, f.envelope("user.created", ada), f.envelope("user.created", bob)) == ["applied"] * 2
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT clerk_user_id, banned, vip FROM acc_bt ORDER BY clerk_user_id")).all()
    assert [tuple(r) for r in rows] == [("user_ada", "false", "true"), ("user_bob", "true", "false")]
    store.dispose()
    engine.dispose()


def test_a_true_or_false_into_a_too_short_text_column_is_failed_by_the_doctor_and_refused_naming_it(
        db_url: str) -> None:
    """``banned`` into VARCHAR(3): the doctor said nothing; PostgreSQL refused the row without naming the column
    while SQLite and MariaDB stored '0'. The doctor fails it with the fix; the row's refusal names the column."""
    mapping = SchemaMapping(users=MappedTable("acc_short", "clerk_user_id", {"banned": "banned"}))
    store, engine = _with_app_table(db_url, _accounts("acc_short", sa.String(3)), mapping)
    with engine.connect() as conn:
        problems = check_schema(conn, mapping)
    assert [severity for severity, _ in problems] == ["fail"], problems
    assert "acc_short.banned" in problems[0][1] and "widen it to VARCHAR(5)" in problems[0][1], problems
    assert deliver(store, f.envelope("user.created", f.user("user_ada", B))) == ["applied"]  # (contract tables)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM acc_short")).scalar() == 0
        error = conn.execute(sa.text("SELECT last_error FROM webhook_events")).scalar()
    assert "acc_short.banned takes at most 3 characters" in str(error), error
    store.dispose()
    engine.dispose()


def test_a_true_or_false_into_a_float_column_is_1_or_0_on_every_store(db_url: str) -> None:
    """Review: SQLAlchemy 2.1's Float is no Numeric, so a true/false into a ``double precision`` column went as a
    boolean and PostgreSQL refused every row with it (the others stored 1/0)."""
    table = sa.Table("acc_float", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("banned", sa.Float))
    mapping = SchemaMapping(users=MappedTable("acc_float", "clerk_user_id", {"banned": "banned"}))
    store, engine = _with_app_table(db_url, table, mapping)
    ada, bob = f.user("user_ada", B), f.user("user_bob", B)
    bob["banned"] = True
    assert deliver(store, f.envelope("user.created", ada), f.envelope("user.created", bob)) == ["applied"] * 2
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT clerk_user_id, banned FROM acc_float ORDER BY clerk_user_id")).all()
    assert [(r[0], float(r[1])) for r in rows] == [("user_ada", 0.0), ("user_bob", 1.0)]
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("mapped", [False, True], ids=["policy-only", "mapped-flag"])
def test_a_deactivate_flag_in_a_text_column_is_true_then_false_on_every_store(db_url: str, mapped: bool) -> None:
    """Review of the fix above: Deactivate's own true/false (a new row's, the deletion's) still went as a bool:
    a mapped ``is_active`` read 'true' while live and '0' once deleted on SQLite and MariaDB, and PostgreSQL
    refused the boolean. 'true'/'false' there too now."""
    columns: dict[str, str | Column] = {"email": "email"}
    if mapped:
        columns["is_active"] = Column(compute=lambda v: not v["banned"])
    mapping = SchemaMapping(users=MappedTable("acc_deact", "clerk_user_id", columns, on_delete=Deactivate("is_active")))
    table = sa.Table("acc_deact", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(200)),
                     sa.Column("is_active", sa.String(8)))
    store, engine = _with_app_table(db_url, table, mapping)
    with engine.connect() as conn:
        assert [s for s, _ in check_schema(conn, mapping) if s == "fail"] == []
    assert deliver(store, f.envelope("user.created", f.user("user_ada", B)),
                   f.envelope("user.created", f.user("user_bob", B))) == ["applied"] * 2
    assert deliver(store, f.envelope("user.deleted", {"id": "user_bob", "deleted": True, "object": "user"})) \
        == ["applied"]
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT clerk_user_id, is_active FROM acc_deact ORDER BY clerk_user_id")).all()
    assert [tuple(r) for r in rows] == [("user_ada", "true"), ("user_bob", "false")]
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("clerk_id_type", [sa.BigInteger(), sa.Integer()], ids=["bigint", "integer"])
def test_a_clerk_id_column_that_is_not_text_is_failed_by_the_doctor(db_url: str,
                                                                    clerk_id_type: sa.types.TypeEngine[int]) -> None:
    """An integer Clerk-id column: the doctor said ok, and every row was refused on PostgreSQL and MariaDB
    (SQLite took the text): it fails now, on every store, with the statement that makes it text."""
    table = sa.Table("acc_intid", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", clerk_id_type, unique=True), sa.Column("email", sa.String(200)),
                     sa.Column("deleted_at", sa.DateTime))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        table.create(conn)
        problems = check_schema(conn, SchemaMapping(users=MappedTable(
            "acc_intid", "clerk_user_id", {"email": "email"}, on_delete=SoftDelete("deleted_at"))))
    fails = [message for severity, message in problems if severity == "fail"]
    assert len(fails) == 1 and "acc_intid.clerk_user_id is" in fails[0], problems
    assert "Clerk's ids are text (user_...)" in fails[0] and "make it text" in fails[0], fails
    engine.dispose()
