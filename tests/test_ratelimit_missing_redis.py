"""REDIS_URL set without the ``redis`` extra: a ConfigError naming the extra (the CLI prints it as one line),
not an ImportError the CLI showed as a traceback."""

from __future__ import annotations

import sys

import pytest

from clerk_sync.clerk_api.ratelimit import RateLimit, RedisBudget
from clerk_sync.errors import ConfigError


def test_a_redis_budget_without_the_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)  # what an environment without the package imports
    with pytest.raises(ConfigError, match=r"pip install 'clerk-sync\[redis\]'.*or unset REDIS_URL"):
        RedisBudget("redis://127.0.0.1:6379/0", RateLimit(100, 10.0), "sk_test_x")
