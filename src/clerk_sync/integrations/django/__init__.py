"""Django and Django REST framework integration (``pip install 'clerk-sync[django]'``).

Add ``"clerk_sync.integrations.django"`` to ``INSTALLED_APPS`` and configure ``CLERK_SYNC = {...}``
with the same names as the environment variables (:mod:`.conf`). The modules:

- :mod:`.urls` / :mod:`.views`: the webhook endpoint (``include()`` it);
- :mod:`.middleware`: ``request.clerk`` (the verified session) and deny-by-default;
- :mod:`.decorators`, :mod:`.mixins`: route guards for function and class-based views;
- :mod:`.backends`: ``request.user`` as a Django user linked to the Clerk id (opt-in);
- :mod:`.rest_framework`: DRF authentication and permission classes;
- ``manage.py clerk_sync migrate|reconcile|replay|promote``, system checks and read-only admin pages.
"""

from __future__ import annotations

try:
    import django  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("clerk_sync.integrations.django needs Django: pip install 'clerk-sync[django]'") from exc

__all__: list[str] = []
