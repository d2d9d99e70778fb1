"""Distillation on class distributions: pixel-wise KD (``pwd``), decoupled KD (``dkd``), channel-wise KD (``cwd``),
DIST (``dist``) and region-level KD (``region``).

Each paper's plain loss over tensors sits beside the registered term that applies it to several teachers, mixed
first (``combine: average``) or summed (``combine: sum``). ``docs/losses.md`` gives each formula and the choices
made where the papers are silent.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from core.losses.distillation import PER_VOXEL_WEIGHTS, DistillationTerm, TermSettings, register_term
from core.losses.weighting import VoxelWeighting
from core.terms import DistillationTargets

__all__ = [
    "ChannelWiseDistillation",
    "ChannelWiseKDLoss",
    "DISTDistillation",
    "DISTLoss",
    "DecoupledDistillation",
    "DecoupledKDLoss",
    "DistributionTerm",
    "PixelwiseDistillation",
    "PixelwiseKDLoss",
    "RegionDistillation",
    "TemperedLoss",
]


def untempered(targets: DistillationTargets, temperature: float) -> DistillationTargets:
    """``targets`` with each teacher's cached T-tempered distribution brought back to T = 1 (``softmax(T · log p)``),
    for the terms that compare whole regions rather than per-voxel distributions at T."""
    return {
        **targets,
        "softmax": {
            k: torch.softmax(torch.log(v.clamp_min(1e-12)) * temperature, dim=1)
            for k, v in targets["softmax"].items()
        },
    }


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
    weights, ``Σ_t L(z_s, p_t; w_t(x))`` (the weights inside the sum over voxels).

    A per-voxel term (:attr:`per_voxel`: ``pwd``, ``dkd``) is ``Σ_x W(x) ℓ(x)`` with voxel weights W summing to 1:
    the voxel mean by default, or class-balanced and teacher-error-masked (:class:`~core.losses.weighting.VoxelWeighting`,
    built from the term's ``balance``, ``regions`` and ``error_weight`` arguments). With masking, the fraction of
    voxels masked is in :attr:`stats` after each call (logged as ``<term>_masked``).
    """

    per_voxel: ClassVar[bool] = False

    def __init__(self, settings: TermSettings, spatial: VoxelWeighting | None = None):
        super().__init__(settings)
        if spatial is not None and not spatial.plain and not self.per_voxel:
            raise ValueError(f"{self.name} is not a per-voxel term: balance and error_weight do not apply")
        self.spatial = spatial or VoxelWeighting()
        self.stats: dict[str, torch.Tensor] = {}

    @abstractmethod
    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        divisor: float = 1,
    ) -> torch.Tensor:
        """The term against one distribution (B, K, X, Y, Z); for per-voxel terms ``Σ_x voxel_weights(x) ℓ(x) / divisor``
        with ``voxel_weights`` (B, 1, X, Y, Z) (``None``: the voxel mean)."""

    def forward(
        self, logits: torch.Tensor, taps: dict[str, torch.Tensor] | None, targets: DistillationTargets
    ) -> torch.Tensor:
        """Args: logits (B, K, X, Y, Z); taps unused; ``targets["softmax"]`` {teacher: (B, K, X, Y, Z)}, and the
        batch's label as ``targets["classes"]["label"]`` (B, 1, X, Y, Z) when the term reads it."""
        probs = targets["softmax"]
        teachers = list(probs)
        weights = self.weights(teachers, probs, targets.get("classes", {}).get("label"))
        mixed = None
        if self.combine == "average" or not self.spatial.plain:
            mixed = sum(w * probs[t] for w, t in zip(weights, teachers, strict=True))
        spatial = self._voxel_weights(mixed, targets)
        if self.combine == "average":
            return self.loss(logits, mixed, spatial)
        return sum(
            (
                self._weighted_loss(logits, probs[t], w, spatial)
                for w, t in zip(weights, teachers, strict=True)
            ),
            torch.zeros((), device=logits.device),
        )

    def _voxel_weights(self, mixed: torch.Tensor | None, targets: DistillationTargets) -> torch.Tensor | None:
        """W for this batch (``None``: the plain voxel mean), recording the fraction masked in :attr:`stats`."""
        if self.spatial.plain:
            return None
        assert mixed is not None
        label = targets.get("classes", {}).get("label")
        try:
            spatial, masked = self.spatial.weights(mixed, label)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        self.stats = {} if masked is None else {"masked": masked}
        return spatial

    def _weighted_loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | float,
        spatial: torch.Tensor | None,
    ) -> torch.Tensor:
        """``weight · loss``, or the loss with per-voxel weights inside when ``weight`` is a (B, 1, X, Y, Z) map."""
        if isinstance(weight, torch.Tensor):
            if spatial is None:  # per-voxel teacher weights alone: their weighted sum over the voxel count
                return self.loss(logits, target, weight, weight[:, 0].numel())
            return self.loss(logits, target, weight * spatial)
        return weight * self.loss(logits, target, spatial)


@register_term("pwd")
class PixelwiseDistillation(DistributionTerm):
    """TeachFormer's L_PWD / Hinton KD per voxel (``docs/losses.md``, ``pwd``):

    ``L_PWD = T² · mean_x Σ_k p_t,k (log p_t,k − log softmax(z_s / T)_k)``; with ``confidence`` weights the
    per-voxel KL is weighted before the mean. With ``balance``/``error_weight`` the voxel mean becomes
    ``Σ_x W(x) KL(x)`` (:class:`~core.losses.weighting.VoxelWeighting`).

    Args (extra): balance — ``"voxel"`` (the paper's) or ``"class"``; regions — ``"label"`` or ``"teacher"``;
    error_weight — the weight of voxels whose teachers' argmax disagrees with the label (0 drops them; unset: none).
    """

    per_voxel = True

    def __init__(
        self,
        settings: TermSettings,
        balance: str = "voxel",
        regions: str = "label",
        error_weight: float | None = None,
    ):
        super().__init__(settings, VoxelWeighting(balance, regions, error_weight))
        self.kd = PixelwiseKDLoss(settings.temperature)

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        divisor: float = 1,
    ) -> torch.Tensor:
        if voxel_weights is None:
            return self.kd(logits, target)
        t = self.temperature
        log_ps = torch.log_softmax(logits.float() / t, dim=1)
        kl = (target * (torch.log(target.clamp_min(1e-12)) - log_ps)).sum(1, keepdim=True)
        return (t * t) * (voxel_weights * kl).sum() / divisor


@register_term("cwd")
class ChannelWiseDistillation(DistributionTerm):
    """Channel-wise distillation (Shu et al., 2021) on the class channels (``docs/losses.md``, ``cwd``):

    ``L_CWD = T² / K · Σ_c KL(φ(log p_t,c) ‖ φ(log softmax(z_s)_c))``, φ the softmax over the patch's voxels at
    T; the cached T-tempered distribution is un-tempered first. Teachers averaged or summed.
    """

    def __init__(self, settings: TermSettings):
        super().__init__(settings)
        if settings.teacher_weights in PER_VOXEL_WEIGHTS:
            raise ValueError(
                "cwd compares spatial distributions per channel; use 'uniform' or 'dice' weights"
            )
        self.cwd = ChannelWiseKDLoss(settings.temperature)
        self._untemper = settings.temperature

    def forward(
        self, logits: torch.Tensor, taps: dict[str, torch.Tensor] | None, targets: DistillationTargets
    ) -> torch.Tensor:
        # cwd re-tempers spatially: give it temperature-1 distributions recovered from the T-tempered cache
        return super().forward(logits, taps, untempered(targets, self._untemper))

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        divisor: float = 1,
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
        if settings.teacher_weights in PER_VOXEL_WEIGHTS:
            raise ValueError("dist correlates whole patches; use 'uniform' or 'dice' weights")
        self.dist = DISTLoss(settings.temperature, beta, gamma)

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        divisor: float = 1,
    ) -> torch.Tensor:
        return self.dist(logits, target)


class DecoupledKDLoss(TemperedLoss):
    """Decoupled KD (DKD, Zhao et al., CVPR 2022) per voxel, the target class g given by the label.

    With ``b = [p_g, 1 − p_g]`` (target vs the rest) and ``p̂_k = p_k / (1 − p_g)`` over the non-target classes k ≠ g,
    both at T: ``ℓ(x) = T² · (α · KL(b_t ‖ b_s) + β · KL(p̂_t ‖ p̂_s))`` — TCKD and NCKD. Classical KD is
    ``TCKD + (1 − p_t,g) · NCKD``: the non-target knowledge is weighted down exactly where the teacher is confident,
    which DKD undoes with a free β. With two classes p̂ is a point mass and NCKD is 0.

    Args:
        temperature: T > 0 (the teacher distribution must already be at T).
        alpha: weight of TCKD (≥ 0).
        beta: weight of NCKD (≥ 0).
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0, beta: float = 1.0):
        super().__init__(temperature)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta = alpha, beta

    def per_voxel(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        """Args: student_logits, teacher_probs (B, K, X, Y, Z); label (B, 1, X, Y, Z). Returns ℓ (B, 1, X, Y, Z)."""
        t = self.temperature
        log_ps = F.log_softmax(student_logits.float() / t, dim=1)
        pt = teacher_probs.float()
        target = torch.zeros_like(log_ps, dtype=torch.bool).scatter_(1, label.long(), True)
        # student: log p_g and log(1 − p_g) = logsumexp over the non-target classes (stable where p_g → 1)
        log_s_g = (log_ps * target).sum(1, keepdim=True)
        log_s_rest = log_ps.masked_fill(target, float("-inf")).logsumexp(1, keepdim=True)
        t_g = (pt * target).sum(1, keepdim=True)
        t_rest = (pt * ~target).sum(1, keepdim=True)
        tckd = torch.xlogy(t_g, t_g) - t_g * log_s_g + torch.xlogy(t_rest, t_rest) - t_rest * log_s_rest
        # non-target: p̂_t,k = p_t,k / (1 − p_t,g); log p̂_s,k = log p_s,k − log(1 − p_s,g)
        t_hat = (pt * ~target) / t_rest.clamp_min(1e-12)
        log_s_hat = (log_ps - log_s_rest).masked_fill(target, 0.0)
        nckd = (torch.xlogy(t_hat, t_hat) - t_hat * log_s_hat).sum(1, keepdim=True)
        return (t * t) * (self.alpha * tckd + self.beta * nckd)

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        """The voxel mean of :meth:`per_voxel`."""
        return self.per_voxel(student_logits, teacher_probs, label).mean()


@register_term("dkd")
class DecoupledDistillation(DistributionTerm):
    """Decoupled KD (Zhao et al., 2022) per voxel, target = label (``docs/losses.md``, ``dkd``):

    ``L_DKD = Σ_x W(x) · T² (α · TCKD(x) + β · NCKD(x))`` (:class:`DecoupledKDLoss`); W the voxel mean, or
    class-balanced / teacher-error-masked as for ``pwd``.

    Args (extra): alpha, beta — TCKD's and NCKD's weights (default 1, 1); balance, regions, error_weight — as
    :class:`PixelwiseDistillation`'s.
    """

    per_voxel = True

    def __init__(
        self,
        settings: TermSettings,
        alpha: float = 1.0,
        beta: float = 1.0,
        balance: str = "voxel",
        regions: str = "label",
        error_weight: float | None = None,
    ):
        super().__init__(settings, VoxelWeighting(balance, regions, error_weight))
        self.dkd = DecoupledKDLoss(settings.temperature, alpha, beta)
        self._label: torch.Tensor | None = None

    def forward(
        self, logits: torch.Tensor, taps: dict[str, torch.Tensor] | None, targets: DistillationTargets
    ) -> torch.Tensor:
        self._label = targets.get("classes", {}).get("label")
        if self._label is None:
            raise ValueError("dkd needs the batch's label (the target class of each voxel)")
        try:
            return super().forward(logits, taps, targets)
        finally:
            self._label = None

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        divisor: float = 1,
    ) -> torch.Tensor:
        assert self._label is not None
        per_voxel = self.dkd.per_voxel(logits, target, self._label)
        return per_voxel.mean() if voxel_weights is None else (voxel_weights * per_voxel).sum() / divisor


@register_term("region")
class RegionDistillation(DistributionTerm):
    """Region-level KD (``docs/losses.md``, ``region``): soft Dice between the student's softmax and the teachers'.

    ``L_REG = 1 − mean_{c ≥ 1} (2 Σ_x p_s,c q_c + ε) / (Σ_x p_s,c + Σ_x q_c + ε)`` over the batch (MONAI ``DiceLoss``,
    foreground classes, batch Dice, ε = 1e-5), ``p_s = softmax(z_s)`` and q the teachers' distribution at T = 1 (the
    cached T-tempered one is un-tempered first). A voxel-averaged KL barely notices a false-positive island far from
    the structure; a region overlap counts its whole volume, as the teachers' coherent maps do.
    """

    def __init__(self, settings: TermSettings):
        super().__init__(settings)
        if settings.teacher_weights in PER_VOXEL_WEIGHTS:
            raise ValueError("region compares whole class regions; use 'uniform' or 'dice' weights")
        self.dice = DiceLoss(include_background=False, softmax=True, batch=True)
        self._untemper = settings.temperature

    def forward(
        self, logits: torch.Tensor, taps: dict[str, torch.Tensor] | None, targets: DistillationTargets
    ) -> torch.Tensor:
        return super().forward(logits, taps, untempered(targets, self._untemper))

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        divisor: float = 1,
    ) -> torch.Tensor:
        return self.dice(logits.float(), target.float())
