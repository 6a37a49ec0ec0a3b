"""What is read as a transaction pooler reached without CLERK_SYNC_DB_TRANSACTION_POOLER (exit 2, its advice)."""

from __future__ import annotations

import pytest

from clerk_sync._db_errors import is_pooler_misconfigured


class _DriverError(Exception):
    def __init__(self, text: str, sqlstate: str | None) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("text", "sqlstate", "pooler"), [
    ('connection failed: FATAL:  unsupported startup parameter: options', None, True),
    ('FATAL:  unsupported startup parameter: options', "08P01", True),
    ('prepared statement "_pg3_0" already exists', "42P05", True),
    ('prepared statement "_pg3_1" does not exist', "26000", True),
    # Review: a row's value in the DETAIL line (a user's chosen text) read as the pooler's refusal
    ('duplicate key value violates unique constraint "accounts_name_key"\n'
     'DETAIL:  Key (name)=(unsupported startup parameter) already exists.', "23505", False),
    ('duplicate key value violates unique constraint "x"\nDETAIL:  Key (v)=("_pg3_0") already exists.', "23505",
     False),
])
def test_only_the_pooler_s_own_refusals_are_read_as_a_pooler(text: str, sqlstate: str | None, pooler: bool) -> None:
    assert is_pooler_misconfigured(_DriverError(text, sqlstate)) is pooler
