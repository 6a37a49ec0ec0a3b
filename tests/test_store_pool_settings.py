"""Each process's connection pool is a setting (``CLERK_SYNC_DB_POOL_SIZE``, ``CLERK_SYNC_DB_MAX_OVERFLOW``):
it was 20 + 20 fixed and undocumented, so a team sizing ``max_connections`` or a pooler for N replicas and
ASGI workers could neither know nor change it (walkthrough of Django under ASGI: one uvicorn worker held 40
connections through a lock stall, two workers and Django's own reached "too many clients")."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from clerk_sync.config import Settings
from clerk_sync.store import Store

SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtcG9vbC10ZXN0cw=="


def settings(url: str, **env: str) -> Settings:
    return Settings(_env_file=None, **{"DATABASE_URL": url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, **env})  # type: ignore[arg-type]


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_the_pool_takes_its_size_from_the_settings(db_url: str) -> None:
    store = Store.from_settings(settings(db_url, CLERK_SYNC_DB_POOL_SIZE="3", CLERK_SYNC_DB_MAX_OVERFLOW="0"))
    try:
        held = [store.engine.connect() for _ in range(3)]
        assert store.engine.pool.size() == 3 and store.engine.pool.checkedout() == 3  # type: ignore[attr-defined]
        store.engine.pool._timeout = 0.2  # type: ignore[attr-defined]  # (a fourth waits, then fails: no overflow)
        with pytest.raises(Exception, match="QueuePool limit of size 3 overflow 0"):
            store.engine.connect()
        for conn in held:
            conn.close()
    finally:
        store.dispose()
    default = Store.from_settings(settings(db_url))
    assert (default.engine.pool.size(), default.engine.pool._max_overflow) == (20, 20)  # type: ignore[attr-defined]
    default.dispose()


def test_sqlite_keeps_sqlalchemys_own_pool(tmp_path: os.PathLike[str]) -> None:
    store = Store.from_settings(settings(f"sqlite:///{tmp_path}/pool.db", CLERK_SYNC_DB_POOL_SIZE="3"))
    assert store.engine.pool.size() == 5  # type: ignore[attr-defined]  # SQLAlchemy's default for a file
    store.dispose()


@pytest.mark.parametrize(("name", "value"), [("CLERK_SYNC_DB_POOL_SIZE", "0"), ("CLERK_SYNC_DB_MAX_OVERFLOW", "-1"),
                                             ("CLERK_SYNC_DB_POOL_SIZE", "many")])
def test_a_pool_size_that_cannot_be_is_refused_naming_it(name: str, value: str) -> None:
    with pytest.raises(ValidationError, match=name):
        settings("sqlite:///x.db", **{name: value})
