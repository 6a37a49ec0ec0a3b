"""The console over real HTTP (no browser): access rules, CSRF, read-only mode, pages, actions."""

from __future__ import annotations

from tests.console.conftest import ConsoleStack, operator_client


def test_operator_bearer_sees_every_page(stack: ConsoleStack) -> None:
    with operator_client(stack) as client:
        for path in ("/", "/deliveries", "/drift", "/users", f"/users/{stack.user_id}", "/audit"):
            response = client.get(path)
            assert response.status_code == 200, (path, response.text[:500])
            assert "<nav>" in response.text
