"""Distillation on class distributions: pixel-wise KD (``pwd``), channel-wise KD (``cwd``) and DIST (``dist``).

Each paper's plain loss over tensors sits beside the registered term that applies it to several teachers, mixed
first (``combine: average``) or summed (``combine: sum``). ``docs/losses.md`` gives each formula and the choices
made where the papers are silent.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from core.losses.distillation import DistillationTerm, TermSettings, register_term
from core.terms import DistillationTargets

__all__ = [
    "ChannelWiseDistillation",
    "ChannelWiseKDLoss",
    "DISTDistillation",
    "DISTLoss",
    "DistributionTerm",
    "PixelwiseDistillation",
    "PixelwiseKDLoss",
    "TemperedLoss",
]


class TemperedLoss(nn.Module):
    """A loss between a student's logits and a teacher's distribution at temperature T.

    Args:
        temperature: T > 0.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature


class PixelwiseKDLoss(TemperedLoss):
    """L_PWD = T² · mean over voxels of KL(p_t^T ‖ p_s^T) (Hinton et al., 2015, per voxel).

    Args:
        temperature: T > 0; the teacher distribution must already be at T (the store re-tempers it).
    """

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Args: student_logits (B, K, X, Y, Z); teacher_probs (B, K, X, Y, Z), summing to 1 over K."""
        t = self.temperature
        log_ps = F.log_softmax(student_logits.float() / t, dim=1)
        kl = F.kl_div(log_ps, teacher_probs.float(), reduction="none").sum(dim=1)
        return (t * t) * kl.mean()


class ChannelWiseKDLoss(TemperedLoss):
    """Channel-wise distillation (CWD, Shu et al., ICCV 2021) over a patch.

    For each class channel c, the spatial distribution ``softmax_x(s_c(x) / T)`` of the student is pulled towards
    the teacher's: ``L = T² / K · Σ_c KL(φ(t_c) ‖ φ(s_c))``, averaged over the batch. The cache holds teacher
    logits only up to a per-voxel constant, so both sides use log-probabilities as the channel scores.

    Args:
        temperature: T > 0.
    """

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Args: student_logits (B, K, X, Y, Z); teacher_probs (B, K, X, Y, Z) at temperature 1."""
        t = self.temperature
        b, k = student_logits.shape[:2]
        s = F.log_softmax(student_logits.float(), dim=1).reshape(b, k, -1) / t
        q = torch.log(teacher_probs.float().clamp_min(1e-12)).reshape(b, k, -1) / t
        kl = F.kl_div(F.log_softmax(s, dim=2), F.log_softmax(q, dim=2), reduction="none", log_target=True)
        return (t * t) * kl.sum(dim=2).mean()


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    r = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)
    return 1.0 - r


class DISTLoss(nn.Module):
    """DIST (Huang et al., NeurIPS 2022): match relations instead of values.

    ``L = T² · (β · inter + γ · intra)`` with probabilities at T: *inter* is 1 − Pearson correlation between student
    and teacher over the classes of each voxel (averaged over voxels), *intra* is 1 − Pearson correlation over the
    voxels of each class in the patch (averaged over classes and the batch).

    Args:
        temperature: T > 0.
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
    """

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        if temperature <= 0 or beta < 0 or gamma < 0:
            raise ValueError(f"need temperature > 0 and beta, gamma >= 0, got {temperature}, {beta}, {gamma}")
        self.temperature, self.beta, self.gamma = temperature, beta, gamma

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Args: student_logits (B, K, X, Y, Z); teacher_probs (B, K, X, Y, Z), already at temperature T."""
        b, k = student_logits.shape[:2]
        ps = torch.softmax(student_logits.float() / self.temperature, dim=1).reshape(b, k, -1)
        pt = teacher_probs.float().reshape(b, k, -1)
        inter = _pearson_distance(ps, pt, dim=1).mean()
        intra = _pearson_distance(ps, pt, dim=2).mean()
        return self.temperature**2 * (self.beta * inter + self.gamma * intra)


class DistributionTerm(DistillationTerm):
    """A term on class distributions: teachers are mixed first (``average``) or their losses summed (``sum``).

    ``average``: ``L(z_s, Σ_t w_t p_t)``; ``sum``: ``Σ_t w_t · L(z_s, p_t)``, or with per-voxel ``confidence``
    weights, ``Σ_t L(z_s, p_t; w_t(x))`` (the weights inside the mean over voxels).
    """

    @abstractmethod
    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, voxel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The term against one distribution (B, K, X, Y, Z); ``voxel_weights`` (B, 1, X, Y, Z) if per voxel."""

    def forward(
        self, logits: torch.Tensor, taps: dict[str, torch.Tensor] | None, targets: DistillationTargets
    ) -> torch.Tensor:
        """Args: logits (B, K, X, Y, Z); taps unused; ``targets["softmax"]`` {teacher: (B, K, X, Y, Z)}."""
        probs = targets["softmax"]
        teachers = list(probs)
        weights = self.weights(teachers, probs)
        if self.combine == "average":
            mixed = sum(w * probs[t] for w, t in zip(weights, teachers, strict=True))
            return self.loss(logits, mixed)
        return sum(
            (self._weighted_loss(logits, probs[t], w) for w, t in zip(weights, teachers, strict=True)),
            torch.zeros((), device=logits.device),
        )

    def _weighted_loss(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | float
    ) -> torch.Tensor:
        """``weight · loss``, or the loss with per-voxel weights inside when ``weight`` is a (B, 1, X, Y, Z) map."""
        if isinstance(weight, torch.Tensor):
            return self.loss(logits, target, weight)
        return weight * self.loss(logits, target)


@register_term("pwd")
class PixelwiseDistillation(DistributionTerm):
    """TeachFormer's L_PWD / Hinton KD per voxel (``docs/losses.md``, ``pwd``):

    ``L_PWD = T² · mean_x Σ_k p_t,k (log p_t,k − log softmax(z_s / T)_k)``; with ``confidence`` weights the
    per-voxel KL is weighted before the mean.
    """

    def __init__(self, settings: TermSettings):
        super().__init__(settings)
        self.kd = PixelwiseKDLoss(settings.temperature)

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, voxel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if voxel_weights is None:
            return self.kd(logits, target)
        t = self.temperature
        log_ps = torch.log_softmax(logits.float() / t, dim=1)
        kl = (target * (torch.log(target.clamp_min(1e-12)) - log_ps)).sum(1, keepdim=True)
        return (t * t) * (voxel_weights * kl).sum() / kl[:, 0].numel()


@register_term("cwd")
class ChannelWiseDistillation(DistributionTerm):
    """Channel-wise distillation (Shu et al., 2021) on the class channels (``docs/losses.md``, ``cwd``):

    ``L_CWD = T² / K · Σ_c KL(φ(log p_t,c) ‖ φ(log softmax(z_s)_c))``, φ the softmax over the patch's voxels at
    T; the cached T-tempered distribution is un-tempered first. Teachers averaged or summed.
    """

    def __init__(self, settings: TermSettings):
        super().__init__(settings)
        if settings.teacher_weights == "confidence":
            raise ValueError(
                "cwd compares spatial distributions per channel; use 'uniform' or 'dice' weights"
            )
        self.cwd = ChannelWiseKDLoss(settings.temperature)
        self._untemper = settings.temperature

    def forward(
        self, logits: torch.Tensor, taps: dict[str, torch.Tensor] | None, targets: DistillationTargets
    ) -> torch.Tensor:
        # cwd re-tempers spatially: give it temperature-1 distributions recovered from the T-tempered cache
        t = self._untemper
        untempered = {
            k: torch.softmax(torch.log(v.clamp_min(1e-12)) * t, dim=1) for k, v in targets["softmax"].items()
        }
        return super().forward(logits, taps, {**targets, "softmax": untempered})

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, voxel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.cwd(logits, target)


@register_term("dist")
class DISTDistillation(DistributionTerm):
    """DIST (Huang et al., 2022) at temperature T (``docs/losses.md``, ``dist``):

    ``L_DIST = T² · (β · mean_x (1 − ρ over classes) + γ · mean_c (1 − ρ over voxels))``, ρ Pearson's correlation.

    Args (extra): beta, gamma — weights of the inter- and intra-class terms (default 1, 1).
    """

    def __init__(self, settings: TermSettings, beta: float = 1.0, gamma: float = 1.0):
        super().__init__(settings)
        if settings.teacher_weights == "confidence":
            raise ValueError("dist correlates whole patches; use 'uniform' or 'dice' weights")
        self.dist = DISTLoss(settings.temperature, beta, gamma)

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, voxel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.dist(logits, target)
