"""Reading a store: its cases (image, label, foreground points, attributes) and its teacher entries (softmax at
any temperature, attention maps, feature sketches), whole or a box of them, and lazy dask views."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.errors import StoreError
from core.store.encoding import SoftmaxEncoding, get_encoding
from core.store.format import Box
from core.store.root import StoreRoot
from core.terms import ATTENTION_KINDS

__all__ = ["StoreReading"]


class StoreReading(StoreRoot):
    """The reading half of :class:`~core.store.teacher_store.TeacherStore`. Only complete cases and entries (their
    ``complete`` attribute set, last) are listed or read."""

    # ------------------------------------------------------------------ cases
    def case_ids(self) -> list[str]:
        """Identifiers of complete cases, sorted.

        Raises:
            StoreError: a case's ``zarr.json`` is damaged, naming the file.
        """
        return [k for k in self._child_names("cases") if self._complete(f"cases/{k}")]

    def damaged_cases(self) -> list[str]:
        """Cases whose group metadata cannot be read (``case_ids`` raises on them; ``verify`` lists them)."""
        return [k for k in self._child_names("cases") if self.group_state(f"cases/{k}") == "damaged"]

    def has_case(self, case_id: str) -> bool:
        return self._complete(f"cases/{case_id}")

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

    # ------------------------------------------------------------------ entries
    def has_entry(self, teacher: str, case_id: str) -> bool:
        return self._complete(f"teachers/{teacher}/{case_id}")

    def entry_attrs(self, teacher: str, case_id: str) -> dict[str, Any]:
        return dict(self._root[f"teachers/{teacher}/{case_id}"].attrs)

    def _require_entry(self, teacher: str, case_id: str) -> None:
        if not self.has_entry(teacher, case_id):
            raise StoreError(
                f"{self.location}: no complete cache entry for teacher '{teacher}', case '{case_id}'; "
                "run `make cache` to (re)compute it"
            )

    def entry_encoding(self, teacher: str, case_id: str) -> SoftmaxEncoding:
        """The softmax encoding of one entry (decodes its stored ``softmax`` array)."""
        return self._entry_encoding(teacher, case_id)

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

    # ------------------------------------------------------------------ feature sketches
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
