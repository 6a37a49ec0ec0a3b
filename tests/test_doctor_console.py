"""`clerk-sync doctor` checks the console's settings when CLERK_SYNC_CONSOLE is set: it passed while `serve`
refused to start (a console whose admins sign in with CLERK_JWT_KEY alone has no cookie key of its own).
Found by review."""

from __future__ import annotations

from pathlib import Path

from clerk_sync.cli.doctor import run_checks
from clerk_sync.config import Settings
from tests.conftest import SECRET
from tests.test_sessions import KEY, pem


def _console_line(tmp_path: Path, **extra: str) -> tuple[str, str]:
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}", "CLERK_WEBHOOK_SIGNING_SECRET":
                                  SECRET, "CLERK_JWT_KEY": pem(KEY), "CLERK_SYNC_CONSOLE": "1", **extra})
    (line,) = [(c.status, c.detail) for c in run_checks(settings) if c.name == "console"]
    return line


def test_a_console_serve_would_refuse_fails_doctor_saying_what_to_set(tmp_path: Path) -> None:
    status, detail = _console_line(tmp_path)
    assert status == "fail" and "CLERK_SYNC_CONSOLE_SECRET" in detail
    assert _console_line(tmp_path, CLERK_SYNC_CONSOLE_SECRET="k" * 40)[0] == "ok"


def test_no_console_no_line(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}", "CLERK_WEBHOOK_SIGNING_SECRET":
                                  SECRET})
    assert "console" not in [c.name for c in run_checks(settings)]
