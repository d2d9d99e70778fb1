"""Training patches read from the store, with every cached teacher map cut to the same view.

A patch is chosen as a box on the case's preprocessed grid (a third of them centred near foreground, as nnU-Net
does). Only that region of the image, label and teacher softmax is read from Zarr; each teacher's coarse and fine
attention maps are resampled onto the teacher's own grid over that box. MONAI dictionary transforms then flip
and rotate image, label and every map together, so the student sees exactly the view each teacher labelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (
    Affine,
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandomizableTransform,
    RandRotate90d,
    RandShiftIntensityd,
)
from torch.utils.data import Dataset

from core.config import AugmentationConfig, TrainingConfig
from core.errors import StoreError
from core.store.format import Box
from core.store.teacher_store import TeacherStore
from core.terms import ATTENTION_KINDS, DistillationTargets, TargetsNeeded

__all__ = [
    "EpochSampler",
    "PatchDataset",
    "RandJointAffined",
    "TargetRequest",
    "build_augmentation",
    "crop_map",
    "fine_alignment",
    "targets_from_batch",
    "training_patches",
]


@dataclass(frozen=True)
class TargetRequest:
    """Which teacher data each patch carries (cached) or each batch is given (online).

    A recipe's request is :meth:`for_recipe`: what its terms read (:func:`core.terms.targets_needed`), nothing more.

    Attributes:
        teachers: teacher names in the store.
        temperature: the softmax is re-tempered to this T when read.
        softmax: read teacher probabilities.
        attention: read coarse and fine attention maps.
        sketches: read coarse and fine feature sketches.
        features: read coarse and fine teacher features rebuilt from the sketches in the teacher's own channels
            (``basis @ sketch``).
    """

    teachers: tuple[str, ...]
    temperature: float = 1.0
    softmax: bool = True
    attention: bool = True
    sketches: bool = False
    features: bool = False

    @classmethod
    def for_recipe(cls, teachers: Sequence[str], temperature: float, needed: TargetsNeeded) -> TargetRequest:
        """The request of a recipe whose terms read ``needed`` (:func:`core.terms.targets_needed`) of ``teachers``.

        Args:
            teachers: the teachers' store keys (``<name>/fold_<k>`` or ``<name>/all_folds``).
            temperature: the recipe's softmax temperature T.
            needed: what its terms of non-zero weight read.
        """
        return cls(
            teachers=tuple(teachers),
            temperature=temperature,
            softmax=needed.softmax,
            attention=needed.attention,
            sketches=needed.sketches,
            features=needed.features,
        )

    def kinds(self) -> list[str]:
        """The target kinds carried, as keys of :data:`~core.terms.DistillationTargets`."""
        kinds = ["softmax"] if self.softmax else []
        kinds += list(ATTENTION_KINDS) if self.attention else []
        kinds += [f"{k}_sketch" for k in ATTENTION_KINDS] if self.sketches else []
        kinds += [f"{k}_features" for k in ATTENTION_KINDS] if self.features else []
        return kinds


def crop_map(
    amap: np.ndarray, stride: Sequence[float], start: Sequence[int], size: Sequence[int]
) -> torch.Tensor:
    """Resample the part of a low-resolution map that covers a patch onto the map's own grid over that patch.

    Map voxel ``u`` covers case voxels ``[u·s, (u+1)·s)``. The output has ``round(size / s)`` cells per axis,
    each sampled (trilinearly) at its centre, so a patch whose start is a multiple of the stride gets the map's
    voxels exactly.

    Args:
        amap: (x, y, z) map, or (C, x, y, z) multi-channel map (feature sketch), of the whole case.
        stride: case voxels per map voxel, per axis.
        start: the patch's first voxel on the case grid.
        size: the patch size in case voxels.

    Returns:
        (1, n_x, n_y, n_z) or (C, n_x, n_y, n_z) float32.
    """
    amap = amap[None] if amap.ndim == 3 else amap
    cells = [max(1, round(p / s)) for p, s in zip(size, stride, strict=True)]
    exact = [float(o) / s for o, s in zip(start, stride, strict=True)]
    if all(
        e.is_integer() and n * s == p and int(e) + n <= m
        for e, n, s, p, m in zip(exact, cells, stride, size, amap.shape[1:], strict=True)
    ):  # the patch covers whole map cells: they are the samples (what the interpolation would give, exactly)
        box = tuple(slice(int(e), int(e) + n) for e, n in zip(exact, cells, strict=True))
        return torch.from_numpy(np.ascontiguousarray(amap[(slice(None), *box)], dtype=np.float32))
    axes = []
    for o, p, s, n, m in zip(start, size, stride, cells, amap.shape[1:], strict=True):
        centres = o + (np.arange(n) + 0.5) * (p / n)  # case-voxel coordinates of output cell centres
        u = centres / s - 0.5  # map-voxel coordinates
        axes.append(
            torch.as_tensor(2.0 * u / (m - 1) - 1.0 if m > 1 else np.zeros_like(u), dtype=torch.float32)
        )
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack((gz, gy, gx), dim=-1)[None]  # grid_sample wants (W, H, D) order last
    src = torch.as_tensor(amap, dtype=torch.float32)[None]
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def fine_alignment(strides: Sequence[float]) -> int:
    """Where patch starts snap to, given the strides of the fine maps (and sketches) a patch reads: the largest
    when it is a whole number and a multiple of every other, else 1 — so those large maps are cut, not interpolated
    (:func:`crop_map`)."""
    if not strides or not all(float(s).is_integer() for s in strides):
        return 1
    largest = int(max(strides))
    return largest if all(largest % int(s) == 0 for s in strides) else 1


class RandJointAffined(MapTransform, RandomizableTransform):
    """A random rotation and scaling about the centre, the same for every key, each resampled on its own grid.

    MONAI's ``RandAffined`` resamples every key onto the first key's spatial size, which would put a tap map of
    8³ cells onto the image's 32³ grid; here each key keeps its own grid (MONAI ``Affine`` per key, one draw of
    the parameters). Labels (``label_keys``) by nearest neighbour, everything else bilinearly; borders replicated.

    Args:
        keys: keys to transform, arrays (C, X, Y, Z).
        label_keys: keys resampled by nearest neighbour.
        prob: probability of transforming a sample at all.
        max_angle: rotations drawn uniformly in ±max_angle radians about each axis.
        max_scale: scale factors drawn uniformly in 1 ± max_scale per axis.
    """

    def __init__(
        self,
        keys: Sequence[str],
        label_keys: Sequence[str],
        prob: float,
        max_angle: float,
        max_scale: float,
    ):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.label_keys = set(label_keys)
        self.max_angle, self.max_scale = max_angle, max_scale
        self._rotate: list[float] = [0.0, 0.0, 0.0]
        self._scale: list[float] = [1.0, 1.0, 1.0]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._rotate = [float(self.R.uniform(-self.max_angle, self.max_angle)) for _ in range(3)]
        self._scale = [float(1.0 + self.R.uniform(-self.max_scale, self.max_scale)) for _ in range(3)]

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            mode = "nearest" if key in self.label_keys else "bilinear"
            affine = Affine(
                rotate_params=self._rotate, scale_params=self._scale, padding_mode="border", image_only=True
            )
            img = d[key]
            d[key] = affine(img, spatial_size=tuple(img.shape[1:]), mode=mode)
        return d


def build_augmentation(
    target_keys: Sequence[str], cfg: AugmentationConfig, patch_size: Sequence[int]
) -> Compose:
    """MONAI dictionary transforms for a training patch and the teacher data cut to the same view.

    Spatial transforms (flips, 90° rotations in the x-y plane when it is square, small rotations and scaling about
    the patch centre) get the same random parameters for ``image``, ``label`` and every key in ``target_keys``, each
    resampled on its own grid (maps of a coarser tap cover the same patch with fewer cells, so a rotation about the
    centre is the same rotation on every grid): images, probabilities and maps bilinearly (a convex combination of
    distributions is a distribution), labels by nearest neighbour, borders replicated. Intensity transforms
    (gaussian noise, gamma, per-channel shifts) touch ``image`` only.
    """
    keys = ["image", "label", *target_keys]
    transforms: list[Any] = []
    if cfg.flip:
        transforms += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    if cfg.rotate90 and patch_size[0] == patch_size[1]:
        transforms.append(RandRotate90d(keys=keys, prob=0.5, spatial_axes=(0, 1)))
    if cfg.rotate_degrees > 0 or cfg.scale > 0:
        angle = float(np.deg2rad(cfg.rotate_degrees))
        transforms.append(
            RandJointAffined(
                keys=keys,
                label_keys=("label",),
                prob=cfg.spatial_prob,
                max_angle=angle,
                max_scale=cfg.scale,
            )
        )
    if cfg.noise_std > 0:
        transforms.append(RandGaussianNoised(keys="image", prob=cfg.intensity_prob, std=cfg.noise_std))
    if cfg.gamma is not None:
        transforms.append(RandAdjustContrastd(keys="image", prob=cfg.intensity_prob, gamma=cfg.gamma))
    if cfg.shift > 0:
        transforms.append(
            RandShiftIntensityd(keys="image", prob=cfg.intensity_prob, offsets=cfg.shift, channel_wise=True)
        )
    return Compose(transforms)


def targets_from_batch(
    batch: dict[str, torch.Tensor], request: TargetRequest, device: torch.device
) -> DistillationTargets:
    """Gather a collated batch's cached teacher data into the loss's target layout.

    Teacher features (``<tap>_features``) are rebuilt here, on ``device``, from the sketch and its basis the batch
    carries (``basis @ sketch`` per voxel): a patch then crosses from the loader's workers as k sketch channels, not
    the teacher's C (768 for UNETR: 0.8 GB per 128³ patch at the fine tap). Rebuilding commutes with the patch's
    flips, rotations and (bilinear) resampling, which are linear per channel.
    """
    targets: DistillationTargets = {}
    for kind in request.kinds():
        if kind.endswith("_features"):
            tap = kind.removesuffix("_features")
            targets[kind] = {
                t: torch.einsum(
                    "bck,bk...->bc...",
                    batch[f"{tap}_basis/{t}"].to(device, non_blocking=True),
                    batch[f"{tap}_sketch/{t}"].to(device, non_blocking=True),
                )
                for t in request.teachers
            }
        else:
            targets[kind] = {t: batch[f"{kind}/{t}"].to(device, non_blocking=True) for t in request.teachers}
    return targets


def _sketch_region(
    stride: Sequence[float], grid: Sequence[int], start: Sequence[int], size: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """The part of a tap grid that :func:`crop_map` samples for a patch (one cell of margin each side, for the
    bilinear neighbours), and the patch's start relative to that part, in case voxels."""
    lo = [max(0, int(np.floor(o / s)) - 1) for o, s in zip(start, stride, strict=True)]
    hi = [min(m, int(np.ceil((o + p) / s)) + 1) for o, p, s, m in zip(start, size, stride, grid, strict=True)]
    region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return region, tuple(round(o - a * s) for o, a, s in zip(start, lo, stride, strict=True))


class PatchDataset(Dataset):
    """Random training patches of ``case_ids`` from a store, optionally with teacher targets.

    Each item is a dict of tensors: ``image`` (C, P, P, P), ``label`` (1, P, P, P) long, and for each requested
    teacher ``softmax/<t>`` (K, P, P, P), ``coarse/<t>`` and ``fine/<t>`` (1, n, n, n). The store is opened
    lazily in each worker process (never shared across a fork).

    Args:
        store_path: the store's path or URL.
        case_ids: cases to sample from.
        patch_size: (P_x, P_y, P_z).
        length: items per epoch.
        foreground_oversampling: fraction of patches centred near a foreground voxel.
        seed: base seed; an item depends on (seed, epoch, index) only.
        targets: teacher data to attach, or ``None``.
        augment: apply ``augmentation`` (see :func:`build_augmentation`); ``False`` for none.
        augmentation: what to apply; default: flips on every axis and 90° rotations in the x-y plane.
        context: computes the ``targets`` of a patch instead of reading them from the store —
            ``context(store, case_id, start, patch_size) -> {key: tensor}`` with the keys a cached patch carries
            (:class:`core.teachers.context.ContextTargets`); they are augmented as cached maps are. A dataset with a
            context runs in the training process (its teachers are there).
        align: patch starts snap to multiples of this; a :class:`TargetRequest`: to the fine stride of those cached
            maps, case by case, as a run reading them would (without reading them as targets); ``None``: to the fine
            stride of the cached maps read (1 when none is read). Runs that must draw the same patches as a cached
            run pass that run's alignment.
    """

    def __init__(
        self,
        store_path: str | Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        length: int,
        foreground_oversampling: float = 0.33,
        seed: int = 0,
        targets: TargetRequest | None = None,
        augment: bool = True,
        augmentation: AugmentationConfig | None = None,
        context: Any = None,
        align: int | TargetRequest | None = None,
    ):
        if not case_ids:
            raise StoreError("no training cases to sample patches from")
        self.store_path = str(store_path)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.length = length
        self.fg = foreground_oversampling
        self.seed = seed
        self.targets = targets
        self.augment = augment
        self.context = context
        self.align = align
        self.epoch = 0
        self._store: TeacherStore | None = None
        self._maps: dict[tuple[str, str, str], tuple[np.ndarray, tuple[float, ...]]] = {}
        self._fg: dict[str, np.ndarray] = {}
        self._grids: dict[tuple[str, str, str], tuple[tuple[int, ...], tuple[float, ...]]] = {}
        self._augment = build_augmentation(
            self._target_keys(), augmentation or AugmentationConfig(), self.patch_size
        )

    def _target_keys(self) -> list[str]:
        """The spatial keys a patch carries (augmented with it); features travel as their sketch and basis."""
        if self.targets is None:
            return []
        kinds = [k for k in self.targets.kinds() if not k.endswith("_features")]
        if self.targets.features and not self.targets.sketches:
            kinds += [f"{k}_sketch" for k in ATTENTION_KINDS]
        return [f"{k}/{t}" for k in kinds for t in self.targets.teachers]

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh set of patches for ``epoch`` (call before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    @property
    def store(self) -> TeacherStore:
        if self._store is None:
            self._store = TeacherStore.open(self.store_path)
        return self._store

    def _box(self, rng: np.random.Generator, case_id: str) -> tuple[tuple[int, ...], Box]:
        shape = self.store.case_shape(case_id)
        if any(s < p for s, p in zip(shape, self.patch_size, strict=True)):
            raise StoreError(
                f"case '{case_id}' has grid {shape}, smaller than the patch {self.patch_size}; raise "
                "preprocessing.min_size to the patch size and re-run preprocessing"
            )
        hi = [s - p for s, p in zip(shape, self.patch_size, strict=True)]
        fg = self._foreground(case_id) if rng.random() < self.fg else np.empty((0, 4))
        if len(fg):
            point = fg[rng.integers(len(fg)), 1:]
            jitter = rng.integers(-(np.array(self.patch_size) // 4), np.array(self.patch_size) // 4 + 1)
            start = np.clip(point - np.array(self.patch_size) // 2 + jitter, 0, hi)
        else:
            start = np.array([rng.integers(0, h + 1) for h in hi])
        start = tuple(int(s - s % self.alignment(case_id)) for s in start)
        return start, tuple(slice(s, s + p) for s, p in zip(start, self.patch_size, strict=True))  # type: ignore[return-value]

    def _sketch_grid(
        self, teacher: str, case_id: str, kind: str
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        key = (teacher, case_id, f"{kind}_sketch")
        if key not in self._grids:
            self._grids[key] = self.store.sketch_grid(teacher, case_id, kind)
        return self._grids[key]

    def alignment(self, case_id: str) -> int:
        """Patch starts snap to a multiple of the fine maps' and sketches' strides (the largest, when it is a multiple
        of the others; else 1), so those large maps are cut, not interpolated (:func:`crop_map`); coarse maps are
        small. 1 when no map is read."""
        if isinstance(self.align, int):
            return self.align
        t = self.align if isinstance(self.align, TargetRequest) else self.targets
        if t is None or (self.context is not None and self.align is None):
            return 1
        strides: list[float] = []
        for teacher in t.teachers:
            if t.attention:
                strides += self._attention(teacher, case_id, "fine")[1]
            if t.sketches or t.features:
                strides += self._sketch_grid(teacher, case_id, "fine")[1]
        return fine_alignment(strides)

    def _foreground(self, case_id: str) -> np.ndarray:
        if case_id not in self._fg:  # small (N, 4) lists; keep them per worker
            self._fg[case_id] = self.store.read_foreground(case_id)
        return self._fg[case_id]

    def _attention(self, teacher: str, case_id: str, kind: str) -> tuple[np.ndarray, tuple[float, ...]]:
        key = (teacher, case_id, kind)
        if key not in self._maps:  # maps are tiny; keep them per worker
            self._maps[key] = self.store.read_attention(teacher, case_id, kind)
        return self._maps[key]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # an index past the end carries its epoch (EpochSampler): persistent workers never see set_epoch
        epoch, index = divmod(index, self.length) if index >= self.length else (self.epoch, index)
        rng = np.random.default_rng([self.seed, epoch, index])
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        start, box = self._box(rng, case_id)
        sample: dict[str, torch.Tensor] = {
            "image": torch.from_numpy(np.ascontiguousarray(self.store.read_image(case_id, box))),
            "label": torch.from_numpy(self.store.read_label(case_id, box).astype(np.int64))[None],
        }
        if self.targets is not None and self.context is not None:
            sample.update(self.context(self.store, case_id, start, self.patch_size))
        elif self.targets is not None:
            for t in self.targets.teachers:
                if self.targets.softmax:
                    probs = self.store.read_softmax(t, case_id, box, self.targets.temperature)
                    sample[f"softmax/{t}"] = torch.from_numpy(probs)
                if self.targets.attention:
                    for kind in ATTENTION_KINDS:
                        amap, stride = self._attention(t, case_id, kind)
                        sample[f"{kind}/{t}"] = crop_map(amap, stride, start, self.patch_size)
                if self.targets.sketches or self.targets.features:  # only the chunks under the patch are read
                    for kind in ATTENTION_KINDS:
                        grid, stride = self._sketch_grid(t, case_id, kind)
                        region, offset = _sketch_region(stride, grid, start, self.patch_size)
                        sketch, _ = self.store.read_sketch(t, case_id, kind, region)
                        sample[f"{kind}_sketch/{t}"] = crop_map(sketch, stride, offset, self.patch_size)
                        if self.targets.features:  # rebuilt on the device (targets_from_batch)
                            basis = self.store.read_sketch_basis(t, case_id, kind)
                            sample[f"{kind}_basis/{t}"] = torch.from_numpy(np.ascontiguousarray(basis))
        if self.augment:
            self._augment.set_random_state(seed=int(rng.integers(2**31)))
            sample = self._augment(sample)
        return {
            k: v.as_tensor() if isinstance(v, MetaTensor) else torch.as_tensor(v) for k, v in sample.items()
        }


class EpochSampler(torch.utils.data.Sampler[int]):
    """The indices of one epoch of a :class:`PatchDataset`, in order, each carrying the epoch (``epoch · length + i``).

    With ``persistent_workers`` the worker processes keep their own copy of the dataset, so
    :meth:`PatchDataset.set_epoch` in the main process never reaches them; the epoch travels in the index instead,
    and the patches are exactly those of ``set_epoch(epoch)`` then indices ``0 … length − 1``. Under data-parallel
    training each of the ``world`` processes draws its own ``length`` patches: process r of epoch e draws those of
    the dataset's epoch ``e · world + r`` (with one process, epoch e's own).
    """

    def __init__(self, length: int, rank: int = 0, world: int = 1) -> None:
        self.length, self.rank, self.world = length, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        first = (self.epoch * self.world + self.rank) * self.length
        return iter(range(first, first + self.length))


def training_patches(
    store_path: str | Path,
    cases: Sequence[str],
    training: TrainingConfig,
    seed: int,
    targets: TargetRequest | None = None,
    context: Any = None,
    align: int | TargetRequest | None = None,
) -> PatchDataset:
    """The patches one epoch of a training run draws, as ``training`` sets them (teachers and students alike).

    ``iterations_per_epoch × batch_size`` patches of ``training.patch_size`` from ``cases``, with its foreground
    oversampling and augmentation, and the ``targets`` a distilling student reads (``None``: image and label only):
    cached, or computed by ``context``; ``align``: see :class:`PatchDataset`.
    """
    return PatchDataset(
        store_path,
        cases,
        training.patch_size,
        length=training.iterations_per_epoch * training.batch_size,
        foreground_oversampling=training.foreground_oversampling,
        seed=seed,
        targets=targets,
        augmentation=training.augmentation,
        context=context,
        align=align,
    )
