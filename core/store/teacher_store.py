"""The teacher store: the only code that reads or writes a TeachCache Zarr store.

``docs/store-format.md`` is the specification this module implements; every group, array and attribute name
below is spelled only here. A store is one Zarr v3 group holding the preprocessed cases (written by
``teachcache preprocess``) and, per teacher, its cached outputs for every case (written by ``teachcache cache``):

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
"""

from __future__ import annotations

import getpass
import hashlib
import itertools
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from core.errors import StoreError
from core.store.encoding import DEFAULT_ENCODING, SoftmaxEncoding, get_encoding
from core.terms import ATTENTION_KINDS

__all__ = [
    "ATTENTION_KINDS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ArrayInfo",
    "Box",
    "TeacherStore",
    "compressor_for",
    "entry_hash",
    "entry_key_difference",
    "store_write_lock",
]

FORMAT_NAME = "teachcache-store"
FORMAT_VERSION = "2.1"
# a teacher key: "<name>/fold_<k>" or "<name>/all_folds"
_SLOT = re.compile(r"^(fold_[0-9]+|all_folds)$")

_ATTR = "teachcache"

# zarr warns, each time it parses one, that numcodecs codecs are outside the v3 spec; the store uses numcodecs'
# Delta filter on purpose (docs/store-format.md says so), so that one message is silenced wherever it arises.
warnings.filterwarnings(
    "ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning
)
_SPATIAL = ("x", "y", "z")

Box = tuple[slice, slice, slice]


def _open_group(location: str, mode: str, **kwargs: Any) -> zarr.Group:
    """``zarr.open_group`` for a path or an fsspec URL (``file://`` URLs create missing folders)."""
    if location.startswith("file://"):
        kwargs["storage_options"] = {"auto_mkdir": True}
    return zarr.open_group(location, mode=mode, **kwargs)


def compressor_for(dtype: np.dtype) -> BloscCodec:
    """Blosc/zstd level 5; bit-shuffle for 1- and 2-byte types, byte-shuffle for wider ones."""
    # bitshuffle suits low-entropy floats (smooth maps); byte shuffle suits wider types
    shuffle = "bitshuffle" if np.dtype(dtype).itemsize <= 2 else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


def _chunks(shape: Sequence[int], spatial_chunk: Sequence[int]) -> tuple[int, ...]:
    """Chunk shape: whole leading (channel) axes, ``spatial_chunk`` clipped to the array on spatial axes."""
    lead = len(shape) - 3
    return tuple(shape[:lead]) + tuple(min(s, c) for s, c in zip(shape[lead:], spatial_chunk, strict=True))


@dataclass(frozen=True)
class ArrayInfo:
    """What ``teachcache inspect`` reports for one array."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    codecs: str
    stored_bytes: int
    shards: tuple[int, ...] | None = None
    raw_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "chunks": list(self.chunks),
            "shards": list(self.shards) if self.shards else None,
            "codecs": self.codecs,
            "stored_bytes": self.stored_bytes,
            "raw_bytes": self.raw_bytes,
        }


class TeacherStore:
    """Typed access to one store. Open with :meth:`create` (stage 1) or :meth:`open`.

    Args:
        group: the root Zarr group.
        location: the path or URL it was opened from, for messages.
        chunk_size: spatial chunk shape for new arrays.
    """

    def __init__(
        self,
        group: zarr.Group,
        location: str,
        chunk_size: Sequence[int] = (64, 64, 64),
        softmax_encoding: str = DEFAULT_ENCODING,
    ):
        self._root = group
        self.location = location
        self.chunk_size = tuple(chunk_size)
        self.encoding: SoftmaxEncoding = get_encoding(softmax_encoding)
        self._arrays: dict[str, zarr.Array] = {}
        self._encodings: dict[tuple[str, str], SoftmaxEncoding] = {}

    # ------------------------------------------------------------------ opening
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
            meta = store.metadata
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
            return store
        try:
            group = _open_group(location, mode="w-", zarr_format=3)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
            raise StoreError(
                f"{location} exists but is not a TeachCache store; choose another store.path or remove it"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot create a store at {location}: {exc.strerror or exc}") from None
        group.attrs[_ATTR] = {
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
        """True when ``path`` holds a Zarr group (TeachCache's or not)."""
        try:
            _open_group(str(path), mode="r", use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            return False
        except (OSError, ValueError, json.JSONDecodeError):
            return True
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
            group = _open_group(location, mode="r+" if mode == "a" else mode, use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            local = (
                None
                if "://" in location and not location.startswith("file://")
                else Path(location.removeprefix("file://"))
            )
            if local is not None and local.exists():
                raise StoreError(
                    f"{location} is not a TeachCache store (no Zarr group there): pass the store's path (the "
                    "`.zarr` folder that store.path names), or run `make cache` to create one"
                ) from None
            raise StoreError(
                f"no store at {location}: run `make cache` (teachcache preprocess, then teachcache cache) first"
            ) from None
        except (zarr.errors.NodeTypeValidationError, ValueError, json.JSONDecodeError) as exc:
            raise StoreError(f"{location} is not a readable Zarr v3 group ({exc})") from None
        meta = group.attrs.get(_ATTR)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise StoreError(
                f"{location} is a Zarr group but not a TeachCache store (no '{_ATTR}' attributes)"
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
        return cls(group, location, chunk_size)

    @classmethod
    def delete(cls, path: str | Path) -> None:
        """Remove a store (for ``--overwrite``); refuses anything that is not a TeachCache store."""
        import fsspec

        cls.open(path)  # StoreError for a foreign or missing location
        fs, root = fsspec.core.url_to_fs(str(path))
        fs.rm(root, recursive=True)

    @property
    def metadata(self) -> dict[str, Any]:
        """The root attributes: format, dataset description, preprocessing and its hash, splits."""
        return dict(self._root.attrs[_ATTR])

    def update_metadata(self, **fields: Any) -> None:
        meta = self.metadata
        meta.update(fields)
        self._root.attrs[_ATTR] = meta

    def drop_consolidated(self) -> None:
        """Remove the consolidated metadata from the root before a stage writes.

        Zarr re-reads the root's ``zarr.json`` for every node it creates; with the whole store's metadata
        consolidated there (about 1.4 kB per array: 3.5 MB for the demo's 20 cases × 15 teacher folds), each
        array creation cost tens of milliseconds of JSON parsing, growing with the store. The stage writes without
        it and :meth:`consolidate` rebuilds it at the end.
        """
        self._root.update_attributes({})  # opened without consolidated metadata: the rewrite leaves it out

    def consolidate(self) -> None:
        """Write consolidated metadata once, after every writer has finished."""
        with warnings.catch_warnings():  # zarr notes that consolidation is not yet in the v3 spec
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self._root.store)

    # ------------------------------------------------------------------ helpers
    def _write_array(
        self, group: zarr.Group, name: str, data: np.ndarray, dims: Sequence[str], filters: Sequence[Any] = ()
    ) -> None:
        with warnings.catch_warnings():  # zarr notes that numcodecs filters are outside the v3 spec
            warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
            self._create_array(group, name, data, dims, filters)

    def _create_array(
        self, group: zarr.Group, name: str, data: np.ndarray, dims: Sequence[str], filters: Sequence[Any]
    ) -> None:
        group.create_array(
            name,
            data=data,
            chunks=_chunks(data.shape, self.chunk_size) if data.ndim >= 3 else data.shape,
            filters=list(filters),
            compressors=compressor_for(data.dtype),
            dimension_names=list(dims),
            overwrite=True,
            # every chunk is written, even one equal to the fill value, so a lost chunk file is detectable
            config={"write_empty_chunks": True},
        )

    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            try:
                with warnings.catch_warnings():  # the numcodecs Delta filter: see _write_array
                    warnings.filterwarnings(
                        "ignore", message="Numcodecs codecs are not in the Zarr version 3"
                    )
                    arr = self._root[path]
            except KeyError:
                raise StoreError(f"{self.location}: missing array '{path}'") from None
            self._arrays[path] = arr
        return arr

    def _complete(self, path: str) -> bool:
        try:
            return bool(self._root[path].attrs.get("complete", False))
        except KeyError:
            return False

    # ------------------------------------------------------------------ cases
    def case_ids(self) -> list[str]:
        """Identifiers of complete cases, sorted."""
        cases = self._root["cases"]
        return sorted(k for k in cases.group_keys() if self._complete(f"cases/{k}"))

    def has_case(self, case_id: str) -> bool:
        return self._complete(f"cases/{case_id}")

    def write_case(
        self,
        case_id: str,
        image: np.ndarray,
        label: np.ndarray,
        foreground: np.ndarray,
        attrs: dict[str, Any],
    ) -> None:
        """Write one preprocessed case; it becomes visible when its ``complete`` attribute is set, last.

        Args:
            image: (C, X, Y, Z) float32.
            label: (X, Y, Z) uint8.
            foreground: (N, 4) int32 rows of (class, x, y, z).
            attrs: JSON-serialisable case metadata (affines, shapes, spacing).
        """
        if image.ndim != 4 or image.shape[1:] != label.shape:
            raise ValueError(f"image {image.shape} must be (C, X, Y, Z) on the label's grid {label.shape}")
        if foreground.ndim != 2 or foreground.shape[1] != 4:
            raise ValueError(f"foreground must be (N, 4) rows of (class, x, y, z), got {foreground.shape}")
        group = self._root.require_group(f"cases/{case_id}")
        group.attrs["complete"] = False
        self._write_array(group, "image", image.astype(np.float32, copy=False), ("channel", *_SPATIAL))
        self._write_array(group, "label", label.astype(np.uint8, copy=False), _SPATIAL)
        self._write_array(group, "foreground", foreground.astype(np.int32, copy=False), ("point", "coord"))
        group.attrs.update({**attrs, "shape": list(label.shape), "all_chunks": True})
        group.attrs["complete"] = True

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        if not self.has_case(case_id):
            raise StoreError(f"{self.location}: case '{case_id}' is missing or incomplete; run `make cache`")
        return dict(self._root[f"cases/{case_id}"].attrs)

    def case_shape(self, case_id: str) -> tuple[int, int, int]:
        return tuple(self._array(f"cases/{case_id}/label").shape)  # type: ignore[return-value]

    def read_image(self, case_id: str, box: Box | None = None) -> np.ndarray:
        """(C, X, Y, Z) float32, or the ``box`` region of it."""
        arr = self._array(f"cases/{case_id}/image")
        return arr[(slice(None), *box)] if box is not None else arr[...]

    def read_label(self, case_id: str, box: Box | None = None) -> np.ndarray:
        """(X, Y, Z) uint8, or the ``box`` region of it."""
        arr = self._array(f"cases/{case_id}/label")
        return arr[box] if box is not None else arr[...]

    def read_foreground(self, case_id: str) -> np.ndarray:
        """(N, 4) int32 rows of (class, x, y, z)."""
        return self._array(f"cases/{case_id}/foreground")[...]

    # ------------------------------------------------------------------ teachers
    def teacher_keys(self) -> list[str]:
        """Every cached teacher copy, as ``"<name>/<slot>"`` keys (``unetr/fold_0``, ``nnunet/all_folds``)."""
        teachers = self._root["teachers"]
        keys = []
        for name in sorted(teachers.group_keys()):
            keys += [f"{name}/{slot}" for slot in sorted(teachers[name].group_keys()) if _SLOT.match(slot)]
        return keys

    def write_teacher_metadata(self, teacher: str, provenance: dict[str, Any]) -> None:
        group = self._root.require_group(f"teachers/{teacher}")
        group.attrs[_ATTR] = provenance

    def teacher_metadata(self, teacher: str) -> dict[str, Any]:
        try:
            return dict(self._root[f"teachers/{teacher}"].attrs[_ATTR])
        except KeyError:
            known = ", ".join(self.teacher_keys()) or "none"
            slot = teacher.rsplit("/", 1)[-1]
            fold = slot.removeprefix("fold_") if slot.startswith("fold_") else None
            how = f"`make cache FOLD={fold}`" if fold is not None else "`make cache`"
            raise StoreError(
                f"{self.location}: teacher '{teacher}' is not cached (cached: {known}); run {how}"
            ) from None

    def has_entry(self, teacher: str, case_id: str) -> bool:
        return self._complete(f"teachers/{teacher}/{case_id}")

    def entry_attrs(self, teacher: str, case_id: str) -> dict[str, Any]:
        return dict(self._root[f"teachers/{teacher}/{case_id}"].attrs)

    def write_entry(
        self,
        teacher: str,
        case_id: str,
        logits: np.ndarray,
        coarse: np.ndarray,
        fine: np.ndarray,
        sketches: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]] | None = None,
        on_array: Callable[[str], None] | None = None,
        sketch_dtype: str = "int8",
        **attrs: Any,
    ) -> None:
        """Write one teacher's outputs for one case as a new entry, replacing any previous one whole.

        The previous entry (its arrays and attributes, sketches included) is deleted first and the new group is
        created with ``complete: false``; ``complete: true`` is written last, so an interrupted write leaves an
        absent or incomplete entry, never a mix of old and new.

        Args:
            logits: (K, X, Y, Z) float32 teacher logits on the case's preprocessed grid.
            coarse: (x, y, z) float32 coarse attention map on the teacher's En grid (any scale).
            fine: (x, y, z) float32 fine attention map on the teacher's Dn-1 grid (any scale).
            sketches: optional ``{"coarse" | "fine": ((k, x, y, z) sketch, (C, k) basis, its attributes)}``.
            on_array: called with each array's name right after it is written (progress reporting; the
                kill-and-resume test uses it to die midway through an entry).
            sketch_dtype: ``"int8"`` (each channel quantised with its own scale, kept in the array's ``scale``
                attribute) or ``"float16"``.
            attrs: JSON-serialisable entry attributes (e.g. ``checkpoint_sha256``, ``entry_key``,
                ``entry_hash``).
        """
        shape = self.case_shape(case_id)
        if tuple(logits.shape[1:]) != shape:
            raise ValueError(f"logits {logits.shape} do not match case '{case_id}' grid {shape}")
        self._forget_entry(teacher, case_id)
        parent = self._root.require_group(f"teachers/{teacher}")
        # delete first (a no-op when absent): zarr would otherwise merge old attributes and keep old arrays
        del parent[case_id]
        group = parent.create_group(case_id, attributes={"complete": False})

        def written(name: str) -> None:
            if on_array is not None:
                on_array(name)

        self._write_array(
            group, "softmax", self.encoding.encode(logits), ("class", *_SPATIAL), self.encoding.zarr_filters()
        )
        group["softmax"].attrs.update(self.encoding.attrs())
        written("softmax")
        strides = {}
        for kind, amap in zip(ATTENTION_KINDS, (coarse, fine), strict=True):
            self._write_array(group, kind, _unit_rms(amap).astype(np.float16), _SPATIAL)
            strides[f"{kind}_stride"] = [s / m for s, m in zip(shape, amap.shape, strict=True)]
            written(kind)
        sketch_attrs = {}
        for kind, (sketch, basis, meta) in (sketches or {}).items():
            stored, scale = _quantise_sketch(sketch, sketch_dtype)
            self._write_array(group, f"{kind}_sketch", stored, ("channel", *_SPATIAL))
            if scale is not None:
                group[f"{kind}_sketch"].attrs["scale"] = scale
            strides[f"{kind}_sketch_stride"] = [s / m for s, m in zip(shape, sketch.shape[1:], strict=True)]
            self._write_array(group, f"{kind}_sketch_basis", basis.astype(np.float32), ("feature", "channel"))
            sketch_attrs[kind] = meta
            written(f"{kind}_sketch")
        if sketch_attrs:
            attrs = {**attrs, "sketch": sketch_attrs}
        group.attrs.update({"softmax_encoding": self.encoding.name, **strides, **attrs, "all_chunks": True})
        group.attrs["complete"] = True

    def _forget_entry(self, teacher: str, case_id: str) -> None:
        """Drop this object's cached array handles and encoding of an entry about to be rewritten."""
        prefix = f"teachers/{teacher}/{case_id}/"
        for key in [k for k in self._arrays if k.startswith(prefix)]:
            del self._arrays[key]
        self._encodings.pop((teacher, case_id), None)

    def _require_entry(self, teacher: str, case_id: str) -> None:
        if not self.has_entry(teacher, case_id):
            raise StoreError(
                f"{self.location}: no complete cache entry for teacher '{teacher}', case '{case_id}'; "
                "run `make cache` to (re)compute it"
            )

    def _entry_encoding(self, teacher: str, case_id: str) -> SoftmaxEncoding:
        key = (teacher, case_id)
        if key not in self._encodings:
            self._require_entry(teacher, case_id)
            name = self._root[f"teachers/{teacher}/{case_id}"].attrs["softmax_encoding"]
            # format ≤ 1.2 took margins against background; the array says which since 1.3
            reference = self._array(f"teachers/{teacher}/{case_id}/softmax").attrs.get(
                "margin_reference", "background"
            )
            self._encodings[key] = get_encoding(name, reference)
        return self._encodings[key]

    def _read_softmax_array(self, teacher: str, case_id: str, box: Box | None) -> np.ndarray:
        arr = self._array(f"teachers/{teacher}/{case_id}/softmax")
        return arr[(slice(None), *box)] if box is not None else arr[...]

    def read_scores(self, teacher: str, case_id: str, box: Box | None = None) -> np.ndarray:
        """(K, X, Y, Z) float32 scores equal to the teacher's logits up to a per-voxel constant."""
        enc = self._entry_encoding(teacher, case_id)
        return enc.log_scores(self._read_softmax_array(teacher, case_id, box))

    def read_softmax(
        self, teacher: str, case_id: str, box: Box | None = None, temperature: float = 1.0
    ) -> np.ndarray:
        """(K, X, Y, Z) float32 teacher probabilities re-tempered to ``temperature``: softmax(scores / T)."""
        enc = self._entry_encoding(teacher, case_id)
        return enc.decode(self._read_softmax_array(teacher, case_id, box), temperature)

    def read_attention(self, teacher: str, case_id: str, kind: str) -> tuple[np.ndarray, tuple[float, ...]]:
        """A whole attention map and its stride (voxels of the case per map voxel, per axis).

        Returns:
            ``(map, stride)`` with ``map`` (x, y, z) float32.
        """
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        attrs = self._root[f"teachers/{teacher}/{case_id}"].attrs
        amap = self._array(f"teachers/{teacher}/{case_id}/{kind}")[...].astype(np.float32)
        return amap, tuple(attrs[f"{kind}_stride"])

    def has_sketch(self, teacher: str, case_id: str, kind: str) -> bool:
        return kind in self.entry_attrs(teacher, case_id).get("sketch", {})

    def read_sketch(
        self, teacher: str, case_id: str, kind: str, region: Box | None = None
    ) -> tuple[np.ndarray, tuple[float, ...]]:
        """A feature sketch (k, x, y, z) float32 of the ``kind`` tap — whole, or ``region`` of the tap's own grid
        (only the chunks it touches are read and decoded) — and its stride."""
        if not self.has_sketch(teacher, case_id, kind):
            raise StoreError(
                f"{self.location}: teacher '{teacher}', case '{case_id}' has no {kind} feature sketch; set "
                "store.feature_sketch_channels and re-run `make cache ARGS=--overwrite`"
            )
        attrs = self._root[f"teachers/{teacher}/{case_id}"].attrs
        array = self._array(f"teachers/{teacher}/{case_id}/{kind}_sketch")
        data = (array[(slice(None), *region)] if region is not None else array[...]).astype(np.float32)
        scale = array.attrs.get("scale")
        if scale is not None:  # int8, per channel (format ≥ 2.1)
            data *= np.asarray(scale, dtype=np.float32)[:, None, None, None]
        if f"{kind}_sketch_stride" in attrs:  # its own grid (format ≥ 2.1); before, always its tap's
            return data, tuple(attrs[f"{kind}_sketch_stride"])
        return data, tuple(attrs[f"{kind}_stride"])

    def sketch_grid(self, teacher: str, case_id: str, kind: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The ``kind`` sketch's grid (x, y, z) and stride in case voxels, without reading it."""
        if not self.has_sketch(teacher, case_id, kind):
            self.read_sketch(teacher, case_id, kind)  # raises the explanatory StoreError
        attrs = self._root[f"teachers/{teacher}/{case_id}"].attrs
        shape = tuple(self._array(f"teachers/{teacher}/{case_id}/{kind}_sketch").shape[1:])
        return shape, tuple(attrs.get(f"{kind}_sketch_stride", attrs[f"{kind}_stride"]))

    def read_sketch_basis(self, teacher: str, case_id: str, kind: str) -> np.ndarray:
        """The (C, k) orthonormal basis of a sketch: ``basis @ sketch`` is the feature in the teacher's channels."""
        if not self.has_sketch(teacher, case_id, kind):
            self.read_sketch(teacher, case_id, kind)  # raises the explanatory StoreError
        try:
            return self._root[f"teachers/{teacher}/{case_id}/{kind}_sketch_basis"][...]
        except KeyError:
            raise StoreError(
                f"{self.location}: teacher '{teacher}' was cached before sketch bases were stored (store format "
                "< 1.2), which feature terms (ffd, rgd) need; re-run `make cache ARGS=--overwrite`"
            ) from None

    def missing_chunks(self, group_path: str) -> dict[str, int] | None:
        """Chunks lost from the arrays of a case (``cases/<case>``) or entry (``teachers/<key>/<case>``) group.

        Returns:
            ``{array name: number of chunk files missing}`` (empty when whole), or ``None`` for a group written
            before every chunk was stored (format < 1.3), where a missing chunk cannot be told from a skipped one.
        """
        group = self._root[group_path]
        if not group.attrs.get("all_chunks"):
            return None
        missing = {}
        for name, arr in group.arrays():
            lost = arr.nchunks - arr.nchunks_initialized
            if lost:
                missing[name] = int(lost)
        return missing

    def undecodable_chunks(self, group_path: str) -> dict[str, list[str]]:
        """Stored chunks of a case or entry group's arrays that cannot be decoded (truncated, corrupt).

        Decodes every chunk of every array of the group one by one: slow, meant to locate the damage once a
        whole-array read of the group has failed.

        Returns:
            ``{array name: [store keys of its undecodable chunks, e.g. "teachers/t/c/fine/c/0/0/0"]}``; empty when
            every stored chunk decodes (a missing chunk reads as fill values here: see :meth:`missing_chunks`).
        """
        damaged = {}
        for name, arr in self._root[group_path].arrays():
            bad = []
            for coords in itertools.product(*(range(n) for n in arr.cdata_shape)):
                try:
                    arr.get_block_selection(coords)
                except Exception:  # codec errors come from blosc, numcodecs and zarr in many types
                    bad.append(f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}")
            if bad:
                damaged[name] = bad
        return damaged

    # ------------------------------------------------------------------ lazy views
    def lazy_maps(self, teacher: str, kind: str) -> dict[str, Any]:
        """A lazy dask array per case of one teacher's ``kind`` (``"softmax"``, ``"coarse"`` or ``"fine"``).

        Nothing is read until computed; used for statistics over a whole teacher. ``"softmax"`` arrays are the
        stored (encoded) values; decode with :meth:`read_softmax` for probabilities.
        """
        import dask.array as da

        if kind not in ("softmax", *ATTENTION_KINDS):
            raise ValueError(f"kind must be softmax, coarse or fine, got {kind!r}")
        return {
            c: da.from_zarr(self._array(f"teachers/{teacher}/{c}/{kind}"))
            for c in self.case_ids()
            if self.has_entry(teacher, c)
        }

    def lazy(self, path: str) -> Any:
        """A lazy dask array of one array of the store (``cases/<case>/image``, ``teachers/<t>/<case>/fine``, ...),
        chunked as stored; nothing is read until computed."""
        import dask.array as da

        return da.from_zarr(self._array(path))

    def entry_encoding(self, teacher: str, case_id: str) -> SoftmaxEncoding:
        """The softmax encoding of one entry (decodes its stored ``softmax`` array)."""
        return self._entry_encoding(teacher, case_id)

    # ------------------------------------------------------------------ inspection
    def array_infos(self) -> list[ArrayInfo]:
        """Every array in the store with its shape, dtype, chunks, codecs and stored bytes."""
        infos = []
        for path, arr in sorted(self._root.arrays(), key=lambda kv: kv[0]):
            infos.append(_info(path, arr))
        for gname, group in sorted(self._root.groups(), key=lambda kv: kv[0]):
            for path, arr in sorted(group.members(max_depth=None), key=lambda kv: kv[0]):
                if isinstance(arr, zarr.Array):
                    infos.append(_info(f"{gname}/{path}", arr))
        return infos


def _is_remote(location: str) -> bool:
    """True for an fsspec URL other than ``file://``: no lock file can sit beside it."""
    return "://" in location and not location.startswith("file://")


def _lock_path(location: str) -> Path:
    """The write lock file of a store.

    ``<store>.lock`` beside a local store (never inside the Zarr group). A remote URL (``s3://…``) has no place
    for a lock file that every machine would see, so its lock is a file in the TeachCache cache folder named after
    the URL: it keeps two writers on this machine apart, not writers on two machines.
    """
    if not _is_remote(location):
        path = Path(location.removeprefix("file://")).resolve()
        return path.with_name(f"{path.name}.lock")
    from core.user_cache import default_hash_cache

    digest = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]  # one lock for `url` and `url/`
    return default_hash_cache().parent / "locks" / f"{digest}.lock"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "?"


@contextmanager
def store_write_lock(location: str | Path, command: str) -> Iterator[None]:
    """Hold the store's exclusive write lock for the block, or refuse at once if another process holds it.

    ``teachcache preprocess`` and ``teachcache cache`` each hold it for their whole run (their dask workers write
    under the driver's lock). It is an OS-level lock (``filelock``, ``fcntl`` on Unix): the kernel releases it when
    its process dies, even by SIGKILL, so a killed run never blocks the next one. Who holds it (command, pid, host,
    user, since) is written beside it (``<lock>.json``), for the message the second process prints.

    Args:
        location: the store's path or fsspec URL (the store need not exist yet).
        command: the teachcache command taking the lock (``"preprocess"``, ``"cache"``), named to a second writer.

    Raises:
        StoreError: another process is writing the store, or the lock file cannot be created or locked.
    """
    from filelock import FileLock, Timeout

    path = _lock_path(str(location))
    info = path.with_name(f"{path.name}.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=0)
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(info.read_text())
            who = (
                f"`teachcache {holder['command']}`, pid {holder['pid']} on {holder['host']} (user {holder['user']}), "
                f"since {holder['since']}"
            )
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise StoreError(
            f"{location} is being written by {who}; wait for it to finish, or stop it (a stopped run resumes where "
            f"it was). Two writers on one store are refused: lock {path}"
        ) from None
    # NotImplementedError: what filelock < 4 raises on a file system without flock
    except (OSError, NotImplementedError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        fix = (
            "set TEACHCACHE_CACHE_DIR to a writable local folder"
            if _is_remote(str(location))
            else f"the folder {path.parent} must be writable, on a file system with file locks"
        )
        raise StoreError(f"cannot take the write lock {path} for {location}: {reason}; {fix}") from None
    try:
        with suppress(OSError):  # the lock holds without its description
            info.write_text(
                json.dumps(
                    {
                        "command": command,
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "user": _user(),
                        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    }
                )
            )
        yield
    finally:
        info.unlink(missing_ok=True)
        lock.release()


def entry_hash(key: dict[str, Any]) -> str:
    """SHA-256 of an entry key's canonical JSON (sorted keys, no whitespace): the ``entry_hash`` attribute."""
    payload = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_key_difference(stored: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    """The fields of ``wanted`` that a stored entry key lacks or holds another value for (all when no key)."""
    if not isinstance(stored, dict):
        return list(wanted)
    return [k for k, v in wanted.items() if stored.get(k) != v]


def _is_empty_group(location: str) -> bool:
    """True for a folder holding nothing but the ``zarr.json`` of a group with no attributes (nothing to lose)."""
    import fsspec

    try:
        group = _open_group(location, mode="r", use_consolidated=False)
        if dict(group.attrs) or list(group.keys()):
            return False
        fs, root = fsspec.core.url_to_fs(location)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] == ["zarr.json"]
    except Exception:  # not a readable group: not ours to remove
        return False


def _info(path: str, arr: zarr.Array) -> ArrayInfo:
    names = [type(c).__name__.replace("Codec", "") for c in (*arr.filters, *arr.compressors)]
    return ArrayInfo(
        path,
        tuple(arr.shape),
        str(arr.dtype),
        tuple(arr.chunks),
        ", ".join(names) or "none",
        int(arr.nbytes_stored()),
        tuple(arr.shards) if arr.shards else None,
        int(arr.nbytes),
    )


def _quantise_sketch(sketch: np.ndarray, dtype: str) -> tuple[np.ndarray, list[float] | None]:
    """A sketch as stored: int8 with a scale per channel (max |value| / 127, so the largest value is exact in
    magnitude and every value is within scale / 2), or float16."""
    if dtype == "float16":
        return sketch.astype(np.float16), None
    if dtype != "int8":
        raise ValueError(f"unknown sketch dtype '{dtype}' (int8 or float16)")
    peak = np.abs(sketch).reshape(sketch.shape[0], -1).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(sketch / scale[:, None, None, None]), -127, 127).astype(np.int8)
    return q, [float(v) for v in scale]


def _unit_rms(amap: np.ndarray) -> np.ndarray:
    """The L2-normalised map times √N (unit root-mean-square): same direction, float16-friendly at any size."""
    amap = amap.astype(np.float64)
    norm = np.linalg.norm(amap)
    return (amap * (np.sqrt(amap.size) / norm) if norm > 0 else amap).astype(np.float32)
