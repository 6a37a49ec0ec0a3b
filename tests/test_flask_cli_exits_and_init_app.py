"""The Flask face as a demanding adopter uses it: the CLI's exit codes in cron, a webhook
behind the app's own ``before_request`` hooks, a failed ``init_app``, templates of a webhook-only app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from flask import Blueprint, Flask, render_template_string, request

from clerk_sync.config import Settings
from clerk_sync.integrations.flask import ClerkSync, clerk_state
from clerk_sync.tables import users, webhook_events
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._flask import running_wsgi
from tests.conftest import SECRET


def flask_app(**env: str) -> Flask:
    app = Flask(__name__)
    ClerkSync(app, settings=Settings.from_env({"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **env}))
    return app


# -- the CLI in cron: a run that did not do its job must not exit 0 -----------------------------------------


def test_reconcile_exits_1_when_clerk_objects_could_not_be_read(tmp_path: Path) -> None:
    """Fixed: `flask clerk-sync reconcile` exited 0 with objects in the summary's failed column (their
    rows left unrepaired), where `clerk-sync reconcile` and `manage.py clerk_sync reconcile` exit 1."""
    url = f"sqlite:///{tmp_path / 'rec.db'}"
    with EmulatorServer(rate_limit_requests=1000) as clerk:
        fine = clerk.create_user("fine@example.com")
        broken = clerk.create_user("broken@example.com")
        clerk.emulator.store.users[broken["id"]].updated_at = None  # type: ignore[assignment]
        app = flask_app(DATABASE_URL=url, CLERK_SECRET_KEY=clerk.secret_key, CLERK_API_URL=clerk.url)
        cli = app.test_cli_runner()
        assert cli.invoke(args=["clerk-sync", "migrate"]).exit_code == 0
        dry = cli.invoke(args=["clerk-sync", "reconcile", "--dry-run"])
        assert dry.exit_code == 1, dry.output
        result = cli.invoke(args=["clerk-sync", "reconcile"])
    assert result.exit_code == 1, result.output
    assert "Error: 1 Clerk object(s) could not be read" in result.output
    with clerk_state(app).store.connect() as conn:  # the readable one is still repaired
        assert set(conn.execute(sa.select(users.c.clerk_id)).scalars()) == {fine["id"]}
    clerk_state(app).close()


def test_replay_exits_1_while_deliveries_stay_failed_and_refuses_an_unknown_status(db_url: str) -> None:
    """Fixed: `flask clerk-sync replay` exited 0 when the replayed deliveries failed again, and a typo in
    ``--status`` replayed nothing and exited 0 (as if nothing were failed); the other CLIs exit 1 and 2."""
    app = flask_app(DATABASE_URL=db_url)
    store = clerk_state(app).store
    broken = f.envelope("user.created", {**f.user("user_rp", 5), "id": "user_" + "x" * 80})
    with store.transaction() as w:
        w.record_delivery("msg_rp", broken, event_type="user.created", instance_id=None, event_timestamp=1)
        w.finish_delivery("msg_rp", "failed", "id too long")
    cli = app.test_cli_runner()
    typo = cli.invoke(args=["clerk-sync", "replay", "--status", "faild"])
    assert typo.exit_code == 2 and "'faild' is not one of" in typo.output, typo.output
    still = cli.invoke(args=["clerk-sync", "replay"])
    assert still.exit_code == 1, still.output
    assert "replayed 1 deliveries: 1 failed" in still.output and "Error: 1 still failed" in still.output
    with store.transaction() as w:
        w.conn.execute(webhook_events.update().values(payload=f.envelope("user.created", f.user("user_rp", 5))))
    fixed = cli.invoke(args=["clerk-sync", "replay"])
    assert fixed.exit_code == 0 and "replayed 1 deliveries: 1 applied" in fixed.output, fixed.output
    clerk_state(app).close()


def test_a_database_error_is_one_line_not_a_traceback() -> None:
    """Fixed: `flask clerk-sync migrate` with an unreachable database ended in a SQLAlchemy traceback
    (its SQL included); it says what failed and what to check, as our own errors do, with `clerk-sync`'s
    exit code for it (3: retry later)."""
    app = flask_app(DATABASE_URL="mysql+mysqldb://root@127.0.0.1:1/x")  # nothing listens on port 1
    result = app.test_cli_runner().invoke(args=["clerk-sync", "migrate"])
    assert result.exit_code == 3, result.output
    assert isinstance(result.exception, SystemExit)  # click's own exit, no exception escaped
    assert "Error: database error: OperationalError" in result.output
    assert "Check DATABASE_URL, and that the database is up: retry once it answers" in result.output
    clerk_state(app).close()


# -- the webhook behind the app's own hooks -----------------------------------------------------------------


def test_a_delivery_whose_body_a_before_request_hook_read_first_is_applied(db_url: str) -> None:
    """Fixed: an app's ``before_request`` that read the body (a request logger, ``request.get_json()``)
    left the stream empty, and every signed delivery was refused as unsigned (401) until Svix gave up."""
    app = Flask(__name__)
    seen: list[Any] = []

    @app.before_request
    def log_json_bodies() -> None:
        seen.append(request.get_json(silent=True))

    ClerkSync(app, settings=Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}))
    headers, body = f.signed(f.envelope("user.created", f.user("user_logged", 5)), "msg_logged")
    headers["content-type"] = "application/json"  # as Svix sends it: get_json() reads the body
    with running_wsgi(app) as url, httpx.Client(base_url=url) as http:
        answer = http.post("/webhooks/clerk", content=body, headers=headers)
        assert (answer.status_code, answer.json()) == (200, {"status": "applied", "svix_id": "msg_logged"})
        forged = http.post("/webhooks/clerk", content=body.replace(b"user_logged", b"user_forged"), headers=headers)
        assert forged.status_code == 401  # the cached copy is verified as the stream was
    assert seen[0]["data"]["id"] == "user_logged"
    with clerk_state(app).store.connect() as conn:
        assert list(conn.execute(sa.select(users.c.clerk_id)).scalars()) == ["user_logged"]
    clerk_state(app).close()


# -- set-up ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clash", ["blueprint_name_taken", "app_already_serving"])
def test_a_failed_init_app_leaves_no_state_behind(tmp_path: Path, clash: str) -> None:
    """Fixed: when registering on the app failed (a blueprint already named ``clerk_sync``, an app that had
    served a request), its state stayed in ``app.extensions`` with pools and clients open: the app's
    guards ran without ``deny_by_default`` or the JSON errors, and a corrected retry was refused as
    "already set up"."""
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
                                  "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    app = Flask(__name__)
    if clash == "blueprint_name_taken":
        app.register_blueprint(Blueprint("clerk_sync", __name__))
    else:
        app.test_client().get("/")
    with pytest.raises((ValueError, AssertionError)):
        ClerkSync(app, settings=settings)
    with pytest.raises(RuntimeError, match="not set up on this app"):
        clerk_state(app)
    if clash == "blueprint_name_taken":  # fixed as the error says: the retry is not "already set up"
        ClerkSync(app, settings=settings, webhook_path=None)
        clerk_state(app).close()


def test_a_webhook_only_app_keeps_its_own_current_user_in_templates(tmp_path: Path) -> None:
    """Fixed: the ``current_user`` context processor was registered without session keys too: it shadowed
    the app's own ``current_user`` (its auth, a Jinja global) and every page using it answered 500."""
    app = Flask(__name__)
    app.jinja_env.globals["current_user"] = "the app's own user"
    ClerkSync(app, settings=Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
                                               "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}))

    @app.get("/")
    def home() -> str:
        return render_template_string("hello {{ current_user }}")

    answer = app.test_client().get("/")
    assert (answer.status_code, answer.get_data(as_text=True)) == (200, "hello the app&#39;s own user")
    clerk_state(app).close()


def test_sync_me_path_adds_the_route_the_fastapi_face_has(tmp_path: Path) -> None:
    """Fixed: Flask had no ``POST /sync/me`` (FastAPI's ``sync_me_router``); every app wrote it by hand,
    the example with an ``assert`` (a 500 without ``CLERK_SECRET_KEY``). ``sync_me_path`` adds it: login
    required, the row stored before the webhook, and a ``config_error`` naming the setting without a key."""
    url = f"sqlite:///{tmp_path / 'me.db'}"
    with EmulatorServer(rate_limit_requests=1000) as clerk:
        app = Flask(__name__)
        ClerkSync(app, sync_me_path="/sync/me", settings=Settings.from_env({
            "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "DATABASE_URL": url, "CLERK_SECRET_KEY": clerk.secret_key,
            "CLERK_API_URL": clerk.url}))
        assert app.test_cli_runner().invoke(args=["clerk-sync", "migrate"]).exit_code == 0
        ada = clerk.create_user("ada@example.com")
        token = clerk.mint_session_token(ada["id"])
        client = app.test_client()
        assert client.post("/sync/me").status_code == 401
        synced = client.post("/sync/me", headers={"Authorization": f"Bearer {token}"})
        assert synced.status_code == 200, synced.json
        assert (synced.json["user_id"], synced.json["email"]) == (ada["id"], "ada@example.com")
        with clerk_state(app).store.connect() as conn:
            assert conn.execute(sa.select(users.c.email).where(users.c.clerk_id == ada["id"])).scalar() == \
                "ada@example.com"
        clerk_state(app).close()
    from tests.test_auth import token
    from tests.test_sessions import ISS, KEY, pem

    keyless = Flask(__name__)  # sessions verified with CLERK_JWT_KEY, no CLERK_SECRET_KEY: nothing to ask Clerk with
    ClerkSync(keyless, sync_me_path="/sync/me", settings=Settings.from_env({
        "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "DATABASE_URL": url, "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS}))
    assert keyless.test_client().post("/sync/me").status_code == 401  # the session first, set-up or not
    answer = keyless.test_client().post("/sync/me", headers={"Authorization": f"Bearer {token('user_keyless')}"})
    assert answer.status_code == 500 and answer.json["error"] == "config_error", answer.json
    assert "set CLERK_SECRET_KEY" in answer.json["message"]
    clerk_state(keyless).close()


def test_a_set_up_flask_refuses_half_way_registers_nothing(tmp_path: Path) -> None:
    """Fixed: a ``sync_me_path`` Flask refuses (no leading slash), or an endpoint of ours the app
    already has, failed after the blueprint, the error handler and ``deny_by_default`` were registered:
    the retry was refused ("clerk_sync is already registered") and every request of the app was a 500."""
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
    app = Flask(__name__)

    @app.get("/")
    def home() -> str:
        return "home"

    with pytest.raises(ValueError, match="must start with '/'"):
        ClerkSync(app, settings=settings, sync_me_path="sync/me")
    app.add_url_rule("/me", endpoint="clerk_sync_me", view_func=home)
    with pytest.raises(ValueError, match="already has an endpoint named 'clerk_sync_me'"):
        ClerkSync(app, settings=settings, sync_me_path="/sync/me")
    assert "clerk_sync" not in app.blueprints and not app.before_request_funcs  # untouched: no half set-up
    ClerkSync(app, settings=settings)  # corrected: set up
    assert "clerk_sync" in app.blueprints
    clerk_state(app).close()



def test_sync_me_path_with_jit_off_is_refused_when_built() -> None:
    """Before: ``ClerkSync(jit=False, sync_me_path=...)`` was accepted and every POST to the route answered 500
    ``config_error`` ("set CLERK_SECRET_KEY (and keep ClerkSync(jit=True))"), found by the first user."""
    with pytest.raises(ValueError, match="jit=False turns off: keep jit=True"):
        ClerkSync(sync_me_path="/sync/me", jit=False)
    assert ClerkSync(sync_me_path="/sync/me").sync_me_path == "/sync/me"
