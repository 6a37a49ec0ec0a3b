"""Hooks across processes and replicas: ``kill -9`` between commit and dispatch and in the middle of a
handler loses no change and repeats no keyed side effect; four dispatchers on PostgreSQL never run
one job at the same time, and keep each entity's order."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.changes import Change, Hook
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs
from tests import _hook_worker
from tests import factories as f
from tests._server import free_port, running, wait_for_http
from tests.test_cli import run
from tests.test_hooks import Recorder, deliver

B = 1_800_000_000_000
ROOT = Path(__file__).resolve().parent.parent
PATHS = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # subprocesses run this checkout's code

# Ingest with hooks, then die by SIGKILL before anything dispatches: the commits must hold the jobs.
_INGEST_THEN_DIE = """
import json, os, signal, sys
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier, sign
from tests import _hook_worker
store = Store.from_url(os.environ["DATABASE_URL"], hooks=_hook_worker.hooks())
processor = WebhookProcessor(store, WebhookVerifier([sys.argv[2]]))
for svix_id, body in json.load(open(sys.argv[1])):
    processor.process(sign(sys.argv[2], svix_id, int(__import__("time").time()), body.encode()), body.encode())
os.kill(os.getpid(), signal.SIGKILL)
"""


def _history() -> list[tuple[str, str]]:
    """Creations, a role change, a cascade, with a duplicate, a re-send and an out-of-order update."""
    events = [
        f.envelope("user.created", f.user("user_1", B + 1000)),
        f.envelope("organization.created", f.organization("org_1", B + 1000)),
        f.envelope("organizationMembership.created", f.membership("orgmem_1", "org_1", "user_1", B + 1000)),
        f.envelope("user.updated", f.user("user_2", B + 2000, role="admin")),  # before its creation
        f.envelope("user.created", f.user("user_2", B + 1000)),  # stale
        f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")),
        f.envelope("user.deleted", f.deleted("user", "user_1"), B + 3000),
    ]
    deliveries = [(f"msg_{i}", f.body_of(e).decode()) for i, e in enumerate(events)]
    return [*deliveries, deliveries[0], ("msg_resent", deliveries[5][1])]


EXPECTED = {
    f"user.created:user_1:{B + 1000}", f"organization.created:org_1:{B + 1000}",
    f"organizationMembership.created:orgmem_1:{B + 1000}", f"user.created:user_2:{B + 2000}",
    f"user.updated:user_1:{B + 2000}", f"user.deleted:user_1:{B + 3000}",
    f"organizationMembership.deleted:orgmem_1:{B + 3000}",
}


@pytest.mark.slow
def test_kill_9_after_commit_and_mid_handler(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = sa.create_engine(db_url)
    _hook_worker.meta.create_all(engine)
    env = {"DATABASE_URL": db_url, "PYTHONPATH": PATHS}
    (tmp_path / "deliveries.json").write_text(json.dumps(_history()))

    ingest = subprocess.run([sys.executable, "-c", _INGEST_THEN_DIE, str(tmp_path / "deliveries.json"), f.SECRET],
                            env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert ingest.returncode == -9, ingest.stderr
    with engine.connect() as conn:
        assert set(conn.execute(sa.select(hook_jobs.c.idempotency_key)).scalars()) == EXPECTED

    (tmp_path / "crash").touch()  # the worker acts on its first job, then is killed before finishing it
    worker = run("worker", "--hooks", "tests._hook_worker:hooks", "--once",
                 env={**env, "HOOK_CRASH_FILE": str(tmp_path / "crash")}, cwd=ROOT)
    assert worker.returncode == -9, worker.stderr
    with engine.connect() as conn:
        (first,) = conn.execute(sa.select(_hook_worker.calls.c.key)).scalars()
        assert conn.execute(sa.select(hook_jobs.c.status).where(hook_jobs.c.idempotency_key == first)).scalar() \
            == "running"

    monkeypatch.setenv("DATABASE_URL", db_url)
    calls, effects, left = _hook_worker.resume_after_lease(db_url, engine, _hook_worker.hooks())
    assert left == 0
    assert effects == EXPECTED  # every applied change acted on, exactly once
    assert sorted(calls) == sorted([*EXPECTED, first])  # only the interrupted one was called twice
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_four_dispatchers_never_run_a_job_twice_at_once(db_url: str) -> None:
    lock = threading.Lock()
    running: set[int] = set()
    overlaps: list[str] = []
    handled: dict[str, list[int]] = defaultdict(list)  # entity -> versions, in handling order
    done: list[str] = []
    rng = random.Random(7)

    def handler(change: Change) -> None:
        key = id_of(change)
        with lock:
            if key in running:
                overlaps.append(change.idempotency_key)
            running.add(key)
        try:
            time.sleep(0.002)  # widen the window in which a second claim would overlap
            with lock:
                fails = rng.random() < 0.2
            if fails:
                raise RuntimeError("flaky")
            with lock:
                handled[change.clerk_id].append(change.version)
                done.append(change.idempotency_key)
        finally:
            with lock:
                running.discard(key)

    def id_of(change: Change) -> int:
        return hash(change.idempotency_key)

    hooks = [Hook("h", handler)]
    producer = Store.from_url(db_url, hooks=hooks)
    events = []
    for n in range(40):
        events += [f.envelope("user.created", f.user(f"user_{n}", B + 1000)),
                   f.envelope("user.updated", f.user(f"user_{n}", B + 2000, role="admin")),
                   f.envelope("user.updated", f.user(f"user_{n}", B + 3000, role="member"))]
    deliver(producer, *events)
    stores = [Store.from_url(db_url, hooks=hooks) for _ in range(4)]
    dispatchers = [Dispatcher(s, backoff=Backoff(max_attempts=100, base_s=0), batch=5) for s in stores]

    def work(d: Dispatcher) -> None:
        while True:
            with producer.connect() as conn:
                if not conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar():
                    return
            d.run_once()

    threads = [threading.Thread(target=work, args=(d,)) for d in dispatchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert overlaps == []
    assert len(done) == len(set(done)) == 120
    assert all(versions == [B + 1000, B + 2000, B + 3000] for versions in handled.values())
    for s in [producer, *stores]:
        s.dispose()


def test_cli_lists_retries_and_purges_dead_jobs(db_url: str) -> None:
    def down(change: Change) -> None:
        raise RuntimeError("smtp refused")

    store = Store.from_url(db_url, hooks=[Hook("mail", down)])
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)),
            f.envelope("user.created", f.user("user_2", B + 1000)))
    Dispatcher(store, backoff=Backoff(max_attempts=1)).drain()
    env = {"DATABASE_URL": db_url}

    listed = run("hooks", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert [line.split("\t")[1:4] for line in lines] == [["mail", "user.created", "user_1"],
                                                           ["mail", "user.created", "user_2"]]
    assert "RuntimeError: smtp refused" in lines[0]
    first_id = lines[0].split("\t")[0]

    refused = run("hooks", "purge", env=env)
    assert refused.returncode == 2 and "--all" in refused.stderr
    assert "1 dead job(s) queued again" in run("hooks", "retry", first_id, env=env).stdout
    assert "1 dead job(s) purged" in run("hooks", "purge", "--all", env=env).stdout
    with store.connect() as conn:
        assert list(conn.execute(sa.select(hook_jobs.c.status, hook_jobs.c.attempts))) == [("pending", 0)]
    store.dispose()


def test_worker_names_a_bad_hooks_spec(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    for spec, message in (("nocolon", "expected module:attribute"), ("tests.nope:HOOKS", "no module named"),
                          ("tests._hook_worker:meta", "non-empty list of clerk_sync.changes.Hook")):
        result = run("worker", "--hooks", spec, "--once", env={**env, "PYTHONPATH": PATHS}, cwd=ROOT)
        assert result.returncode == 2
        assert message in " ".join(result.stderr.split()), result.stderr


@pytest.mark.slow
def test_serve_with_hooks_runs_them_in_a_thread_after_the_commit(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    _hook_worker.meta.create_all(engine)
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": f.SECRET, "PYTHONPATH": PATHS,
           "CLERK_SYNC_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-c", "from clerk_sync.cli import main; main()", "serve", "--port",
                             str(port), "--hooks", "tests._hook_worker:hooks"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        headers, body = f.signed(f.envelope("user.created", f.user("user_1", B + 1000)), "msg_serve_1")
        assert httpx.post(f"http://127.0.0.1:{port}/webhooks/clerk", content=body, headers=headers).status_code == 200
        deadline = time.monotonic() + 30  # the dispatcher polls every second: wait for the outcome, not a time
        effects: list[str] = []
        while not effects and time.monotonic() < deadline:
            with engine.connect() as conn:
                effects = list(conn.execute(sa.select(_hook_worker.effects.c.key)).scalars())
            time.sleep(0.05)
        assert effects == [f"user.created:user_1:{B + 1000}"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        engine.dispose()


def test_doctor_points_at_dead_hook_jobs(db_url: str) -> None:
    def down(change: Change) -> None:
        raise RuntimeError("crm unreachable")

    env = {"DATABASE_URL": db_url}
    assert "ok    hook jobs: none dead, 0 queued" in run("doctor", env=env).stdout
    store = Store.from_url(db_url, hooks=[Hook("crm", down)])
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)),
            f.envelope("user.created", f.user("user_2", B + 1000)))
    Dispatcher(store, backoff=Backoff(max_attempts=1)).run_once()
    deliver(store, f.envelope("user.created", f.user("user_3", B + 1000)))
    store.dispose()
    assert "warn  hook jobs: 2 dead, 1 queued: `clerk-sync hooks list`" in run("doctor", env=env).stdout


@pytest.mark.parametrize("dispatch", [True, False], ids=["dispatch", "no-dispatch"])
def test_serve_no_dispatch_queues_jobs_for_a_worker_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              dispatch: bool) -> None:
    """``serve --hooks --no-dispatch`` still writes each applied change's job in the delivery's transaction,
    but starts no dispatcher: the jobs wait for ``clerk-sync worker`` (which then runs them)."""
    import uvicorn

    from clerk_sync.cli.main import serve
    from clerk_sync.hooks import Dispatcher

    url = f"sqlite:///{tmp_path / 'serve.db'}"
    started: list[bool] = []
    answers: list[int] = []
    monkeypatch.setattr(Dispatcher, "start", lambda self: started.append(True))

    served = uvicorn.Server.run

    def run_app(server: uvicorn.Server, sockets: Any = None) -> None:
        if threading.current_thread() is not threading.main_thread():  # the test's own server below (serve_app's)
            return served(server, sockets=sockets)
        # serve's (it passes the socket it bound): instead of serving forever, one delivery, then return
        with running(server.config.app, lifespan="on") as base:
            headers, body = f.signed(f.envelope("user.created", f.user("user_1", B + 1000)), "msg_nd_1")
            answers.append(httpx.post(f"{base}/webhooks/clerk", content=body, headers=headers).status_code)
        server.started = True
        return None

    monkeypatch.setattr(uvicorn.Server, "run", run_app)
    # not the process-wide logging set-up (its cached loggers would outlive this test's captured stderr)
    monkeypatch.setattr(sys.modules["clerk_sync.cli.main"], "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("CLERK_WEBHOOK_SIGNING_SECRET", f.SECRET)
    monkeypatch.syspath_prepend(str(ROOT))
    serve(hooks="tests._hook_worker:hooks", dispatch=dispatch)  # the command's function, as `clerk-sync serve`
    assert answers == [200] and started == ([True] if dispatch else [])
    if not dispatch:
        engine = sa.create_engine(url)
        _hook_worker.meta.create_all(engine)
        with engine.connect() as conn:
            assert list(conn.execute(sa.text("SELECT type, status FROM hook_jobs"))) == [("user.created", "pending")]
        worker = run("worker", "--hooks", "tests._hook_worker:hooks", "--once",
                     env={"DATABASE_URL": url, "PYTHONPATH": PATHS}, cwd=ROOT)
        assert "ran 1 hook jobs" in worker.stderr, worker.stderr
        with engine.connect() as conn:
            assert list(conn.execute(sa.select(_hook_worker.effects.c.key)).scalars()) == [f"user.created:user_1:{B + 1000}"]
        engine.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_the_worker_vacuums_the_outbox_as_told(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``clerk-sync worker --vacuum-every N``: the outbox is vacuumed after N finished jobs (0: never)."""
    engine = sa.create_engine(db_url)
    _hook_worker.meta.create_all(engine)
    env = {"DATABASE_URL": db_url, "PYTHONPATH": PATHS}
    monkeypatch.setenv("DATABASE_URL", db_url)
    store = Store.from_url(db_url, hooks=_hook_worker.hooks())  # the worker's own hooks: its jobs finish

    def vacuums() -> int:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'hook_jobs'::regclass").scalar_one())

    for every, expected in (("0", 0), ("2", 1)):
        deliver(store, *[f.envelope("user.created", f.user(f"user_w{every}_{n}", 1)) for n in range(3)])
        worker = run("worker", "--hooks", "tests._hook_worker:hooks", "--once", "--batch", "2",
                     "--vacuum-every", every, env=env, cwd=ROOT)
        assert worker.returncode == 0, worker.stderr
        assert "ran 3 hook jobs" in worker.stderr
        deadline = time.monotonic() + 10  # shared statistics: at the end of the VACUUM's transaction
        while vacuums() < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vacuums() == expected
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar() == 0  # all done
    refused = run("worker", "--hooks", "tests._hook_worker:hooks", "--once", "--vacuum-every", "-1", env=env, cwd=ROOT)
    assert refused.returncode == 2 and "--vacuum-every" in refused.stderr  # a usage error, before any work
    store.dispose()
    engine.dispose()


_LEASE_RANGE = "must be more than 0 and at most 86400 seconds (a day)"
_POLL_RANGE = "must be from 0 to 86400 seconds (a day)"


@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("--lease", "0", _LEASE_RANGE), ("--lease", "-5", _LEASE_RANGE), ("--poll", "-1", _POLL_RANGE),
    ("--lease", "1e300", _LEASE_RANGE), ("--lease", "inf", _LEASE_RANGE), ("--lease", "nan", _LEASE_RANGE),
    ("--lease", "86401", _LEASE_RANGE),
    ("--poll", "1e300", _POLL_RANGE), ("--poll", "inf", _POLL_RANGE), ("--poll", "nan", _POLL_RANGE),
], ids=lambda value: value if value.startswith("-") or value[0].isdigit() or value in ("inf", "nan") else "")
def test_the_worker_refuses_a_lease_or_poll_out_of_range(tmp_path: Path, option: str, value: str,
                                                         allowed: str) -> None:
    """A lease of 0 s would let every other worker take each job at once; a usage error, before any work.
    Fixed: 1e300 was an OverflowError traceback (a wait too long for the platform) and ``--lease inf`` a
    ValueError about ``heartbeat_s``; both are bounded at a day, the error saying the range."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "PYTHONPATH": PATHS}
    refused = run("worker", "--hooks", "tests._hook_worker:hooks", "--once", option, value, env=env, cwd=ROOT)
    assert refused.returncode == 2 and option in refused.stderr, refused.stderr
    assert allowed in " ".join(refused.stderr.replace("│", " ").split()), refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("args", [["retry", "99999999999999999999"], ["purge", "99999999999999999999"],
                                  ["purge", "0"], ["retry", "3", "--", "-1"]], ids=["retry-2**66", "purge-2**66",
                                                                                    "purge-0", "retry-negative"])
def test_hooks_retry_and_purge_refuse_a_job_id_out_of_range(tmp_path: Path, args: list[str]) -> None:
    """Fixed: an id past 64 bits was an OverflowError traceback on SQLite and "bigint out of range. Check
    DATABASE_URL" on PostgreSQL. Ids are checked when the arguments are read: a usage error, the range said."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    refused = run("hooks", *args, env=env)
    said = " ".join(refused.stderr.replace("│", " ").split())
    assert refused.returncode == 2, refused.stderr
    assert "job ids are from 1 to 9223372036854775807" in said and f"not {args[-1]}" in said, refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "x.db").exists()


def test_hooks_list_refuses_a_limit_past_64_bits(tmp_path: Path) -> None:
    """Fixed: an OverflowError traceback from the driver, as for the ids."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    refused = run("hooks", "list", "--limit", "99999999999999999999", env=env)
    assert refused.returncode == 2 and "--limit" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_the_largest_job_id_is_looked_up(db_url: str) -> None:
    """2**63-1 fits every store's ids: not found, as any id no job has (exit 1), not a database error."""
    for verb in ("retry", "purge"):
        result = run("hooks", verb, str(2**63 - 1), env={"DATABASE_URL": db_url})
        assert result.returncode == 1, result.stderr
        assert f"job {2**63 - 1}: not found" in result.stdout + result.stderr


def _dead_and_pending(db_url: str) -> tuple[str, str]:
    """A dead job (user_1's creation) and a pending one (user_2's); their ids."""
    store = Store.from_url(db_url, hooks=[Hook("mail", lambda change: None)])
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    with store.transaction() as writer:
        writer.conn.execute(hook_jobs.update().values(status="dead", attempts=10, last_error="RuntimeError: down"))
    deliver(store, f.envelope("user.created", f.user("user_2", B + 1000)))
    with store.connect() as conn:
        dead, pending = (str(i) for i in conn.execute(sa.select(hook_jobs.c.id).order_by(hook_jobs.c.id)).scalars())
    store.dispose()
    return dead, pending


@pytest.mark.parametrize("command", ["retry", "purge"])
def test_retry_and_purge_name_the_ids_that_are_not_dead_jobs(db_url: str, command: str) -> None:
    """What was asked and could not be done is named, with exit code 1; the dead jobs named are still done."""
    dead, pending = _dead_and_pending(db_url)
    env = {"DATABASE_URL": db_url}
    result = run("hooks", command, "999", pending, dead, env=env)
    assert result.returncode == 1
    assert f"1 dead job(s) {'queued again' if command == 'retry' else 'purged'}" in result.stdout
    assert result.stderr.splitlines() == ["job 999: not found", f"job {pending}: pending, not dead (left as it is)"]
    listed = run("hooks", "list", "--status", "pending", env=env).stdout.splitlines()
    # a retried job is queued at the tail, behind the pending one
    assert [line.split("\t")[3] for line in listed] == (["user_2", "user_1"] if command == "retry" else ["user_2"])
    assert run("hooks", command, "--all", env=env).returncode == 0  # nothing named, nothing refused


def test_list_refuses_an_unknown_status(tmp_path: Path) -> None:
    result = run("hooks", "list", "--status", "bogus", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    assert result.returncode == 2 and "--status" in result.stderr and "bogus" in result.stderr


def test_retry_warns_of_a_job_older_than_what_its_entity_has_since(db_url: str) -> None:
    """Retrying user_1's creation after its updates ran gives the handler version 1000 after 3000: the
    operator asked for it, so it is queued, with a warning; a job with nothing newer gets none."""
    handler = Recorder(failures=1)
    store = Store.from_url(db_url, hooks=[Hook("sync", handler)])
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)),
            f.envelope("user.updated", f.user("user_1", B + 2000, role="admin")),
            f.envelope("user.updated", f.user("user_1", B + 3000, role="owner")))
    Dispatcher(store, backoff=Backoff(max_attempts=1)).drain()  # the creation fails: dead; the updates run
    handler.failures = 1
    deliver(store, f.envelope("user.created", f.user("user_2", B + 1000)))
    Dispatcher(store, backoff=Backoff(max_attempts=1)).drain()
    with store.connect() as conn:
        old, alone = conn.execute(sa.select(hook_jobs.c.id).order_by(hook_jobs.c.id)).scalars()
    env = {"DATABASE_URL": db_url}
    retried = run("hooks", "retry", str(old), str(alone), env=env)
    assert retried.returncode == 0 and "2 dead job(s) queued again" in retried.stdout
    assert retried.stderr.splitlines() == [
        f"warning: job {old} (user.created of user_1, version {B + 1000}) is older than version {B + 3000}, "
        "applied or queued since: it will reach the handler out of order"]
    Dispatcher(store).drain()
    assert [(c.clerk_id, c.version) for c in handler.seen][-2:] == [("user_1", B + 1000), ("user_2", B + 1000)]
    store.dispose()


def test_worker_serves_its_hook_series_on_metrics_port(tmp_path: Path) -> None:
    """Review finding: ``clerk-sync worker`` (the dispatcher of ``serve --no-dispatch``, needed with ``--workers``)
    counted its runs nowhere, so the RUNBOOK's ``hook_runs_total`` queries found no series in that layout."""
    db = f"sqlite:///{tmp_path / 'w.db'}"
    engine = sa.create_engine(db)
    _hook_worker.meta.create_all(engine)
    store = Store.from_url(db, hooks=[Hook("effects", lambda change: None)])  # queues the worker's hook's jobs
    migrations.upgrade(store.engine)
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    store.dispose()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db, "PYTHONPATH": PATHS, "CLERK_SYNC_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-c", "from clerk_sync.cli import main; main()", "worker", "--hooks",
                             "tests._hook_worker:hooks", "--poll", "0.05", "--metrics-port", str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/metrics", proc=proc)
        deadline, text = time.monotonic() + 30, ""  # wait for the outcome, not a time
        while 'clerk_sync_hook_runs_total{hook="effects",outcome="ok"} 1.0' not in text:
            assert time.monotonic() < deadline, text
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            time.sleep(0.05)
        assert "clerk_sync_hook_seconds_count" in text
        taken = subprocess.run([sys.executable, "-c", "from clerk_sync.cli import main; main()", "worker", "--hooks",
                                "tests._hook_worker:hooks", "--metrics-port", str(port)],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 3 and "choose a free port" in " ".join(taken.stderr.split()), taken.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        engine.dispose()
