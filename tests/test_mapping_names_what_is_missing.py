"""A mapping naming what is not there: a column the app's table lacks, a source no record has.

Erasure crashed (KeyError) and erased nothing when the mapping named a personal column the table lacks; a
missing mapped column passed ``migrate --mapping`` and then refused every row with a ``KeyError`` naming no
column; a typo in a source (``"ful_name"``) wrote NULL into every row, silently."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from clerk_sync.mapping import Column, MappedTable, SchemaMapping
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from tests import factories as f
from tests.test_cli import run
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table


def _scalar(store: Store, sql: str) -> object:
    with store.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def test_erasure_reports_a_mapped_column_the_table_lacks_and_still_erases(db_url: str, tmp_path: Path) -> None:
    """The missing column is that table's refusal (reported, audited, exit 1); clerk-sync's rows and the
    columns the table has are cleared."""
    accounts = sa.Table("lacking_accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("email", sa.String(320)))
    store, engine = _with_app_table(db_url, accounts, SchemaMapping(users=MappedTable(
        "lacking_accounts", "clerk_user_id", {"email": "email"})))
    assert deliver(store, f.envelope("user.created", f.user("user_e", B + 1000, email="e@example.com")),
                   f.envelope("user.created", f.user("user_c", B + 1000, email="c@example.com"))) == ["applied"] * 2
    store.dispose()
    source = ("from clerk_sync.mapping import MappedTable, SchemaMapping\n"
              "MAPPING = SchemaMapping(users=MappedTable('lacking_accounts', 'clerk_user_id',\n"
              "                                          {'email': 'email', 'name': 'full_name'}))\n")
    (tmp_path / "lackmap.py").write_text(source)
    namespace: dict[str, object] = {}
    exec(source, namespace)  # noqa: S102 (the module the CLI loads, for the library call)
    mapping = namespace["MAPPING"]
    assert isinstance(mapping, SchemaMapping)
    store = Store.from_url(db_url, mapping=mapping)

    report = Retention(store).erase_user("user_e", reason="DSR")
    assert len(report.mapped_refused) == 1, report.mapped_refused
    assert "lacking_accounts.name is missing" in report.mapped_refused[0]
    assert _scalar(store, "SELECT email FROM users WHERE clerk_id = 'user_e'") is None  # clerk-sync's erased
    assert _scalar(store, "SELECT email FROM lacking_accounts WHERE clerk_user_id = 'user_e'") is None

    result = run("users", "erase", "user_c", "--mapping", "lackmap:MAPPING",
                 env={"DATABASE_URL": db_url, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    said = " ".join(result.stderr.split())
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "lacking_accounts.name is missing" in said and "Traceback" not in said, said
    assert _scalar(store, "SELECT email FROM users WHERE clerk_id = 'user_c'") is None
    assert _scalar(store, "SELECT email FROM lacking_accounts WHERE clerk_user_id = 'user_c'") is None
    store.dispose()
    engine.dispose()


def test_a_missing_mapped_column_fails_migrate_and_each_row_names_it(db_url: str, tmp_path: Path) -> None:
    """``migrate --mapping`` exits 2 naming the column, before changing anything; a delivery is applied, its
    mapped row refused with a ``last_error`` naming the column (not "KeyError: a value the column's type
    cannot take")."""
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE typo_accounts (id INTEGER PRIMARY KEY, email VARCHAR(320))")
    (tmp_path / "typomap.py").write_text(
        "from clerk_sync.mapping import MappedTable, SchemaMapping\n"
        "MAPPING = SchemaMapping(users=MappedTable('typo_accounts', 'clerk_user_id', {'emial': 'email'}))\n")
    result = run("migrate", "--mapping", "typomap:MAPPING",
                 env={"DATABASE_URL": db_url, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    said = " ".join(result.stderr.split())
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "typo_accounts.emial (a mapped column) is missing" in said, said
    with engine.connect() as conn:  # nothing added: the Clerk-id column neither
        assert {c["name"] for c in sa.inspect(conn).get_columns("typo_accounts")} == {"id", "email"}

    with engine.begin() as conn:  # migrated by an earlier, correct mapping
        conn.exec_driver_sql("ALTER TABLE typo_accounts ADD COLUMN clerk_user_id VARCHAR(64)")
        conn.exec_driver_sql("ALTER TABLE typo_accounts ADD COLUMN deleted_at TIMESTAMP NULL")
    store = Store.from_url(db_url, mapping=SchemaMapping(users=MappedTable(
        "typo_accounts", "clerk_user_id", {"emial": "email"})))
    assert deliver(store, f.envelope("user.created", f.user("user_t", B + 1000, banned=True))) == ["applied"]
    assert _scalar(store, "SELECT banned FROM users WHERE clerk_id = 'user_t'") in (True, 1)
    error = str(_scalar(store, "SELECT last_error FROM webhook_events"))
    assert "typo_accounts.emial (a mapped column) is missing" in error and "KeyError" not in error, error
    store.dispose()
    engine.dispose()


def test_a_source_no_record_has_is_refused_when_the_mapping_is_declared() -> None:
    """``"ful_name"`` for ``full_name``, a metadata path under a misspelt or another entity's field: each wrote
    NULL into every row, silently. Refused when the mapping is made, naming the source, the entity and the
    sources known."""
    cases = [(dict(users=MappedTable("accounts", "clerk_user_id", {"email": "email", "name": "ful_name"})),
              "accounts.name: unknown source 'ful_name' for users (did you mean 'full_name'?)"),
             (dict(users=MappedTable("accounts", "clerk_user_id", {"plan": "public_metdata.plan"})),
              "unknown source 'public_metdata.plan' for users (did you mean 'public_metadata.plan'?)"),
             (dict(users=MappedTable("accounts", "clerk_user_id", {"plan": "email.plan"})),
              "unknown source 'email.plan' for users"),
             (dict(organizations=MappedTable("teams", "clerk_org_id", {"name": "full_name"})),
              "unknown source 'full_name' for organizations"),
             (dict(memberships=MappedTable("seats", "clerk_membership_id", {"tier": "public_metadata.tier"})),
              "unknown source 'public_metadata.tier' for organization_memberships")]
    for tables, said in cases:
        with pytest.raises(ValueError, match=re.escape(said)) as refused:
            SchemaMapping(**tables)
        assert "known: clerk_id" in str(refused.value), refused.value
    # every kind of source a mapping may name
    SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {
        "email": "email", "name": "full_name", "plan": "public_metadata.billing.plan", "meta": "unsafe_metadata",
        "ext": "external_id", "until": Column("locked_until", transform="timestamp"),
        "initials": Column(compute=lambda v: "x")}),
        organizations=MappedTable("teams", "clerk_org_id", {"name": "name", "tier": "private_metadata.tier"}),
        memberships=MappedTable("seats", "clerk_membership_id", {"who": "user_clerk_id", "perms": "permissions"}))
