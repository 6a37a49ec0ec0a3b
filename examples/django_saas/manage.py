#!/usr/bin/env python
"""Django's command line for the example project, from the repository root:

    DJANGO_SECRET_KEY=... .venv/bin/python examples/django_saas/manage.py clerk_sync migrate

It reads the example's ``settings.py`` (``EXAMPLE_DB``, default ``django_saas_example.db`` in the working
directory; ``CLERK_*`` from the environment), as your project's own ``manage.py`` reads yours."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `examples` imports
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_saas.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
