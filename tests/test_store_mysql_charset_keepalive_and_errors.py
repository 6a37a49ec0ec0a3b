"""Operations and the MySQL/MariaDB store, each once broken: a URL's charset that could never store an emoji, a vanished
MariaDB host waited on for the kernel's 2 hours, a refused value quoted into ``last_error``/logs/spans on
PostgreSQL, a migration leaving a pooled connection without its statement bound, a killed statement taken as
the app table's refusal of the row."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync._db_errors import passing_cause
from clerk_sync.clerk_api import ClerkClient
from clerk_sync.config import DatabaseTimeouts
from clerk_sync.errors import ConfigError
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, migrate_schema
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import webhook_events
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.conftest import MYSQL_URL, mysql_database
from tests.test_hooks import deliver

SECRET_VALUE = "alice.private@example.com"


@pytest.mark.parametrize("charset", ["utf8", "utf8mb3", "latin1", "UTF8"])
def test_a_url_charset_that_cannot_hold_an_emoji_is_refused_at_start(charset: str) -> None:
    """Fixed: ``?charset=utf8`` (utf8mb3, common in older URLs) was kept: the tables are utf8mb4, the
    connection was not, and every delivery with an emoji answered 503 forever (nothing stored to replay)."""
    with pytest.raises(ConfigError, match=rf"charset={charset}.*emoji.*remove \?charset="):
        create_engine(f"mysql+mysqldb://root@127.0.0.1:3306/test?charset={charset}")


@pytest.mark.parametrize("query", ["charset=utf8&charset=utf8mb4", "charset=utf8mb4&charset=latin1"])
def test_a_repeated_charset_that_cannot_hold_an_emoji_is_refused_too(query: str) -> None:
    with pytest.raises(ConfigError, match=rf"charset={query.split('&charset=')[0].split('=')[1]}&charset="):
        create_engine(f"mysql+mysqldb://root@127.0.0.1:3306/test?{query}")


@pytest.mark.mariadb
@pytest.mark.parametrize("query", ["charset=UTF8MB4", "charset=utf8mb4&charset=utf8mb4"])
def test_an_emoji_is_stored_when_the_url_names_utf8mb4(query: str) -> None:
    """Fixed: the URL's charset repeated (a list to SQLAlchemy) was refused even when every one is utf8mb4."""
    with mysql_database() as url:
        engine = create_engine(f"{url}?{query}")
        migrations.upgrade(engine)
        store = Store(engine)
        try:
            user = f.user("user_e", 100)
            user["first_name"] = "Ada \U0001f984"
            assert deliver(store, f.envelope("user.created", user)) == ["applied"]
        finally:
            store.dispose()


@pytest.mark.mariadb
def test_a_mariadb_connection_keeps_tcp_keepalives_as_postgresql_does() -> None:
    """Fixed: ``keepalive_s`` went to libpq only; a statement sent to a MariaDB host that vanished
    waited in recv for the kernel's 7200 s, its writer thread with it."""
    with mysql_database() as url:
        tcp = sa.engine.make_url(url).set(host="127.0.0.1").render_as_string(hide_password=False)
        engine = create_engine(tcp, timeouts=DatabaseTimeouts(keepalive_s=7))
        try:
            with engine.connect() as conn:
                fd = conn.connection.driver_connection.fileno()  # type: ignore[union-attr]
                with socket.socket(fileno=os.dup(fd)) as sock:
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                assert conn.exec_driver_sql("SELECT 1").scalar() == 1  # the driver's socket still works
        finally:
            engine.dispose()


@pytest.mark.parametrize("value", [SECRET_VALUE, f"{SECRET_VALUE}\nand a second line", f'x"{SECRET_VALUE}\nmore"'],
                         ids=["one-line", "two-lines", "a-quote-then-lines"])
def test_a_value_a_mapped_column_refuses_is_not_quoted_into_the_record(db_url: str, value: str) -> None:
    """Fixed: PostgreSQL's data errors quote the value on their first line (``invalid input syntax for
    type integer: "alice@.."``): a user-typed metadata value reached ``last_error``, the log line and the span,
    where an erasure cannot reach it. Also: a value on two lines has its closing quote past the first line
    (which alone is kept), and was kept whole."""
    table = sa.Table("ages", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("age", sa.Integer))
    mapping = SchemaMapping(users=MappedTable("ages", "clerk_user_id", {"age": Column("unsafe_metadata.age")}))
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        table.create(conn)
        migrate_schema(conn, mapping)
    engine.dispose()
    store = Store.from_url(db_url, mapping=mapping)
    try:
        user = f.user("user_p", 1000)
        user["unsafe_metadata"] = {"age": value}
        deliver(store, f.envelope("user.created", user))
        with store.connect() as conn:
            errors = conn.execute(sa.select(webhook_events.c.last_error)).scalars().all()
        assert errors and all(e is None or SECRET_VALUE not in e for e in errors), errors
        if store.dialect == "postgresql":  # the refusal is on record, without the value
            assert any(e and 'invalid input syntax for type integer: "…"' in e for e in errors), errors
    finally:
        store.dispose()


@pytest.mark.mariadb
def test_a_migration_gives_its_pooled_connection_back_with_the_statement_bound() -> None:
    """Fixed: the migration lifted ``max_statement_time`` for its DDL and never set it back; ``serve``
    migrates on its own engine, so one pooled connection served deliveries unbounded for up to an hour."""
    with mysql_database() as url:
        engine = create_engine(url, timeouts=DatabaseTimeouts(statement_s=15), pool_size=1, max_overflow=0)
        try:
            migrations.upgrade(engine)
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT @@SESSION.max_statement_time").scalar() == 15
        finally:
            engine.dispose()


@pytest.mark.mariadb
def test_a_statement_killed_from_outside_is_the_databases_passing_state() -> None:
    """Fixed: MariaDB's 1317 (KILL QUERY by an operator or a proxy's query killer) was taken as the
    app table's refusal of the row, so the mapped row was dropped for good (PostgreSQL's 57014 was retried)."""
    with mysql_database() as url:
        engine = create_engine(url)
        admin = sa.create_engine(MYSQL_URL)
        try:
            with engine.connect() as conn:
                victim = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
                started = threading.Event()

                def kill() -> None:
                    started.wait(10)
                    with admin.connect() as other:
                        for _ in range(100):  # until the SLEEP is running on the victim
                            state = other.execute(sa.text("SELECT info FROM information_schema.processlist "
                                                          "WHERE id = :id"), {"id": victim}).scalar()
                            if state and "SLEEP" in str(state):
                                other.exec_driver_sql(f"KILL QUERY {int(victim)}")
                                return
                            time.sleep(0.05)

                killer = threading.Thread(target=kill)
                killer.start()
                started.set()
                with pytest.raises(sa.exc.DBAPIError) as killed:
                    conn.exec_driver_sql("SELECT SLEEP(30)")
                killer.join()
            assert killed.value.orig.args[0] in (1317, 1927)  # type: ignore[union-attr]
            assert passing_cause(killed.value) is killed.value
        finally:
            engine.dispose()
            admin.dispose()


def test_the_console_drift_run_counts_in_the_reconcile_series(store: Store, clerk: ClerkClient,
                                                               emu: EmulatorServer) -> None:
    """Fixed: no shipped entry point gave its Reconciler the metrics, so ``clerk_sync_reconcile_runs_total``
    and ``_drift_total`` (listed in the README) never moved; the console's drift run in ``serve`` now counts."""
    from datetime import UTC, datetime

    from clerk_sync.integrations.console._drift import DriftJob
    from clerk_sync.metrics import Metrics

    emu.create_user("drift@example.com")  # in Clerk, not here: one to create
    metrics = Metrics()
    job = DriftJob(store, clerk, now=lambda: datetime.now(UTC), metrics=metrics)
    job.start(dry_run=True, actor=None, ip=None)
    assert job.wait(60)
    assert job.snapshot()["status"] == "done", job.snapshot()
    assert metrics.registry.get_sample_value("clerk_sync_reconcile_runs_total", {"result": "dry_run"}) == 1
    # a dry run repairs nothing: its drift is not counted (every preview of the page added it again, review)
    assert metrics.registry.get_sample_value("clerk_sync_reconcile_drift_total",
                                             {"entity": "users", "action": "created"}) is None
    job.start(dry_run=False, actor=None, ip=None)
    assert job.wait(60)
    assert job.snapshot()["status"] == "done", job.snapshot()
    assert metrics.registry.get_sample_value("clerk_sync_reconcile_runs_total", {"result": "completed"}) == 1
    assert metrics.registry.get_sample_value("clerk_sync_reconcile_drift_total",
                                             {"entity": "users", "action": "created"}) == 1
