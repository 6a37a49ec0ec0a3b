"""clerk-sync: keep your SQL users/organizations in step with Clerk, and verify Clerk sessions locally.

The package has no re-exports: import from the module that owns a name (``clerk_sync.config.Settings``,
``clerk_sync.ingest.WebhookProcessor``, ``clerk_sync.users.AuthUsers`` ...). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("clerk-sync")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"
