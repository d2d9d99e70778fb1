"""Losses: segmentation (Focal + Dice), pixel-wise KD and attention transfer, and TeachFormer's weighted sum.

Every distillation term reads only student outputs and cached teacher data (``docs/losses.md`` gives each
formula and the choices made where the paper is silent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss
from torch import nn

from core.config import DistillationConfig
from core.models.taps import attention_map

__all__ = [
    "AttentionTransferLoss",
    "DistillationTargets",
    "PixelwiseKDLoss",
    "SegmentationLoss",
    "TeachFormerLoss",
    "normalise_map",
]

# {"softmax": {teacher: (B, K, X, Y, Z) probabilities at T}, "coarse"/"fine": {teacher: (B, 1, x, y, z)}}
DistillationTargets = dict[str, dict[str, torch.Tensor]]


class SegmentationLoss(nn.Module):
    """L_SEG = Focal + Dice (MONAI ``DiceFocalLoss``) on softmax outputs, foreground classes only.

    Dice is computed over the whole batch (nnU-Net's "batch Dice"), so a patch without foreground does not push
    the prediction towards empty.

    Args:
        gamma: focal-loss focusing parameter.
    """

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.loss = DiceFocalLoss(
            include_background=False, to_onehot_y=True, softmax=True, gamma=gamma, batch=True
        )

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Args: logits (B, K, X, Y, Z); label (B, 1, X, Y, Z) integer classes."""
        return self.loss(logits.float(), label)


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


def _resize_map(amap: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bring a (B, 1, x, y, z) map onto ``size``: area averaging when shrinking, trilinear when growing."""
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
        student_map = _resize_map(attention_map(student_features, self.p), tuple(teacher_map.shape[2:]))
        diff = normalise_map(student_map, self.norm) - normalise_map(teacher_map, self.norm)
        return diff.pow(2).sum(dim=1).mean()


class TeachFormerLoss(nn.Module):
    """L = L_SEG + λ_pwd · L_PWD + λ_afs · (L_AFS(coarse) + L_AFS(fine)) / 2, teachers combined.

    Teachers are combined by averaging their probability maps for L_PWD, and by averaging the per-teacher
    attention losses for L_AFS (each teacher's map lives on its own grid). With ``kind: none`` only L_SEG is used.

    Returns from ``forward``: a dict with ``"total"`` and every term's value (``"seg"``, ``"pwd"``,
    ``"afs_coarse"``, ``"afs_fine"``), for logging.
    """

    def __init__(self, cfg: DistillationConfig, focal_gamma: float = 2.0):
        super().__init__()
        self.cfg = cfg
        self.seg = SegmentationLoss(focal_gamma)
        self.pwd = PixelwiseKDLoss(cfg.temperature)
        self.afs = AttentionTransferLoss(cfg.attention.p, cfg.attention.norm)

    @property
    def uses_teachers(self) -> bool:
        return self.cfg.kind != "none" and (self.cfg.lambda_pwd > 0 or self.cfg.lambda_afs > 0)

    def forward(
        self,
        logits: torch.Tensor,
        label: torch.Tensor,
        taps: dict[str, torch.Tensor] | None = None,
        targets: DistillationTargets | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args:
        logits: student (B, K, X, Y, Z).
        label: (B, 1, X, Y, Z).
        taps: student ``{"coarse", "fine"}`` features (B, C, x, y, z).
        targets: cached teacher data for this batch (see :data:`DistillationTargets`).
        """
        terms = {"seg": self.seg(logits, label)}
        total = terms["seg"]
        if self.uses_teachers:
            if targets is None or taps is None:
                raise ValueError("distillation needs the student's taps and the teachers' targets")
            if self.cfg.lambda_pwd > 0:
                probs = torch.stack(list(targets["softmax"].values())).mean(dim=0)
                terms["pwd"] = self.pwd(logits, probs)
                total = total + self.cfg.lambda_pwd * terms["pwd"]
            if self.cfg.lambda_afs > 0:
                for kind in ("coarse", "fine"):
                    per_teacher = [self.afs(taps[kind], t) for t in targets[kind].values()]
                    terms[f"afs_{kind}"] = torch.stack(per_teacher).mean()
                total = total + self.cfg.lambda_afs * 0.5 * (terms["afs_coarse"] + terms["afs_fine"])
        terms["total"] = total
        return terms
