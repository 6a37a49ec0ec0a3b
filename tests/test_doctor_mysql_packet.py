"""``doctor`` on MySQL/MariaDB: the webhook body limit against the server's ``max_allowed_packet``."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("db_url", ["mariadb"], indirect=True)
def test_a_body_the_doctor_allows_is_applied_however_its_text_is_escaped(db_url: str) -> None:
    """Review: the check allowed twice the body in max_allowed_packet, but JSON columns are written ASCII-escaped
    and escaped again by the driver (a body of raw non-ASCII text takes 3.5 times its size), and a hook job holds
    the change's values and previous values (twice that): a limit of 45 % of the packet (allowed before) let such
    a delivery drop the connection (503 on every retry, the ban never applied). The doctor fails that limit
    now, and bodies as large as the largest limit it allows, made of that text, are applied with a hook: a
    creation, then an update that replaces all of it (its job holds both)."""
    import sqlalchemy as sa

    from clerk_sync.changes import Hook
    from clerk_sync.cli.doctor import run_checks
    from clerk_sync.config import Settings
    from clerk_sync.ingest import WebhookProcessor
    from clerk_sync.store import Store
    from clerk_sync.tables import hook_jobs, users
    from clerk_sync.webhooks import WebhookVerifier

    store = Store.from_url(db_url, hooks=[Hook("crm", lambda change: None)])
    with store.connect() as conn:
        packet = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())

    def body_status(limit: int) -> str:
        settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": f.SECRET,
                                      "CLERK_SYNC_MAX_BODY_BYTES": str(limit)})
        (check,) = [c for c in run_checks(settings) if c.name == "body limit"]
        return check.status

    assert body_status(packet * 45 // 100) == "fail"
    allowed = (packet - 64 * 1024) // 7
    assert body_status(allowed) == "ok" and body_status(allowed + 1) == "fail"
    processor = WebhookProcessor(store, WebhookVerifier([f.SECRET]), max_body_bytes=allowed)

    def raw(event: dict[str, object]) -> bytes:  # as Clerk sends it: UTF-8, not ASCII-escaped
        return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()

    for n, (kind, letter, updated_at) in enumerate((("user.created", "é", 1), ("user.updated", "è", 2))):
        user = f.user("user_big", 1_800_000_000_000 + updated_at)
        user["banned"] = kind == "user.updated"
        user["unsafe_metadata"] = {"bio": ""}
        room = allowed - len(raw(f.envelope(kind, user)))
        user["unsafe_metadata"] = {"bio": letter * (room // 2)}  # (2 bytes each in the body)
        body = raw(f.envelope(kind, user))
        assert allowed - 2 <= len(body) <= allowed
        headers, _ = f.signed(body, f"msg_big_{n}")
        assert processor.process(headers, body).status == "applied", kind
    with store.connect() as conn:
        assert conn.execute(sa.select(users.c.banned).where(users.c.clerk_id == "user_big")).scalar_one() is True
        assert conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one() == 2
    store.dispose()
