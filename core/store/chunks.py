"""A store chunk by chunk: every array's layout and stored bytes (``teachcache inspect``), and the chunks of a
case or entry that are lost or cannot be decoded (``teachcache verify``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import zarr

from core.store.root import StoreRoot

__all__ = ["ArrayInfo", "StoreChunks"]


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

    @classmethod
    def of(cls, path: str, arr: zarr.Array) -> ArrayInfo:
        """The description of ``arr``, stored at ``path``."""
        names = [type(c).__name__.replace("Codec", "") for c in (*arr.filters, *arr.compressors)]
        return cls(
            path,
            tuple(arr.shape),
            str(arr.dtype),
            tuple(arr.chunks),
            ", ".join(names) or "none",
            int(arr.nbytes_stored()),
            tuple(arr.shards) if arr.shards else None,
            int(arr.nbytes),
        )

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


def _object_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The storage key of the file holding chunk ``coords``: the chunk's own, or its shard's."""
    if arr.shards:
        coords = tuple(c * k // s for c, k, s in zip(coords, arr.chunks, arr.shards, strict=True))
    return arr.metadata.encode_chunk_key(coords)


class StoreChunks(StoreRoot):
    """The chunk-level part of :class:`~core.store.teacher_store.TeacherStore`."""

    def array_infos(self) -> list[ArrayInfo]:
        """Every array in the store with its shape, dtype, chunks, codecs and stored bytes."""
        infos = []
        for path, arr in sorted(self._root.arrays(), key=lambda kv: kv[0]):
            infos.append(ArrayInfo.of(path, arr))
        for gname, group in sorted(self._root.groups(), key=lambda kv: kv[0]):
            for path, arr in sorted(group.members(max_depth=None), key=lambda kv: kv[0]):
                if isinstance(arr, zarr.Array):
                    infos.append(ArrayInfo.of(f"{gname}/{path}", arr))
        return infos

    def missing_chunks(self, group_path: str) -> dict[str, int] | None:
        """Chunks lost from the arrays of a case (``cases/<case>``) or entry (``teachers/<key>/<case>``) group.

        Returns:
            ``{array name: number of chunk (or shard) files missing}`` (empty when whole), or ``None`` for a group written
            before every chunk was stored (format < 1.3), where a missing chunk cannot be told from a skipped one.
        """
        group = self._node(group_path)
        if not group.attrs.get("all_chunks"):
            return None
        missing = {}
        for name, arr in self._arrays_of(group_path):
            lost = self._missing_objects(group_path, arr)
            if lost:
                missing[name] = len(lost)
        return missing

    def undecodable_chunks(self, group_path: str) -> dict[str, list[str]]:
        """Stored chunks of a case or entry group's arrays that cannot be decoded (truncated, corrupt).

        Decodes every chunk of every array of the group one by one: slow, meant to locate the damage once a
        whole-array read of the group has failed.

        Returns:
            ``{array name: [store keys of the files holding its undecodable chunks (the chunk's file, or the shard
            holding it), e.g. "teachers/t/c/fine/c/0/0/0"]}``; empty when
            every stored chunk decodes (a missing chunk reads as fill values here: see :meth:`missing_chunks`).
        """
        damaged = {}
        for name, arr in self._arrays_of(group_path):
            bad = []
            for coords in itertools.product(*(range(n) for n in arr.cdata_shape)):
                try:
                    arr.get_block_selection(coords)
                except Exception:  # codec errors come from blosc, numcodecs and zarr in many types
                    bad.append(f"{arr.path}/{_object_key(arr, coords)}")
            if bad:
                damaged[name] = sorted(set(bad))  # the shard once, however many of its chunks fail
        return damaged
