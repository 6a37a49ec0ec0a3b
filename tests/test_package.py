"""The public surface is decided on purpose: every module declares ``__all__`` and every name in it exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import clerk_sync

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(clerk_sync.__path__, "clerk_sync.")
    if ".migrations.versions" not in m.name and not m.name.endswith("migrations.env")
)


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_an_existing_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__ list"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []
    assert len(set(exported)) == len(exported)


def test_every_error_is_in_the_one_tree_and_exported() -> None:
    from clerk_sync import errors

    classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert classes == set(errors.__all__)
    for name in classes:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.ClerkSyncError), name
        assert cls.code and cls.code == cls.code.lower(), name


def test_version_comes_from_the_installed_metadata() -> None:
    assert clerk_sync.__version__ != "0.0.0"
