"""Operations: the CLI's exits, errors and metrics an operator or cron relies on."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.engine import Entity, Upsert
from clerk_sync.events import user_record
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, users
from tests import factories as f
from tests._server import free_port, wait_for_http
from tests.conftest import SECRET
from tests.test_cli import CLI, run


def _sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    return url


def test_users_erase_refuses_an_email_or_an_unknown_id(tmp_path: Path) -> None:
    """`users erase ann@example.com` exited 0 after tombstoning "ann@example.com" while Ann kept her data."""
    url = _sqlite(tmp_path)
    store = Store.from_url(url)
    with store.transaction() as w:
        w.apply(Upsert(Entity.USER, user_record(f.user("user_ann", 5, email="ann@example.com"))))
    env = {"DATABASE_URL": url}

    email = run("users", "erase", "ann@example.com", env=env)
    assert email.returncode == 2, email.stderr
    assert "user_ann" in email.stderr and "not a Clerk user id" in " ".join(email.stderr.split())
    typo = run("users", "erase", "user_anm", env=env)
    assert typo.returncode == 1 and "--force" in typo.stderr and "nothing was changed" in " ".join(typo.stderr.split())
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one() == 0
        assert conn.execute(sa.select(users.c.clerk_id, users.c.email)).all() == [("user_ann", "ann@example.com")]

    forced = run("users", "erase", "user_anm", "--force", env=env)
    assert forced.returncode == 0 and "tombstone written" in forced.stdout
    erased = run("users", "erase", "user_ann", env=env)
    assert erased.returncode == 0 and "user_ann: erased" in erased.stdout
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.email).where(users.c.clerk_id == "user_ann")).scalar_one() is None
    store.dispose()


def test_users_erase_exits_1_when_the_apps_table_keeps_personal_data(tmp_path: Path) -> None:
    """A gap in the erasure fix: what the app's table refused to clear was a yellow warning and exit 0;
    clerk-sync's rows are erased but the data-subject request is not done, so a script must see it."""
    url = _sqlite(tmp_path)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE kept (id INTEGER PRIMARY KEY, clerk_user_id VARCHAR(64) UNIQUE, "
                             "email VARCHAR(320) NOT NULL CHECK (email LIKE '%@example.com'), deleted_at TIMESTAMP)")
        conn.exec_driver_sql("INSERT INTO kept (clerk_user_id, email) VALUES ('user_k', 'k@example.com')")
    engine.dispose()
    store = Store.from_url(url)
    with store.transaction() as w:
        w.apply(Upsert(Entity.USER, user_record(f.user("user_k", 5, email="k@example.com"))))
    store.dispose()
    module = tmp_path / "kept_mapping.py"
    module.write_text("from clerk_sync.mapping import MappedTable, SchemaMapping\n"
                      "MAPPING = SchemaMapping(users=MappedTable('kept', 'clerk_user_id', {'email': 'email'}))\n")
    erased = run("users", "erase", "user_k", "--mapping", "kept_mapping:MAPPING",
                 env={"DATABASE_URL": url, "PYTHONPATH": str(tmp_path)})
    assert erased.returncode == 1, (erased.stdout, erased.stderr)
    assert "user_k: erased" in erased.stdout and "kept refused clearing email" in " ".join(erased.stderr.split())


def test_a_driver_that_is_not_installed_is_one_line_naming_it() -> None:
    """postgresql+psycopg2:// (psycopg2 is not a dependency) crashed every command with a traceback."""
    if importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("psycopg2 is installed here")
    env = {"DATABASE_URL": "postgresql+psycopg2://app@127.0.0.1:1/app", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    for command in (["migrate"], ["doctor"], ["prune"], ["doctor", "--freshness"]):
        result = run(*command, env=env)
        out = " ".join((result.stdout + result.stderr).split())
        assert "Traceback" not in out, (command, out)
        assert result.returncode in (1, 2), (command, out)
        assert "'psycopg2' is not installed" in out and "postgresql+psycopg://" in out, (command, out)


def test_a_driver_that_cannot_load_says_why_not_to_use_itself() -> None:
    """A gap in the fix above: psycopg installed but its C implementation (or libpq) missing gave
    "its module '?' is not installed: use postgresql+psycopg://", the driver already in use."""
    if importlib.util.find_spec("psycopg_c") is not None:
        pytest.skip("psycopg_c is installed here")
    result = run("migrate", env={"DATABASE_URL": "postgresql://app@127.0.0.1:1/app", "PSYCOPG_IMPL": "c"})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode in (1, 2) and "Traceback" not in out, out
    assert "cannot be loaded" in out and "psycopg_c" in out and "use postgresql+psycopg://" not in out, out


def test_a_driver_whose_extension_cannot_load_is_not_called_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: mysqlclient installed but its C extension unable to load (no libmariadb) named
    "its module 'MySQLdb._mysql' is not installed: pip install the driver"."""
    from sqlalchemy.dialects.mysql.mysqldb import MySQLDialect_mysqldb

    from clerk_sync.config import Settings
    from clerk_sync.errors import ConfigError

    def broken(cls: object) -> None:
        raise ImportError("libmariadb.so.3: cannot open shared object file", name="MySQLdb._mysql")

    monkeypatch.setattr(MySQLDialect_mysqldb, "import_dbapi", classmethod(broken))
    with pytest.raises(ConfigError, match="cannot be loaded: libmariadb") as refused:
        Settings.from_env({"DATABASE_URL": "mysql+mysqldb://root@127.0.0.1/test"}).sqlalchemy_url()
    assert "pip install" not in str(refused.value)


def test_tombstones_deleted_before_they_are_cleared_is_an_invalid_setting() -> None:
    """serve and prune crashed with a ValueError traceback from RetentionPolicy."""
    env = {"CLERK_SYNC_TOMBSTONE_CLEAR_AFTER_DAYS": "10", "CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS": "5"}
    for command in ("prune", "serve"):
        result = run(command, env=env)
        out = " ".join(result.stderr.split())
        assert result.returncode == 2 and "Traceback" not in out, out
        assert "Invalid setting: CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS must be >=" in out, out



def test_a_blank_tombstone_delete_age_means_unset_as_for_the_other_optional_settings() -> None:
    """Fixed: `CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS=` (exported empty) was "not a valid number", where
    every other optional setting reads blank as unset."""
    from clerk_sync.config import Settings

    assert Settings.from_env({"CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS": " "}).tombstone_delete_after_days is None
    assert Settings.from_env({"CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS": "30"}).tombstone_delete_after_days == 30


@pytest.mark.parametrize(("name", "value", "said"), [
    ("CLERK_SYNC_DB_LOCK_TIMEOUT_S", "inf", "a finite number"),
    ("CLERK_SYNC_INBOX_REDACT_AFTER_DAYS", "1e400", "a finite number"),
    ("CLERK_SYNC_INBOX_DELETE_AFTER_DAYS", "1e300", "less than or equal to 1000000"),
    ("CLERK_SYNC_DB_STATEMENT_TIMEOUT_S", "9e9", "less than or equal to 2000000"),
    ("CLERK_SYNC_DB_KEEPALIVE_S", "32768", "less than or equal to 32767"),  # Linux's TCP_KEEPIDLE bound
])
def test_an_endless_or_overflowing_number_is_an_invalid_setting(tmp_path: Path, name: str, value: str,
                                                                said: str) -> None:
    """Fixed: ``inf`` (or ``1e400``) passed validation, then `migrate` and `prune` crashed with an
    OverflowError traceback that did not name the variable (under serve: a prune_crashed line every pass);
    a retention age past a million days overflowed the dates too, a DB timeout past PostgreSQL's 2^31 ms
    failed every connection."""
    result = run("prune", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", name: value})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in out, out
    assert f"Invalid setting {name}: Input should be {said}" in out, out

def test_dev_refuses_too_few_users_before_starting() -> None:
    """`dev --users 0` divided by zero and `--users 1` indexed past the end, after starting the emulator."""
    for n in ("0", "1"):
        result = run("dev", "--once", "--users", n)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "--users" in result.stderr


def test_hooks_retry_refuses_ids_with_all(tmp_path: Path) -> None:
    """`hooks retry 3 --all` retried every dead job, ignoring the id the operator named."""
    url = _sqlite(tmp_path)
    for verb in ("retry", "purge"):
        result = run("hooks", verb, "3", "--all", env={"DATABASE_URL": url})
        assert result.returncode == 2 and "not both" in result.stderr, result.stderr


@pytest.mark.parametrize(("status", "headers", "body"), [
    (301, {"location": "https://api.clerk.com/v1/users/count"}, b""),
    (200, {"content-type": "text/html"}, b"<html>login</html>"),
    (200, {"content-type": "application/json"}, b"[1, 2]"),
])
def test_doctor_reports_a_redirect_or_a_page_that_is_not_clerk(status: int, headers: dict[str, str],
                                                               body: bytes) -> None:
    """A redirect or an HTML page from CLERK_API_URL crashed `doctor` on response.json()."""
    from clerk_sync.cli.doctor import run_checks
    from clerk_sync.config import Settings

    settings = Settings.from_env({"CLERK_SECRET_KEY": "sk_test_x", "CLERK_API_URL": "http://clerk.example",
                                  "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    with httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(status, headers=headers,
                                                                                content=body))) as client:
        checks = {c.name: c for c in run_checks(settings, http=client)}
    api = checks["Clerk Backend API"]
    assert api.status == "fail" and "CLERK_API_URL should be" in api.detail and str(status) in api.detail
    assert checks["session keys"].status == "fail"


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_serve_with_workers_exposes_one_total_across_workers(db_url: str, tmp_path: Path) -> None:
    """Each worker had its own registry; a scrape reached one of them, so counters went up and down
    (resets to Prometheus: rate() alerts fired for ever)."""
    from prometheus_client.parser import text_string_to_metric_families

    port, refused = free_port(), 24
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))}
    prom = tmp_path / "prom"  # named by the operator and missing: made, not a crash
    env.update({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "PROMETHEUS_MULTIPROC_DIR": str(prom)})
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/healthz", timeout=30, proc=proc)
        for _ in range(refused):  # a fresh connection each: the kernel hands them to either worker
            assert httpx.post(f"{base}/webhooks/clerk", content=b"{}").status_code == 400
        totals = []
        for _ in range(12):
            text = httpx.get(f"{base}/metrics").text
            totals.append(sum(s.value for m in text_string_to_metric_families(text) for s in m.samples
                              if s.name == "clerk_sync_webhook_refused_total"))
        assert list(prom.glob("clerk-sync-metrics-*/*.db"))  # the workers' files live here while serving
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert totals == [refused] * len(totals)
    assert list(prom.iterdir()) == []  # removed when serve stops, the parent process's own files too



def test_serve_with_one_worker_and_a_multiproc_dir_counts_only_its_own_run(tmp_path: Path) -> None:
    """Fixed: with PROMETHEUS_MULTIPROC_DIR set, one worker used the operator's directory as it was, so
    the files of every earlier run there were summed with this run's counts (a total that jumped at each
    restart). It takes a fresh directory inside it, as --workers does, removed when it stops."""
    from prometheus_client.parser import text_string_to_metric_families

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))}
    prom = tmp_path / "prom"
    env.update({"DATABASE_URL": _sqlite(tmp_path), "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                "PROMETHEUS_MULTIPROC_DIR": str(prom)})
    totals, codes = [], []
    for refused in (3, 2):  # two runs, one after the other
        port = free_port()
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{base}/healthz", timeout=30, proc=proc)
            for _ in range(refused):
                assert httpx.post(f"{base}/webhooks/clerk", content=b"{}").status_code == 400
            text = httpx.get(f"{base}/metrics").text
            totals.append(sum(s.value for m in text_string_to_metric_families(text) for s in m.samples
                              if s.name == "clerk_sync_webhook_refused_total"))
        finally:
            proc.terminate()
            codes.append(proc.wait(timeout=20))
    assert totals == [3, 2]
    assert list(prom.iterdir()) == []
    assert codes == [-signal.SIGTERM] * 2  # still ends by the signal (a clean stop to a supervisor), not 143


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_serve_with_workers_and_the_console_counts_only_the_workers_clerk_budget(db_url: str, tmp_path: Path) -> None:
    """A gap in the check that serve --workers builds the app once, before the workers: building
    the console in the supervisor started its Clerk client's gauge refresher there, and the supervisor's
    budget was summed with the workers' as a third worker's. Only the workers count a Clerk budget."""
    import shutil
    import time

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    port, prom = free_port(), tmp_path / "prom"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))}
    env.update({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "PROMETHEUS_MULTIPROC_DIR": str(prom),
                "CLERK_SYNC_CONSOLE": "1", "CLERK_SECRET_KEY": "sk_test_abc", "CLERK_API_URL": "http://127.0.0.1:9"})
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=30, proc=proc)

        def budget_of(pid: str) -> float:
            alone = tmp_path / pid  # one process's gauge files, alone
            shutil.rmtree(alone, ignore_errors=True)
            alone.mkdir()
            for f in prom.glob(f"*/gauge_*_{pid}.db"):
                shutil.copy(f, alone / f.name)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
            return sum(s.value for m in registry.collect() for s in m.samples
                       if s.name == "clerk_sync_clerk_api_budget_tokens")

        deadline = time.monotonic() + 15  # the refreshers write every second; this bounds a stuck test only
        while True:  # until both workers have written their budget (the supervisor, had it one, before them)
            workers = {f.stem.rsplit("_", 1)[1] for f in prom.glob("*/gauge_*.db")} - {str(proc.pid)}
            if len(workers) == 2 and all(budget_of(pid) > 0 for pid in workers):
                break
            assert time.monotonic() < deadline, workers
            time.sleep(0.2)
        assert budget_of(str(proc.pid)) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)

_WORKER = """
import sys
from clerk_sync.metrics import Metrics
metrics = Metrics()
metrics.watch_clerk_client(breaker_open=lambda: sys.argv[1] == "open", budget_tokens=lambda: float(sys.argv[2]))
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
metrics.close()  # a worker that ends: its live gauges leave the sums
"""


def test_every_workers_breaker_and_budget_reach_the_sums(tmp_path: Path) -> None:
    """A gap in the fix above: in multiprocess mode the breaker and budget gauges were written only by the
    worker a scrape reached, so another worker's open breaker read 0. Each worker writes them every second
    now, and a worker that ends leaves the live sums."""
    import sys
    import time

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)

    def worker(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, *args], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    def gauges() -> dict[str, float]:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
        return {s.name: s.value for m in registry.collect() for s in m.samples
                if s.name in ("clerk_sync_clerk_api_circuit_open", "clerk_sync_clerk_api_budget_tokens")}

    def eventually(want: dict[str, float]) -> None:
        deadline = time.monotonic() + 15  # the workers write every second; this bounds a stuck test only
        while gauges() != want:
            assert time.monotonic() < deadline, gauges()
            time.sleep(0.1)

    stays = worker("open", "30")
    try:
        leaves = worker("closed", "50")
        eventually({"clerk_sync_clerk_api_circuit_open": 1.0, "clerk_sync_clerk_api_budget_tokens": 80.0})
        assert leaves.stdin is not None
        leaves.stdin.close()
        assert leaves.wait(timeout=15) == 0
        eventually({"clerk_sync_clerk_api_circuit_open": 1.0, "clerk_sync_clerk_api_budget_tokens": 30.0})
    finally:
        stays.kill()
        stays.wait()


def test_a_killed_workers_breaker_and_budget_leave_the_sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: a worker killed without its shutdown (uvicorn's supervisor after a missed ping, the OOM
    killer) never ran Metrics.close(), so its open breaker paged until serve restarted. A scrape now takes
    the live gauges of workers that no longer exist out of the sums."""
    import signal
    import sys

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from clerk_sync import metrics as metrics_module

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)

    def gauges() -> dict[str, float]:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
        return {s.name: s.value for m in registry.collect() for s in m.samples
                if s.name in ("clerk_sync_clerk_api_circuit_open", "clerk_sync_clerk_api_budget_tokens")}

    proc = subprocess.Popen([sys.executable, "-c", _WORKER, "open", "30"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 15  # the worker writes every second; this bounds a stuck test only
        while gauges().get("clerk_sync_clerk_api_circuit_open") != 1.0:
            assert time.monotonic() < deadline, gauges()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert gauges()["clerk_sync_clerk_api_circuit_open"] == 1.0  # left behind by the killed worker
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics_module._forget_dead_workers()  # what every multiprocess render() does first
    assert {k: v for k, v in gauges().items() if v} == {}


def test_a_failed_database_read_is_cached_and_a_slow_one_holds_no_other_scrape() -> None:
    """Fixed: a failed read was not cached and every scrape read under one lock, so with a database that
    accepts connections but never answers, concurrent scrapes waited out the connect timeout one after
    another (past Prometheus' scrape timeout: clerk_sync_database_up went absent instead of 0)."""
    import threading

    from prometheus_client.parser import text_string_to_metric_families

    from clerk_sync.metrics import DatabaseSnapshot, Metrics
    from tests.conftest import FakeClock

    def up(metrics: Metrics) -> float:
        return next(s.value for m in text_string_to_metric_families(metrics.render().decode()) for s in m.samples
                    if s.name == "clerk_sync_database_up")

    clock, reads = FakeClock(), []
    release, reading = threading.Event(), threading.Event()

    def probe() -> DatabaseSnapshot:
        reads.append(1)
        if len(reads) == 1:
            raise OSError("connection refused")
        if len(reads) == 3:  # the third read hangs until released
            reading.set()
            release.wait(10)
        return DatabaseSnapshot(None, 0, None)

    metrics = Metrics()
    metrics.watch_database(probe, ttl_s=5, clock=clock)
    assert (up(metrics), up(metrics), len(reads)) == (0.0, 0.0, 1)  # the failure is cached for ttl_s
    clock.t += 5
    assert (up(metrics), len(reads)) == (1.0, 2)
    clock.t += 5
    slow = threading.Thread(target=metrics.render)
    slow.start()
    try:
        assert reading.wait(10)
        assert (up(metrics), len(reads)) == (1.0, 3)  # answered with the last read, not queued behind it
    finally:
        release.set()
        slow.join(10)


def test_no_delivery_ever_is_exported_as_zero_so_the_alert_can_fire() -> None:
    """The newest-delivery series was absent until a first delivery: ClerkSyncNoDeliveriesWhileDrift
    (time() - max(series) > 1800) never fired on an install whose endpoint never worked."""
    from prometheus_client.parser import text_string_to_metric_families

    from clerk_sync.metrics import DatabaseSnapshot, Metrics

    metrics = Metrics()
    metrics.watch_database(lambda: DatabaseSnapshot(None, 0, None))
    samples = {s.name: s.value for m in text_string_to_metric_families(metrics.render().decode()) for s in m.samples}
    assert samples["clerk_sync_newest_delivery_timestamp_seconds"] == 0.0


def test_doctor_freshness_fails_on_drift_without_deliveries_and_on_a_stale_reconcile() -> None:
    """`doctor --freshness` only warned (exit 0) in both cases, though cron relies on its exit code."""
    from clerk_sync.freshness import check_freshness
    from clerk_sync.metrics import DatabaseSnapshot

    now, limits = 1_000_000.0, {"max_delivery_age_s": 600, "max_failed": 0, "max_reconcile_age_s": 3600}
    drift = {"created": 2, "updated": 0, "deleted": 0}
    never = {c.name: c for c in check_freshness(DatabaseSnapshot(None, 0, now - 60, drift), now=now, **limits)}
    assert never["newest delivery"].status == "fail" and "Clerk Dashboard" in never["newest delivery"].detail
    quiet = {c.name: c for c in check_freshness(DatabaseSnapshot(None, 0, None), now=now, **limits)}
    assert quiet["newest delivery"].status == "warn"  # a new install, nothing wrong yet
    clean = {"created": 0, "updated": 0, "deleted": 0}
    stale = {c.name: c for c in check_freshness(DatabaseSnapshot(now - 10, 0, now - 7200, clean), now=now, **limits)}
    assert stale["last reconcile"].status == "fail" and "clerk-sync reconcile" in stale["last reconcile"].detail
    recent = {c.name: c for c in check_freshness(DatabaseSnapshot(now - 10, 0, now - 60, drift), now=now, **limits)}
    assert [c.status for c in recent.values()] == ["ok", "ok", "warn", "ok"]  # drift while deliveries arrive


def test_doctor_freshness_on_a_new_install_warns_and_exits_0(tmp_path: Path) -> None:
    result = run("doctor", "--freshness", env={"DATABASE_URL": _sqlite(tmp_path)})
    assert result.returncode == 0 and "no delivery stored yet" in result.stdout, result.stdout + result.stderr


_FORKING = """
import os, sys, threading
from clerk_sync.metrics import Metrics
metrics = Metrics()
metrics.watch_clerk_client(breaker_open=lambda: True)
pid = os.fork()  # as gunicorn --preload forks its workers after building the app
if pid == 0:
    alive = [t.name for t in threading.enumerate() if t.name == "clerk-sync-metrics" and t.is_alive()]
    os._exit(0 if alive else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_worker_writes_its_breaker_and_budget_too(tmp_path: Path) -> None:
    """Fixed: the thread writing the breaker and budget gauges started with the Clerk client; a worker
    forked after that (gunicorn ``--preload``) had no such thread, and its gauges stayed as the parent last
    wrote them (an open breaker of that worker read 0, a closed one a stale 1)."""
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _FORKING], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0", out


_FORK_MID_WRITE = """
import os, threading
from clerk_sync.metrics import Metrics
metrics = Metrics()
inside, proceed, forking, writing = threading.Event(), threading.Event(), threading.Event(), [False]
gauge = metrics.breaker_open
first_set = gauge.set
def held_set(value):  # the refresher, stopped in the middle of its write until the fork has begun
    writing[0] = True
    inside.set()
    proceed.wait()
    first_set(value)
    writing[0] = False
metrics.watch_clerk_client(breaker_open=lambda: True)
gauge.set = held_set
inside.wait()
os.register_at_fork(before=forking.set)  # registered last: runs before clerk-sync's own hook
result = []
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(3 if writing[0] else 0)  # the child's copy of a write in progress: its lock would be held
    result.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
thread = threading.Thread(target=fork)
thread.start()
forking.wait()
proceed.set()
thread.join()
print(result[0])
"""


def test_a_fork_waits_for_the_refreshers_write(tmp_path: Path) -> None:
    """Fixed: a fork (gunicorn ``--preload``) at the instant the refresher thread was inside
    prometheus_client's multiprocess lock gave the child that lock held: its first metric hung the worker.
    The fork now waits for the write to end; the child never sees one half done."""
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _FORK_MID_WRITE], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "0", out


def test_psycopg_not_installed_names_the_extra_that_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: without psycopg (it is the `postgres` extra) the message said "use
    postgresql+psycopg:// (psycopg 3, installed with clerk-sync)": the very URL that failed, and not installed."""
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    from clerk_sync.config import Settings
    from clerk_sync.errors import ConfigError

    def missing(cls: object) -> None:
        raise ImportError("No module named 'psycopg'", name="psycopg")

    monkeypatch.setattr(PGDialect_psycopg, "import_dbapi", classmethod(missing))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"DATABASE_URL": "postgresql://app@127.0.0.1/app"}).sqlalchemy_url()
    assert "pip install 'clerk-sync[postgres]'" in str(refused.value)
    assert "installed with clerk-sync" not in str(refused.value)


def test_users_erase_warns_of_other_records_holding_the_address(tmp_path: Path) -> None:
    """Fixed (privacy): an organization's metadata kept the erased person's address, and the command said
    nothing. It says where (ids and columns), why it is left and what to do; the erasure itself succeeded."""
    from clerk_sync.events import organization_record

    url = _sqlite(tmp_path)
    store = Store.from_url(url)
    with store.transaction() as w:
        w.apply(Upsert(Entity.USER, user_record(f.user("user_ann", 5, email="ann@example.com"))))
        org = f.organization("org_b", 5) | {"private_metadata": {"billing": "ann@example.com"}}
        w.apply(Upsert(Entity.ORGANIZATION, organization_record(org)))
    store.dispose()
    erased = run("users", "erase", "user_ann", env={"DATABASE_URL": url})
    said = " ".join((erased.stdout + erased.stderr).split())
    assert erased.returncode == 0 and "user_ann: erased" in said, said
    assert "organizations org_b: private_metadata" in said and "edit them there" in said
    assert "ann@example.com" not in said


@pytest.mark.parametrize(("url", "module", "expected"), [
    ("mysql+mysqldb://root@127.0.0.1/test", "MySQLdb", "pip install 'clerk-sync[mysql]'"),
    ("mysql+pymysql://root@127.0.0.1/test", "pymysql", "pip install 'clerk-sync[pymysql]'"),
    ("mysql+mysqlconnector://root@127.0.0.1/test", "mysql", "pip install the driver"),
])
def test_a_missing_mysql_driver_names_the_extra_that_installs_that_driver(
        monkeypatch: pytest.MonkeyPatch, url: str, module: str, expected: str) -> None:
    """Fixed: the extra was chosen by the backend, so mysql+mysqlconnector:// was told to install
    'clerk-sync[mysql]' (mysqlclient), which leaves the same error."""
    import sqlalchemy as sa_

    from clerk_sync.config import Settings
    from clerk_sync.errors import ConfigError

    dialect = sa_.engine.make_url(url).get_dialect()

    def missing(cls: object) -> None:
        raise ImportError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(dialect, "import_dbapi", classmethod(missing))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"DATABASE_URL": url}).sqlalchemy_url()
    assert expected in str(refused.value)
