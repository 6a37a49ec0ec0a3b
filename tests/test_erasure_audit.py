"""Erasure reaches audit_log (migration 0013), on SQLite, PostgreSQL and MariaDB: an erased admin's rows lose
their IP, and rows whose details name them lose those keys; the Clerk ids stay. The database still refuses
every DELETE of audit_log and every UPDATE that is not such a redaction (raw SQL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.errors import StoreError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.tables import audit_log
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f

ANN = "ann.admin@example.com"  # the admin erased
ANN_IP, ANN_IP2, BOB_IP = "203.0.113.7", "2001:db8::7", "198.51.100.1"


def _audit(store: Store, *entries: AuditEntry) -> None:
    with store.transaction() as w:
        for entry in entries:
            record_audit(w, entry)


def _rows(store: Store) -> dict[str, dict[str, Any]]:
    """audit_log by action (each action once in these tests)."""
    with store.connect() as conn:
        return {r["action"]: dict(r) for r in conn.execute(sa.select(audit_log).order_by(audit_log.c.id)).mappings()}


def _sync(store: Store, verifier: WebhookVerifier, clerk_id: str, email: str) -> None:
    headers, body = f.signed(f.envelope("user.created", f.user(clerk_id, 100, email=email)), f"msg_{clerk_id}")
    assert WebhookProcessor(store, verifier).process(headers, body).status == "applied"


def test_erasing_an_admin_clears_their_ips_and_the_details_that_name_them(store: Store,
                                                                          verifier: WebhookVerifier) -> None:
    _sync(store, verifier, "user_ann", ANN)
    _sync(store, verifier, "user_bob", "bob@example.com")
    _audit(store,
           AuditEntry("role.changed", "user_ann", "user_x", details={"from": "user", "to": "admin"}, ip=ANN_IP),
           AuditEntry("impersonation.request", "user_bob", "user_x", impersonator="user_ann",
                      details={"method": "GET", "path": "/"}, ip=ANN_IP2),
           # Bob's action on Ann: his IP stays; the error quoting her address goes, the rest of details stays.
           AuditEntry("role.change_failed", "user_bob", "user_ann", ip=BOB_IP,
                      details={"to": "admin", "pending_id": 3, "error": "Clerk: ANN.Admin@example.com is locked",
                               "seen": {"tries": [1, 2], "ok": False, "note": None, "ratio": 0.5}}),
           AuditEntry("role.change_refused", None, "user_y",
                      details={"to": "admin", "reason": "user_ann, who asked for it, is no longer an admin"}),
           # Not Ann: another address that contains hers, another admin's row.
           AuditEntry("console.login", "user_bob", "user_bob", ip=BOB_IP,
                      details={"via": "console", "reason": "joann.admin@example.community asked, user_annie too"}))
    before = _rows(store)

    report = Retention(store).erase_user("user_ann", actor="user_bob", reason="DSR-7")

    rows = _rows(store)
    assert (rows["role.changed"]["ip"], rows["impersonation.request"]["ip"]) == (None, None)
    assert rows["role.changed"]["details"] == {"from": "user", "to": "admin"}  # names nobody: untouched
    assert rows["role.change_failed"]["ip"] == BOB_IP
    assert rows["role.change_failed"]["details"] == {
        "to": "admin", "pending_id": 3, "seen": {"tries": [1, 2], "ok": False, "note": None, "ratio": 0.5},
        "redacted": True}
    assert rows["role.change_refused"]["details"] == {"to": "admin", "redacted": True}
    assert rows["console.login"] == before["console.login"]
    for action in before:  # who did what to whom, and when, stays on record
        keep = ("id", "actor_clerk_id", "target_clerk_id", "impersonator_clerk_id", "created_at")
        assert [rows[action][k] for k in keep] == [before[action][k] for k in keep]
    assert report.audit_rows_redacted == 4
    erased = rows["user.erased"]
    assert erased["details"] == {"payloads_redacted": 1, "reason": "DSR-7", "audit_rows_redacted": 4}
    text = str([r for a, r in rows.items() if a != "console.login"]).lower()
    assert ANN not in text and ANN_IP not in text and ANN_IP2 not in text

    again = Retention(store).erase_user("user_ann", actor="user_bob", reason="DSR-7")  # idempotent
    assert again.audit_rows_redacted == 0


# Statements the database must refuse on a row of audit_log, whoever runs them (raw SQL; :d is JSON text).
REFUSED = [
    ("DELETE FROM audit_log", {}),
    ("UPDATE audit_log SET action = 'nothing.happened'", {}),
    ("UPDATE audit_log SET actor_clerk_id = 'user_someone_else'", {}),
    ("UPDATE audit_log SET actor_clerk_id = NULL", {}),
    ("UPDATE audit_log SET target_clerk_id = 'user_someone_else'", {}),
    ("UPDATE audit_log SET impersonator_clerk_id = 'user_ann'", {}),
    ("UPDATE audit_log SET created_at = :t", {"t": datetime(2020, 1, 1, tzinfo=UTC)}),
    ("UPDATE audit_log SET id = id + 100", {}),
    ("UPDATE audit_log SET ip = '10.0.0.1'", {}),
    ("UPDATE audit_log SET ip = NULL, action = 'nothing.happened'", {}),
    ("UPDATE audit_log SET details = :d", {"d": '{"to": "admin"}'}),  # a key dropped, unmarked
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": false}'}),
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": 1}'}),
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": "true"}'}),
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true, "to": "owner"}'}),  # a value changed
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true, "to": "Admin"}'}),  # (by case only)
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true, "to": "admin", "by": "x"}'}),  # a key added
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true, "pending_id": "3"}'}),  # a type changed
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true, "seen": {"tries": [1]}}'}),  # nested, cut
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true, "to": "admin", "to": "owner"}'}),  # twice
    ("UPDATE audit_log SET details = :d", {"d": '[{"redacted": true}]'}),
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true, "redacted": "forged"}'}),
    # a key twice, once JSON-escaped ("\u0074o" is "to"): readers take the last (review, migration 0014)
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true, "to": "admin", "\\u0074o": "owner"}'}),
]
# ... and the redactions it lets through, in this order (each on the row as the one before left it).
ALLOWED = [
    ("UPDATE audit_log SET ip = NULL", {}),
    ("UPDATE audit_log SET details = :d", {"d": '{"to": "admin", "seen": {"tries": [1, 2]}, "redacted": true}'}),
    ("UPDATE audit_log SET details = :d", {"d": '{"redacted": true}'}),
]


def _statement(store: Store, sql: str) -> sa.TextClause:
    if store.engine.dialect.name == "postgresql":
        sql = sql.replace(":d", "CAST(:d AS jsonb)")
    return sa.text(sql)


def _one_row(store: Store) -> None:
    _audit(store, AuditEntry("role.change_failed", "user_bob", "user_ann", ip=BOB_IP,
                             details={"to": "admin", "pending_id": 3, "error": ANN, "seen": {"tries": [1, 2]}}))


@pytest.mark.parametrize(("sql", "params"), REFUSED, ids=[f"{s[:40]} {p}" for s, p in REFUSED])
def test_the_database_refuses_every_change_but_a_redaction(store: Store, sql: str, params: dict[str, Any]) -> None:
    _one_row(store)
    before = _rows(store)
    with pytest.raises(StoreError, match="append-only"), store.transaction() as w:
        w.conn.execute(_statement(store, sql), params)
    assert _rows(store) == before


def test_the_database_lets_a_redaction_through(store: Store) -> None:
    _one_row(store)
    before = _rows(store)["role.change_failed"]
    for sql, params in ALLOWED:
        with store.transaction() as w:
            assert w.conn.execute(_statement(store, sql), params).rowcount == 1
    after = _rows(store)["role.change_failed"]
    assert (after["ip"], after["details"]) == (None, {"redacted": True})
    assert {k: v for k, v in after.items() if k not in ("ip", "details")} == \
        {k: v for k, v in before.items() if k not in ("ip", "details")}
    with pytest.raises(StoreError, match="append-only"), store.transaction() as w:  # nothing comes back
        w.conn.execute(_statement(store, "UPDATE audit_log SET details = :d"), {"d": '{"to": "admin"}'})


def test_downgrading_to_0012_restores_the_append_only_triggers_and_upgrading_brings_redaction_back(
        store: Store) -> None:
    _one_row(store)
    clear_ip = sa.text("UPDATE audit_log SET ip = NULL")
    migrations.downgrade(store.engine, "0012")
    with pytest.raises(StoreError, match="audit_log is append-only"), store.transaction() as w:
        w.conn.execute(clear_ip)
    migrations.upgrade(store.engine)
    assert migrations.is_current(store.engine)
    with store.transaction() as w:
        w.conn.execute(clear_ip)
    with pytest.raises(StoreError, match="append-only"), store.transaction() as w:
        w.conn.execute(sa.text("DELETE FROM audit_log"))
    assert _rows(store)["role.change_failed"]["ip"] is None


_COLUMNS_VALUES = ("audit_log (id, action, actor_clerk_id, details, ip, created_at) "
                   "VALUES (:id, 'nothing.happened', 'user_someone_else', '{}', '6.6.6.6', '2020-01-01 00:00:00')")
# Inserts that would put another row in place of row :id (review: SQLite's INSERT OR REPLACE deleted it without
# firing the DELETE trigger; migration 0014).
OVERWRITES = {
    "sqlite": ["INSERT OR REPLACE INTO " + _COLUMNS_VALUES, "REPLACE INTO " + _COLUMNS_VALUES,
               "INSERT INTO " + _COLUMNS_VALUES + " ON CONFLICT (id) DO UPDATE SET action = excluded.action"],
    "postgresql": ["INSERT INTO " + _COLUMNS_VALUES.replace("'{}'", "'{}'::jsonb")
                   + " ON CONFLICT (id) DO UPDATE SET action = excluded.action, ip = excluded.ip"],
    "mysql": ["REPLACE INTO " + _COLUMNS_VALUES,
              "INSERT INTO " + _COLUMNS_VALUES + " ON DUPLICATE KEY UPDATE action = VALUES(action)"],
}


def test_no_insert_replaces_an_audit_row(store: Store) -> None:
    _one_row(store)
    before = _rows(store)
    with store.connect() as conn:
        [row_id] = conn.execute(sa.select(audit_log.c.id)).scalars()
    for sql in OVERWRITES[store.engine.dialect.name]:
        with pytest.raises(StoreError, match="append-only"), store.transaction() as w:
            w.conn.execute(sa.text(sql), {"id": row_id})
        assert _rows(store) == before, sql
