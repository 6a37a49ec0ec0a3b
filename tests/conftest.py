"""Shared fixtures: a fresh, migrated database per test on SQLite and on the real PostgreSQL.

PostgreSQL tests use ``CLERK_SYNC_TEST_PG_URL`` (default: the local server, db ``test``), each in a
schema of its own. If the server is unreachable they are skipped locally, but fail when
``CLERK_SYNC_REQUIRE_POSTGRES=1`` (set by ``.ci/run``): CI never skips them silently.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clerk_sync import migrations
from clerk_sync.auth.admin import AdminActions
from clerk_sync.clerk_api import CircuitBreaker, ClerkClient, RetryPolicy
from clerk_sync.clerk_api.ratelimit import LocalBudget, RateLimit
from clerk_sync.store import Store, create_engine
from clerk_sync.testing import EmulatorServer
from clerk_sync.webhooks import WebhookVerifier

PG_URL = os.environ.get("CLERK_SYNC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _database_of_this_worker(url: str) -> str:
    """Under pytest-xdist (``scripts/test``), each worker's PostgreSQL tests run in a database of their own,
    ``<database>_<worker>``, made afresh here and dropped at the session's end. Schemas alone do not keep
    workers apart: advisory locks (clerk-sync's per-user and per-organization ones) and the waits of ``CREATE
    INDEX CONCURRENTLY`` are per database, so another worker's tests held or waited on them (review: a 0.5 s
    lock bound failed beside test_stuck_replica_pg.py). Unreachable: the URL as given (the tests say why)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or os.environ.get(_MADE_FOR) == worker:  # (a subprocess of the worker: its database, as given)
        return url
    given = sa.engine.make_url(url)
    name = f"{given.database}_{worker}"
    try:
        admin = sa.create_engine(given, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # an earlier run's, killed
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            admin.dispose()
    except sa.exc.SQLAlchemyError:
        return url
    made = given.set(database=name).render_as_string(hide_password=False)
    os.environ["CLERK_SYNC_TEST_PG_URL"], os.environ[_MADE_FOR] = made, worker  # what its subprocesses see
    return made


_MADE_FOR = "CLERK_SYNC_TEST_PG_DATABASE_OF"


def _drop_database_of_this_worker() -> None:
    if PG_URL == _GIVEN_PG_URL:
        return
    admin = sa.create_engine(_GIVEN_PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{sa.engine.make_url(PG_URL).database}" WITH (FORCE)')
    except sa.exc.SQLAlchemyError:
        pass  # (made afresh by the next run's worker of this name)
    finally:
        admin.dispose()


_GIVEN_PG_URL = PG_URL
PG_URL = _database_of_this_worker(PG_URL)
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# Clerk's published payloads, signature vectors and OpenAPI specs, vendored (see its README.md).
CLERK_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "clerk"
EXAMPLES = CLERK_FIXTURES  # the name older tests use


MYSQL_URL = os.environ.get("CLERK_SYNC_TEST_MYSQL_URL", "mysql+mysqldb://root@127.0.0.1:3306/test")


def _pg_available(url: str = PG_URL) -> str | None:
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


_PG_PROBLEM = _pg_available()
_MYSQL_PROBLEM = _pg_available(MYSQL_URL)


def require_server(name: str, url: str, problem: str | None, required_by: str) -> None:
    """Skip when the server is unreachable, or fail when ``required_by`` is set (CI never skips)."""
    if problem is None:
        return
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{name} required but unreachable at {url}: {problem}")
    pytest.skip(f"{name} unreachable: {problem}")


def mysql_database_url(name: str) -> str:
    """The test MySQL/MariaDB URL pointing at database ``name``."""
    return sa.engine.make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)


@contextmanager
def mysql_database() -> Iterator[str]:
    """A new, empty MariaDB database (utf8mb4, binary collation) for one test; dropped afterwards."""
    require_server("MariaDB", MYSQL_URL, _MYSQL_PROBLEM, "CLERK_SYNC_REQUIRE_MARIADB")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    try:
        yield mysql_database_url(name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def pg_schema_url(schema: str) -> str:
    """The test PostgreSQL URL with ``search_path`` pinned to one schema."""
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


@contextmanager
def pg_schema(prefix: str = "t_") -> Iterator[str]:
    """A private, empty PostgreSQL schema for one test (dropped after it): its URL."""
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    schema = f"{prefix}{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield pg_schema_url(schema)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database URL: SQLite file, a private PostgreSQL schema, or a MariaDB database."""
    if request.param == "mariadb":
        with mysql_database() as url:
            engine = create_engine(url)
            migrations.upgrade(engine)
            engine.dispose()
            yield url
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'clerk_sync.db'}"
        engine = create_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        yield url
        return
    with pg_schema() as url:
        engine = create_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database, for tests whose subject does not depend on the store (Flask's routing);
    ``db_url`` runs every store."""
    url = f"sqlite:///{tmp_path / 'routes.db'}"
    store = Store.from_url(url)
    migrations.upgrade(store.engine)
    store.dispose()
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.from_url(db_url)
    yield s
    s.dispose()


@pytest.fixture
def verifier() -> WebhookVerifier:
    return WebhookVerifier([SECRET])


def now_s() -> int:
    return int(time.time())


def pytest_configure(config: pytest.Config) -> None:
    # Django is configured once per session (the example project's settings), so that every module of
    # clerk_sync.integrations.django imports, tests/django or not (test_package imports them all).
    from tests.django.settings import configure_django

    configure_django()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The processors the tests left alive would say their last counts at interpreter exit, after
    # pytest's summary (tests/test_operations.py checks that behaviour in a process of its own).
    from clerk_sync.ingest import _SUMMARIES

    _SUMMARIES.clear()
    _drop_database_of_this_worker()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A clock the test moves by hand (``clock.t += 5``): time-dependent code takes it as ``clock=``/``now=``."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- Clerk, emulated ---------------------------------------------------------------------------
FAST_RETRY = RetryPolicy(attempts=2, backoff_s=0.02, backoff_max_s=0.05, deadline_s=5.0)


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    """One emulator per test module, on a loopback port; use ``emu`` for a reset one."""
    with EmulatorServer(rate_limit_requests=1000, rate_limit_window_s=1.0) as server:
        yield server


@pytest.fixture
def emu(emulator: EmulatorServer) -> EmulatorServer:
    """The module's emulator, emptied and with its faults cleared."""
    emulator.reset()
    return emulator


def clerk_client(emu: EmulatorServer, *, limit: RateLimit | None = None, **options: Any) -> ClerkClient:
    """A Backend API client for ``emu`` with a fast retry policy; ``options`` go to ``ClerkClient``."""
    options.setdefault("retry", FAST_RETRY)
    return ClerkClient(emu.secret_key, api_url=emu.url, budget=LocalBudget(limit or RateLimit(1000, 1.0)), **options)


@pytest.fixture
def clerk(emu: EmulatorServer) -> Iterator[ClerkClient]:
    with clerk_client(emu, breaker=CircuitBreaker(threshold=2, reset_s=0.3)) as client:
        yield client


@pytest.fixture
def actions(emu: EmulatorServer, store: Store) -> Iterator[AdminActions]:
    """Promotion and impersonation against the emulator: one attempt per call, a breaker that never opens."""
    client = ClerkClient(emu.secret_key, api_url=emu.url, retry=RetryPolicy(attempts=1, deadline_s=2),
                         breaker=CircuitBreaker(threshold=100))
    yield AdminActions(store, client)
    client.close()


# -- tracing: the spans the code ends, in memory (tests/test_tracing.py, the telemetry tests) --------------

SPANS_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider() -> TracerProvider:
    """The process-wide provider (OpenTelemetry allows setting it once), recording into :data:`SPANS_EXPORTER`
    too (added once: a span processor cannot be removed)."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    if not getattr(current, "_clerk_sync_in_memory", False):
        current.add_span_processor(SimpleSpanProcessor(SPANS_EXPORTER))
        current._clerk_sync_in_memory = True  # type: ignore[attr-defined]
    return current


@pytest.fixture
def spans(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    SPANS_EXPORTER.clear()
    yield SPANS_EXPORTER
    SPANS_EXPORTER.clear()
