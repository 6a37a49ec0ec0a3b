"""The example SaaS app of ``examples/saas``, built on Flask (see README.md in this folder)."""
