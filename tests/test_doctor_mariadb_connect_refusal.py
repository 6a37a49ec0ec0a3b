"""doctor on MariaDB for a user who may not use the database DATABASE_URL names (1044 at connect)."""

from __future__ import annotations

import pytest

from clerk_sync.cli import doctor
from clerk_sync.config import Settings
from tests.conftest import SECRET
from tests.test_least_privilege_roles import _mariadb


@pytest.mark.mariadb
def test_doctor_does_not_say_reached_for_a_database_this_user_may_not_use() -> None:
    """Not "reached, but a read was refused ... GRANT" for MariaDB's 1044 at connect (a review suspected it): the user never reached the
    database (no grant on it yet, or its name misspelled in DATABASE_URL); the advice is the database's name or the
    RUNBOOK's GRANT statements, as a delivery's error says."""
    with _mariadb() as made:  # the runtime user: no grant on the database yet
        settings = Settings.from_env({"DATABASE_URL": made.runtime_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
        verdict, said = doctor._database(settings)
    assert verdict == "fail", said
    assert "reached" not in said, said
    assert "1044" in said and "may not use database" in said and "DATABASE_URL" in said, said
