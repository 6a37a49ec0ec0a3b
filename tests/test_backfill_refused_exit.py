"""``clerk-sync migrate --mapping .. --backfill`` exits 1 when the backfill refused rows (work left undone, as
``replay`` with deliveries still failed), and says what to do.

Walkthrough finding (2026-12-05): it printed ``backfilled {'refused': 4, 'users': 5}`` and exited 0, while
RUNBOOK sends operators to it to repair refused rows: a deploy step or cron could not tell it had not."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.engine import Entity, Upsert
from clerk_sync.events import user_record
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests.test_cli import run

_APP_MODULE = """
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete

def nickname(values):
    if values["clerk_id"] == "user_refused":
        raise ValueError("no nickname for this one")
    return (values.get("first_name") or "")[:8]

MAPPING = SchemaMapping(users=MappedTable("accounts", "clerk_user_id",
                                          {"email": "email", "nick": Column(compute=nickname)},
                                          SoftDelete("deleted_at")))
"""


def test_a_backfill_that_refused_rows_exits_1_naming_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE accounts (id INTEGER PRIMARY KEY AUTOINCREMENT, email VARCHAR(320), "
                             "nick VARCHAR(8) NOT NULL)"))
    engine.dispose()
    store = Store.from_url(url)
    with store.transaction() as writer:
        for clerk_id in ("user_fine", "user_refused"):
            writer.apply(Upsert(Entity.USER, user_record(f.user(clerk_id, 1_800_000_000_000))))
    store.dispose()
    (tmp_path / "appmap.py").write_text(_APP_MODULE)
    env = {"DATABASE_URL": url, "PYTHONPATH": str(tmp_path)}

    migrated = run("migrate", "--mapping", "appmap:MAPPING", "--backfill", env=env)
    said = " ".join((migrated.stdout + migrated.stderr).split())
    assert migrated.returncode == 1, said
    assert "backfilled {'users': 1, 'refused': 1}" in said or "backfilled {'refused': 1, 'users': 1}" in said, said
    assert "1 row(s) refused, not written" in said and "run the backfill again" in said, said

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT clerk_user_id FROM accounts")).scalars().all() == ["user_fine"]
    engine.dispose()
    (tmp_path / "appmap.py").write_text(_APP_MODULE.replace('"user_refused"', '"nobody"'))  # the fix
    again = run("migrate", "--mapping", "appmap:MAPPING", "--backfill", env=env)
    assert again.returncode == 0, again.stderr


def test_flask_clerk_sync_migrate_backfill_exits_1_too(tmp_path: Path) -> None:
    """The same through ``flask clerk-sync migrate --backfill`` (its store's mapping)."""
    from flask import Flask

    from clerk_sync.integrations.flask import ClerkSync, clerk_state
    from tests.conftest import SECRET

    url = f"sqlite:///{tmp_path / 'flask.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE accounts (id INTEGER PRIMARY KEY AUTOINCREMENT, email VARCHAR(320), "
                             "nick VARCHAR(8) NOT NULL)"))
    engine.dispose()
    namespace: dict[str, object] = {}
    exec(_APP_MODULE, namespace)  # noqa: S102 (this module's own text)
    store = Store.from_url(url, mapping=namespace["MAPPING"])  # type: ignore[arg-type]
    with store.transaction() as writer:
        for clerk_id in ("user_fine", "user_refused"):
            writer.apply(Upsert(Entity.USER, user_record(f.user(clerk_id, 1_800_000_000_000))))
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = {"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    ClerkSync(app, store=store)
    try:
        result = app.test_cli_runner().invoke(args=["clerk-sync", "migrate", "--backfill"])
        assert result.exit_code == 1, result.output
        assert "1 row(s) refused, not written" in result.output and "1 row(s) refused by the mapped tables" in \
            result.output, result.output
    finally:
        clerk_state(app).close()
        store.dispose()
