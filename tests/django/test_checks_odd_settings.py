"""Review: settings that fail every request passed ``manage.py check`` (HOOKS, MAPPING or USER_FIELDS naming the
wrong kind of object; a SQLite DATABASE_URL whose directory is missing, only a W004 warning), or made the check
itself raise (a DATABASES PORT that is not a number)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from clerk_sync.integrations.django.checks import check_settings
from tests.conftest import SECRET

BASE = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_SECRET_KEY": "sk_test_x",
        "CLERK_AUTHORIZED_PARTIES": ["https://a.example"]}
NOT_A_HOOK = "clerk_sync.integrations.django.conf.APP"  # a string


@pytest.mark.parametrize(("extra", "named"), [({"HOOKS": NOT_A_HOOK}, "HOOKS"), ({"HOOKS": {"a": 1}}, "HOOKS"),
                                              ({"MAPPING": NOT_A_HOOK}, "MAPPING"),
                                              ({"USER_FIELDS": NOT_A_HOOK}, "USER_FIELDS")])
def test_hooks_mapping_or_user_fields_of_the_wrong_kind_are_e001(extra: dict[str, Any], named: str) -> None:
    with override_settings(CLERK_SYNC={**BASE, **extra}):
        found = check_settings()
    assert [m.id for m in found] == ["clerk_sync.E001"] and f"CLERK_SYNC[{named!r}]" in found[0].msg


def test_a_port_that_is_no_number_is_e001_not_a_crash() -> None:
    database = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "PORT": "five"}
    with pytest.warns(UserWarning, match="DATABASES"), override_settings(DATABASES={"default": database},
                                                                          CLERK_SYNC=BASE):
        found = check_settings()
    assert [m.id for m in found] == ["clerk_sync.E001"] and "'five'" in found[0].msg


def test_a_sqlite_database_url_in_a_missing_directory_is_an_error(tmp_path: Any) -> None:
    with override_settings(CLERK_SYNC={**BASE, "DATABASE_URL": f"sqlite:///{tmp_path}/missing/x.db"}):
        found = check_settings()
    assert [m.id for m in found] == ["clerk_sync.E009"] and "mkdir -p" in found[0].msg


@pytest.mark.parametrize("url", ["http://default:S3cret@cache.internal:6380/0", "redis://host:port/0"])
def test_a_redis_url_redis_py_cannot_read_is_an_error(url: str) -> None:
    """Review: it passed ``check``, and every signed-in request then answered 500 (the Clerk API budget is built
    from it on the first one); Flask and the CLI refuse it at start. Its password is not shown."""
    with override_settings(CLERK_SYNC={**BASE, "REDIS_URL": url}):
        found = check_settings()
    assert [m.id for m in found] == ["clerk_sync.E010"], found
    assert "is not a Redis URL redis-py can read" in found[0].msg and "S3cret" not in found[0].msg
    with override_settings(CLERK_SYNC={**BASE, "REDIS_URL": "redis://127.0.0.1:1/0"}):  # readable: not connected to
        assert check_settings() == []
