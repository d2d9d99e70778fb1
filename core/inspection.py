"""What a store holds, as plain data: used by ``teachcache inspect`` (table or JSON)."""

from __future__ import annotations

from typing import Any

from core.store import TeacherStore

__all__ = ["describe_store"]


def describe_store(store: TeacherStore) -> dict[str, Any]:
    """Teachers (with provenance and completeness), cases, and every array with its storage details.

    Returns:
        ``{"store", "format_version", "dataset", "teachers": [...], "cases": [...], "arrays": [...],
        "stored_bytes"}``.
    """
    meta = store.metadata
    cases = store.case_ids()
    teachers = []
    for name in store.teacher_keys():
        prov = store.teacher_metadata(name)
        complete = sum(store.has_entry(name, c) for c in cases)
        teachers.append(
            {
                "name": name,
                "arch": prov.get("arch"),
                "checkpoint_sha256": prov.get("checkpoint_sha256"),
                "fold": prov.get("fold"),
                "complete_cases": complete,
                "total_cases": len(cases),
                "cache_seconds": prov.get("cache_seconds"),
            }
        )
    arrays = [a.to_dict() for a in store.array_infos()]
    return {
        "store": store.location,
        "format_version": meta["format_version"],
        "dataset": meta["dataset"],
        "teachers": teachers,
        "cases": [
            {
                "case_id": c,
                "shape": list(store.case_shape(c)),
                "teachers_complete": [t for t in store.teacher_keys() if store.has_entry(t, c)],
            }
            for c in cases
        ],
        "arrays": arrays,
        "stored_bytes": sum(a["stored_bytes"] for a in arrays),
    }
