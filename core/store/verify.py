"""``teachcache verify``: check that a store is complete, consistent and finite, in parallel with dask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dask
import numpy as np

from core.errors import StoreError
from core.models.checkpoint import file_sha256
from core.store.integrity import GROUP_ATTRIBUTES
from core.store.provenance import entry_hash, entry_key_difference
from core.store.teacher_store import TeacherStore
from core.terms import ATTENTION_KINDS

if TYPE_CHECKING:
    from core.config import TeacherConfig

__all__ = ["verify_store"]


_ENTRY_FIX = "run `make cache`, which recomputes the entry"
_CASE_FIX = "run `make cache`, whose `teachcache preprocess` rewrites the case"


def _lost_chunks(store: TeacherStore, group_path: str, where: str, fix: str) -> list[str]:
    missing = store.missing_chunks(group_path)
    return [
        f"{where}: array '{name}' has lost {n} chunk file(s) (zarr would read them as fill values); {fix}"
        for name, n in (missing or {}).items()
    ]


def _moved_or_altered(store: TeacherStore, group_path: str, where: str, fix: str) -> list[str]:
    """Chunks whose stored bytes are not the ones written at their place (moved from another case or teacher,
    altered, replaced), found by the group's digests; a group written before format 2.2 records none."""
    found = store.check_digests(group_path)
    if found.unrecorded:
        return [
            f"{where}: records no chunk digests (written before store format 2.2), so a chunk moved from another "
            f"case cannot be detected; record them with `teachcache verify {store.location} --rehash`, or {fix}"
        ]
    return [
        _mismatch(store.location, group_path, where, name, keys, fix)
        for name, keys in found.mismatched.items()
    ]


def _mismatch(location: str, group_path: str, where: str, name: str, keys: list[str], fix: str) -> str:
    """One finding for the objects of one array (or the group's attributes) whose digests do not match."""
    if name == GROUP_ATTRIBUTES:
        return (
            f"{where}: its attributes are not the ones written with it (edited since: "
            f"{location}/{group_path}/zarr.json); {fix}"
        )
    shown = ", ".join(f"{location}/{group_path}/{name}/{k}" for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return (
        f"{where}: array '{name}' has {len(keys)} chunk or metadata file(s) that are not the ones written there "
        f"(moved from another case or teacher, or altered: {shown}{more}); delete them and {fix}"
    )


def _unreadable(store: TeacherStore, group_path: str, where: str, fix: str, exc: Exception) -> list[str]:
    """Why a whole-array read of a group failed: each undecodable chunk, named with its array and file.

    A damaged chunk file is still present, so `make cache` would skip its entry: the fix is to delete it (then the
    chunk is lost, which `make cache` repairs), or the group's folder when no single chunk is to blame.
    """
    try:
        damaged = store.undecodable_chunks(group_path)
    except StoreError as named:  # an array's metadata is damaged: the message names its file
        return [f"{where}: {named}"]
    except Exception:  # the group's own metadata is unreadable: report what the read said
        damaged = {}
    if not damaged:
        return [
            f"{where}: cannot be read ({type(exc).__name__}: {exc}); delete {store.location}/{group_path} and {fix}"
        ]
    return [
        f"{where}: array '{name}' has {len(keys)} corrupt or truncated chunk file(s) "
        f"({', '.join(f'{store.location}/{k}' for k in keys)}); delete them and {fix}"
        for name, keys in damaged.items()
    ]


def _check_case_guarded(store: TeacherStore, case_id: str) -> list[str]:
    """:func:`_check_case`, with a chunk that cannot be decoded as a finding, not a crash."""
    try:
        return _check_case(store, case_id)
    except Exception as exc:  # codec errors come from blosc, numcodecs and zarr in many types
        return _unreadable(store, f"cases/{case_id}", f"case {case_id}", _CASE_FIX, exc)


def _check_entry_guarded(store: TeacherStore, teacher: str, case_id: str, prov: dict[str, Any]) -> list[str]:
    """:func:`_check_entry`, with a chunk that cannot be decoded as a finding, not a crash."""
    try:
        return _check_entry(store, teacher, case_id, prov)
    except Exception as exc:  # codec errors come from blosc, numcodecs and zarr in many types
        where = f"teacher {teacher}, case {case_id}"
        return _unreadable(store, f"teachers/{teacher}/{case_id}", where, _ENTRY_FIX, exc)


def _check_case(store: TeacherStore, case_id: str) -> list[str]:
    problems = _lost_chunks(store, f"cases/{case_id}", f"case {case_id}", _CASE_FIX)
    problems += _moved_or_altered(store, f"cases/{case_id}", f"case {case_id}", _CASE_FIX)
    image = store.read_image(case_id)
    label = store.read_label(case_id)
    store.read_foreground(case_id)  # decoded too: every chunk of the case is read once
    if image.shape[1:] != label.shape:
        problems.append(f"case {case_id}: image grid {image.shape[1:]} differs from label grid {label.shape}")
    if not np.isfinite(image).all():
        problems.append(f"case {case_id}: image contains NaN or Inf")
    return problems


def _check_entry(store: TeacherStore, teacher: str, case_id: str, prov: dict[str, Any]) -> list[str]:
    where = f"teacher {teacher}, case {case_id}"
    if store.group_state(f"teachers/{teacher}/{case_id}") == "damaged":
        try:
            store.has_entry(teacher, case_id)
        except StoreError as exc:
            return [f"{where}: {exc}"]
    if not store.has_entry(teacher, case_id):
        return [f"{where}: missing or incomplete (run `make cache` to finish it)"]
    attrs = store.entry_attrs(teacher, case_id)
    shape = store.case_shape(case_id)
    problems = _lost_chunks(store, f"teachers/{teacher}/{case_id}", where, _ENTRY_FIX)
    problems += _moved_or_altered(store, f"teachers/{teacher}/{case_id}", where, _ENTRY_FIX)
    probs = store.read_softmax(teacher, case_id)
    if probs.shape != (len(prov["class_names"]), *shape):
        problems.append(
            f"{where}: softmax decodes to {probs.shape}, expected {(len(prov['class_names']), *shape)}"
        )
    if not np.isfinite(probs).all():
        problems.append(f"{where}: softmax contains NaN or Inf")
    elif np.abs(probs.sum(axis=0) - 1.0).max() > 1e-3:
        problems.append(
            f"{where}: softmax does not sum to 1 (max error {np.abs(probs.sum(0) - 1).max():.2e})"
        )
    for kind in ATTENTION_KINDS:
        amap, stride = store.read_attention(teacher, case_id, kind)
        declared = prov["taps"][kind]["stride"]
        expected = tuple(s // declared for s in shape)
        if amap.shape != expected or any(s != declared for s in stride):
            problems.append(
                f"{where}: {kind} map {amap.shape} (stride {stride}), expected {expected} at stride {declared}"
            )
        if not np.isfinite(amap).all():
            problems.append(f"{where}: {kind} map contains NaN or Inf")
    for kind, meta in attrs.get("sketch", {}).items():
        sketch, _ = store.read_sketch(teacher, case_id, kind)
        tap = prov["taps"][kind]["stride"]
        # pooled by the integer factor that brings the tap to store.feature_sketch_stride (format ≥ 2.1)
        factor = max(1, int((attrs.get("entry_key") or {}).get("feature_sketch_stride") or 1) // tap)
        grid = tuple(-(-(s // tap) // factor) for s in shape)
        if sketch.shape != (meta["channels"], *grid):
            problems.append(f"{where}: {kind} sketch {sketch.shape}, expected {(meta['channels'], *grid)}")
        if not np.isfinite(sketch).all():
            problems.append(f"{where}: {kind} sketch contains NaN or Inf")
        store.read_sketch_basis(teacher, case_id, kind)  # decoded too
    problems.extend(_check_entry_key(where, attrs, prov))
    return problems


def _check_entry_key(where: str, attrs: dict[str, Any], prov: dict[str, Any]) -> list[str]:
    """The entry's recorded key is intact and is the one the teacher's provenance describes."""
    key = attrs.get("entry_key")
    if not isinstance(key, dict) or "entry_hash" not in attrs:
        return [
            f"{where}: does not record what it was computed from (no entry_key; cached by an older TeachCache); "
            "re-run `make cache` to recompute it"
        ]
    if entry_hash(key) != attrs["entry_hash"]:
        return [f"{where}: entry_key does not match its entry_hash (attributes edited?); re-run `make cache`"]
    wanted = prov.get("entry_key")
    if isinstance(wanted, dict) and attrs["entry_hash"] != prov.get("entry_hash"):
        fields = entry_key_difference(key, wanted) or ["entry_hash"]
        return [
            f"{where}: computed with other settings than the teacher's provenance records "
            f"(differs in {', '.join(fields)}); re-run `make cache` to recompute it"
        ]
    if attrs.get("checkpoint_sha256") != prov.get("checkpoint_sha256"):
        return [
            f"{where}: computed from another checkpoint than the teacher's provenance records (re-run `make cache`)"
        ]
    return []


def _stale_provenance(teacher: str, prov: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """A teacher cached on other preprocessing, or another version of the dataset, than the store holds."""
    problems = []
    if prov.get("preprocessing_hash") != meta["preprocessing_hash"]:
        problems.append(
            f"teacher {teacher}: cached on other preprocessing than the store's (stale); run `make cache`"
        )
    if prov.get("dataset_manifest_hash") != meta["dataset"]["manifest_hash"]:
        problems.append(
            f"teacher {teacher}: cached on another version of the dataset (stale); recompute it: "
            f"`teachcache cache -c CONFIG -t {teacher} --overwrite`"
        )
    return problems


def _unchecked_for_lost_chunks(store: TeacherStore, cases: list[str], teachers: list[str]) -> int:
    """Cases and complete entries written before every chunk was stored (format < 1.3, no ``all_chunks``)."""
    written = [store.case_attrs(c) for c in cases] + [
        store.entry_attrs(t, c)
        for t in teachers
        for c in cases
        if store.group_state(f"teachers/{t}/{c}") == "complete"  # a damaged one is a problem already listed
    ]
    return sum(not attrs.get("all_chunks") for attrs in written)


def _changed_checkpoints(store: TeacherStore, teachers: list[TeacherConfig], cached: list[str]) -> list[str]:
    """Configured teachers whose checkpoint file on disk is not the one their cached copy was computed from (a
    checkpoint absent here, as in a store copied without them, is not checked)."""
    problems = []
    for teacher in teachers:
        for key in (k for k in cached if k.split("/")[0] == teacher.name):
            slot = key.split("/")[1]
            if slot.startswith("fold_") != teacher.per_fold:
                continue  # the store's copy and the config disagree on per-fold: reported by distil and cache
            path = (
                teacher.for_fold(int(slot.removeprefix("fold_"))).checkpoint
                if teacher.per_fold
                else teacher.checkpoint
            )
            if not path.is_file():
                continue
            try:
                recorded = store.teacher_metadata(key).get("checkpoint_sha256")
            except StoreError:
                continue  # no provenance: reported below
            if recorded and file_sha256(path) != recorded:
                problems.append(
                    f"teacher {key}: {path} changed since it was cached (sha256 {recorded[:12]}… in the store); "
                    f"the cache is stale — re-run `make cache` (distil refuses it)"
                )
    return problems


def verify_store(
    store: TeacherStore,
    scheduler: str = "threads",
    expected_teachers: list[str] | None = None,
    teachers: list[TeacherConfig] | None = None,
) -> dict[str, Any]:
    """Check every case and every (teacher, case) entry.

    Checks: each case's image and label agree and are finite; every teacher has a complete entry for every
    case; decoded softmax has the case's shape, is finite and sums to 1 within 1e-3; attention maps have the
    declared stride's shape and are finite; each entry records its entry key, the key matches its hash, and it is
    the key the teacher's provenance describes (same checkpoint, architecture, inference settings, attention power,
    sketch width, encoding and preprocessing); provenance hashes match the store's; every chunk's stored bytes match
    the digest its group recorded for that place (format ≥ 2.2: a chunk moved from another case or teacher is
    found); with ``teachers``, each cached copy's checkpoint file is the one it was computed from. Every chunk of every array of
    every case and entry is decoded (a truncated or corrupt chunk is a finding naming its array and file, not a
    crash), and no chunk file is missing (for groups written with every chunk stored, ``all_chunks``, format ≥ 1.3;
    older ones are counted in ``unchecked_for_lost_chunks``).

    Args:
        store: the store.
        scheduler: dask scheduler for the per-case checks.
        expected_teachers: teacher names that must be cached (the config's); one with no copy at all (for no fold)
            is a problem.
        teachers: the config's teachers: each cached copy's checkpoint file, where present, must be the one its
            provenance records (SHA-256), as ``distil`` requires.

    Returns:
        ``{"ok": bool, "problems": [str, ...], "cases": int, "teachers": [str, ...], "entries_checked": int,
        "unchecked_for_lost_chunks": int}``.
    """
    meta = store.metadata
    problems: list[str] = []
    for case_id in store.damaged_cases():
        try:
            store.has_case(case_id)
        except StoreError as exc:
            problems.append(f"case {case_id}: {exc}")
    cases = [c for c in store._child_names("cases") if store.group_state(f"cases/{c}") == "complete"]
    tasks = [dask.delayed(_check_case_guarded)(store, c) for c in cases]
    cached = store.teacher_keys()
    for wanted in expected_teachers or []:
        if not any(key.split("/")[0] == wanted for key in cached):
            problems.append(f"teacher {wanted}: configured but not cached at all (run `make cache`)")
    problems.extend(_changed_checkpoints(store, teachers or [], cached))
    for teacher in cached:
        try:
            prov = store.teacher_metadata(teacher)
        except StoreError:  # its group was made, its provenance not yet written, when a run was stopped
            problems.append(
                f"teacher {teacher}: records no provenance (its caching was stopped); run `make cache`"
            )
            continue
        problems.extend(_stale_provenance(teacher, prov, meta))
        tasks += [dask.delayed(_check_entry_guarded)(store, teacher, c, prov) for c in cases]
    if not cases:
        problems.append("the store holds no complete case (run `make cache`)")
    for found in dask.compute(*tasks, scheduler=scheduler):
        problems.extend(found)
    return {
        "ok": not problems,
        "problems": problems,
        "cases": len(cases),
        "teachers": cached,
        "entries_checked": len(cases) * len(cached),
        "unchecked_for_lost_chunks": _unchecked_for_lost_chunks(store, cases, cached),
    }
