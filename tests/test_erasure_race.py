"""An erasure waits for the inbox writes in flight, then searches what they stored (review): a session or
e-mail event names the user without writing the user's row, so its delivery takes no lock the erasure waits
on; one whose inbox row went in before the tombstone committed was kept whole after the erasure."""

from __future__ import annotations

import json
import threading
import time

import pytest
import sqlalchemy as sa

from clerk_sync.errors import StoreError
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.retention import ErasureReport, Retention
from clerk_sync.store import Store
from clerk_sync.tables import users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_retention import deliver

IP, MAIL = "203.0.113.77", "zenobia.secret@example.com"


def _session(user_id: str) -> dict[str, object]:
    return {"id": "sess_race", "object": "session", "user_id": user_id, "client_id": "client_1", "status": "active",
            "created_at": 1, "updated_at": 1, "expire_at": 9_999_999_999_999,
            "latest_activity": {"ip_address": IP, "city": "Zurich", "browser_name": "Firefox"}}


def _erased(store: Store, clerk_id: str) -> bool:
    with store.connect() as conn:
        return conn.execute(sa.select(users.c.email).where(users.c.clerk_id == clerk_id)).scalar() is None


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_a_delivery_in_flight_during_an_erasure_is_redacted_once_it_commits(
        db_url: str, verifier: WebhookVerifier) -> None:
    store, other = Store.from_url(db_url), Store.from_url(db_url)
    processor = WebhookProcessor(store, verifier)
    assert deliver(processor, f.envelope("user.created", f.user("user_z", 100, email=MAIL)), "u1") == "applied"
    results: list[ErasureReport | BaseException] = []

    def erase() -> None:
        try:
            results.append(Retention(other).erase_user("user_z", reason="DSR"))
        except BaseException as exc:  # (reported by the assertion below)
            results.append(exc)

    eraser = threading.Thread(target=erase)
    try:
        with store.transaction() as writer:  # the delivery: its inbox row in, whole (the user not gone yet)
            envelope = parse_envelope(f.body_of(f.envelope("session.created", _session("user_z"))))
            assert processor.apply_in(writer, "s1", envelope).status == "ignored"
            eraser.start()
            deadline = time.monotonic() + 30
            while not _erased(other, "user_z"):  # the erasure's own transaction has committed ...
                assert time.monotonic() < deadline and eraser.is_alive(), results
                time.sleep(0.02)
            # ... and it is waiting for this delivery, not done: it must not have searched the inbox yet
            time.sleep(0.3)
            assert eraser.is_alive(), results
        eraser.join(30)
        assert not eraser.is_alive()
        [report] = results
        assert isinstance(report, ErasureReport), report
        assert report.payloads_redacted == 2  # user.created, then the session once it committed
        with store.connect() as conn:
            payload = conn.execute(sa.select(webhook_events.c.payload).where(webhook_events.c.svix_id == "s1")).scalar()
        text = payload if isinstance(payload, str) else json.dumps(payload)
        assert IP not in text and "Zurich" not in text, text
    finally:
        if eraser.is_alive():
            eraser.join(30)
        store.dispose()
        other.dispose()


def test_an_erasure_the_inbox_is_held_from_says_what_to_do(db_url: str, verifier: WebhookVerifier,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait is bounded: past it, the erasure (committed) says so, and that running it again finishes."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite has one writer: no delivery is in flight during an erasure")
    import clerk_sync.retention as retention

    monkeypatch.setattr(retention, "_SETTLE_WAIT_S", 1)
    store, other = Store.from_url(db_url), Store.from_url(db_url)
    processor = WebhookProcessor(store, verifier)
    try:
        assert deliver(processor, f.envelope("user.created", f.user("user_h", 100, email=MAIL)), "u1") == "applied"
        with store.transaction() as writer:
            envelope = parse_envelope(f.body_of(f.envelope("session.created", _session("user_h"))))
            processor.apply_in(writer, "s1", envelope)
            with pytest.raises(retention.StoreError, match=r"user_h is erased, but a delivery in progress held the "
                                                           r"inbox past 1 s.*run the erasure again"):
                Retention(other).erase_user("user_h")
            assert _erased(other, "user_h")
        again = Retention(other).erase_user("user_h")
        assert again.payloads_redacted == 1  # the session, now committed
    finally:
        store.dispose()
        other.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_without_the_lock_tables_privilege_the_erasure_says_what_to_grant(db_url: str,
                                                                        verifier: WebhookVerifier) -> None:
    import uuid

    url = sa.engine.make_url(db_url)
    user = f"cs_nolock_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY 'pw'")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{url.database}`.* TO '{user}'@'%%'")
    limited = Store.from_url(url.set(username=user, password="pw").render_as_string(hide_password=False))
    try:
        processor = WebhookProcessor(limited, verifier)
        assert deliver(processor, f.envelope("user.created", f.user("user_p", 100, email=MAIL)), "u1") == "applied"
        with pytest.raises(StoreError, match=r"user_p is erased, but the wait for deliveries in progress failed.*"
                                            r"LOCK TABLES privilege"):
            Retention(limited).erase_user("user_p")
        assert _erased(limited, "user_p")
    finally:
        limited.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP USER '{user}'@'%%'")
        admin.dispose()
