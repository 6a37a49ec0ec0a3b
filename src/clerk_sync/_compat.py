"""Old import paths of 0.1.x, kept for one release (removed in 0.3.0; see CHANGELOG.md).

0.2.0 grouped the flat package into layers (``auth/``, ``cli/``, ``clerk_api/``...). Importing an old
module path still works but warns with :class:`~clerk_sync.errors.ClerkSyncDeprecationWarning`,
naming the new path. Written by hand because the standard library has no "moved module" helper:
a meta-path finder that answers only for the exact old names below and builds a proxy module whose
attributes resolve, lazily, in the new homes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

from clerk_sync.errors import ClerkSyncDeprecationWarning

__all__ = ["MOVED_MODULES", "RENAMED", "deprecated_alias", "install"]

T = TypeVar("T")

#: old module -> the modules its names now live in (searched in order).
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "clerk_sync.sessions": ("clerk_sync.auth.sessions", "clerk_sync.auth.claims"),
    "clerk_sync.jwks": ("clerk_sync.auth.jwks",),
    "clerk_sync.users": ("clerk_sync.auth.users",),
    "clerk_sync.admin": ("clerk_sync.auth.admin",),
    "clerk_sync.ratelimit": ("clerk_sync.clerk_api.ratelimit",),
    "clerk_sync.reconcile_tables": ("clerk_sync.tables",),
    "clerk_sync.reconcile_cli": ("clerk_sync.cli.reconcile", "clerk_sync.cli._args"),
    "clerk_sync.devstack": ("clerk_sync.cli.dev",),
    "clerk_sync.diagnostics": ("clerk_sync.cli.doctor",),
    "clerk_sync.integrations.auth_asgi": ("clerk_sync.integrations.asgi",),
}

#: (old module, old name) -> (new module, new name) for names that were renamed as well as moved.
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("clerk_sync.sessions", "SessionPolicy"): ("clerk_sync.auth.claims", "ClaimsValidator"),
    ("clerk_sync.users", "AuthUsers"): ("clerk_sync.auth.users", "JitUsers"),
}


def deprecated_alias(old: str, new: str, value: T) -> T:
    """Warn that ``old`` is now ``new`` and hand back ``value``."""
    warnings.warn(f"{old} moved to {new} in clerk-sync 0.2.0; the old name goes in 0.3.0",
                  ClerkSyncDeprecationWarning, stacklevel=3)
    return value


def _proxy(old: str, homes: Sequence[str]) -> types.ModuleType:
    module = types.ModuleType(old, f"Moved: see {homes[0]}")

    def __getattr__(name: str) -> Any:
        if (old, name) in RENAMED:
            new_module, new_name = RENAMED[(old, name)]
            value = getattr(importlib.import_module(new_module), new_name)
            return deprecated_alias(f"{old}.{name}", f"{new_module}.{new_name}", value)
        for home in homes:
            target = importlib.import_module(home)
            if hasattr(target, name):
                return getattr(target, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (moved to {homes[0]})")

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = MOVED_MODULES[spec.name]
        deprecated_alias(spec.name, homes[0], None)
        return _proxy(spec.name, homes)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


_FINDER = _MovedFinder()


def install() -> None:
    """Answer the old module paths (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
