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

from clerk_sync.reconcile import Reconciler
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
