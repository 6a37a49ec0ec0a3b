"""``users promote EMAIL`` when several live users share the primary address: an address moved from one user to
another and the first one's update has not arrived yet. Found by an adopter walkthrough: the CLI promoted one of
them, picked by the database (the old owner in one run, the new one the next). Now nothing is changed, the ids
are listed, and a Clerk id names the user instead. The lookup on SQLite, PostgreSQL and MariaDB; the CLI as a
user runs it (a real process against the emulator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clerk_sync.auth.admin import find_user_by_email
from clerk_sync.engine import Entity, Upsert
from clerk_sync.errors import AmbiguousUser
from clerk_sync.events import user_record
from clerk_sync.store import Store
from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.test_cli import run


def _live(store: Store, clerk_id: str, email: str, version: int) -> None:
    with store.transaction() as writer:
        writer.apply(Upsert(Entity.USER, user_record(f.user(clerk_id, version, email=email))))


def test_an_address_two_live_users_share_names_neither(store: Store) -> None:
    _live(store, "user_old", "moved@example.com", 1_800_000_000_000)
    _live(store, "user_new", "Moved@example.com", 1_800_000_001_000)
    _live(store, "user_other", "other@example.com", 1_800_000_000_000)
    with pytest.raises(AmbiguousUser, match="user_new, user_old"):
        find_user_by_email(store, "moved@example.com")
    assert find_user_by_email(store, "other@example.com") == "user_other"
    assert find_user_by_email(store, "user_old") == "user_old"  # a Clerk id names its user
    assert find_user_by_email(store, "user_gone") is None
    assert find_user_by_email(store, "nobody@example.com") is None


def test_the_cli_changes_nothing_and_says_which_ids(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert run("migrate", env={"DATABASE_URL": url}).returncode == 0
    with EmulatorServer() as clerk:
        old = clerk.create_user("moved@example.com")
        new = clerk.create_user("new@example.com")
        store = Store.from_url(url)
        _live(store, old["id"], "moved@example.com", old["updated_at"])
        _live(store, new["id"], "moved@example.com", new["updated_at"])  # its update came first
        env = {"DATABASE_URL": url, "CLERK_SECRET_KEY": clerk.secret_key, "CLERK_API_URL": clerk.url}
        refused = run("users", "promote", "moved@example.com", "--role", "admin", env=env)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0, said
        assert old["id"] in said and new["id"] in said and "Clerk id" in said
        roles = {u["id"]: u["public_metadata"].get("role") for u in (clerk.request("GET", f"/v1/users/{old['id']}"),
                                                                     clerk.request("GET", f"/v1/users/{new['id']}"))}
        assert set(roles.values()) == {None}  # nobody was promoted
        by_id = run("users", "promote", new["id"], "--role", "admin", env=env)
        assert by_id.returncode == 0, by_id.stdout + by_id.stderr
        assert clerk.request("GET", f"/v1/users/{new['id']}")["public_metadata"]["role"] == "admin"
        store.dispose()
