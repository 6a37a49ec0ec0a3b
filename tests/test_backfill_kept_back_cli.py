"""``migrate --mapping --backfill`` (every face's command) says when rows were written without the user's own
columns, which the app's table refused, and does not record the backfill as having repaired the refusals before
it (``doctor --freshness`` keeps counting them): those rows still lack the user's values."""

from __future__ import annotations

import sqlalchemy as sa

from clerk_sync.cli.hooks import migrate_mapping
from clerk_sync.freshness import BACKFILLED
from clerk_sync.tables import audit_log
from tests import factories as f
from tests.test_hooks import B, deliver
from tests.test_mapfix_user_writable_kept_back import THEME, _accounts, _mapping, _user
from tests.test_mapping import _with_app_table


def _backfills(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(audit_log)
                                .where(audit_log.c.action == BACKFILLED)).scalar_one())


def test_a_backfill_that_kept_columns_back_says_so_and_repairs_nothing(db_url: str) -> None:
    table = _accounts("acc_kb_cli")
    mapping = _mapping("acc_kb_cli")
    store, engine = _with_app_table(db_url, table, mapping)
    try:
        assert deliver(store, f.envelope("user.created", _user(B + 1000, theme=THEME))) == ["applied"]
        done = migrate_mapping(store, mapping, backfill=True)
        assert done.refused == 1  # not written whole: the commands exit 1 (work left undone)
        assert not any("refused, not written" in line for line in done), list(done)
        assert any("1 row(s) written without the columns the user sets in Clerk" in line for line in done), list(done)
        assert _backfills(engine) == 0

        with engine.begin() as conn:  # the user's value fits once the app widens nothing: the user shortened it
            conn.execute(sa.update(table).values(theme=None))
        assert deliver(store, f.envelope("user.updated", _user(B + 2000, theme="dark"))) == ["applied"]
        done = migrate_mapping(store, mapping, backfill=True)
        assert not any("without the columns" in line for line in done) and done.refused == 0, list(done)
        assert _backfills(engine) == 1  # a whole backfill: the refusals before it are repaired
    finally:
        store.dispose()
        engine.dispose()
