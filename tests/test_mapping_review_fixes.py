"""Mapped tables: what a review of the mapping found (stop 60), each on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
from datetime import date

import pytest
import sqlalchemy as sa
import sqlalchemy.dialects.postgresql

from clerk_sync.events import parse_envelope
from clerk_sync.ingest import Outcome, WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete, check_schema, migrate_schema
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_mapping import B, _with_app_table, deliver


def test_a_backfill_keeps_the_mapped_values_clerk_syncs_tables_do_not_hold(db_url: str) -> None:
    """``external_id`` and ``email_verified`` are carried by events, not kept in clerk-sync's tables: a
    backfill (``migrate --mapping .. --backfill``, as the docs advise after fixing a refusal) wrote their
    default, NULL, over what the events had written."""
    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("email", sa.String(320)), sa.Column("legacy_id", sa.String(64)),
                        sa.Column("verified", sa.Boolean), sa.Column("deleted_at", sa.DateTime))
    mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {
        "email": "email", "legacy_id": "external_id", "verified": "email_verified"}, on_delete=SoftDelete()))
    store, engine = _with_app_table(db_url, accounts, mapping)
    user = {**f.user("user_1", B + 1000, email="ada@example.com"), "external_id": "legacy-42"}
    assert deliver(store, f.envelope("user.created", user)) == ["applied"]

    def rows() -> list[tuple[object, ...]]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text("SELECT clerk_user_id, email, legacy_id, verified "
                                                           "FROM accounts ORDER BY clerk_user_id"))]

    written = rows()
    assert written == [("user_1", "ada@example.com", "legacy-42", True)] or \
        written == [("user_1", "ada@example.com", "legacy-42", 1)]
    with engine.begin() as conn:  # a column the app changed by hand since: the backfill writes it back
        conn.execute(sa.text("UPDATE accounts SET email = 'edited@example.com'"))
    assert mapping.backfill(store) == {"users": 1}
    assert rows() == [(*written[0][:1], "ada@example.com", *written[0][2:])]
    store.dispose()
    engine.dispose()


def test_an_iso_date_in_metadata_goes_into_a_date_column_on_every_store(db_url: str) -> None:
    """PostgreSQL and MariaDB parsed ``"2026-01-31"`` for a DATE column; SQLite's type refused it, and with it
    the whole row (the user had no row in the app's table)."""
    trials = sa.Table("trials", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("email", sa.String(320)), sa.Column("trial_ends", sa.Date))
    mapping = SchemaMapping(users=MappedTable("trials", "clerk_user_id", {
        "email": "email", "trial_ends": "public_metadata.trial_ends"}))
    store, engine = _with_app_table(db_url, trials, mapping)
    user = f.user("user_1", B + 1000)
    user["public_metadata"] = {"trial_ends": "2026-01-31"}
    assert deliver(store, f.envelope("user.created", user)) == ["applied"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(trials.c.trial_ends)).scalar_one() == date(2026, 1, 31)
    store.dispose()
    engine.dispose()


def test_doctor_fails_an_epoch_ms_source_in_a_32_bit_integer_column(db_url: str) -> None:
    """``last_sign_in_at`` into INTEGER passed doctor; on PostgreSQL and MariaDB the user's first sign-in then
    refused every later update of their row (a role change, a ban) as out of range. SQLite's INTEGER holds 64
    bits: no problem there."""
    logins = sa.Table("logins", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("last_ms", sa.Integer), sa.Column("created_ms", sa.BigInteger))
    mapping = SchemaMapping(users=MappedTable("logins", "clerk_user_id", {
        "last_ms": "last_sign_in_at", "created_ms": "clerk_created_at"}))
    store, engine = _with_app_table(db_url, logins, mapping)
    with engine.connect() as conn:
        problems = [p for level, p in check_schema(conn, mapping) if level == "fail"]
    store.dispose()
    engine.dispose()
    narrow = [p for p in problems if "epoch milliseconds" in p]
    if db_url.startswith("sqlite"):
        assert narrow == []
    else:
        assert len(narrow) == 1 and narrow[0].startswith("logins.last_ms is INTEGER and its source "
                                                         "'last_sign_in_at' gives epoch milliseconds"), problems
        assert "make it a BIGINT column" in narrow[0]


def test_doctor_fails_linking_on_a_table_without_a_primary_key(db_url: str) -> None:
    """A linked row is read and adopted by its primary key: without one every new user was refused (SQLite and
    MariaDB with a syntax error naming nothing; PostgreSQL adopted every unlinked row at once) while doctor
    said nothing."""
    legacy = sa.Table("legacy", sa.MetaData(), sa.Column("email", sa.String(320)), sa.Column("name", sa.String(64)))
    mapping = SchemaMapping(users=MappedTable("legacy", "clerk_user_id", {"email": "email"},
                                              link_by_email="email"))
    store, engine = _with_app_table(db_url, legacy, mapping)
    with engine.connect() as conn:
        problems = [p for level, p in check_schema(conn, mapping) if level == "fail"]
    store.dispose()
    engine.dispose()
    assert any(p.startswith("legacy has no primary key, and link_by_email/link_by_external_id adopt") for p in problems), \
        problems


def test_a_long_table_and_column_name_get_a_unique_index_the_database_takes(db_url: str) -> None:
    """``uq_<table>_<column>`` past 63 bytes: SQLAlchemy refused to send it to PostgreSQL (``migrate_schema``
    migrated nothing) and MariaDB refused it past 64 characters (``migrate`` added the column, then failed, and
    again on every run, doctor saying to run it). Cut as PostgreSQL cuts a name itself."""
    seats = sa.Table("myapp_organization_membership", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("role", sa.String(64)), sa.Column("deleted_at", sa.DateTime))
    mapping = SchemaMapping(memberships=MappedTable("myapp_organization_membership",
                                                    "clerk_organization_membership_id", {"role": "role"},
                                                    on_delete=SoftDelete()))
    store, engine = _with_app_table(db_url, seats, mapping)
    with engine.connect() as conn:
        assert [p for level, p in check_schema(conn, mapping) if level == "fail"] == []
        indexes = [i["name"] for i in sa.inspect(conn).get_indexes("myapp_organization_membership") if i["unique"]]
    assert len(indexes) == 1 and indexes[0].startswith("uq_myapp_organization_membership_clerk_organization")
    assert len(indexes[0]) <= 64 or db_url.startswith("sqlite")
    with engine.begin() as conn:
        assert migrate_schema(conn, mapping) == []  # run again: nothing left to do
    store.dispose()
    engine.dispose()


def test_transform_json_into_a_json_column_is_the_document_on_every_store(db_url: str) -> None:
    """The JSON text was encoded again by the column's type on SQLite and PostgreSQL (a JSON string:
    ``meta->>'role'`` NULL), while MariaDB's JSON (a LONGTEXT to reflection) held the object."""
    json_type = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")
    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("meta", json_type), sa.Column("meta_text", sa.Text))
    mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {
        "meta": Column("public_metadata", transform="json"), "meta_text": Column("public_metadata", transform="json")}))
    store, engine = _with_app_table(db_url, accounts, mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_1", B + 1000, role="admin"))) == ["applied"]
    # and through the group committer's batches (on PostgreSQL, the delivery's own statement)
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    envelope = parse_envelope(json.dumps(f.envelope("user.created", f.user("user_2", B + 1000, role="owner"))))
    assert all(isinstance(r, Outcome) for r in committer.write([("msg_batched", envelope)]))
    extract = {"postgresql": "meta->>'role'", "sqlite": "json_extract(meta, '$.role')"}.get(
        engine.dialect.name, "json_unquote(json_extract(meta, '$.role'))")
    with engine.connect() as conn:
        found = conn.execute(sa.text(f"SELECT {extract}, meta_text FROM accounts "  # noqa: S608
                                     "ORDER BY clerk_user_id")).all()
    assert [role for role, _ in found] == ["admin", "owner"]
    assert [json.loads(text)["role"] for _, text in found] == ["admin", "owner"]  # a text column: its JSON text
    store.dispose()
    engine.dispose()


def test_an_external_id_into_an_integer_column_is_a_warning_and_its_digits_go_in(db_url: str) -> None:
    """doctor failed it ("every row is refused") while an app's integer ids given to Clerk as external_id go in
    on every store; only a user whose external_id is not digits has their row refused."""
    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("legacy_id", sa.Integer))
    mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"legacy_id": "external_id"}))
    store, engine = _with_app_table(db_url, accounts, mapping)
    with engine.connect() as conn:
        problems = check_schema(conn, mapping)
    said = [(level, p) for level, p in problems if "legacy_id" in p]
    assert len(said) == 1 and said[0][0] == "warn" and "not an integer's digits" in said[0][1], problems
    assert deliver(store, f.envelope("user.created", {**f.user("user_1", B + 1000), "external_id": "42"})) \
        == ["applied"]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT clerk_user_id, legacy_id FROM accounts")).all() == [("user_1", 42)]
    store.dispose()
    engine.dispose()


def test_a_text_for_a_boolean_column_is_refused_naming_the_column_on_every_store(db_url: str) -> None:
    """A metadata ``"beta": "true"`` into a BOOLEAN column: SQLite's and PostgreSQL's refusal said "TypeError:
    a value the column's type cannot take" (or "could not be bound"), naming neither the column nor the fix."""
    flags = sa.Table("flags", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("beta", sa.Boolean))
    mapping = SchemaMapping(users=MappedTable("flags", "clerk_user_id", {"beta": "public_metadata.beta"}))
    store, engine = _with_app_table(db_url, flags, mapping)
    user = f.user("user_1", B + 1000)
    user["public_metadata"] = {"beta": "true"}
    assert deliver(store, f.envelope("user.created", user)) == ["applied"]  # clerk-sync's tables hold the user
    with engine.connect() as conn:
        error = conn.execute(sa.text("SELECT last_error FROM webhook_events")).scalar_one()
    if engine.dialect.name in ("mysql", "mariadb"):  # a TINYINT(1) to reflection: MariaDB's refusal names it
        assert "`flags`.`beta`" in error, error
    else:
        assert "flags.beta is a boolean column and the value for it is a text" in error, error
        assert "transform='bool'" in error
    store.dispose()
    engine.dispose()


def test_transform_json_into_a_json_column_keeps_the_columns_default(db_url: str) -> None:
    """Review of the above: the default (a text) was parsed as JSON text, and every user without the metadata
    had their row refused (JSONDecodeError)."""
    if db_url.startswith("mysql"):
        pytest.skip("MariaDB's JSON is a LONGTEXT to reflection: the text path, its default written as given")
    plans = sa.Table("plans", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("plan", sa.JSON))
    mapping = SchemaMapping(users=MappedTable("plans", "clerk_user_id", {
        "plan": Column("public_metadata.plan", transform="json", default="free")}))
    store, engine = _with_app_table(db_url, plans, mapping)
    paying = f.user("user_2", B + 1000)
    paying["public_metadata"] = {"plan": {"tier": "pro"}}
    assert deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)),
                   f.envelope("user.created", paying)) == ["applied", "applied"]
    with engine.connect() as conn:
        found = dict(conn.execute(sa.select(sa.column("clerk_user_id"), plans.c.plan).select_from(plans)).all())
    assert found == {"user_1": "free", "user_2": {"tier": "pro"}}
    store.dispose()
    engine.dispose()
