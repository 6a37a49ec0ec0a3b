"""SRE walkthrough: ``doctor --freshness`` with the database down said "Connection refused; check
DATABASE_URL and run `clerk-sync migrate`" (exit 1): migrate cannot help a refused connection. It now
answers as the cron commands do: down, exit 3 and retry once it answers; not migrated, exit 2 and run the
migrations."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from tests._server import free_port
from tests.test_cli import run


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "mysql+mysqldb"])
def test_freshness_on_a_database_that_refuses_connections_says_retry_and_exits_3(scheme: str) -> None:
    url = f"{scheme}://app@127.0.0.1:{free_port()}/x"  # nothing listens there
    result = run("doctor", "--freshness", env={"DATABASE_URL": url})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 3, out
    assert "Check DATABASE_URL, and that the database is up: retry once it answers" in out, out
    assert "migrate" not in out, out


def test_freshness_on_an_unmigrated_database_says_migrate_and_exits_2(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    migrations.downgrade(engine, "base")  # as before clerk-sync's migrations ran (a table missing under the
    engine.dispose()  # version of a migrated schema: test_schema_tables_missing)
    result = run("doctor", "--freshness", env={"DATABASE_URL": db_url})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert "schema at nothing" in out and "run `clerk-sync migrate`" in out, out
    assert "retry" not in out, out
