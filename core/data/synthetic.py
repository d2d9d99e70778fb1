"""The embedded synthetic multimodal dataset, written as real NIfTI files in the nnU-Net v2 raw layout.

Two variants, each built so that the task needs every modality:

``petct`` (channels ``0000`` = CT in HU, ``0001`` = PET in SUV; label 1 = tumour)
    Hot spots in PET come from tumours *and* from physiological uptake of equal intensity and size, so PET alone
    cannot tell them apart. On CT, physiological uptake sits inside bright (contrast-enhanced) glands while
    tumours are barely denser than soft tissue, so CT alone cannot find the tumours. Only the pair can.

``mri`` (channels ``0000`` = T2W, ``0001`` = ADC, ``0002`` = DWI/HBV; label 1 = lesion)
    A lesion is dark on T2W, low on ADC and bright on DWI. Each channel alone has a benign mimic: a T2-dark
    scar (normal ADC/DWI), a cyst (bright T2, high ADC) and a T2 shine-through spot (bright DWI, normal ADC).

``thin`` (channels ``0000`` = T1-like, ``0001`` = T2-like; label 1 = vessel, 2 = nodule)
    Thin structures, three classes: vessels are tubes 2–3 mm across (1–2 voxels at the demo's 2 mm grid), bright on
    both channels; nodules are blobs, dark on T1 and bright on T2. Each channel alone has a mimic: nerve-like tubes
    bright on T1 only, and cysts bright on both (a vessel's signature, but round). The variant in which
    distillation was seen to hurt on real thin-structure MRI (docs/recipes.md).

``organ`` (channels ``0000`` = CT in HU, ``0001`` = T2-like MRI; label 1 = organ, 2 = core, 3 = duct, 4 = lesion)
    Four foreground classes of very different sizes, nested and touching, as in abdominal or brain anatomy: a large
    organ (slightly denser on CT and brighter on T2 than the tissue around it), its core — a substructure inside it,
    the organ's density on CT but bright on T2, so only T2 draws the boundary —, a duct 1–2 voxels across running
    through organ and core (contrast-bright on CT and bright on T2; vessel-like mimics outside and inside the organ
    are CT-bright only), and small lesions inside the organ or its core (dark on CT, mid-bright on T2; calcifications
    are CT-bright specks). Classes overlap in that order: a later class replaces an earlier one.

Volumes are anisotropic (thick slices) with LPS-style affines and a random origin per case, so orientation and
resampling in the preprocessing pipeline do real work. Everything is deterministic for a seed.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import GaussianSmooth

from core.config import SyntheticConfig

__all__ = ["CHANNELS", "LABELS", "generate_case", "write_synthetic_dataset"]

CHANNELS: dict[str, dict[str, str]] = {
    "petct": {"0": "CT", "1": "PET"},
    "mri": {"0": "T2W", "1": "ADC", "2": "HBV"},
    "thin": {"0": "T1", "1": "T2"},
    "organ": {"0": "CT", "1": "T2"},
}
LABELS: dict[str, dict[str, int]] = {
    "petct": {"background": 0, "tumour": 1},
    "mri": {"background": 0, "lesion": 1},
    "thin": {"background": 0, "vessel": 1, "nodule": 2},
    "organ": {"background": 0, "organ": 1, "core": 2, "duct": 3, "lesion": 4},
}
PREFIX = {"petct": "SYNPETCT", "mri": "SYNMRI", "thin": "SYNTHIN", "organ": "SYNORGAN"}


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def coords_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates in mm, centred on the volume, each (X, Y, Z)."""
        axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing, strict=True)]
        return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    x, y, z = grid
    d = (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    )
    return d <= 1.0


def _smooth(volume: np.ndarray, sigma_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    sigma = [sigma_mm / s for s in spacing]
    out = GaussianSmooth(sigma=sigma)(torch.from_numpy(volume[None].astype(np.float32)))
    return np.asarray(out[0], dtype=np.float32)


def _place_blobs(
    rng: np.random.Generator,
    grid: tuple[np.ndarray, ...],
    body_centre: np.ndarray,
    body_radii: np.ndarray,
    count: int,
    radius_range: tuple[float, float],
    taken: list[tuple[np.ndarray, float]],
) -> list[np.ndarray]:
    """Non-overlapping spheroids well inside the body; returns their masks."""
    masks: list[np.ndarray] = []
    for _ in range(count):
        for _attempt in range(200):
            r = rng.uniform(*radius_range)
            centre = body_centre + rng.uniform(-0.75, 0.75, size=3) * np.maximum(body_radii - r, 0.0)
            if all(np.linalg.norm(centre - c) > 1.2 * (r + rc) + 3.0 for c, rc in taken):
                break
        taken.append((centre, r))
        radii = r * rng.uniform(0.8, 1.2, size=3)
        masks.append(_ellipsoid(grid, centre, radii))
    return masks


def _petct_case(rng: np.random.Generator, g: _Grid) -> tuple[list[np.ndarray], np.ndarray]:
    grid = g.coords_mm()
    extent = np.array(g.shape) * np.array(g.spacing) / 2.0
    body_c = rng.uniform(-0.05, 0.05, size=3) * extent
    body_r = extent * rng.uniform([0.72, 0.62, 0.85], [0.85, 0.75, 0.95])
    body = _ellipsoid(grid, body_c, body_r)

    ct = np.full(g.shape, -1000.0, dtype=np.float32)
    ct[body] = 40.0
    pet = np.zeros(g.shape, dtype=np.float32)
    pet[body] = 1.0
    spine_c = body_c + np.array([0.0, -0.55 * body_r[1], 0.0])
    spine = _ellipsoid(grid, spine_c, np.array([9.0, 9.0, 10 * body_r[2]])) & body
    ct[spine] = 700.0
    pet[spine] = 0.6

    taken: list[tuple[np.ndarray, float]] = [(spine_c, 12.0)]
    glands = _place_blobs(rng, grid, body_c, body_r, int(rng.integers(1, 4)), (6.0, 10.0), taken)
    tumours = _place_blobs(rng, grid, body_c, body_r, int(rng.integers(1, 3)), (5.0, 10.0), taken)
    label = np.zeros(g.shape, dtype=np.uint8)
    for gland in glands:
        ct[gland] = 250.0  # contrast-enhancing gland: obvious on CT
        pet[gland] = rng.uniform(5.0, 11.0)  # physiological uptake: as hot as a tumour
    for tumour in tumours:
        ct[tumour] = 52.0  # 12 HU above soft tissue: hidden by CT noise
        pet[tumour] = rng.uniform(5.0, 11.0)
        label[tumour] = 1

    ct = _smooth(ct, 1.0, g.spacing) + rng.normal(0.0, 18.0, g.shape).astype(np.float32)
    pet = _smooth(pet, 3.0, g.spacing)  # PET's blur (about 7 mm FWHM)
    pet = np.clip(pet + rng.normal(0.0, 0.25, g.shape) * np.sqrt(np.maximum(pet, 0.05)), 0.0, None)
    return [ct.astype(np.float32), pet.astype(np.float32)], label


def _mri_case(rng: np.random.Generator, g: _Grid) -> tuple[list[np.ndarray], np.ndarray]:
    grid = g.coords_mm()
    extent = np.array(g.shape) * np.array(g.spacing) / 2.0
    body_c = rng.uniform(-0.05, 0.05, size=3) * extent
    body_r = extent * rng.uniform([0.8, 0.7, 0.9], [0.9, 0.8, 0.98])
    body = _ellipsoid(grid, body_c, body_r)
    gland_r = body_r * rng.uniform(0.6, 0.7, size=3)
    gland = _ellipsoid(grid, body_c, gland_r)

    t2 = np.where(body, 300.0, 0.0).astype(np.float32)
    adc = np.where(body, 1600.0, 0.0).astype(np.float32)
    hbv = np.where(body, 40.0, 0.0).astype(np.float32)
    t2[gland], adc[gland], hbv[gland] = 420.0, 1400.0, 55.0

    taken: list[tuple[np.ndarray, float]] = []
    lesions = _place_blobs(rng, grid, body_c, gland_r, int(rng.integers(1, 3)), (4.0, 7.0), taken)
    mimics = _place_blobs(rng, grid, body_c, gland_r, 3, (4.0, 6.0), taken)
    label = np.zeros(g.shape, dtype=np.uint8)
    for lesion in lesions:
        t2[lesion], adc[lesion], hbv[lesion] = 220.0, 750.0, 170.0
        label[lesion] = 1
    scar, cyst, shine = mimics
    t2[scar] = 220.0  # T2-dark, normal diffusion
    t2[cyst], adc[cyst], hbv[cyst] = 800.0, 2600.0, 70.0  # fluid
    hbv[shine] = 170.0  # bright DWI with normal ADC (T2 shine-through)

    out = []
    for vol, sd, blur in ((t2, 20.0, 0.6), (adc, 90.0, 1.2), (hbv, 10.0, 1.5)):
        vol = _smooth(vol, blur, g.spacing) + rng.normal(0.0, sd, g.shape).astype(np.float32) * body
        out.append(np.clip(vol, 0.0, None).astype(np.float32))
    return out, label


def _tube(
    rng: np.random.Generator,
    grid: tuple[np.ndarray, ...],
    centre: np.ndarray,
    extent: np.ndarray,
    radius: float,
) -> np.ndarray:
    """A bending tube of ``radius`` mm through the body: a polyline of 8 points, the voxels within ``radius``."""
    x, y, z = grid
    points = np.cumsum(rng.normal(0.0, 1.0, size=(8, 3)) * extent * 0.45, axis=0)
    points = centre + (points - points.mean(axis=0))
    near = np.full(x.shape, np.inf, dtype=np.float32)
    for a, b in itertools.pairwise(points):
        ab = b - a
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / max(float(ab @ ab), 1e-6)
        t = np.clip(t, 0.0, 1.0)
        d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        near = np.minimum(near, d2)
    return near <= radius**2


def _thin_case(rng: np.random.Generator, g: _Grid) -> tuple[list[np.ndarray], np.ndarray]:
    (t1, t2), label, body = _thin_signal(rng, g)
    out = []
    for vol, sd in ((t1, 150.0), (t2, 150.0)):  # low SNR: a vessel is 2 noise sd above tissue, voxel by voxel
        vol = _smooth(vol, 0.5, g.spacing) + rng.normal(0.0, sd, g.shape).astype(np.float32) * body
        out.append(np.clip(vol, 0.0, None).astype(np.float32))
    return out, label


def _thin_signal(rng: np.random.Generator, g: _Grid) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The ``thin`` variant before blur and noise: ``([t1, t2], label, body mask)``."""
    grid = g.coords_mm()
    extent = np.array(g.shape) * np.array(g.spacing) / 2.0
    body_c = rng.uniform(-0.05, 0.05, size=3) * extent
    body_r = extent * rng.uniform([0.8, 0.75, 0.9], [0.9, 0.85, 0.98])
    body = _ellipsoid(grid, body_c, body_r)
    t1 = np.where(body, 400.0, 0.0).astype(np.float32)
    t2 = np.where(body, 300.0, 0.0).astype(np.float32)
    label = np.zeros(g.shape, dtype=np.uint8)
    inner = body_r * 0.6
    for _ in range(int(rng.integers(2, 4))):  # nerve-like mimics: bright on T1 only
        nerve = _tube(rng, grid, body_c, inner, rng.uniform(1.0, 1.6)) & body
        t1[nerve] = 700.0
    for _ in range(int(rng.integers(2, 4))):  # vessels: bright on both
        vessel = _tube(rng, grid, body_c, inner, rng.uniform(1.0, 1.6)) & body
        t1[vessel], t2[vessel] = 700.0, 650.0
        label[vessel] = 1
    taken: list[tuple[np.ndarray, float]] = []
    nodules = _place_blobs(rng, grid, body_c, body_r, int(rng.integers(1, 3)), (4.0, 7.0), taken)
    cysts = _place_blobs(rng, grid, body_c, body_r, 2, (4.0, 6.0), taken)
    for cyst in cysts:  # bright on both, like a vessel, but round: the shape tells them apart
        t1[cyst], t2[cyst] = 700.0, 650.0
        label[cyst & (label == 1)] = 0
    for nodule in nodules:  # dark on T1, bright on T2
        t1[nodule], t2[nodule] = 250.0, 650.0
        label[nodule] = 2
    return [t1, t2], label, body


def _organ_case(rng: np.random.Generator, g: _Grid) -> tuple[list[np.ndarray], np.ndarray]:
    grid = g.coords_mm()
    extent = np.array(g.shape) * np.array(g.spacing) / 2.0
    body_c = rng.uniform(-0.05, 0.05, size=3) * extent
    body_r = extent * rng.uniform([0.82, 0.75, 0.9], [0.92, 0.85, 0.98])
    body = _ellipsoid(grid, body_c, body_r)
    ct = np.where(body, 40.0, -1000.0).astype(np.float32)
    t2 = np.where(body, 300.0, 0.0).astype(np.float32)
    label = np.zeros(g.shape, dtype=np.uint8)

    organ_c = body_c + rng.uniform(-0.15, 0.15, size=3) * body_r
    organ_r = body_r * rng.uniform([0.45, 0.4, 0.5], [0.55, 0.5, 0.6])
    organ = _ellipsoid(grid, organ_c, organ_r) & body
    ct[organ], t2[organ] = 70.0, 380.0
    label[organ] = 1
    core_c = organ_c + rng.uniform(-0.2, 0.2, size=3) * organ_r
    core = _ellipsoid(grid, core_c, organ_r * rng.uniform(0.35, 0.5, size=3)) & organ
    t2[core] = 520.0  # the organ's density on CT: only T2 shows the core
    label[core] = 2
    inner = organ_r * 0.7
    for _ in range(int(rng.integers(2, 4))):  # vessel-like mimics: contrast-bright on CT only
        mimic = _tube(rng, grid, organ_c, inner * 1.6, rng.uniform(1.0, 1.6)) & body
        ct[mimic] = 220.0
    for _ in range(int(rng.integers(1, 3))):  # ducts: bright on both, through organ and core
        duct = _tube(rng, grid, organ_c, inner, rng.uniform(1.0, 1.6)) & organ
        ct[duct], t2[duct] = 220.0, 700.0
        label[duct] = 3
    taken: list[tuple[np.ndarray, float]] = []
    lesions = _place_blobs(rng, grid, organ_c, organ_r * 0.8, int(rng.integers(1, 4)), (2.5, 4.5), taken)
    specks = _place_blobs(rng, grid, organ_c, organ_r * 0.8, 2, (1.5, 2.5), taken)
    for speck in specks:  # calcifications: bright CT specks, T2 unchanged
        ct[speck & organ] = 400.0
    for lesion in lesions:  # hypodense on CT, mid-bright on T2
        lesion = lesion & organ
        ct[lesion], t2[lesion] = 15.0, 450.0
        label[lesion] = 4

    ct = _smooth(ct, 0.7, g.spacing) + rng.normal(0.0, 20.0, g.shape).astype(np.float32)
    t2 = _smooth(t2, 0.7, g.spacing) + rng.normal(0.0, 45.0, g.shape).astype(np.float32) * body
    return [ct.astype(np.float32), np.clip(t2, 0.0, None).astype(np.float32)], label


_VARIANTS = {"petct": _petct_case, "mri": _mri_case, "thin": _thin_case, "organ": _organ_case}


def _affine(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    """LPS-style affine (first two axes flipped with respect to RAS) with a random origin."""
    affine = np.diag([-g.spacing[0], -g.spacing[1], g.spacing[2], 1.0])
    affine[:3, 3] = rng.uniform(-50.0, 50.0, size=3)
    return affine


def generate_case(cfg: SyntheticConfig, index: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """One synthetic case.

    Args:
        cfg: generator settings (variant, shape, spacing, seed).
        index: case number; the case depends only on ``(cfg.seed, index)``.

    Returns:
        ``(channels, label, affine)``: a list of (X, Y, Z) float32 volumes in the variant's channel order, the
        (X, Y, Z) uint8 label, and the 4×4 voxel-to-world affine.
    """
    rng = np.random.default_rng([cfg.seed, index])
    g = _Grid(tuple(cfg.shape), tuple(cfg.spacing))
    channels, label = _VARIANTS[cfg.kind](rng, g)
    return channels, label, _affine(rng, g)


def write_synthetic_dataset(cfg: SyntheticConfig, out_dir: Path, progress: bool = True) -> list[str]:
    """Write the dataset to ``out_dir`` in the nnU-Net v2 raw layout.

    Writes ``imagesTr/CASE_000c.nii.gz`` per channel, ``labelsTr/CASE.nii.gz`` and ``dataset.json``. The
    ``dataset.json`` is written last, so a folder without it is an interrupted run.

    Returns:
        The case identifiers.
    """
    from core.progress import track

    out_dir = Path(out_dir)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    prefix = PREFIX[cfg.kind]
    case_ids = [f"{prefix}_{i:03d}" for i in range(cfg.num_cases)]
    for i in track(range(cfg.num_cases), description=f"synthesising {cfg.kind}", enabled=progress):
        channels, label, affine = generate_case(cfg, i)
        for c, vol in enumerate(channels):
            img = nib.Nifti1Image(vol, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, out_dir / "imagesTr" / f"{case_ids[i]}_{c:04d}.nii.gz")
        seg = nib.Nifti1Image(label, affine)
        seg.set_qform(affine, code=1)
        seg.set_sform(affine, code=1)
        nib.save(seg, out_dir / "labelsTr" / f"{case_ids[i]}.nii.gz")
    description = {
        "name": f"TeachCacheSynthetic{cfg.kind.upper()}",
        "description": f"TeachCache synthetic {cfg.kind} dataset (seed {cfg.seed}); see core/data/synthetic.py",
        "channel_names": CHANNELS[cfg.kind],
        "labels": LABELS[cfg.kind],
        "numTraining": cfg.num_cases,
        "file_ending": ".nii.gz",
    }
    (out_dir / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return case_ids
