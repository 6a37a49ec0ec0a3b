"""``prune --dry-run`` counts what the real pass does, and an erasure refuses an id longer than any Clerk id.

A real pass redacts a ``failed`` delivery about a user deleted since and settles it ``skipped`` before it
deletes: one older than the delete age goes in the same pass, so the dry run counts it as deleted too. An id
longer than the ``clerk_id`` columns is no Clerk id: ``users erase`` refuses it as it refuses any other
non-id (exit 2, the reason), before PostgreSQL and MariaDB refused the write ("database error ... check
DATABASE_URL") and SQLite kept a tombstone for nobody. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from clerk_sync._limits import CLERK_ID_CHARS
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.tables import audit_log, users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_cli import run
from tests.test_retention import _failing, _later, _user, deliver


def test_a_dry_runs_counts_are_the_real_pass_counts(store: Store, verifier: WebhookVerifier) -> None:
    processor = WebhookProcessor(store, verifier)
    for user_id in ("user_gone", "user_old_release", "user_live"):
        assert deliver(processor, f.envelope("user.created", _user(user_id, 100)), f"msg_{user_id}") == "applied"
        assert deliver(processor, _failing(user_id), f"msg_bad_{user_id}") == "failed"
    for user_id in ("user_gone", "user_old_release"):
        assert deliver(processor, f.envelope("user.deleted", f.deleted("user", user_id)), f"msg_del_{user_id}") \
            == "applied"
    with store.transaction() as writer:  # as a release before the settling left it: redacted, still failed
        e = webhook_events
        writer.conn.execute(e.update().where(e.c.svix_id == "msg_bad_user_old_release").values(
            redacted_at=writer.now, payload={"type": "organizationMembership.updated", "redacted": True}))

    dry = Retention(store, now=_later(100)).prune(dry_run=True)
    real = Retention(store, now=_later(100)).prune()

    assert dry.dry_run and not real.dry_run
    assert dataclass_counts(dry) == dataclass_counts(real)
    with store.connect() as conn:  # the live user's failure, kept whole for its replay
        assert conn.execute(sa.select(webhook_events.c.svix_id)).scalars().all() == ["msg_bad_user_live"]


def dataclass_counts(report: object) -> dict[str, int]:
    return {name: getattr(report, name) for name in ("redacted", "deleted", "cleared", "erased", "audit_ips",
                                                     "settling")}


LONG = "user_" + "x" * (CLERK_ID_CHARS - 4)  # one character over


def test_erase_user_refuses_an_id_longer_than_any_clerk_id(store: Store) -> None:
    with pytest.raises(ValueError, match=f"at most {CLERK_ID_CHARS} characters"):
        Retention(store).erase_user(LONG, reason="DSR", allow_unknown=True)
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one() == 0
    assert Retention(store).erase_user(LONG[:-1], allow_unknown=True).clerk_id == LONG[:-1]  # the longest: erased


def test_users_erase_refuses_an_over_long_id_as_a_bad_parameter(db_url: str) -> None:
    result = run("users", "erase", LONG + "y" * 140, "--force", env={"DATABASE_URL": db_url})
    out = " ".join((result.stdout + result.stderr).replace("│", " ").split())
    assert result.returncode == 2, out
    assert f"at most {CLERK_ID_CHARS} characters" in out, out
    assert "database error" not in out and "DATABASE_URL" not in out, out
    store = Store.from_url(db_url)
    with store.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one() == 0
    store.dispose()
