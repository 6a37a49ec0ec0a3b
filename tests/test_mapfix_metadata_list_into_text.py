"""A metadata path whose value is a list or an object, mapped into a column of one scalar (text, number, flag):
the same on every store and every write path now, the Column's default (PostgreSQL stored a list as its array
literal ``{admin}``, SQLite refused the whole row, an object was refused on both)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from structlog.testing import capture_logs

from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.integrations._committer import ALONE, GroupCommitter
from clerk_sync.mapping import Column, MappedTable, SchemaMapping
from clerk_sync.tables import webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table


def _user(clerk_id: str, version: int, metadata: dict[str, Any], *, banned: bool = False) -> dict[str, Any]:
    user = f.user(clerk_id, version, banned=banned)
    user["public_metadata"] = metadata
    return user


def test_a_list_or_object_for_a_text_column_is_its_default_on_every_store_and_path(db_url: str) -> None:
    table = sa.Table("shaped", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("role", sa.String(64)),
                     sa.Column("tags", sa.Text), sa.Column("tags_json", sa.Text), sa.Column("banned", sa.Boolean))
    mapping = SchemaMapping(users=MappedTable("shaped", "clerk_user_id", {
        "role": Column("public_metadata.role", default="member"), "tags": Column("public_metadata.tags"),
        "tags_json": Column("public_metadata.tags", transform="json"), "banned": "banned"}))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        # one at a time: an admin had made the user an admin; then the role becomes a list, the tags an object
        assert deliver(store, f.envelope("user.created", _user("user_l1", B + 1000, {"role": "admin"}))) \
            == ["applied"]
        with capture_logs() as logs:
            assert deliver(store, f.envelope("user.updated", _user(
                "user_l1", B + 2000, {"role": ["admin"], "tags": {"a": 1}}, banned=True))) == ["applied"]
        # batched (PostgreSQL's one-statement path, the others' one by one)
        processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]))
        batch = [(f"msg_l{n}", parse_envelope(json.dumps(f.envelope("user.created", _user(
            f"user_l{n}", B + 1000, {"role": ["admin"], "tags": ["x", "y"]}))))) for n in (2, 3)]
        results = GroupCommitter(processor).write(batch)
        assert [(processor.apply_alone(*batch[i]) if r is ALONE else r).status for i, r in enumerate(results)] \
            == ["applied", "applied"]
        with engine.connect() as conn:
            rows = {r[0]: tuple(r[1:]) for r in conn.execute(sa.select(
                sa.column("clerk_user_id"), table.c.role, table.c.tags, table.c.tags_json, table.c.banned)
                .select_from(table))}
            errors = set(conn.execute(sa.select(webhook_events.c.last_error)).scalars())
        # role (VARCHAR): not '{admin}', not a frozen 'admin'; tags (TEXT, unbounded): its JSON text, as with
        # transform="json" (MariaDB's JSON columns are LONGTEXT to reflection)
        assert rows == {"user_l1": ("member", '{"a": 1}', '{"a": 1}', True),
                        "user_l2": ("member", '["x", "y"]', '["x", "y"]', False),
                        "user_l3": ("member", '["x", "y"]', '["x", "y"]', False)}, rows
        assert not any("the app's table refused" in (e or "") for e in errors), errors  # nothing refused
        noted = [e for e in logs if e["event"] == "mapped_value_not_scalar"]
        assert {(e["column"], e["kind"]) for e in noted} == {("role", "list")}
        assert all("transform='json'" in e["advice"] and e["clerk_id"] == "user_l1" for e in noted)
    finally:
        store.dispose()
        engine.dispose()
