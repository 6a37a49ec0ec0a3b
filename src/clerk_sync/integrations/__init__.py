"""Framework adapters over the framework-free core (the only place HTTP status codes are chosen)."""

__all__: list[str] = []
