"""Django's own 503 for a request whose Clerk user cannot be told said "the auth database is unavailable" when the
database role lacked a GRANT (a setting, not an outage): it says that now, naming no table (the log does)."""

from __future__ import annotations

import json

import sqlalchemy as sa
from django.test import RequestFactory

from clerk_sync._db_errors import store_error
from clerk_sync.errors import StoreError
from clerk_sync.integrations.django.middleware import _user_unavailable_response
from clerk_sync.integrations.django.request import ClerkUserUnavailable


class _Refused(Exception):
    sqlstate = "42501"  # psycopg's insufficient_privilege


def test_a_missing_privilege_is_said_as_one_not_as_an_outage() -> None:
    refused = store_error(sa.exc.ProgrammingError("SELECT 1 FROM users", {},
                                                  _Refused("permission denied for table users")))
    unavailable = ClerkUserUnavailable(refused)
    response = _user_unavailable_response(RequestFactory().get("/", HTTP_ACCEPT="application/json"), unavailable)
    body = json.loads(response.content)
    assert response.status_code == 503 and body["error"] == "store_privilege_missing", body
    assert "privilege" in body["message"] and "is unavailable" not in body["message"], body
    assert "table users" not in body["message"], body
    assert "privilege" in str(unavailable) and "is unavailable" not in str(unavailable), str(unavailable)
    down = ClerkUserUnavailable(StoreError("database error: OperationalError: connection refused"))
    assert "the auth database is unavailable" in str(down), str(down)
