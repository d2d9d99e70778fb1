"""Summaries of what the teachers wrote, computed in parallel with dask: ``teachcache stats`` and ``teachcache diff``.

Stats, per teacher over the cases it is scored on (each case by the copy of the teacher that did not train on it:
see :func:`core.inspection.views.teachers_for_case`):

- **Dice** against the stored label, of the argmax map, mean over foreground classes (MONAI ``compute_dice``, a
  class absent from both maps scores 1), then mean over cases.
- **Entropy**: mean over voxels of −Σ_k p_k log p_k (nats) of the decoded softmax at T = 1.
- **ECE** (expected calibration error): the top-class confidence of every voxel of every case in 15 equal-width
  bins over [0, 1]; ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|, accuracy = argmax equals the label.
- **Agreement**: mean over the other teachers and the cases both hold of the foreground Dice between the two
  teachers' argmax maps (mean over foreground classes).

Diff, per teacher and array over the cases two stores share: max and mean absolute difference of the decoded values
(probabilities for ``softmax``, float maps for the attention maps and sketches) and, for ``softmax``, the mean over
voxels of KL(A ‖ B).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import StoreError
from core.evaluation.metrics import dice_per_class
from core.inspection.views import teachers_for_case
from core.store.teacher_store import TeacherStore
from core.terms import ATTENTION_KINDS

__all__ = ["ECE_BINS", "diff_stores", "store_stats"]

ECE_BINS = 15


def _compute(tasks: list[Any], workers: int | None, progress: Callable[[int], None] | None) -> list[Any]:
    """Compute dask delayed tasks on threads (zarr decompression and numpy release the GIL), advancing a bar."""
    import dask
    from dask.callbacks import Callback

    class _Advance(Callback):
        def __init__(self, keys: set[Any]) -> None:
            super().__init__()
            self._keys = keys

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if progress is not None and key in self._keys:
                progress(1)

    keys = {t.key for t in tasks}
    with _Advance(keys):
        return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))


def _case_stats(store: TeacherStore, case_id: str, teachers: list[str], num_classes: int) -> dict[str, Any]:
    """Every statistic of one case, for each of its teachers and each pair of them."""
    label = store.read_label(case_id)
    out: dict[str, Any] = {"teachers": {}, "pairs": {}}
    argmaxes = {}
    for key in teachers:
        probs = store.read_softmax(key, case_id)
        pred = np.argmax(probs, axis=0)
        argmaxes[key] = pred
        conf = probs.max(axis=0).ravel().astype(np.float64)
        correct = (pred == label).ravel()
        bins = np.clip((conf * ECE_BINS).astype(np.int64), 0, ECE_BINS - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=0)
        out["teachers"][key] = {
            "dice": float(np.mean(dice_per_class(pred, label, num_classes))),
            "entropy_sum": float(entropy.sum(dtype=np.float64)),
            "voxels": int(label.size),
            "bin_count": np.bincount(bins, minlength=ECE_BINS).tolist(),
            "bin_confidence": np.bincount(bins, weights=conf, minlength=ECE_BINS).tolist(),
            "bin_correct": np.bincount(bins, weights=correct.astype(np.float64), minlength=ECE_BINS).tolist(),
        }
    for a, b in itertools.combinations(teachers, 2):
        out["pairs"][(a, b)] = float(np.mean(dice_per_class(argmaxes[a], argmaxes[b], num_classes)))
    return out


def _name(key: str) -> str:
    return key.split("/")[0]


def _stats_plan(store: TeacherStore, fold: int | None) -> dict[str, list[str]]:
    """``{case: teacher keys}``: the cases to score (a fold's validation cases, else every case) that some cached
    teacher holds, each with the copies of the teachers that did not train on it."""
    splits = store.metadata.get("splits", [])
    if fold is not None and not 0 <= fold < len(splits):
        raise StoreError(
            f"{store.location}: no fold {fold}; the store's splits have folds 0–{len(splits) - 1}"
        )
    cases = store.case_ids() if fold is None else [c for c in splits[fold]["val"] if store.has_case(c)]
    plan = {c: teachers_for_case(store, c) for c in cases}
    plan = {c: t for c, t in plan.items() if t}
    if not plan:
        where = f"fold {fold}'s validation cases" if fold is not None else "any case"
        raise StoreError(f"{store.location}: no cached teacher holds {where}; run `make cache` first")
    return plan


def _accumulate(
    results: list[dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], list[float]]]:
    """Sum the per-case statistics of :func:`_case_stats` per teacher name (all its copies together), and collect
    the agreement of each pair of teacher names."""
    per: dict[str, dict[str, Any]] = {}
    pairs: dict[tuple[str, str], list[float]] = {}
    for result in results:
        for key, s in result["teachers"].items():
            acc = per.setdefault(
                _name(key),
                {"copies": set(), "dice": [], "entropy_sum": 0.0, "voxels": 0, "count": np.zeros(ECE_BINS),
                 "confidence": np.zeros(ECE_BINS), "correct": np.zeros(ECE_BINS)},
            )  # fmt: skip
            acc["copies"].add(key)
            acc["dice"].append(s["dice"])
            acc["entropy_sum"] += s["entropy_sum"]
            acc["voxels"] += s["voxels"]
            acc["count"] += s["bin_count"]
            acc["confidence"] += s["bin_confidence"]
            acc["correct"] += s["bin_correct"]
        for (a, b), dice in result["pairs"].items():
            pairs.setdefault(tuple(sorted((_name(a), _name(b)))), []).append(dice)  # type: ignore[arg-type]
    return per, pairs


def _teacher_row(name: str, acc: dict[str, Any], pairs: dict[tuple[str, str], list[float]]) -> dict[str, Any]:
    """One teacher's statistics from its sums (:func:`_accumulate`)."""
    n = acc["count"].sum()
    gaps = np.abs(acc["correct"] - acc["confidence"])  # = n_b · |accuracy_b − confidence_b|
    mine = [np.mean(v) for p, v in pairs.items() if name in p]
    return {
        "teacher": name,
        "copies": sorted(acc["copies"]),
        "cases": len(acc["dice"]),
        "dice": float(np.mean(acc["dice"])),
        "entropy": acc["entropy_sum"] / acc["voxels"],
        "ece": float(gaps.sum() / n),
        "agreement": float(np.mean(mine)) if mine else None,
    }


def entry_files(location: str | Path) -> dict[str, float] | None:
    """Files per (teacher, case) entry of a local store and data files per array (beside each array's
    ``zarr.json``): what an HPC inode quota counts. ``None`` for a remote store (object counts are not files)."""
    if "://" in str(location) and not str(location).startswith("file://"):
        return None
    root = Path(str(location).removeprefix("file://"))
    entries = [p for p in root.glob("teachers/*/*/*") if p.is_dir()]
    if not entries:
        return {"entries": 0, "files_per_entry": 0.0, "data_files_per_array": 0.0, "arrays_per_entry": 0.0}
    files = sum(1 for e in entries for p in e.rglob("*") if p.is_file())
    arrays = sum(1 for e in entries for p in e.iterdir() if p.is_dir())
    data = sum(1 for e in entries for p in e.rglob("*") if p.is_file() and "/c/" in p.as_posix())
    return {
        "entries": len(entries),
        "files_per_entry": files / len(entries),
        "arrays_per_entry": arrays / len(entries),
        "data_files_per_array": data / arrays if arrays else 0.0,
    }


def store_stats(
    store: TeacherStore,
    fold: int | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Dice, entropy, ECE and agreement of every teacher (see the module's docstring).

    Args:
        fold: score only the validation cases of this fold (else every case), each by the teacher copy that did not
            train on it.
        workers: threads (default: dask's, one per core).
        progress: called with 1 as each case finishes; ``on_total`` first with the number of cases.

    Returns:
        ``{"fold", "cases", "teachers": [{"teacher", "copies", "cases", "dice", "entropy", "ece", "agreement"}],
        "pairs": [{"a", "b", "cases", "dice"}], "files": entry_files(...)}``; teachers are named without their fold
        slot.
    """
    import dask

    plan = _stats_plan(store, fold)
    num_classes = len(store.metadata["dataset"]["class_names"])
    if on_total is not None:
        on_total(len(plan))
    tasks = [dask.delayed(_case_stats)(store, c, t, num_classes) for c, t in plan.items()]
    per, pairs = _accumulate(_compute(tasks, workers, progress))
    return {
        "store": store.location,
        "fold": fold,
        "cases": len(plan),
        "teachers": [_teacher_row(name, acc, pairs) for name, acc in sorted(per.items())],
        "pairs": [
            {"a": a, "b": b, "cases": len(v), "dice": float(np.mean(v))}
            for (a, b), v in sorted(pairs.items())
        ],
        "files": entry_files(store.location),
    }


# --- diff ------------------------------------------------------------------------------------------------------------


def _entry_arrays(store: TeacherStore, teacher: str, case_id: str) -> dict[str, np.ndarray]:
    """The decoded arrays of one entry: probabilities, attention maps, and sketches where present."""
    arrays = {"softmax": store.read_softmax(teacher, case_id)}
    for kind in ATTENTION_KINDS:
        arrays[kind] = store.read_attention(teacher, case_id, kind)[0]
        if store.has_sketch(teacher, case_id, kind):
            arrays[f"{kind}_sketch"] = store.read_sketch(teacher, case_id, kind)[0]
    return arrays


def _case_diff(a: TeacherStore, b: TeacherStore, teacher: str, case_id: str) -> dict[str, Any]:
    left, right = _entry_arrays(a, teacher, case_id), _entry_arrays(b, teacher, case_id)
    out: dict[str, Any] = {}
    for name in sorted(set(left) | set(right)):
        if name not in left or name not in right:
            out[name] = {"only_in": "A" if name in left else "B"}
            continue
        x, y = left[name], right[name]
        if x.shape != y.shape:
            out[name] = {"shape_a": list(x.shape), "shape_b": list(y.shape)}
            continue
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        entry = {"max": float(d.max()), "sum": float(d.sum()), "n": int(d.size)}
        if name == "softmax":
            eps = 1e-12
            kl = (x * (np.log(np.maximum(x, eps)) - np.log(np.maximum(y, eps)))).sum(axis=0)
            entry |= {"kl_sum": float(kl.sum(dtype=np.float64)), "kl_n": int(kl.size)}
        out[name] = entry
    return out


def _array_row(name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One array of one teacher over the cases both stores hold: the largest and mean absolute difference (and for
    ``softmax`` the mean KL), or the first case's mismatch (shapes, or held by one store only)."""
    odd = next((e for e in entries if "max" not in e), None)
    if odd is not None:
        return {"array": name, **odd}
    row = {
        "array": name,
        "max": max(e["max"] for e in entries),
        "mean": sum(e["sum"] for e in entries) / sum(e["n"] for e in entries),
    }
    if name == "softmax":
        row["kl"] = sum(e["kl_sum"] for e in entries) / sum(e["kl_n"] for e in entries)
    return row


def _teacher_diffs(work: list[tuple[str, str]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per teacher, in name order, the number of cases compared and one row per array (:func:`_array_row`)."""
    by_teacher: dict[str, dict[str, list[dict[str, Any]]]] = {}
    cases_of: dict[str, int] = {}
    for (t, _), result in zip(work, results, strict=True):
        cases_of[t] = cases_of.get(t, 0) + 1
        for name, entry in result.items():
            by_teacher.setdefault(t, {}).setdefault(name, []).append(entry)
    return [
        {
            "teacher": t,
            "cases": cases_of[t],
            "arrays": [_array_row(name, entries) for name, entries in sorted(by_teacher[t].items())],
        }
        for t in sorted(by_teacher)
    ]


def diff_stores(
    a: TeacherStore,
    b: TeacherStore,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Per teacher and array, how two stores of the same cases differ (see the module's docstring).

    Returns:
        ``{"a", "b", "teachers": [{"teacher", "cases", "arrays": [{"array", "max", "mean", "kl"?} | {"array",
        "shape_a", "shape_b"} | {"array", "only_in"}]}], "only_in_a", "only_in_b", "cases_only_in_a",
        "cases_only_in_b"}``.
    """
    import dask

    keys_a, keys_b = set(a.teacher_keys()), set(b.teacher_keys())
    cases_a, cases_b = set(a.case_ids()), set(b.case_ids())
    shared_cases = sorted(cases_a & cases_b)
    if not shared_cases:
        raise StoreError(
            f"{a.location} and {b.location} share no case: diff compares two stores of the same cases"
        )
    work = [
        (t, c)
        for t in sorted(keys_a & keys_b)
        for c in shared_cases
        if a.has_entry(t, c) and b.has_entry(t, c)
    ]
    if on_total is not None:
        on_total(len(work))
    results = _compute([dask.delayed(_case_diff)(a, b, t, c) for t, c in work], workers, progress)
    return {
        "a": a.location,
        "b": b.location,
        "teachers": _teacher_diffs(work, results),
        "only_in_a": sorted(keys_a - keys_b),
        "only_in_b": sorted(keys_b - keys_a),
        "cases_only_in_a": sorted(cases_a - cases_b),
        "cases_only_in_b": sorted(cases_b - cases_a),
    }


def stats_chart(result: dict[str, Any], path: Any) -> None:
    """A PNG of :func:`store_stats`: one bar panel per statistic, a bar per teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["teachers"]
    names = [r["teacher"] for r in rows]
    panels = (
        ("dice", "Dice vs label ↑"),
        ("agreement", "agreement (Dice to the others) ↑"),
        ("ece", "ECE ↓"),
        ("entropy", "mean entropy, nats"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), dpi=100)
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax.bar(names, values, color="#4c72b0")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        if key in ("dice", "agreement"):
            ax.set_ylim(0, 1.05)
    scope = f"fold {result['fold']} validation cases" if result["fold"] is not None else "every case"
    fig.suptitle(f"teachers over {result['cases']} cases ({scope})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
