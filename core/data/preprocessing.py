"""The preprocessing pipeline, built from MONAI dictionary transforms.

load → channel-first → orientation (RAS) → spacing → foreground crop → per-modality normalisation → pad to the
minimum size → pad to a multiple of ``size_divisor``. Image and label go through every spatial step together.
The result, with its final affine, is written once into the store; stage 2 never reads NIfTI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    DivisiblePadd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    ScaleIntensityRange,
    Spacingd,
    SpatialPadd,
)

from core.config import PreprocessingConfig
from core.data.layout import CaseFiles
from core.errors import DatasetError

__all__ = [
    "NormalizeModalitiesd",
    "PreprocessedCase",
    "build_preprocessing",
    "foreground_locations",
    "preprocess_case",
]


class NormalizeModalitiesd(MapTransform):
    """Per-channel normalisation chosen by modality name, as nnU-Net does from ``channel_names``.

    A channel named ``CT`` is clipped to the window and scaled to [0, 1]; every other channel (PET, MRI) is
    z-scored over the whole volume.

    Args:
        keys: image keys, arrays shaped (C, X, Y, Z).
        channel_names: one modality name per channel.
        ct_window: (low, high) in Hounsfield units.
    """

    def __init__(self, keys: KeysCollection, channel_names: tuple[str, ...], ct_window: tuple[float, float]):
        super().__init__(keys)
        self.channel_names = channel_names
        self.ct = ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
        self.zscore = NormalizeIntensity()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.channel_names):
                raise ValueError(f"expected {len(self.channel_names)} channels, got {img.shape[0]}")
            out = img.clone()
            for c, name in enumerate(self.channel_names):
                fn = self.ct if name.upper() == "CT" else self.zscore
                out[c] = fn(img[c])
            d[key] = out
        return d


def build_preprocessing(cfg: PreprocessingConfig, channel_names: tuple[str, ...]) -> Compose:
    """The MONAI pipeline for one case dict ``{"image": [paths...], "label": path}``."""
    keys = ["image", "label"]
    threshold, channel = cfg.foreground_threshold, cfg.foreground_channel
    return Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            # labels stated, so MONAI's FutureWarning about their changing default is not printed on every run
            Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=cfg.target_spacing, mode=("bilinear", "nearest")),
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=lambda x: x > threshold,
                channel_indices=channel,
                margin=cfg.crop_margin,
                allow_smaller=True,
            ),
            NormalizeModalitiesd(keys="image", channel_names=channel_names, ct_window=cfg.ct_window),
            SpatialPadd(keys="image", spatial_size=cfg.min_size, mode="replicate"),
            SpatialPadd(keys="label", spatial_size=cfg.min_size, mode="constant"),
            DivisiblePadd(keys="image", k=cfg.size_divisor, mode="replicate"),
            DivisiblePadd(keys="label", k=cfg.size_divisor, mode="constant"),
        ]
    )


@dataclass(frozen=True)
class PreprocessedCase:
    """One case after preprocessing.

    Attributes:
        image: (C, X, Y, Z) float32, RAS voxel order.
        label: (X, Y, Z) uint8.
        affine: 4×4 voxel-to-world affine of ``image`` (RAS, after resampling, cropping and padding).
        original_affine: the first channel's affine as stored in its NIfTI file.
        original_shape: the first channel's (X, Y, Z) shape as stored.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]


def _check_headers(case: CaseFiles) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Check every file of a case from its header: readable, 3-D, on one grid. Returns the first image's geometry."""
    import nibabel as nib

    headers = {}
    for path in (*case.images, case.label):
        try:
            headers[path] = nib.load(str(path))
        except Exception as exc:  # nibabel raises many types for a corrupt or foreign file
            raise DatasetError(
                f"case '{case.case_id}': cannot read {path} ({exc}); replace the file with a valid NIfTI image"
            ) from None
    for path, img in headers.items():
        shape = tuple(int(s) for s in img.shape)
        if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
            raise DatasetError(
                f"case '{case.case_id}': {path} has shape {shape}; every file must be one 3-D volume (an nnU-Net "
                "raw dataset stores each modality as its own file, CASE_0000, CASE_0001, …: split 4-D images into channels)"
            )
    grids = {p: (tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine)) for p, img in headers.items()}
    ref_path, (ref_shape, ref_affine) = next(iter(grids.items()))
    for path, (shape, affine) in grids.items():
        if shape != ref_shape:
            listing = ", ".join(f"{p.name} {g[0]}" for p, g in grids.items())
            raise DatasetError(
                f"case '{case.case_id}': image and label grids differ ({listing}); resample them onto one grid first"
            )
        if not np.allclose(affine, ref_affine, atol=1e-3):
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(0)).round(3).tolist()
            ref_spacing = np.sqrt((ref_affine[:3, :3] ** 2).sum(0)).round(3).tolist()
            raise DatasetError(
                f"case '{case.case_id}': {path.name} and {ref_path.name} have the same shape but different "
                f"affines (spacing {spacing} vs {ref_spacing} mm, origin {affine[:3, 3].round(2).tolist()} vs "
                f"{ref_affine[:3, 3].round(2).tolist()}); resample every modality and the label onto one grid first"
            )
    return np.asarray(ref_affine, dtype=np.float64), ref_shape


def _check_label_values(case: CaseFiles, num_classes: int) -> None:
    """Label voxels must be integers in 0..K−1: anything else would be rounded or wrapped silently."""
    import nibabel as nib

    try:
        values = np.unique(np.asanyarray(nib.load(str(case.label)).dataobj))
    except Exception as exc:
        raise DatasetError(
            f"case '{case.case_id}': cannot read {case.label} ({exc}); the file may be truncated — replace it"
        ) from None
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise DatasetError(
            f"case '{case.case_id}': {case.label} holds non-integer label values ({', '.join(f'{v:g}' for v in fractional[:5])}); "
            "labels must be integer class indices from dataset.json (was the label resampled with linear "
            "interpolation? use nearest neighbour)"
        )
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DatasetError(
            f"case '{case.case_id}': {case.label} holds label value(s) {', '.join(f'{v:g}' for v in bad[:5])}, "
            f"not in dataset.json labels (0..{num_classes - 1}); fix the label file or add the class to dataset.json"
        )


def preprocess_case(pipeline: Compose, case: CaseFiles, num_classes: int) -> PreprocessedCase:
    """Run ``pipeline`` on one case.

    Raises:
        DatasetError: a file cannot be read (missing, corrupt, truncated), is not 3-D, the modalities and label are
            not on one grid (shape and affine), or the label holds values that are not class indices.
    """
    import nibabel as nib

    original_affine, original_shape = _check_headers(case)
    _check_label_values(case, num_classes)
    try:
        out = pipeline({"image": [str(p) for p in case.images], "label": str(case.label)})
    except Exception as exc:  # a file whose header reads but whose data does not (truncated .nii.gz)
        for path in case.images:
            try:
                np.asanyarray(nib.load(str(path)).dataobj)
            except Exception as read_exc:
                raise DatasetError(
                    f"case '{case.case_id}': cannot read the voxels of {path} ({read_exc}); the file may be "
                    "truncated — replace it"
                ) from None
        raise DatasetError(f"case '{case.case_id}': preprocessing failed ({exc})") from None
    image = np.asarray(out["image"].numpy(), dtype=np.float32)
    label = np.asarray(out["label"].numpy()[0]).round().astype(np.uint8)
    if not np.isfinite(image).all():
        raise DatasetError(
            f"case '{case.case_id}': preprocessing produced NaN or Inf (check the image files)"
        )
    affine = np.asarray(out["image"].affine, dtype=np.float64)
    return PreprocessedCase(image, label, affine, original_affine, original_shape)


def foreground_locations(label: np.ndarray, max_per_class: int = 10_000, seed: int = 0) -> np.ndarray:
    """Up to ``max_per_class`` random voxels of each foreground class, for foreground-oversampled patches.

    Returns:
        (N, 4) int32 rows of (class, x, y, z).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for cls in range(1, int(label.max()) + 1):
        coords = np.argwhere(label == cls)
        if len(coords) > max_per_class:
            coords = coords[rng.choice(len(coords), max_per_class, replace=False)]
        rows.append(np.concatenate([np.full((len(coords), 1), cls), coords], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.empty((0, 4), np.int32)
