"""Distillation terms, registered by name, and the objective that sums them with the segmentation loss.

A term reads only the student's outputs (logits, tap features) and cached teacher data (re-tempered softmax,
attention maps) — never a teacher network. Each term combines several teachers in one of two ways:

- ``average``: mix the teachers' targets first (a weighted mean of their distributions), then compute one loss —
  only for distribution terms (``pwd``, ``cwd``, ``dist``);
- ``sum``: compute the loss per teacher and take the weighted sum — any term; attention maps live on each
  teacher's own grid, so ``afs`` always does this.

Teacher weights, normalised to sum to 1: ``uniform``; ``dice`` — proportional to each teacher's validation Dice
recorded in the store; ``confidence`` — per voxel, proportional to exp(−entropy) of each teacher's distribution
(confident teachers weigh more), for distribution terms.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from core.config import DistillationConfig, TermConfig
from core.errors import ConfigError
from core.losses.plain import (
    AttentionTransferLoss,
    ChannelWiseKDLoss,
    DISTLoss,
    PixelwiseKDLoss,
    SegmentationLoss,
    resize_to_grid,
)
from core.terms import TERM_SPECS, DistillationTargets

__all__ = ["TERMS", "DistillationObjective", "DistillationTerm", "build_objective", "register_term"]

TERMS: dict[str, type[DistillationTerm]] = {}


def register_term(name: str) -> Callable[[type[DistillationTerm]], type[DistillationTerm]]:
    """Class decorator: implement the term ``name`` of :data:`core.terms.TERM_SPECS` (what it reads comes from
    there); a name without a spec, or one registered twice, is an error."""

    def add(cls: type[DistillationTerm]) -> type[DistillationTerm]:
        if name in TERMS:
            raise ValueError(f"distillation term '{name}' is already registered")
        if name not in TERM_SPECS:
            raise ValueError(f"distillation term '{name}' has no entry in core.terms.TERM_SPECS")
        cls.name = name
        cls.needs = TERM_SPECS[name].reads
        cls.needs_channels = TERM_SPECS[name].needs_channels
        TERMS[name] = cls
        return cls

    return add


class DistillationTerm(nn.Module):
    """Base class: teacher weighting and combination around a per-teacher loss.

    Args:
        temperature: T of the cached distributions the term receives.
        combine: ``"average"`` or ``"sum"`` (see the module docstring).
        teacher_weights: ``"uniform"``, ``"dice"`` or ``"confidence"``.
        teacher_dice: validation Dice per teacher (needed for ``"dice"``).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = (
        frozenset()
    )  # target kinds read (core.terms.TERM_SPECS, set on registration)
    distribution: ClassVar[bool] = (
        True  # works on class distributions (can average teachers, per-voxel weights)
    )
    default_combine: ClassVar[str] = "average"
    needs_channels: ClassVar[bool] = False  # built with the tap widths (core.terms.TERM_SPECS)

    def __init__(
        self, temperature: float, combine: str | None, teacher_weights: str, teacher_dice: dict[str, float]
    ):
        super().__init__()
        self.temperature = temperature
        self.combine = combine or self.default_combine
        if self.combine not in ("average", "sum"):
            raise ValueError(f"combine must be 'average' or 'sum', got {self.combine!r}")
        if self.combine == "average" and not self.distribution:
            raise ValueError(
                "combine 'average' needs a distribution term; attention maps are combined by 'sum'"
            )
        if teacher_weights == "confidence" and not self.distribution:
            raise ValueError("per-voxel 'confidence' weights apply to distribution terms only")
        self.teacher_weights = teacher_weights
        self.teacher_dice = teacher_dice

    @classmethod
    def config_defaults(cls, cfg: DistillationConfig) -> dict[str, Any]:
        """Arguments this term takes from the rest of the distillation config unless its ``args`` set them."""
        return {}

    def weights(
        self, teachers: list[str], probs: dict[str, torch.Tensor] | None
    ) -> list[torch.Tensor | float]:
        """Normalised weights per teacher: scalars, or (B, 1, X, Y, Z) maps for ``confidence``."""
        if self.teacher_weights == "uniform":
            return [1.0 / len(teachers)] * len(teachers)
        if self.teacher_weights == "dice":
            missing = [t for t in teachers if self.teacher_dice.get(t) is None]
            if missing:
                raise ConfigError(
                    f"teacher_weights 'dice' needs each teacher's validation Dice in the store; missing for "
                    f"{', '.join(missing)} (their checkpoints did not record it)"
                )
            total = sum(self.teacher_dice[t] for t in teachers)
            return [self.teacher_dice[t] / total for t in teachers]
        assert probs is not None
        scores = [torch.exp((p * torch.log(p.clamp_min(1e-12))).sum(1, keepdim=True)) for p in probs.values()]
        total = torch.stack(scores).sum(0)
        return [s / total for s in scores]


class DistributionTerm(DistillationTerm):
    """A term on class distributions: teachers are mixed first (``average``) or their losses summed (``sum``)."""

    @abstractmethod
    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, voxel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The term against one distribution (B, K, X, Y, Z); ``voxel_weights`` (B, 1, X, Y, Z) if per voxel."""

    def forward(
        self, logits: torch.Tensor, taps: dict[str, torch.Tensor] | None, targets: DistillationTargets
    ) -> torch.Tensor:
        probs = targets["softmax"]
        teachers = list(probs)
        weights = self.weights(teachers, probs)
        if self.combine == "average":
            mixed = sum(w * probs[t] for w, t in zip(weights, teachers, strict=True))
            return self.loss(logits, mixed)
        total = torch.zeros((), device=logits.device)
        for w, t in zip(weights, teachers, strict=True):
            per_voxel = isinstance(w, torch.Tensor)
            total = total + (self.loss(logits, probs[t], w) if per_voxel else w * self.loss(logits, probs[t]))
        return total


@register_term("pwd")
class PixelwiseDistillation(DistributionTerm):
    """TeachFormer's L_PWD / Hinton KD per voxel: T² · KL(p_t^T ‖ p_s^T)."""

    def __init__(
        self, temperature: float, combine: str | None, teacher_weights: str, teacher_dice: dict[str, float]
    ):
        super().__init__(temperature, combine, teacher_weights, teacher_dice)
        self.kd = PixelwiseKDLoss(temperature)

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
    """Channel-wise distillation (Shu et al., 2021) on the class channels; teachers averaged or summed."""

    def __init__(
        self, temperature: float, combine: str | None, teacher_weights: str, teacher_dice: dict[str, float]
    ):
        super().__init__(temperature, combine, teacher_weights, teacher_dice)
        if teacher_weights == "confidence":
            raise ValueError(
                "cwd compares spatial distributions per channel; use 'uniform' or 'dice' weights"
            )
        self.cwd = ChannelWiseKDLoss(temperature)
        self._untemper = temperature

    def forward(self, logits, taps, targets):
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
    """DIST (Huang et al., 2022): inter- and intra-class Pearson relations at temperature T.

    Args (extra): beta, gamma — weights of the inter- and intra-class terms (default 1, 1).
    """

    def __init__(
        self,
        temperature: float,
        combine: str | None,
        teacher_weights: str,
        teacher_dice: dict[str, float],
        beta: float = 1.0,
        gamma: float = 1.0,
    ):
        super().__init__(temperature, combine, teacher_weights, teacher_dice)
        if teacher_weights == "confidence":
            raise ValueError("dist correlates whole patches; use 'uniform' or 'dice' weights")
        self.dist = DISTLoss(temperature, beta, gamma)

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, voxel_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.dist(logits, target)


@register_term("afs")
class AttentionDistillation(DistillationTerm):
    """TeachFormer's L_AFS / attention transfer on the coarse and fine taps, per teacher, weighted sum.

    Args (extra): p — must equal the power the maps were cached with; norm — ``"l1"`` or ``"l2"``;
    taps — which taps (default both).
    """

    distribution = False
    default_combine = "sum"

    def __init__(
        self,
        temperature: float,
        combine: str | None,
        teacher_weights: str,
        teacher_dice: dict[str, float],
        p: float = 2.0,
        norm: str = "l2",
        taps: tuple[str, ...] = ("coarse", "fine"),
        cached_p: float = 2.0,
    ):
        super().__init__(temperature, combine, teacher_weights, teacher_dice)
        if p != cached_p:
            raise ValueError(
                f"p={p} differs from distillation.attention.p={cached_p}, the power the maps were cached with"
            )
        self.taps = _check_taps(taps)
        self.at = AttentionTransferLoss(p, norm)

    @classmethod
    def config_defaults(cls, cfg: DistillationConfig) -> dict[str, Any]:
        return {"p": cfg.attention.p, "norm": cfg.attention.norm, "cached_p": cfg.attention.p}

    def forward(self, logits, taps, targets):
        if taps is None:
            raise ValueError("afs needs the student's tap features")
        teachers = list(targets[self.taps[0]])
        weights = self.weights(teachers, None)
        return {
            tap: sum(w * self.at(taps[tap], targets[tap][t]) for w, t in zip(weights, teachers, strict=True))
            for tap in self.taps
        }


def _check_taps(taps: tuple[str, ...]) -> tuple[str, ...]:
    if not taps or any(t not in ("coarse", "fine") for t in taps):
        raise ValueError(f"taps must be a non-empty subset of coarse, fine; got {taps}")
    return tuple(taps)


def _voxels(features: torch.Tensor, samples: int) -> torch.Tensor:
    """(B, C, x, y, z) → (B, n, C) with n ≤ ``samples`` voxels, evenly spaced (deterministic)."""
    flat = features.flatten(2).transpose(1, 2).float()
    if flat.shape[1] > samples:
        idx = torch.linspace(0, flat.shape[1] - 1, samples, device=flat.device).round().long()
        flat = flat[:, idx]
    return flat


class RelationTerm(DistillationTerm):
    """A term on voxel-to-voxel relations of tap features, against the teachers' cached feature sketches.

    Relations (cosine affinities, kernel matrices) are unchanged by any rotation of the channel axis, so the
    per-case sketch bases and the student's own width do not matter. The student's features are brought onto
    each teacher's grid; up to ``samples`` voxels per patch (evenly spaced) are compared.
    """

    distribution = False
    default_combine = "sum"

    def __init__(
        self,
        temperature: float,
        combine: str | None,
        teacher_weights: str,
        teacher_dice: dict[str, float],
        taps: tuple[str, ...] = ("coarse", "fine"),
        samples: int = 256,
    ):
        super().__init__(temperature, combine, teacher_weights, teacher_dice)
        if samples < 2:
            raise ValueError(f"samples must be >= 2, got {samples}")
        self.taps, self.samples = _check_taps(taps), samples

    @abstractmethod
    def relation_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, classes: torch.Tensor | None
    ) -> torch.Tensor:
        """Args: student (B, n, C), teacher (B, n, k) voxel features; classes (B, n) teacher labels or None."""

    def forward(self, logits, taps, targets):
        if taps is None:
            raise ValueError(f"{self.name} needs the student's tap features")
        out = {}
        for tap in self.taps:
            sketches = targets[f"{tap}_sketch"]
            teachers = list(sketches)
            weights = self.weights(teachers, None)
            total = torch.zeros((), device=logits.device)
            for w, t in zip(weights, teachers, strict=True):
                grid = tuple(sketches[t].shape[2:])
                classes = None
                if "softmax" in targets:
                    pooled = F.adaptive_avg_pool3d(targets["softmax"][t].float(), grid)
                    classes = _voxels(pooled.argmax(1, keepdim=True).float(), self.samples)[..., 0].long()
                student = _voxels(resize_to_grid(taps[tap].float(), grid), self.samples)
                total = total + w * self.relation_loss(student, _voxels(sketches[t], self.samples), classes)
            out[tap] = total
        return out


def _cosine(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1, eps=1e-8)
    return x @ x.transpose(1, 2)


@register_term("affinity")
class AffinityDistillation(RelationTerm):
    """Adaptive affinity distillation (after Loussaief et al., 2024): pairwise voxel cosine affinities.

    ``A = cos(f_i, f_j)`` for student and teacher; squared differences are averaged separately over pairs within
    a class and pairs across classes (classes from the teacher's prediction), and the two means are averaged —
    the adaptive weighting: each group counts equally however rare the foreground is.
    """

    def relation_loss(self, student, teacher, classes):
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
    """Kernel (Gram-matrix) distillation (after Loussaief et al., 2024) over voxels.

    ``K_ij = k(f_i, f_j)`` with ``kernel``: ``linear`` (f_i·f_j), ``polynomial`` ((f_i·f_j + coef)^degree, on
    unit-norm features) or ``rbf`` (exp(−‖f_i − f_j‖² / 2σ²), σ² the median squared distance of the patch);
    each matrix is scaled to unit Frobenius norm, and the loss is ‖K̂_s − K̂_t‖² (in [0, 4]), averaged over the
    batch.

    Args (extra): kernel, degree (2), coef (1.0).
    """

    def __init__(
        self,
        temperature: float,
        combine: str | None,
        teacher_weights: str,
        teacher_dice: dict[str, float],
        taps: tuple[str, ...] = ("coarse", "fine"),
        samples: int = 256,
        kernel: str = "linear",
        degree: int = 2,
        coef: float = 1.0,
    ):
        super().__init__(temperature, combine, teacher_weights, teacher_dice, taps, samples)
        if kernel not in ("linear", "polynomial", "rbf"):
            raise ValueError(f"kernel must be linear, polynomial or rbf, got {kernel!r}")
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.kernel, self.degree, self.coef = kernel, degree, coef

    def _gram(self, f: torch.Tensor) -> torch.Tensor:
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

    def relation_loss(self, student, teacher, classes):
        return (self._gram(student) - self._gram(teacher)).pow(2).sum(dim=(1, 2)).mean()


class FeatureTerm(DistillationTerm):
    """A term comparing features directly, as MSKD does.

    The student's tap, brought onto each teacher's grid, is mapped by a learnable 1×1×1 convolution (one per
    teacher and tap, trained with the student and discarded afterwards) onto the teacher's own channels, where the
    teacher's features are rebuilt from the cached sketch (``basis @ sketch``, the same space for every case).
    Region masks come from the teacher's prediction (:func:`region_masks`): the fraction of each grid cell's voxels
    whose predicted class is c — exactly 0 where the teacher predicts no voxel of c, whatever the temperature.

    Args (extra): taps; channels — ``{"student": {tap: C_s}, "teachers": {teacher: {tap: C_t}}}`` (filled in by
    the trainer from the student and the store).
    """

    distribution = False
    default_combine = "sum"

    def __init__(
        self,
        temperature: float,
        combine: str | None,
        teacher_weights: str,
        teacher_dice: dict[str, float],
        channels: dict[str, Any] | None = None,
        taps: tuple[str, ...] = ("coarse", "fine"),
    ):
        super().__init__(temperature, combine, teacher_weights, teacher_dice)
        if not channels:
            raise ValueError("needs the student's and teachers' tap channels (the trainer provides them)")
        self.taps = _check_taps(taps)
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

    def forward(self, logits, taps, targets):
        if taps is None:
            raise ValueError(f"{self.name} needs the student's tap features")
        out = {}
        for tap in self.taps:
            features = targets[f"{tap}_features"]
            teachers = list(features)
            weights = self.weights(teachers, None)
            total = torch.zeros((), device=logits.device)
            for w, t in zip(weights, teachers, strict=True):
                grid = tuple(features[t].shape[2:])
                student = self.projections[f"{t}__{tap}"](resize_to_grid(taps[tap].float(), grid))
                regions = region_masks(targets["softmax"][t], grid)
                total = total + w * self.feature_loss(student, features[t].float(), regions)
            out[tap] = total
        return out


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


@register_term("ffd")
class FeatureFilteringDistillation(FeatureTerm):
    """MSKD's feature filtering distillation: feature transfer inside the teacher's predicted foreground only.

    ``L = Σ_x m(x) · ‖f̂_s(x) − f̂_t(x)‖² / max(Σ_x m(x), 1)`` with f̂ the features normalised to unit length per
    voxel and m(x) the fraction of tap cell x that the teacher predicts as foreground (any class but background,
    :func:`region_masks`): background and redundant responses are filtered out. A patch where the teacher predicts
    no foreground contributes exactly 0; one with less than one cell's worth of foreground contributes in
    proportion to it (the max(·, 1)), so a few stray voxels cannot weigh as much as a whole organ.
    """

    def feature_loss(self, student, teacher, regions):
        mask = 1.0 - regions[:, :1]
        diff = (
            (F.normalize(student, dim=1, eps=1e-8) - F.normalize(teacher, dim=1, eps=1e-8))
            .pow(2)
            .sum(1, keepdim=True)
        )
        return (mask * diff).sum() / mask.sum().clamp_min(1.0)


@register_term("rgd")
class RegionGraphDistillation(FeatureTerm):
    """MSKD's region graph distillation: class prototypes as nodes, their cosine similarities as edges.

    Prototype of class c: ``P_c = Σ_x m_c(x) f(x) / Σ_x m_c(x)`` with m_c the teacher's predicted region of c on
    the tap grid (:func:`region_masks`). ``L = mean_c ‖P̂_s,c − P̂_t,c‖² + mean_{c≠c'} (cos(P_s,c, P_s,c') −
    cos(P_t,c, P_t,c'))²`` (nodes + edges, unit prototypes P̂), over the classes present in the patch — those the
    teacher predicts at one voxel or more — averaged over the batch. A class the teacher does not predict in the
    patch is no node; a patch with background only has one node and no edge, and contributes only its node.
    """

    def feature_loss(self, student, teacher, regions):
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


class DistillationObjective(nn.Module):
    """L = L_SEG + Σ_terms weight · term, returning the total and every term's value (for logging).

    A term that returns several parts (``afs``: one per tap) is logged per part as ``<name>_<part>`` and counts
    as their mean.
    """

    def __init__(self, seg: SegmentationLoss, terms: list[tuple[str, float, DistillationTerm]]):
        super().__init__()
        self.seg = seg
        self.names = [n for n, _, _ in terms]
        self.term_weights = [w for _, w, _ in terms]
        self.terms = nn.ModuleList(t for _, _, t in terms)

    @property
    def uses_teachers(self) -> bool:
        return any(w > 0 for w in self.term_weights)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(
            *(t.needs for t, w in zip(self.terms, self.term_weights, strict=True) if w > 0)
        )

    def forward(
        self,
        logits: torch.Tensor,
        label: torch.Tensor,
        taps: dict[str, torch.Tensor] | None = None,
        targets: DistillationTargets | None = None,
    ) -> dict[str, torch.Tensor]:
        values = {"seg": self.seg(logits, label)}
        total = values["seg"]
        for name, weight, term in zip(self.names, self.term_weights, self.terms, strict=True):
            if weight == 0:
                continue
            if targets is None:
                raise ValueError(f"term '{name}' needs the teachers' cached targets")
            out = term(logits, taps, targets)
            if isinstance(out, dict):
                values.update({f"{name}_{part}": v for part, v in out.items()})
                out = torch.stack(list(out.values())).mean()
            values[name] = out
            total = total + weight * out
        values["total"] = total
        return values


def _term_from_config(
    term: TermConfig, cfg: DistillationConfig, teacher_dice: dict[str, float], channels: dict[str, Any] | None
) -> DistillationTerm:
    cls = TERMS[term.name]
    args = {**cls.config_defaults(cfg), **term.args}
    if cls.needs_channels:
        args["channels"] = channels
    try:
        return cls(cfg.temperature, term.combine, term.teacher_weights, teacher_dice, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"distillation term '{term.name}': {exc}") from None


def build_objective(
    cfg: DistillationConfig,
    focal_gamma: float = 2.0,
    teacher_dice: dict[str, float] | None = None,
    channels: dict[str, Any] | None = None,
) -> DistillationObjective:
    """The objective for ``cfg``: L_SEG alone when ``kind`` is ``none``, else L_SEG plus every configured term.

    Raises:
        ConfigError: a term's arguments are invalid (the message names the term).
    """
    terms = [] if cfg.kind == "none" else cfg.terms
    built = [(t.name, t.weight, _term_from_config(t, cfg, teacher_dice or {}, channels)) for t in terms]
    return DistillationObjective(SegmentationLoss(focal_gamma), built)
