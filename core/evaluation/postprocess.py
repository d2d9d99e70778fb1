"""nnU-Net-style postprocessing: keep the largest connected component of a class, where held-out cases say it helps.

A student trained with ``training.holdout`` decides, class by class, whether keeping only the largest connected
component of that class (its other islands become background) raises the class's mean Dice on the held-out
training cases — never on the validation cases it is then scored on. The classes it keeps this for are recorded in
the headline checkpoint (``meta["postprocessing"]``), applied by ``teachcache predict``, and the run reports its
validation scores with and without (``validation_per_case_postprocessed.csv``, ``summary.json``'s
``postprocessing``). Components are found with MONAI's ``KeepLargestConnectedComponent`` at full connectivity (26
neighbours in 3D), on the preprocessed grid, before the prediction goes back to a case's original geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from core.evaluation.metrics import dice_per_class

__all__ = ["choose_largest_component", "keep_largest_component"]


def keep_largest_component(prediction: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``prediction`` (X, Y, Z) class indices with only the largest connected component of each class in
    ``classes`` kept (each class on its own; the other islands become background, 0)."""
    if not classes:
        return prediction
    keep = KeepLargestConnectedComponent(
        applied_labels=[int(c) for c in classes], is_onehot=False, independent=True
    )
    out = keep(torch.from_numpy(np.array(prediction, copy=True))[None])  # MONAI works in place
    return np.asarray(out[0]).astype(prediction.dtype, copy=False)


def choose_largest_component(
    predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int
) -> dict[str, Any]:
    """For each foreground class, whether keeping its largest component raises its mean Dice on these cases.

    Args:
        predictions: the held-out cases' predictions (X, Y, Z) on the preprocessed grid.
        labels: their labels, on the same grid.
        num_classes: K, background included.

    Returns:
        ``{"largest_component_classes": [c, …] (1-based class indices kept for), "dice_per_class": [K-1] without,
        "dice_per_class_largest_component": [K-1] with each class's own component kept, "cases": N}``: a class is
        kept for only when it strictly improves (a tie keeps the prediction as it is).
    """
    without, with_lcc = [], []
    for prediction, label in zip(predictions, labels, strict=True):
        without.append(dice_per_class(prediction, label, num_classes))
        with_lcc.append(
            [
                dice_per_class(keep_largest_component(prediction, [c]), label, num_classes)[c - 1]
                for c in range(1, num_classes)
            ]
        )
    before = np.mean(np.asarray(without, dtype=np.float64), axis=0)
    after = np.mean(np.asarray(with_lcc, dtype=np.float64), axis=0)
    return {
        "largest_component_classes": [c for c in range(1, num_classes) if after[c - 1] > before[c - 1]],
        "dice_per_class": before.tolist(),
        "dice_per_class_largest_component": after.tolist(),
        "cases": len(predictions),
    }
