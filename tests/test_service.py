"""The webhook service over real HTTP on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.ingest import replay_deliveries
from clerk_sync.integrations.starlette import build_processor, create_app
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import metadata, organization_memberships, users, webhook_events
from tests import factories as f
from tests._server import running
from tests.conftest import EXAMPLES, SECRET

EXAMPLE_FILES = sorted((EXAMPLES / "examples").glob("*.json")) + sorted((EXAMPLES / "examples" / "variants").glob("*.json"))
#: When the examples are "sent", for faces compared row by row: their own timestamps are years old, and a live
#: event's more than a year from the time received is the time received, another one on each face compared.
EXAMPLES_SENT_MS = int(time.time() * 1000)


def example_as_sent(path: Path) -> bytes:
    """An example payload as Clerk would send it now (no ``instance_id``: they come from other instances)."""
    event = json.loads(path.read_bytes())
    event.pop("instance_id", None)
    event["timestamp"] = EXAMPLES_SENT_MS
    return json.dumps(event).encode()


def _settings(db_url: str, **extra: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **extra})


@pytest.fixture
def service(db_url: str) -> Iterator[tuple[httpx.Client, Store]]:
    settings = _settings(db_url, CLERK_INSTANCE_ID=f.INSTANCE)
    processor = build_processor(settings)
    with running(create_app(settings, processor)) as url, httpx.Client(base_url=url) as client:
        yield client, processor.store
    processor.store.dispose()


def post(client: httpx.Client, event: dict[str, object] | bytes, svix_id: str, **kw: object) -> httpx.Response:
    headers, body = f.signed(event, svix_id, **kw)  # type: ignore[arg-type]
    return client.post("/webhooks/clerk", content=body, headers=headers)


def row_counts(store: Store) -> dict[str, int]:
    with store.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in metadata.sorted_tables}


def user_row(store: Store, clerk_id: str) -> dict[str, object] | None:
    with store.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.clerk_id == clerk_id)).mappings().first()
    return dict(row) if row else None


def test_every_example_payload_is_accepted(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    statuses = {}
    for i, path in enumerate(EXAMPLE_FILES):
        body = path.read_bytes()
        event = json.loads(body)
        event.pop("instance_id", None)  # examples come from other instances; the check is tested below
        response = post(client, json.dumps(event).encode(), f"msg_example_{i}")
        assert response.status_code == 200, (path.name, response.text)
        statuses[path.name] = response.json()["status"]
    assert len(EXAMPLE_FILES) >= 45
    assert statuses["user.created.json"] == "applied"
    assert statuses["session.created.json"] == "ignored"
    assert set(statuses.values()) <= {"applied", "skipped", "ignored"}
    assert row_counts(store)["webhook_events"] == len(EXAMPLE_FILES)


def test_created_then_updated_then_stale_update(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    assert post(client, f.envelope("user.created", f.user("user_a", 100, first_name="One")), "m1").json()["status"] == "applied"
    assert post(client, f.envelope("user.updated", f.user("user_a", 300, first_name="Three", role="admin")), "m2").json()["status"] == "applied"
    assert post(client, f.envelope("user.updated", f.user("user_a", 200, first_name="Two")), "m3").json()["status"] == "skipped"
    row = user_row(store, "user_a")
    assert row is not None
    assert (row["first_name"], row["role"], row["clerk_updated_at"]) == ("Three", "admin", 300)
    assert row["email"] == "user_a@example.com"


def test_duplicate_delivery_changes_nothing(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    event = f.envelope("user.created", f.user("user_d", 100))
    assert post(client, event, "msg_dup").json()["status"] == "applied"
    before = user_row(store, "user_d")
    second = post(client, event, "msg_dup")
    assert second.status_code == 200 and second.json()["status"] == "duplicate"
    assert user_row(store, "user_d") == before
    assert row_counts(store)["webhook_events"] == 1



def test_the_endpoint_url_with_a_trailing_slash_is_served_not_redirected(
        service: tuple[httpx.Client, Store], db_url: str) -> None:
    """Review finding: ``/webhooks/clerk/`` (the URL entered in Clerk's Dashboard with a slash) got
    Starlette's 307, which Svix does not follow: every delivery failed until the URL was fixed. Served
    by ``serve``'s fast path and by :func:`webhook_routes` in an app's own routes alike."""
    from starlette.applications import Starlette

    from clerk_sync.integrations.starlette import webhook_routes

    client, store = service
    headers, body = f.signed(f.envelope("user.created", f.user("user_slash", 100)), "msg_slash")
    served = client.post("/webhooks/clerk/", content=body, headers=headers)
    assert (served.status_code, served.json()["status"]) == (200, "applied")
    assert user_row(store, "user_slash") is not None
    own = Starlette(routes=webhook_routes(build_processor(_settings(db_url))))
    with running(own) as url, httpx.Client(base_url=url) as mine:
        headers, body = f.signed(f.envelope("user.created", f.user("user_slash2", 100)), "msg_slash2")
        again = mine.post("/webhooks/clerk/", content=body, headers=headers)
        assert (again.status_code, again.json()["status"]) == (200, "applied")
        headers, body = f.signed(f.envelope("user.created", f.user("user_slash3", 100)), "msg_slash3")
        assert mine.post("/webhooks/clerk", content=body, headers=headers).json()["status"] == "applied"


def test_the_routers_refusals_answer_in_the_services_error_shape(service: tuple[httpx.Client, Store]) -> None:
    """A GET on the webhook path or an unknown path answered Starlette's plain text, where every other
    refusal of the service is ``{"error", "message"}`` JSON (review)."""
    client, _ = service
    wrong_method = client.get("/webhooks/clerk")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {"error": "method_not_allowed", "message": "GET /webhooks/clerk: Method Not Allowed"}
    missing = client.post("/webhooks/clerck", content=b"{}")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")

def test_delete_is_terminal_and_late_created_does_not_resurrect(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    post(client, f.envelope("user.deleted", f.deleted("user", "user_z"), 1_700_000_000), "d1")
    late = post(client, f.envelope("user.created", f.user("user_z", 1_800_000_000_000)), "c1")
    assert late.json()["status"] == "skipped"
    row = user_row(store, "user_z")
    assert row is not None and row["deleted_at"] is not None and row["email"] is None


def test_membership_before_its_user_and_org_is_stored(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    r = post(client, f.envelope("organizationMembership.created", f.membership("orgmem_1", "org_1", "user_m", 10)), "mm1")
    assert r.json()["status"] == "applied"
    post(client, f.envelope("user.created", f.user("user_m", 5)), "mm2")
    with store.connect() as conn:
        mem = conn.execute(sa.select(organization_memberships)).mappings().one()
    assert (mem["organization_clerk_id"], mem["user_clerk_id"], mem["deleted_at"]) == ("org_1", "user_m", None)


def test_user_deletion_cascades_to_memberships_in_either_order(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    post(client, f.envelope("organizationMembership.created", f.membership("orgmem_a", "org_1", "user_c", 10)), "c1")
    post(client, f.envelope("user.deleted", f.deleted("user", "user_c")), "c2")
    post(client, f.envelope("organizationMembership.created", f.membership("orgmem_b", "org_2", "user_c", 10)), "c3")
    with store.connect() as conn:
        alive = conn.execute(sa.select(organization_memberships.c.clerk_id).where(organization_memberships.c.deleted_at.is_(None))).all()
    assert alive == []


def test_unknown_event_type_is_recorded_and_acknowledged(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    r = post(client, f.envelope("brandNew.thing", {"id": "x"}), "u1")
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    with store.connect() as conn:
        assert conn.execute(sa.select(webhook_events.c.status)).scalar_one() == "ignored"


def test_shape_error_is_stored_failed_and_replayable(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    broken = f.membership("orgmem_x", "org_1", "user_1", 10)
    del broken["public_user_data"]
    r = post(client, f.envelope("organizationMembership.created", broken), "bad1")
    assert r.status_code == 200 and r.json()["status"] == "failed"
    report = replay_deliveries(store)
    assert report.by_status == {"failed": 1}
    fixed = f.envelope("organizationMembership.created", f.membership("orgmem_x", "org_1", "user_1", 10))
    with store.transaction() as w:  # an operator repairs the stored payload, then replays
        w.conn.execute(webhook_events.update().values(payload=fixed))
    assert replay_deliveries(store).by_status == {"applied": 1}
    with store.connect() as conn:
        ev = conn.execute(sa.select(webhook_events)).mappings().one()
    assert (ev["status"], ev["attempts"], ev["last_error"]) == ("applied", 3, None)
    assert row_counts(store)["organization_memberships"] == 1


def _bad_requests() -> list[tuple[str, dict[str, str], bytes, int]]:
    now = int(time.time())
    good = f.body_of(f.envelope("user.created", f.user("user_bad", 1)))
    signed, _ = f.signed(good, "msg_bad")
    cases = [
        ("no-headers", {}, good, 400),
        ("missing-signature", {"svix-id": "m", "svix-timestamp": str(now)}, good, 400),
        ("forged-signature", {**signed, "svix-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}, good, 401),
        ("garbage-signature", {**signed, "svix-signature": "garbage"}, good, 401),
        ("stale", f.signed(good, "msg_old", timestamp=now - 3600)[0], good, 401),
        ("wrong-secret", f.signed(good, "msg_ws", secret="whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")[0], good, 401),
        ("tampered", signed, good.replace(b"user_bad", b"user_evil"), 401),
        ("not-json", f.signed(b"not json", "msg_nj")[0], b"not json", 400),
        ("not-envelope", f.signed(b'{"hello":1}', "msg_ne")[0], b'{"hello":1}', 400),
    ]
    other = json.loads(good)
    other["instance_id"] = "ins_someone_else"
    body = json.dumps(other).encode()
    cases.append(("wrong-instance", f.signed(body, "msg_wi")[0], body, 403))
    big = b'{"type":"user.created","data":{},"pad":"' + b"a" * (1024 * 1024) + b'"}'
    cases.append(("too-large", f.signed(big, "msg_big")[0], big, 413))
    return cases


_BAD_CASES = [c[0] for c in _bad_requests()]


@pytest.mark.parametrize("case", _BAD_CASES)
def test_bad_input_is_refused_and_writes_nothing(service: tuple[httpx.Client, Store], case: str) -> None:
    # Signed when the test runs, not at collection: a long suite must not turn them into stale ones.
    _, headers, body, status = next(c for c in _bad_requests() if c[0] == case)
    client, store = service
    response = client.post("/webhooks/clerk", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert set(row_counts(store).values()) == {0}


def test_oversized_chunked_body_is_refused_while_streaming(service: tuple[httpx.Client, Store]) -> None:
    client, store = service

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"a" * 65536

    response = client.post("/webhooks/clerk", content=chunks(), headers={"svix-id": "m", "svix-timestamp": "1", "svix-signature": "v1,x"})
    assert response.status_code == 413
    assert set(row_counts(store).values()) == {0}


def test_database_down_answers_503_and_writes_nothing(tmp_path: Path) -> None:
    settings = _settings("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1")
    processor = build_processor(settings)
    with running(create_app(settings, processor)) as url, httpx.Client(base_url=url) as client:
        r = post(client, f.envelope("user.created", f.user("user_down", 1)), "msg_down")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"] == "store_unavailable"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"] == "down"
        # review: the public 503 carried the driver's error (host, port, role names)
        assert "127.0.0.1" not in ready.text and "nowhere" not in ready.text and "postgres" not in ready.text
        assert client.get("/healthz").status_code == 200
    processor.store.dispose()


def test_readyz_reports_pending_migrations(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    settings = _settings(url)
    app = create_app(settings)
    with running(app) as base, httpx.Client(base_url=base) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["migrations_current"] is False
        engine = create_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        assert client.get("/readyz").json() == {"database": "ok", "migrations_current": True}


def test_metrics_count_events_by_type_and_status(service: tuple[httpx.Client, Store]) -> None:
    client, _ = service
    post(client, f.envelope("user.created", f.user("user_metrics", 1)), "mx1")
    post(client, f.envelope("user.created", f.user("user_metrics", 1)), "mx1")
    text = client.get("/metrics").text
    assert 'clerk_sync_webhook_events_total{status="applied",type="user.created"} 1.0' in text
    assert 'clerk_sync_webhook_events_total{status="duplicate",type="user.created"} 1.0' in text
    assert "clerk_sync_webhook_seconds_bucket" in text


def test_missing_secret_fails_at_start_up_naming_the_variable(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    with pytest.raises(ConfigError, match="CLERK_WEBHOOK_SIGNING_SECRET"):
        build_processor(settings)
    bad = Settings.from_env({"CLERK_WEBHOOK_SECRET": "not-a-whsec"})
    with pytest.raises(ConfigError, match="whsec_"):
        build_processor(bad)


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [
        # longer than the column: dropped, the rest applied (PostgreSQL used to refuse, SQLite to keep it)
        (lambda u: u.update(first_name="x" * 300), "applied", "data.first_name dropped: 300 characters"),
        # JSONB refuses \\u0000: replaced by U+FFFD on both stores, applied at once
        (lambda u: u.update(unsafe_metadata={"note": "nul\u0000byte"}), "applied", "NUL replaced"),
        # a version that does not fit BIGINT: the event's timestamp orders it instead (it used to be failed)
        (lambda u: u.update(updated_at=10**20), "applied", "is not a number of milliseconds: the event's timestamp"),
        # an id no column can hold: the event cannot be stored against a row, kept as failed
        (lambda u: u.update(id="user_" + "x" * 80), "failed", "Clerk ids have at most 64"),
    ],
    ids=["too-long", "nul-escape", "bigint-overflow", "id-too-long"],
)
def test_values_no_column_can_hold_are_decided_before_the_database(
    service: tuple[httpx.Client, Store], mutate: Any, status: str, reason: str
) -> None:
    client, store = service
    data = f.user("user_poison", 5, email="secret.person@example.com")
    mutate(data)
    r = post(client, f.envelope("user.updated", data), "msg_poison")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == status
    assert "secret.person" not in r.text
    with store.connect() as conn:
        ev = conn.execute(sa.select(webhook_events.c.status, webhook_events.c.last_error)).one()
    assert ev.status == status
    assert reason in (ev.last_error or "")
    assert "secret.person" not in (ev.last_error or "")
    assert post(client, f.envelope("user.updated", data), "msg_poison").json()["status"] == "duplicate"


def test_non_finite_timestamp_is_a_payload_error(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    body = f.body_of(f.envelope("user.created", f.user("user_nan", 1))).replace(b'"timestamp":', b'"timestamp":NaN,"x":')
    headers, _ = f.signed(body, "msg_nan")
    r = client.post("/webhooks/clerk", content=body, headers=headers)
    assert r.status_code == 400
    assert set(row_counts(store).values()) == {0}


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_replay_of_a_still_refused_delivery_records_it_and_goes_on(service: tuple[httpx.Client, Store]) -> None:
    client, store = service
    # Every value is checked before the database sees it, so only a table narrower than ours (an app
    # altered it) still makes PostgreSQL refuse one: the delivery is kept as failed, not retried forever.
    with store.transaction() as w:
        w.conn.execute(sa.text("ALTER TABLE users ALTER COLUMN first_name TYPE varchar(3)"))
    too_long = f.user("user_long", 5, first_name="Grace")
    r = post(client, f.envelope("user.updated", too_long), "msg_long")
    assert r.status_code == 200 and r.json()["status"] == "failed"
    broken = f.membership("orgmem_r", "org_1", "user_1", 10)
    del broken["public_user_data"]
    post(client, f.envelope("organizationMembership.created", broken), "msg_shape")
    report = replay_deliveries(store)
    assert report.by_status == {"failed": 2}
    with store.connect() as conn:
        rows = conn.execute(sa.select(webhook_events.c.svix_id, webhook_events.c.attempts, webhook_events.c.last_error)).all()
    assert {row.svix_id: row.attempts for row in rows} == {"msg_long": 2, "msg_shape": 2}
    assert "StringDataRightTruncation" in {row.svix_id: row.last_error for row in rows}["msg_long"]
