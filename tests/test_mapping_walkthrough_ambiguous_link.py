"""Adopter walkthrough, section 5: an ambiguous link was documented as a delivery kept ``failed``
(replayable), by ``LinkAmbiguous``'s docstring and doctor's warning. The delivery is stored ``applied``, the
app's row refused and counted; the way out is resolving the duplicates, then ``migrate --mapping ...
--backfill``: the texts say so."""

from __future__ import annotations

import sqlalchemy as sa

from clerk_sync.mapping import LinkAmbiguous, MappedTable, SchemaMapping, check_schema
from clerk_sync.tables import webhook_events
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table


def test_an_ambiguous_link_is_documented_as_the_applied_delivery_it_is_and_the_fix_is_a_backfill(db_url: str) -> None:
    legacy = sa.Table("walk_amb", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                      sa.Column("email", sa.String(320)))
    mapping = SchemaMapping(users=MappedTable("walk_amb", "clerk_user_id", {"email": "email"}, link_by_email="email"))
    store, engine = _with_app_table(db_url, legacy, mapping)
    with engine.begin() as conn:
        conn.execute(legacy.insert(), [{"email": "Bob@Example.com"}, {"email": "bob@example.com"}])
        warnings = [p for s, p in check_schema(conn, mapping) if s == "warn"]
    assert len(warnings) == 1, warnings
    assert "replayable" not in warnings[0] and "deliveries fail" not in warnings[0]
    assert "--backfill" in warnings[0] and "refused" in warnings[0]
    assert deliver(store, f.envelope("user.created", f.user("user_bob", B + 1000, email="bob@example.com"))) == [
        "applied"]
    with store.connect() as conn:
        status, error = conn.execute(sa.select(webhook_events.c.status, webhook_events.c.last_error)).one()
    assert status == "applied" and "rows without a Clerk id" in (error or "")
    assert "--backfill" in (error or "")
    doc = " ".join((LinkAmbiguous.__doc__ or "").split())
    assert "replayable" not in doc and "applied" in doc and "--backfill" in doc
    doc = " ".join((MappedTable.__doc__ or "").split())
    assert "fail the delivery" not in doc
    store.dispose()
    engine.dispose()
