"""Consolidated metadata: dropped from the root before a stage writes, rebuilt once every writer has finished."""

from __future__ import annotations

import contextlib
import warnings

import zarr

from core.store.root import StoreRoot

__all__ = ["StoreConsolidation"]


class StoreConsolidation(StoreRoot):
    """The consolidation part of :class:`~core.store.teacher_store.TeacherStore`."""

    def drop_consolidated(self) -> None:
        """Remove the consolidated metadata from the root before a stage writes.

        Zarr re-reads the root's ``zarr.json`` for every node it creates; with the whole store's metadata
        consolidated there (about 1.4 kB per array: 3.5 MB for the demo's 20 cases × 15 teacher folds), each
        array creation cost tens of milliseconds of JSON parsing, growing with the store. The stage writes without
        it and :meth:`consolidate` rebuilds it at the end.
        """
        self._root.update_attributes({})  # opened without consolidated metadata: the rewrite leaves it out

    def consolidate(self) -> None:
        """Write consolidated metadata once, after every writer has finished (skipped while a node's metadata is
        damaged)."""
        with warnings.catch_warnings():  # zarr notes that consolidation is not yet in the v3 spec
            warnings.simplefilter("ignore")
            # a node's zarr.json is damaged (`make cache` rewrites it): the store stays unconsolidated, which
            # TeachCache's readers do not need, until a later run consolidates it whole
            with contextlib.suppress(ValueError, TypeError):
                zarr.consolidate_metadata(self._root.store)
