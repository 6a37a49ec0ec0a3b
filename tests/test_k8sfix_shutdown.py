"""``serve``/``worker`` stopping as Kubernetes stops them (SIGTERM, then SIGKILL after the grace period): the
hook dispatcher lets its running handler finish and gives the batch's jobs not started back, ``serve --hooks``
does that under SIGTERM whether or not PROMETHEUS_MULTIPROC_DIR is set, and the CLI never prints a password
passed as ``?password=`` in DATABASE_URL. Real processes and signals, real SQLite/PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog.testing

from clerk_sync.changes import Change, Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.outbox import hook_jobs
from clerk_sync.store import Store
from tests import factories as f
from tests._proxy import TcpProxy
from tests._server import wait_for_http
from tests.conftest import SECRET, mysql_database
from tests.test_hooks import B, Clock, deliver, hooked, jobs


def _user(clerk_id: str) -> dict[str, Any]:
    return f.envelope("user.created", f.user(clerk_id, B + 1000))


def _port() -> int:
    """A free port in this suite's range for these tests (18800-18899)."""
    for port in range(18800, 18900):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18800-18899")


def test_a_stop_mid_batch_lets_the_running_job_finish_and_gives_the_rest_back(sqlite_url: str) -> None:
    """Fixed: a stop (``worker``'s SIGTERM handler: ``stop(timeout_s=0)``) ran the whole claimed batch, up to
    10 jobs of up to 80 % of the lease (48 s), past Kubernetes' 30 s grace period; the SIGKILL then left them
    claimed for their lease. Now the running job finishes and the jobs not started are given back, due at once
    (their claim's attempt not counted), with a line saying so."""
    clock = Clock()
    calls: list[str] = []
    holder: list[Dispatcher] = []

    def handler(change: Change) -> None:
        calls.append(change.clerk_id)
        holder[0].stop(timeout_s=0)  # SIGTERM arrives while the first job's handler runs

    store = hooked(sqlite_url, Hook("mail", handler), now=clock)
    deliver(store, _user("user_1"), _user("user_2"), _user("user_3"))
    holder.append(Dispatcher(store, now=clock, heartbeat_s=0))
    with structlog.testing.capture_logs() as logs:
        assert holder[0].run_once() == 3
    assert calls == ["user_1"]
    left = jobs(store)
    assert [(j["entity_key"].rsplit(":", 1)[1], j["status"], j["attempts"], j["claim_token"], j["lease_until"])
            for j in left] == [("user_2", "pending", 0, None, None), ("user_3", "pending", 0, None, None)]
    assert any(e["event"].startswith("hook dispatch stopping") and e["released"] == 2 for e in logs), logs
    # another dispatcher takes them at once (no lease to wait for)
    assert Dispatcher(hooked(sqlite_url, Hook("mail", calls.append), now=clock), now=clock, heartbeat_s=0).run_once() == 2
    store.dispose()


def test_a_drain_after_stop_runs_its_jobs(sqlite_url: str) -> None:
    """A stop gives back the batch it interrupts, not every batch after it: ``stop()`` then ``drain()`` (the
    saas_hooks example: stop the thread, then drain to show the jobs now) claimed and gave back the same jobs
    up to 1,000 times and ran none."""
    clock = Clock()
    calls: list[str] = []
    store = hooked(sqlite_url, Hook("mail", lambda change: calls.append(change.clerk_id)), now=clock)
    deliver(store, _user("user_1"), _user("user_2"))
    dispatcher = Dispatcher(store, now=clock, heartbeat_s=0)
    dispatcher.stop()
    assert dispatcher.drain() == 2
    assert sorted(calls) == ["user_1", "user_2"] and jobs(store) == []
    store.dispose()


HOOKS_MODULE = '''
import os, time
from pathlib import Path
from clerk_sync.changes import Hook

DIR = Path(os.environ["K8SFIX_DIR"])

def slow(change):
    with open(DIR / "runs.txt", "a") as out:
        out.write(f"start {change.clerk_id}\\n")
    deadline = time.monotonic() + 60
    while not (DIR / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(DIR / "runs.txt", "a") as out:
        out.write(f"end {change.clerk_id}\\n")

HOOKS = [Hook("slow", slow, on=["user.created"])]
'''


def _post(base: str, event: dict[str, Any]) -> int:
    headers, body = f.signed(event, f"msg_{event['data']['id']}")
    return httpx.post(f"{base}/webhooks/clerk", content=body, headers=headers, timeout=10).status_code


@pytest.mark.parametrize("multiproc", [False, True], ids=["plain", "PROMETHEUS_MULTIPROC_DIR"])
def test_serve_hooks_under_sigterm_finishes_the_running_handler_and_gives_the_batch_back(
        tmp_path: Path, multiproc: bool) -> None:
    """Fixed: under SIGTERM (Kubernetes' stop) uvicorn re-raised the signal at the end of its shutdown and the
    process died there, before serve's ``dispatcher.stop()``: the running handler was cut off mid-run and the
    batch's jobs stayed ``running`` for their 60 s lease. With PROMETHEUS_MULTIPROC_DIR set it instead ran the
    whole batch (outcome set by an unrelated variable). Now, either way: the running handler finishes, the jobs
    not started are given back (pending, unclaimed), and the process still ends by SIGTERM."""
    (tmp_path / "k8sfix_hooks.py").write_text(HOOKS_MODULE)
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))}
    env.update({"DATABASE_URL": db, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "K8SFIX_DIR": str(tmp_path),
                "PYTHONPATH": os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])})
    if multiproc:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    port = _port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", "from clerk_sync.cli import main; main()", "serve", "--port",
                             str(port), "--hooks", "k8sfix_hooks:HOOKS"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.err", "wb"))  # noqa: SIM115
    runs = tmp_path / "runs.txt"
    try:
        wait_for_http(f"{base}/readyz", timeout=30, proc=proc)
        for n in (1, 2, 3):
            assert _post(base, _user(f"user_{n}")) == 200
        deadline = time.monotonic() + 30
        while not (runs.exists() and "start" in runs.read_text()):
            assert time.monotonic() < deadline, "no hook started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # the running handler holds the stop (it waits
            proc.wait(timeout=2)  # for "go", up to --graceful-timeout's 25 s)
        assert proc.poll() is None, "serve ended while its hook's handler was running"
        (tmp_path / "go").touch()
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = (tmp_path / "serve.err").read_text()
    assert code == -signal.SIGTERM, said
    assert runs.read_text().split("\n")[:2] == ["start user_1", "end user_1"], said
    store = Store.from_url(db)
    with store.connect() as conn:
        left = conn.execute(sa.select(hook_jobs.c.status, hook_jobs.c.claim_token, hook_jobs.c.attempts)
                            .order_by(hook_jobs.c.id)).all()
    store.dispose()
    assert [tuple(r) for r in left] == [("pending", None, 0), ("pending", None, 0)], said


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_migrate_and_serve_mask_a_password_given_as_a_query_parameter(db_url: str, tmp_path: Path) -> None:
    """Fixed: the CLI masked the URL with SQLAlchemy's ``hide_password``, which leaves ``?password=`` as it is:
    ``migrate``'s summary and serve's start line printed it in clear (a pod's log kept it)."""
    url = db_url + ("&" if "?" in db_url else "?") + "password=hunter2query&sslpassword=hunter3ssl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))}
    env.update({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    cli = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]
    migrated = subprocess.run([*cli, "migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    port = _port()
    proc = subprocess.Popen([*cli, "serve", "--port", str(port), "--no-migrate"], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=30, proc=proc)
    finally:
        proc.terminate()
        _, served = proc.communicate(timeout=30)
    for said in (migrated.stdout + migrated.stderr, served):
        assert "already current" in said or "serving on" in said, said
        assert "hunter2query" not in said and "hunter3ssl" not in said, said
        assert "password=***" in said.replace("\n", "") and "sslpassword=***" in said.replace("\n", ""), said


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_serve_exits_within_its_graceful_timeout_when_a_database_peer_went_silent(db_url: str, tmp_path: Path) -> None:
    """Fixed: serve gave uvicorn no ``timeout_graceful_shutdown``: a delivery whose database connection's peer went
    silent (no server-side timeout can fire: the server never sees the statement) kept its request, and so the
    SIGTERM'd process, alive for ever (9.5 minutes until a SIGKILL, in the walkthrough). Now the requests get
    --graceful-timeout (CLERK_SYNC_GRACEFUL_TIMEOUT_S) seconds, and the process exits at most 5 s after that
    whatever thread still waits, saying why."""
    from urllib.parse import urlsplit

    where = urlsplit(db_url.replace("postgresql+psycopg", "postgresql"))
    proxy = TcpProxy((where.hostname or "127.0.0.1", where.port or 5432))
    url = db_url.replace(f"{where.hostname}:{where.port or 5432}", f"127.0.0.1:{proxy.port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))}
    env.update({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_SYNC_GRACEFUL_TIMEOUT_S": "1"})
    port = _port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", "from clerk_sync.cli import main; main()", "serve", "--port",
                             str(port), "--no-migrate"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "serve.err", "wb"))  # noqa: SIM115
    import threading

    stuck: list[BaseException | int] = []

    def post_stuck() -> None:
        try:
            stuck.append(_post(base, _user("user_2")))
        except BaseException as exc:  # the connection closed under it: expected
            stuck.append(exc)

    try:
        wait_for_http(f"{base}/readyz", timeout=30, proc=proc)
        assert _post(base, _user("user_1")) == 200  # a pooled connection through the proxy
        proxy.silent.set()
        poster = threading.Thread(target=post_stuck, daemon=True)
        poster.start()
        poster.join(1.0)
        assert not stuck, "the delivery did not wait on the silent connection"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not exit 30 s after SIGTERM (a request on a silent database connection held it)")
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()
    said = (tmp_path / "serve.err").read_text()
    assert code in (-signal.SIGTERM, 128 + signal.SIGTERM), said
    assert took < 1 + 5 + 3, (took, said)  # --graceful-timeout 1, + the 5 s margin (+ a process' exit)
    if code == 128 + signal.SIGTERM:  # the exit timer's: one line (not wrapped) saying why
        assert "error: the shutdown outlived 6 s (a request, hook or database call that does not end" in said, said
    assert "clerk-sync serving on http://127.0.0.1:" in said.splitlines()[0] and "(postgresql" in said.splitlines()[0]


def test_the_exit_timer_waits_for_a_migration_in_progress(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    """Review: a SIGTERM during serve's start-up migration armed the exit timer, which ended the process in the
    middle of DDL (MySQL/MariaDB's is not transactional: a schema left half-migrated). It now waits while an
    upgrade on MySQL/MariaDB runs in the process, then ends it, and says the bound it was given."""
    import importlib
    import threading

    from clerk_sync import migrations

    cli_main = importlib.import_module("clerk_sync.cli.main")  # (the module: the package exports main())

    def said_while_upgrading(url: str) -> list[bool]:
        seen: list[bool] = []
        engine = sa.create_engine(url)
        sa.event.listen(engine, "before_cursor_execute", lambda *_: seen.append(migrations.upgrading()))
        migrations.upgrade(engine)
        engine.dispose()
        assert seen and not migrations.upgrading()  # (not after)
        return seen

    with mysql_database() as url:
        assert all(said_while_upgrading(url))  # said while it runs
    # SQLite's (and PostgreSQL's) DDL rolls back whole: an upgrade there, or one connecting to a host that never
    # answers, does not hold a stopping serve past its bound (CLI review: a SIGTERM waited out the connect timeout)
    assert not any(said_while_upgrading(sqlite_url))

    exited = threading.Event()
    monkeypatch.setattr(cli_main.os, "_exit", lambda code: exited.set())
    monkeypatch.setattr(migrations, "_UPGRADES_RUNNING", [1])  # an upgrade in progress
    printed: list[str] = []
    monkeypatch.setattr(cli_main.console, "print", lambda text, **_: printed.append(text))
    cli_main._exit_after(0.01, 143)
    assert not exited.wait(0.5)  # past its time: it waits for the migration
    migrations._UPGRADES_RUNNING[0] = 0
    assert exited.wait(10)
    assert printed and "the shutdown outlived 0.01 s" in printed[0], printed  # its own bound, not the re-arm's 1 s


def test_masked_url_hides_every_query_parameter_naming_a_password_or_secret() -> None:
    from clerk_sync._urls import masked_url

    url = ("mysql://app@db:3306/app?passwd=p1&charset=utf8mb4&PWD=p2&ssl_passphrase=p3&password=p4&"
           "auth_token=p5&client_secret=p6&sslmode=require&passfile=/home/app/.pgpass")
    assert masked_url(url) == ("mysql://***@db:3306/app?passwd=***&charset=utf8mb4&PWD=***&ssl_passphrase=***&"
                               "password=***&auth_token=***&client_secret=***&sslmode=require&"
                               "passfile=/home/app/.pgpass")  # (a path: which file was read is what to check)


@pytest.mark.parametrize("db_url", [pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_migrate_masks_a_mysql_password_given_as_passwd(db_url: str) -> None:
    """Fixed: only parameters naming ``password`` were masked, and ``passwd`` is the name mysqlclient and PyMySQL
    take: ``migrate`` printed it in clear."""
    import sqlalchemy as sa

    database = sa.make_url(db_url).database
    admin = sa.create_engine(db_url)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql("DROP USER IF EXISTS cs_masked@'%%'")
            conn.exec_driver_sql("CREATE USER cs_masked@'%%' IDENTIFIED BY 'hunter4passwd'")
            conn.exec_driver_sql(f"GRANT ALL ON `{database}`.* TO cs_masked@'%%'")
        url = sa.make_url(db_url).set(username="cs_masked", password=None).render_as_string(hide_password=False)
        url += ("&" if "?" in url else "?") + "passwd=hunter4passwd"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "PROMETHEUS_"))}
        env.update({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
        cli = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]
        migrated = subprocess.run([*cli, "migrate"], env=env, capture_output=True, text=True, timeout=60)
        said = migrated.stdout + migrated.stderr
        assert migrated.returncode == 0 and "already current" in said, said
        assert "hunter4passwd" not in said and "passwd=***" in said.replace("\n", ""), said
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql("DROP USER IF EXISTS cs_masked@'%%'")
        admin.dispose()
