"""clerk-sync behind PgBouncer in transaction mode (``CLERK_SYNC_DB_TRANSACTION_POOLER=1``), on a PgBouncer this
module starts itself: serve replicas, hooks, migrate and the mapped tables through a pool of two server
connections that dozens of client connections share (so a prepared statement or session state would meet
another connection). Skipped without a ``pgbouncer`` binary, unless ``CLERK_SYNC_REQUIRE_PGBOUNCER=1``."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.errors import ConfigError
from clerk_sync.mapping import build_unique_indexes_concurrently
from clerk_sync.reconcile import Change, Reconciler
from clerk_sync.store import Store, create_engine
from clerk_sync.testing import EmulatorServer
from tests import factories
from tests._procs import SERVE, post_all
from tests._server import free_port, wait_for_http
from tests.conftest import _PG_PROBLEM, PG_URL, clerk_client, require_server

pytestmark = pytest.mark.postgres
_PGBOUNCER = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)
_APP = "tests._pgbouncer_app"
# Advisory locks held in this test's database (pg_locks is the cluster's: other tests' deliveries take them)
_ADVISORY_HERE = sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                         "(SELECT oid FROM pg_database WHERE datname = current_database())")


@pytest.fixture(scope="module")
def pgbouncer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A PgBouncer (transaction pooling, 2 server connections per database) in front of the test PostgreSQL."""
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    if _PGBOUNCER is None:
        if os.environ.get("CLERK_SYNC_REQUIRE_PGBOUNCER") == "1":
            pytest.fail("CLERK_SYNC_REQUIRE_PGBOUNCER=1 but no pgbouncer binary (apt-get install pgbouncer)")
        pytest.skip("no pgbouncer binary")
    pg = sa.engine.make_url(PG_URL)
    port, here = free_port(), tmp_path_factory.mktemp("pgbouncer")
    (here / "users.txt").write_text(f'"{pg.username}" ""\n')
    (here / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={pg.host or '127.0.0.1'} port={pg.port or 5432}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {here / 'users.txt'}\npool_mode = transaction\n"
        # round robin: a client's next transaction goes to the other server connection (LIFO gave one client the
        # same one again and again while the pool was quiet: lost session state went unseen)
        "default_pool_size = 2\nmax_client_conn = 500\nserver_round_robin = 1\n")
    user = ["-u", _unprivileged()] if os.geteuid() == 0 else []  # PgBouncer refuses to run as root
    with open(here / "pgbouncer.log", "wb") as log:
        proc = subprocess.Popen([_PGBOUNCER, *user, str(here / "pgbouncer.ini")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            assert proc.poll() is None and time.monotonic() < deadline, (here / "pgbouncer.log").read_text()
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _unprivileged() -> str:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    pytest.skip("running as root with no postgres or nobody user for pgbouncer -u")


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def database(pgbouncer: int) -> Iterator[tuple[str, str]]:
    """A fresh database: its direct URL and its URL through PgBouncer."""
    name = f"pgb_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    direct = sa.engine.make_url(PG_URL).set(database=name)
    pooled = direct.set(host="127.0.0.1", port=pgbouncer)
    try:
        yield direct.render_as_string(hide_password=False), pooled.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")  # (PgBouncer's server connections too)
        admin.dispose()


def _cli(*args: str, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SERVE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DATABASE_URL": url, **env})


def test_serve_hooks_and_migrate_through_transaction_pooling(database: tuple[str, str], tmp_path: Path) -> None:
    """Two replicas with a mapped table and a hook, 16 senders: every delivery 200 at the first attempt (no
    prepared statement missing or already there on the shared server connections), every row and hook run."""
    direct, pooled = database
    env = {"CLERK_SYNC_DB_TRANSACTION_POOLER": "1", "PGB_HOOK_URL": pooled,
           "CLERK_WEBHOOK_SIGNING_SECRET": factories.SECRET, "CLERK_SYNC_LOG_LEVEL": "WARNING"}
    engine = sa.create_engine(direct)
    from tests._pgbouncer_app import meta

    meta.create_all(engine)
    # The mapped table's index is built CONCURRENTLY: once, on the direct URL (RUNBOOK, PgBouncer)
    assert _cli("migrate", "--mapping", f"{_APP}:mapping", url=direct).returncode == 0
    done = _cli("migrate", "--mapping", f"{_APP}:mapping", url=pooled, **env)  # through it: nothing left to build
    assert done.returncode == 0, done.stderr
    servers = []
    try:
        for n in range(2):
            port = free_port()
            with open(tmp_path / f"serve{n}.log", "wb") as log:
                servers.append((port, subprocess.Popen(
                    [sys.executable, "-c", SERVE, "serve", "--host", "127.0.0.1", "--port", str(port),
                     "--mapping", f"{_APP}:mapping", "--hooks", f"{_APP}:hooks"],
                    env={**os.environ, "DATABASE_URL": pooled, **env}, stdout=log, stderr=log)))
        for port, proc in servers:
            wait_for_http(f"http://127.0.0.1:{port}/readyz", proc=proc)
        rng = random.Random(5)
        deliveries = [(f"msg_pgb_{i}", factories.body_of(factories.envelope(
            "user.updated", factories.user(f"user_pgb{i % 150}", 1_700_000_000_000 + i))))
            for i in range(600)]
        rng.shuffle(deliveries)
        tally = post_all([f"http://127.0.0.1:{p}" for p, _ in servers], factories.SECRET, deliveries,
                         threads=16, seed=5)
        assert (tally.retried_5xx, tally.connection_errors, tally.client_errors, tally.gave_up) == (0, 0, [], [])
        deadline = time.monotonic() + 60
        with engine.connect() as conn:
            while conn.execute(sa.text("SELECT count(*) FROM hook_jobs")).scalar_one() and time.monotonic() < deadline:
                conn.rollback()
                time.sleep(0.2)
            assert conn.execute(sa.text("SELECT count(*) FROM hook_jobs")).scalar_one() == 0
            assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar_one() == 150
            assert conn.execute(sa.text("SELECT count(*) FROM accounts WHERE clerk_user_id IS NOT NULL")).scalar_one() == 150
            assert conn.execute(sa.text("SELECT count(*) FROM pgb_hook_calls")).scalar_one() >= 150  # (one key per user state)
            assert conn.execute(sa.text("SELECT count(*) FROM webhook_events WHERE status = 'failed'")).scalar_one() == 0
            assert conn.execute(_ADVISORY_HERE).scalar_one() == 0
    finally:
        for _, proc in servers:
            proc.terminate()
            proc.wait(timeout=20)
        engine.dispose()
    logs = "".join((tmp_path / f"serve{n}.log").read_text() for n in range(2))
    assert "error" not in logs.lower() and "prepared statement" not in logs, logs[-3000:]


def test_without_the_setting_the_error_says_what_to_set(database: tuple[str, str], tmp_path: Path) -> None:
    """PgBouncer refuses the ``options`` startup parameter that carries the timeouts on a direct connection:
    the command says to set CLERK_SYNC_DB_TRANSACTION_POOLER, not "retry once the database answers", and exits 2
    (a setting to fix: 3 told a scheduler to retry what no retry heals). serve's webhook answer stays a 503:
    Svix retries, and the delivery lands once the setting is made."""
    direct, pooled = database
    done = _cli("migrate", url=pooled)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2, said
    assert "CLERK_SYNC_DB_TRANSACTION_POOLER=1" in said and "retry once it answers" not in said, said
    assert _cli("migrate", url=direct).returncode == 0
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--host", "127.0.0.1", "--port", str(port)],
                                env={**os.environ, "DATABASE_URL": pooled,
                                     "CLERK_WEBHOOK_SIGNING_SECRET": factories.SECRET}, stdout=log, stderr=log)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        headers, body = factories.signed(factories.envelope("user.created", factories.user("user_pgb", 1)), "msg_pgb")
        answer = httpx.post(f"http://127.0.0.1:{port}/webhooks/clerk", content=body, headers=headers, timeout=30)
        assert answer.status_code == 503, answer.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_mapped_index_build_refused_through_the_pooler(database: tuple[str, str]) -> None:
    """The CONCURRENTLY build needs one session (its turn is a session lock, which a pooled server connection
    would keep held): through the pooler it is refused with what to do; with nothing to build, it passes."""
    direct, pooled = database
    from tests._pgbouncer_app import mapping, meta

    plain = sa.create_engine(direct)
    meta.create_all(plain)
    plain.dispose()
    assert _cli("migrate", url=direct).returncode == 0
    engine = create_engine(pooled, transaction_pooler=True)
    try:
        from clerk_sync.mapping import migrate_schema

        with engine.begin() as conn:
            migrate_schema(conn, mapping(), unique_indexes=False)
        with pytest.raises(ConfigError, match="DATABASE_URL pointing at PostgreSQL itself"):
            build_unique_indexes_concurrently(engine, mapping(), wait_s=1)
        once = create_engine(direct)
        assert build_unique_indexes_concurrently(once, mapping()) == ["created unique index uq_accounts_clerk_user_id"]
        once.dispose()
        assert build_unique_indexes_concurrently(engine, mapping(), wait_s=1) == []
        with engine.connect() as conn:
            assert conn.execute(_ADVISORY_HERE).scalar_one() == 0
    finally:
        engine.dispose()


def _both_server_connections(engine: sa.Engine) -> None:
    """Two transactions at once: PgBouncer opens its second server connection (round robin then alternates)."""
    with engine.connect() as one, engine.connect() as two:
        one.exec_driver_sql("SELECT 1")
        two.exec_driver_sql("SELECT 1")
        one.commit()
        two.commit()


def test_reconcile_dry_run_through_the_pooler(database: tuple[str, str], emu: EmulatorServer) -> None:
    """A dry run stages Clerk's ids in a TEMPORARY table: through the pooler its pages' transactions ran on other
    server connections ("reconcile_seen_dry does not exist; ... run migrations"). The whole dry run is now one
    transaction there; it still writes nothing, and reports what the real run then does."""
    direct, pooled = database
    assert _cli("migrate", url=direct).returncode == 0
    for n in range(30):
        emu.create_user(email=f"pgb{n}@example.com")
    store = Store.from_url(pooled, transaction_pooler=True)
    try:
        with clerk_client(emu) as clerk:
            Reconciler(store, clerk, page_size=5).run()
            kept = emu.request("GET", "/v1/users", params={"limit": 1})[0]["id"]
            emu.request("DELETE", f"/v1/users/{kept}")
            emu.create_user(email="pgb-new@example.com")
            _both_server_connections(store.engine)
            planned: list[Change] = []
            report = Reconciler(store, clerk, page_size=5, on_change=planned.append).run(dry_run=True)
            assert report.run_id is None and report.counts["users"].created == 1
            assert report.counts["users"].deleted == 1 and report.counts["users"].unchanged == 29
            with store.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM reconcile_runs")).scalar_one() == 1
                assert conn.execute(sa.text("SELECT count(*) FROM users WHERE deleted_at IS NULL")).scalar_one() == 30
                assert conn.execute(sa.text("SELECT count(*) FROM reconcile_seen")).scalar_one() == 0
            done: list[Change] = []
            Reconciler(store, clerk, page_size=5, on_change=done.append).run()
            assert sorted(planned, key=repr) == sorted(done, key=repr) and len(done) == 2
    finally:
        store.engine.dispose()
