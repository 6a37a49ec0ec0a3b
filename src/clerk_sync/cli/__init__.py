"""The ``clerk-sync`` command line: ``main`` wires the commands; one module per command family
(``reconcile``, ``dev``, ``doctor``), shared argument parsing in ``_args``."""

from __future__ import annotations

from clerk_sync.cli.main import app, main

__all__ = ["app", "main"]
