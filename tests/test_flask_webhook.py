"""The Flask webhook blueprint answers as the standalone service does: the same statuses and the same
rows for every example payload, the same refusals (writing nothing), through the test client and a real server."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask

from clerk_sync.config import Settings
from clerk_sync.integrations.flask import ClerkSync, clerk_state
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.store import Store
from clerk_sync.tables import metadata
from tests import factories as f
from tests._flask import running_wsgi
from tests._server import running
from tests.conftest import SECRET
from tests.test_service import EXAMPLE_FILES, _bad_requests, example_as_sent, row_counts

Answer = tuple[int, Any]
Post = Callable[[dict[str, str], bytes], Answer]


def _settings(db_url: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET,
                              "CLERK_INSTANCE_ID": f.INSTANCE})


def _http_post(client: httpx.Client) -> Post:
    def post(headers: dict[str, str], body: bytes) -> Answer:
        r = client.post("/webhooks/clerk", content=body, headers=headers)
        return r.status_code, r.json()

    return post


def _flask_app(db_url: str) -> Flask:
    app = Flask(__name__)
    ClerkSync(app, settings=_settings(db_url))  # webhook only: no session keys needed
    return app


@pytest.fixture(params=["test_client", "server"])
def flask_post(request: pytest.FixtureRequest, db_url: str) -> Iterator[tuple[Post, Store]]:
    app = _flask_app(db_url)
    if request.param == "server":
        with running_wsgi(app) as url, httpx.Client(base_url=url) as client:
            yield _http_post(client), clerk_state(app).store
    else:
        test_client = app.test_client()

        def post(headers: dict[str, str], body: bytes) -> Answer:
            response = test_client.post("/webhooks/clerk", data=body, headers=headers)
            return response.status_code, response.get_json()

        yield post, clerk_state(app).store
    clerk_state(app).close()


def deliver_examples(post: Post) -> list[Answer]:
    answers = []
    for i, path in enumerate(EXAMPLE_FILES):  # (the instance check is tested below)
        answers.append(post(*f.signed(example_as_sent(path), f"msg_example_{i}")))
    return answers


def snapshot(store: Store) -> dict[str, list[str]]:
    """Every row of every table, without surrogate ids and with wall-clock times reduced to 'set'."""
    def norm(row: dict[str, Any]) -> str:
        return json.dumps({k: "<time>" if isinstance(v, datetime) else v for k, v in row.items() if k != "id"},
                          sort_keys=True, default=str)

    with store.connect() as conn:
        # Not clerk_sync_locks: which lock rows exist depends on how deliveries were batched (MariaDB).
        return {t.name: sorted(norm(dict(r)) for r in conn.execute(sa.select(t)).mappings())
                for t in metadata.sorted_tables if t.name != "clerk_sync_locks"}


def wipe(store: Store) -> None:
    with store.transaction() as w:
        for table in reversed(metadata.sorted_tables):
            w.conn.execute(table.delete())


def test_every_example_payload_gives_the_rows_and_statuses_of_the_service(
        flask_post: tuple[Post, Store], db_url: str) -> None:
    post, store = flask_post
    settings = _settings(db_url)
    processor = build_processor(settings)
    again = f.envelope("user.created", f.user("user_dup", 1))
    with running(create_app(settings, processor)) as url, httpx.Client(base_url=url) as client:
        expected = deliver_examples(_http_post(client))
        duplicates = [_http_post(client)(*f.signed(again, "msg_dup")) for _ in range(2)]
    processor.store.dispose()
    service_rows = snapshot(store)
    assert len(expected) >= 45 and {s for s, _ in expected} == {200}
    assert service_rows["users"] and service_rows["webhook_events"]
    wipe(store)

    assert deliver_examples(post) == expected
    assert [post(*f.signed(again, "msg_dup")) for _ in range(2)] == duplicates
    assert [a["status"] for _, a in duplicates] == ["applied", "duplicate"]
    assert snapshot(store) == service_rows


@pytest.mark.parametrize("name", [c[0] for c in _bad_requests()])
def test_refusals_match_the_service_and_write_nothing(flask_post: tuple[Post, Store], db_url: str, name: str) -> None:
    _, headers, body, status = next(c for c in _bad_requests() if c[0] == name)  # signed now, not at collection
    post, store = flask_post
    settings = _settings(db_url)
    processor = build_processor(settings)
    with running(create_app(settings, processor)) as url, httpx.Client(base_url=url) as client:
        expected = _http_post(client)(headers, body)
    processor.store.dispose()
    assert expected[0] == status
    assert post(headers, body) == expected
    assert set(row_counts(store).values()) == {0}


def test_an_oversized_body_is_refused_before_it_is_read(db_url: str) -> None:
    app = _flask_app(db_url)
    with running_wsgi(app) as url, httpx.Client(base_url=url) as client:
        port = int(url.rsplit(":", 1)[1])
        # Content-Length promises 50 MB and nothing follows: an answer proves the body was never awaited.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /webhooks/clerk HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n"
                         b"svix-id: m\r\nsvix-timestamp: 1\r\nsvix-signature: v1,x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection after answering
                answer += chunk
        head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 413")
        assert json.loads(body)["error"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            for _ in range(20):
                yield b"a" * 65536

        r = client.post("/webhooks/clerk", content=chunks(), headers={"svix-id": "m", "svix-timestamp": "1",
                                                                     "svix-signature": "v1,x"})
        assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
    assert set(row_counts(clerk_state(app).store).values()) == {0}
    clerk_state(app).close()



def test_the_endpoint_url_with_a_trailing_slash_is_served(db_url: str) -> None:
    """As the service: ``/webhooks/clerk/`` (entered in Clerk's Dashboard with a slash) was a 404."""
    app = _flask_app(db_url)
    with running_wsgi(app) as url, httpx.Client(base_url=url) as client:
        headers, body = f.signed(f.envelope("user.created", f.user("user_slash", 100)), "msg_slash")
        served = client.post("/webhooks/clerk/", content=body, headers=headers)
        assert (served.status_code, served.json()["status"]) == (200, "applied")
    clerk_state(app).close()

def test_one_extension_serves_two_apps_each_with_its_own_database(tmp_path: Any) -> None:
    from clerk_sync import migrations
    from clerk_sync.store import create_engine

    extension = ClerkSync()  # the application-factory shape: init_app per app
    apps = []
    for name in ("a", "b"):
        url = f"sqlite:///{tmp_path / name}.db"
        engine = create_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        app = Flask(name)
        app.config.update(DATABASE_URL=url, CLERK_WEBHOOK_SIGNING_SECRET=SECRET)  # top-level config keys
        extension.init_app(app)
        apps.append(app)
    headers, body = f.signed(f.envelope("user.created", f.user("user_a_only", 1)), "msg_a")
    assert apps[0].test_client().post("/webhooks/clerk", data=body, headers=headers).get_json()["status"] == "applied"
    assert row_counts(clerk_state(apps[0]).store)["users"] == 1
    assert row_counts(clerk_state(apps[1]).store)["users"] == 0
    for app in apps:
        clerk_state(app).close()


def test_a_store_with_hooks_is_used_for_every_write(db_url: str) -> None:
    """Review finding: the extension built its own Store, so hooks and mappings configured on the app's
    store were skipped by Flask's webhook, JIT and admin writes. ``ClerkSync(store=...)`` shares it."""
    from clerk_sync.changes import Hook
    from clerk_sync.tables import hook_jobs

    store = Store.from_url(db_url, hooks=[Hook("welcome", lambda change: None, on=["user.created"])])
    try:
        app = Flask(__name__)
        ClerkSync(app, settings=_settings(db_url), store=store)
        assert clerk_state(app).store is store
        headers, body = f.signed(f.envelope("user.created", f.user("user_hooked", 10)), "msg_hooked")
        response = app.test_client().post("/webhooks/clerk", data=body, headers=headers)
        assert response.status_code == 200 and response.get_json()["status"] == "applied"
        with store.connect() as conn:
            assert conn.execute(sa.select(hook_jobs.c.type)).scalars().all() == ["user.created"]
    finally:
        store.dispose()


def test_closing_the_extension_says_the_deliveries_since_the_last_summary_line(db_url: str) -> None:
    """A Flask app torn down (tests, a worker recycled) says the deliveries its summary line counted but
    had not said yet; the first one is said at once, as by ``serve``."""
    import structlog

    app = _flask_app(db_url)
    client = app.test_client()
    with structlog.testing.capture_logs() as lines:
        for n in range(3):
            headers, body = f.signed(f.envelope("user.created", f.user(f"user_fclose_{n}", 1)), f"msg_fclose_{n}")
            assert client.post("/webhooks/clerk", data=body, headers=headers).status_code == 200
        assert [line["deliveries"] for line in lines if line["event"] == "webhooks"] == [1]
        clerk_state(app).close()
    assert [(line["deliveries"], line.get("applied")) for line in lines if line["event"] == "webhooks"] == [
        (1, 1), (2, 2)]


def test_refusals_and_database_failures_are_counted_as_the_services_are(db_url: str) -> None:
    """Flask (and Django) counted a refusal as an event of type "unknown" and a 503 not at all, so the
    alerts on ``clerk_sync_webhook_refused_total`` and ``clerk_sync_webhook_unavailable_total`` could never
    fire there."""
    app = _flask_app(db_url)
    client = app.test_client()
    forged = f.signed(f.envelope("user.created", f.user("user_x", 1)), "msg_x", secret="whsec_" + "A" * 32)
    assert client.post("/webhooks/clerk", data=forged[1], headers=forged[0]).status_code == 401
    with clerk_state(app).store.engine.begin() as conn:  # the database breaks
        conn.exec_driver_sql("DROP TABLE webhook_events")
    headers, body = f.signed(f.envelope("user.created", f.user("user_y", 1)), "msg_y")
    assert client.post("/webhooks/clerk", data=body, headers=headers).status_code == 503
    registry = clerk_state(app).processor.metrics.registry  # type: ignore[union-attr]
    assert registry.get_sample_value("clerk_sync_webhook_refused_total", {"code": "webhook_signature_invalid"}) == 1
    assert registry.get_sample_value("clerk_sync_webhook_unavailable_total") == 1
    assert registry.get_sample_value("clerk_sync_db_errors_total", {"operation": "webhook"}) == 1
    assert registry.get_sample_value("clerk_sync_webhook_events_total",
                                     {"type": "unknown", "status": "webhook_signature_invalid"}) is None
    clerk_state(app).close()
