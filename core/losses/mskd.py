"""MSKD (Comput Biol Med 2023): feature filtering (``ffd``) and region graph (``rgd``) distillation.

Both compare the student's tap features, mapped by a learnable projection onto each teacher's channels, with the
teacher's features rebuilt from the cached sketch, inside the teacher's predicted regions (:func:`region_masks`).
``docs/losses.md`` gives each formula and the choices made where the paper publishes none.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.losses.distillation import TapTerm, TermSettings, register_term, resize_to_grid
from core.terms import ATTENTION_KINDS

__all__ = ["FeatureFilteringDistillation", "FeatureTerm", "RegionGraphDistillation", "region_masks"]


def region_masks(probs: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """The teacher's predicted regions on a tap grid: per class, the fraction of each cell predicted as that class.

    The prediction is the argmax of the teacher's distribution at full resolution — the same at every temperature
    (re-tempering keeps the order of the classes), so the temperature of ``pwd`` never leaks into the masks —
    one-hot encoded and area-averaged onto ``grid``.

    Args:
        probs: (B, K, X, Y, Z) teacher probabilities (at any temperature).
        grid: the tap grid (x, y, z).

    Returns:
        (B, K, x, y, z) in [0, 1], summing to 1 over K; exactly 0 for a class the teacher predicts nowhere in a cell.
    """
    k = probs.shape[1]
    onehot = F.one_hot(probs.argmax(dim=1), k).movedim(-1, 1).float()
    return F.adaptive_avg_pool3d(onehot, grid)


class FeatureTerm(TapTerm):
    """A term comparing features directly, as MSKD does: per tap, ``Σ_t w_t · feature_loss(P_t(f_s), f_t, r_t)``.

    The student's tap, brought onto each teacher's grid, is mapped by a learnable 1×1×1 convolution P_t (one per
    teacher and tap, trained with the student and discarded afterwards) onto the teacher's own channels, where the
    teacher's features f_t are rebuilt from the cached sketch (``basis @ sketch``, the same space for every case).
    Region masks r_t come from the teacher's prediction (:func:`region_masks`).

    Args (extra): taps; channels — ``{"student": {tap: C_s}, "teachers": {teacher: {tap: C_t}}}`` (filled in by
    the trainer from the student and the store).
    """

    target_kind = "{tap}_features"

    def __init__(
        self,
        settings: TermSettings,
        channels: dict[str, Any] | None = None,
        taps: tuple[str, ...] = ATTENTION_KINDS,
    ):
        super().__init__(settings, taps)
        if not channels:
            raise ValueError("needs the student's and teachers' tap channels (the trainer provides them)")
        self.projections = nn.ModuleDict(
            {
                f"{teacher}__{tap}": nn.Conv3d(channels["student"][tap], widths[tap], kernel_size=1)
                for teacher, widths in channels["teachers"].items()
                for tap in self.taps
            }
        )

    @abstractmethod
    def feature_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, regions: torch.Tensor
    ) -> torch.Tensor:
        """Args: student and teacher features (B, C_t, x, y, z); region masks (B, K, x, y, z), see
        :func:`region_masks`."""

    def teacher_loss(
        self, student: torch.Tensor, target: torch.Tensor, probs: torch.Tensor | None, tap: str, teacher: str
    ) -> torch.Tensor:
        """Args: student (B, C_s, x, y, z) tap features; target the teacher's rebuilt features (B, C_t, x', y', z')."""
        grid = tuple(target.shape[2:])
        projected = self.projections[f"{teacher}__{tap}"](resize_to_grid(student.float(), grid))
        regions = region_masks(probs, grid)
        return self.feature_loss(projected, target.float(), regions)


@register_term("ffd")
class FeatureFilteringDistillation(FeatureTerm):
    """MSKD's feature filtering distillation (``docs/losses.md``, ``ffd``): feature transfer inside the teacher's
    predicted foreground only.

    ``L = Σ_x m(x) · ‖f̂_s(x) − f̂_t(x)‖² / max(Σ_x m(x), 1)`` with f̂ the features normalised to unit length per
    voxel and m(x) the fraction of tap cell x that the teacher predicts as foreground (any class but background,
    :func:`region_masks`): background and redundant responses are filtered out. A patch where the teacher predicts
    no foreground contributes exactly 0; one with less than one cell's worth of foreground contributes in
    proportion to it (the max(·, 1)), so a few stray voxels cannot weigh as much as a whole organ.
    """

    def feature_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, regions: torch.Tensor
    ) -> torch.Tensor:
        mask = 1.0 - regions[:, :1]
        diff = (
            (F.normalize(student, dim=1, eps=1e-8) - F.normalize(teacher, dim=1, eps=1e-8))
            .pow(2)
            .sum(1, keepdim=True)
        )
        return (mask * diff).sum() / mask.sum().clamp_min(1.0)


@register_term("rgd")
class RegionGraphDistillation(FeatureTerm):
    """MSKD's region graph distillation (``docs/losses.md``, ``rgd``): class prototypes as nodes, their cosine
    similarities as edges.

    Prototype of class c: ``P_c = Σ_x m_c(x) f(x) / Σ_x m_c(x)`` with m_c the teacher's predicted region of c on
    the tap grid (:func:`region_masks`). ``L = mean_c ‖P̂_s,c − P̂_t,c‖² + mean_{c≠c'} (cos(P_s,c, P_s,c') −
    cos(P_t,c, P_t,c'))²`` (nodes + edges, unit prototypes P̂), over the classes present in the patch — those the
    teacher predicts at one voxel or more — averaged over the batch. A class the teacher does not predict in the
    patch is no node; a patch with background only has one node and no edge, and contributes only its node.
    """

    def feature_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, regions: torch.Tensor
    ) -> torch.Tensor:
        k = regions.shape[1]
        mass = regions.flatten(2).sum(2)  # (B, K) in cells
        weights = regions.flatten(2)
        proto_s = torch.einsum("bkn,bcn->bkc", weights, student.flatten(2)) / mass[..., None].clamp_min(1e-12)
        proto_t = torch.einsum("bkn,bcn->bkc", weights, teacher.flatten(2)) / mass[..., None].clamp_min(1e-12)
        present = (mass > 0).float()  # (B, K)
        ps, pt = F.normalize(proto_s, dim=2, eps=1e-8), F.normalize(proto_t, dim=2, eps=1e-8)
        nodes = ((ps - pt).pow(2).sum(2) * present).sum() / present.sum().clamp_min(1.0)
        pair = present[:, :, None] * present[:, None, :] * (1.0 - torch.eye(k, device=regions.device))
        edges = ((ps @ ps.mT - pt @ pt.mT).pow(2) * pair).sum() / pair.sum().clamp_min(1.0)
        return nodes + edges
