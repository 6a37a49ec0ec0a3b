"""A metadata path's object mapped into a JSON column, or into a column of unbounded text, is written as its
JSON on every store. MariaDB's ``JSON`` is a ``LONGTEXT`` to reflection: taken for a column of one scalar, the
object was written there as NULL (only a log line said so) while SQLite and PostgreSQL stored it (review)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from clerk_sync.mapping import Column, MappedTable, SchemaMapping
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table


def _decoded(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def test_an_object_into_a_json_or_text_column_is_kept_as_json_on_every_store(db_url: str) -> None:
    table = sa.Table("acc_json", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("prefs", sa.JSON),
                     sa.Column("tags", sa.Text), sa.Column("plan", sa.String(16)))
    mapping = SchemaMapping(users=MappedTable("acc_json", "clerk_user_id", {
        "prefs": Column("public_metadata.prefs"), "tags": Column("public_metadata.tags"),
        "plan": Column("public_metadata.plan", default="free")}))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        user = f.user("user_j", B + 1000)
        user["public_metadata"] = {"prefs": {"theme": "dark", "n": 1}, "tags": ["a", "b"], "plan": ["gold"]}
        assert deliver(store, f.envelope("user.created", user)) == ["applied"]
        with engine.connect() as conn:
            prefs, tags, plan = conn.exec_driver_sql("SELECT prefs, tags, plan FROM acc_json").one()
        assert (_decoded(prefs), _decoded(tags)) == ({"theme": "dark", "n": 1}, ["a", "b"])
        assert plan == "free"  # a list for a bounded text: no value of it, the Column's default
    finally:
        store.dispose()
        engine.dispose()
