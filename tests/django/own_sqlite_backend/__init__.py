"""A project's own database backend (a subclass of Django's SQLite one), for ``manage.py check``'s W005."""
