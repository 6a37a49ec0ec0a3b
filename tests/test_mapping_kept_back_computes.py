"""A mapped row refused for a value the user wrote is written again without the user's own columns: first the
sourced ones alone, so a computed column (an ``is_admin`` from the role) still lands; the computes are left out
too only when that is refused as well (a compute that raised). Review of the kept-back fix: every compute was
left out with the user's columns, so a demotion never reached a computed ``is_admin``."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from clerk_sync.mapping import Column, MappedTable, SchemaMapping
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table

THEME = "t" * 40  # longer than the app's VARCHAR(32)


def _user(version: int, *, theme: str, role: str) -> dict[str, Any]:
    user = f.user("user_c1", version)
    user["public_metadata"] = {"role": role}
    user["unsafe_metadata"] = {"theme": theme}
    return user


def _table(name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("clerk_user_id", sa.String(64), unique=True),
                    sa.Column("is_admin", sa.Boolean), sa.Column("badge", sa.String(16)),
                    sa.Column("theme", sa.String(32)))


def _is_admin(user: dict[str, Any]) -> bool:
    return bool((user.get("public_metadata") or {}).get("role") == "admin")


def _badge(user: dict[str, Any]) -> str:
    if len((user.get("unsafe_metadata") or {}).get("theme", "")) > 32:
        raise ValueError("no badge for this theme")
    return "gold"


def test_a_computed_admin_flag_lands_beside_a_refused_user_value(db_url: str) -> None:
    table = _table("acc_kbc")
    mapping = SchemaMapping(users=MappedTable("acc_kbc", "clerk_user_id", {
        "is_admin": Column(compute=_is_admin), "theme": Column("unsafe_metadata.theme")}))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        assert deliver(store, f.envelope("user.created", _user(B + 1000, theme="dark", role="admin"))) == ["applied"]
        assert deliver(store, f.envelope("user.updated", _user(B + 2000, theme=THEME, role="admin"))) == ["applied"]
        assert deliver(store, f.envelope("user.updated", _user(B + 3000, theme=THEME, role="member"))) == ["applied"]
        with engine.connect() as conn:
            row = conn.execute(sa.select(table.c.is_admin, table.c.theme)).one()
        assert (bool(row.is_admin), row.theme) == (False, "dark")  # demoted; the refused theme kept back
    finally:
        store.dispose()
        engine.dispose()


def test_a_compute_that_raises_is_left_out_too_and_the_rest_lands(db_url: str) -> None:
    table = _table("acc_kbr")
    mapping = SchemaMapping(users=MappedTable("acc_kbr", "clerk_user_id", {
        "is_admin": Column(compute=_is_admin), "badge": Column(compute=_badge),
        "theme": Column("unsafe_metadata.theme")}))
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        assert deliver(store, f.envelope("user.created", _user(B + 1000, theme="dark", role="member"))) == ["applied"]
        assert deliver(store, f.envelope("user.updated", _user(B + 2000, theme=THEME, role="admin"))) == ["applied"]
        with engine.connect() as conn:
            row = conn.execute(sa.select(table.c.is_admin, table.c.badge, table.c.theme)).one()
        # the badge's compute raised: left out with the computes, so the promotion's flag is kept back too (the
        # step before it could not write the row); the theme and badge keep their earlier values
        assert (bool(row.is_admin), row.badge, row.theme) == (False, "gold", "dark")
        assert mapping.user_writable(next(iter(mapping.tables))) == [["theme"], ["is_admin", "badge", "theme"]]
    finally:
        store.dispose()
        engine.dispose()
