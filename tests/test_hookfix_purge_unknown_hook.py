"""``clerk-sync hooks purge --hook NAME`` with a name no job has (a typo) says so and exits 1.

Fixed: it printed "0 job(s) of hook 'welcom' purged" and exited 0, so a mistyped hook went unnoticed while its
jobs stayed queued. Also the ``hooks list --status pending`` hint reads as a sentence again."""

from __future__ import annotations

from clerk_sync.changes import Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.store import Store
from tests import factories as f
from tests.test_cli import run
from tests.test_hooks import B, Recorder, deliver, hooked, jobs


def test_purge_of_a_hook_no_job_has_names_the_hooks_that_have_jobs_and_exits_1(db_url: str) -> None:
    store = hooked(db_url, Hook("welcome", Recorder()), Hook("crm", Recorder()))
    deliver(store, f.envelope("user.created", f.user("user_p", B)))
    env = {"DATABASE_URL": db_url}
    typo = run("hooks", "purge", "--hook", "welcom", env=env)
    assert typo.returncode == 1, typo
    said = " ".join(typo.stderr.split())
    assert "no job of hook 'welcom' is queued (the hooks with jobs: 'crm', 'welcome')" in said, said
    assert "nothing purged" in said and len(jobs(store)) == 2
    purged = run("hooks", "purge", "--hook", "welcome", env=env)
    assert purged.returncode == 0 and "1 job(s) of hook 'welcome' purged" in purged.stdout, purged
    store.dispose()


def test_the_pending_hint_is_a_sentence_and_names_max_overdue(db_url: str) -> None:
    store = hooked(db_url, Hook("gone", Recorder()))
    deliver(store, f.envelope("user.created", f.user("user_q", B)))
    listed = run("hooks", "list", "--status", "pending", env={"DATABASE_URL": db_url})
    said = " ".join(listed.stderr.split())
    assert "is a hook whose jobs wait in no running worker's --hooks (nor serve's)?" in said, said
    assert "wait on is in" not in said and "max_overdue" in said
    assert Dispatcher(Store(store.engine, hooks=[Hook("gone", Recorder())]), poll_s=0).drain() == 1
    store.dispose()
