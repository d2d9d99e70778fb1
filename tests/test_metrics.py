"""Segmentation metrics on hand-computed label maps: Dice, HD95 in mm, and what empty masks score."""

from __future__ import annotations

import math

import pytest


def test_hd95_in_mm_and_what_empty_masks_score():
    import numpy as np

    from core.evaluation.metrics import hd95_per_class

    ref = np.zeros((20, 20, 20), int)
    ref[5:10, 5:10, 5:10] = 1
    shifted = np.zeros_like(ref)
    shifted[7:12, 5:10, 5:10] = 1  # two voxels along x, 2 mm voxels on that axis
    assert hd95_per_class(shifted, ref, 2, (2.0, 1.0, 1.0)) == pytest.approx([4.0])
    assert hd95_per_class(ref, ref, 2, (2.0, 1.0, 1.0)) == [0.0]
    empty = np.zeros_like(ref)
    assert hd95_per_class(empty, empty, 2, (1.0, 1.0, 1.0)) == [0.0], "nothing to find, nothing missed"
    diagonal = math.sqrt(3) * 20
    assert hd95_per_class(empty, ref, 2, (1.0, 1.0, 1.0)) == pytest.approx([diagonal]), (
        "a missed lesion is the worst"
    )
    assert hd95_per_class(ref, empty, 2, (1.0, 1.0, 1.0)) == pytest.approx([diagonal]), (
        "so is an invented one"
    )
