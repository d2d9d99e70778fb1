"""``teachcache verify --rehash``: bring an older store to the current format in place, without re-caching.

Each case and complete entry whose chunks carry no CRC-32C (format < 2.2), that records no digests, or whose
spatial arrays are not sharded (format < 2.3) is read whole (every chunk
must be present and decode: a damaged group is left alone and named), written back with the same values, chunks,
filters, fill value and attributes, today's compressor (:func:`core.store.format.compressor_for`: no shuffle for
1-byte types since 2026-12-07), the CRC-32C codec and one shard per array, and its digests recorded. The values are unchanged (the
stored integers and floats are rewritten as they are), so entry keys, hashes and every student trained from the
store stay valid.

Crash safety, per group (nothing is ever lost; a rerun finishes what a killed one began):

1. each array's new copy is written beside it, as ``<array>__rehash`` (marked ``complete`` once written), while the
   group stays complete and its arrays untouched;
2. the group is marked ``rehash: "swapping"`` and incomplete; each array is rewritten from memory, then its copy
   deleted — an array whose copy is still there is rewritten from the copy by a rerun;
3. digests are recorded, ``rehash`` removed, ``complete`` set last.

The rehash trusts the bytes it finds: a chunk already moved in a 2.1 store is given a valid digest. ``verify``
decodes every chunk after it; run the rehash while nothing else reads or writes the store (it holds the write lock,
which readers do not take).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import StoreError
from core.store.format import FORMAT_VERSION
from core.store.locking import store_write_lock
from core.store.teacher_store import TeacherStore

__all__ = ["RehashResult", "rehash_store"]

_COPY = "__rehash"  # suffix of an array's new copy while its group is rehashed


@dataclass
class RehashResult:
    """What a rehash did: groups rewritten, groups already current, and damaged groups left alone (why)."""

    rewritten: int = 0
    current: int = 0
    damaged: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Array:
    """One array as read: its values and everything needed to write it again."""

    data: np.ndarray
    attrs: dict[str, Any]
    chunks: tuple[int, ...]
    filters: tuple[Any, ...]
    dims: tuple[str, ...] | None
    fill_value: Any


def _current(store: TeacherStore, path: str) -> bool:
    """Digests recorded, not mid-rehash, and every array's chunks checksummed."""
    attrs = store._node(path).attrs
    return (
        isinstance(attrs.get("chunk_digests"), dict)
        and "rehash" not in attrs
        and all(
            bool(arr.compressors)
            and type(arr.compressors[-1]).__name__ == "Crc32cCodec"
            and (arr.shards is not None or arr.ndim < 3 or tuple(arr.chunks) == tuple(arr.shape))
            for _, arr in store._arrays_of(path)
        )
    )


def _groups(store: TeacherStore) -> list[str]:
    """Every case and entry group there is (damaged ones included, to be named), listed from the storage."""
    groups = [f"cases/{c}" for c in store._child_names("cases")]
    for teacher in store.teacher_keys():
        groups += [f"teachers/{teacher}/{c}" for c in store._child_names(f"teachers/{teacher}")]
    return groups


def _wanted(store: TeacherStore, path: str) -> bool:
    """A group to look at: complete, or left mid-rehash by a killed run (other incomplete groups are `make cache`'s)."""
    state = store.group_state(path)
    return state in ("complete", "damaged") or store._node(path).attrs.get("rehash") == "swapping"


def _read(arr: Any) -> _Array:
    return _Array(
        arr[...],
        dict(arr.attrs),
        tuple(arr.chunks),
        tuple(arr.filters),
        tuple(arr.metadata.dimension_names) if arr.metadata.dimension_names else None,
        arr.fill_value,
    )


def _write(store: TeacherStore, group: Any, name: str, a: _Array) -> None:
    store._write_array(group, name, a.data, a.dims or (), a.filters, a.chunks, fill_value=a.fill_value)
    group[name].attrs.update(a.attrs)


def _rewrite(store: TeacherStore, path: str) -> str | None:
    """Rewrite one group with checksums and digests; the reason it was left alone, or ``None`` when done."""
    group = store._node(path)
    swapping = group.attrs.get("rehash") == "swapping"
    nodes = dict(store._arrays_of(path))
    originals = sorted(n for n in nodes if not n.endswith(_COPY))
    if not swapping:
        for leftover in [n for n in nodes if n.endswith(_COPY)]:  # a killed run's copies: written again below
            del group[leftover]
        lost = store.missing_chunks(path)
        if lost:
            return f"{path}: lost chunk file(s) in {', '.join(lost)}; re-run `make cache` to recompute it"
    arrays: dict[str, _Array] = {}
    try:
        for name in originals:
            copy = nodes.get(name + _COPY)
            arrays[name] = _read(
                copy if swapping and copy is not None and copy.attrs.get("complete") else nodes[name]
            )
    except Exception as exc:  # codec errors come from blosc, numcodecs and zarr in many types
        return f"{path}: a chunk cannot be decoded ({type(exc).__name__}); delete it and re-run `make cache`"
    if not swapping:  # 1: every new copy written beside its array, the group untouched
        for name, a in arrays.items():
            _write(store, group, name + _COPY, a)
            group[name + _COPY].attrs["complete"] = True
        group.attrs.update({"rehash": "swapping", "complete": False})
    for name, a in arrays.items():  # 2: each array from memory, then its copy dropped
        if name + _COPY in nodes or not swapping:
            _write(store, group, name, a)
            del group[name + _COPY]
    del group.attrs["rehash"]
    store.record_digests(group, path)  # 3
    group.attrs["complete"] = True
    return None


def rehash_store(location: str, on_group: Callable[[int, int], None] | None = None) -> RehashResult:
    """Rewrite every group of the store at ``location`` that lacks checksums or digests (holding its write lock).

    Args:
        location: the store's path or URL.
        on_group: called with ``(done, total)`` after each group (progress).
    """
    result = RehashResult()
    with store_write_lock(location, "verify --rehash"):
        store = TeacherStore.open(location, mode="a")
        groups = [g for g in _groups(store) if _wanted(store, g)]
        store.drop_consolidated()
        for i, path in enumerate(groups, 1):
            try:
                if store.group_state(path) == "damaged":
                    store._node(path)  # raises the StoreError naming the file
                if _current(store, path):
                    result.current += 1
                else:
                    damaged = _rewrite(store, path)
                    if damaged:
                        result.damaged.append(damaged)
                    else:
                        result.rewritten += 1
            except StoreError as exc:  # its metadata cannot be read
                result.damaged.append(str(exc))
            if on_group is not None:
                on_group(i, len(groups))
        store._arrays.clear()
        if not result.damaged:
            store.update_metadata(format_version=FORMAT_VERSION)
        store.consolidate()
    return result
