"""Audit details every store keeps alike, on SQLite, PostgreSQL and MariaDB: NaN, infinities and nesting
MariaDB's JSON_VALID rejects are refused when recorded, so no row can later block an erasure of the people it
names (SQLite and MariaDB stored NaN as text no JSON reader accepts; MariaDB's audit trigger refused every
redaction of a row nested 32 levels deep)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.auth.audit import AuditEntry, record_audit
from clerk_sync.errors import StoreError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.tables import audit_log
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f

ANN = "ann@example.com"


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


def _sync_ann(store: Store, verifier: WebhookVerifier) -> None:
    headers, body = f.signed(f.envelope("user.created", f.user("user_ann", 100, email=ANN)), "msg_ann")
    assert WebhookProcessor(store, verifier).process(headers, body).status == "applied"


def _audit(store: Store, details: dict[str, Any]) -> None:
    with store.transaction() as w:
        record_audit(w, AuditEntry("app.profile_changed", "user_admin", "user_ann", details=details))


def _details(store: Store) -> list[Any]:
    """The details of the rows these tests record (not the erasure's own)."""
    a = audit_log
    with store.connect() as conn:
        query = sa.select(a.c.details).where(a.c.action == "app.profile_changed").order_by(a.c.id)
        return list(conn.execute(query).scalars())


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused_and_erasure_still_works(store: Store, verifier: WebhookVerifier,
                                                                number: float) -> None:
    _sync_ann(store, verifier)
    with pytest.raises(ValueError, match="NaN or infinite"):
        _audit(store, {"note": f"contact {ANN}", "score": {"values": [1.0, number]}})
    assert _details(store) == []
    _audit(store, {"note": f"contact {ANN}", "score": 1.5})
    Retention(store).erase_user("user_ann")
    assert _details(store) == [{"score": 1.5, "redacted": True}]


def test_details_nested_deeper_than_mariadb_validates_are_refused(store: Store, verifier: WebhookVerifier) -> None:
    _sync_ann(store, verifier)
    for levels in (31, 40, 5000):  # (the details object is one level more)
        with pytest.raises(ValueError, match="deeper than 30 levels"):
            _audit(store, {"note": f"contact {ANN}", "tree": _nested(levels)})
    assert _details(store) == []
    _audit(store, {"note": f"contact {ANN}", "tree": _nested(29)})  # 30 levels in all: kept, and redactable
    Retention(store).erase_user("user_ann")
    assert _details(store) == [{"tree": _nested(29), "redacted": True}]


@pytest.mark.parametrize("kind", ["nan", "deep"])
def test_a_row_an_earlier_release_stored_unreadable_is_redacted_to_the_marker(store: Store, verifier: WebhookVerifier,
                                                                            kind: str) -> None:
    """Rows recorded before the refusal (written here as those releases did, raw): SQLite's guard failed
    "malformed JSON" on NaN, MariaDB's refused both (its JSON_VALID is false), so every erasure of Ann rolled
    back. Migration 0019 lets such a row become the marker alone; nothing else may be written to it."""
    _sync_ann(store, verifier)
    if kind == "nan" and store.dialect == "postgresql":
        pytest.skip("PostgreSQL's json refused NaN when it was written")
    extra = '"score": NaN' if kind == "nan" else f'"tree": {json.dumps(_nested(31))}'
    with store.transaction() as w:
        w.conn.execute(sa.text("INSERT INTO audit_log (action, actor_clerk_id, target_clerk_id, details, created_at) "
                               "VALUES ('app.profile_changed', 'user_admin', 'user_ann', :details, :at)"),
                       {"details": f'{{"note": "contact {ANN}", "keep": 1, {extra}}}', "at": w.now})
    if store.dialect != "postgresql":  # anything but the marker alone is still refused
        with pytest.raises(StoreError, match="append-only"), store.transaction() as w:
            w.conn.execute(audit_log.update().values(details={"keep": 2, "redacted": True}))
    Retention(store).erase_user("user_ann")
    assert _details(store) == [{"redacted": True}]
