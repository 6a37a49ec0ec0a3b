"""A value the user writes in Clerk (``unsafe_metadata``, a name) that the app's column refuses no longer
freezes the user's whole mapped row: the row is written again without the columns the user can set, so the
admin's columns (role, ban, a plan) still land, and the delivery's ``last_error`` names what was kept back."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from clerk_sync.mapping import Column, MappedTable, SchemaMapping
from clerk_sync.outbox import REFUSAL_NOTE
from clerk_sync.tables import webhook_events
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapping import _with_app_table

THEME = "t" * 40  # the user's own value, longer than the app's VARCHAR(32)


def _accounts(name: str, *, theme_nullable: bool = True) -> sa.Table:
    return sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("clerk_user_id", sa.String(64), unique=True),
                    sa.Column("name", sa.String(200)), sa.Column("role", sa.String(32)),
                    sa.Column("plan", sa.String(32)), sa.Column("banned", sa.Boolean),
                    sa.Column("theme", sa.String(32), nullable=theme_nullable))


def _mapping(name: str) -> SchemaMapping:
    return SchemaMapping(users=MappedTable(name, "clerk_user_id", {
        "name": "full_name", "role": Column("public_metadata.role", default="member"),
        "plan": Column("public_metadata.plan"), "banned": "banned", "theme": Column("unsafe_metadata.theme")}))


def _user(version: int, *, theme: str, role: str = "admin", banned: bool = False, first: str = "Ada",
          clerk_id: str = "user_kb") -> dict[str, Any]:
    user = f.user(clerk_id, version, first_name=first, banned=banned)
    user["public_metadata"] = {"role": role, "plan": "gold"}
    user["unsafe_metadata"] = {"theme": theme}
    return user


def _row(engine: sa.Engine, table: sa.Table) -> tuple[Any, ...] | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(table.c.name, table.c.role, table.c.plan, table.c.banned, table.c.theme)).first()
    return None if row is None else tuple(row)


def _last_errors(engine: sa.Engine) -> list[str | None]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(webhook_events.c.last_error).order_by(webhook_events.c.id)).scalars())


def test_a_value_the_user_writes_never_holds_back_a_ban_or_a_demotion(db_url: str) -> None:
    """Fixed: on PostgreSQL and MariaDB the 40-character theme refused the whole mapped row, so the ban and the
    demotion the admin made next never reached ``accounts`` (role admin, banned false), on every event and every
    ``--backfill``; SQLite stored the overlong value (its VARCHAR has no length), so the stores disagreed."""
    table = _accounts("acc_kb")
    store, engine = _with_app_table(db_url, table, _mapping("acc_kb"))
    try:
        assert deliver(store, f.envelope("user.created", _user(B + 1000, theme="dark"))) == ["applied"]
        assert _row(engine, table) == ("Ada Lovelace", "admin", "gold", False, "dark")
        # The user writes an overlong theme and a new name; then the admin bans and demotes them.
        assert deliver(store, f.envelope("user.updated", _user(B + 2000, theme=THEME, first="Eve"))) == ["applied"]
        assert _row(engine, table) == ("Ada Lovelace", "admin", "gold", False, "dark")  # the user's columns kept
        assert deliver(store, f.envelope("user.updated", _user(B + 3000, theme=THEME, first="Eve", role="viewer",
                                                               banned=True))) == ["applied"]
        assert _row(engine, table) == ("Ada Lovelace", "viewer", "gold", True, "dark")  # the admin's columns land
        errors = _last_errors(engine)
        assert errors[0] is None
        for error in errors[1:]:
            assert error is not None and REFUSAL_NOTE in error
            assert "acc_kb.theme" in error  # the column that refused, named on every store
            assert "without the columns the user can set in Clerk (name, theme)" in error, error
            assert THEME not in error  # never the value
        # The user shortens the theme: everything lands again, no refusal
        assert deliver(store, f.envelope("user.updated", _user(B + 4000, theme="light", first="Eve", role="viewer",
                                                               banned=True))) == ["applied"]
        assert _row(engine, table) == ("Eve Lovelace", "viewer", "gold", True, "light")
        assert _last_errors(engine)[-1] is None
    finally:
        store.dispose()
        engine.dispose()


def test_a_new_user_with_a_refused_value_gets_its_row_without_it(db_url: str) -> None:
    """An insert: the row is written without the user's columns (NULL there); when a left-out column is NOT NULL
    the insert cannot be written without it, and the row is refused as before."""
    table = _accounts("acc_kb_new")
    store, engine = _with_app_table(db_url, table, _mapping("acc_kb_new"))
    strict = _accounts("acc_kb_strict", theme_nullable=False)
    store2, engine2 = _with_app_table(db_url, strict, _mapping("acc_kb_strict"))
    try:
        assert deliver(store, f.envelope("user.created", _user(B + 1000, theme=THEME, banned=True))) == ["applied"]
        assert _row(engine, table) == (None, "admin", "gold", True, None)
        assert deliver(store2, f.envelope("user.created", _user(B + 1000, theme=THEME, banned=True,
                                                                clerk_id="user_kb2"))) == ["applied"]
        assert _row(engine2, strict) is None
        error = _last_errors(engine2)[-1]
        assert error is not None and "acc_kb_strict.theme" in error and "without the columns" not in error
    finally:
        store.dispose()
        engine.dispose()
        store2.dispose()
        engine2.dispose()


def test_a_backfill_writes_the_admins_columns_of_a_row_the_users_value_refuses(db_url: str) -> None:
    """Fixed: ``migrate --mapping --backfill`` refused the frozen row again for as long as the user kept the
    value (the ban never reached the app's table)."""
    table = _accounts("acc_kb_bf")
    mapping = _mapping("acc_kb_bf")
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        assert deliver(store, f.envelope("user.created", _user(B + 1000, theme="dark"))) == ["applied"]
        with engine.begin() as conn:  # the row as a release before this fix left it: the ban never landed
            conn.execute(sa.update(webhook_events).values(last_error=None))
        assert deliver(store, f.envelope("user.updated", _user(B + 2000, theme=THEME, banned=True))) == ["applied"]
        with engine.begin() as conn:
            conn.execute(table.update().values(banned=False, role="admin"))
        counts = mapping.backfill(store)
        assert counts == {"users": 1, "kept_back": 1}, counts
        assert _row(engine, table) == ("Ada Lovelace", "admin", "gold", True, "dark")
    finally:
        store.dispose()
        engine.dispose()


def test_the_doctor_warns_of_a_users_text_mapped_into_a_bounded_column(db_url: str) -> None:
    """``doctor --mapping`` says before the first refusal that an ``unsafe_metadata`` path (any length, the
    user's) goes into a VARCHAR(32), and that a longer value is kept back; a TEXT column is fine."""
    from clerk_sync.mapping import check_schema

    table = _accounts("acc_kb_doc")
    mapping = _mapping("acc_kb_doc")
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        with engine.connect() as conn:
            problems = check_schema(conn, mapping)
        assert [(s, p.split(" holds")[0]) for s, p in problems] == [("warn", "acc_kb_doc.theme")], problems
        assert "32 characters" in problems[0][1] and "unsafe_metadata.theme" in problems[0][1]
    finally:
        store.dispose()
        engine.dispose()
