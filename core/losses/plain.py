"""Plain losses over tensors: segmentation (Focal + Dice), pixel-wise KD, attention transfer, CWD and DIST.

``core/losses/distillation.py`` wraps the distillation ones into registered terms that combine several teachers, and
sums them into the training objective. ``docs/losses.md`` gives each formula and the choices made where the
papers are silent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from core.models.taps import attention_map

__all__ = [
    "AttentionTransferLoss",
    "ChannelWiseKDLoss",
    "DISTLoss",
    "PixelwiseKDLoss",
    "SegmentationLoss",
    "normalise_map",
    "resize_to_grid",
]


class SegmentationLoss(nn.Module):
    """L_SEG = softmax focal loss + soft Dice, both on the softmax over all K classes.

    - Focal (Lin et al., 2017, multi-class form): ``FL = mean_x Σ_c −y_c(x) (1 − p_c(x))^γ log p_c(x)`` with
      ``p = softmax(z)`` over every class, background included (MONAI ``FocalLoss(use_softmax=True)`` per
      element, summed over classes, averaged over voxels) — so every logit, background's too, gets a gradient.
    - Dice: MONAI ``DiceLoss`` on the same softmax, foreground classes only, computed over the whole batch
      (nnU-Net's "batch Dice"), so a patch without foreground does not push the prediction towards empty.

    Both parts depend on the logits only through their softmax, so the loss is unchanged when the same constant is
    added to every class's logit at a voxel, like every distillation term. (MONAI's ``DiceFocalLoss`` is not: its
    focal part is a sigmoid focal loss per foreground logit; and ``FocalLoss(use_softmax=True,
    include_background=False)`` drops the background logit *before* its softmax, which is exactly 0 for two
    classes.)

    Args:
        gamma: focal-loss focusing parameter γ (0 gives cross-entropy).
    """

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.focal = FocalLoss(
            include_background=True, to_onehot_y=True, use_softmax=True, gamma=gamma, reduction="none"
        )
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def focal_part(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The focal part alone. Args: logits (B, K, X, Y, Z); label (B, 1, X, Y, Z) integer classes."""
        return self.focal(logits.float(), label).sum(dim=1).mean()

    def dice_part(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The soft Dice part alone (1 − batch Dice over the foreground classes)."""
        return self.dice(logits.float(), label)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Args: logits (B, K, X, Y, Z); label (B, 1, X, Y, Z) integer classes. Returns a scalar."""
        return self.focal_part(logits, label) + self.dice_part(logits, label)


class PixelwiseKDLoss(nn.Module):
    """L_PWD = T² · mean over voxels of KL(p_t^T ‖ p_s^T) (Hinton et al., 2015, per voxel).

    Args:
        temperature: T > 0; the teacher distribution must already be at T (the store re-tempers it).
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Args: student_logits (B, K, X, Y, Z); teacher_probs (B, K, X, Y, Z), summing to 1 over K."""
        t = self.temperature
        log_ps = F.log_softmax(student_logits.float() / t, dim=1)
        kl = F.kl_div(log_ps, teacher_probs.float(), reduction="none").sum(dim=1)
        return (t * t) * kl.mean()


def normalise_map(amap: torch.Tensor, norm: str = "l2", eps: float = 1e-12) -> torch.Tensor:
    """Flatten each sample's map and divide by its L1 or L2 norm.

    Args:
        amap: (B, 1, x, y, z) or (B, N).

    Returns:
        (B, N) with unit norm per sample.
    """
    flat = amap.reshape(amap.shape[0], -1).float()
    order = 2 if norm == "l2" else 1
    return flat / flat.norm(p=order, dim=1, keepdim=True).clamp_min(eps)


def resize_to_grid(amap: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bring (B, C, x, y, z) maps or features onto ``size``: area averaging when shrinking, trilinear when growing."""
    if tuple(amap.shape[2:]) == tuple(size):
        return amap
    if all(s <= a for s, a in zip(size, amap.shape[2:], strict=True)):
        return F.adaptive_avg_pool3d(amap, size)
    return F.interpolate(amap, size=size, mode="trilinear", align_corners=False)


class AttentionTransferLoss(nn.Module):
    """Attention-map distance (Zagoruyko & Komodakis, 2017), channel-agnostic.

    ``a = mean_c |F|^p``; the student's map is resized onto the teacher's grid; both are normalised (L1 or L2)
    over the patch; the loss is ``‖â_s − â_t‖²`` summed over the map and averaged over the batch (in [0, 4]
    for L2), so it does not depend on the map's size.

    Args:
        p: power of the activation map.
        norm: ``"l1"`` or ``"l2"``.
    """

    def __init__(self, p: float = 2.0, norm: str = "l2"):
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        if norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
        self.p, self.norm = p, norm

    def forward(self, student_features: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """Args: student_features (B, C, x, y, z) of any width; teacher_map (B, 1, x', y', z')."""
        student_map = resize_to_grid(attention_map(student_features, self.p), tuple(teacher_map.shape[2:]))
        diff = normalise_map(student_map, self.norm) - normalise_map(teacher_map, self.norm)
        return diff.pow(2).sum(dim=1).mean()


class ChannelWiseKDLoss(nn.Module):
    """Channel-wise distillation (CWD, Shu et al., ICCV 2021) over a patch.

    For each class channel c, the spatial distribution ``softmax_x(s_c(x) / T)`` of the student is pulled towards
    the teacher's: ``L = T² / K · Σ_c KL(φ(t_c) ‖ φ(s_c))``, averaged over the batch. The cache holds teacher
    logits only up to a per-voxel constant, so both sides use log-probabilities as the channel scores.

    Args:
        temperature: T > 0.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

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
