"""``doctor`` on MySQL/MariaDB: the webhook body limit against the server's ``max_allowed_packet``."""

from __future__ import annotations

import pytest

from tests import factories as f


@pytest.mark.parametrize("db_url", ["mariadb"], indirect=True)
def test_doctor_fails_a_body_limit_the_servers_packet_cannot_carry(db_url: str) -> None:
    """Review: with CLERK_SYNC_MAX_BODY_BYTES above MariaDB's max_allowed_packet, a signed delivery that large was
    dropped with the connection (2006 "gone away", read as an outage): 503 on every retry, never stored. doctor
    says so before it happens, with the two ways out."""
    from clerk_sync.cli.doctor import run_checks
    from clerk_sync.config import Settings

    def body_line(**extra: str) -> tuple[str, str]:
        settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": f.SECRET, **extra})
        (check,) = [c for c in run_checks(settings) if c.name == "body limit"]
        return check.status, check.detail

    status, detail = body_line(CLERK_SYNC_MAX_BODY_BYTES=str(1 << 40))
    assert status == "fail" and "max_allowed_packet" in detail and "Lower CLERK_SYNC_MAX_BODY_BYTES" in detail, detail
    assert body_line()[0] == "ok"  # the default 1 MiB
