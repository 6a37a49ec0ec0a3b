"""A disconnect seen through ``driver_cursor`` (the organization standing's read, the ingest's and the dispatcher's
direct statements) is handled as SQLAlchemy's own execute handles one: after a database restart every pooled
connection is dead, and the first failure marks them all stale, so each is replaced at its next checkout. Before,
only the failing connection was dropped: each of the others failed one request in turn (503 to up to pool-size
requests). This also pins the private SQLAlchemy call it relies on (``Pool._invalidate``, see driver_cursor).

Real servers: the pool's connections are killed by an admin connection, as a restart kills them."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from clerk_sync._db_errors import driver_cursor
from clerk_sync.store import create_engine

SERVERS = [pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("mariadb", marks=pytest.mark.mariadb)]


def _kill_all(admin_url: str, engine: sa.Engine, size: int) -> None:
    """Check ``size`` connections out of ``engine``'s pool, back in, then kill each server-side."""
    held = [engine.connect() for _ in range(size)]
    postgres = engine.dialect.name == "postgresql"
    ids = [c.exec_driver_sql("SELECT pg_backend_pid()" if postgres else "SELECT CONNECTION_ID()").scalar_one()
           for c in held]
    for conn in held:
        conn.close()
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for backend in ids:
                conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(backend)})" if postgres else
                                     f"KILL {int(backend)}")
    finally:
        admin.dispose()


@pytest.mark.parametrize("db_url", SERVERS, indirect=True)
def test_after_a_restart_one_read_fails_and_the_pool_replaces_every_connection(db_url: str) -> None:
    engine = create_engine(db_url, pool_size=4)
    try:
        _kill_all(db_url, engine, 4)
        outcomes: list[object] = []
        for _ in range(6):
            try:
                with engine.connect() as conn, driver_cursor(conn, "SELECT 1") as cur:
                    cur.execute("SELECT 1")
                    outcomes.append(cur.fetchone()[0])
            except sa.exc.DBAPIError as exc:
                outcomes.append(("invalidated", exc.connection_invalidated))
        assert outcomes == [("invalidated", True), 1, 1, 1, 1, 1]
    finally:
        engine.dispose()


class _CloseRefused:
    """A driver cursor whose close fails after closing it (mysqlclient's 2014, "Commands out of sync")."""

    def __init__(self, cursor: Any, error: Exception) -> None:
        self._cursor, self._error = cursor, error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def close(self) -> None:
        self._cursor.close()
        raise self._error


@pytest.mark.parametrize("db_url", SERVERS, indirect=True)
def test_a_cursor_that_will_not_close_after_an_error_leaves_the_error_as_it_was(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement's error that is no disconnect (a missing table) comes out, not the cursor's refusal to close
    (which replaced it: an OperationalError no one could act on, unclassified); the refusal is logged at debug."""
    engine = create_engine(db_url)
    dbapi: Any = engine.dialect.dbapi
    try:
        with engine.connect() as conn:
            driver: Any = type(conn.connection.driver_connection)  # (mysqlclient's instance takes no attribute)
            real = driver.cursor
            refused = dbapi.OperationalError(2014, "Commands out of sync; you can't run this command now")
            monkeypatch.setattr(driver, "cursor", lambda self, *args, **kwargs: _CloseRefused(
                real(self, *args, **kwargs), refused))
            with capture_logs() as logs, pytest.raises(sa.exc.DBAPIError) as raised, \
                    driver_cursor(conn, "SELECT missing") as cur:
                cur.execute("SELECT * FROM fix3_no_such_table")
    finally:
        engine.dispose()
    assert isinstance(raised.value.orig, dbapi.ProgrammingError) and not raised.value.connection_invalidated
    assert [(e["event"], e["log_level"], e["error"]) for e in logs] == [
        ("driver_cursor_close_failed", "debug", "OperationalError")]
