"""The command line, as a user runs it: real processes, real exit codes and messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync.engine import Entity, Upsert
from clerk_sync.events import user_record
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, users, webhook_events
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._server import free_port, wait_for_http
from tests.conftest import SECRET

CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    full_env.update(env or {})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120, check=False)


def test_serve_without_secret_fails_fast_naming_the_variable(tmp_path: Path) -> None:
    result = run("serve", "--port", str(free_port()), env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    assert result.returncode == 2
    assert "CLERK_WEBHOOK_SIGNING_SECRET" in result.stdout + result.stderr
    assert "Signing Secret" in result.stdout + result.stderr


def test_bad_setting_is_named(tmp_path: Path) -> None:
    result = run("migrate", env={"CLERK_SYNC_MAX_BODY_BYTES": "lots"})
    assert result.returncode == 2
    assert "CLERK_SYNC_MAX_BODY_BYTES" in result.stdout + result.stderr


def test_migrate_then_replay_failed_deliveries(db_url: str) -> None:
    assert run("migrate", env={"DATABASE_URL": db_url}).returncode == 0
    store = Store.from_url(db_url)
    broken = f.envelope("user.created", {**f.user("user_cli", 5), "id": "user_" + "x" * 80})
    with store.transaction() as w:
        w.record_delivery("msg_cli", broken, event_type="user.created", instance_id=None, event_timestamp=1)
        w.finish_delivery("msg_cli", "failed", "id too long")
    result = run("replay", env={"DATABASE_URL": db_url})  # still broken: exit 1, not 0 (review)
    assert result.returncode == 1, result.stderr
    assert "replayed 1" in result.stdout + result.stderr and "1 still failed" in result.stderr
    fixed = f.envelope("user.created", f.user("user_cli", 5))
    with store.transaction() as w:
        w.conn.execute(webhook_events.update().values(payload=fixed))
    fixed_run = run("replay", "--status", "failed", "--since", "2000-01-01T00:00:00", env={"DATABASE_URL": db_url})
    assert fixed_run.returncode == 0, fixed_run.stderr
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.clerk_id)).scalar_one() == "user_cli"
        assert conn.execute(sa.select(webhook_events.c.status)).scalar_one() == "applied"
    typo = run("replay", "--status", "faild", env={"DATABASE_URL": db_url})  # replayed 0 and exited 0
    with store.transaction() as w:  # a schema behind the release: the error says what to run
        w.conn.execute(sa.text("DROP TABLE hook_jobs"))
    behind = run("hooks", "list", env={"DATABASE_URL": db_url})
    assert behind.returncode == 2 and "`clerk-sync migrate` with the same DATABASE_URL" in " ".join(
        behind.stderr.split()), behind.stderr
    assert typo.returncode == 2 and "faild" in typo.stderr and "skipped" in typo.stderr
    store.dispose()


def test_users_promote_against_the_emulator(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    with EmulatorServer() as clerk:
        user = clerk.create_user("promote.me@example.com")
        store = Store.from_url(url)
        with store.transaction() as w:
            w.apply(Upsert(Entity.USER, user_record(user)))
        env = {"DATABASE_URL": url, "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url}
        result = run("users", "promote", "promote.me@example.com", "--role", "admin", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "applied" in result.stdout + result.stderr
        assert clerk.request("GET", f"/v1/users/{user['id']}")["public_metadata"]["role"] == "admin"
        missing = run("users", "promote", "nobody@example.com", env=env)
        assert missing.returncode == 1
        assert "no live synced user with the primary e-mail 'nobody@example.com'" in missing.stdout + missing.stderr
        # an id is named as one (it said "email"), and a deleted user is not sent to reconcile only
        missing = run("users", "promote", "user_nobody", env=env)
        assert missing.returncode == 1
        said = " ".join((missing.stdout + missing.stderr).split())
        assert "no live synced user with the id 'user_nobody'" in said and "or deleted" in said
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.role)).scalar_one() == "admin"
        assert conn.execute(sa.select(audit_log.c.action)).scalar_one() == "role.changed"
    store.dispose()


def test_emulate_serves_the_backend_api_and_jwks() -> None:
    port = free_port()
    proc = subprocess.Popen([*CLI, "emulate", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={k: v for k, v in os.environ.items() if not k.startswith("CLERK_")})
    try:
        jwks = wait_for_http(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=20, proc=proc)
        assert jwks.json()["keys"][0]["kty"] == "RSA"
        headers = {"Authorization": "Bearer sk_test_emulator"}
        created = httpx.post(f"http://127.0.0.1:{port}/v1/users", json={"email_address": ["e@example.com"]}, headers=headers)
        assert created.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/users", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "Webhook signing secret (generated): whsec_" in out


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_serve_with_two_workers_on_postgres(db_url: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}
    env.update({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/healthz", timeout=30, proc=proc)
        with httpx.Client(base_url=base) as client:
            statuses = []
            for i in range(30):
                headers, body = f.signed(f.envelope("user.created", f.user(f"user_w{i % 10}", 100 + i)), f"msg_w{i}")
                statuses.append(client.post("/webhooks/clerk", content=body, headers=headers).json()["status"])
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert statuses.count("applied") == 30
    store = Store.from_url(db_url)
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one() == 10
    store.dispose()


def test_database_down_is_one_readable_line() -> None:
    result = run("migrate", env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"})
    assert result.returncode == 3  # unavailable, retry later (2: a setting to fix); tests/test_cli_exit_codes.py
    out = result.stdout + result.stderr
    assert "DATABASE_URL" in out
    assert "Traceback" not in out


def test_doctor_reports_each_check_and_what_to_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'doc.db'}"
    with EmulatorServer() as clerk:
        env = {"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_SECRET_KEY": clerk.secret_key,
               "CLERK_API_URL": clerk.url}
        before = run("doctor", env=env)
        assert before.returncode == 1
        assert "run `clerk-sync migrate`" in before.stdout
        assert run("migrate", env=env).returncode == 0
        after = run("doctor", env=env)
        assert after.returncode == 0, after.stdout
        assert "migrations current" in after.stdout
        assert "key(s)" in after.stdout  # the JWKS was fetched
        assert "CLERK_AUTHORIZED_PARTIES" in after.stdout  # azp unchecked: a warning, not a failure
        wrong = run("doctor", env={**env, "CLERK_SECRET_KEY": "sk_test_wrong"})
        assert wrong.returncode == 1
        assert "refused CLERK_SECRET_KEY" in wrong.stdout


def _synced_user(url: str, clerk: EmulatorServer, email: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A migrated database at ``url`` holding a user of ``clerk``; the user and the CLI's environment."""
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    user = clerk.create_user(email)
    store = Store.from_url(url)
    with store.transaction() as w:
        w.apply(Upsert(Entity.USER, user_record(user)))
    store.dispose()
    return user, {"DATABASE_URL": url, "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url}


def test_promote_during_an_outage_is_pending_until_retry_pending(tmp_path: Path) -> None:
    with EmulatorServer() as clerk:
        user, env = _synced_user(f"sqlite:///{tmp_path / 'pending.db'}", clerk, "later@example.com")
        clerk.set_faults(outage=True)
        promoted = run("users", "promote", "later@example.com", env=env)
        said = " ".join((promoted.stdout + promoted.stderr).split())
        # not done: exit 3 (review: it exited 0), with why and what pushes it later
        assert promoted.returncode == 3 and "pending:" in said, said
        assert "Clerk was not reached (" in said and "run `clerk-sync users retry-pending`" in said
        assert "the database keeps the role 'user' until it reaches Clerk" in said
        from clerk_sync.auth.admin import RoleChange  # a user with no role yet: not "the role None"
        assert "keeps no role until" in RoleChange(user["id"], "admin", "pending", None, "down").pending_advice("x")
        assert run("users", "retry-pending", env=env).returncode == 3
        clerk.set_faults(outage=False)
        done = run("users", "retry-pending", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert clerk.request("GET", f"/v1/users/{user['id']}")["public_metadata"]["role"] == "admin"


@pytest.mark.parametrize("tty", [False, True], ids=["file", "terminal"])
def test_log_lines_are_logfmt_in_a_file_and_aligned_at_a_terminal(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    """What ``serve`` writes to a file, journald or a container log is logfmt, one parseable line per event
    (values with spaces or quotes quoted); a person at a terminal gets the aligned form."""
    import io
    import shlex

    import structlog

    from clerk_sync._logging import configure_logging

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    stream = Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        configure_logging("INFO")
        log = structlog.get_logger("test")
        log.info("webhook", svix_id="msg_1", status="applied", error=None, retried=False)
        log.warning("hook failed", error='Boom: "quoted" thing')
        log.debug("not at INFO")
        try:
            raise ZeroDivisionError("the cause")
        except ZeroDivisionError:
            log.exception("group_commit_crashed")
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert "ZeroDivisionError: the cause" in text and "Traceback" in text  # the traceback is never dropped
    lines = text.splitlines()
    if tty:
        assert "[info     ] webhook" in lines[0] and "svix_id=msg_1" in lines[0]
        return
    assert len(lines) == 3  # one line per event, the traceback inside its own
    fields = [dict(part.split("=", 1) for part in shlex.split(line)) for line in lines]
    assert [(f["level"], f["event"]) for f in fields[:2]] == [("info", "webhook"), ("warning", "hook failed")]
    assert fields[0]["svix_id"] == "msg_1" and fields[0]["retried"] == "false" and fields[0]["timestamp"].endswith("Z")
    assert fields[1]["error"] == 'Boom: "quoted" thing'
    assert fields[2]["level"] == "error" and "ZeroDivisionError: the cause" in fields[2]["exception"]



def test_clerk_refusing_a_command_says_what_to_check(tmp_path: Path) -> None:
    """Review finding: a wrong key or a user deleted in Clerk printed Clerk's message alone (``Unable to
    authenticate the request``, ``Resource not found``), never naming CLERK_SECRET_KEY or reconcile."""
    with EmulatorServer() as clerk:
        gone, env = _synced_user(f"sqlite:///{tmp_path / 'hints.db'}", clerk, "gone@example.com")
        clerk.request("DELETE", f"/v1/users/{gone['id']}")  # deleted in Clerk, the webhook never came
        wrong = run("reconcile", "--dry-run", env={**env, "CLERK_SECRET_KEY": "sk_test_wrong"})
        said = " ".join(wrong.stdout.split() + wrong.stderr.split())
        assert wrong.returncode == 2 and "Check CLERK_SECRET_KEY" in said and "clerk-sync doctor" in said, said
        missing = run("users", "promote", "gone@example.com", env=env)
        said = " ".join(missing.stdout.split() + missing.stderr.split())
        assert missing.returncode == 2 and "Clerk has no such resource" in said, said
        assert "`clerk-sync reconcile`" in said


def test_serve_with_workers_refuses_a_console_it_could_not_build_once(tmp_path: Path) -> None:
    """Review finding: with --workers 2, an error only building the app finds (the console with no way to
    sign in) was raised in each worker, and uvicorn's supervisor restarted them for ever (26 spawns in a
    minute, never exiting). It is found once, before any worker starts: one line, exit 2."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
           "CLERK_SYNC_CONSOLE": "1"}
    result = run("serve", "--workers", "2", "--port", str(free_port()), env=env)
    said = " ".join(result.stdout.split() + result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in said, said
    assert "the console has no way to sign in" in said
