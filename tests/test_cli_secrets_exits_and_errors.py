"""The command line as a user meets it, each once broken: secrets printed, files deleted, failures that exited 0,
errors without their cause. Each test runs the CLI as a user does (a process, its exit code and output)."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from rich.console import Console

from clerk_sync.cli.dev import run_dev
from clerk_sync.cli.hooks import load_hooks, load_mapping
from clerk_sync.config import Settings
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import ConfigError
from clerk_sync.events import user_record
from clerk_sync.store import Store
from clerk_sync.tables import users
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._server import free_port, wait_for_http
from tests.conftest import _PG_PROBLEM, PG_URL, SECRET, require_server
from tests.test_cli import CLI, run

ROOT = Path(__file__).resolve().parent.parent


def said(result: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr as one line (Rich wraps at 80 columns, and boxes a usage error)."""
    return " ".join((result.stdout + result.stderr).replace("│", " ").split())


# -- 1. emulate ---------------------------------------------------------------------------------------


def _emulate_output(env: dict[str, str]) -> str:
    port = free_port()
    proc = subprocess.Popen([*CLI, "emulate", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_clean_env(env))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=20, proc=proc)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    return out


def _clean_env(env: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}, **env}


def test_emulate_masks_a_secret_key_from_the_environment_and_refuses_a_live_one() -> None:
    """Fixed: `emulate` adopted CLERK_SECRET_KEY and printed it in full (a real key, in a terminal's
    scrollback or a CI log); a live key was served as if the emulator were Clerk."""
    adopted = _emulate_output({"CLERK_SECRET_KEY": "sk_test_REALSECRET123"})
    assert "REALSECRET123" not in adopted and "secret key sk_test_…" in adopted, adopted
    default = _emulate_output({})
    assert "(secret key sk_test_emulator)" in default  # the well-known key: shown, to be copied
    live = subprocess.run([*CLI, "emulate", "--port", str(free_port())], capture_output=True, text=True,
                          env=_clean_env({"CLERK_SECRET_KEY": "sk_live_REALSECRET123"}), timeout=20, check=False)
    assert live.returncode == 2 and "live (production) key" in said(live), said(live)
    assert "REALSECRET123" not in live.stdout + live.stderr


# -- 2. dev --db --------------------------------------------------------------------------------------


def test_dev_deletes_only_an_earlier_demo_database_unless_forced(tmp_path: Path) -> None:
    """Fixed: `dev --db FILE` deleted whatever it was given (`--db clerk_sync.db`: the service's data)."""
    precious = tmp_path / "precious.db"
    precious.write_text("precious\n")
    refused = run("dev", "--once", "--db", str(precious), "--users", "2", "--orgs", "0")
    assert refused.returncode == 2 and "not a database `clerk-sync dev` created" in said(refused), said(refused)
    assert "--force" in said(refused) and precious.read_text() == "precious\n"

    demo = tmp_path / "demo.db"
    quiet = Console(file=io.StringIO())
    assert run_dev(demo, users_n=2, orgs_n=0, console=quiet, keep_running=False).converged
    again = run_dev(demo, users_n=2, orgs_n=0, console=quiet, keep_running=False)  # its own: recreated
    assert again.converged and again.db_rows["users"] == 1  # (two created, one deleted: not four)

    forced = run("dev", "--once", "--force", "--db", str(precious), "--users", "2", "--orgs", "0")
    assert forced.returncode == 0, said(forced)
    assert precious.read_bytes().startswith(b"SQLite format 3\x00")


# -- 3. DATABASE_URL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://app:s3cretpw@db:54x2/test", "DATABASE_URL's port '54x2' is not a number"),
    ("postgresql://app:pa@s3cretpw@127.0.0.1:5432/test", "must be URL-encoded, '@' as %40"),
], ids=["non-numeric-port", "unescaped-at"])
def test_a_malformed_database_url_is_one_line_without_the_password(url: str, expected: str) -> None:
    """Fixed: a port like 54x2 raised a traceback (make_url's ValueError); a password with an '@' made the
    rest of it the host, which the driver's error then quoted (part of the password, in the log)."""
    for command in ("migrate", "doctor"):
        result = run(command, env={"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
        assert result.returncode in (1, 2) and expected in said(result), said(result)
        assert "Traceback" not in said(result) and "s3cretpw" not in said(result)


# -- 4. doctor --------------------------------------------------------------------------------------


def test_doctor_says_why_the_database_failed_and_asks_for_no_migration(tmp_path: Path) -> None:
    """Fixed: "cannot reach the database (StoreError)" whatever the cause, then `migrate` advised for
    the hook jobs of a database it could not reach."""
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}"
    result = run("doctor", env={"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    lines = {line.split(":", 1)[0].split(None, 1)[1]: line for line in result.stdout.splitlines()}
    assert result.returncode == 1
    # (create_engine names the missing directory itself since 2026-12-05, before sqlite3's "unable to open")
    assert "no-such-dir does not exist" in lines["database"] and "mkdir -p" in lines["database"], lines["database"]
    assert "migrate" not in lines["hook jobs"] and "cannot be reached" in lines["hook jobs"]


@pytest.mark.postgres
def test_doctor_names_a_wrong_postgres_role_without_its_password() -> None:
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    server = sa.engine.make_url(PG_URL)
    url = server.set(username="no_such_role_x", password="Pw-s3cret-9").render_as_string(hide_password=False)
    result = run("doctor", env={"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    assert result.returncode == 1 and 'role "no_such_role_x" does not exist' in said(result), said(result)
    assert "Pw-s3cret-9" not in said(result)


# -- 5. failures that exited 0 --------------------------------------------------------------------------


def test_reconcile_exits_1_when_clerk_objects_could_not_be_read(tmp_path: Path) -> None:
    """Fixed: objects reconcile could not parse were counted in the summary's failed column, exit 0."""
    url = f"sqlite:///{tmp_path / 'rec.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    with EmulatorServer() as clerk:
        clerk.create_user("fine@example.com")
        broken = clerk.create_user("broken@example.com")
        clerk.emulator.store.users[broken["id"]].updated_at = None  # type: ignore[assignment]
        env = {"DATABASE_URL": url, "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url}
        result = run("reconcile", env=env)
    assert result.returncode == 1, said(result)
    assert "1 Clerk object(s) could not be read" in said(result)


def _hooked_project(tmp_path: Path, module: str) -> tuple[str, dict[str, str], Store]:
    """A migrated SQLite database beside ``module``.py (its ``HOOKS``): its URL, the CLI's environment (the
    module importable), and a store queueing jobs for those hooks."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"DATABASE_URL": url, "PYTHONPATH": path, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    assert run("migrate", env=env).returncode == 0
    sys.path.insert(0, str(tmp_path))
    try:
        return url, env, Store.from_url(url, hooks=load_hooks(f"{module}:HOOKS"))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)


@pytest.fixture
def dead_jobs(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A migrated database whose three jobs' hook gives up with an error holding a newline and a tab."""
    (tmp_path / "gone_hooks.py").write_text(textwrap.dedent('''
        from clerk_sync.changes import Hook
        from clerk_sync.errors import HookGaveUp

        def _gone(change):
            raise HookGaveUp("endpoint gone\\nsecond line\\twith tab")

        HOOKS = [Hook("gone", _gone, on=["user.created"])]
    '''))
    url, env, store = _hooked_project(tmp_path, "gone_hooks")
    for i in range(3):
        with store.transaction() as writer:
            writer.apply(Upsert(Entity.USER, user_record(f.user(f"user_{i}", 5))))
    store.dispose()
    return url, env


def test_worker_once_says_how_many_jobs_died_and_exits_1(dead_jobs: tuple[str, dict[str, str]]) -> None:
    """Fixed: `worker --once` said "ran 3 hook jobs", exit 0, when all three died."""
    _, env = dead_jobs
    result = run("worker", "--once", "--hooks", "gone_hooks:HOOKS", env=env)
    assert result.returncode == 1, said(result)
    assert "ran 3 hook jobs: 0 ok, 0 failed (queued again after a backoff), 3 dead" in said(result)
    doctor = run("doctor", env=env)  # (the real commands, with ids or --all)
    assert "`clerk-sync hooks retry ID...` (or `--all`)" in said(doctor), said(doctor)


def test_hooks_list_keeps_one_line_per_job(dead_jobs: tuple[str, dict[str, str]]) -> None:
    """Fixed: a newline or tab in last_error split a job over lines and fields (`cut -f1` gave
    fragments of the error as job ids)."""
    _, env = dead_jobs
    assert run("worker", "--once", "--hooks", "gone_hooks:HOOKS", env=env).returncode == 1
    listed = run("hooks", "list", env=env)
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [row[0] for row in rows] == ["1", "2", "3"], listed.stdout
    assert all(len(row) == 8 for row in rows)  # (the idempotency key and a pending job's next attempt after the error)
    assert rows[0][5] == "HookGaveUp: endpoint gone\\nsecond line\\twith tab"


# -- 7. the minor ones ----------------------------------------------------------------------------------


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("rv_env", "rv_syntax", "rv_dep", "rv_call"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "rv_env.py").write_text("import os\nMAILER = os.environ['RV_SMTP_URL_UNSET']\nHOOKS = []\n")
    (tmp_path / "rv_syntax.py").write_text("HOOKS = [\n")
    (tmp_path / "rv_dep.py").write_text("import rv_dependency_not_installed\nHOOKS = []\n")
    (tmp_path / "rv_call.py").write_text("def MAPPING():\n    raise RuntimeError('db not configured\\nmore')\n")
    return tmp_path


@pytest.mark.parametrize(("spec", "expected"), [
    ("rv_env:HOOKS", "'rv_env:HOOKS': importing it raised KeyError: 'RV_SMTP_URL_UNSET'"),
    ("rv_syntax:HOOKS", "'rv_syntax:HOOKS': importing it raised SyntaxError:"),
    ("rv_dep:HOOKS", "raised ModuleNotFoundError: No module named 'rv_dependency_not_installed' (fix the module"),
    ("rv_missing.sub:HOOKS", "no module named 'rv_missing' in the current directory ("),
    ("rv_call:MAPPING", "'rv_call:MAPPING': calling MAPPING() raised RuntimeError: db not configured ("),
], ids=["key-error", "syntax-error", "missing-dependency", "missing-module", "raising-function"])
def test_a_hooks_or_mapping_module_that_fails_is_named_with_its_error(modules: Path, spec: str,
                                                                     expected: str) -> None:
    """Fixed: any error but ImportError was a traceback; a dependency's ImportError was reported as the
    module itself missing from PYTHONPATH."""
    with pytest.raises(ConfigError) as raised:
        load_mapping(spec) if spec.endswith("MAPPING") else load_hooks(spec)
    assert expected in str(raised.value)
    assert ("PYTHONPATH" in str(raised.value)) == spec.startswith("rv_missing")


def test_users_promote_refuses_a_blank_role(tmp_path: Path) -> None:
    """Fixed: `--role ''` was written to Clerk and the database, taking the user's role away."""
    result = run("users", "promote", "ann@example.com", "--role", " ",
                 env={"DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"})
    assert result.returncode == 2 and "'--role'" in said(result) and "is blank" in said(result), said(result)


def test_users_erase_refuses_an_id_that_is_not_a_users(tmp_path: Path) -> None:
    """Fixed: `users erase org_abc --force` wrote a user tombstone for an organization's id."""
    url = f"sqlite:///{tmp_path / 'e.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    result = run("users", "erase", "org_abc", "--force", env={"DATABASE_URL": url})
    assert result.returncode == 2 and "they start with user_" in said(result) and "--any-id" in said(result)
    store = Store.from_url(url)
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one() == 0
    store.dispose()
    chosen = run("users", "erase", "legacy_42", "--force", "--any-id", env={"DATABASE_URL": url})
    assert chosen.returncode == 0, said(chosen)


def test_serve_announces_only_what_it_bound(tmp_path: Path) -> None:
    """Fixed: "serving on …" was printed before binding (a busy port still announced it) and before the
    console's settings were checked; the port printed for --port 0 was 0."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run("serve", "--port", str(taken.getsockname()[1]), env=env)
    assert busy.returncode == 3 and "cannot listen on 127.0.0.1" in said(busy), said(busy)  # in use: retry later
    assert "serving on" not in said(busy)
    no_sign_in = run("serve", "--port", "0", env={**env, "CLERK_SYNC_CONSOLE": "1"})
    assert no_sign_in.returncode == 2 and "the console has no way to sign in" in said(no_sign_in)
    assert "serving on" not in said(no_sign_in) and "operator console on" not in said(no_sign_in)
    assert run("migrate", env=env).returncode == 0  # (--no-migrate serves an existing database only)
    proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--no-migrate"], stderr=subprocess.PIPE, text=True,
                            env=_clean_env(env))
    try:
        assert proc.stderr is not None
        found = re.search(r"serving on (http://127\.0\.0\.1:\d+)/webhooks/clerk", proc.stderr.readline())
        assert found and not found.group(1).endswith(":0"), found
        assert wait_for_http(f"{found.group(1)}/healthz", timeout=20, proc=proc).status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_a_short_console_token_is_refused_with_how_to_make_one() -> None:
    """Fixed: CLERK_SYNC_CONSOLE_TOKEN=abc opened the console to whoever guessed three characters."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"CLERK_SYNC_CONSOLE_TOKEN": "abc-short"})
    assert "CLERK_SYNC_CONSOLE_TOKEN" in str(raised.value) and "openssl rand -base64 24" in str(raised.value)
    assert "abc-short" not in str(raised.value)
    assert Settings.from_env({"CLERK_SYNC_CONSOLE_TOKEN": "x" * 16}).console_operator_token is not None


def test_a_console_token_read_with_a_trailing_newline_is_the_token_an_operator_types() -> None:
    """Fixed: a token from a file (`kubectl create secret --from-file`, `echo`) kept its newline, and the
    operator typing the token was refused as if it were wrong."""
    token = Settings.from_env({"CLERK_SYNC_CONSOLE_TOKEN": " s3cret-operator-token-0123\n"}).console_operator_token
    assert token is not None and token.get_secret_value() == "s3cret-operator-token-0123"


def test_the_runbooks_hook_commands_name_ids_or_all() -> None:
    """Fixed: the runbook said `clerk-sync hooks retry` / `purge` bare; both refuse to run without ids
    or --all (or, for purge, --hook NAME)."""
    text = " ".join((ROOT / "docs" / "RUNBOOK.md").read_text().split())
    commands = re.findall(r"`(clerk-sync hooks (?:retry|purge)[^`]*)`", text)
    assert commands and all("ID" in c or "--all" in c or "--hook NAME" in c for c in commands), commands
    assert not re.search(r"`clerk-sync hooks (?:retry|purge)`|or `purge`", text)


def test_the_emulators_serve_refuses_a_live_key_before_printing_anything() -> None:
    """A live key refused, as by ``emulate``, for ``clerk_sync.emulator.serve`` itself (a library caller's path)."""
    from clerk_sync.emulator import EmulatorConfig, serve

    out = io.StringIO()
    with socket.socket() as taken:  # a busy port: without the check, an OSError (and never a server)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ValueError, match="live"):
            serve(EmulatorConfig(secret_key="sk_live_x"), "127.0.0.1", taken.getsockname()[1], out=out)
    assert out.getvalue() == ""


def test_worker_once_records_a_run_past_its_timeout_before_it_exits(tmp_path: Path) -> None:
    """Fixed: with ``Hook(timeout_s=)`` a run past it is overdue, and ``worker --once`` exited
    without waiting: the run's outcome was never recorded, its job stayed claimed until the lease and then ran
    again; and the later job of its entity it held back was left queued. Now the run is waited for (up to a
    lease) and counted, and what it held back runs."""
    (tmp_path / "slow_hooks.py").write_text(textwrap.dedent('''
        import time
        from clerk_sync.changes import Hook

        def _slow(change):
            time.sleep(0.3)  # always past the hook's timeout_s

        HOOKS = [Hook("slow", _slow, on=["user.created", "user.updated"], timeout_s=0.01)]
    '''))
    _, env, store = _hooked_project(tmp_path, "slow_hooks")
    with store.transaction() as writer:
        writer.apply(Upsert(Entity.USER, user_record(f.user("user_slow", 5))))
    with store.transaction() as writer:  # a later job of the same user: it waits for the first one's outcome
        writer.apply(Upsert(Entity.USER, user_record(f.user("user_slow", 6, first_name="Later"))))
    result = run("worker", "--once", "--hooks", "slow_hooks:HOOKS", env=env)
    assert result.returncode == 0, said(result)
    assert "ran 2 hook jobs: 2 ok" in said(result)
    with store.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM hook_jobs")).scalar_one() == 0  # finished, not claimed
    store.dispose()


def test_a_console_token_shaped_like_a_session_token_is_refused() -> None:
    """Review: the console verifies a Bearer shaped like a JWT (``a.b.c``) as a Clerk session token in a thread
    and counts it as a failed sign-in only afterwards, so with an operator token of that shape a burst of such
    guesses was compared in full (299 wrong and the right one at once: all compared, the right one let in)."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"CLERK_SYNC_CONSOLE_TOKEN": "correct.horse.battery-staple"})
    said = str(raised.value)
    assert "CLERK_SYNC_CONSOLE_TOKEN" in said and "session token" in said and "battery" not in said
    for fine in ("correct.horse-battery.staple!", "one.dotted-passphrase-token", "x" * 24):
        assert Settings.from_env({"CLERK_SYNC_CONSOLE_TOKEN": fine}).console_operator_token is not None
