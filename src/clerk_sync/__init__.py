"""clerk-sync: keep your SQL users/organizations in step with Clerk, and verify Clerk sessions locally.

The package root re-exports nothing: import from the module that owns a name
(``clerk_sync.config.Settings``, ``clerk_sync.ingest.WebhookProcessor``, ``clerk_sync.auth.JitUsers`` ...).
Folders are layers (see docs/ARCHITECTURE.md): the ground modules here (``errors``, ``config``,
``events``, ``engine``, ``metrics``), the database (``tables``, ``store``, ``migrations``), the services
(``webhooks``, ``ingest``, ``auth/``, ``clerk_api/``, ``reconcile``), the faces (``integrations/``,
``cli/``), and Clerk's stand-in (``emulator/``, ``testing``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from clerk_sync import _compat

__all__ = ["__version__"]

try:
    __version__ = version("clerk-sync")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"

_compat.install()  # the 0.1.x module paths, for one release
