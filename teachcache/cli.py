"""The ``teachcache`` command: the Typer app of :mod:`teachcache.app` with every command group added to it.

Each module of :mod:`teachcache.commands` declares its commands on its own ``commands`` group;
:data:`COMMAND_GROUPS` adds them to the app in the order ``teachcache --help`` lists them. The console script
(``teachcache = "teachcache.cli:main"``) and ``python -m teachcache`` run :func:`main`.
"""

from __future__ import annotations

from teachcache.app import app
from teachcache.commands import bench, dataset, models, predict, stages, store

__all__ = ["COMMAND_GROUPS", "app", "main"]

COMMAND_GROUPS = (stages, store, predict, models, bench, dataset)
"""The pipeline, the store, the student on new cases, the models, the benchmarks, raw datasets."""

for group in COMMAND_GROUPS:
    app.add_typer(group.commands)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
