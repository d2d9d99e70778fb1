"""Scoring in the original image geometry, as nnU-Net evaluates: predictions resampled back onto each case's
original grid and compared with its original label file.

The store holds every case on the preprocessed grid (RAS, target spacing, cropped, padded) together with the
affine of that grid and the original file's affine and shape (``docs/store-format.md``). A prediction made on the
preprocessed grid is mapped back with MONAI's ``SpatialResample`` (nearest neighbour, world coordinates from both
affines): axes flipped back, resampled to the original spacing, the crop and padding undone (voxels outside the
preprocessed grid are background).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.store.teacher_store import TeacherStore

__all__ = ["original_label", "original_spacing", "probabilities_to_original_geometry", "to_original_geometry"]


def to_original_geometry(
    prediction: np.ndarray,
    affine: np.ndarray | list,
    original_affine: np.ndarray | list,
    original_shape: tuple[int, ...] | list,
) -> np.ndarray:
    """Resample a label map from the preprocessed grid onto the original grid (nearest neighbour).

    Args:
        prediction: (X, Y, Z) integer labels on the preprocessed grid.
        affine: 4×4 voxel-to-world affine of the preprocessed grid.
        original_affine: 4×4 voxel-to-world affine of the case's original files.
        original_shape: the original (X, Y, Z) shape.

    Returns:
        (X', Y', Z') uint8 labels on the original grid.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    source = MetaTensor(
        torch.from_numpy(np.asarray(prediction, dtype=np.float32)[None]),
        affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)),
    )
    out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float64)(
        source,
        dst_affine=torch.as_tensor(np.asarray(original_affine, dtype=np.float64)),
        spatial_size=tuple(int(s) for s in original_shape),
    )
    return np.asarray(out[0].numpy()).round().astype(np.uint8)


def probabilities_to_original_geometry(
    probabilities: np.ndarray,
    affine: np.ndarray | list,
    original_affine: np.ndarray | list,
    original_shape: tuple[int, ...] | list,
) -> np.ndarray:
    """Resample class probabilities from the preprocessed grid onto the original grid (trilinear).

    Voxels outside the preprocessed grid (cropped away as background) get background probability 1; at its edge,
    where trilinear interpolation mixes in that outside, the missing mass goes to the background, so every voxel
    still sums to 1.

    Args:
        probabilities: (K, X, Y, Z) on the preprocessed grid, summing to 1 over K; class 0 is the background.
        affine: 4×4 voxel-to-world affine of the preprocessed grid.
        original_affine: 4×4 voxel-to-world affine of the case's original files.
        original_shape: the original (X, Y, Z) shape.

    Returns:
        (K, X', Y', Z') float32 on the original grid.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    source = MetaTensor(
        torch.from_numpy(np.asarray(probabilities, dtype=np.float32)),
        affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)),
    )
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float64)(
        source,
        dst_affine=torch.as_tensor(np.asarray(original_affine, dtype=np.float64)),
        spatial_size=tuple(int(s) for s in original_shape),
    )
    resampled = np.clip(np.asarray(out.numpy(), dtype=np.float32), 0.0, 1.0)
    resampled[0] += np.clip(1.0 - resampled.sum(axis=0), 0.0, 1.0)
    return resampled


def original_spacing(original_affine: np.ndarray | list) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis of the original grid (the norms of the affine's columns)."""
    matrix = np.asarray(original_affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((matrix**2).sum(axis=0)))  # type: ignore[return-value]


def original_label(store: TeacherStore, case_id: str) -> np.ndarray | None:
    """The case's original label map as stored in its NIfTI file, or ``None`` when the file is not at hand."""
    import nibabel as nib

    path = Path(store.case_attrs(case_id)["source_files"][-1])
    if not path.is_file():
        return None
    label = np.asanyarray(nib.load(str(path)).dataobj).round()
    if store.metadata["dataset"].get("binarise_label"):  # PI-CAI: lesion grades ≥ 1 are the one csPCa class
        label = label >= 1
    return label.astype(np.uint8)
