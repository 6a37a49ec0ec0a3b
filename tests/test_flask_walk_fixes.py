"""Findings of an adopter's walk through the Flask face: the webhook registered by hand as ``init_app``'s own
error advises, ``flask clerk-sync`` exit codes from ``clerk-sync``'s one table, a settings error under the
``flask`` command as one line (exit 2), a missing mapped table named as such, ``init_app(app, store=...)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from flask import Blueprint, Flask
from flask.cli import FlaskGroup

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.integrations.flask import ClerkSync, clerk_state, settings_from_config, webhook_blueprint
from clerk_sync.mapping import MappedTable, SchemaMapping
from clerk_sync.store import Store
from clerk_sync.tables import users
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests._flask import running_wsgi
from tests.conftest import SECRET


def _settings(url: str, **env: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **env})


def _sqlite(tmp_path: Path, name: str = "x.db") -> str:
    url = f"sqlite:///{tmp_path / name}"
    engine = sa.create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return url


# -- 1. the webhook registered by hand ---------------------------------------------------------------


def _own_blueprint_app() -> Flask:
    app = Flask(__name__)
    mine = Blueprint("clerk_sync", __name__, url_prefix="/mine")  # the app's own blueprint of our name
    mine.add_url_rule("/", "index", lambda: "mine")
    app.register_blueprint(mine)
    return app


@pytest.mark.parametrize("how", ["name_argument", "register_name", "nested"])
def test_the_webhook_registered_as_init_app_advises_applies_signed_deliveries(db_url: str, how: str) -> None:
    """Fixed: doing what init_app's error said (``ClerkSync(webhook_path=None)`` and ``webhook_blueprint()``
    registered by hand, under another name) gave a webhook answering 500 to every delivery (``assert
    processor is not None``: no processor was built), and 401 under ``deny_by_default`` (not public)."""
    app = _own_blueprint_app()
    settings = _settings(db_url, CLERK_SECRET_KEY="sk_test_x", CLERK_API_URL="http://127.0.0.1:9")  # sessions on
    ClerkSync(app, settings=settings, deny_by_default=True, webhook_path=None)
    if how == "name_argument":  # the advice, as the error words it
        app.register_blueprint(webhook_blueprint(name="clerk_webhook"))
    elif how == "register_name":  # Flask's own way to rename a blueprint
        app.register_blueprint(webhook_blueprint(), name="clerk_webhook")
    else:  # under a parent blueprint: endpoint "hooks.clerk_webhook.webhook"
        parent = Blueprint("hooks", __name__)
        parent.register_blueprint(webhook_blueprint("/clerk", name="clerk_webhook"))
        app.register_blueprint(parent, url_prefix="/webhooks")
    headers, body = f.signed(f.envelope("user.created", f.user("user_byhand", 5)), "msg_byhand")
    with running_wsgi(app) as url, httpx.Client(base_url=url) as http:
        answer = http.post("/webhooks/clerk", content=body, headers=headers)
        assert (answer.status_code, answer.json()) == (200, {"status": "applied", "svix_id": "msg_byhand"})
        forged = http.post("/webhooks/clerk", content=body.replace(b"user_byhand", b"user_forged"), headers=headers)
        assert forged.status_code == 401 and forged.json()["error"] != "token_missing"  # the signature refused it
        mine = http.get("/mine/")  # deny_by_default still holds for the rest
        assert (mine.status_code, mine.json()["error"]) == (401, "token_missing")
    with clerk_state(app).store.connect() as conn:
        assert list(conn.execute(sa.select(users.c.clerk_id)).scalars()) == ["user_byhand"]
    clerk_state(app).close()
    with pytest.raises(ValueError, match=r"webhook_blueprint\(name='clerk_webhook'\)"):  # the advice given
        ClerkSync(settings=settings).init_app(_own_blueprint_app())


def test_a_webhook_blueprint_that_cannot_work_fails_at_start_up(tmp_path: Path) -> None:
    """A webhook registered before ClerkSync, or without the signing secret, is refused when it is registered
    (a clear error at start-up), not answered 500 on every delivery; a refused one leaves no route behind."""
    url = _sqlite(tmp_path)
    early = Flask(__name__)
    with pytest.raises(RuntimeError, match=r"after ClerkSync\(app\)"):
        early.register_blueprint(webhook_blueprint())
    assert "clerk_sync" not in early.blueprints and "clerk_sync.webhook" not in early.view_functions
    ClerkSync(early, settings=_settings(url), webhook_path=None)
    early.register_blueprint(webhook_blueprint())  # in the right order: fine (the name was not left taken)
    assert "clerk_sync.webhook" in clerk_state(early).public_endpoints
    clerk_state(early).close()

    secretless = Flask(__name__)
    ClerkSync(secretless, settings=Settings.from_env({"DATABASE_URL": url}), webhook_path=None)
    assert clerk_state(secretless).processor is None  # an app without a webhook needs no secret
    with pytest.raises(ConfigError, match="CLERK_WEBHOOK_SIGNING_SECRET is not set"):
        secretless.register_blueprint(webhook_blueprint())
    assert "clerk_sync.webhook" not in secretless.view_functions
    clerk_state(secretless).close()


# -- 2. exit codes of `flask clerk-sync` --------------------------------------------------------------


def _invoke(app: Flask, *args: str) -> tuple[int, str]:
    result = app.test_cli_runner().invoke(args=["clerk-sync", *args])
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.exception
    return result.exit_code, result.output


def test_the_database_down_exits_3_with_what_to_do() -> None:
    """Fixed: every error exited 1, so cron could not tell "retry later" from "fix the configuration"; the
    database down now exits 3 with clerk-sync's hint, as `clerk-sync` says it."""
    app = Flask(__name__)
    ClerkSync(app, settings=_settings("mysql+mysqldb://root@127.0.0.1:1/x"))  # nothing listens on port 1
    for command in (["migrate"], ["replay"], ["prune"]):
        code, output = _invoke(app, *command)
        assert code == 3, (command, output)
        assert "Error: " in output and "Traceback" not in output, output
        assert "Check DATABASE_URL, and that the database is up: retry once it answers" in output, output
    clerk_state(app).close()


def test_settings_and_arguments_exit_2_and_clerk_down_exits_3(tmp_path: Path) -> None:
    url = _sqlite(tmp_path)
    with EmulatorServer(rate_limit_requests=1000) as clerk:
        app = Flask(__name__)
        ClerkSync(app, settings=_settings(url, CLERK_SECRET_KEY="sk_test_wrong", CLERK_API_URL=clerk.url))
        code, output = _invoke(app, "reconcile", "--dry-run")  # a key Clerk refuses
        assert code == 2 and "Check CLERK_SECRET_KEY" in output, output
        code, output = _invoke(app, "replay", "--since", "yesterday")
        assert code == 2 and "--since 'yesterday' is not an ISO 8601" in output, output
        clerk_state(app).close()
    with EmulatorServer() as gone:  # a port nothing listens on once it is stopped
        down_url = gone.url
    app = Flask(__name__)
    ClerkSync(app, settings=_settings(url, CLERK_SECRET_KEY="sk_test_x", CLERK_API_URL=down_url))
    code, output = _invoke(app, "reconcile", "--dry-run")
    assert code == 3, output
    clerk_state(app).close()


ACCOUNTS = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"}))


def test_a_missing_mapped_table_says_create_it_first_exit_2(tmp_path: Path) -> None:
    """Fixed: reported as ``NoSuchTableError: accounts; check DATABASE_URL`` (exit 1): the URL is right,
    the app's table is what to create."""
    url = _sqlite(tmp_path)
    store = Store.from_url(url, mapping=ACCOUNTS)
    app = Flask(__name__)
    ClerkSync(app, settings=_settings(url), store=store)
    code, output = _invoke(app, "migrate")
    assert code == 2, output
    assert "the mapped table 'accounts' does not exist: create it with your app's own migrations first" in output
    assert "DATABASE_URL" not in output, output
    clerk_state(app).close()
    store.dispose()


# -- 3. a settings error under the `flask` command ----------------------------------------------------


def _flask_command(factory: Callable[[], Flask], *args: str) -> tuple[int, str]:
    group = FlaskGroup(create_app=factory)
    result = CliRunner().invoke(group, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("where", ["init_app", "settings_from_config"])
def test_a_settings_error_under_the_flask_command_is_one_line_exit_2(tmp_path: Path, where: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: a settings error ended every `flask ...` command (`clerk-sync migrate`, `routes`) in the
    traceback of the app's loading, exit 1; it is Flask's one ``Error: ...`` line, exit 2."""
    monkeypatch.delenv("CLERK_WEBHOOK_SIGNING_SECRET", raising=False)

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["DATABASE_URL"] = f"sqlite:///{tmp_path / 'x.db'}"
        if where == "settings_from_config":  # the app factory's own reading of the settings
            app.config["CLERK_SYNC"] = {"DATABASE_URLL": "typo"}
            settings_from_config(app.config)
        ClerkSync(app)
        return app

    for command in (["clerk-sync", "migrate"], ["routes"]):
        code, output = _flask_command(create_app, *command)
        assert code == 2, output
        assert "Traceback" not in output, output
        said = ("unknown key(s) in app.config['CLERK_SYNC']: DATABASE_URLL" if where == "settings_from_config"
                else "CLERK_WEBHOOK_SIGNING_SECRET is not set")
        assert output.startswith(f"Error: {said}"), output
    with pytest.raises(ConfigError) as raised:  # outside the command line (a server starting): as it was
        create_app()
    assert type(raised.value) is ConfigError


# -- finding 4: init_app(app, store=...) --------------------------------------------------------------


def test_init_app_takes_the_apps_own_store(tmp_path: Path) -> None:
    """An app factory with a module-level ``ClerkSync()`` passes each app's mapped store to ``init_app``."""
    clerk = ClerkSync()
    url = _sqlite(tmp_path)
    store = Store.from_url(url, mapping=ACCOUNTS)
    with store.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE accounts (id INTEGER PRIMARY KEY, email VARCHAR(320))"))
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = {"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    clerk.init_app(app, store=store)
    assert clerk_state(app).store is store
    assert _invoke(app, "migrate")[0] == 0
    other = Flask(__name__)  # the same extension, another app: its own store from its config
    other.config["CLERK_SYNC"] = {"DATABASE_URL": _sqlite(tmp_path, "other.db"), "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    clerk.init_app(other)
    assert clerk_state(other).store is not store and clerk_state(other).store.mapping is None
    headers, body = f.signed(f.envelope("user.created", f.user("user_mapped", 5, email="m@example.com")), "msg_m")
    answer = app.test_client().post("/webhooks/clerk", data=body, headers=headers)
    assert answer.status_code == 200, answer.json
    with store.connect() as conn:
        assert list(conn.execute(sa.text("SELECT email FROM accounts")).scalars()) == ["m@example.com"]
    clerk_state(app).close()
    clerk_state(other).close()
    with store.connect() as conn:  # the app's own store: closing the state left it open (you close it)
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    store.dispose()
