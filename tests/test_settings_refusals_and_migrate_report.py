"""Settings that could never work are refused when they are read, naming the setting and what to write instead;
`clerk-sync migrate` says what it did."""

from __future__ import annotations

import pytest

from clerk_sync.config import Settings
from clerk_sync.errors import ConfigError
from clerk_sync.store import Store
from tests.test_cli import run


@pytest.mark.parametrize(("url", "said"), [
    ("foo://u:s3cret@bar/db", "scheme 'foo' names no database"),
    ("mysql+foo://u:s3cret@h/db", "names the driver 'foo', which SQLAlchemy's mysql dialect does not have"),
    ("sqlite+nope:///x.db", "names the driver 'nope', which SQLAlchemy's sqlite dialect does not have"),
], ids=["unknown-dialect", "unknown-mysql-driver", "unknown-sqlite-driver"])
def test_an_unknown_database_scheme_is_a_config_error_naming_the_supported_ones(url: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Store.from_settings(Settings.from_env({"DATABASE_URL": url}))
    message = str(caught.value)
    assert said in message
    assert "sqlite:///" in message and "postgresql://" in message and "mysql+pymysql://" in message
    assert "s3cret" not in message


def test_migrate_with_an_unknown_driver_exits_2_without_a_traceback_or_the_password() -> None:
    result = run("migrate", env={"DATABASE_URL": "mysql+foo://app:s3cret@db-host/app"})
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert "'mysql+foo'" in out and "mysql+pymysql://" in out
    assert "Can't load plugin" not in out and "Traceback" not in out and "s3cret" not in out
