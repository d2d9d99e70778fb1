"""``python -m teachcache``: the same command as the ``teachcache`` console script."""

from __future__ import annotations

from teachcache.cli import main

main()
