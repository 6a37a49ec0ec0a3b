"""Least-privilege database roles, after review: PostgreSQL's 42501 on an app's mapped table is the row's own refusal
(a row-level security policy, a trigger raising ``insufficient_privilege``) unless the role really lacks a grant
there; /readyz asks only what this process writes, and says a read-only database as that.

Each test makes its own roles (users) and database (tests/test_least_privilege_roles.py's helpers) and drops them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import structlog

from clerk_sync.testing import EmulatorServer
from tests import factories as f
from tests.test_cli import run
from tests.test_least_privilege_roles import APP, Roles, _deliver, _env, _postgres, _service, documented_grants


@contextmanager
def _granted_postgres() -> Iterator[Roles]:
    with _postgres() as made:
        migrated = run("migrate", "--mapping", f"{APP}:MAPPING", env={"DATABASE_URL": made.owner_url})
        assert migrated.returncode == 0, migrated.stderr
        made.as_owner(*documented_grants(made))
        yield made


_ROW_REFUSALS = {
    "rls": ("ALTER TABLE accounts ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY grfix_no_blocked ON accounts USING (true) WITH CHECK (position('blocked' in email) = 0)"),
    "trigger": ("CREATE FUNCTION grfix_no_blocked() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF position('blocked' in NEW.email) > 0 THEN RAISE EXCEPTION 'blocked domain' "
                "USING ERRCODE = 'insufficient_privilege'; END IF; RETURN NEW; END $$",
                "CREATE TRIGGER grfix_no_blocked BEFORE INSERT OR UPDATE ON accounts FOR EACH ROW "
                "EXECUTE FUNCTION grfix_no_blocked()"),
}


@pytest.mark.postgres
@pytest.mark.parametrize("kind", sorted(_ROW_REFUSALS))
def test_a_row_the_app_table_refuses_with_42501_is_the_rows_refusal_not_a_503(kind: str) -> None:
    """A row-level security policy's WITH CHECK, or a trigger raising insufficient_privilege, refuses one row with
    the SQLSTATE of a missing grant: the delivery was answered 503 until Svix gave up (~27 h), the user's ban, role
    and deletion never applied. The role has every grant on the table: the row's refusal, the delivery applied."""
    with _granted_postgres() as roles:
        roles.as_owner(*_ROW_REFUSALS[kind])
        blocked = f.envelope("user.created", f.user("user_grfix1", 5, email="x@blocked.example", banned=True))
        with _service(roles) as client, structlog.testing.capture_logs() as logs:
            answer = _deliver(client, "msg_grfix1", blocked)
            other = _deliver(client, "msg_grfix2", f.envelope("user.created", f.user("user_grfix2", 5)))
        assert answer.status_code == 200 and answer.json()["status"] == "applied", answer.text
        assert other.status_code == 200, other.text
        refused = next(e for e in logs if e["event"] == "mapped_row_refused")
        assert refused["clerk_id"] == "user_grfix1" and "refused the row itself" in refused["reason"], refused
        assert "prints the GRANT statements" not in refused["reason"], refused
        assert roles.admin_read("SELECT clerk_id, banned FROM users ORDER BY clerk_id") == [
            ("user_grfix1", True), ("user_grfix2", False)]
        # the trigger's refusal: the row is written again without the user's own columns (its e-mail kept back)
        kept = [("user_grfix1", None)] if kind == "trigger" else []
        assert roles.admin_read("SELECT clerk_user_id, email FROM accounts ORDER BY 1") == [
            *kept, ("user_grfix2", "user_grfix2@example.com")]


@pytest.mark.postgres
def test_reconcile_mapping_writes_the_other_users_when_a_policy_refuses_one() -> None:
    """The same refusal during `reconcile --mapping` failed the whole run (every day); the other users are written."""
    with _granted_postgres() as roles:
        roles.as_owner(*_ROW_REFUSALS["rls"])
        with EmulatorServer() as emu:
            emu.create_user("ok@example.com")
            emu.create_user("x@blocked.example")
            done = run("reconcile", "--mapping", f"{APP}:MAPPING", env=_env(roles, emu))
        assert done.returncode == 0, done.stderr
        assert roles.admin_read("SELECT email FROM accounts") == [("ok@example.com",)]
        assert sorted(roles.admin_read("SELECT email FROM users")) == [("ok@example.com",), ("x@blocked.example",)]
