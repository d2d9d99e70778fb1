"""The ``teachcache`` console entry layer (Typer); the work lives in ``core``, ``cache_teachers`` and ``train_student``."""
