"""A small SaaS app built on clerk-sync (see README.md in this folder)."""
