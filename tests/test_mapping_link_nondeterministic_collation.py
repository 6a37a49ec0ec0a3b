"""PostgreSQL: a link column under a non-deterministic ICU collation (case and accents ignored) gave a new
``élodie@example.com`` the legacy row of ``elodie@example.com``, another person's account (and an external id
``abc`` the row of ``ABC``). Linking compares under ``COLLATE "C"`` now, doctor counts shared values the same
way, and warns of such a collation on a link column."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from clerk_sync.mapping import MappedTable, SchemaMapping, check_schema, migrate_schema
from clerk_sync.migrations import upgrade
from clerk_sync.store import Store
from tests import factories as f
from tests.conftest import pg_schema
from tests.test_hooks import B, deliver


@pytest.mark.postgres
def test_linking_compares_exactly_under_a_non_deterministic_collation() -> None:
    with pg_schema("coll_") as url:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            if conn.execute(sa.text("SELECT 1 FROM pg_collation WHERE collprovider = 'i' LIMIT 1")).first() is None:
                pytest.skip("this PostgreSQL has no ICU collations")
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
            conn.exec_driver_sql(f'CREATE COLLATION "{schema}".ai_ci (provider = icu, locale = \'und-u-ks-level1\', '
                                 "deterministic = false)")
            conn.exec_driver_sql("CREATE TABLE coll_accounts (id serial PRIMARY KEY, legacy_id varchar(40) COLLATE "
                                 "ai_ci, email varchar(320) COLLATE ai_ci, name varchar(80))")
            conn.exec_driver_sql("INSERT INTO coll_accounts (legacy_id, email, name) VALUES "
                                 "('ABC', 'elodie@example.com', 'Elodie'), (NULL, 'marie@example.com', 'Marie'), "
                                 "(NULL, 'marié@example.com', 'Marié')")
        upgrade(engine)
        mapping = SchemaMapping(users=MappedTable("coll_accounts", "clerk_user_id", {"email": "email"},
                                                  link_by_email="email", link_by_external_id="legacy_id"))
        with engine.begin() as conn:
            migrate_schema(conn, mapping)
            problems = check_schema(conn, mapping)
        # marie@ and marié@ are two addresses: none shared; the collation named on both link columns
        assert not [p for _, p in problems if "shared" in p], problems
        warned = sorted(p.split(" ", 1)[0] for s, p in problems if s == "warn" and "non-deterministic" in p)
        assert warned == ["coll_accounts.email", "coll_accounts.legacy_id"], problems
        store = Store.from_url(url, mapping=mapping)
        abc = f.user("user_x", B, email="x@example.com") | {"external_id": "abc"}
        assert deliver(store, f.envelope("user.created", f.user("user_e", B, email="élodie@example.com")),
                       f.envelope("user.created", abc),
                       f.envelope("user.created", f.user("user_m", B, email="marie@example.com"))) == ["applied"] * 3
        with engine.connect() as conn:
            rows = {r.name or r.email: r.clerk_user_id for r in conn.execute(sa.text(
                "SELECT clerk_user_id, email, name FROM coll_accounts"))}
        # the legacy rows of another person are not taken; the exact address still links
        assert rows == {"Elodie": None, "Marie": "user_m", "Marié": None, "élodie@example.com": "user_e",
                        "x@example.com": "user_x"}
        store.dispose()
        engine.dispose()


@pytest.mark.postgres
def test_linking_by_email_is_served_by_an_index_on_lower_email() -> None:
    """Review finding: the exact comparison under ``COLLATE "C"`` alone could not use the app's index on
    ``lower(email)`` (Django's and Rails' usual one): every new user's link scanned the whole table, in the
    webhook's transaction. The plain equality goes first again, the exact one filters what it finds."""
    with pg_schema("collix_") as url:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE ix_accounts (id serial PRIMARY KEY, email varchar(320), name text)")
            conn.exec_driver_sql("CREATE INDEX ix_accounts_lower_email ON ix_accounts (lower(email))")
            conn.exec_driver_sql("INSERT INTO ix_accounts (email) SELECT 'someone' || n || '@example.com' "
                                 "FROM generate_series(1, 2000) AS n")
            conn.exec_driver_sql("ANALYZE ix_accounts")
        upgrade(engine)
        mapping = SchemaMapping(users=MappedTable("ix_accounts", "clerk_user_id", {"email": "email"},
                                                  link_by_email="email"))
        with engine.begin() as conn:
            migrate_schema(conn, mapping)
        store = Store.from_url(url, mapping=mapping)
        seen: list[tuple[str, object]] = []

        def capture(conn: object, cursor: object, statement: str, parameters: object, context: object,
                    executemany: bool) -> None:
            if "FROM ix_accounts" in statement and 'COLLATE "C"' in statement and statement.startswith("SELECT"):
                seen.append((statement, parameters))

        sa.event.listen(store.engine, "before_cursor_execute", capture)
        assert deliver(store, f.envelope("user.created", f.user("user_ix", B, email="Someone7@example.com"))) == [
            "applied"]
        assert seen, "no link query was sent"
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a plan that can use the index does
            plan = "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {seen[0][0]}", seen[0][1]))  # type: ignore[arg-type]
            linked = conn.execute(sa.text("SELECT clerk_user_id FROM ix_accounts WHERE lower(email) = "
                                          "'someone7@example.com'")).scalar_one()
        assert "ix_accounts_lower_email" in plan, plan
        assert linked == "user_ix"
        store.dispose()
        engine.dispose()
