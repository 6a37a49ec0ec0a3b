"""Adopter walkthrough, section 7: ``migrate --mapping`` added Deactivate's flag with no default, so every row
already there read NULL and ``WHERE is_active`` hid them all. It is added with ``DEFAULT TRUE`` now (the rows
stay active, as they were); doctor names the NULLs an earlier migrate left, and how to fix them."""

from __future__ import annotations

import sqlalchemy as sa

from clerk_sync.mapping import Deactivate, MappedTable, SchemaMapping, check_schema, migrate_schema
from clerk_sync.store import Store
from tests import factories as f
from tests.test_hooks import B, deliver


def test_migrate_adds_deactivates_flag_true_in_the_rows_already_there(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    legacy = sa.Table("walk_flags", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                      sa.Column("email", sa.String(320)))
    mapping = SchemaMapping(users=MappedTable("walk_flags", "clerk_user_id", {"email": "email"},
                                              on_delete=Deactivate("is_active"), link_by_email="email"))
    with engine.begin() as conn:
        legacy.create(conn)
        conn.execute(legacy.insert(), [{"email": "old@example.com"}, {"email": "kept@example.com"}])
        assert "added walk_flags.is_active" in migrate_schema(conn, mapping)
        assert conn.execute(sa.text("SELECT count(*) FROM walk_flags WHERE is_active")).scalar_one() == 2
        conn.execute(sa.text("UPDATE walk_flags SET is_active = FALSE WHERE email = 'kept@example.com'"))
        assert check_schema(conn, mapping) == []
    store = Store.from_url(db_url, mapping=mapping)
    assert deliver(store, f.envelope("user.created", f.user("user_old", B + 1000, email="old@example.com")),
                   f.envelope("user.created", f.user("user_kept", B + 1000, email="kept@example.com")),
                   f.envelope("user.created", f.user("user_new", B + 1000, email="new@example.com")),
                   f.envelope("user.updated", f.user("user_kept", B + 2000, email="kept@example.com"))) == [
        "applied"] * 4
    with engine.connect() as conn:
        flags = dict(conn.execute(sa.text("SELECT email, is_active FROM walk_flags")).all())
    # linked: as the app left it (the deactivation it made stays); new: active
    assert {k: bool(v) for k, v in flags.items()} == {"old@example.com": True, "kept@example.com": False,
                                                      "new@example.com": True}
    with engine.begin() as conn:  # an earlier migrate's NULLs: doctor says so, and how to fix them
        conn.execute(sa.text("INSERT INTO walk_flags (email, is_active) VALUES ('null@example.com', NULL)"))
        warned = [p for _, p in check_schema(conn, mapping)]
    assert len(warned) == 1 and "walk_flags.is_active is NULL in 1 row(s)" in warned[0], warned
    store.dispose()
    engine.dispose()
