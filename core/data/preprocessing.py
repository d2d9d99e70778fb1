"""The preprocessing pipeline, built from MONAI dictionary transforms.

load each modality (NIfTI, or MetaImage through SimpleITK) → channel-first → modalities and label on another grid
resampled onto the reference modality's (``ResampleToMatch``) → crop to the case's world box (HECKTOR) → stack the
modalities → (binarise the label) → orientation (RAS) → spacing → foreground crop → per-modality normalisation →
pad to the minimum size → pad to a multiple of ``size_divisor``. Image and label go through every spatial step
together. The result, with its final affine, is written once into the store; stage 2 never reads NIfTI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    DivisiblePadd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    ResampleToMatch,
    ScaleIntensityRange,
    Spacingd,
    SpatialCrop,
    SpatialPadd,
)

from core.config import PreprocessingConfig
from core.data.layout import CaseFiles
from core.data.readers import SimpleITKReader, read_header, read_volume
from core.errors import DatasetError

__all__ = [
    "NormalizeModalitiesd",
    "PreprocessedCase",
    "build_preprocessing",
    "check_image_headers",
    "foreground_locations",
    "preprocess_case",
    "preprocess_image",
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

    def __init__(
        self,
        keys: KeysCollection,
        channel_names: tuple[str, ...],
        ct_window: tuple[float, float],
        overrides: Mapping[str, str] | None = None,
    ):
        super().__init__(keys)
        self.channel_names = channel_names
        self.overrides = dict(overrides or {})
        self.ct = ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
        self.zscore = NormalizeIntensity()

    def scheme(self, name: str) -> str:
        """``ct``, ``zscore`` or ``none`` for a modality: the configured one, else by name as nnU-Net does."""
        return self.overrides.get(name, "ct" if name.upper() == "CT" else "zscore")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.channel_names):
                raise ValueError(f"expected {len(self.channel_names)} channels, got {img.shape[0]}")
            out = img.clone()
            for c, name in enumerate(self.channel_names):
                scheme = self.scheme(name)
                if scheme != "none":
                    out[c] = (self.ct if scheme == "ct" else self.zscore)(img[c])
            d[key] = out
        return d


class ToReferenceGridd(MapTransform):
    """Resample every key not on the reference key's grid onto it (MONAI ``ResampleToMatch``): bilinear for images,
    nearest for labels. A key already on the grid (same shape, affine within 1e-3) is left untouched."""

    def __init__(self, keys: KeysCollection, reference: str, label_keys: tuple[str, ...] = ("label",)):
        super().__init__(keys)
        self.reference, self.label_keys = reference, label_keys
        self.resample = ResampleToMatch(padding_mode="zeros")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = d[self.reference]
        for key in self.key_iterator(d):
            img = d[key]
            if key == self.reference or (
                tuple(img.shape[1:]) == tuple(ref.shape[1:])
                and np.allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=1e-3)
            ):
                continue
            mode = "nearest" if key in self.label_keys else "bilinear"
            d[key] = self.resample(img, img_dst=ref, mode=mode)
        return d


def box_voxels(
    box: tuple[float, ...] | list[float],
    affine: np.ndarray,
    shape: tuple[int, ...],
    margin: int = 0,
    half_open: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(start, end)`` voxel indices (end exclusive, clipped to ``shape``) of the voxels whose centres lie in a RAS
    world box ``(x0, x1, y0, y1, z0, z1)`` on a grid, grown by ``margin`` voxels. ``half_open``: centres in [lo, hi) on
    each axis, so an extent of n spacings holds exactly n voxels whatever the grid's offset (for a grid whose axes
    run along the world's, as after ``Orientationd``)."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    corners = np.array([[x, y, z, 1.0] for x in box[0:2] for y in box[2:4] for z in box[4:6]])
    voxels = (inverse @ corners.T)[:3]
    lo, hi = voxels.min(axis=1), voxels.max(axis=1)
    start = np.ceil(lo - 1e-6) - margin
    end = (np.ceil(hi - 1e-6) if half_open else np.floor(hi + 1e-6) + 1) + margin
    limit = np.asarray(shape[:3])
    return np.clip(start, 0, limit).astype(int), np.clip(end, 0, limit).astype(int)


class CropWorldBoxd(MapTransform):
    """Crop every key to the case's box in RAS world mm (``data["box"]`` = (x0, x1, y0, y1, z0, z1); absent or
    ``None``: no crop): the voxels of the reference key's grid whose centres lie in the box (see :func:`box_voxels`).

    Used twice for HECKTOR: before resampling, on the CT grid with a one-voxel margin (so resampling has data up to
    the box's faces), and after ``Spacingd``, half-open on the new grid, so a 144 mm box at 1 mm is exactly 144³.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference: str,
        box_key: str = "box",
        margin: int = 0,
        half_open: bool = False,
    ):
        super().__init__(keys)
        self.reference, self.box_key, self.margin, self.half_open = reference, box_key, margin, half_open

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        box = d.get(self.box_key)
        if box is None:
            return d
        ref = d[self.reference]
        shape = tuple(ref.shape[1:])
        inside = box_voxels(
            box, np.asarray(ref.affine), shape
        )  # the box without margin must hold a voxel centre
        if np.any(inside[1] <= inside[0]):
            extent = [(float(a), float(b)) for a, b in zip(box[0::2], box[1::2], strict=True)]
            raise DatasetError(
                f"the bounding box {extent} (RAS mm) lies outside the image (voxels 0..{[s - 1 for s in shape]}): "
                "check the case's row in bbox.csv"
            )
        start, end = box_voxels(box, np.asarray(ref.affine), shape, self.margin, self.half_open)
        crop = SpatialCrop(roi_start=start.tolist(), roi_end=end.tolist())
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


class BinariseLabeld(MapTransform):
    """Every label value ≥ 1 becomes 1 (PI-CAI's lesion grades → one csPCa class)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (d[key] >= 1).to(d[key].dtype)
        return d


def image_keys(files: int) -> list[str]:
    return [f"image_{i}" for i in range(files)]


def _reading_steps(images: list[str], label: list[str], reference: str) -> list[Any]:
    """Load every file, put it channel-first on the reference modality's grid, crop the world box, stack the
    modalities into ``image``."""
    keys = [*images, *label]
    load = LoadImaged(keys=keys, image_only=True)
    load.register(SimpleITKReader())  # .mha/.mhd; NIfTI stays with MONAI's default readers
    join = (
        ConcatItemsd(keys=images, name="image", dim=0)
        if len(images) > 1
        else CopyItemsd(keys=images, names="image")
    )
    return [
        load,
        EnsureChannelFirstd(keys=keys),
        ToReferenceGridd(keys=keys, reference=reference),
        CropWorldBoxd(keys=keys, reference=reference, margin=1),
        join,
        DeleteItemsd(keys=images),
    ]


def _grid_steps(cfg: PreprocessingConfig, label: list[str]) -> list[Any]:
    """Orientation (RAS), target spacing, the box exactly on the new grid, the foreground crop: image and label
    together."""
    threshold = cfg.foreground_threshold
    return [
        # labels stated, so MONAI's FutureWarning about their changing default is not printed on every run
        Orientationd(keys=["image", *label], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(
            keys=["image", *label],
            pixdim=cfg.target_spacing,
            mode=("bilinear", "nearest")[: 1 + len(label)],
        ),
        CropWorldBoxd(keys=["image", *label], reference="image", half_open=True),  # the box exactly, new grid
        CropForegroundd(
            keys=["image", *label],
            source_key="image",
            select_fn=lambda x: x > threshold,
            channel_indices=cfg.foreground_channel,
            margin=cfg.crop_margin,
            allow_smaller=True,
        ),
    ]


def _intensity_and_padding_steps(
    cfg: PreprocessingConfig, channel_names: tuple[str, ...], label: list[str]
) -> list[Any]:
    """Per-modality normalisation, then padding to the minimum size and to a multiple of ``size_divisor`` (the
    image by replication, the label with background)."""
    with_label = bool(label)
    return [
        NormalizeModalitiesd(
            keys="image",
            channel_names=channel_names,
            ct_window=cfg.ct_window,
            overrides=cfg.normalization,
        ),
        SpatialPadd(keys="image", spatial_size=cfg.min_size, mode="replicate"),
        *([SpatialPadd(keys="label", spatial_size=cfg.min_size, mode="constant")] if with_label else []),
        DivisiblePadd(keys="image", k=cfg.size_divisor, mode="replicate"),
        *([DivisiblePadd(keys="label", k=cfg.size_divisor, mode="constant")] if with_label else []),
    ]


def build_preprocessing(
    cfg: PreprocessingConfig,
    channel_names: tuple[str, ...],
    files: int | None = None,
    binarise_label: bool = False,
    with_label: bool = True,
) -> Compose:
    """The MONAI pipeline for one case dict ``{"image_0": path, …, "label": path, "box": (6 floats) | None}``.

    Args:
        files: image files per case (default one per channel; 1 for a 4-D file holding every channel).
        binarise_label: label values ≥ 1 become one class.
        with_label: ``False`` builds the same pipeline for the images alone (a case to predict, no ``label``
            key): every step on the image is the same, so its result is the same voxel for voxel.
    """
    files = len(channel_names) if files is None else files
    images = image_keys(files)
    label = ["label"] if with_label else []
    reference = images[min(cfg.reference_channel, files - 1)]
    return Compose(
        [
            *_reading_steps(images, label, reference),
            *([BinariseLabeld(keys="label")] if binarise_label and with_label else []),
            *_grid_steps(cfg, label),
            *_intensity_and_padding_steps(cfg, channel_names, label),
        ]
    )


def case_input(case: CaseFiles) -> dict[str, object]:
    """The pipeline's input dict for one case (no ``label`` key for a case to predict, whose label is ``None``)."""
    images = {k: str(p) for k, p in zip(image_keys(len(case.images)), case.images, strict=True)}
    label = {} if case.label is None else {"label": str(case.label)}
    return {**images, **label, "box": case.box}


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


def _world_box(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The axis-aligned world (RAS mm) extent of a grid's voxel centres."""
    corners = np.array(
        [[x, y, z, 1.0] for x in (0, shape[0] - 1) for y in (0, shape[1] - 1) for z in (0, shape[2] - 1)]
    )
    world = (affine @ corners.T)[:3]
    return world.min(axis=1), world.max(axis=1)


def _overlap(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], pad: np.ndarray) -> float:
    """Fraction of the smaller of two world extents (grown by half a voxel) that the other covers."""
    lo = np.maximum(a[0] - pad, b[0] - pad)
    hi = np.minimum(a[1] + pad, b[1] + pad)
    inter = np.prod(np.clip(hi - lo, 0, None))
    size = min(np.prod(a[1] - a[0] + 2 * pad), np.prod(b[1] - b[0] + 2 * pad))
    return float(inter / size) if size > 0 else 0.0


MIN_OVERLAP = 0.5


def _check_headers(
    case: CaseFiles, channels: int, reference: int = 0
) -> tuple[np.ndarray, tuple[int, int, int], int]:
    """Check every file of a case from its header: readable, 3-D (or one 4-D file of every channel), and every
    modality and the label covering the same part of the world (files on other grids are resampled, but two files
    that barely overlap are two different scans). Returns the reference grid's affine and shape, and the number of
    image files."""
    headers = {}
    for path in (*case.images, *(() if case.label is None else (case.label,))):
        try:
            headers[path] = read_header(path)
        except DatasetError as exc:
            raise DatasetError(f"case '{case.case_id}': {exc}") from None
    for path, (shape, _) in headers.items():
        four_d_ok = case.channels_in_file and path != case.label and len(shape) == 4 and shape[3] == channels
        if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1) and not four_d_ok:
            raise DatasetError(
                f"case '{case.case_id}': {path} has shape {shape}; every file must be one 3-D volume (an nnU-Net "
                "raw dataset stores each modality as its own file, CASE_0000, CASE_0001, …: split 4-D images into "
                f"channels){f'; a Decathlon image holds {channels} channels last' if case.channels_in_file else ''}"
            )
    ref_path = case.images[min(reference, len(case.images) - 1)]  # the grid the pipeline resamples onto
    ref_shape, ref_affine = headers[ref_path][0][:3], headers[ref_path][1]
    ref_box = _world_box(ref_shape, ref_affine)
    for path, (shape, affine) in headers.items():
        if path == ref_path:
            continue
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
        ref_spacing = np.sqrt((ref_affine[:3, :3] ** 2).sum(0))
        share = _overlap(ref_box, _world_box(shape[:3], affine), np.maximum(spacing, ref_spacing) / 2)
        if share < MIN_OVERLAP:
            raise DatasetError(
                f"case '{case.case_id}': {path.name} and {ref_path.name} cover different parts of the world (they "
                f"share {share:.0%} of the smaller one: spacing {spacing.round(3).tolist()} vs "
                f"{ref_spacing.round(3).tolist()} mm, origin {affine[:3, 3].round(2).tolist()} vs "
                f"{ref_affine[:3, 3].round(2).tolist()}); are they of the same scan? Fix the files' affines"
            )
    return np.asarray(ref_affine, dtype=np.float64), tuple(int(s) for s in ref_shape), len(case.images)  # type: ignore[return-value]


def check_image_headers(case: CaseFiles, channels: int) -> None:
    """Check a case's image files from their headers alone, as :func:`preprocess_image` will (readable, 3-D or one
    4-D file of every channel, modalities covering the same part of the world), so a batch of cases to predict is
    refused before anything is written.

    Raises:
        DatasetError: naming the case, the file and the fix.
    """
    _check_headers(case, channels)


def _check_label_values(
    case: CaseFiles, num_classes: int, binarise: bool = False, allow_empty: bool = True
) -> None:
    """Label voxels must be integers in 0..K−1 (any integer ≥ 0 when binarised); a label without foreground is
    refused unless the dataset allows lesion-free cases."""
    try:
        values = np.unique(read_volume(case.label))
    except DatasetError:
        raise
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
    bad = values[(values < 0) | ((values >= num_classes) & (not binarise))]
    if bad.size:
        raise DatasetError(
            f"case '{case.case_id}': {case.label} holds label value(s) {', '.join(f'{v:g}' for v in bad[:5])}, "
            f"not in dataset.json labels (0..{num_classes - 1}); fix the label file or add the class to dataset.json"
        )
    if not allow_empty and not (values > 0).any():
        raise DatasetError(
            f"case '{case.case_id}': {case.label} has no foreground voxel, and every case of this dataset has one; "
            "fix the label or remove the case"
        )


def preprocess_case(
    pipeline: Compose, case: CaseFiles, num_classes: int, binarise: bool = False, allow_empty: bool = True
) -> PreprocessedCase:
    """Run ``pipeline`` on one case.

    Raises:
        DatasetError: a file cannot be read (missing, corrupt, truncated), is not 3-D, the modalities and label do
            not cover the same part of the world, the label holds values that are not class indices (or no
            foreground where that is not allowed), a voxel is NaN, or the case's box lies outside the image.
    """
    original_affine, original_shape, _ = _check_headers(case, _channels_of(pipeline), _reference_of(pipeline))
    _check_label_values(case, num_classes, binarise, allow_empty)
    out = _run(pipeline, case)
    image, affine = _finite_image(out, case)
    label = np.asarray(out["label"].numpy()[0]).round().astype(np.uint8)
    return PreprocessedCase(image, label, affine, original_affine, original_shape)


def preprocess_image(pipeline: Compose, case: CaseFiles) -> PreprocessedCase:
    """Run an image-only ``pipeline`` (``build_preprocessing(..., with_label=False)``) on a case to predict.

    Returns:
        The case with an empty (0, 0, 0) ``label``; ``affine`` maps its grid to the world (MONAI's ``MetaTensor``
        carries it through reorientation, resampling, cropping and padding), so a prediction on it goes back onto
        the original grid with :func:`core.evaluation.geometry.to_original_geometry`.

    Raises:
        DatasetError: as :func:`preprocess_case`, for the image files.
    """
    original_affine, original_shape, _ = _check_headers(case, _channels_of(pipeline), _reference_of(pipeline))
    image, affine = _finite_image(_run(pipeline, case), case)
    return PreprocessedCase(image, np.zeros((0, 0, 0), np.uint8), affine, original_affine, original_shape)


def _run(pipeline: Compose, case: CaseFiles) -> dict[str, Any]:
    """The pipeline's output for one case; a failure inside MONAI becomes one message naming the case."""
    try:
        return pipeline(case_input(case))
    except DatasetError as exc:
        raise DatasetError(f"case '{case.case_id}': {exc}") from None
    except Exception as exc:  # a file whose header reads but whose data does not (truncated .nii.gz)
        for path in case.images:
            try:
                read_volume(path)
            except Exception as read_exc:
                raise DatasetError(
                    f"case '{case.case_id}': cannot read the voxels of {path} ({read_exc}); the file may be "
                    "truncated — replace it"
                ) from None
        raise DatasetError(f"case '{case.case_id}': preprocessing failed ({exc})") from None


def _finite_image(out: dict[str, Any], case: CaseFiles) -> tuple[np.ndarray, np.ndarray]:
    """The preprocessed (C, X, Y, Z) float32 image and its affine; NaN or Inf voxels are refused, naming the file."""
    image = np.asarray(out["image"].numpy(), dtype=np.float32)
    if not np.isfinite(image).all():
        bad = [p for p in case.images if not np.isfinite(np.asarray(read_volume(p), dtype=np.float64)).all()]
        where = (
            f"{', '.join(map(str, bad))} hold(s) NaN or Inf voxels"
            if bad
            else "preprocessing produced NaN or Inf"
        )
        raise DatasetError(f"case '{case.case_id}': {where}; fix or remove the file(s)")
    return image, np.asarray(out["image"].affine, dtype=np.float64)


def _reference_of(pipeline: Compose) -> int:
    """The index of the image file the pipeline resamples every other onto."""
    for t in pipeline.transforms:
        if isinstance(t, ToReferenceGridd):
            return int(str(t.reference).rsplit("_", 1)[-1])
    return 0


def _channels_of(pipeline: Compose) -> int:
    for t in pipeline.transforms:
        if isinstance(t, NormalizeModalitiesd):
            return len(t.channel_names)
    return 0


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
