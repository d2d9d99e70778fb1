"""Onto the store's grid: the outputs of a teacher that ran on its own grid, resampled onto the store's (the
student's preprocessed grid) — docs/teachers.md:

- logits: trilinear (MONAI ``SpatialResample``, bilinear mode) from the teacher grid's affine onto the store grid's,
  borders replicated outside the teacher's field of view. Logits, not probabilities: the store keeps scores up to a
  per-voxel shift, and interpolating log-odds keeps a boundary sharp where averaging probabilities would blur it.
- attention maps: upsampled to the teacher's full grid (trilinear), resampled onto the store grid, then averaged
  over each store tap cell (area-weighted where the store's tap grid is coarser).
- tap features (for sketches): trilinear from the teacher's tap grid onto the store's tap grid (cell centres).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["to_store_grid"]


def _resample(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape: tuple[int, ...],
              padding: str = "border") -> np.ndarray:  # fmt: skip
    """(C, …) float32 from one grid onto another, trilinear (MONAI SpatialResample)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)), affine=torch.as_tensor(src_affine)
    )
    out = SpatialResample(mode="bilinear", padding_mode=padding, dtype=torch.float64)(
        src, dst_affine=torch.as_tensor(dst_affine), spatial_size=tuple(int(s) for s in shape)
    )
    return np.asarray(out.numpy(), dtype=np.float32)


def _tap_affine(affine: np.ndarray, stride: Any) -> np.ndarray:
    """The affine of a tap grid whose voxel ``u`` covers image voxels ``[u·s, (u+1)·s)``: centred on them (``s`` one
    stride, or one per axis)."""
    s = np.broadcast_to(np.asarray(stride, dtype=np.float64), (3,))
    scale = np.eye(4)
    scale[:3, :3] = np.diag(s)
    scale[:3, 3] = (s - 1) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def to_store_grid(
    out: dict[str, np.ndarray],
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    store_strides: dict[str, int],
) -> dict[str, np.ndarray]:
    """A teacher's outputs on its own grid (``predict_volume``'s dict) resampled onto the store's grid, its maps
    onto tap grids of ``store_strides``.

    Args:
        out: logits ``(K, x, y, z)`` on the teacher's grid, each tap's map, and optionally ``<tap>_features``.
        src_affine: the teacher grid's voxel-to-world ``(4, 4)``.
        dst_affine: the store grid's voxel-to-world ``(4, 4)``.
        dst_shape: the store grid's ``(X, Y, Z)``.
        store_strides: per tap, the stride of the store's tap grid.

    Returns:
        logits ``(K, X, Y, Z)``, each tap's map ``(X/s, Y/s, Z/s)`` and features ``(C_tap, X/s, Y/s, Z/s)``.
    """
    result = {"logits": _resample(out["logits"], src_affine, dst_affine, dst_shape)}
    src_shape = out["logits"].shape[1:]
    for kind, stride in store_strides.items():
        cells = tuple(s // stride for s in dst_shape)
        src_stride = tuple(a / m for a, m in zip(src_shape, out[kind].shape, strict=True))
        full = F.interpolate(torch.from_numpy(out[kind])[None, None], size=tuple(src_shape), mode="trilinear",
                             align_corners=False)[0].numpy()  # fmt: skip
        on_store = torch.from_numpy(_resample(full, src_affine, dst_affine, dst_shape))[None]
        result[kind] = F.adaptive_avg_pool3d(on_store, cells)[0, 0].numpy()  # area-weighted onto the tap grid
        if f"{kind}_features" in out:
            result[f"{kind}_features"] = _resample(
                out[f"{kind}_features"],
                _tap_affine(src_affine, src_stride),
                _tap_affine(dst_affine, stride),
                cells,
            )
    return result
