"""`clerk-sync dev` end to end: emulator + service on SQLite converge to the same rows."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from rich.console import Console

from clerk_sync.cli.dev import DevStack, run_dev, seed_demo
from clerk_sync.tables import organization_memberships, organizations, users


def _live(stack: DevStack, table: sa.Table) -> set[str]:
    with stack.store.connect() as conn:
        return set(conn.execute(sa.select(table.c.clerk_id).where(table.c.deleted_at.is_(None))).scalars())


def test_demo_converges_to_the_emulators_state(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "dev.db")
    with stack.running(), stack.clerk() as clerk:
        seed_demo(clerk, 10, 3)
        assert stack.wait_converged(timeout_s=30)
        clerk_users = {u["id"] for u in clerk.get("/users", params={"limit": 100}).json()}
        orgs = clerk.get("/organizations", params={"limit": 100}).json()["data"]
        members = {m["id"] for o in orgs for m in clerk.get(f"/organizations/{o['id']}/memberships").json()["data"]}
        assert _live(stack, users) == clerk_users
        assert _live(stack, organizations) == {o["id"] for o in orgs}
        assert _live(stack, organization_memberships) == members
        with stack.store.connect() as conn:
            renamed = conn.execute(sa.select(users.c.first_name).where(users.c.first_name == "Renamed")).all()
            deleted = conn.execute(sa.select(sa.func.count()).select_from(users).where(users.c.deleted_at.is_not(None))).scalar_one()
        assert len(renamed) == 1 and deleted == 1
        statuses = stack.events_by_status()
        assert statuses.get("duplicate", 0) == 0  # duplicates are acknowledged, not stored twice
        assert sum(statuses.values()) == len(stack.emulator.deliveries())


def test_dev_command_reports_convergence(tmp_path: Path) -> None:
    """Its "Try:" commands are one line each whatever the terminal's width, their URLs quoted (review: at
    80 columns the curl's URL landed on the next line, and zsh refused the unquoted ``?``). With ``--once``
    (the services stopped right after) only the database's command is offered, and no console link
    (walkthrough review: it printed both for services it had just shut down)."""
    from clerk_sync.cli.dev import _print_report

    console = Console(record=True, width=60)
    report = run_dev(tmp_path / "demo.db", users_n=5, orgs_n=2, console=console, keep_running=False)
    assert report.converged
    assert report.db_rows == report.clerk_counts
    text = console.export_text()
    assert "converged" in text and "/console/login" not in text and "curl" not in text
    assert "run without --once" in text and "sqlite3 " in text
    running = Console(record=True, width=60)
    with DevStack(tmp_path / "other.db").running() as stack:  # the report as a running `dev` prints it
        _print_report(running, report, stack, running=True)
    text = running.export_text()
    tries = [line.strip() for line in text.split("Try:")[1].splitlines() if line.strip()]
    assert tries[0] == f"curl -s '{report.service_url}/metrics' | grep clerk_sync_webhook_events"
    assert tries[1].startswith("curl -s -H 'Authorization: Bearer ") and tries[1].endswith(
        f" '{report.emulator_url}/v1/users?limit=3'")
    assert tries[2].startswith("sqlite3 ") and tries[2].endswith("'select clerk_id, email, role from users'")
    assert "/console/login" in text


def test_a_port_in_use_is_named_and_the_last_demo_is_kept(tmp_path: Path) -> None:
    import socket

    import pytest

    from clerk_sync.cli._args import PortInUse

    db = tmp_path / "dev.db"
    db.write_bytes(b"the last demo")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port}.*--port"):  # (exit 3: retry later)
            DevStack(db, port=port)
    assert db.read_bytes() == b"the last demo"  # fresh=True, but nothing was started: nothing removed


def test_the_demo_seeding_waits_out_the_emulators_rate_limit() -> None:
    """Review: ``clerk-sync dev --users 95`` crashed with "emulator answered 429" (the emulator allows 100
    requests per 10 s, as Clerk). The demo's client resends after ``Retry-After`` instead."""
    from clerk_sync.cli.dev import demo_client
    from clerk_sync.testing import EmulatorServer

    with EmulatorServer(rate_limit_requests=5, rate_limit_window_s=0.5) as emulator, demo_client(emulator) as clerk:
        seed_demo(clerk, 12, 2)  # 12 users, 2 orgs, their memberships, a rename and a deletion: ~20 requests
        assert clerk.get("/users/count").json()["total_count"] == 11
        assert sum(1 for _ in range(8) if clerk.get("/users/count").status_code == 200) == 8


def test_a_second_demo_on_the_same_database_is_refused_and_the_running_one_keeps_its_rows(tmp_path: Path) -> None:
    """Review finding: a second ``clerk-sync dev`` (another port) deleted the running demo's database."""
    import pytest

    from clerk_sync.errors import ConfigError

    db = tmp_path / "dev.db"
    first = DevStack(db)
    with first.running(), first.clerk() as clerk:
        seed_demo(clerk, 3, 1)
        assert first.wait_converged(timeout_s=30)
        rows = first.db_rows()
        with pytest.raises(ConfigError, match=r"another `clerk-sync dev` is running on .*dev\.db: stop it"):
            DevStack(db)
        assert first.db_rows() == rows and rows["users"] > 0  # still the running demo's database
    second = DevStack(db)  # the first one ended: its lock with it
    with second.running():
        assert second.db_rows()["users"] == 0  # fresh


def test_the_demo_lock_dies_with_a_killed_demo(tmp_path: Path) -> None:
    """The lock is the OS's (flock): a demo killed with -9 leaves no stale lock behind."""
    import os
    import signal
    import subprocess
    import sys

    db = tmp_path / "dev.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from clerk_sync.cli.dev import "
         "_only_demo_on; lock = _only_demo_on(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)", str(db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        import pytest

        from clerk_sync.errors import ConfigError

        with pytest.raises(ConfigError, match="another `clerk-sync dev`"):
            DevStack(db)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    with DevStack(db).running() as stack:
        assert stack.db_rows()["users"] == 0
