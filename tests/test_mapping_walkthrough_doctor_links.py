"""Adopter walkthrough, section 9: run before ``migrate --mapping``, doctor did not report the (case-variant)
e-mails several rows share, which make links ambiguous (it counted them only once the Clerk-id column
existed); its collation warning for the external-id link column talked about e-mails."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from clerk_sync.mapping import MappedTable, SchemaMapping, check_schema


def test_doctor_before_migrate_reports_the_e_mails_several_rows_share(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    legacy = sa.Table("walk_pre", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                      sa.Column("email", sa.String(320)), sa.Column("legacy_id", sa.String(64)))
    mapping = SchemaMapping(users=MappedTable("walk_pre", "clerk_user_id", {"email": "email"}, link_by_email="email",
                                              link_by_external_id="legacy_id"))
    with engine.begin() as conn:
        legacy.create(conn)
        conn.execute(legacy.insert(), [{"email": "Bob@Example.com", "legacy_id": "L-1"},
                                       {"email": "bob@example.com", "legacy_id": "L-1"},
                                       {"email": "carol@example.com", "legacy_id": "L-2"}])
        problems = check_schema(conn, mapping)
    assert ("fail", "walk_pre.clerk_user_id is missing: run `clerk-sync migrate --mapping ...`") in problems
    shared = [p for s, p in problems if s == "warn" and "shared" in p]
    assert len(shared) == 2, problems
    assert "walk_pre.email: 1 e-mail value(s) are shared by several rows" in shared[1], shared
    assert "walk_pre.legacy_id: 1 external id value(s) are shared" in shared[0], shared
    engine.dispose()


def test_doctors_collation_warning_for_the_external_id_column_is_about_ids_not_e_mails(db_url: str) -> None:
    if not db_url.startswith("mysql"):
        pytest.skip("MySQL/MariaDB collations")
    engine = sa.create_engine(db_url)
    legacy = sa.Table("walk_ci", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                      sa.Column("email", sa.String(320)), sa.Column("legacy_id", sa.String(64)),
                      sa.Column("clerk_user_id", sa.String(64, collation="utf8mb4_bin"), unique=True),
                      mysql_charset="utf8mb4", mysql_collate="utf8mb4_general_ci")
    mapping = SchemaMapping(users=MappedTable("walk_ci", "clerk_user_id", {"email": "email"}, link_by_email="email",
                                              link_by_external_id="legacy_id"))
    with engine.begin() as conn:
        legacy.create(conn)
        problems = [p for _, p in check_schema(conn, mapping) if "without regard" in p]
    by_column = {p.split(" ", 1)[0]: p for p in problems}
    assert set(by_column) == {"walk_ci.email", "walk_ci.legacy_id"}, problems
    assert "élodie@" in by_column["walk_ci.email"]
    external = by_column["walk_ci.legacy_id"]
    assert "élodie" not in external and "e-mail" not in external and "external id" in external, external
    engine.dispose()
