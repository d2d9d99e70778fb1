"""Relation distillation (after Loussaief et al., 2024): voxel affinities (``affinity``) and Gram matrices (``gram``).

Both compare voxel-to-voxel relations of the student's tap features with those of the teachers' cached feature
sketches. Relations (cosine affinities, kernel matrices) are unchanged by any rotation of the channel axis, so the
per-case sketch bases and the student's own width do not matter. ``docs/losses.md`` gives each formula.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F

from core.losses.distillation import TapTerm, TermSettings, register_term, resize_to_grid
from core.terms import ATTENTION_KINDS

__all__ = ["AffinityDistillation", "KernelDistillation", "RelationTerm", "sample_voxels"]


def sample_voxels(features: torch.Tensor, samples: int) -> torch.Tensor:
    """(B, C, x, y, z) → (B, n, C) with n ≤ ``samples`` voxels, evenly spaced (deterministic)."""
    flat = features.flatten(2).transpose(1, 2).float()
    if flat.shape[1] > samples:
        idx = torch.linspace(0, flat.shape[1] - 1, samples, device=flat.device).round().long()
        flat = flat[:, idx]
    return flat


class RelationTerm(TapTerm):
    """A term on voxel-to-voxel relations of tap features, against the teachers' cached feature sketches.

    Per tap, ``Σ_t w_t · relation_loss(student, sketch_t)``: the student's features are brought onto each teacher's
    grid; up to ``samples`` voxels per patch (evenly spaced) are compared; classes, where the softmax is read, come
    from the teacher's prediction pooled onto that grid.

    Args (extra): taps; samples — voxels compared per patch (default 256).
    """

    target_kind = "{tap}_sketch"

    def __init__(
        self,
        settings: TermSettings,
        taps: tuple[str, ...] = ATTENTION_KINDS,
        samples: int = 256,
    ):
        super().__init__(settings, taps)
        if samples < 2:
            raise ValueError(f"samples must be >= 2, got {samples}")
        self.samples = samples

    @abstractmethod
    def relation_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, classes: torch.Tensor | None
    ) -> torch.Tensor:
        """Args: student (B, n, C), teacher (B, n, k) voxel features; classes (B, n) teacher labels or None."""

    def teacher_loss(
        self, student: torch.Tensor, target: torch.Tensor, probs: torch.Tensor | None, tap: str, teacher: str
    ) -> torch.Tensor:
        """Args: student (B, C_s, x, y, z) tap features; target the teacher's sketch (B, k, x', y', z')."""
        grid = tuple(target.shape[2:])
        classes = None
        if probs is not None:
            pooled = F.adaptive_avg_pool3d(probs.float(), grid)
            classes = sample_voxels(pooled.argmax(1, keepdim=True).float(), self.samples)[..., 0].long()
        student_voxels = sample_voxels(resize_to_grid(student.float(), grid), self.samples)
        return self.relation_loss(student_voxels, sample_voxels(target, self.samples), classes)


def _cosine(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1, eps=1e-8)
    return x @ x.transpose(1, 2)


@register_term("affinity")
class AffinityDistillation(RelationTerm):
    """Adaptive affinity distillation (after Loussaief et al., 2024; ``docs/losses.md``, ``affinity``):

    ``A = cos(f_i, f_j)`` for student and teacher; ``½ (mean_same (A_s − A_t)² + mean_cross (A_s − A_t)²)``: squared
    differences are averaged separately over pairs within a class and pairs across classes (classes from the
    teacher's prediction), and the two means are averaged — the adaptive weighting: each group counts equally
    however rare the foreground is. Without classes, the plain mean.
    """

    def relation_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, classes: torch.Tensor | None
    ) -> torch.Tensor:
        diff = (_cosine(student) - _cosine(teacher)).pow(2)
        if classes is None:
            return diff.mean()
        same = (classes[:, :, None] == classes[:, None, :]).float()
        parts = []
        for mask in (same, 1.0 - same):
            count = mask.sum()
            if count > 0:
                parts.append((diff * mask).sum() / count)
        return torch.stack(parts).mean()


@register_term("gram")
class KernelDistillation(RelationTerm):
    """Kernel (Gram-matrix) distillation over voxels (after Loussaief et al., 2024; ``docs/losses.md``, ``gram``):

    ``K_ij = k(f_i, f_j)`` with ``kernel``: ``linear`` (f_i·f_j), ``polynomial`` ((f_i·f_j + coef)^degree, on
    unit-norm features) or ``rbf`` (exp(−‖f_i − f_j‖² / 2σ²), σ² the median squared distance of the patch);
    ``K̂ = K / ‖K‖_F`` and the loss is ``‖K̂_s − K̂_t‖²_F`` (in [0, 4]), averaged over the batch.

    Args (extra): kernel, degree (2), coef (1.0).
    """

    def __init__(
        self,
        settings: TermSettings,
        taps: tuple[str, ...] = ATTENTION_KINDS,
        samples: int = 256,
        kernel: str = "linear",
        degree: int = 2,
        coef: float = 1.0,
    ):
        super().__init__(settings, taps, samples)
        if kernel not in ("linear", "polynomial", "rbf"):
            raise ValueError(f"kernel must be linear, polynomial or rbf, got {kernel!r}")
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.kernel, self.degree, self.coef = kernel, degree, coef

    def _gram(self, f: torch.Tensor) -> torch.Tensor:
        """(B, n, C) → (B, n, n) kernel matrix scaled to unit Frobenius norm."""
        if self.kernel == "linear":
            k = f @ f.transpose(1, 2)
        elif self.kernel == "polynomial":
            f = F.normalize(f, dim=-1, eps=1e-8)
            k = (f @ f.transpose(1, 2) + self.coef).pow(self.degree)
        else:
            d2 = torch.cdist(f, f).pow(2)
            sigma2 = d2.flatten(1).median(dim=1).values.clamp_min(1e-8)[:, None, None]
            k = torch.exp(-d2 / (2 * sigma2))
        return k / k.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]

    def relation_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, classes: torch.Tensor | None
    ) -> torch.Tensor:
        return (self._gram(student) - self._gram(teacher)).pow(2).sum(dim=(1, 2)).mean()
