"""PostgreSQL's indexes on the Clerk ids inside a delivery's payload are cut to 191 characters (migrations
0008_console and 0015): a btree entry holds 2,704 bytes, and an uncut index refused a delivery with a long
id (503 for ever) and stopped an upgrade over an inbox that held one (review of the upgrade path, 4)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.store import create_engine
from tests.conftest import _PG_PROBLEM, PG_URL, pg_schema_url, require_server

pytestmark = pytest.mark.postgres

_PAYLOAD_INDEXES = ("ix_webhook_events_data_id", "ix_webhook_events_data_user_id", "ix_webhook_events_data_org_id",
                    "ix_webhook_events_data_owner_id")  # (the last: 0020's, cut from the start)


@pytest.fixture
def pg_engine() -> Iterator[sa.Engine]:
    """An empty private schema, not migrated."""
    require_server("PostgreSQL", PG_URL, _PG_PROBLEM, "CLERK_SYNC_REQUIRE_POSTGRES")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine = create_engine(pg_schema_url(schema))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _random(n: int) -> str:
    return "".join(uuid.uuid4().hex for _ in range(n // 32 + 1))[:n]


def _definitions(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"))
        return {name: definition for name, definition in rows if name in _PAYLOAD_INDEXES}


def _store_long_ids(engine: sa.Engine) -> None:
    """Deliveries as an older release stored them failed: ids of 6,000 random characters and an object."""
    payloads = [{"type": "user.updated", "data": {"id": "user_" + _random(6_000)}},
                {"type": "organizationMembership.updated",
                 "data": {"id": "orgmem_1", "organization": {"id": {"k": _random(5_000)}},
                          "public_user_data": {"user_id": "user_" + _random(4_000)}}},
                {"type": "session.revoked", "data": {"id": "sess_1", "user_id": "user_" + _random(5_000)}}]
    with engine.begin() as conn:
        for i, payload in enumerate(payloads):
            conn.execute(sa.text(
                "INSERT INTO webhook_events (svix_id, type, payload, status, attempts, received_at) "
                "VALUES (:svix_id, :type, CAST(:payload AS jsonb), 'failed', 1, now())"),
                {"svix_id": f"msg_{i}", "type": payload["type"], "payload": json.dumps(payload)})


def test_an_inbox_holding_long_ids_upgrades_to_head(pg_engine: sa.Engine) -> None:
    migrations.upgrade(pg_engine, "0007")
    _store_long_ids(pg_engine)
    migrations.upgrade(pg_engine)  # 0008 built the uncut indexes: ProgramLimitExceeded, the upgrade stopped
    definitions = _definitions(pg_engine)
    assert sorted(definitions) == sorted(_PAYLOAD_INDEXES)
    assert all("left" in d for d in definitions.values()), definitions


def test_0015_cuts_the_indexes_an_older_0008_built_uncut(pg_engine: sa.Engine) -> None:
    migrations.upgrade(pg_engine, "0014")
    with pg_engine.begin() as conn:  # as 0008 built them before this release
        for name, path, partial in (("ix_webhook_events_data_id", "-> 'data' ->> 'id'", False),
                                    ("ix_webhook_events_data_user_id",
                                     "-> 'data' -> 'public_user_data' ->> 'user_id'", True),
                                    ("ix_webhook_events_data_org_id", "-> 'data' -> 'organization' ->> 'id'", True)):
            conn.execute(sa.text(f"DROP INDEX {name}"))
            where = f" WHERE (payload {path}) IS NOT NULL" if partial else ""
            conn.execute(sa.text(f"CREATE INDEX {name} ON webhook_events ((payload {path})){where}"))
    assert not any("left" in d for d in _definitions(pg_engine).values())
    migrations.upgrade(pg_engine)
    assert all("left" in d for d in _definitions(pg_engine).values())
    _store_long_ids(pg_engine)  # refused by the uncut indexes
