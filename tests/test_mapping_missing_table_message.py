"""A mapped table the app has not created yet: ``migrate --mapping`` says to create it (exit 2), on every face.

Before, the CLI (and Django's command) printed ``database error: NoSuchTableError: accounts. Check DATABASE_URL``
and only Flask's command turned it into advice; the message now comes from ``mapping.migrate_schema`` itself."""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from tests.test_cli import run


def test_migrate_names_the_missing_table_and_changes_no_other_table_first(db_url: str, tmp_path: Path) -> None:
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:  # the organizations' table exists; the users' one does not
        conn.exec_driver_sql("CREATE TABLE teams (id INTEGER PRIMARY KEY, name VARCHAR(100))")
    module = tmp_path / "half_mapping.py"
    module.write_text("from clerk_sync.mapping import MappedTable, SchemaMapping\n"
                      "MAPPING = SchemaMapping(organizations=MappedTable('teams', 'clerk_org_id', {'name': 'name'}),\n"
                      "                        users=MappedTable('accounts', 'clerk_user_id', {'email': 'email'}))\n")
    result = run("migrate", "--mapping", "half_mapping:MAPPING", env={"DATABASE_URL": db_url,
                                                                     "PYTHONPATH": str(tmp_path)})
    said = " ".join(result.stderr.split())
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "the mapped table 'accounts' does not exist: create it with your app's own migrations first" in said
    assert "NoSuchTableError" not in said and "Check DATABASE_URL" not in said, said
    with engine.connect() as conn:  # checked before anything was added to the table that exists
        assert {c["name"] for c in sa.inspect(conn).get_columns("teams")} == {"id", "name"}
    engine.dispose()
