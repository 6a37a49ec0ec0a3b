"""The console's own session checks count in ``clerk_sync_auth_*`` on serve's /metrics (review: the console built
its authenticator without serve's metrics, so its sign-ins and refusals were counted nowhere)."""

from __future__ import annotations

import re

import httpx

from tests.console.conftest import ConsoleStack


def _count(client: httpx.Client, series: str) -> float:
    text = client.get("/metrics").text
    return sum(float(value) for value in re.findall(rf"^{re.escape(series)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_a_console_sign_in_and_a_refused_token_are_counted(stack: ConsoleStack) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        accepted = _count(client, "clerk_sync_auth_authenticated_total")
        refused = _count(client, "clerk_sync_auth_refused_total")
        signed = client.get(stack.sign_in_link(stack.admin_id).removeprefix(stack.url))
        assert signed.status_code == 303
        assert client.get("/console/login/clerk", params={"token": "not.a.token"}).status_code in (401, 303, 400)
        assert _count(client, "clerk_sync_auth_authenticated_total") >= accepted + 1
        assert _count(client, "clerk_sync_auth_refused_total") == refused + 1
