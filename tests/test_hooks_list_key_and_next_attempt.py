"""Node.js forwarding walkthrough (finding 7): ``clerk-sync hooks list`` printed no idempotency key, so a receiver's log
line (its ``webhook-id``) could be matched to a job only by guessing from the Clerk id and type (several updates of
one user share both), nor when a pending job's next attempt is due. Both are now columns appended at the end; the
six before them are unchanged (``cut -f1`` still gives the ids)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from clerk_sync.changes import Change, Hook
from clerk_sync.hooks import Backoff, Dispatcher
from clerk_sync.store import Store
from clerk_sync.tables import hook_jobs
from tests import factories as f
from tests.test_cli import run
from tests.test_hooks import B, deliver


def _down(change: Change) -> None:
    raise RuntimeError("receiver answered 503")


def test_hooks_list_ends_each_line_with_the_idempotency_key_and_a_pending_jobs_next_attempt(db_url: str) -> None:
    store = Store.from_url(db_url, hooks=[Hook("forward", _down)])
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)),
            f.envelope("user.updated", f.user("user_1", B + 2000, first_name="Ann")),
            f.envelope("user.created", f.user("user_2", B + 1000)))
    before = datetime.now(UTC).replace(microsecond=0)
    # user_1's jobs fail: the first goes dead, its second waits behind it until then, and then fails too
    Dispatcher(store, backoff=Backoff(max_attempts=1)).drain()
    with store.transaction() as writer:  # user_2's job: failed once, its next attempt due in an hour
        writer.conn.execute(hook_jobs.update().where(hook_jobs.c.idempotency_key == f"user.created:user_2:{B + 1000}").values(
            status="pending", attempts=1, available_at=before + timedelta(hours=1), last_error="RuntimeError: 503"))
    store.dispose()
    env = {"DATABASE_URL": db_url}

    dead = [line.split("\t") for line in run("hooks", "list", env=env).stdout.splitlines()]
    pending = [line.split("\t") for line in run("hooks", "list", "--status", "pending", env=env).stdout.splitlines()]

    assert [row[1:] for row in dead] == [
        ["forward", "user.created", "user_1", "attempts=1", "RuntimeError: receiver answered 503",
         f"user.created:user_1:{B + 1000}", ""],
        ["forward", "user.updated", "user_1", "attempts=1", "RuntimeError: receiver answered 503",
         f"user.updated:user_1:{B + 2000}", ""],
    ]
    assert len(pending) == 1 and pending[0][1:7] == ["forward", "user.created", "user_2", "attempts=1",
                                                     "RuntimeError: 503", f"user.created:user_2:{B + 1000}"]
    due = pending[0][7]
    assert due.startswith("next=") and due.endswith("Z"), due
    assert datetime.fromisoformat(due.removeprefix("next=")) == before + timedelta(hours=1)


def test_hooks_list_shows_control_characters_in_an_error_escaped(sqlite_url: str) -> None:
    """Fixed: only backslash, tab, newline and CR were escaped, so a last error quoting a receiver's answer
    or a handler's message wrote its escape sequences to the terminal raw (a window title, colours, a cleared
    screen, a hyperlink). Every C0 and C1 control character and DEL is written as \\xNN."""
    store = Store.from_url(sqlite_url, hooks=[Hook("forward", _down)])
    deliver(store, f.envelope("user.created", f.user("user_1", B + 1000)))
    Dispatcher(store, backoff=Backoff(max_attempts=1)).drain()
    error = "RuntimeError: \x1b]0;owned\x07\x1b[2J\x9b31m\x7f\x00 é\\\t\n\r"
    with store.transaction() as writer:
        writer.conn.execute(hook_jobs.update().values(last_error=error))
    store.dispose()

    listed = run("hooks", "list", env={"DATABASE_URL": sqlite_url})

    assert listed.returncode == 0, listed.stderr
    (row,) = [line.split("\t") for line in listed.stdout.splitlines()]
    assert row[5] == "RuntimeError: \\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\x7f\\x00 é\\\\\\t\\n\\r"
    assert not any(c < " " or "\x7f" <= c < "\xa0" for c in listed.stdout.replace("\t", "").replace("\n", ""))
