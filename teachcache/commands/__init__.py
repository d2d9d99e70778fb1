"""The ``teachcache`` commands, one module per group; importing a module registers its commands on
:data:`teachcache.app.app` (:mod:`teachcache.cli` imports them all).

- :mod:`~teachcache.commands.stages`: synth, preprocess, teachers, cache, distil, cv, report
- :mod:`~teachcache.commands.store`: ls, inspect, show, export, view, stats, diff, verify
- :mod:`~teachcache.commands.predict`: predict, evaluate, export-model
- :mod:`~teachcache.commands.models`: models
- :mod:`~teachcache.commands.bench`: bench, bench-store
- :mod:`~teachcache.commands.dataset`: dataset check
"""

from __future__ import annotations

__all__: list[str] = []
