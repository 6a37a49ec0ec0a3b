"""``flask clerk-sync migrate|replay|reconcile|promote``: the commands, configured from the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from flask import Flask

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.integrations.flask import ClerkSync, clerk_state
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, organizations, users, webhook_events
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parents[1]


def flask_app(**env: str) -> Flask:
    app = Flask(__name__)
    ClerkSync(app, settings=Settings.from_env({"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **env}))
    return app


def test_the_flask_command_migrates_the_database_the_app_is_configured_with(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flask.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    command = [sys.executable, "-m", "flask", "--app", "examples.flask_saas.app:create_app", "clerk-sync"]
    listing = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert listing.returncode == 0, listing.stderr
    assert {"migrate", "reconcile", "replay", "promote"} <= set(listing.stdout.split())
    result = subprocess.run([*command, "migrate"], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert "migrated a new database to" in result.stdout or "already current" in result.stdout, result.stdout
    store = Store.from_url(url)
    assert migrations.is_current(store.engine)
    store.dispose()


def test_replay_failed_deliveries(db_url: str) -> None:
    app = flask_app(DATABASE_URL=db_url)
    store = clerk_state(app).store
    broken = f.envelope("user.created", {**f.user("user_fl", 5), "id": "user_" + "x" * 80})
    with store.transaction() as w:
        w.record_delivery("msg_fl", broken, event_type="user.created", instance_id=None, event_timestamp=1)
        w.finish_delivery("msg_fl", "failed", "id too long")
    cli = app.test_cli_runner()
    result = cli.invoke(args=["clerk-sync", "replay"])
    assert result.exit_code == 1, result.output  # still failed: a scheduled replay must not look fine
    assert "replayed 1 deliveries: 1 failed" in result.output
    with store.transaction() as w:
        w.conn.execute(webhook_events.update().values(payload=f.envelope("user.created", f.user("user_fl", 5))))
    result = cli.invoke(args=["clerk-sync", "replay", "--status", "failed", "--since", "2000-01-01"])
    assert "replayed 1 deliveries: 1 applied" in result.output
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.clerk_id)).scalar_one() == "user_fl"
    again = cli.invoke(args=["clerk-sync", "replay", "--status", "applied"])  # stale now: kept, and said so
    assert "1 already applied: left as they were" in again.output, again.output
    bad = cli.invoke(args=["clerk-sync", "replay", "--since", "last tuesday"])
    assert bad.exit_code == 2 and "Error: --since 'last tuesday' is not an ISO 8601" in bad.output
    clerk_state(app).close()


def test_reconcile_then_promote_against_the_emulator(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    with EmulatorServer(rate_limit_requests=1000) as clerk:
        ada = clerk.create_user("ada@example.com")
        clerk.create_organization("Acme", created_by=ada["id"])
        app = flask_app(DATABASE_URL=url, CLERK_SECRET_KEY=clerk.secret_key, CLERK_API_URL=clerk.url)
        cli = app.test_cli_runner()
        assert cli.invoke(args=["clerk-sync", "migrate"]).exit_code == 0
        dry = cli.invoke(args=["clerk-sync", "reconcile", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert f"+ users {ada['id']}" in dry.output
        done = cli.invoke(args=["clerk-sync", "reconcile"])
        assert done.exit_code == 0, done.output
        promoted = cli.invoke(args=["clerk-sync", "promote", "ada@example.com", "--role", "admin"])
        assert promoted.exit_code == 0, promoted.output
        assert f"applied: ada@example.com ({ada['id']}) user -> admin" in promoted.output
        assert clerk.request("GET", f"/v1/users/{ada['id']}")["public_metadata"]["role"] == "admin"
        missing = cli.invoke(args=["clerk-sync", "promote", "nobody@example.com"])
        assert missing.exit_code == 1 and "no live synced user with the primary e-mail 'nobody@example.com'" in missing.output
    store = clerk_state(app).store
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.role)).scalar_one() == "admin"
        assert conn.execute(sa.select(organizations.c.name)).scalar_one() == "Acme"
        assert conn.execute(sa.select(audit_log.c.action)).scalar_one() == "role.changed"
    clerk_state(app).close()


def test_promote_during_an_outage_exits_3_and_retry_pending_pushes_it(tmp_path: Path) -> None:
    """Review finding: a promote Clerk never received exited 0 without saying why, and a Flask app had no
    command to push it later (only the environment-configured `clerk-sync users retry-pending`)."""
    url = f"sqlite:///{tmp_path / 'pending.db'}"
    with EmulatorServer(rate_limit_requests=1000) as clerk:
        ada = clerk.create_user("ada@example.com")
        app = flask_app(DATABASE_URL=url, CLERK_SECRET_KEY=clerk.secret_key, CLERK_API_URL=clerk.url)
        cli = app.test_cli_runner()
        assert cli.invoke(args=["clerk-sync", "migrate"]).exit_code == 0
        assert cli.invoke(args=["clerk-sync", "reconcile"]).exit_code == 0
        clerk.set_faults(outage=True)
        promoted = cli.invoke(args=["clerk-sync", "promote", "ada@example.com", "--role", "admin"])
        assert promoted.exit_code == 3, promoted.output
        assert "Clerk was not reached (" in promoted.output
        assert "run `flask clerk-sync retry-pending`" in promoted.output
        assert cli.invoke(args=["clerk-sync", "retry-pending"]).exit_code == 3  # Clerk still away
        clerk.set_faults(outage=False)
        clerk_state(app).close()
        # cron's next run: a new process (this one's circuit breaker is open after the outage)
        app = flask_app(DATABASE_URL=url, CLERK_SECRET_KEY=clerk.secret_key, CLERK_API_URL=clerk.url)
        done = app.test_cli_runner().invoke(args=["clerk-sync", "retry-pending"])
        assert done.exit_code == 0 and "'applied': 1" in done.output, done.output
        assert clerk.request("GET", f"/v1/users/{ada['id']}")["public_metadata"]["role"] == "admin"
    with clerk_state(app).store.connect() as conn:
        assert conn.execute(sa.select(users.c.role)).scalar_one() == "admin"
    clerk_state(app).close()

def test_promote_without_a_secret_key_says_what_to_set(tmp_path: Path) -> None:
    app = flask_app(DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    result = app.test_cli_runner().invoke(args=["clerk-sync", "promote", "ada@example.com"])
    assert result.exit_code == 2  # a setting to fix, as `clerk-sync` exits
    assert "Error: promote needs CLERK_SECRET_KEY" in result.output
    clerk_state(app).close()


def test_reconcile_stops_before_a_mass_delete_unless_allowed(tmp_path: Path) -> None:
    """Review: the runbook's way past the mass-delete stop (`--allow-mass-delete`) existed only in
    `clerk-sync reconcile`; `flask clerk-sync reconcile` could not pass it."""
    from clerk_sync.engine import Entity, Upsert
    from clerk_sync.events import user_record
    from clerk_sync.reconcile import MASS_DELETE_FLOOR

    url = f"sqlite:///{tmp_path / 'mass.db'}"
    with EmulatorServer(rate_limit_requests=1000) as clerk:  # lists none of the rows below
        app = flask_app(DATABASE_URL=url, CLERK_SECRET_KEY=clerk.secret_key, CLERK_API_URL=clerk.url)
        cli = app.test_cli_runner()
        assert cli.invoke(args=["clerk-sync", "migrate"]).exit_code == 0
        store = clerk_state(app).store
        with store.transaction() as w:
            for i in range(MASS_DELETE_FLOOR + 1):
                w.apply(Upsert(Entity.USER, user_record(f.user(f"user_gone_{i:03d}", 1))))
        stopped = cli.invoke(args=["clerk-sync", "reconcile"])
        assert stopped.exit_code != 0 and "--allow-mass-delete" in stopped.output, stopped.output
        with store.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).where(users.c.deleted_at.is_(None))).scalar() == 101
        allowed = cli.invoke(args=["clerk-sync", "reconcile", "--allow-mass-delete"])
        assert allowed.exit_code == 0, allowed.output
        with store.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).where(users.c.deleted_at.is_(None))).scalar() == 0
    clerk_state(app).close()


def test_prune_applies_retention_to_the_apps_store(db_url: str) -> None:
    """Review: nothing pruned in a Flask app (only `serve` runs retention), and `clerk-sync prune` reads
    no Flask config: `flask clerk-sync prune` runs it on the extension's store, from cron."""
    from datetime import UTC, datetime, timedelta

    app = flask_app(DATABASE_URL=db_url)
    store = clerk_state(app).store
    with store.transaction() as w:
        for n in (1, 2):
            w.record_delivery(f"msg_old{n}", f.envelope("user.created", f.user(f"user_old{n}", 5)),
                              event_type="user.created", instance_id=None, event_timestamp=1, status="applied")
        w.conn.execute(webhook_events.update().values(received_at=datetime.now(UTC) - timedelta(days=400)))
    cli = app.test_cli_runner()
    dry = cli.invoke(args=["clerk-sync", "prune", "--dry-run"])
    assert dry.exit_code == 0 and "would delete 2 delivery row(s)" in dry.output, dry.output
    done = cli.invoke(args=["clerk-sync", "prune"])
    assert done.exit_code == 0 and "deleted 2 delivery row(s)" in done.output, done.output
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(webhook_events)).scalar() == 0
    clerk_state(app).close()


def test_an_argument_that_is_not_utf8_is_one_line_and_exit_2(db_url: str) -> None:
    """Review: only ``clerk-sync``'s own entry point checked it; ``flask clerk-sync promote $'j\\xfcrgen@...'``
    was a driver's UnicodeEncodeError traceback (exit 1)."""
    app = flask_app(DATABASE_URL=db_url)
    result = app.test_cli_runner().invoke(args=["clerk-sync", "promote", "j\udcfcrgen@example.com"])
    assert result.exit_code == 2 and "is not valid UTF-8" in result.output, result.output
    assert "j\\xfcrgen" in result.output
