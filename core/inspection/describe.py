"""What a store holds, as plain data: used by ``teachcache inspect`` (table or JSON)."""

from __future__ import annotations

from typing import Any

from core.store.teacher_store import TeacherStore

__all__ = ["describe_store"]


def describe_store(
    store: TeacherStore, teachers: list[str] | None = None, case: str | None = None
) -> dict[str, Any]:
    """Teachers (with provenance and completeness), cases, and every array with its storage details.

    Args:
        teachers: only these teacher copies (and the cases' own arrays); default every one.
        case: only this case.

    Returns:
        ``{"store", "format_version", "dataset", "teachers": [...], "cases": [...], "arrays": [...],
        "stored_bytes", "raw_bytes"}``.
    """
    meta = store.metadata
    cases = store.case_ids()
    keys = store.teacher_keys() if teachers is None else teachers
    rows = []
    for name in keys:
        prov = store.teacher_metadata(name)
        complete = sum(store.has_entry(name, c) for c in cases)
        rows.append(
            {
                "name": name,
                "arch": prov.get("arch"),
                "checkpoint_sha256": prov.get("checkpoint_sha256"),
                "fold": prov.get("fold"),
                "complete_cases": complete,
                "total_cases": len(cases),
                "cache_seconds": prov.get("cache_seconds"),
                "provenance": prov,
            }
        )
    shown_cases = cases if case is None else [case]

    def wanted(path: str) -> bool:
        parts = path.split("/")
        owner_ok = parts[0] == "cases" or "/".join(parts[1:3]) in keys
        return owner_ok and (case is None or case in parts)

    arrays = [a.to_dict() for a in store.array_infos() if wanted(a.path)]
    return {
        "store": store.location,
        "format_version": meta["format_version"],
        "dataset": meta["dataset"],
        "teachers": rows,
        "cases": [
            {
                "case_id": c,
                "shape": list(store.case_shape(c)),
                "teachers_complete": [t for t in keys if store.has_entry(t, c)],
            }
            for c in shown_cases
        ],
        "arrays": arrays,
        "stored_bytes": sum(a["stored_bytes"] for a in arrays),
        "raw_bytes": sum(a["raw_bytes"] for a in arrays),
    }
