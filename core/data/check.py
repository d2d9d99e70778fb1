"""``teachcache dataset check``: what a raw dataset folder holds and what is wrong with it, per case, before anything
runs — every problem of every case, not only the first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.config import DatasetConfig
from core.data.layout import CaseFiles, RawDataset
from core.data.layouts import detect_layout, read_dataset
from core.data.preprocessing import _check_headers, _check_label_values, box_voxels
from core.data.readers import read_header, read_volume
from core.errors import DatasetError

__all__ = ["check_dataset"]


def _spacing(affine: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in np.sqrt((affine[:3, :3] ** 2).sum(0))]


def _box_problem(case: CaseFiles, reference: int) -> str | None:
    """Whether the case's world box misses its reference image (from the header alone), as the crop decides it."""
    if case.box is None:
        return None
    path = case.images[min(reference, len(case.images) - 1)]
    shape, affine = read_header(path)
    start, end = box_voxels(case.box, affine, shape[:3])
    if np.any(end <= start):
        return f"the bounding box {[round(v, 1) for v in case.box]} (RAS mm) lies outside the image {path}"
    return None


def _case_report(ds: RawDataset, case: CaseFiles, progress: Any = None, reference: int = 0) -> dict[str, Any]:
    problems: list[dict[str, str]] = []
    notes: list[str] = []
    modalities: dict[str, dict[str, Any]] = {}
    try:
        _check_headers(case, len(ds.channel_names), reference)
    except DatasetError as exc:
        problems.append({"case": case.case_id, "problem": str(exc)})
    names = ds.channel_names if not case.channels_in_file else ("all channels",)
    for name, path in zip(names, case.images, strict=False):
        try:
            shape, affine = read_header(path)
        except Exception as exc:
            problems.append({"case": case.case_id, "file": str(path), "problem": f"cannot read: {exc}"})
            continue
        modalities[name] = {"shape": list(shape), "spacing": _spacing(affine)}
        try:
            data = np.asarray(read_volume(path), dtype=np.float64)
            bad = int((~np.isfinite(data)).sum())
            if bad:
                problems.append(
                    {"case": case.case_id, "file": str(path), "problem": f"{bad} NaN or Inf voxel(s)"}
                )
        except Exception as exc:
            problems.append(
                {"case": case.case_id, "file": str(path), "problem": f"cannot read the voxels ({exc})"}
            )
    values: list[int] = []
    try:
        raw = np.unique(read_volume(case.label))
        values = [int(v) for v in raw if float(v).is_integer()]
        if ds.binarise_label:
            values = sorted({min(v, 1) for v in values})
        _check_label_values(case, ds.num_classes, ds.binarise_label, ds.allow_empty_labels)
        if not any(v > 0 for v in values):
            notes.append("no foreground (lesion-free)")
    except DatasetError as exc:
        problems.append({"case": case.case_id, "file": str(case.label), "problem": str(exc)})
    except Exception as exc:
        problems.append({"case": case.case_id, "file": str(case.label), "problem": f"cannot read: {exc}"})
    try:
        box = _box_problem(case, reference)
        if box:
            problems.append({"case": case.case_id, "file": str(case.images[0]), "problem": box})
    except Exception as exc:
        problems.append({"case": case.case_id, "problem": f"cannot check the bounding box ({exc})"})
    if progress is not None:
        progress(1)
    return {"case": case.case_id, "modalities": modalities, "label_values": values, "notes": notes,
            "problems": problems}  # fmt: skip


def _geometry_summary(
    reports: list[dict[str, Any]],
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[int]]]]:
    """Per modality over the cases' reports: the spacing's min, median and max, and the shape's min and max (each
    per axis)."""
    spacing: dict[str, list[list[float]]] = {}
    shapes: dict[str, list[list[int]]] = {}
    for r in reports:
        for name, m in r["modalities"].items():
            spacing.setdefault(name, []).append(m["spacing"])
            shapes.setdefault(name, []).append(m["shape"][:3])
    spacing_summary = {
        n: {"min": np.min(v, 0).tolist(), "median": np.median(v, 0).tolist(), "max": np.max(v, 0).tolist()}
        for n, v in spacing.items()
    }
    shape_summary = {
        n: {"min": np.min(v, 0).tolist(), "max": np.max(v, 0).tolist()} for n, v in shapes.items()
    }
    return spacing_summary, shape_summary


def check_dataset(
    cfg: DatasetConfig,
    layout: str | None = None,
    progress: Any = None,
    on_total: Any = None,
    reference: int = 0,
) -> dict[str, Any]:
    """Everything :func:`read_dataset` and preprocessing would refuse, per case, plus a summary of what is there.

    Returns:
        ``{"root", "layout", "name", "channels", "classes", "cases", "skipped", "spacing": {modality: {min, median,
        max}}, "shapes": {modality: {min, max}}, "label_values", "lesion_free", "problems": [{case, file?, problem}],
        "ok"}``.
    """
    root = Path(cfg.raw_dir)
    chosen = layout or (cfg.layout if cfg.layout != "nnunet" else None)
    try:
        if chosen is None:
            chosen = detect_layout(root) if root.is_dir() else "nnunet"
        ds = read_dataset(cfg, chosen)
    except DatasetError as exc:
        return {"root": str(root), "layout": chosen, "ok": False, "cases": 0, "skipped": [],
                "problems": [{"case": "(dataset)", "problem": str(exc)}]}  # fmt: skip
    if on_total is not None:
        on_total(len(ds.cases))
    reports = [_case_report(ds, case, progress, reference) for case in ds.cases]
    spacing_summary, shape_summary = _geometry_summary(reports)
    problems = [p for r in reports for p in r["problems"]]
    return {
        "root": str(root),
        "layout": ds.layout,
        "name": ds.name,
        "channels": list(ds.channel_names),
        "classes": ds.class_names,
        "cases": len(ds.cases),
        "patients": len({c.patient or c.case_id for c in ds.cases}),
        "skipped": list(ds.skipped),
        "spacing": spacing_summary,
        "shapes": shape_summary,
        "label_values": sorted({v for r in reports for v in r["label_values"]}),
        "lesion_free": sum(1 for r in reports if "no foreground (lesion-free)" in r["notes"]),
        "problems": problems,
        "ok": not problems,
    }
