"""What a reconcile run tells its operator (day-one walkthrough): the rows a real run changed (printed as a dry
run prints them, and logged without personal values), a progress total that grows with the listing, and a
resumed run's figures said to include its interrupted process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa
import structlog

from clerk_sync.engine import Entity
from clerk_sync.reconcile import Change, Reconciler
from clerk_sync.store import Store
from clerk_sync.tables import reconcile_runs
from clerk_sync.testing import EmulatorServer
from tests.conftest import clerk_client

CLI = [sys.executable, "-c", "from clerk_sync.cli import main; main()"]


def run_cli(*args: str, emu: EmulatorServer, db_url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=db_url, CLERK_SECRET_KEY=emu.secret_key, CLERK_API_URL=emu.url, REDIS_URL="", **extra)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def flat(text: str) -> str:
    """Rich wraps a caption at the terminal's width: one line, one space between words."""
    return " ".join(text.split())


class _CtrlC:
    """A progress that presses Ctrl-C once a page of users is written (the run is left ``interrupted``)."""

    def start(self, phase: str, total: int | None, completed: int) -> None:
        pass

    def advance(self, phase: str, n: int) -> None:
        raise KeyboardInterrupt


def test_a_resumed_run_says_its_figures_include_the_interrupted_process(db_url: str, store: Store,
                                                                        emu: EmulatorServer) -> None:
    emu.emulator.bulk_create_users(120)
    emu.set_faults(rate_limit_requests=2, rate_limit_window_s=0.5)  # the first process meets Clerk's 429s
    with clerk_client(emu) as clerk, pytest.raises(KeyboardInterrupt):
        Reconciler(store, clerk, page_size=50, progress=_CtrlC()).run()
    emu.set_faults(rate_limit_requests=1000, rate_limit_window_s=1.0)  # the resumed one does not
    with store.connect() as conn:
        before = conn.execute(sa.select(reconcile_runs)).mappings().one()
    limited = before["details"]["rate_limited"]
    assert before["status"] == "interrupted" and before["requests"] >= 2 and limited >= 1

    result = run_cli("reconcile", emu=emu, db_url=db_url)
    assert result.returncode == 0, result.stderr
    said = flat(result.stdout)
    with store.connect() as conn:
        after = conn.execute(sa.select(reconcile_runs)).mappings().one()
    assert after["status"] == "completed" and after["requests"] > before["requests"]
    assert after["details"]["rate_limited"] == limited  # the run's, as its requests are (not this process's 0)
    found = re.search(rf"(\d+) Clerk requests \({limited} answered 429\), ([\d.]+)s in all, counting the interrupted "
                      r"run's (\d+) requests and ([\d.]+)s; this process: (\d+) requests, ([\d.]+)s", said)
    assert found, said
    total, before_n, this_n = int(found[1]), int(found[3]), int(found[5])
    assert (total, before_n) == (after["requests"], before["requests"]) and this_n == total - before_n
    assert float(found[4]) == pytest.approx(before["duration_s"], abs=0.06)
    assert float(found[2]) == pytest.approx(float(found[4]) + float(found[6]), abs=0.16)  # (three roundings)


def test_a_run_that_was_not_resumed_says_its_figures_as_before(db_url: str, emu: EmulatorServer) -> None:
    emu.create_user(email="ada@example.com")
    result = run_cli("reconcile", emu=emu, db_url=db_url)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\d+ Clerk requests \(0 answered 429\), [\d.]+s$", flat(result.stdout)), result.stdout
    assert "interrupted" not in result.stdout


class _Bars:
    """A progress that keeps each phase's bar as a terminal would (``start`` again: the same bar) and checks no
    bar ever shows more done than its total; on the first users page it creates users in Clerk (sign-ups
    during the run, after the total was counted)."""

    def __init__(self, emu: EmulatorServer, signups: int) -> None:
        self.emu, self.signups = emu, signups
        self.bars: dict[str, list[int | None]] = {}

    def start(self, phase: str, total: int | None, completed: int) -> None:
        self.bars[phase] = [total, completed]
        self._check(phase)

    def advance(self, phase: str, n: int) -> None:
        bar = self.bars[phase]
        bar[1] = (bar[1] or 0) + n
        self._check(phase)
        if phase == "users" and self.signups:
            for i in range(self.signups):
                self.emu.create_user(email=f"late{i}@example.com")
            self.signups = 0

    def _check(self, phase: str) -> None:
        total, done = self.bars[phase]
        assert total is None or (done or 0) <= total, f"{phase}: {done}/{total}"


def test_users_created_during_a_run_grow_the_bar_s_total(store: Store, emu: EmulatorServer) -> None:
    emu.emulator.bulk_create_users(120)
    bars = _Bars(emu, signups=5)
    with clerk_client(emu) as clerk:
        report = Reconciler(store, clerk, page_size=50, prefetch=1, progress=bars).run()
    assert report.counts["users"].created == 125
    assert bars.bars["users"] == [125, 125]


def test_the_terminal_bar_takes_the_grown_total() -> None:
    from io import StringIO

    from rich.console import Console
    from rich.progress import MofNCompleteColumn
    from rich.progress import Progress as RichProgress

    from clerk_sync.cli.reconcile import _RichProgress

    out = StringIO()
    with RichProgress(MofNCompleteColumn(), console=Console(file=out, width=80)) as bar:
        progress = _RichProgress(bar)
        progress.start("users", 2949, 0)
        progress.advance("users", 2949)
        progress.start("users", 2951, 2949)
        progress.advance("users", 2)
        assert [(t.completed, t.total) for t in bar.tasks] == [(2951, 2951)]
    assert "2951/2951" in out.getvalue()


def _drift(emu: EmulatorServer, ada: str, bob: str) -> None:
    """A rename and a deletion that webhooks would have carried, had they not been missed."""
    emu.request("PATCH", f"/v1/users/{ada}", json={"first_name": "Grace", "last_name": "Hopper"})
    emu.request("DELETE", f"/v1/users/{bob}")


def test_a_real_run_reports_the_rows_it_changed_and_logs_no_personal_value(store: Store,
                                                                            emu: EmulatorServer) -> None:
    ada = emu.create_user(email="ada@example.com", first_name="Ada")["id"]
    bob = emu.create_user(email="bob@example.com", first_name="Bob")["id"]
    acme = emu.create_organization("Acme", created_by=ada)["id"]
    first: list[Change] = []
    with clerk_client(emu) as clerk:
        Reconciler(store, clerk, on_change=first.append).run()
        assert {(c.action, c.clerk_id) for c in first if c.entity is Entity.USER} == {("create", ada), ("create", bob)}
        assert Change(Entity.ORGANIZATION, "create", acme) in first
        _drift(emu, ada, bob)
        carol = emu.create_user(email="carol@example.com", first_name="Carol")["id"]
        dry: list[Change] = []
        with structlog.testing.capture_logs() as dry_lines:
            Reconciler(store, clerk, on_change=dry.append).run(dry_run=True)
        changes: list[Change] = []
        with structlog.testing.capture_logs() as lines:
            report = Reconciler(store, clerk, on_change=changes.append).run()
    expected = [Change(Entity.USER, "update", ada, ("first_name", "last_name")),
                Change(Entity.USER, "create", carol), Change(Entity.USER, "delete", bob)]
    assert sorted(changes, key=repr) == sorted(expected, key=repr)  # (bob's membership: none, so no cascade)
    assert sorted(dry, key=repr) == sorted(changes, key=repr)  # what the dry run said the real run would do
    logged = [e for e in lines if e["event"] == "reconcile_change"]
    assert [(e["log_level"], e["entity"], e["action"], e["clerk_id"], e.get("fields")) for e in logged] == [
        ("info", c.entity.value, c.action, c.clerk_id, ",".join(c.fields) or None) for c in changes]
    assert all(e["run_id"] == report.run_id and e["dry_run"] is False for e in logged)
    dry_logged = [e for e in dry_lines if e["event"] == "reconcile_change"]
    assert len(dry_logged) == len(dry) and {e["log_level"] for e in dry_logged} == {"debug"}
    said = repr(lines + dry_lines)
    for value in ("Grace", "Hopper", "Carol", "carol@example.com", "bob@example.com", "Bob"):
        assert value not in said


def test_the_cli_prints_a_real_run_s_changes_and_few_of_a_first_import_s(db_url: str, emu: EmulatorServer) -> None:
    emu.emulator.bulk_create_users(58)
    ada = emu.create_user(email="ada@example.com", first_name="Ada")["id"]
    bob = emu.create_user(email="bob@example.com", first_name="Bob")["id"]
    first = run_cli("reconcile", emu=emu, db_url=db_url)
    assert first.returncode == 0, first.stderr
    created = [line for line in first.stdout.splitlines() if line.startswith("+ users user_")]
    assert len(created) == 20  # a first import: a few of its creations, then their count
    assert "... and 40 more created (each is in the log: reconcile_change)" in flat(first.stdout)
    assert first.stderr.count("event=reconcile_change") == 60  # every one logged (stderr), none on stdout
    assert "reconcile_change" not in first.stdout.replace("log: reconcile_change", "")

    _drift(emu, ada, bob)
    emu.emulator.bulk_create_users(25)
    second = run_cli("reconcile", emu=emu, db_url=db_url)
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    assert f"~ users {ada} (first_name, last_name)" in lines  # as a dry run prints it
    assert f"- users {bob}" in lines  # (after the 20 creations listed before it: each kind has its own lines)
    assert len([line for line in lines if line.startswith("+ users ")]) == 20
    assert "... and 5 more created (each" in flat(second.stdout)
    assert re.search(rf"level=info event=reconcile_change run_id=2 dry_run=false entity=users action=update "
                     rf"clerk_id={ada} fields=first_name,last_name", second.stderr), second.stderr
    for value in ("Grace", "Hopper", "bob@example.com"):
        assert value not in second.stdout + second.stderr

    emu.request("PATCH", f"/v1/users/{ada}", json={"first_name": "Ada"})
    dry = run_cli("reconcile", "--dry-run", emu=emu, db_url=db_url)
    assert dry.returncode == 0, dry.stderr
    assert f"~ users {ada} (first_name)" in dry.stdout.splitlines()
    assert "reconcile_change" not in dry.stderr  # (DEBUG: a dry run changes nothing)


def test_the_summary_points_to_the_log_only_when_it_holds_the_lines(db_url: str, emu: EmulatorServer) -> None:
    """Review: "(each is in the log: reconcile_change)" was printed at CLERK_SYNC_LOG_LEVEL=WARNING too, where
    the INFO lines it points to are dropped."""
    emu.emulator.bulk_create_users(25)
    quiet = run_cli("reconcile", emu=emu, db_url=db_url, CLERK_SYNC_LOG_LEVEL="WARNING")
    assert quiet.returncode == 0, quiet.stderr
    assert "... and 5 more created" in flat(quiet.stdout) and "each is in the log" not in flat(quiet.stdout)
    assert "reconcile_change" not in quiet.stderr
