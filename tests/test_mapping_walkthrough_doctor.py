"""Adopter walkthrough, section 6: doctor passed mappings that refuse predictable events: HardDelete with a
foreign key ON DELETE RESTRICT/NO ACTION referring to the mapped table (every such deletion refused, the row
left live), SoftDelete/Deactivate with a UNIQUE e-mail column (a user signing up again with a deleted user's
address refused for good). It warns of both now, saying what to do."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from clerk_sync.mapping import (
    Anonymise,
    Deactivate,
    DeletePolicy,
    HardDelete,
    MappedTable,
    SchemaMapping,
    SoftDelete,
    check_schema,
)
from clerk_sync.store import Store
from tests import factories as f
from tests.conftest import MYSQL_URL, PG_URL
from tests.test_hooks import B, deliver


def _legacy(meta: sa.MetaData, schema: str | None = None, *, partial: bool = False) -> None:
    people = sa.Table("walk_owners", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                      sa.Column("clerk_user_id", sa.String(64), unique=True),
                      sa.Column("email", sa.String(320), unique=not partial),
                      sa.Column("deleted_at", sa.DateTime(timezone=True)), sa.Column("is_active", sa.Boolean),
                      schema=schema)
    if partial:
        sa.Index("uq_walk_owners_live_email", people.c.email, unique=True,
                 postgresql_where=people.c.deleted_at.is_(None), sqlite_where=people.c.deleted_at.is_(None))
    owner = f"{schema}.walk_owners.id" if schema else "walk_owners.id"
    sa.Table("walk_projects", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("owner_id", sa.Integer, sa.ForeignKey(owner, name="fk_walk_projects_owner")), schema=schema)
    sa.Table("walk_notes", meta, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("owner_id", sa.Integer, sa.ForeignKey(owner, ondelete="CASCADE", name="fk_walk_notes_owner")),
             schema=schema)


def _mapping(policy: DeletePolicy, table: str = "walk_owners") -> SchemaMapping:
    return SchemaMapping(users=MappedTable(table, "clerk_user_id", {"email": "email"}, on_delete=policy))


def _warnings(engine: sa.Engine, mapping: SchemaMapping) -> list[str]:
    with engine.connect() as conn:
        problems = check_schema(conn, mapping)
    assert not [p for s, p in problems if s == "fail"], problems
    return [p for _, p in problems]


def test_doctor_warns_of_a_hard_delete_a_restricting_foreign_key_refuses_and_of_a_unique_kept_address(
        db_url: str) -> None:
    engine = sa.create_engine(db_url)
    meta = sa.MetaData()
    _legacy(meta)
    meta.create_all(engine)
    hard = _warnings(engine, _mapping(HardDelete()))
    assert len(hard) == 1, hard  # walk_notes cascades: not named
    assert "walk_projects (owner_id)" in hard[0] and "fk_walk_projects_owner" in hard[0], hard
    assert "is refused" in hard[0] and "ON DELETE CASCADE or SET NULL" in hard[0] and "SoftDelete" in hard[0]
    for policy in (SoftDelete("deleted_at"), Deactivate("is_active")):
        kept = _warnings(engine, _mapping(policy))
        assert len(kept) == 1 and "walk_owners.email is UNIQUE" in kept[0], kept
        assert "refused for good" in kept[0] and "Anonymise" in kept[0]
        assert ("partial unique index" in kept[0]) == (engine.dialect.name != "mysql")
    assert _warnings(engine, _mapping(Anonymise("deleted_at"))) == []
    # What doctor warns of: the deletion is refused, the app's row stays live (SQLite too: foreign_keys on)
    store = Store.from_url(db_url, mapping=_mapping(HardDelete()))
    assert deliver(store, f.envelope("user.created", f.user("user_o", B + 1000, email="o@example.com"))) == ["applied"]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO walk_projects (id, owner_id) SELECT 1, id FROM walk_owners"))
    assert deliver(store, f.envelope("user.deleted", {"id": "user_o", "object": "user", "deleted": True},
                                     timestamp=B + 2000)) == ["applied"]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM walk_owners")).scalar_one() == 1
    store.dispose()
    engine.dispose()


def test_doctor_does_not_warn_of_a_partial_unique_address_index(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    if engine.dialect.name == "mysql":
        pytest.skip("MariaDB has no partial index")
    meta = sa.MetaData()
    _legacy(meta, partial=True)
    meta.create_all(engine)
    assert _warnings(engine, _mapping(SoftDelete("deleted_at"))) == []
    engine.dispose()


@contextmanager
def _other_schema(db_url: str) -> Iterator[str]:
    """A schema (PostgreSQL) or database (MariaDB) beside the connection's, dropped after."""
    name = f"walk_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL if db_url.startswith("postgresql") else MYSQL_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {name}" if admin.dialect.name == "postgresql" else
                             f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {name} CASCADE" if admin.dialect.name == "postgresql" else
                                 f"DROP DATABASE {name}")
        admin.dispose()


def test_doctor_warns_of_the_restricting_foreign_key_and_kept_address_of_a_schema_qualified_table(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite maps no schema-qualified table")
    with _other_schema(db_url) as schema:
        engine = sa.create_engine(db_url)
        meta = sa.MetaData()
        _legacy(meta, schema)
        meta.create_all(engine)
        hard = _warnings(engine, _mapping(HardDelete(), f"{schema}.walk_owners"))
        assert len(hard) == 1 and f"{schema}.walk_projects (owner_id)" in hard[0], hard
        kept = _warnings(engine, _mapping(SoftDelete("deleted_at"), f"{schema}.walk_owners"))
        assert len(kept) == 1 and f"{schema}.walk_owners.email is UNIQUE" in kept[0], kept
        engine.dispose()


@pytest.mark.parametrize(("action", "warned"), [("CASCADE", False), ("SET NULL", False), ("RESTRICT", True)])
def test_a_key_written_on_its_column_is_read_with_its_action(db_url: str, action: str, warned: bool) -> None:
    """Review: SQLAlchemy's SQLite reflection gives no ON DELETE for a key written on its column (``owner_id
    INTEGER REFERENCES owners(id) ON DELETE CASCADE``, as hand-written SQL and many ORMs write it): doctor read
    NO ACTION and advised making CASCADE what CASCADE was."""
    engine = sa.create_engine(db_url)
    tag = uuid.uuid4().hex[:8]
    owners, notes = f"rv_owners_{tag}", f"rv_notes_{tag}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {owners} (id INTEGER PRIMARY KEY, email VARCHAR(320), "
                             "clerk_user_id VARCHAR(64) UNIQUE)")
        conn.exec_driver_sql(f"CREATE TABLE {notes} (id INTEGER PRIMARY KEY, "
                             f"owner_id INTEGER REFERENCES {owners}(id) ON DELETE {action})")
    mapping = SchemaMapping(users=MappedTable(owners, "clerk_user_id", {"email": "email"}, on_delete=HardDelete()))
    try:
        with engine.connect() as conn:
            found = [p for _, p in check_schema(conn, mapping) if "hard-deleted" in p]
        assert bool(found) is warned, found
    finally:
        engine.dispose()
