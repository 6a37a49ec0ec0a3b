"""``manage.py check`` and a database ``TIME_ZONE`` (W005): clerk-sync's SQLite and MySQL/MariaDB columns hold UTC's
wall clock, which Django reads in that zone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from clerk_sync.integrations.django.checks import check_settings
from tests.conftest import SECRET
from tests.test_sessions import ISS, KEY, pem

CHECKED = {"CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY), "CLERK_ISSUER": ISS,
           "CLERK_AUTHORIZED_PARTIES": ["http://localhost:3000"]}
pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")


def _found(databases: dict[str, Any], clerk: dict[str, Any] = CHECKED, **settings: Any) -> list[Any]:
    with override_settings(DATABASES=databases, CLERK_SYNC=clerk, **settings):
        return [m for m in check_settings() if m.id == "clerk_sync.W005"]


def _sqlite(path: Path, **extra: Any) -> dict[str, Any]:
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path), **extra}


def test_a_database_time_zone_other_than_utc_is_a_check_warning(tmp_path: Path) -> None:
    """Fixed: ``DATABASES['default']['TIME_ZONE'] = 'Asia/Kolkata'`` on SQLite passed ``check``, and the admin's
    clerk-sync pages showed every time 5 h 30 min off (Django read clerk-sync's UTC in Kolkata's zone)."""
    found = _found({"default": _sqlite(tmp_path / "app.db", TIME_ZONE="Asia/Kolkata")})
    assert len(found) == 1 and not found[0].is_serious()
    assert "'Asia/Kolkata'" in found[0].msg and "SQLite" in found[0].msg and "UTC" in found[0].msg
    assert "Remove TIME_ZONE from DATABASES['default']" in str(found[0].hint)
    assert "DATABASE_ROUTERS" in str(found[0].hint)
    mysql = {"ENGINE": "django.db.backends.mysql", "NAME": "app", "HOST": "db", "TIME_ZONE": "Europe/Paris"}
    assert "MySQL/MariaDB" in _found({"default": mysql})[0].msg


@pytest.mark.parametrize("zone", [None, "UTC", "Etc/UTC", "GMT"])
def test_no_database_time_zone_or_utc_by_any_name_is_fine(tmp_path: Path, zone: str | None) -> None:
    extra = {} if zone is None else {"TIME_ZONE": zone}
    assert _found({"default": _sqlite(tmp_path / "app.db", **extra)}) == []


def test_postgresql_reads_instants_whatever_its_time_zone() -> None:
    pg = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "HOST": "db", "TIME_ZONE": "Asia/Kolkata"}
    assert _found({"default": pg}) == []


class ClerkSyncRouter:
    """What the hint describes: the app label ``clerk_sync`` read through an alias without TIME_ZONE."""

    def db_for_read(self, model: Any, **_: Any) -> str | None:
        return "clerk" if model._meta.app_label == "clerk_sync" else None


def test_the_models_routed_to_an_alias_without_a_time_zone_silence_it(tmp_path: Path) -> None:
    databases = {"default": _sqlite(tmp_path / "app.db", TIME_ZONE="Asia/Kolkata"),
                 "clerk": _sqlite(tmp_path / "app.db")}
    assert _found(databases, DATABASE_ROUTERS=[f"{__name__}.ClerkSyncRouter"]) == []
    assert len(_found(databases, DATABASE_ROUTERS=[])) == 1


def test_a_backend_of_its_own_is_known_by_its_vendor(tmp_path: Path) -> None:
    """Fixed: a backend module clerk-sync does not list (a project's own subclass, django-prometheus's, MySQL
    Connector's) passed ``check`` with ``TIME_ZONE='Asia/Kolkata'``: the vendor came from a list of Django's module
    names. It is the backend's own ``vendor`` now. (clerk-sync takes such a database by its own DATABASE_URL.)"""
    own = {"ENGINE": "tests.django.own_sqlite_backend", "NAME": str(tmp_path / "app.db"), "TIME_ZONE": "Asia/Kolkata"}
    clerk = {**CHECKED, "DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}"}
    found = _found({"default": own}, clerk)
    assert len(found) == 1 and "SQLite" in found[0].msg
    assert _found({"default": {**own, "ENGINE": "no.such.backend"}}, clerk) == []
