"""What every part of a :class:`~core.store.teacher_store.TeacherStore` shares: the root Zarr group, where it
was opened from, and the handles to its arrays read so far."""

from __future__ import annotations

import asyncio
import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import zarr

from core.errors import StoreError
from core.store.encoding import DEFAULT_ENCODING, SoftmaxEncoding, get_encoding
from core.store.format import NUMCODECS_WARNING, storage_grid

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
                    arr = self._node(path)
            except KeyError:
                raise StoreError(f"{self.location}: missing array '{path}'") from None
            self._arrays[path] = arr
        return arr

    def _complete(self, path: str) -> bool:
        """True when the group at ``path`` exists and its ``complete`` attribute is set.

        Raises:
            StoreError: its ``zarr.json`` is damaged (truncated, edited), naming the file.
        """
        state = self.group_state(path)
        if state == "damaged":
            self._node(path)  # raises the StoreError naming the file
        return state == "complete"

    def _child_names(self, path: str) -> list[str]:
        """Names of the nodes directly under ``path``, listed from the storage without reading their metadata (so
        one damaged ``zarr.json`` does not hide its siblings)."""
        from zarr.core.sync import sync

        async def listed() -> list[str]:
            return [name async for name in self._root.store.list_dir(path)]

        return sorted(n for n in sync(listed()) if n != "zarr.json" and not n.startswith("."))

    @staticmethod
    def _storage_keys(arr: zarr.Array) -> list[str]:
        """Every stored object of an array's data, whether or not it exists: one per shard (format ≥ 2.3: one per
        array), else one per chunk (``"c/0/0/0"``, …)."""
        grid = storage_grid(arr.shape, arr.chunks, arr.shards)
        return [arr.metadata.encode_chunk_key(c) for c in itertools.product(*(range(n) for n in grid))]

    def _missing_objects(self, group_path: str, arr: zarr.Array) -> list[str]:
        """The storage keys of an array's data objects that do not exist."""
        from zarr.core.sync import sync

        keys = self._storage_keys(arr)
        store = self._root.store

        async def exist() -> list[bool]:
            return await asyncio.gather(*(store.exists(f"{group_path}/{arr.basename}/{k}") for k in keys))

        return [k for k, here in zip(keys, sync(exist()), strict=True) if not here]

    def _arrays_of(self, group_path: str) -> list[tuple[str, zarr.Array]]:
        """The arrays of a group, each opened on its own.

        Raises:
            StoreError: an array's ``zarr.json`` is damaged, naming the file.
        """
        nodes = [(name, self._node(f"{group_path}/{name}")) for name in self._child_names(group_path)]
        return [(name, node) for name, node in nodes if isinstance(node, zarr.Array)]

    def group_state(self, path: str) -> str:
        """``"complete"``, ``"incomplete"``, ``"absent"``, or ``"damaged"`` (its metadata cannot be read)."""
        try:
            return "complete" if self._node(path).attrs.get("complete", False) else "incomplete"
        except KeyError:
            return "absent"
        except StoreError:
            return "damaged"

    def _node(self, path: str) -> Any:
        """The group or array at ``path``.

        Raises:
            KeyError: nothing there.
            StoreError: its ``zarr.json`` cannot be parsed, naming the file and how to repair it.
        """
        try:
            return self._root[path]
        except KeyError:
            raise
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError, zarr's metadata validation
            fix = (
                "re-run `make cache` (its `teachcache preprocess` rewrites the case)"
                if path.startswith("cases/")
                else "re-run `make cache`, which rewrites it"
            )
            raise StoreError(
                f"{self.location}/{path}/zarr.json is damaged and cannot be read ({type(exc).__name__}: {exc}); {fix}"
            ) from None

    def _forget_entry(self, teacher: str, case_id: str) -> None:
        """Drop this object's cached array handles and encoding of an entry about to be rewritten."""
        prefix = f"teachers/{teacher}/{case_id}/"
        for key in [k for k in self._arrays if k.startswith(prefix)]:
            del self._arrays[key]
        self._encodings.pop((teacher, case_id), None)
