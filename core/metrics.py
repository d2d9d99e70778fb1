"""Segmentation metrics (MONAI)."""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

__all__ = ["dice_per_class"]


def dice_per_class(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class between two label maps.

    Args:
        prediction: (X, Y, Z) integer labels.
        label: (X, Y, Z) integer labels.
        num_classes: K, including background.

    Returns:
        K-1 values; a class absent from both maps scores 1.0, absent from one only 0.0.
    """
    pred = one_hot(torch.as_tensor(prediction, dtype=torch.long)[None, None], num_classes)
    ref = one_hot(torch.as_tensor(label, dtype=torch.long)[None, None], num_classes)
    dice = compute_dice(pred, ref, include_background=False, ignore_empty=False)
    return [float(v) for v in dice[0]]
