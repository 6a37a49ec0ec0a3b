"""The deny list's incremental refresh across hosts whose clocks differ (walkthrough finding, flaskmaria).

Revocations and user changes are stamped with the *writing* process's clock (the webhook receiver's), and
the deny list is read by other processes: a refresh that kept "rows written since my last refresh, minus
60 s" by its own clock missed every revocation written by a receiver more than 60 s behind it, until the
token expired or the next full reload (600 s). The watermark now comes from the rows themselves.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from clerk_sync.auth.authenticator import DenyList
from clerk_sync.config import Settings
from clerk_sync.integrations.starlette import build_processor
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import revoked_sessions
from tests import factories as f
from tests.conftest import SECRET


class SkewedWriter:
    """A webhook receiver whose clock is ``offset`` away from true time (what its rows are stamped with)."""

    def __init__(self, db_url: str, offset: timedelta) -> None:
        settings = Settings.from_env({"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET})
        self.store = Store(create_engine(settings.sqlalchemy_url()), now=lambda: datetime.now(UTC) + offset)
        self.processor = build_processor(settings, self.store)
        self.n = 0

    def event(self, event_type: str, data: dict[str, Any]) -> None:
        self.n += 1
        headers, body = f.signed(f.envelope(event_type, data), f"msg_skew{self.n}")
        assert self.processor.process(headers, body).status in ("applied", "skipped")


def _revoke(writer: SkewedWriter, user_id: str) -> None:
    writer.event("session.revoked", {"id": f"sess_{user_id}", "object": "session", "user_id": user_id,
                                     "status": "revoked"})


def test_a_revocation_written_by_a_receiver_two_minutes_behind_is_refused_at_the_next_refresh(db_url: str) -> None:
    writer = SkewedWriter(db_url, timedelta(minutes=-2))
    ticks = [0.0]
    deny = DenyList(Store.from_url(db_url), refresh_s=1, now=lambda: ticks[0])  # reader on true time
    writer.event("user.created", f.user("user_a", 1))
    writer.event("user.created", f.user("user_b", 1))
    _revoke(writer, "user_a")
    assert deny.is_revoked("sess_user_a")  # the first (full) load
    ticks[0] += 1
    _revoke(writer, "user_b")  # written "two minutes ago" by the reader's clock
    assert deny.is_revoked("sess_user_b")  # the next, incremental, refresh sees it
    ticks[0] += 1
    writer.event("user.updated", f.user("user_b", 2, banned=True))  # users.updated_at: the same
    assert deny.blocked_reason("user_b") == "banned"
    ticks[0] += 1
    writer.event("user.updated", f.user("user_b", 3, banned=False))
    assert deny.blocked_reason("user_b") is None
    writer.store.dispose()


def test_a_reader_behind_the_receiver_and_empty_tables_at_the_first_load(db_url: str) -> None:
    """The first load on empty tables (no watermark yet), then a reader two minutes *behind* the receiver
    (rows stamped in its future), then rows stamped with exactly the watermark's time."""
    writer = SkewedWriter(db_url, timedelta(minutes=2))
    ticks = [0.0]
    deny = DenyList(Store.from_url(db_url), refresh_s=1, now=lambda: ticks[0])
    assert not deny.is_revoked("sess_user_c")  # empty tables
    writer.event("user.created", f.user("user_c", 1))
    ticks[0] += 1
    _revoke(writer, "user_c")
    assert deny.is_revoked("sess_user_c")
    ticks[0] += 1
    assert deny.is_revoked("sess_user_c")  # (kept by the next incremental refresh)
    with writer.store.connect() as conn:
        mark = conn.execute(revoked_sessions.select()).one().revoked_at
    with writer.store.transaction() as w:  # a straggler stamped the watermark's own time
        w.conn.execute(revoked_sessions.insert().values(session_id="sess_same", reason="revoked", revoked_at=mark))
    ticks[0] += 1
    assert deny.is_revoked("sess_same")
    writer.store.dispose()


def test_a_receiver_whose_clock_is_ahead_hides_no_other_receivers_revocation(db_url: str) -> None:
    """Review of the data watermark: a row stamped 10 minutes in the future (a receiver whose clock is ahead, or
    jumped) lifted the mark past every later stamp of the receivers with a right clock, whose revocations and
    bans the refreshes then skipped until the full reload, and again after it. The mark is no later than this
    host's clock."""
    ahead = SkewedWriter(db_url, timedelta(minutes=10))
    right = SkewedWriter(db_url, timedelta(0))
    right.n = 100
    ticks = [0.0]
    deny = DenyList(Store.from_url(db_url), refresh_s=1, now=lambda: ticks[0])
    try:
        ahead.event("user.created", f.user("user_a", 1))
        right.event("user.created", f.user("user_b", 1))
        _revoke(ahead, "user_a")
        assert deny.is_revoked("sess_user_a")  # the first load: everything
        ticks[0] += 1
        _revoke(right, "user_b")
        assert deny.is_revoked("sess_user_b")  # the next incremental refresh
        ticks[0] += 1
        right.event("user.updated", f.user("user_b", 2, banned=True))
        assert deny.blocked_reason("user_b") == "banned"
    finally:
        for store in (deny._store, ahead.store, right.store):
            store.dispose()
