"""The Flask extension's metrics (``clerk_state(app).processor.metrics``, what an app's ``/metrics`` renders)
carry the database's freshness series, as ``serve``'s do: before, an app receiving its own webhooks had no
``clerk_sync_database_up`` or ``clerk_sync_schema_current``, so ClerkSyncDatabaseDown and the schema alerts
could never fire for it."""

from __future__ import annotations

import socket

import pytest
from flask import Flask

from clerk_sync.integrations.flask import ClerkSync, clerk_state
from tests.conftest import SECRET
from tests.django.test_runtime_metrics_and_schema import _sample


def _app(url: str) -> Flask:
    app = Flask(__name__)
    app.config["CLERK_SYNC"] = {"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET}
    ClerkSync(app)
    return app


def test_a_flask_apps_metrics_say_the_database_is_up_and_migrated(db_url: str) -> None:
    app = _app(db_url)
    try:
        text = clerk_state(app).processor.metrics.render().decode()  # type: ignore[union-attr]
    finally:
        app.extensions["clerk_sync"].close()
    assert _sample(text, "clerk_sync_database_up") == 1
    assert _sample(text, "clerk_sync_schema_current") == 1
    assert "clerk_sync_hook_jobs" in text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # (the fixture's store unused: a closed port's)
def test_a_flask_apps_metrics_say_the_database_is_down(db_url: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = _app(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test?connect_timeout=2")
    try:
        text = clerk_state(app).processor.metrics.render().decode()  # type: ignore[union-attr]
    finally:
        app.extensions["clerk_sync"].close()
    assert "clerk_sync_database_up 0.0" in text
