"""Scoring in the original geometry: a prediction on the preprocessed grid maps back onto the original grid."""

from __future__ import annotations

import numpy as np

from core.evaluation.geometry import original_label, original_spacing, to_original_geometry
from core.evaluation.metrics import dice_per_class
from core.store.teacher_store import TeacherStore


def test_an_oriented_cropped_grid_maps_back_exactly():
    """Original: LPS-like axes (x and y flipped), 2 mm. Preprocessed: RAS, same spacing, a crop. Back: exact."""
    rng = np.random.default_rng(0)
    original = (rng.random((30, 24, 12)) > 0.7).astype(np.uint8)
    original_affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    original_affine[:3, 3] = [40.0, 30.0, -10.0]
    ras = original[
        ::-1, ::-1, :
    ]  # voxel i of the RAS grid is voxel (n - 1 - i) of the original along x and y
    ras_affine = original_affine.copy()
    ras_affine[:3, :3] = np.diag([2.0, 2.0, 2.0])
    ras_affine[:3, 3] = original_affine[:3, :3] @ [29, 23, 0] + original_affine[:3, 3]
    crop = (slice(4, 26), slice(3, 20), slice(2, 10))
    cropped_affine = ras_affine.copy()
    cropped_affine[:3, 3] = ras_affine[:3, :3] @ [4, 3, 2] + ras_affine[:3, 3]
    back = to_original_geometry(ras[crop], cropped_affine, original_affine, original.shape)
    expected = np.zeros_like(original)
    expected[::-1, ::-1, :][crop] = ras[crop]  # outside the crop: background
    assert back.shape == original.shape and np.array_equal(back, expected)
    assert original_spacing(original_affine) == (2.0, 2.0, 2.0)


def test_the_stores_labels_map_back_onto_the_raw_label_files(preprocessed):
    """Resampled 1.6 × 1.6 × 4 mm → 2 mm and back, each case's label lands on its raw file's (thin slices blur)."""
    store = TeacherStore.open(preprocessed.store.path)
    for case in store.case_ids():
        attrs = store.case_attrs(case)
        back = to_original_geometry(
            store.read_label(case), attrs["affine"], attrs["original_affine"], attrs["original_shape"]
        )
        raw = original_label(store, case)
        assert back.shape == raw.shape == tuple(attrs["original_shape"])
        assert dice_per_class(back, raw, 2)[0] > 0.85, case
        flipped = back[::-1].copy()  # a mapping that lost the orientation would score far lower
        assert dice_per_class(flipped, raw, 2)[0] < 0.5
