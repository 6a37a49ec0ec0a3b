"""A local Clerk: Backend API subset, JWKS, session tokens and Svix-style webhooks.

It is Clerk, not clerk-sync: nothing here imports the rest of the package, and clerk-sync
talks to it over real HTTP.  ``create_app`` builds the ASGI app plus the in-process
:class:`Emulator` (knobs, seeding, token minting); ``serve`` runs it with uvicorn.
"""

from __future__ import annotations

from .app import create_app, serve
from .config import SVIX_RETRY_SCHEDULE_S, EmulatorConfig, generate_webhook_secret
from .core import Emulator
from .delivery import sign_headers
from .errors import ClerkAPIError
from .faults import FaultSettings

__all__ = [
    "SVIX_RETRY_SCHEDULE_S",
    "ClerkAPIError",
    "Emulator",
    "EmulatorConfig",
    "FaultSettings",
    "create_app",
    "generate_webhook_secret",
    "serve",
    "sign_headers",
]
