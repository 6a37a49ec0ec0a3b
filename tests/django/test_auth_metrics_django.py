"""Authentication outcomes in the Django runtime's registry (``processor.metrics``): a request is counted once,
whichever of the middleware, a decorator, a mixin or DRF's authentication and permission classes asks, over
WSGI and ASGI; a refused one under its code (a token from the host clock's future under the clock's code)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from clerk_sync.integrations.django.runtime import get_clerk_sync
from clerk_sync.testing import EmulatorServer
from tests._server import free_port
from tests.django.conftest import bearer, django_database, emulator_settings, serve


def counts() -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(get_clerk_sync().processor.metrics.render().decode()):
        for s in family.samples:
            if s.name == "clerk_sync_auth_authenticated_total":
                found["authenticated"] = s.value
            elif s.name == "clerk_sync_auth_refused_total" and s.value:
                found[s.labels["code"]] = s.value
    return found


@contextmanager
def app_with_clock(db_url: str, transport: str) -> Iterator[tuple[Any, EmulatorServer, list[float]]]:
    skew = [0.0]
    port = free_port()
    with EmulatorServer(clock=lambda: time.time() + skew[0], webhook_url=f"http://127.0.0.1:{port}/webhooks/clerk",
                        rate_limit_requests=1000) as clerk, django_database(db_url), \
            override_settings(CLERK_SYNC=emulator_settings(clerk)), serve(transport, port) as app:
        yield app, clerk, skew


def token(clerk: EmulatorServer, skew: list[float], skew_s: float = 0.0, role: str | None = None) -> str:
    user = clerk.create_user(f"u{time.monotonic_ns()}@example.com", public_metadata={"role": role} if role else None)
    skew[0] = skew_s
    try:
        return clerk.mint_session_token(user["id"])
    finally:
        skew[0] = 0.0


@pytest.mark.parametrize("transport", ["wsgi", "asgi"])
@pytest.mark.parametrize("path", ["/t/cbv/me", "/t/async/me", "/t/drf/billing"], ids=["view", "async-view", "drf"])
def test_a_request_is_counted_once_accepted_or_refused_under_its_code(db_url: str, transport: str, path: str) -> None:
    with app_with_clock(db_url, transport) as (app, clerk, skew):
        answer = app.get(path, headers=bearer(token(clerk, skew)))
        assert answer.status_code == 200, answer.text
        expired = app.get(path, headers=bearer(token(clerk, skew, skew_s=-200)))  # Clerk's clock 200 s behind
        assert expired.status_code == 401 and expired.json()["error"] == "token_expired"
        future = app.get(path, headers=bearer(token(clerk, skew, skew_s=120)))  # this host's clock behind Clerk's
        assert future.status_code == 401 and future.json()["error"] == "token_not_active_yet"
        assert app.get("/t/drf/open").status_code == 200  # anonymous: neither
        assert counts() == {"authenticated": 1, "token_expired": 1, "token_not_active_yet": 1}


def test_drf_on_a_public_path_counts_a_refused_token_once(db_url: str) -> None:
    """The middleware (public path: not refused there), then DRF's authentication class, then its permission:
    one verdict, kept on the request."""
    with app_with_clock(db_url, "wsgi") as (app, clerk, skew):
        answer = app.get("/t/drf/open", headers=bearer(token(clerk, skew, skew_s=120)))
        assert answer.status_code in (200, 401)
        assert counts() == {"authenticated": 0, "token_not_active_yet": 1}
