"""Writing a store: preprocessed cases and teacher entries, each made visible only by its ``complete``
attribute, written last, so an interrupted write is never read."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr

from core.store.format import NUMCODECS_WARNING, SPATIAL_DIMS, chunk_shape, compressor_for, shard_shape
from core.store.integrity import StoreIntegrity
from core.store.reading import StoreReading
from core.terms import ATTENTION_KINDS

__all__ = ["StoreWriting"]

# {"coarse" | "fine": ((k, x, y, z) sketch, (C, k) basis, its attributes)}
Sketches = dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]


def _no_progress(name: str) -> None:
    """The default ``on_array``: nothing to report."""


class StoreWriting(StoreReading, StoreIntegrity):
    """The writing half of :class:`~core.store.teacher_store.TeacherStore` (it reads a case's grid to check an
    entry against it)."""

    def _write_array(
        self,
        group: zarr.Group,
        name: str,
        data: np.ndarray,
        dims: Sequence[str],
        filters: Sequence[Any] = (),
        chunks: Sequence[int] | None = None,
        fill_value: Any = None,
    ) -> None:
        """One array, chunked by :func:`~core.store.format.chunk_shape` (spatial arrays) or whole unless ``chunks``
        says otherwise, every chunk stored, even one equal to the fill value, so a lost chunk file is detectable.
        A spatial array of more than one chunk is one shard (its chunks in one file, with an index)."""
        if chunks is None:
            chunks = chunk_shape(data.shape, self.chunk_size) if data.ndim >= 3 else data.shape
        # one shard per spatial array (format ≥ 2.3): one data file per array per entry, its chunks inside
        shards = (
            shard_shape(data.shape, chunks) if data.ndim >= 3 and tuple(chunks) != tuple(data.shape) else None
        )
        with warnings.catch_warnings():  # zarr notes that numcodecs filters are outside the v3 spec
            warnings.filterwarnings("ignore", message=NUMCODECS_WARNING)
            group.create_array(
                name,
                data=data,
                chunks=tuple(chunks),
                shards=shards,
                filters=list(filters),
                compressors=compressor_for(data.dtype),
                dimension_names=list(dims) or None,
                fill_value=fill_value,
                overwrite=True,
                config={"write_empty_chunks": True},
            )

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
        if self.group_state(f"cases/{case_id}") == "damaged":  # unreadable metadata: replaced whole
            del self._root["cases"][case_id]
        group = self._root.require_group(f"cases/{case_id}")
        group.attrs["complete"] = False
        self._write_array(group, "image", image.astype(np.float32, copy=False), ("channel", *SPATIAL_DIMS))
        self._write_array(group, "label", label.astype(np.uint8, copy=False), SPATIAL_DIMS)
        self._write_array(group, "foreground", foreground.astype(np.int32, copy=False), ("point", "coord"))
        group.attrs.update({**attrs, "shape": list(label.shape), "all_chunks": True})
        self.record_digests(group, f"cases/{case_id}")
        group.attrs["complete"] = True

    def write_entry(
        self,
        teacher: str,
        case_id: str,
        logits: np.ndarray,
        coarse: np.ndarray,
        fine: np.ndarray,
        sketches: Sketches | None = None,
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
            on_array: called with each array's name right after it is written, and with ``"chunk_digests"`` before
                the digests are recorded (progress reporting; the kill-and-resume test uses it to die midway
                through an entry).
            sketch_dtype: ``"int8"`` (each channel quantised with its own scale, kept in the array's ``scale``
                attribute) or ``"float16"``.
            attrs: JSON-serialisable entry attributes (e.g. ``checkpoint_sha256``, ``entry_key``,
                ``entry_hash``).
        """
        shape = self.case_shape(case_id)
        if tuple(logits.shape[1:]) != shape:
            raise ValueError(f"logits {logits.shape} do not match case '{case_id}' grid {shape}")
        group = self._new_entry_group(teacher, case_id)
        written = on_array or _no_progress
        self._write_array(
            group,
            "softmax",
            self.encoding.encode(logits),
            ("class", *SPATIAL_DIMS),
            self.encoding.zarr_filters(),
        )
        group["softmax"].attrs.update(self.encoding.attrs())
        written("softmax")
        strides = {}
        for kind, amap in zip(ATTENTION_KINDS, (coarse, fine), strict=True):
            self._write_array(group, kind, _unit_rms(amap).astype(np.float16), SPATIAL_DIMS)
            strides[f"{kind}_stride"] = [s / m for s, m in zip(shape, amap.shape, strict=True)]
            written(kind)
        sketch_attrs = self._write_sketches(group, shape, sketches or {}, sketch_dtype, strides, written)
        if sketch_attrs:
            attrs = {**attrs, "sketch": sketch_attrs}
        group.attrs.update({"softmax_encoding": self.encoding.name, **strides, **attrs, "all_chunks": True})
        written("chunk_digests")
        self.record_digests(group, f"teachers/{teacher}/{case_id}")
        group.attrs["complete"] = True

    def _new_entry_group(self, teacher: str, case_id: str) -> zarr.Group:
        """The entry's group, new and ``complete: false``, after deleting any previous one (a no-op when absent):
        zarr would otherwise merge old attributes and keep old arrays."""
        self._forget_entry(teacher, case_id)
        parent = self._root.require_group(f"teachers/{teacher}")
        del parent[case_id]
        return parent.create_group(case_id, attributes={"complete": False})

    def _write_sketches(
        self,
        group: zarr.Group,
        shape: tuple[int, int, int],
        sketches: Sketches,
        sketch_dtype: str,
        strides: dict[str, list[float]],
        written: Callable[[str], None],
    ) -> dict[str, dict[str, Any]]:
        """Each sketch (quantised) and its float32 basis; its stride is added to ``strides``.

        Returns:
            ``{kind: its attributes}``, the entry's ``sketch`` attribute.
        """
        sketch_attrs = {}
        for kind, (sketch, basis, meta) in sketches.items():
            stored, scale = _quantise_sketch(sketch, sketch_dtype)
            self._write_array(group, f"{kind}_sketch", stored, ("channel", *SPATIAL_DIMS))
            if scale is not None:
                group[f"{kind}_sketch"].attrs["scale"] = scale
            strides[f"{kind}_sketch_stride"] = [s / m for s, m in zip(shape, sketch.shape[1:], strict=True)]
            self._write_array(group, f"{kind}_sketch_basis", basis.astype(np.float32), ("feature", "channel"))
            sketch_attrs[kind] = meta
            written(f"{kind}_sketch")
        return sketch_attrs


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
