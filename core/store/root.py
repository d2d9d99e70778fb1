"""What every part of a :class:`~core.store.teacher_store.TeacherStore` shares: the root Zarr group, where it
was opened from, and the handles to its arrays read so far."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import zarr

from core.errors import StoreError
from core.store.encoding import DEFAULT_ENCODING, SoftmaxEncoding, get_encoding
from core.store.format import NUMCODECS_WARNING

__all__ = ["StoreRoot", "open_group"]


def open_group(location: str, mode: str, **kwargs: Any) -> zarr.Group:
    """``zarr.open_group`` for a path or an fsspec URL (``file://`` URLs create missing folders)."""
    if location.startswith("file://"):
        kwargs["storage_options"] = {"auto_mkdir": True}
    return zarr.open_group(location, mode=mode, **kwargs)


class StoreRoot:
    """The root group of one store and the handles read from it: the base of the store's parts.

    Args:
        group: the root Zarr group.
        location: the path or URL it was opened from, for messages.
        chunk_size: spatial chunk shape for new arrays.
        softmax_encoding: the encoding new entries store their softmax in (:mod:`core.store.encoding`).
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

    def _array(self, path: str) -> zarr.Array:
        """The array at ``path`` (opened once, then kept).

        Raises:
            StoreError: no array there.
        """
        arr = self._arrays.get(path)
        if arr is None:
            try:
                with warnings.catch_warnings():  # the numcodecs Delta filter: see core.store.format
                    warnings.filterwarnings("ignore", message=NUMCODECS_WARNING)
                    arr = self._root[path]
            except KeyError:
                raise StoreError(f"{self.location}: missing array '{path}'") from None
            self._arrays[path] = arr
        return arr

    def _complete(self, path: str) -> bool:
        """True when the group at ``path`` exists and its ``complete`` attribute is set."""
        try:
            return bool(self._root[path].attrs.get("complete", False))
        except KeyError:
            return False

    def _forget_entry(self, teacher: str, case_id: str) -> None:
        """Drop this object's cached array handles and encoding of an entry about to be rewritten."""
        prefix = f"teachers/{teacher}/{case_id}/"
        for key in [k for k in self._arrays if k.startswith(prefix)]:
            del self._arrays[key]
        self._encodings.pop((teacher, case_id), None)
