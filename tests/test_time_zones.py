"""clerk-sync where the clocks are not in UTC: a database session in another time zone (PostgreSQL's
``timezone``, MariaDB's ``time_zone``, set per connection by the test, never on the server) and a host whose
``TZ`` is not UTC. Stored times are instants: what one session writes, a UTC session reads as the same moment,
and every comparison (prune's ages, hook jobs' due times, the console's filters) is made between instants.

Pacific/Chatham is +13:45 (+12:45 in its winter): a time read as the wrong zone is off by hours and minutes.
MariaDB has no named zones unless its tables are loaded, and takes offsets up to +13:00.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from clerk_sync._http_deadline import retry_after
from clerk_sync.auth.authenticator import DenyList
from clerk_sync.changes import Hook
from clerk_sync.cli._args import parse_since
from clerk_sync.emulator.delivery import _retry_after_s as emulator_retry_after
from clerk_sync.freshness import read_snapshot
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.ingest import replay_deliveries
from clerk_sync.integrations.console import _queries as q
from clerk_sync.integrations.console._console import _when
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, migrate_schema
from clerk_sync.outbox import claim
from clerk_sync.reconcile import Reconciler
from clerk_sync.retention import Retention, RetentionPolicy
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import audit_log, hook_jobs, users, webhook_events
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.console.conftest import make_stack, operator_client
from tests.console.test_http import HTML
from tests.test_cli import run as run_cli
from tests.test_hooks import Clock, Recorder, deliver
from tests.test_lock_expiry import Clock as LockClock
from tests.test_lock_expiry import _client as lock_client

PG_ZONE, MARIADB_ZONE = "Pacific/Chatham", "+13:00"
T0 = datetime(2026, 3, 8, 6, 59, 50, tzinfo=UTC)  # ten seconds before New York's clocks go forward


def in_zone(db_url: str, pg_zone: str = PG_ZONE, mariadb_zone: str = MARIADB_ZONE) -> str:
    """``db_url`` whose every connection's session is in another time zone (SQLite has none)."""
    url = sa.engine.make_url(db_url)
    if url.get_backend_name() == "postgresql":
        options = f"{url.query.get('options', '')} -ctimezone={pg_zone}".strip()
        url = url.update_query_dict({"options": options})
    elif url.get_backend_name() == "mysql":
        url = url.update_query_dict({"init_command": f"SET time_zone = '{mariadb_zone}'"})
    return url.render_as_string(hide_password=False)


def session_zone(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return str(conn.exec_driver_sql("SHOW timezone").scalar())
        if engine.dialect.name in ("mysql", "mariadb"):
            return str(conn.exec_driver_sql("SELECT @@session.time_zone").scalar())
    return None


@pytest.fixture
def zoned(db_url: str) -> str:
    """The migrated ``db_url``, every session of it in Chatham's zone (MariaDB: +13:00; but see
    :func:`zoned_store`)."""
    url = in_zone(db_url)
    engine = sa.create_engine(url)
    assert session_zone(engine) in (None, PG_ZONE, MARIADB_ZONE)  # the test's own set-up took
    engine.dispose()
    return url


def zoned_store(url: str, zone: str = MARIADB_ZONE, **kwargs: Any) -> Store:
    """A store on ``url``. On MariaDB clerk-sync's engine sets its sessions' time zone to UTC (after the URL's
    ``init_command``, whose zone it overrides), so the zone is set again once each connection is made, as an app's
    own connect event could: clerk-sync's DATETIME columns hold UTC whatever the session's zone."""
    store = Store(create_engine(url), **kwargs)
    if store.engine.dialect.name in ("mysql", "mariadb"):
        @sa.event.listens_for(store.engine, "connect")
        def _zone(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute(f"SET time_zone = '{zone}'")
            cursor.close()
    assert session_zone(store.engine) in (None, PG_ZONE, zone, "America/New_York")
    return store


def utc(value: datetime) -> datetime:
    """A read-back time as an instant: naive is UTC (SQLite, MariaDB, a column without a time zone)."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


# -- the inbox: received times, prune's ages --------------------------------------------------------------

def _record(store: Store, svix_id: str) -> None:
    with store.transaction() as w:
        w.record_delivery(svix_id, {"type": "user.created", "data": {}}, event_type="user.created",
                          instance_id=None, event_timestamp=None, status="applied")


def test_received_times_and_prune_ages_under_a_zoned_session(db_url: str, zoned: str) -> None:
    """Inbox rows written by a +13:45 session at 40 and 20 days ago read back, in a UTC session, as those
    instants; prune (30 days to redact, 35 to delete) redacts and deletes the older one only, and its dry run
    counts as much."""
    clock = Clock(T0 - timedelta(days=40))
    store = zoned_store(zoned, now=clock)
    _record(store, "msg_old")
    clock.t = T0 - timedelta(days=20)
    _record(store, "msg_new")
    with sa.create_engine(db_url).connect() as conn:  # a UTC session
        got = dict(conn.execute(sa.select(webhook_events.c.svix_id, webhook_events.c.received_at)).all())
    assert {k: utc(v) for k, v in got.items()} == {"msg_old": T0 - timedelta(days=40),
                                                   "msg_new": T0 - timedelta(days=20)}
    policy = RetentionPolicy(redact_after=timedelta(days=30), delete_after=timedelta(days=35))
    retention = Retention(store, policy, now=lambda: T0)
    dry = retention.prune(dry_run=True)
    assert (dry.deleted, dry.redacted) == (1, 1)
    report = retention.prune()
    assert (report.deleted, report.redacted) == (1, 1)
    with store.connect() as conn:
        assert conn.execute(sa.select(webhook_events.c.svix_id)).scalars().all() == ["msg_new"]
    store.dispose()


def test_the_console_shows_a_zoned_sessions_time_in_utc(db_url: str, zoned: str) -> None:
    """The overview's "last received" is labelled UTC: a PostgreSQL session in +13:45 hands the time back in
    its zone, and the console showed that wall clock (13 h 45 min off) as UTC."""
    store = zoned_store(zoned, now=lambda: T0)
    _record(store, "msg_1")
    with store.connect() as conn:
        figures = q.overview(conn, T0)
    assert _when(figures.last_received_at) == "2026-03-08 06:59:50"
    store.dispose()


# -- hook jobs: due times and backoff -----------------------------------------------------------------------

def test_hook_backoff_and_due_times_under_a_zoned_session_across_a_dst_change(db_url: str) -> None:
    """A job that fails at 06:59:50 UTC is due 20 s later, after New York's clocks went forward: with the
    session in America/New_York (MariaDB: -05:00) it is not claimed 1 s early and is claimed when due; its
    ``available_at`` reads back, in a UTC session, as that instant."""
    url = in_zone(db_url, pg_zone="America/New_York", mariadb_zone="-05:00")
    flaky = Recorder(failures=1)
    clock = Clock(T0)
    store = zoned_store(url, "-05:00", hooks=[Hook("mail", flaky, on=["user.created"])], now=clock)
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=3, base_s=20, max_s=20), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", 1000)))
    assert dispatcher.run_once() == 1  # fails
    with sa.create_engine(db_url).connect() as conn:
        (due,) = conn.execute(sa.select(hook_jobs.c.available_at)).scalars().all()
    assert utc(due) == T0 + timedelta(seconds=20)
    clock.advance(19)
    assert dispatcher.run_once() == 0
    clock.advance(1)
    assert dispatcher.run_once() == 1 and flaky.types == ["user.created", "user.created"]
    store.dispose()


def test_hook_due_times_under_a_plus_1345_session(db_url: str, zoned: str) -> None:
    flaky = Recorder(failures=1)
    clock = Clock(T0)
    store = zoned_store(zoned, hooks=[Hook("mail", flaky, on=["user.created"])], now=clock)
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=3, base_s=60, max_s=60), now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", 1000)))
    assert dispatcher.run_once() == 1
    clock.advance(59)
    assert dispatcher.run_once() == 0
    clock.advance(1)
    assert dispatcher.run_once() == 1
    store.dispose()


# -- mapped tables' date-time columns -----------------------------------------------------------------------

def test_mapped_date_time_columns_hold_the_instant_under_a_zoned_session(db_url: str, zoned: str) -> None:
    """``transform="timestamp"`` and a compute's aware (or naive, UTC) time into the app's date-time columns,
    written by a +13:45 session and read by a UTC one: a column with a time zone (timestamptz; MariaDB's TIMESTAMP, which
    converts from the session's zone: clerk-sync's engine keeps that UTC) holds the instant, and one without
    (timestamp, DATETIME; SQLite's any) UTC's wall clock, as clerk-sync's own tables do."""
    t = sa.Table("acc_tz", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", sa.String(320)),
                 sa.Column("seen_naive", sa.DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")),
                 sa.Column("seen_aware", sa.DateTime(timezone=True).with_variant(
                     mysql.TIMESTAMP(fsp=3), "mysql", "mariadb"), nullable=True),
                 sa.Column("computed", sa.DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")),
                 sa.Column("computed_aware", sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=3), "mysql",
                                                                                     "mariadb")),
                 sa.Column("naive_into_aware", sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=3), "mysql",
                                                                                       "mariadb")))
    expected = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    in_paris = expected.astimezone(timezone(timedelta(hours=1)))  # a compute's aware time, not in UTC
    mapping = SchemaMapping(users=MappedTable("acc_tz", "clerk_user_id", {
        "email": "email", "seen_naive": Column("last_sign_in_at", transform="timestamp"),
        "seen_aware": Column("last_sign_in_at", transform="timestamp"),
        "computed": Column(compute=lambda _: in_paris), "computed_aware": Column(compute=lambda _: in_paris),
        "naive_into_aware": Column(compute=lambda _: expected.replace(tzinfo=None))}))  # naive: UTC
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        t.create(conn)
        migrate_schema(conn, mapping)
    store = Store.from_url(zoned, mapping=mapping)
    if engine.dialect.name in ("mysql", "mariadb"):  # its engine's sessions are UTC (TIMESTAMP converts from them)
        assert session_zone(store.engine) == "+00:00"
    u = f.user("user_t1", 1_800_000_000_000)
    u["last_sign_in_at"] = 1_700_000_000_123
    assert deliver(store, f.envelope("user.created", u)) == ["applied"]
    with engine.connect() as conn:  # a UTC session
        got = conn.execute(sa.select(t.c.seen_naive, t.c.seen_aware, t.c.computed, t.c.computed_aware,
                                     t.c.naive_into_aware)).one()
    # (a driver dropped the compute's +01:00 on SQLite and MariaDB; PostgreSQL read a naive time into a
    # timestamptz column in the session's zone)
    assert [utc(v) for v in got] == [expected] * 5
    store.dispose()
    engine.dispose()


# -- the host's TZ -------------------------------------------------------------------------------------------

@pytest.fixture(params=["America/New_York", "Pacific/Chatham", "Asia/Kolkata"])
def host_tz(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def test_a_host_tz_moves_no_stored_time(db_url: str, host_tz: str) -> None:
    assert time.strftime("%z", time.localtime(T0.timestamp())) != "+0000"
    clock = Clock(T0 - timedelta(days=40))
    store = Store(create_engine(db_url), now=clock)
    _record(store, "msg_old")
    clock.t = T0
    _record(store, "msg_new")
    report = Retention(store, RetentionPolicy(redact_after=timedelta(days=10), delete_after=timedelta(days=35)),
                       now=lambda: T0).prune()
    assert report.deleted == 1
    with store.connect() as conn:
        figures = q.overview(conn, T0)
        (received,) = conn.execute(sa.select(webhook_events.c.received_at)).scalars().all()
    assert utc(received) == T0 and _when(figures.last_received_at) == "2026-03-08 06:59:50"
    assert parse_since("2026-03-08T06:59:50") == T0 == parse_since("2026-03-08T01:59:50-05:00")  # naive: UTC
    store.dispose()


# -- the console over a zoned PostgreSQL session: pages and the CSV export in UTC ------------------------------

@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_the_console_pages_filters_and_csv_are_in_utc_under_a_zoned_session(db_url: str) -> None:
    """The audit page's "when (UTC)" column, its since=/until= filters (UTC) and the CSV export, with the
    service's PostgreSQL sessions in +13:45: a row written at 06:59:50 UTC shows as that, is found by a
    window around it in UTC and not by one 13 h 45 min later, and is exported as ``...T06:59:50+00:00``
    (the page showed 20:44:50, the export ``+13:45``)."""
    with contextmanager(make_stack)(in_zone(db_url)) as stack:
        assert session_zone(stack.store.engine) == PG_ZONE
        with stack.store.transaction() as writer:
            writer.conn.execute(audit_log.insert().values(
                created_at=T0, action="impersonation.refused", actor_clerk_id=stack.admin_id,
                target_clerk_id="user_tz", details={}))
        with operator_client(stack) as client:
            page = client.get("/audit", params={"target": "user_tz"}, headers=HTML).text
            inside = client.get("/audit", params={"target": "user_tz", "since": "2026-03-08T06:59",
                                                  "until": "2026-03-08T07:00"}, headers=HTML).text
            later = client.get("/audit", params={"target": "user_tz", "since": "2026-03-08T07:00"},
                               headers=HTML).text
            exported = client.get("/audit.csv", params={"target": "user_tz"}).text
    assert "2026-03-08 06:59:50" in page and "20:44:50" not in page
    assert "user_tz" in inside.split("<tbody", 1)[-1] and "impersonation.refused" not in later.split("<tbody", 1)[-1]
    [row] = csv.DictReader(io.StringIO(exported))
    assert row["created_at"] == "2026-03-08T06:59:50+00:00"


# -- the CLI in another host TZ, over a session in another zone -----------------------------------------------

@pytest.mark.parametrize("host", ["Pacific/Chatham", "America/New_York"])
def test_replay_since_in_a_host_tz_over_a_zoned_session(db_url: str, host: str) -> None:
    """``clerk-sync replay --since`` run with ``TZ`` set, its database sessions in New York's zone on the day
    its clocks go forward: a naive ``--since`` is UTC, and the replay takes exactly the deliveries received at
    or after that instant (hourly from 06:00 to 18:00 UTC: 12:00 and after is 7 of them)."""
    start = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)
    with sa.create_engine(db_url).begin() as conn:
        for hour in range(13):
            conn.execute(webhook_events.insert().values(
                svix_id=f"msg_tz_{hour}", type="user.updated", received_at=start + timedelta(hours=hour),
                payload={"type": "user.updated", "data": {}}, status="failed", last_error="test"))
    url = in_zone(db_url, pg_zone="America/New_York", mariadb_zone="-05:00")
    result = run_cli("replay", "--status", "failed", "--since", "2026-03-08T12:00:00",
                     env={"DATABASE_URL": url, "TZ": host})
    assert "replayed 7 deliveries" in result.stdout + result.stderr, result.stdout + result.stderr


# -- an aware time in another zone, handed to the Python API --------------------------------------------------

def test_an_aware_time_in_another_zone_selects_by_its_instant_on_every_store(db_url: str) -> None:
    """``replay_deliveries(since=...)`` and a store clock given in New York's zone (an app's own ``now``):
    SQLite keeps a time as text without its offset, and SQLAlchemy's binding dropped it, so 07:00-05:00 was
    compared (and stamped) as 07:00 UTC, five hours off. Every store compares and stores the instant; a naive
    ``since`` is UTC, also over a PostgreSQL session in +13:45 (which read it in its own zone)."""
    new_york = ZoneInfo("America/New_York")
    start = datetime(2026, 1, 31, 6, 0, tzinfo=UTC)
    with sa.create_engine(db_url).begin() as conn:
        for hour in range(13):
            conn.execute(webhook_events.insert().values(
                svix_id=f"msg_ny_{hour}", type="user.updated", received_at=start + timedelta(hours=hour),
                payload={"type": "user.updated", "data": {}}, status="failed", last_error="test"))
    store = Store(create_engine(db_url), now=lambda: datetime(2026, 1, 31, 2, 30, tzinfo=new_york))
    since = datetime(2026, 1, 31, 7, 0, tzinfo=new_york)  # 12:00 UTC: 7 of the 13
    assert replay_deliveries(store, status="failed", since=since).total == 7
    with sa.create_engine(db_url).begin() as conn:
        conn.execute(webhook_events.update().values(status="failed"))
    zoned = zoned_store(in_zone(db_url))  # a naive time is UTC, also where the session's zone is not
    assert replay_deliveries(zoned, status="failed", since=datetime(2026, 1, 31, 12, 0)).total == 7
    zoned.dispose()
    _record(store, "msg_ny_stamp")
    with store.connect() as conn:
        stamped = conn.execute(sa.select(webhook_events.c.received_at)
                               .where(webhook_events.c.svix_id == "msg_ny_stamp")).scalar_one()
    assert utc(stamped) == datetime(2026, 1, 31, 7, 30, tzinfo=UTC)
    store.dispose()


# -- a naive clock means UTC on every host ------------------------------------------------------------------

def test_a_naive_wall_clock_is_utc_whatever_the_host_tz(db_url: str, host_tz: str) -> None:
    """``DenyList(wall=...)`` and ``Store(now=...)`` given naive clocks (``datetime.utcnow``'s kind): naive means
    UTC in clerk-sync, but ``.timestamp()`` read them in the host's zone, so on a New York host a lockout ended
    five hours early (and on a Kolkata one lasted 5 h 30 min too long), and a delivery's fallback time was
    shifted as much."""
    store = Store(create_engine(db_url), now=lambda: T0.replace(tzinfo=None))
    user = f.user("user_lock", 1000) | {"locked": True, "lockout_expires_in_seconds": 600}
    assert deliver(store, f.envelope("user.updated", user)) == ["applied"]
    with store.connect() as conn:
        ends_ms = conn.execute(sa.select(users.c.locked_until)).scalar_one()
    ends = datetime.fromtimestamp(ends_ms / 1000, UTC).replace(tzinfo=None)  # naive UTC
    during = DenyList(store, refresh_s=3600, wall=lambda: ends - timedelta(seconds=1))
    after = DenyList(store, refresh_s=3600, wall=lambda: ends)
    assert (during.blocked_reason("user_lock"), after.blocked_reason("user_lock")) == ("locked", None)
    assert store.now() == T0 and store.now().utcoffset() == timedelta(0)  # naive: read as UTC, given aware
    store.dispose()


@pytest.mark.parametrize("zone", ["Asia/Kolkata", "Pacific/Chatham"])
def test_reconcile_with_a_naive_clock_versions_a_tombstone_at_its_utc_instant(
        db_url: str, zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Reconciler(now=...)`` given a naive clock on a host east of UTC: the tombstone of a user deleted in
    Clerk (no webhook) was versioned at the clock read in the host's zone, hours before the user's own last
    update, so the deleted row kept that older version instead of the deletion's."""
    # Whole seconds: a fraction such as .8049996 is .805 once a datetime (microseconds, rounded), so the
    # expected version below would be one millisecond short of the stored one (int() truncates).
    clock = LockClock(float(int(time.time())))
    store = Store(create_engine(db_url), now=clock.utc)
    with EmulatorServer(clock=clock) as emu, lock_client(emu) as clerk:
        user = emu.create_user(email="gone@example.com")
        Reconciler(store, clerk, page_size=50).run()
        emu.request("DELETE", f"/v1/users/{user['id']}")
        clock.at += 60
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        try:
            Reconciler(store, clerk, page_size=50, now=lambda: clock.utc().replace(tzinfo=None)).run()
        finally:
            monkeypatch.undo()
            time.tzset()
    with store.connect() as conn:
        deleted_at, version = conn.execute(sa.select(users.c.deleted_at, users.c.clerk_updated_at)
                                           .where(users.c.clerk_id == user["id"])).one()
    assert deleted_at is not None and version == int(clock.at * 1000)
    store.dispose()


# -- Retry-After as an HTTP date in the asctime form ----------------------------------------------------------

def test_a_retry_after_date_in_the_asctime_form_is_gmt_whatever_the_host_tz(host_tz: str) -> None:
    """RFC 9110's third HTTP-date form (``Sun Nov  6 08:49:37 1994``, GMT like the others) parses naive, and
    ``.timestamp()`` read it in the host's zone: 30 s ahead became 5 h (capped) on a New York host, and
    already past (retry at once) on a Kolkata or Chatham one. The Clerk client and the emulator's delivery
    both read it as GMT."""
    now = time.time()
    ahead = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(int(now) + 30))
    assert 25 < retry_after({"retry-after": ahead}, default=1.0, cap=3600.0) <= 30
    assert emulator_retry_after(ahead, float(int(now))) == 30.0


# -- leases, freshness and the deny list's watermarks under a zoned session -----------------------------------

def test_leases_freshness_and_the_deny_list_under_a_plus_1345_session(db_url: str, zoned: str) -> None:
    """A hook job's lease (30 s) is not taken over 1 s before it ends and is once it has; the freshness
    snapshot (the metrics' and the doctor's) reads the newest delivery and the oldest due job at their
    instants; the deny list's incremental refresh (watermarked by the rows' own times) sees a ban written
    after its first load."""
    clock = Clock(T0)
    store = zoned_store(zoned, hooks=[Hook("mail", Recorder(), on=["user.created"])], now=clock)
    deliver(store, f.envelope("user.created", f.user("user_1", 1000)))
    snap = read_snapshot(store)
    assert (snap.newest_delivery_at, snap.hook_oldest_pending_at) == (T0.timestamp(), T0.timestamp())
    lease = timedelta(seconds=30)

    def claimed(at: datetime) -> int:
        with store.transaction() as writer:
            return len(claim(writer.conn, at, lease=lease, limit=10, max_attempts=5))

    assert claimed(T0) == 1
    assert claimed(T0 + timedelta(seconds=29)) == 0
    assert claimed(T0 + timedelta(seconds=31)) == 1

    ticks = [0.0]
    deny = DenyList(store, refresh_s=1, now=lambda: ticks[0], wall=clock)
    assert deny.blocked_reason("user_b") is None  # the first (full) load
    clock.advance(5)
    assert deliver(store, f.envelope("user.updated", f.user("user_b", 2000, banned=True))) == ["applied"]
    ticks[0] += 2
    assert deny.blocked_reason("user_b") == "banned"  # an incremental refresh
    store.dispose()


def test_a_dispatcher_with_a_naive_clock_claims_due_jobs_under_a_zoned_session(db_url: str, zoned: str) -> None:
    """``Dispatcher(now=...)`` given a naive clock (UTC) over a +13:45 session: the claim's own statement (psycopg
    directly) handed PostgreSQL a time without an offset, read in the session's zone, so a due job was not
    claimed until 13 h 45 min later; the retry after a failure is due 60 s on, not before."""
    clock = Clock(T0)
    flaky = Recorder(failures=1)
    store = zoned_store(zoned, hooks=[Hook("mail", flaky, on=["user.created"])], now=clock)
    dispatcher = Dispatcher(store, backoff=Backoff(max_attempts=3, base_s=60, max_s=60),
                            now=lambda: clock().replace(tzinfo=None))
    deliver(store, f.envelope("user.created", f.user("user_1", 1000)))
    assert dispatcher.run_once() == 1
    clock.advance(59)
    assert dispatcher.run_once() == 0
    clock.advance(1)
    assert dispatcher.run_once() == 1 and flaky.types == ["user.created", "user.created"]
    store.dispose()


# -- review of the above: the clocks and binds it missed ----------------------------------------------------------

def test_prune_erasing_tombstones_with_a_naive_clock_erases_as_an_aware_one(db_url: str) -> None:
    """``Retention(now=...)`` given a naive clock (UTC, as everywhere): prune compared it with the aware times of
    the erasure digests and raised ``TypeError`` (naive vs aware) once ``delete_tombstones_after`` was set, the
    dry run too."""
    reports = {}
    for kind, clock in (("aware", lambda: T0 + timedelta(days=60)),
                        ("naive", lambda: (T0 + timedelta(days=60)).replace(tzinfo=None))):
        store = Store(create_engine(db_url), now=lambda: T0)
        with store.connect() as conn:  # (one store per kind, one database: start from no users)
            assert conn.execute(sa.select(sa.func.count()).select_from(users)
                                .where(users.c.clerk_id == f"user_{kind}")).scalar_one() == 0
        assert deliver(store, f.envelope("user.created", f.user(f"user_{kind}", 1000)),
                       f.envelope("user.deleted", f.deleted("user", f"user_{kind}"))) == ["applied", "applied"]
        retention = Retention(store, RetentionPolicy(delete_tombstones_after=timedelta(days=1)), now=clock)
        dry = retention.prune(dry_run=True)
        done = retention.prune()
        reports[kind] = (dry.erased, done.erased)
        store.dispose()
    assert reports["naive"] == reports["aware"]
    assert reports["aware"][1] >= 1


def test_the_consoles_naive_clock_is_utc(db_url: str, host_tz: str) -> None:
    """The console's ``now`` given a naive clock (UTC, as everywhere): ``ago`` subtracted it from aware times
    (``TypeError``), and the freshness checks read it with ``.timestamp()`` in the host's zone (on a New York
    host a delivery a minute old was five hours old)."""
    from clerk_sync.integrations.console._console import Console
    from clerk_sync.integrations.console._pages import _freshness

    store = Store(create_engine(db_url), now=lambda: T0)
    assert deliver(store, f.envelope("user.created", f.user("user_fresh", 1000))) == ["applied"]
    limits = {"max_delivery_age_s": 3600.0, "max_failed": 10, "max_reconcile_age_s": 2 * 86400.0,
              "max_hook_wait_s": 900.0}
    seen = {}
    for kind, clock in (("aware", lambda: T0 + timedelta(minutes=1)),
                        ("naive", lambda: (T0 + timedelta(minutes=1)).replace(tzinfo=None))):
        console = Console(store, None, clerk=None, read_only=True, now=clock,  # type: ignore[arg-type]
                          freshness_limits=limits)
        assert console.now() == T0 + timedelta(minutes=1)
        assert console.ago(T0 - timedelta(hours=2)) == "2 h ago"
        seen[kind] = [(c.name, c.status) for c in _freshness(console)]
    assert seen["naive"] == seen["aware"]
    assert dict(seen["aware"]).get("newest delivery") == "ok", seen
    store.dispose()


def test_a_string_bound_to_a_time_column_goes_to_the_driver_as_it_is(db_url: str) -> None:
    """An app's own statement binding a string to one of clerk-sync's time columns: the bind processing that
    reads a naive time as UTC raised ``AttributeError`` on a ``str`` (PostgreSQL), which the database parsed
    before."""
    engine = create_engine(db_url)
    if engine.dialect.name == "sqlite":
        engine.dispose()
        pytest.skip("SQLAlchemy's SQLite DateTime takes datetime objects only (before these binds too)")
    with engine.begin() as conn:
        conn.execute(sa.insert(webhook_events).values(
            svix_id="msg_str_bind", type="user.created", status="applied", payload={},
            received_at="2026-01-01 00:00:00" if engine.dialect.name != "postgresql" else "2026-01-01 00:00:00+00"))
        got = conn.execute(sa.select(webhook_events.c.received_at)
                           .where(webhook_events.c.svix_id == "msg_str_bind")).scalar_one()
    assert utc(got) == datetime(2026, 1, 1, tzinfo=UTC)
    engine.dispose()
