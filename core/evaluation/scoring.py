"""Score a folder of predicted label maps against label files with the metric code validation uses
(:func:`core.evaluation.metrics.dice_per_class`, :func:`core.evaluation.metrics.hd95_per_class`), at each label file's voxel spacing.

A prediction ``PRED_DIR/<case>.nii.gz`` is paired with ``LABEL_DIR/<case>.nii.gz`` (any image suffix): nnU-Net's
``labelsTr``/``labelsTs`` naming, and what ``teachcache predict`` writes. Both must be on the same grid (shape and
affine): ``teachcache predict`` writes predictions in the input image's geometry, which is the label's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.data.inputs import strip_suffix
from core.errors import DatasetError
from core.evaluation.geometry import original_spacing
from core.evaluation.metrics import dice_per_class, hd95_per_class

__all__ = ["HOLDOUT_CSV", "POSTPROCESSED_CSV", "PREDICTION_SUMMARY", "VALIDATION_CSV", "evaluate_folder"]

# the record `teachcache predict` writes beside its labels (core.deploy.predict); read here for the class names
PREDICTION_SUMMARY = "prediction.json"
# a run folder's per-case scores (core.training.validation writes them, the CV report reads them): the headline on
# the validation cases, the same with the postprocessing chosen on the held-out cases, and the final model on the
# held-out training cases (what a screening compares; docs/recipes.md)
VALIDATION_CSV = "validation_per_case.csv"
POSTPROCESSED_CSV = "validation_per_case_postprocessed.csv"
HOLDOUT_CSV = "holdout_per_case.csv"


def _by_case(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{what} folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = strip_suffix(path.name)
        if path.is_file() and stem is not None and not path.name.startswith("."):
            found[stem] = path
    if not found:
        raise DatasetError(f"{folder} holds no {what} files (.nii.gz, .nii, .mha, .mhd)")
    return found


def _class_names(pred_dir: Path, label_dir: Path) -> list[str] | None:
    """Class names from the prediction's ``prediction.json``, else the ``dataset.json`` beside the labels."""
    summary = pred_dir / PREDICTION_SUMMARY
    if summary.is_file():
        try:
            return list(json.loads(summary.read_text())["inputs_expected"]["class_names"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for description in (label_dir / "dataset.json", label_dir.parent / "dataset.json"):
        if description.is_file():
            try:
                labels = json.loads(description.read_text())["labels"]
                by_value = {int(v): str(k) for k, v in labels.items()}
                return [by_value.get(i, f"class_{i}") for i in range(max(by_value) + 1)]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
    return None


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from core.data.readers import read_header, read_volume

    try:
        data = np.asarray(read_volume(path))
        affine = read_header(path)[1]
    except DatasetError:
        raise
    except Exception as exc:  # nibabel and ITK raise many types for a corrupt file
        raise DatasetError(f"cannot read {path} ({exc}); replace the file") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path} has shape {data.shape}; a label map is one 3-D volume")
    if not np.array_equal(data, np.round(data)) or (data < 0).any():
        raise DatasetError(f"{path} holds values that are not class indices (integers ≥ 0)")
    return data.round().astype(np.int64), affine


def evaluate_folder(pred_dir: Path, label_dir: Path) -> dict[str, Any]:
    """Dice and HD95 (mm) per foreground class of every labelled case, and their means.

    Returns:
        ``{"class_names", "cases": [{"case", "dice": [K-1], "hd95": [K-1]}], "mean_dice_per_class",
        "mean_hd95_per_class", "mean_dice", "mean_hd95", "predictions_without_label"}``.

    Raises:
        DatasetError: a folder missing or empty, a labelled case without a prediction, a prediction on another grid
            than its label (shape or affine), values that are not class indices.
    """
    labels, preds = _by_case(label_dir, "label"), _by_case(pred_dir, "prediction")
    missing = sorted(set(labels) - set(preds))
    if missing:
        raise DatasetError(
            f"{pred_dir} has no prediction for {len(missing)} labelled case(s) ({', '.join(missing[:3])}"
            f"{'…' if len(missing) > 3 else ''}); predict them (teachcache predict), or score against a label folder "
            "holding only the predicted cases"
        )
    names = _class_names(pred_dir, label_dir)
    pairs = []
    for case, label_path in labels.items():
        label, label_affine = _read(label_path)
        pred, pred_affine = _read(preds[case])
        if pred.shape != label.shape or not np.allclose(pred_affine, label_affine, atol=1e-3):
            raise DatasetError(
                f"case '{case}': {preds[case]} (shape {pred.shape}) is not on the grid of its label {label_path} "
                f"(shape {label.shape}{', another affine' if pred.shape == label.shape else ''}); predictions must "
                "be in the label's geometry, as teachcache predict writes them"
            )
        pairs.append((case, pred, label, original_spacing(label_affine)))
    top = max(max(int(p.max()), int(lab.max())) for _, p, lab, _ in pairs)
    num_classes = len(names) if names else max(top + 1, 2)
    if top >= num_classes:
        raise DatasetError(
            f"a map holds class {top}, but there are {num_classes} classes ({', '.join(names or [])}); are these "
            "predictions of this task?"
        )
    names = names or [f"class_{i}" for i in range(num_classes)]
    rows = []
    for case, pred, label, spacing in pairs:
        rows.append(
            {
                "case": case,
                "dice": dice_per_class(pred, label, num_classes),
                "hd95": hd95_per_class(pred, label, num_classes, spacing),
            }
        )
    dice = np.asarray([r["dice"] for r in rows], dtype=np.float64)
    hd95 = np.asarray([r["hd95"] for r in rows], dtype=np.float64)
    return {
        "class_names": names,
        "cases": rows,
        "mean_dice_per_class": dice.mean(axis=0).tolist(),
        "mean_hd95_per_class": hd95.mean(axis=0).tolist(),
        "mean_dice": float(dice.mean()),
        "mean_hd95": float(hd95.mean()),
        "predictions_without_label": sorted(set(preds) - set(labels)),
    }
