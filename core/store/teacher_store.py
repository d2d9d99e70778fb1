"""The teacher store: the only code that reads or writes a TeachCache Zarr store.

``docs/store-format.md`` is the specification this package implements; every group, array and attribute name is
spelled only in it (:mod:`core.store.format` holds the names and storage settings). A store is one Zarr v3 group
holding the preprocessed cases (written by ``teachcache preprocess``) and, per teacher, its cached outputs for
every case (written by ``teachcache cache``):

```
<store>/                              attrs["teachcache"]: format, version, dataset, preprocessing, splits
<store>/cases/<case>/image            (C, X, Y, Z) float32
<store>/cases/<case>/label            (X, Y, Z) uint8
<store>/cases/<case>/foreground       (N, 4) int32: class, x, y, z of sampled foreground voxels
<store>/teachers/<name>/<slot>/              attrs["teachcache"]: provenance
<store>/teachers/<name>/<slot>/<case>/softmax   the class distribution, encoded (core.store.encoding)
<store>/teachers/<name>/<slot>/<case>/coarse    (x, y, z) attention map of the deepest encoder feature
<store>/teachers/<name>/<slot>/<case>/fine      (x, y, z) attention map of the second-to-last decoder feature
```

``<slot>`` is ``fold_<k>`` for a teacher trained per fold (the copy fold k's student learns from, which never saw
fold k's validation cases) or ``all_folds`` for one checkpoint used in every fold. Every method taking a
``teacher`` takes its *key*, ``"<name>/<slot>"`` (:meth:`core.config.TeacherConfig.store_key`).

A case or (teacher, case) entry is visible only once its group's ``complete`` attribute is true; it is written
after every array, so an interrupted write is never read.

:class:`TeacherStore` is the one class the rest of TeachCache calls. This module opens and creates stores; its
other methods come from the parts named after what they do: :mod:`core.store.reading`,
:mod:`core.store.writing` (with :mod:`core.store.integrity`'s chunk digests), :mod:`core.store.provenance`,
:mod:`core.store.consolidation` and :mod:`core.store.chunks`, over the shared root of :mod:`core.store.root`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr
import zarr.errors

from core.errors import StoreError
from core.store.chunks import StoreChunks
from core.store.consolidation import StoreConsolidation
from core.store.format import ATTRS_KEY, FORMAT_NAME, FORMAT_VERSION
from core.store.locking import read_only_store
from core.store.provenance import StoreProvenance
from core.store.root import open_group
from core.store.writing import StoreWriting

__all__ = ["TeacherStore", "unreachable_store"]


class TeacherStore(StoreWriting, StoreProvenance, StoreConsolidation, StoreChunks):
    """Typed access to one store. Open with :meth:`create` (stage 1) or :meth:`open`.

    Reads cases and entries (:class:`~core.store.reading.StoreReading`), writes them with their chunk digests and
    checks those (:class:`~core.store.writing.StoreWriting`, :class:`~core.store.integrity.StoreIntegrity`), keeps the store's and its teachers' metadata
    (:class:`~core.store.provenance.StoreProvenance`), drops and rebuilds consolidated metadata
    (:class:`~core.store.consolidation.StoreConsolidation`) and looks at chunks
    (:class:`~core.store.chunks.StoreChunks`); constructed with :class:`~core.store.root.StoreRoot`'s arguments.
    """

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dataset: dict[str, Any],
        preprocessing: dict[str, Any],
        preprocessing_hash: str,
        splits: list[dict[str, list[str]]],
        chunk_size: Sequence[int] = (64, 64, 64),
    ) -> TeacherStore:
        """Create a new store, or reopen an existing one for writing when it was made with the same preprocessing.

        Raises:
            StoreError: the path holds a store made with other preprocessing (or another dataset), or something
                that is not a TeachCache store.
        """
        location = str(path)
        if cls.exists(path) and _is_empty_group(location):
            # an empty group left by an older TeachCache's `cache` run before `preprocess`: nothing to keep
            import fsspec

            fs, root = fsspec.core.url_to_fs(location)
            fs.rm(root, recursive=True)
        if cls.exists(path):
            store = cls.open(path, mode="a", chunk_size=chunk_size)
            _check_same_source(location, store.metadata, preprocessing_hash, dataset)
            return store
        try:
            group = open_group(location, mode="w-", zarr_format=3)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
            raise StoreError(
                f"{location} exists but is not a TeachCache store; choose another store.path or remove it"
            ) from None
        except OSError as exc:
            refused = read_only_store(exc, location, "preprocess")  # a bucket we may read but not write
            raise refused or StoreError(
                f"cannot create a store at {location}: {exc.strerror or exc}"
            ) from None
        group.attrs[ATTRS_KEY] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "preprocessing": preprocessing,
            "preprocessing_hash": preprocessing_hash,
            "splits": splits,
        }
        group.require_group("cases")
        group.require_group("teachers")
        return cls(group, location, chunk_size)

    @staticmethod
    def exists(path: str | Path) -> bool:
        """True when ``path`` holds a Zarr group (TeachCache's or not).

        Raises:
            StoreError: a remote location that cannot be reached (bucket, endpoint, credentials).
        """
        try:
            open_group(str(path), mode="r", use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            return False
        except (OSError, ValueError, json.JSONDecodeError):
            return True
        except Exception as exc:  # an object store's client errors (credentials, endpoint) come in many types
            if _is_remote(str(path)):
                raise unreachable_store(str(path), exc) from None
            raise
        return True

    @classmethod
    def open(
        cls, path: str | Path, mode: str = "r", chunk_size: Sequence[int] = (64, 64, 64)
    ) -> TeacherStore:
        """Open an existing store, checking it is ours and of a readable version.

        Raises:
            StoreError: nothing at ``path`` (run ``make cache``), not a TeachCache store, or an unknown major
                format version.
        """
        location = str(path)
        try:
            # "a" would create a missing group: an existing store is opened read-write, nothing is made here
            group = open_group(location, mode="r+" if mode == "a" else mode, use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise _no_store_error(location) from None
        except (zarr.errors.NodeTypeValidationError, ValueError, json.JSONDecodeError) as exc:
            raise StoreError(f"{location} is not a readable Zarr v3 group ({exc})") from None
        except Exception as exc:  # an object store's client errors (credentials, endpoint) come in many types
            if _is_remote(location):
                raise unreachable_store(location, exc) from None
            raise
        _check_format(location, group.attrs.get(ATTRS_KEY))
        return cls(group, location, chunk_size)

    @classmethod
    def delete(cls, path: str | Path) -> None:
        """Remove a store (for ``--overwrite``); refuses anything that is not a TeachCache store."""
        import fsspec

        cls.open(path)  # StoreError for a foreign or missing location
        fs, root = fsspec.core.url_to_fs(str(path))
        fs.rm(root, recursive=True)


def _check_same_source(
    location: str, meta: dict[str, Any], preprocessing_hash: str, dataset: dict[str, Any]
) -> None:
    """Refuse to reopen a store for writing that was made with other preprocessing or from another dataset."""
    if meta["preprocessing_hash"] != preprocessing_hash:
        raise StoreError(
            f"{location} was preprocessed with other settings (preprocessing hash "
            f"{meta['preprocessing_hash'][:12]} ≠ config's {preprocessing_hash[:12]}); "
            "pass --overwrite to rebuild it, or set store.path to a new location"
        )
    if meta["dataset"]["manifest_hash"] != dataset["manifest_hash"]:
        raise StoreError(
            f"{location} was built from another version of the dataset (manifest hash differs); "
            "pass --overwrite to rebuild it, or set store.path to a new location"
        )


def _is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def unreachable_store(location: str, exc: Exception) -> StoreError:
    """An object store that did not answer as a store: the client's reason, and where its settings come from."""
    reason = f"{type(exc).__name__}: {exc}".strip()
    return StoreError(
        f"cannot reach {location} ({reason}); check the bucket name in store.path, the endpoint (AWS_ENDPOINT_URL "
        "for an S3-compatible service) and the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
        "~/.aws/credentials; docs/configuration.md)"
    )


def _missing_bucket(location: str) -> StoreError | None:
    """A remote store whose bucket does not exist (a misspelt name), or ``None``."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(location)
        bucket = root.split("/", 1)[0]
        if fs.exists(bucket):
            return None
    except Exception as exc:  # the client's errors come in many types
        return unreachable_store(location, exc)
    return StoreError(
        f"{location}: the bucket '{bucket}' does not exist (or these credentials cannot see it); check its name in "
        "store.path, or create it"
    )


def _no_store_error(location: str) -> StoreError:
    """Why nothing opened at ``location``: a folder that is not a Zarr group, a bucket that does not exist, or
    nothing there at all."""
    if _is_remote(location):
        missing = _missing_bucket(location)
        if missing is not None:
            return missing
    local = (
        None
        if "://" in location and not location.startswith("file://")
        else Path(location.removeprefix("file://"))
    )
    if local is not None and local.exists():
        return StoreError(
            f"{location} is not a TeachCache store (no Zarr group there): pass the store's path (the "
            "`.zarr` folder that store.path names), or run `make cache` to create one"
        )
    return StoreError(
        f"no store at {location}: run `make cache` (teachcache preprocess, then teachcache cache) first"
    )


def _check_format(location: str, meta: Any) -> None:
    """Refuse a group that is not a TeachCache store, or one of a format version this TeachCache cannot read."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StoreError(
            f"{location} is a Zarr group but not a TeachCache store (no '{ATTRS_KEY}' attributes)"
        )
    version = str(meta.get("format_version", "?"))
    if version.split(".")[0] == "1":
        raise StoreError(
            f"{location} has store format {version}, which keeps one copy of each teacher for every fold (a "
            "teacher trained on one fold has seen the validation cases of the others); this TeachCache keeps "
            f"each teacher per fold (format {FORMAT_VERSION}, docs/store-format.md). Rebuild the store: "
            "`teachcache preprocess -c CONFIG --overwrite`, then `make cache` (or set store.path to a new "
            "location and keep the old store for the TeachCache that wrote it)"
        )
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise StoreError(
            f"{location} has store format {version}; this TeachCache reads format {FORMAT_VERSION.split('.')[0]}.x. "
            "Rebuild the store with this version (`make cache` with --overwrite) or use a matching TeachCache"
        )


def _is_empty_group(location: str) -> bool:
    """True for a folder holding nothing but the ``zarr.json`` of a group with no attributes (nothing to lose)."""
    import fsspec

    try:
        group = open_group(location, mode="r", use_consolidated=False)
        if dict(group.attrs) or list(group.keys()):
            return False
        fs, root = fsspec.core.url_to_fs(location)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] == ["zarr.json"]
    except Exception:  # not a readable group: not ours to remove
        return False
