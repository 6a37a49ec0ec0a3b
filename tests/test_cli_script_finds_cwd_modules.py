"""The CLI run through the installed ``clerk-sync`` script: it finds a ``--hooks``/``--mapping`` module
in the current directory, as ``python -m``, uvicorn and gunicorn do (it needed ``PYTHONPATH=.``: a console
script has only its own directory on ``sys.path``); ``emulate`` refuses a rate limit of 0."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("clerk-sync")


def _run(*args: str, cwd: Path, db: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CLERK_") and k not in ("DATABASE_URL", "PYTHONPATH")}
    env["DATABASE_URL"] = f"sqlite:///{db}"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
                          check=False)


def test_the_script_finds_hooks_and_mapping_modules_in_the_current_directory(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "cwd_app_hooks.py").write_text(textwrap.dedent('''
        from clerk_sync.changes import Hook

        HOOKS = [Hook("noop", lambda change: None, on=["user.created"])]
    '''))
    (project / "cwd_app_mapping.py").write_text(textwrap.dedent('''
        from clerk_sync.mapping import MappedTable, SchemaMapping, SoftDelete

        MAPPING = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"},
                                                  on_delete=SoftDelete("deleted_at")))
    '''))
    db = tmp_path / "app.db"
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT)")
    migrated = _run("migrate", "--mapping", "cwd_app_mapping:MAPPING", cwd=project, db=db)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    with sqlite3.connect(db) as conn:
        assert "clerk_user_id" in {row[1] for row in conn.execute("PRAGMA table_info(accounts)")}
    worker = _run("worker", "--once", "--hooks", "cwd_app_hooks:HOOKS", cwd=project, db=db)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    missing = _run("worker", "--once", "--hooks", "cwd_app_hooks:HOOKS", cwd=tmp_path, db=db)  # not here
    assert missing.returncode == 2
    said = " ".join((missing.stdout + missing.stderr).split())
    assert "no module named 'cwd_app_hooks' in the current directory" in said, said


def test_emulate_refuses_a_rate_limit_of_zero(tmp_path: Path) -> None:
    """Fixed: ``emulate --rate-limit 0`` started, then answered every Backend API call 429."""
    refused = _run("emulate", "--rate-limit", "0", "--port", "1", cwd=tmp_path, db=tmp_path / "x.db")
    assert refused.returncode == 2
    said = " ".join((refused.stdout + refused.stderr).split())
    assert "--rate-limit" in said and "greater than or equal to 1" in said, said
