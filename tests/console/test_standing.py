"""Review finding: a console cookie outlived the admin's deprovisioning or locking. The database's
standing (banned, deleted, deprovisioned, locked) is checked on every request, like the role."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from clerk_sync.errors import UserDeprovisioned, UserLocked
from clerk_sync.integrations.console._access import COOKIE, ConsoleAccess
from clerk_sync.store import Store
from clerk_sync.tables import users
from tests.console.conftest import admin_signed_in


@pytest.mark.parametrize(("column", "error"), [("deprovisioned", UserDeprovisioned), ("locked", UserLocked)])
def test_a_signed_in_admin_is_out_once_deprovisioned_or_locked(store: Store, column: str, error: type[Exception]) -> None:
    now = datetime.now(UTC)
    with store.transaction() as w:
        w.conn.execute(users.insert().values(
            clerk_id="user_adm", email_addresses=[], public_metadata={"role": "admin"}, private_metadata={},
            unsafe_metadata={}, role="admin", clerk_updated_at=1, created_at=now, updated_at=now))
    access = ConsoleAccess(store, operator_token=None, authenticator=None, secret=b"k" * 32)
    cookie = admin_signed_in(access, "user_adm", "sess_adm")
    assert access.identify({}, {COOKIE: cookie}).kind == "admin"
    with store.transaction() as w:
        w.conn.execute(users.update().values(**{column: True}))
    with pytest.raises(error):
        access.identify({}, {COOKIE: cookie})
