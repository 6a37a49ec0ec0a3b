"""Hooks adopter walkthrough, the CLI's messages: ``--hooks myhooks:send_welcome_mail`` (a handler, not the hooks
list) said "calling send_welcome_mail() raised TypeError: ... missing 1 required positional argument"; a
misspelt attribute named nothing the module has; ``clerk-sync replay`` printed a Python dict
(``replayed 285 deliveries: {'applied': 285}``), and pointed a hooks-only replay at a mapping's backfill."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clerk_sync import migrations
from clerk_sync.cli.hooks import load_hooks, load_mapping
from clerk_sync.errors import ConfigError
from clerk_sync.store import Store
from tests.test_replay_keeps_history import CLI, _deliver

_MODULE = '''
from clerk_sync.changes import Hook

def send_welcome_mail(change):
    pass

def handler_with_default(change=None):
    pass

def forgot_the_return():
    HOOKS = [Hook("welcome", send_welcome_mail)]

WELCOME = Hook("welcome", send_welcome_mail, on=["user.created"])
HOOKS = [WELCOME]
MORE_HOOKS = [Hook("billing", send_welcome_mail)]
'''


@pytest.fixture
def myhooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "cli_msg_hooks.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cli_msg_hooks", raising=False)
    return "cli_msg_hooks"


def _refusal(spec: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_mapping(spec) if "MAPPING" in spec else load_hooks(spec)
    return str(raised.value)


def test_a_handler_given_to_hooks_is_told_to_be_wrapped_in_a_hook_list(myhooks: str) -> None:
    said = _refusal(f"{myhooks}:send_welcome_mail")
    assert "send_welcome_mail needs arguments (change)" in said and "TypeError" not in said, said
    assert "that looks like a handler: wrap it in a Hook, in a list" in said, said
    assert f"point --hooks at the list ({myhooks}:HOOKS)" in said, said
    defaulted = _refusal(f"{myhooks}:handler_with_default")  # called: it returned None
    assert "calling handler_with_default() returned None; that looks like a handler" in defaulted, defaulted
    assert "returned None; make it return the list" in _refusal(f"{myhooks}:forgot_the_return")
    assert f"{myhooks}:WELCOME' must be" in _refusal(f"{myhooks}:WELCOME")
    assert "WELCOME is one Hook; put it in a list ([WELCOME])" in _refusal(f"{myhooks}:WELCOME")


def test_a_missing_attribute_names_the_hook_lists_the_module_has(myhooks: str) -> None:
    said = _refusal(f"{myhooks}:HOOK")
    assert f"has no attribute 'HOOK'; it has {myhooks}:HOOKS, {myhooks}:MORE_HOOKS" in said, said
    mapping = _refusal(f"{myhooks}:MAPPING")  # no SchemaMapping in it: what the option takes
    assert "no attribute 'MAPPING'; --mapping takes a clerk_sync.mapping.SchemaMapping" in mapping, mapping


def _replay(url: str, *args: str, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_") and k != "DATABASE_URL"}
    result = subprocess.run([*CLI, "replay", *args], capture_output=True, text=True, cwd=cwd,
                            env={**env, "DATABASE_URL": url}, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return " ".join((result.stdout + result.stderr).split())


def test_replay_says_its_counts_as_words_and_the_backfill_only_where_it_fits(tmp_path: Path, myhooks: str) -> None:
    url = f"sqlite:///{tmp_path / 'replay.db'}"
    store = Store.from_url(url)
    migrations.upgrade(store.engine)
    _deliver(store)
    store.dispose()
    said = _replay(url, "--status", "applied")
    assert "replayed 3 deliveries: 3 applied" in said and "{" not in said, said
    assert "if you meant to fill your mapped tables (a mapping), run `clerk-sync migrate --mapping" in said, said
    hooks = _replay(url, "--status", "applied", "--with-hooks", f"{myhooks}:HOOKS", cwd=tmp_path)
    assert "a replay that changes nothing fires no hooks" in hooks, hooks
    assert "replayed 1 deliveries: 1 skipped" in _replay(url, "--status", "skipped"), said
