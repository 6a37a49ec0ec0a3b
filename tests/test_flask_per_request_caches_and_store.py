"""The Flask face (in tests/ itself: a tests/flask package would make ruff take `flask` for first-party):
per-request caches, the DB timeouts without a webhook route, the CLI commands and the configured store's mapping and hooks."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from clerk_sync.changes import Hook
from clerk_sync.integrations.flask import ClerkSync, clerk_state, current_user, optional_clerk, public
from clerk_sync.mapping import MappedTable, SchemaMapping, migrate_schema
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs, users, webhook_events
from tests import factories as f
from tests.conftest import SECRET
from tests.test_auth import bearer, token
from tests.test_sessions import ISS, KEY, pem


def _config(db_url: str, **extra: Any) -> dict[str, Any]:
    return {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY),
            "CLERK_ISSUER": ISS, **extra}


def test_requests_inside_one_app_context_do_not_share_the_caller(db_url: str) -> None:
    """Fixed: the session and the row were cached in ``g``, which belongs to the app context:
    inside an outer ``with app.app_context():`` a request without credentials got the previous
    request's user."""
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = _config(db_url)
    ClerkSync(app, revocation_refresh_s=0)

    @app.get("/who")
    @public
    def who() -> dict[str, Any]:
        auth = optional_clerk()
        return {"session": auth.user_id if auth else None, "user": current_user.get_id()}

    user = f.envelope("user.created", f.user("user_fl", 10))
    assert clerk_state(app).processor.process(*f.signed(user, "msg_fl")).status == "applied"  # type: ignore[union-attr]
    with app.app_context(), app.test_client() as client:
        assert client.get("/who", headers=bearer(token("user_fl"))).get_json() == {"session": "user_fl", "user": "user_fl"}
        assert client.get("/who").get_json() == {"session": None, "user": None}


def test_requests_on_one_environ_check_the_session_each_time(db_url: str) -> None:
    """A gap in the fix above: the cache moved to the WSGI environ, but Flask-SocketIO runs every event of a
    connection in ``app.request_context(<the handshake's environ>)``: after the first event a ban (or a
    revocation, an expiry) was never seen again. The cache lives on the request object now."""
    from werkzeug.test import EnvironBuilder

    from clerk_sync.errors import SessionUserBanned
    from clerk_sync.integrations.flask import clerk_login_required

    app = Flask(__name__)
    app.config["CLERK_SYNC"] = _config(db_url)
    ClerkSync(app, revocation_refresh_s=0)

    @clerk_login_required
    def event() -> str:
        return str(current_user.get_id())

    processor = clerk_state(app).processor
    assert processor.process(*f.signed(f.envelope("user.created", f.user("user_sk", 10)), "msg_sk1")).status == "applied"  # type: ignore[union-attr]
    environ = EnvironBuilder(path="/socket.io/", headers=bearer(token("user_sk"))).get_environ()
    with app.request_context(environ):
        assert event() == "user_sk"
    banned = f.envelope("user.updated", f.user("user_sk", 20, banned=True))
    assert processor.process(*f.signed(banned, "msg_sk2")).status == "applied"  # type: ignore[union-attr]
    with app.request_context(environ), pytest.raises(SessionUserBanned):
        event()


@pytest.mark.parametrize("db_url", ["postgres", "mariadb"], indirect=True)  # SQLite: no server-side lock timeout
def test_without_a_webhook_route_the_store_keeps_the_database_timeouts(db_url: str) -> None:
    """Fixed: ``ClerkSync(app, webhook_path=None)`` opened its store without the
    ``CLERK_SYNC_DB_*`` timeouts (a stuck lock or statement then waited without bound)."""
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = _config(db_url, CLERK_SYNC_DB_LOCK_TIMEOUT_S=3)
    ClerkSync(app, webhook_path=None)
    store = clerk_state(app).store
    query = "SHOW lock_timeout" if db_url.startswith("postgres") else "SELECT @@innodb_lock_wait_timeout"
    try:
        with store.connect() as conn:
            assert str(conn.execute(sa.text(query)).scalar_one()) in ("3s", "3")
    finally:
        store.dispose()


ACCOUNTS = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"}))


def test_cli_replay_and_reconcile_write_the_configured_stores_mapping(db_url: str) -> None:
    """Fixed: ``flask clerk-sync reconcile`` opened a store without the mapping of the store given
    to ``ClerkSync(app, store=...)``; replay and reconcile now take ``--with-hooks`` as the CLI does."""
    from clerk_sync.testing import EmulatorServer

    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("email", sa.String(320)))
    store = Store.from_url(db_url, mapping=ACCOUNTS, hooks=[Hook("welcome", lambda change: None, on=["user.created"])])
    with store.engine.begin() as conn:
        accounts.create(conn)
        migrate_schema(conn, ACCOUNTS)

    def mapped() -> set[str]:
        with store.connect() as conn:
            return set(conn.execute(sa.text("SELECT email FROM accounts")).scalars())

    def jobs() -> int:
        with store.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one())

    with EmulatorServer() as clerk:
        app = Flask(__name__)
        app.config["CLERK_SYNC"] = _config(db_url, CLERK_SECRET_KEY=clerk.secret_key, CLERK_API_URL=clerk.url)
        ClerkSync(app, store=store)
        cli = app.test_cli_runner()
        clerk.create_user("late@example.com")  # no webhook URL: only reconcile brings it
        result = cli.invoke(args=["clerk-sync", "reconcile"])
        assert result.exit_code == 0, result.output
        assert (mapped(), jobs()) == ({"late@example.com"}, 0)  # mapped; repairs fire no hook unless asked

        event = f.envelope("user.created", f.user("user_replayed", 10, email="replayed@example.com"))
        assert clerk_state(app).processor.process(*f.signed(event, "msg_r")).status == "applied"  # type: ignore[union-attr]
        with store.transaction() as w:
            w.conn.execute(users.delete().where(users.c.clerk_id == "user_replayed"))
            w.conn.execute(sa.text("DELETE FROM accounts WHERE clerk_user_id = 'user_replayed'"))
            w.conn.execute(hook_jobs.delete())
            w.conn.execute(webhook_events.update().where(webhook_events.c.svix_id == "msg_r").values(status="failed"))
        result = cli.invoke(args=["clerk-sync", "replay", "--with-hooks"])
        assert result.exit_code == 0, result.output
        assert ("replayed@example.com" in mapped(), jobs()) == (True, 1)
    store.dispose()
