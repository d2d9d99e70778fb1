"""Chunk digests: each stored chunk bound to the place it belongs (format ≥ 2.2, docs/store-format.md).

Zarr's ``crc32c`` codec (last in every array's codec chain) makes a torn or overwritten chunk fail when it is
decoded. It cannot see a *valid* chunk moved from another case or teacher: its checksum travels with it. So each
group (a case or a teacher entry) also records, when it is written, a digest of each of its chunks' stored bytes
bound to where the chunk belongs::

    digest = BLAKE2b-128( "<group path>/<array>/<chunk key>" ‖ 0x00 ‖ stored bytes )

kept in the group's ``chunk_digests`` attribute as ``{array: {chunk key: hex digest}}``; each array's ``zarr.json``
(its dtype, codecs and attributes, e.g. a sketch's ``scale``) is digested the same way under the key
``"zarr.json"``, and the group's own attributes (strides, encoding, entry key, …) as canonical JSON into
``attrs_digest``. A chunk copied from ``teachers/unetr/fold_0/case_001/softmax/c/0/0/0`` to
``.../case_002/softmax/c/0/0/0`` keeps its bytes but not its place, so its digest no longer matches. Checking reads
the stored bytes only (nothing is decoded), hashing each as it arrives: fast enough to run over every entry a
student will read before it trains, in memory that does not grow with the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from core.store.root import StoreRoot

__all__ = [
    "DIGEST_NAME",
    "GROUP_ATTRIBUTES",
    "METADATA_KEY",
    "GroupIntegrity",
    "StoreIntegrity",
    "chunk_digest",
]

DIGEST_NAME = "blake2b-128"
# an array's metadata object, digested beside its chunks under this key
METADATA_KEY = "zarr.json"
# attributes a group's ``attrs_digest`` leaves out: the digests themselves and ``complete`` (written after them)
_UNDIGESTED_ATTRS = ("chunk_digests", "attrs_digest", "complete")
# what a mismatch of the group's own attributes is filed under, among its arrays
GROUP_ATTRIBUTES = "(group attributes)"
# stored objects read at once by a check (each hashed as it arrives; only digests are kept)
_IN_FLIGHT = 32


def chunk_digest(location: str, data: bytes) -> str:
    """The digest of one chunk's stored bytes at its place in the store (``"<group>/<array>/<chunk key>"``)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(location.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


@dataclass
class GroupIntegrity:
    """What checking one group's chunks against its digests found.

    ``missing``: ``{array: [chunk keys with no file]}``; ``mismatched``: ``{array: [chunk keys whose bytes are not
    the ones written there]}``; ``unrecorded``: the group records no digests (written before format 2.2).
    """

    path: str
    missing: dict[str, list[str]] = field(default_factory=dict)
    mismatched: dict[str, list[str]] = field(default_factory=dict)
    unrecorded: bool = False
    chunks: int = 0
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.unrecorded)


def _chunk_keys(arr: zarr.Array) -> list[str]:
    """Every stored object of an array a digest covers: its ``zarr.json`` (shape, dtype, codecs, fill value and
    attributes such as a sketch's ``scale`` or the softmax encoding's) and each data object — a shard (format ≥
    2.3: one per array) or a chunk (``"c/0/0/0"``, …) — whether or not its file exists."""
    return [METADATA_KEY, *StoreRoot._storage_keys(arr)]


def _canonical_attrs(attrs: dict[str, Any]) -> bytes:
    """A group's attributes as canonical JSON, without those written after (or about) its digests."""
    kept = {k: v for k, v in attrs.items() if k not in _UNDIGESTED_ATTRS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str).encode()


class StoreIntegrity(StoreRoot):
    """The digest part of :class:`~core.store.teacher_store.TeacherStore`."""

    def _digests_of(self, places: list[str]) -> list[tuple[int, str] | None]:
        """``(stored bytes, digest)`` of each store key (``None`` where there is no such object): fetched
        concurrently, at most ``_IN_FLIGHT`` at a time, each hashed as it arrives (only digests are kept)."""
        store = self._root.store
        prototype = default_buffer_prototype()

        async def one(key: str, limit: asyncio.Semaphore) -> tuple[int, str] | None:
            async with limit:
                buf = await store.get(key, prototype=prototype)
                if buf is None:
                    return None
                data = buf.to_bytes()
                return len(data), chunk_digest(key, data)

        async def every() -> list[Any]:
            limit = asyncio.Semaphore(_IN_FLIGHT)
            return await asyncio.gather(*(one(k, limit) for k in places))

        return list(sync(every()))

    def _group_chunks(self, group_path: str) -> dict[str, list[str]]:
        """``{array name: its metadata and chunk keys}`` for every array of a group."""
        return {name: _chunk_keys(arr) for name, arr in self._arrays_of(group_path)}

    def compute_digests(self, group_path: str) -> dict[str, dict[str, str]]:
        """The digests of a group's arrays' metadata and chunks as stored now (a missing file has none)."""
        chunks = self._group_chunks(group_path)
        places = [(name, key) for name, keys in chunks.items() for key in keys]
        found = self._digests_of([f"{group_path}/{name}/{key}" for name, key in places])
        digests: dict[str, dict[str, str]] = {name: {} for name in chunks}
        for (name, key), hashed in zip(places, found, strict=True):
            if hashed is not None:
                digests[name][key] = hashed[1]
        return digests

    def record_digests(self, group: zarr.Group, group_path: str) -> None:
        """Record a group's digests once its arrays and attributes are all written, before ``complete``: its
        ``chunk_digests`` and the ``attrs_digest`` of its other attributes."""
        group.attrs["chunk_digests"] = self.compute_digests(group_path)
        attrs = dict(group.attrs)
        group.attrs["attrs_digest"] = chunk_digest(
            f"{group_path}/{METADATA_KEY}#attributes", _canonical_attrs(attrs)
        )

    def check_digests(self, group_path: str) -> GroupIntegrity:
        """Compare every chunk of a group with the digest recorded for its place; nothing is decoded."""
        return self.check_groups([group_path])[0]

    def check_groups(self, group_paths: list[str], batch: int = 64) -> list[GroupIntegrity]:
        """:meth:`check_digests` for many groups, ``batch`` groups' objects read concurrently at a time."""
        results = []
        for start in range(0, len(group_paths), batch):
            results += self._check_batch(group_paths[start : start + batch])
        return results

    def _check_batch(self, group_paths: list[str]) -> list[GroupIntegrity]:
        results, places = [], []
        for path in group_paths:
            found = GroupIntegrity(path)
            results.append(found)
            attrs = dict(self._node(path).attrs)
            recorded = attrs.get("chunk_digests")
            if not isinstance(recorded, dict):
                found.unrecorded = True
                continue
            wanted = chunk_digest(f"{path}/{METADATA_KEY}#attributes", _canonical_attrs(attrs))
            if attrs.get("attrs_digest") != wanted:
                found.mismatched.setdefault(GROUP_ATTRIBUTES, []).append(METADATA_KEY)
            chunks = self._group_chunks(path)
            places += [(found, recorded, name, key) for name, keys in chunks.items() for key in keys]
            for name in recorded:
                if name not in chunks:  # an array deleted from the group
                    found.missing.setdefault(name, []).append("(whole array)")
        hashed = self._digests_of([f"{f.path}/{name}/{key}" for f, _, name, key in places])
        for (found, recorded, name, key), got in zip(places, hashed, strict=True):
            if got is None:
                found.missing.setdefault(name, []).append(key)
                continue
            found.chunks += key != METADATA_KEY
            found.nbytes += got[0]
            array = recorded.get(name)
            if not isinstance(array, dict) or array.get(key) != got[1]:
                found.mismatched.setdefault(name, []).append(key)
        return results
