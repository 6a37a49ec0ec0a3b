"""The README's FastAPI module builds its store with the hooks `serve --hooks` runs (SQLite walkthrough,
finding 1): a user who signs in before their webhook arrives is written by the app's just-in-time sync, and
that write is their ``user.created``; the delivery after it is ``skipped``. Built without the hooks, 20 of 300
users never got their welcome mail. And the README schedules ``reconcile --with-hooks`` after the first load
(finding 2: a plain scheduled run ate the ``user.created`` hooks of 160 of 300 users around a restart)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.store import create_engine
from clerk_sync.testing import EmulatorServer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
_HOOKS_LINE = "HOOKS: list[Hook] = []"


def _fastapi_module() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
    found = [b for b in blocks if "sync_me_router(clerk, jit)" in b]
    assert len(found) == 1
    return found[0]


def test_the_fastapi_modules_jit_sync_queues_the_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = _fastapi_module()
    assert block.count(_HOOKS_LINE) == 1 and "Store.from_settings(settings, hooks=HOOKS)" in block
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    with EmulatorServer() as clerk:  # no webhook URL: the user's webhook is late
        for name, value in {"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": clerk.webhook_secret,
                            "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url}.items():
            monkeypatch.setenv(name, value)
        mine = block.replace(_HOOKS_LINE, 'HOOKS: list[Hook] = [Hook("welcome-mail", print, on=["user.created"])]')
        namespace: dict[str, Any] = {"__name__": "readme"}
        exec(compile(mine, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
        user = clerk.create_user(email="ada@example.com")
        assert namespace["jit"].get_auth_user(user["id"]).clerk_id == user["id"]
        namespace["store"].dispose()
    with engine.connect() as conn:
        jobs = conn.execute(sa.text("SELECT hook, type FROM hook_jobs")).all()
    engine.dispose()
    assert [tuple(j) for j in jobs] == [("welcome-mail", "user.created")]


def test_the_readme_schedules_reconcile_with_hooks_after_the_first_load() -> None:
    text = " ".join(README.split())
    day_one = text.split("### Day one", 1)[1].split("### ", 1)[0]
    assert "`clerk-sync reconcile --with-hooks mod:HOOKS`" in day_one
    assert "Leave `--with-hooks` out of the first load" in day_one
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    restore = " ".join(runbook.split("## Restoring the database from a backup", 1)[1].split("\n## ", 1)[0].split())
    assert "*without* `--with-hooks`" in restore and "paused until this run has completed" in restore
    assert ".backup" in restore and "-wal" in restore
