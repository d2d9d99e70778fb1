"""Feature sketches: a k-channel copy of a teacher's tap features that keeps their relations.

Relation-based losses (voxel affinities, Gram matrices, region graphs) compare features only through inner
products, which are unchanged by any rotation of the channel axis. A sketch therefore keeps the projection of
the features onto their top-k principal directions (uncentred PCA of the case's own features, i.e. the top-k
eigenvectors of the C×C second-moment matrix): with k ≥ the features' effective rank it is exact, and it keeps
the most energy of any k-channel linear map. The basis is the case's own, so sketches of different cases live in
different (rotated) coordinates — fine for relation terms, which only compare features within one patch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["relation_errors", "sketch_features"]


def sketch_features(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Project (C, x, y, z) features onto their top-k uncentred principal directions.

    Args:
        features: (C, x, y, z) float features of one case.
        k: channels to keep (``min(k, C)`` are kept).

    Returns:
        ``(sketch, basis, attrs)``: (k', x, y, z) float32 with k' = min(k, C); the (C, k') float32 orthonormal
        basis, so that ``basis @ sketch`` reconstructs the features in the teacher's own channels; and
        ``{"channels_in", "channels", "energy"}`` where ``energy`` is the fraction of Σ‖F‖² the sketch keeps.
    """
    c = features.shape[0]
    flat = features.reshape(c, -1).astype(np.float64)
    moment = flat @ flat.T
    values, vectors = np.linalg.eigh(moment)  # ascending
    keep = min(k, c)
    basis = vectors[:, ::-1][:, :keep]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(keep)])
    basis = basis * np.where(signs == 0, 1.0, signs)  # deterministic sign per direction
    sketch = (basis.T @ flat).reshape(keep, *features.shape[1:]).astype(np.float32)
    total = float(values.sum())
    energy = float(values[::-1][:keep].sum() / total) if total > 0 else 1.0
    return sketch, basis.astype(np.float32), {"channels_in": int(c), "channels": int(keep), "energy": energy}


def _cosine(x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=0, keepdims=True), 1e-12)
    return x.T @ x


def relation_errors(
    features: np.ndarray,
    sketch: np.ndarray,
    classes: np.ndarray | None = None,
    samples: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """How well the sketch keeps pairwise cosine similarities.

    Args:
        features: (C, x, y, z) original features.
        sketch: (k, x, y, z) its sketch.
        classes: optional (x, y, z) integer class map on the same grid, for class-prototype similarities.
        samples: voxels sampled for the voxel-pair comparison.

    Returns:
        ``{"voxel_cosine": e, "prototype_cosine": e}``: relative Frobenius errors ‖S_sketch − S‖ / ‖S‖ of the
        cosine-similarity matrices between sampled voxels, and between class prototypes (masked mean features)
        when at least two classes are present.
    """
    c, k = features.shape[0], sketch.shape[0]
    flat_f, flat_s = features.reshape(c, -1), sketch.reshape(k, -1)
    rng = np.random.default_rng(seed)
    idx = rng.choice(flat_f.shape[1], size=min(samples, flat_f.shape[1]), replace=False)
    full, approx = _cosine(flat_f[:, idx].astype(np.float64)), _cosine(flat_s[:, idx].astype(np.float64))
    out = {"voxel_cosine": float(np.linalg.norm(approx - full) / max(np.linalg.norm(full), 1e-12))}
    if classes is not None:
        labels = classes.reshape(-1)
        present = [v for v in np.unique(labels) if (labels == v).any()]
        if len(present) >= 2:
            proto_f = np.stack([flat_f[:, labels == v].mean(axis=1) for v in present], axis=1)
            proto_s = np.stack([flat_s[:, labels == v].mean(axis=1) for v in present], axis=1)
            full, approx = _cosine(proto_f.astype(np.float64)), _cosine(proto_s.astype(np.float64))
            out["prototype_cosine"] = float(np.linalg.norm(approx - full) / max(np.linalg.norm(full), 1e-12))
    return out
