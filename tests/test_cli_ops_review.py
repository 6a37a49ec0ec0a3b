"""What the CLI review of 2026-12-07 found, each as a user met it: a ``worker`` that polled an empty SQLite file
it had created itself, ``dev`` answering a busy port with the exit code of a setting to fix, and ``serve --host``
with an address not of this host told to "pass another --port". Real processes."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests._server import free_port
from tests.conftest import SECRET
from tests.test_cli import run


def said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def test_a_worker_refuses_a_sqlite_file_that_is_not_there_and_creates_none(tmp_path: Path) -> None:
    """A worker never migrates: started from another directory (a relative path) or on a typo it created an empty
    file and logged "no such table ... run `clerk-sync migrate`" for ever; following that advice gave it a second
    database while serve's jobs waited. It exits 2 naming the path, as `hooks list` does, and creates nothing."""
    missing = tmp_path / "typo.db"
    result = run("worker", "--once", "--hooks", "tests._hook_worker:hooks",
                 env={"DATABASE_URL": f"sqlite:///{missing}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    assert result.returncode == 2, said(result)
    assert f"the SQLite file {missing} does not exist (nothing was created)" in said(result), said(result)
    assert not missing.exists()


def test_serve_no_migrate_on_a_missing_sqlite_file_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    """``serve --no-migrate`` on a mistyped SQLite path created an empty file and answered every delivery 503
    ("not migrated") for ever; `clerk-sync migrate`, as /readyz advised, filled that second database. It exits 2
    naming the path, as `worker` does; with migrations (the default) it still creates a new install's file."""
    missing = tmp_path / "typo.db"
    result = run("serve", "--no-migrate", "--port", str(free_port()),
                 env={"DATABASE_URL": f"sqlite:///{missing}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    assert result.returncode == 2, said(result)
    assert f"the SQLite file {missing} does not exist (nothing was created)" in said(result), said(result)
    assert not missing.exists()


def test_dev_on_a_busy_port_exits_3_as_serve_does(tmp_path: Path) -> None:
    """The README's exit codes: 3 when the port to listen on is in use (retry later), for every command; `dev`
    said 2 (a setting to fix)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("dev", "--once", "--port", str(taken.getsockname()[1]), "--db", str(tmp_path / "dev.db"))
    assert result.returncode == 3, said(result)
    assert "pass another --port, or stop what uses it" in said(result), said(result)


def test_serve_on_an_address_not_of_this_host_says_so(tmp_path: Path) -> None:
    """``--host`` naming an address this machine does not have was told "pass another --port, or stop what uses
    it" (one message for every bind error): it names the option to fix now (192.0.2.1: TEST-NET, no host's)."""
    result = run("serve", "--host", "192.0.2.1", "--port", str(free_port()),
                 env={"DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    assert result.returncode == 2, said(result)
    assert "cannot listen on 192.0.2.1:" in said(result), said(result)
    assert "--host must be an address of this host (0.0.0.0 listens on all of them" in said(result), said(result)
    assert "pass another --port" not in said(result)


def test_emulate_on_a_busy_port_says_it_once(tmp_path: Path) -> None:
    """The emulator's own message says what and where with its advice: wrapped again by the CLI's, the line
    gave the advice twice (review of this change). Exit 3, one sentence."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("emulate", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 3, said(result)
    assert said(result).count("cannot listen on") == 1 and said(result).count("or stop what uses it") == 1, said(result)
