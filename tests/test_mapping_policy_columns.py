"""The delete policy's column in the mapped writes: a Deactivate flag the mapping also maps (``is_active`` from
``banned``) is the mapping's live value, named once in each statement (PostgreSQL and SQLite refused every row
for naming it twice, MariaDB's ``COALESCE(is_active, TRUE)`` kept a banned user active), and the deletion still
sets it false; a mapped deletion time is refused when the mapping is declared."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import ALONE, GroupCommitter
from clerk_sync.mapping import (
    Anonymise,
    Column,
    Deactivate,
    MappedTable,
    SchemaMapping,
    SoftDelete,
    check_schema,
    migrate_schema,
)
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_hooks import B, deliver


def _accounts(db_url: str, mapping: SchemaMapping, flag: sa.types.TypeEngine[Any]) -> tuple[Store, sa.Engine]:
    engine = sa.create_engine(db_url)
    table = sa.Table("pol_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                     sa.Column("email", sa.String(320)), sa.Column("is_active", flag))
    with engine.begin() as conn:
        table.create(conn)
        migrate_schema(conn, mapping)
        assert [p for p in check_schema(conn, mapping) if p[0] == "fail"] == []
    return Store.from_url(db_url, mapping=mapping), engine


def _flags(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {k: v for k, v in conn.execute(sa.text("SELECT clerk_user_id, is_active FROM pol_accounts")).all()}


def _errors(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT last_error FROM webhook_events WHERE last_error IS NOT NULL")).scalars())


BANNED = SchemaMapping(users=MappedTable("pol_accounts", "clerk_user_id", {
    "email": "email", "is_active": Column(compute=lambda v: not v["banned"])}, on_delete=Deactivate("is_active")))


@pytest.mark.parametrize("flag", [sa.Boolean(), sa.SmallInteger()], ids=["boolean", "smallint"])
def test_a_mapped_deactivate_flag_is_the_mappings_value_and_the_deletion_still_clears_it(
        db_url: str, flag: sa.types.TypeEngine[Any]) -> None:
    """A ``smallint`` flag too: a true/false goes into a number column as 1/0 (PostgreSQL refused the boolean)."""
    store, engine = _accounts(db_url, BANNED, flag)
    assert deliver(store, f.envelope("user.created", f.user("user_a", B)),
                   f.envelope("user.created", f.user("user_b", B, banned=True))) == ["applied"] * 2
    assert {k: bool(v) for k, v in _flags(engine).items()} == {"user_a": True, "user_b": False}
    assert deliver(store, f.envelope("user.updated", f.user("user_a", B + 1, banned=True)),
                   f.envelope("user.updated", f.user("user_b", B + 1))) == ["applied"] * 2
    assert {k: bool(v) for k, v in _flags(engine).items()} == {"user_a": False, "user_b": True}
    assert deliver(store, f.envelope("user.deleted", f.deleted("user", "user_b"))) == ["applied"]
    assert {k: bool(v) for k, v in _flags(engine).items()} == {"user_a": False, "user_b": False}
    # a batch (PostgreSQL: the wave's one statement per entity type), created banned or not
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    committer = GroupCommitter(processor)
    batch = [(f"msg_pol{i}", parse_envelope(json.dumps(f.envelope("user.created", f.user(user, B, banned=banned)))))
             for i, (user, banned) in enumerate([("user_c", True), ("user_d", False)])]
    results = committer.write(batch)
    assert [(processor.apply_alone(*item) if r is ALONE else r).status
            for item, r in zip(batch, results, strict=True)] == ["applied"] * 2
    assert committer.retried == 0
    assert {k: bool(v) for k, v in _flags(engine).items() if k in ("user_c", "user_d")} == {
        "user_c": False, "user_d": True}
    assert _errors(engine) == []
    store.dispose()
    engine.dispose()


@pytest.mark.parametrize("policy", [SoftDelete("deleted_at"), Anonymise("deleted_at")], ids=lambda p: type(p).__name__)
def test_a_mapped_deletion_time_is_refused_when_declared(policy: SoftDelete | Anonymise) -> None:
    with pytest.raises(ValueError, match=r"pol_accounts\.deleted_at is the deletion time"):
        MappedTable("pol_accounts", "clerk_user_id", {"deleted_at": "public_metadata.gone"}, on_delete=policy)


def test_true_false_into_number_columns_as_one_and_zero_on_every_store(db_url: str) -> None:
    """``banned``, a ``transform="bool"`` and Deactivate's own flag into ``smallint`` columns: 1/0 on every store
    (PostgreSQL refused every row with "cannot cast type boolean to smallint", so the ban never reached the app),
    through one delivery, a batch (PostgreSQL's wave) and the deletion."""
    mapping = SchemaMapping(users=MappedTable("pol_accounts", "clerk_user_id", {
        "email": "email", "is_banned": "banned", "vip": Column("public_metadata.vip", transform="bool")},
        on_delete=Deactivate("is_active")))
    engine = sa.create_engine(db_url)
    table = sa.Table("pol_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                     sa.Column("email", sa.String(320)), sa.Column("is_banned", sa.SmallInteger),
                     sa.Column("vip", sa.Numeric(1, 0)), sa.Column("is_active", sa.SmallInteger))
    with engine.begin() as conn:
        table.create(conn)
        migrate_schema(conn, mapping)
        assert [p for p in check_schema(conn, mapping) if p[0] == "fail"] == []
    store = Store.from_url(db_url, mapping=mapping)

    def rows() -> dict[str, tuple[Any, ...]]:
        with engine.connect() as conn:
            return {r[0]: tuple(v if v is None else int(v) for v in r[1:]) for r in conn.execute(sa.text(
                "SELECT clerk_user_id, is_banned, vip, is_active FROM pol_accounts"))}

    vip = {"public_metadata": {"vip": "yes"}}
    assert deliver(store, f.envelope("user.created", f.user("user_a", B) | vip)) == ["applied"]
    assert deliver(store, f.envelope("user.updated", f.user("user_a", B + 1, banned=True) | vip)) == ["applied"]
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    committer = GroupCommitter(processor)
    batch = [(f"msg_num{i}", parse_envelope(json.dumps(f.envelope("user.created", user))))
             for i, user in enumerate([f.user("user_b", B, banned=True) | vip, f.user("user_c", B)])]
    results = committer.write(batch)
    assert [(processor.apply_alone(*item) if r is ALONE else r).status
            for item, r in zip(batch, results, strict=True)] == ["applied"] * 2
    assert committer.retried == 0
    assert rows() == {"user_a": (1, 1, 1), "user_b": (1, 1, 1), "user_c": (0, None, 1)}
    assert deliver(store, f.envelope("user.deleted", f.deleted("user", "user_c"))) == ["applied"]
    assert rows()["user_c"] == (0, None, 0)
    assert _errors(engine) == []
    store.dispose()
    engine.dispose()


_ALL = frozenset({"sqlite", "postgresql", "mysql"})


@pytest.mark.parametrize(("policy", "type_", "fails"), [
    (SoftDelete("gone"), sa.BigInteger(), _ALL), (SoftDelete("gone"), sa.Boolean(), _ALL),
    (Anonymise("gone"), sa.Integer(), _ALL), (SoftDelete("gone"), sa.DateTime(timezone=True), frozenset()),
    # (review: a DATE keeps the day, a text the time as text: deletions applied, doctor must not fail them)
    (SoftDelete("gone"), sa.Date(), frozenset()), (SoftDelete("gone"), sa.String(40), frozenset()),
    # ('true'/'false' into text, as the mapped values: PostgreSQL refused the boolean before; 'false' needs 5)
    (Deactivate("gone"), sa.String(5), frozenset()), (Deactivate("gone"), sa.String(4), frozenset({"postgresql", "mysql"})),
    (Deactivate("gone"), sa.DateTime(), frozenset({"postgresql", "mysql"})),
    (Deactivate("gone"), sa.SmallInteger(), frozenset()), (Deactivate("gone"), sa.Boolean(), frozenset()),
], ids=lambda v: type(v).__name__ if not isinstance(v, frozenset) else "-".join(sorted(v)) or "none")
def test_doctor_fails_a_policy_column_of_a_type_the_policy_cannot_write(
        db_url: str, policy: SoftDelete | Anonymise | Deactivate, type_: sa.types.TypeEngine[Any],
        fails: frozenset[str]) -> None:
    """A deletion time into a number or boolean column refused every deletion (a true/false into a date column,
    or a text one too short for 'false', every row) while doctor said ok: it fails now, naming the column and what it
    must be; columns that take what the policy writes are not failed."""
    mapping = SchemaMapping(users=MappedTable("pol_kinds", "clerk_user_id", {"email": "email"}, on_delete=policy))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        sa.Table("pol_kinds", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                 sa.Column("email", sa.String(320)), sa.Column("gone", type_)).create(conn)
        migrate_schema(conn, mapping)
        failed = [p for s, p in check_schema(conn, mapping) if s == "fail"]
    dialect = "mysql" if engine.dialect.name == "mariadb" else engine.dialect.name
    engine.dispose()
    if dialect not in fails:
        assert failed == []
        return
    assert len(failed) == 1 and failed[0].startswith("pol_kinds.gone is "), failed
    assert ("make it a boolean column" if isinstance(policy, Deactivate) else "make it a date-time column") in failed[0]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_doctor_warns_of_locked_mapped_without_the_lockouts_end(db_url: str) -> None:
    """A mapped ``locked`` stayed true after Clerk's lockout ended by itself (no webhook says so) and doctor said
    nothing: it warns now, unless ``locked_until`` is mapped too, which the app can read the end from."""
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        sa.Table("pol_locks", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("is_locked", sa.Boolean), sa.Column("locked_until", sa.DateTime)).create(conn)
        columns: dict[str, str | Column] = {"is_locked": "locked"}
        mapping = SchemaMapping(users=MappedTable("pol_locks", "clerk_user_id", columns))
        migrate_schema(conn, mapping)
        warned = [p for s, p in check_schema(conn, mapping) if s == "warn"]
        assert len(warned) == 1 and warned[0].startswith("pol_locks.is_locked is mapped from 'locked'"), warned
        assert 'Column("locked_until", transform="timestamp")' in warned[0]
        with_end = SchemaMapping(users=MappedTable("pol_locks", "clerk_user_id", {
            **columns, "locked_until": Column("locked_until", transform="timestamp")}))
        assert check_schema(conn, with_end) == []
    engine.dispose()


def test_an_iso_8601_text_into_a_date_time_column_is_the_time_it_says_on_every_store(db_url: str) -> None:
    """A metadata date (``"2026-01-01T02:00:00+02:00"``) mapped into a ``timestamp`` column: PostgreSQL stored it
    dropping the offset (02:00), MariaDB and SQLite refused the whole row, the ban with it. It is parsed now: UTC's
    wall clock, as every time the mapping writes."""
    mapping = SchemaMapping(users=MappedTable("pol_times", "clerk_user_id", {
        "banned": "banned", "renews": "public_metadata.renews"}))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        sa.Table("pol_times", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                 sa.Column("banned", sa.Boolean), sa.Column("renews", sa.DateTime)).create(conn)
        migrate_schema(conn, mapping)
    store = Store.from_url(db_url, mapping=mapping)
    renews = {"public_metadata": {"renews": "2026-01-01T02:00:00+02:00"}}
    assert deliver(store, f.envelope("user.created", f.user("user_a", B, banned=True) | renews),
                   f.envelope("user.created", f.user("user_b", B) | {"public_metadata": {
                       "renews": "2026-03-04"}})) == ["applied"] * 2
    table = sa.Table("pol_times", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        rows = {r.clerk_user_id: (bool(r.banned), r.renews) for r in conn.execute(sa.select(table))}
    assert rows == {"user_a": (True, datetime(2026, 1, 1)), "user_b": (False, datetime(2026, 3, 4))}
    assert _errors(engine) == []
    store.dispose()
    engine.dispose()
