"""The example SaaS of ``examples/saas`` as a Django project: ``python -m examples.django_saas``."""
