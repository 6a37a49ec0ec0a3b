"""The operator console: deliveries, replay, drift, users, audit log, as server-rendered pages.

Mount it in your own Starlette/FastAPI app, or enable it in ``clerk-sync serve`` with
``CLERK_SYNC_CONSOLE=1`` (it is then served at ``/console``)::

    from starlette.routing import Mount
    from clerk_sync.integrations.console import create_console

    app.routes.append(Mount("/console", app=create_console(store, settings)))

Admins sign in with Clerk (role confirmed against the database), operators with
``CLERK_SYNC_CONSOLE_TOKEN``. Every action is a POST with a CSRF token and writes an audit row;
``CLERK_SYNC_CONSOLE_READ_ONLY=1`` refuses them all (signing out excepted). Failed sign-ins are limited per
client address: ``create_console(..., sign_ins=SignInThrottle(limit=5, window_s=900))`` (default 10 in 10 minutes).
"""

from __future__ import annotations

from clerk_sync.integrations.console._app import check_console_settings, create_console
from clerk_sync.integrations.console._throttle import SignInThrottle

__all__ = ["SignInThrottle", "check_console_settings", "create_console"]
