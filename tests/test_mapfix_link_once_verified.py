"""An unverified primary e-mail that an unlinked legacy row has is neither linked nor given a second row beside
it: the event that verifies the address (a change clerk-sync's own columns do not see) links the legacy row."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from clerk_sync.changes import Hook
from clerk_sync.mapping import MappedTable, SchemaMapping
from clerk_sync.outbox import REFUSAL_NOTE
from clerk_sync.tables import webhook_events
from tests import factories as f
from tests.test_hooks import B, deliver, jobs
from tests.test_mapping import _with_app_table


def _accounts(name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("legacy_id", sa.String(32)), sa.Column("email", sa.String(320)),
                    sa.Column("plan", sa.String(32)), sa.Column("name", sa.String(200)))


def _user(version: int, *, verified: bool, external_id: str | None = None) -> dict[str, Any]:
    user = f.user("user_lv", version, email="legacy@example.com", first_name="Lee")
    for address in user["email_addresses"]:
        address["verification"] = {"status": "verified" if verified else "unverified", "strategy": "email_code"}
    user["external_id"] = external_id
    return user


def _rows(engine: sa.Engine, table: sa.Table) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(table.c.id, table.c.plan, table.c.name,
                                                         sa.column("clerk_user_id")).order_by(table.c.id))]


def _errors(engine: sa.Engine) -> list[str | None]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(webhook_events.c.last_error).order_by(webhook_events.c.id)).scalars())


def test_an_unverified_address_links_the_legacy_row_once_clerk_verifies_it(db_url: str) -> None:
    """Fixed: a new row was inserted beside the legacy one; the verification event changed no column of
    clerk-sync's, and the user's row was found by Clerk id ever after: the legacy row (its plan) orphaned for
    good, silently. Now the first event is refused (counted, its last_error says why and what to do), and the
    verification links the legacy row, with no hook job (no contract column changed)."""
    table = _accounts("acc_lv")
    mapping = SchemaMapping(users=MappedTable("acc_lv", "clerk_user_id", {"name": "full_name"},
                                              link_by_email="email"))
    store, engine = _with_app_table(db_url, table, mapping, hooks=[Hook("seen", lambda change: None)])
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=7, email="Legacy@Example.com", plan="gold", name="Legacy"))
        assert deliver(store, f.envelope("user.created", _user(B + 1000, verified=False))) == ["applied"]
        assert _rows(engine, table) == [(7, "gold", "Legacy", None)]  # no second row
        (error,) = _errors(engine)
        assert error is not None and REFUSAL_NOTE in error and "not verified" in error
        assert "the event that verifies the address links it" in error and "@" not in error
        assert deliver(store, f.envelope("user.updated", _user(B + 2000, verified=True))) == ["applied"]
        assert _rows(engine, table) == [(7, "gold", "Lee Lovelace", "user_lv")]
        assert _errors(engine)[-1] is None
        assert [j["type"] for j in jobs(store)] == ["user.created"]  # the verification alone: no hook job
    finally:
        store.dispose()
        engine.dispose()


def test_an_external_id_set_after_a_refused_first_event_links_the_legacy_row(db_url: str) -> None:
    """The app sets the user's external id in Clerk after the first event (a migration script): with no row
    written for the user (the unverified address refused it), that event links the legacy row it names."""
    table = _accounts("acc_lx")
    mapping = SchemaMapping(users=MappedTable("acc_lx", "clerk_user_id", {"name": "full_name"},
                                              link_by_email="email", link_by_external_id="legacy_id"))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"id": 101, "legacy_id": "L-1", "email": "other@example.com", "plan": "free"},
                                          {"id": 102, "legacy_id": "L-2", "email": "legacy@example.com", "plan": "gold"}])
        assert deliver(store, f.envelope("user.created", _user(B + 1000, verified=False))) == ["applied"]
        assert [r[3] for r in _rows(engine, table)] == [None, None]
        assert deliver(store, f.envelope("user.updated", _user(B + 2000, verified=False, external_id="L-1"))) \
            == ["applied"]
        assert _rows(engine, table) == [(101, "free", "Lee Lovelace", "user_lv"), (102, "gold", None, None)]
    finally:
        store.dispose()
        engine.dispose()
