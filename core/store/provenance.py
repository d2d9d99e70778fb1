"""What a store and its teachers were made from: the root's description (dataset, preprocessing, splits), each
teacher copy's provenance, and the entry keys and hashes that say what one entry was computed from."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from core.errors import StoreError
from core.store.format import ATTRS_KEY, TEACHER_SLOT
from core.store.root import StoreRoot

__all__ = ["StoreProvenance", "entry_hash", "entry_key_difference"]


class StoreProvenance(StoreRoot):
    """The metadata part of :class:`~core.store.teacher_store.TeacherStore`: the store's and its teachers'."""

    @property
    def metadata(self) -> dict[str, Any]:
        """The root attributes: format, dataset description, preprocessing and its hash, splits."""
        return dict(self._root.attrs[ATTRS_KEY])

    def update_metadata(self, **fields: Any) -> None:
        meta = self.metadata
        meta.update(fields)
        self._root.attrs[ATTRS_KEY] = meta

    def teacher_keys(self) -> list[str]:
        """Every cached teacher copy, as ``"<name>/<slot>"`` keys (``unetr/fold_0``, ``nnunet/all_folds``)."""
        teachers = self._root["teachers"]
        keys = []
        for name in sorted(teachers.group_keys()):
            keys += [
                f"{name}/{slot}" for slot in sorted(teachers[name].group_keys()) if TEACHER_SLOT.match(slot)
            ]
        return keys

    def write_teacher_metadata(self, teacher: str, provenance: dict[str, Any]) -> None:
        group = self._root.require_group(f"teachers/{teacher}")
        group.attrs[ATTRS_KEY] = provenance

    def remove_empty_teacher_copy(self, teacher: str) -> bool:
        """Delete a teacher copy's group when it holds no complete entry (a caching run that failed on its first
        case), and its name's group when no other copy is left; returns whether anything was removed."""
        name, slot = teacher.split("/")
        try:
            group = self._root[f"teachers/{teacher}"]
        except KeyError:
            return False
        if any(bool(g.attrs.get("complete")) for _, g in group.groups()):
            return False
        parent = self._root[f"teachers/{name}"]
        del parent[slot]
        if not list(parent.group_keys()):
            del self._root["teachers"][name]
        return True

    def teacher_metadata(self, teacher: str) -> dict[str, Any]:
        try:
            return dict(self._root[f"teachers/{teacher}"].attrs[ATTRS_KEY])
        except KeyError:
            known = ", ".join(self.teacher_keys()) or "none"
            slot = teacher.rsplit("/", 1)[-1]
            fold = slot.removeprefix("fold_") if slot.startswith("fold_") else None
            how = f"`make cache FOLD={fold}`" if fold is not None else "`make cache`"
            raise StoreError(
                f"{self.location}: teacher '{teacher}' is not cached (cached: {known}); run {how}"
            ) from None


def entry_hash(key: dict[str, Any]) -> str:
    """SHA-256 of an entry key's canonical JSON (sorted keys, no whitespace): the ``entry_hash`` attribute."""
    payload = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_key_difference(stored: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    """The fields of ``wanted`` that a stored entry key lacks or holds another value for (all when no key)."""
    if not isinstance(stored, dict):
        return list(wanted)
    return [k for k, v in wanted.items() if stored.get(k) != v]
