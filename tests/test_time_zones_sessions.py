"""Database sessions clerk-sync does not set up itself: a ``DATABASE_URL`` carrying its own MariaDB
``init_command``, an app's own engine whose sessions are in another time zone (its mapped TIMESTAMP columns, and
reconcile's resume and takeover). Zones are set per connection by the test, never on the server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import mysql

from clerk_sync import mapping as mapping_module
from clerk_sync import migrations
from clerk_sync.clerk_api.ratelimit import RateLimit
from clerk_sync.errors import ClerkUnavailable, ReconcileBusy, StoreError
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import GroupCommitter
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete, migrate_schema
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import reconcile_runs
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.conftest import clerk_client, mysql_database, pg_schema
from tests.test_hooks import deliver
from tests.test_reconcile import RETRY
from tests.test_time_zones import in_zone, session_zone

# -- a DATABASE_URL's own init_command (MariaDB) ------------------------------------------------------------

THEIRS = "SET SESSION group_concat_max_len = 12345, time_zone = '+05:00', sql_mode = 'ANSI_QUOTES'"


@pytest.mark.mariadb
@pytest.mark.parametrize("driver", ["mysqldb", "pymysql"])
@pytest.mark.parametrize("given_in", ["url", "connect_args"])
def test_an_init_command_of_the_url_runs_before_clerk_syncs_session_settings(driver: str, given_in: str) -> None:
    """Fixed: the URL's ``init_command`` (or one in ``connect_args``) was replaced by clerk-sync's without a word
    (its ``group_concat_max_len`` never set), or replaced clerk-sync's (the session's zone and sql_mode not UTC and
    strict). Both run now, theirs first: where both set a variable, clerk-sync's wins, and before SQLAlchemy reads
    ``sql_mode`` on the first connection (it took ANSI_QUOTES from theirs, and quoted names with ``"``)."""
    with mysql_database() as url:
        parsed = sa.engine.make_url(url).set(drivername=f"mysql+{driver}")
        kwargs: dict[str, Any] = {}
        if given_in == "url":
            parsed = parsed.update_query_dict({"init_command": THEIRS})
        else:
            kwargs["connect_args"] = {"init_command": THEIRS}
        engine = create_engine(parsed.render_as_string(hide_password=False), **kwargs)
        migrations.upgrade(engine)  # (quoted names throughout: refused if the dialect quoted them with ")
        with engine.connect() as conn:
            length, zone, mode = conn.exec_driver_sql(
                "SELECT @@session.group_concat_max_len, @@session.time_zone, @@session.sql_mode").one()
        assert (int(length), zone) == (12345, "+00:00")
        assert "STRICT_ALL_TABLES" in mode and "ANSI_QUOTES" not in mode
        assert engine.dialect.identifier_preparer.initial_quote == "`"
        engine.dispose()


@pytest.mark.mariadb
def test_an_option_files_init_command_runs_before_clerk_syncs_session_settings(tmp_path: Path) -> None:
    """Fixed: an ``init-command`` in a MySQL option file (``?read_default_file=``, which the Django integration
    passes from ``OPTIONS``) ran after clerk-sync's settings, given as the driver's ``init_command``: the session
    was left in +05:00 without strict mode, and SQLAlchemy took ANSI_QUOTES for its identifier quote. clerk-sync's
    settings now follow every init_command, the option file's too."""
    option_file = tmp_path / "my.cnf"
    option_file.write_text(f"[client]\ninit-command={THEIRS}\n")
    with mysql_database() as url:
        parsed = sa.engine.make_url(url).set(drivername="mysql+mysqldb")
        engine = create_engine(parsed.update_query_dict({"read_default_file": str(option_file)})
                               .render_as_string(hide_password=False))
        migrations.upgrade(engine)
        with engine.connect() as conn:
            length, zone, mode = conn.exec_driver_sql(
                "SELECT @@session.group_concat_max_len, @@session.time_zone, @@session.sql_mode").one()
        assert (int(length), zone) == (12345, "+00:00")
        assert "STRICT_ALL_TABLES" in mode and "ANSI_QUOTES" not in mode
        assert engine.dialect.identifier_preparer.initial_quote == "`"
        engine.dispose()


# -- an app's own engine: mapped TIMESTAMP columns (MariaDB) -------------------------------------------------


@pytest.fixture
def maria() -> Iterator[str]:
    with mysql_database() as url:
        engine = create_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        yield url


def _has_named_zones(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT CONVERT_TZ('2026-01-01', '+00:00', 'America/New_York')").scalar() \
            is not None


@pytest.mark.mariadb
@pytest.mark.parametrize(("zone", "instant"), [
    ("+13:00", datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)),
    # 01:30 in New York for the second time (EST): the wall clock alone cannot tell it from the first (EDT)
    ("America/New_York", datetime(2026, 11, 1, 6, 30, 0, 123000, tzinfo=UTC)),
])
def test_mapped_timestamp_columns_hold_the_instant_through_an_apps_engine_in_another_zone(
        maria: str, zone: str, instant: datetime) -> None:
    """Fixed: through an app's own engine whose sessions are not UTC, the UTC wall clock clerk-sync writes into a
    TIMESTAMP column (which converts from the session's zone) was stored shifted by the zone: 13 hours off under
    +13:00. The mapped writes now run in UTC, and the app's connections are handed back in their own zone."""
    utc_engine = create_engine(maria)  # a UTC session: it reads what was written
    if "/" in zone and not _has_named_zones(utc_engine):
        utc_engine.dispose()
        pytest.skip("MariaDB's time zone tables are not loaded (mariadb-tzinfo-to-sql)")
    url = sa.engine.make_url(maria).update_query_dict({"init_command": f"SET time_zone = '{zone}'"})
    engine = sa.create_engine(url)  # the app's, not clerk-sync's create_engine
    table = sa.Table("acc_ts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)),
                     sa.Column("seen", mysql.TIMESTAMP(fsp=3), nullable=True),
                     sa.Column("deleted_at", mysql.TIMESTAMP(fsp=6), nullable=True))
    mapping = SchemaMapping(users=MappedTable("acc_ts", "clerk_user_id", {
        "email": "email", "seen": Column("last_sign_in_at", transform="timestamp")},
        on_delete=SoftDelete("deleted_at")))
    with engine.begin() as conn:
        table.create(conn)
        migrate_schema(conn, mapping)
    deleted = datetime(2026, 3, 8, 6, 59, 50, 250000, tzinfo=UTC)
    store = Store(engine, mapping=mapping, now=lambda: deleted)
    u = f.user("user_ts", 1_800_000_000_000)
    u["last_sign_in_at"] = int(instant.timestamp() * 1000)
    assert deliver(store, f.envelope("user.created", u)) == ["applied"]
    assert deliver(store, f.envelope("user.deleted", {"id": "user_ts", "deleted": True})) == ["applied"]
    with utc_engine.connect() as conn:
        seen, deleted_at = conn.execute(sa.select(table.c.seen, table.c.deleted_at)).one()
    assert (seen.replace(tzinfo=UTC), deleted_at.replace(tzinfo=UTC)) == (instant, deleted)
    assert isinstance(engine.pool, sa.pool.QueuePool)
    pooled = engine.pool.checkedin()  # every connection the writes used is back in the app's zone
    held = [engine.connect() for _ in range(pooled)]
    assert [c.exec_driver_sql("SELECT @@session.time_zone").scalar() for c in held] == [zone] * pooled
    for c in held:
        c.close()
    store.dispose()
    utc_engine.dispose()


# -- reconcile's resume and takeover through an app's engine in +13:45 (PostgreSQL) / +13:00 (MariaDB) ---------


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])
def zoned_engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """An app's own engine (plain SQLAlchemy) on a migrated database, every session of it in Chatham's zone
    (PostgreSQL's ``options=-ctimezone=``; MariaDB: ``init_command`` +13:00, the driver's own)."""
    with (pg_schema() if request.param == "postgres" else mysql_database()) as url:
        own = create_engine(url)
        migrations.upgrade(own)
        own.dispose()
        engine = sa.create_engine(in_zone(url))
        assert session_zone(engine) in ("Pacific/Chatham", "+13:00")
        yield engine
        engine.dispose()


@pytest.mark.parametrize("since", [None, datetime(2020, 1, 1, 12, tzinfo=ZoneInfo("Pacific/Chatham"))])
def test_reconcile_resumes_and_is_taken_over_by_its_instants_under_a_zoned_session(
        zoned_engine: sa.Engine, emu: EmulatorServer, since: datetime | None) -> None:
    """A failed run whose process is gone, still marked running: at 59 s of silence (stale_after_s=60) it is
    live and not taken over; at 61 s it is, and resumed from its cursor with its ``since`` (read back from the
    zoned session as the same instant), not started again. A heartbeat read as the wrong zone would be hours
    off, one way or the other."""
    t0 = datetime(2026, 3, 8, 6, 59, 50, tzinfo=UTC)
    clock = [t0]
    store = Store(zoned_engine, now=lambda: clock[0])
    emu.emulator.bulk_create_users(300)
    with clerk_client(emu, limit=RateLimit(200, 1.0), retry=RETRY) as clerk:
        calls = {"n": 0}
        real = clerk.list_users

        def flaky(**kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 4:
                raise ClerkUnavailable("simulated outage", retry_after=1.0)
            return real(**kwargs)

        clerk.list_users = flaky  # type: ignore[method-assign]
        with pytest.raises(ClerkUnavailable):
            Reconciler(store, clerk, page_size=50, prefetch=1, stale_after_s=60).run(since=since)
        with store.transaction() as writer:  # as if killed mid-run: still marked running
            writer.conn.execute(reconcile_runs.update().values(status="running"))
        with store.connect() as conn:
            run = conn.execute(sa.select(reconcile_runs)).mappings().one()
        assert 0 < run["cursor"] < 300
        clock[0] = t0 + timedelta(seconds=59)
        with pytest.raises(ReconcileBusy, match=r"last progress 59s ago"):
            Reconciler(store, clerk, page_size=50, prefetch=1, stale_after_s=60).run(since=since)
        clock[0] = t0 + timedelta(seconds=61)
        report = Reconciler(store, clerk, page_size=50, prefetch=1, stale_after_s=60).run(since=since)
    assert report.resumed and report.run_id == run["id"] and report.counts["users"].created == 300
    with store.connect() as conn:
        done = conn.execute(sa.select(reconcile_runs)).mappings().one()
    assert done["status"] == "completed"
    store.dispose()


# -- the session's zone put back: a connection lost mid-write, a put-back refused (MariaDB) ----------------------


def _zoned_app(url: str, zone: str = "+05:00") -> tuple[sa.Engine, SchemaMapping]:
    """An app's own engine whose sessions are in ``zone``, and a mapping into its table with a TIMESTAMP column."""
    engine = sa.create_engine(sa.engine.make_url(url).update_query_dict({"init_command": f"SET time_zone = '{zone}'"}))
    table = sa.Table("acc_ts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)),
                     sa.Column("seen", mysql.TIMESTAMP(fsp=3), nullable=True))
    mapping = SchemaMapping(users=MappedTable("acc_ts", "clerk_user_id", {
        "email": "email", "seen": Column("last_sign_in_at", transform="timestamp")}))
    with engine.begin() as conn:
        table.create(conn)
        migrate_schema(conn, mapping)
    return engine, mapping


@pytest.mark.mariadb
def test_a_connection_lost_during_a_mapped_timestamp_write_is_reported_as_lost(
        maria: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: the connection KILLed during the write, putting the session's zone back on it raised SQLAlchemy's
    PendingRollbackError ("Can't reconnect until invalid savepoint transaction is rolled back"), which replaced the
    real cause in the log and the delivery's ``last_error``. The lost connection is what is reported now."""
    engine, mapping = _zoned_app(maria)
    killer = sa.create_engine(maria, isolation_level="AUTOCOMMIT")
    real = mapping_module._Projection.apply

    def killed(self: Any, conn: sa.Connection, *args: Any, **kwargs: Any) -> None:
        with killer.connect() as other:
            other.exec_driver_sql(f"KILL {conn.exec_driver_sql('SELECT CONNECTION_ID()').scalar()}")
        real(self, conn, *args, **kwargs)

    monkeypatch.setattr(mapping_module._Projection, "apply", killed)
    store = Store(engine, mapping=mapping)
    with pytest.raises(StoreError) as raised:
        deliver(store, f.envelope("user.created", f.user("user_ts", 1_800_000_000_000)))
    assert "PendingRollbackError" not in str(raised.value)
    assert "OperationalError" in str(raised.value) and "Lost connection" in str(raised.value)
    store.dispose()
    killer.dispose()


@pytest.mark.mariadb
def test_a_connection_lost_at_the_zones_put_back_is_reported_as_lost_not_as_the_rows_refusal(maria: str) -> None:
    """The write done, the connection KILLed just before the session's zone was put back: the put-back's error was
    swallowed, leaving the savepoint raised PendingRollbackError, which the outbox took for the app row's own
    refusal (a ``mapped_row_refused`` warning) and the delivery reported in place of the lost connection."""
    engine, mapping = _zoned_app(maria)
    killer = sa.create_engine(maria, isolation_level="AUTOCOMMIT")
    killed: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _kill_at_put_back(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("SET time_zone = ") and "'+00:00'" not in statement and not killed:
            killed.append(statement)
            with killer.connect() as other:
                other.exec_driver_sql(f"KILL {cursor.connection.thread_id()}")

    store = Store(engine, mapping=mapping)
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(StoreError) as raised:
            deliver(store, _updated("user_putback", 1, datetime(2026, 3, 8, tzinfo=UTC)))
    finally:
        store.dispose()
        killer.dispose()
    assert killed, "the put-back never ran: the test's zone is UTC?"
    assert "PendingRollbackError" not in str(raised.value), raised.value
    assert "Lost connection" in str(raised.value) or "server has gone away" in str(raised.value), raised.value
    assert not [e for e in logs if e["event"] == "mapped_row_refused"], logs


def _zone_statements(engine: sa.Engine) -> list[str]:
    """Every statement ``engine`` sends from now on that reads or sets ``time_zone``."""
    sent: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "time_zone" in statement:
            sent.append(statement.split()[0].upper())
    return sent


def _batch(store: Store, *events: dict[str, Any]) -> list[Any]:
    """``events`` written as one group-commit batch: one transaction."""
    committer = GroupCommitter(WebhookProcessor(store, WebhookVerifier([f.SECRET])))
    results = committer.write([(f"msg_{n}_{e['data']['id']}_{e['type']}", parse_envelope(f.body_of(e)))
                               for n, e in enumerate(events)])
    return [r.status for r in results]


def _updated(clerk_id: str, version: int, seen: datetime) -> dict[str, Any]:
    u = f.user(clerk_id, version)
    u["last_sign_in_at"] = int(seen.timestamp() * 1000)
    return f.envelope("user.updated" if version > 1 else "user.created", u)


@pytest.mark.mariadb
def test_the_session_zone_is_asked_once_a_transaction_and_systems_utc_is_utc(maria: str) -> None:
    """Fixed: every mapped write to a table with a TIMESTAMP column asked ``SELECT @@session.time_zone``, on
    clerk-sync's own engine too (its sessions set to UTC), once per delivery of a group-commit batch; and MariaDB's
    default ``SYSTEM`` on a UTC host was taken for another zone: set and put back around every write (7 statements a
    delivery became 10). Now one question a transaction, and nothing set where the session is UTC."""
    own = create_engine(maria)
    _, mapping = _zoned_app(maria)
    at = datetime(2026, 3, 8, 6, 59, 50, 250000, tzinfo=UTC)
    store = Store(own, mapping=mapping)
    sent = _zone_statements(own)
    assert deliver(store, _updated("user_a", 1, at)) == ["applied"]
    assert sent == ["SELECT"]  # a delivery alone: one question
    sent.clear()
    assert _batch(store, *(_updated(f"user_{n}", 1, at) for n in "bcdef")) == ["applied"] * 5
    assert sent == ["SELECT"]  # a batch of five: still one
    store.dispose()

    plain = sa.create_engine(maria)  # an app's engine left at the server's default zone
    with plain.connect() as conn:
        default = tuple(conn.exec_driver_sql("SELECT @@session.time_zone, @@system_time_zone").one())
    store = Store(plain, mapping=mapping)
    sent = _zone_statements(plain)
    assert _batch(store, *(_updated(f"user_{n}", 2, at) for n in "abc")) == ["applied"] * 3
    if default in (("SYSTEM", "UTC"), ("+00:00", "UTC"), ("UTC", "UTC")):
        assert sent == ["SELECT"]
    with own.connect() as conn:
        assert {s.replace(tzinfo=UTC) for s in conn.execute(sa.text("SELECT seen FROM acc_ts")).scalars()} == {at}
    store.dispose()
    plain.dispose()


@pytest.mark.mariadb
def test_a_zone_changed_between_transactions_is_seen(maria: str) -> None:
    """The answer is the transaction's: a pooled connection the app moved to another zone since (its own SET) is
    written in UTC all the same, and handed back in the zone the app left it in."""
    engine, mapping = _zoned_app(maria)
    at = datetime(2026, 3, 8, 6, 59, 50, 250000, tzinfo=UTC)
    store = Store(engine, mapping=mapping)
    engine.pool.dispose()
    sent = _zone_statements(engine)
    assert _batch(store, *(_updated(f"user_{n}", 1, at) for n in "ab")) == ["applied"] * 2
    assert sent == ["SELECT", "SET", "SET", "SET", "SET"]  # asked once; to UTC and back around each write
    with engine.connect() as conn:  # the pool's one connection
        conn.exec_driver_sql("SET time_zone = '+07:00'")
        conn.commit()
    assert engine.pool.checkedin() == 1
    later = at + timedelta(hours=1)
    assert deliver(store, _updated("user_a", 2, later)) == ["applied"]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT @@session.time_zone").scalar() == "+07:00"
        conn.exec_driver_sql("SET time_zone = '+00:00'")
        seen = {k: v for k, v in conn.execute(sa.text("SELECT clerk_user_id, seen FROM acc_ts"))}
        conn.exec_driver_sql("SET time_zone = '+05:00'")
    assert {k: v.replace(tzinfo=UTC) for k, v in seen.items()} == {"user_a": later, "user_b": at}
    store.dispose()
    engine.dispose()


@pytest.mark.mariadb
def test_a_zone_not_put_back_on_a_live_connection_keeps_it_out_of_the_apps_pool(
        maria: str) -> None:
    """Fixed: putting the session's zone back refused on a connection still alive (a KILL QUERY landing on it) was
    swallowed, and the connection went back to the app's pool in UTC: the app's own TIMESTAMP writes and reads
    through it shifted. It is now closed at its next checkout (this transaction goes on), and logged."""
    engine, mapping = _zoned_app(maria)
    store = Store(engine, mapping=mapping)
    refused = {"n": 0}

    @sa.event.listens_for(engine, "before_cursor_execute", retval=True)
    def _refuse(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> tuple[str, Any]:
        if statement.startswith("SET time_zone = ") and "'+00:00'" not in statement and not refused["n"]:
            refused["n"] += 1
            return "SET time_zone = 'No/Such_Zone'", ()  # (1298 unknown or incorrect time zone)
        return statement, parameters

    with structlog.testing.capture_logs() as logs:
        assert deliver(store, _updated("user_a", 1, datetime(2026, 3, 8, tzinfo=UTC))) == ["applied"]
    assert refused["n"] == 1
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT @@session.time_zone").scalar() == "+05:00"
    assert [e["zone"] for e in logs if e["event"] == "mapped_time_zone_not_put_back"] == ["+05:00"]
    store.dispose()
    engine.dispose()
