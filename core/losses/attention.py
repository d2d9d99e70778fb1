"""Attention transfer (Zagoruyko & Komodakis, 2017) and TeachFormer's L_AFS (``afs``) built on it.

The plain loss compares one student tap with one teacher's cached attention map; the registered term sums it over
teachers on the coarse and fine taps. ``docs/losses.md`` (``afs``) gives the formula and the choices made.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.config import DistillationConfig
from core.losses.distillation import TapTerm, TermSettings, register_term, resize_to_grid
from core.models.taps import attention_map
from core.terms import ATTENTION_KINDS

__all__ = ["AttentionDistillation", "AttentionTransferLoss", "normalise_map"]


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


@register_term("afs")
class AttentionDistillation(TapTerm):
    """TeachFormer's L_AFS / attention transfer on the coarse and fine taps (``docs/losses.md``, ``afs``):

    ``L_AFS(tap) = Σ_t w_t · mean_b ‖â_s − â_t‖²`` (:class:`AttentionTransferLoss` against teacher t's cached map);
    the objective averages the taps.

    Args (extra): p — must equal the power the maps were cached with; norm — ``"l1"`` or ``"l2"``;
    taps — which taps (default both).
    """

    target_kind = "{tap}"

    def __init__(
        self,
        settings: TermSettings,
        p: float = 2.0,
        norm: str = "l2",
        taps: tuple[str, ...] = ATTENTION_KINDS,
        cached_p: float = 2.0,
    ):
        super().__init__(settings, taps)
        if p != cached_p:
            raise ValueError(
                f"p={p} differs from distillation.attention.p={cached_p}, the power the maps were cached with"
            )
        self.at = AttentionTransferLoss(p, norm)

    @classmethod
    def config_defaults(cls, cfg: DistillationConfig) -> dict[str, Any]:
        return {"p": cfg.attention.p, "norm": cfg.attention.norm, "cached_p": cfg.attention.p}

    def teacher_loss(
        self, student: torch.Tensor, target: torch.Tensor, probs: torch.Tensor | None, tap: str, teacher: str
    ) -> torch.Tensor:
        """Args: student (B, C_s, x, y, z) tap features; target the teacher's map (B, 1, x', y', z')."""
        return self.at(student, target)
