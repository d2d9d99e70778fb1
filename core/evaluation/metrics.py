"""Segmentation metrics (MONAI): Dice and the 95th-percentile Hausdorff distance per foreground class."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

__all__ = ["dice_per_class", "hd95_per_class"]


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    return one_hot(torch.as_tensor(labels, dtype=torch.long)[None, None], num_classes)


def dice_per_class(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class between two label maps.

    Args:
        prediction: (X, Y, Z) integer labels.
        label: (X, Y, Z) integer labels.
        num_classes: K, including background.

    Returns:
        K-1 values; a class absent from both maps scores 1.0, absent from one only 0.0.
    """
    dice = compute_dice(
        _one_hot(prediction, num_classes),
        _one_hot(label, num_classes),
        include_background=False,
        ignore_empty=False,
    )
    return [float(v) for v in dice[0]]


def hd95_per_class(
    prediction: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> list[float]:
    """95th-percentile symmetric Hausdorff distance in mm of each foreground class (MONAI, surface distances).

    Empty masks, which MONAI leaves as NaN or infinity: a class absent from both maps scores 0 mm (nothing to
    miss); absent from exactly one, the length of the volume's diagonal in mm — the worst distance the grid allows —
    so a missed lesion or a lesion invented on a lesion-free case (PI-CAI has many) counts as the worst case
    instead of vanishing from the mean.

    Args:
        prediction: (X, Y, Z) integer labels.
        label: (X, Y, Z) integer labels.
        num_classes: K, including background.
        spacing: voxel size in mm per axis.

    Returns:
        K-1 values in mm.
    """
    worst = float(np.linalg.norm(np.asarray(label.shape) * np.asarray(spacing, dtype=float)))
    out = []
    for c in range(1, num_classes):
        in_pred, in_ref = bool((prediction == c).any()), bool((label == c).any())
        if not in_pred and not in_ref:
            out.append(0.0)
        elif in_pred != in_ref:
            out.append(worst)
        else:
            pred = torch.as_tensor(prediction == c)[None, None].float()
            ref = torch.as_tensor(label == c)[None, None].float()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hd = compute_hausdorff_distance(
                    pred, ref, include_background=True, percentile=95, spacing=list(spacing)
                )
            out.append(float(hd[0, 0]))
    return out
