"""SQLite ends the whole transaction when the disk fills during a write (SQLITE_FULL; an I/O error likewise),
savepoint included. During an app's mapped row that was taken for an app trigger's ``RAISE(ROLLBACK)``
(``AppTableRolledBack``): the delivery was written again without the app's tables and stored applied, its mapped
row refused for good with "a trigger rolled back the whole transaction". A full disk passes: the delivery is
answered 503 (Svix retries it), nothing stored, and once there is room the row is written whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.errors import StoreError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, migrate_schema
from clerk_sync.store import Store, create_engine
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f

B = 1_700_000_000_000
BIO = "x" * 400_000  # ~100 pages: the mapped row alone outgrows the room left
MAPPING = SchemaMapping(users=MappedTable("profiles", "clerk_user_id", {
    "email": "email", "bio": Column(compute=lambda values: BIO)}))


def test_a_full_disk_during_a_mapped_row_is_a_503_not_the_rows_refusal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'full.db'}"
    engine = create_engine(url)
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE profiles (id INTEGER PRIMARY KEY, email VARCHAR(320), bio TEXT)")
        migrate_schema(conn, MAPPING)
    room: list[int] = []  # pages the database may grow by (none given: no bound)

    def bounded(dbapi_conn: Any, record: Any) -> None:
        if room:
            pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages + room[0]}")

    sa.event.listen(engine, "connect", bounded)
    store = Store(engine, mapping=MAPPING)
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
    headers, body = f.signed(f.envelope("user.created", f.user("user_full", B, role="admin")), "msg_full")
    room.append(20)
    engine.dispose()  # (connections from here on are bounded)
    with pytest.raises(StoreError) as refused:
        processor.process(headers, body)
    assert "full" in str(refused.value), refused.value
    with store.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM webhook_events").scalar() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM users").scalar() == 0
    room.clear()
    engine.dispose()
    outcome = processor.process(headers, body)  # Svix's retry, with room again
    assert outcome.status == "applied" and not outcome.error, outcome
    with store.connect() as conn:
        assert conn.exec_driver_sql("SELECT length(bio) FROM profiles WHERE clerk_user_id = 'user_full'").scalar() \
            == len(BIO)
    store.dispose()
