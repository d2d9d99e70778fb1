"""The distillation framework: the term registry, the base terms, teacher weighting, and the objective.

A term reads only the student's outputs (logits, tap features) and cached teacher data (re-tempered softmax,
attention maps, feature sketches) — never a teacher network. Each term combines several teachers in one of two ways:

- ``average``: mix the teachers' targets first (a weighted mean of their distributions), then compute one loss —
  only for distribution terms (``pwd``, ``cwd``, ``dist``);
- ``sum``: compute the loss per teacher and take the weighted sum — any term; attention maps and features live on
  each teacher's own grid, so the tap terms (:class:`TapTerm`) always do this.

Teacher weights, normalised to sum to 1: ``uniform``; ``dice`` — proportional to each teacher's held-out Dice
recorded in the store; ``class_dice`` — per voxel, proportional to the teacher's held-out Dice on the voxel's label
class (the mean over foreground classes on background voxels); ``confidence`` — per voxel, proportional to
exp(−entropy) of each teacher's distribution (confident teachers weigh more). The per-voxel ones are for
distribution terms.

The terms live beside the plain losses they wrap, one module per family: :mod:`core.losses.distribution`
(``pwd``, ``cwd``, ``dist``), :mod:`core.losses.attention` (``afs``), :mod:`core.losses.relation` (``affinity``,
``gram``) and :mod:`core.losses.mskd` (``ffd``, ``rgd``). The package ``__init__`` imports them, so every term is
in :data:`TERMS` whenever this module is imported. ``docs/losses.md`` gives each formula.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from core.config import BalanceConfig, DistillationConfig, TermConfig
from core.errors import ConfigError
from core.losses.segmentation import SegmentationLoss
from core.terms import ATTENTION_KINDS, TERM_SPECS, DistillationTargets

__all__ = [
    "STAT_PREFIX",
    "TERMS",
    "DistillationObjective",
    "DistillationTerm",
    "TapTerm",
    "TermSettings",
    "build_objective",
    "register_term",
    "resize_to_grid",
]

TERMS: dict[str, type[DistillationTerm]] = {}
# teacher weights that vary voxel by voxel (distribution terms only)
PER_VOXEL_WEIGHTS = ("confidence", "class_dice")
# what a term measures besides its value, logged under "stat_<term>_<what>" and never part of the total
STAT_PREFIX = "stat_"


def register_term(name: str) -> Callable[[type[DistillationTerm]], type[DistillationTerm]]:
    """Class decorator: implement the term ``name`` of :data:`core.terms.TERM_SPECS` (what it reads comes from
    there); a name without a spec, or one registered twice, is an error."""

    def add(cls: type[DistillationTerm]) -> type[DistillationTerm]:
        if name in TERMS:
            raise ValueError(f"distillation term '{name}' is already registered")
        if name not in TERM_SPECS:
            raise ValueError(f"distillation term '{name}' has no entry in core.terms.TERM_SPECS")
        cls.name = name
        TERMS[name] = cls
        return cls

    return add


def resize_to_grid(amap: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bring (B, C, x, y, z) maps or features onto ``size``: area averaging when shrinking, trilinear when growing."""
    if tuple(amap.shape[2:]) == tuple(size):
        return amap
    if all(s <= a for s, a in zip(size, amap.shape[2:], strict=True)):
        return F.adaptive_avg_pool3d(amap, size)
    return F.interpolate(amap, size=size, mode="trilinear", align_corners=False)


@dataclass(frozen=True)
class TermSettings:
    """What every term is built with, whatever its own arguments.

    Attributes:
        temperature: T of the cached distributions the term receives.
        combine: ``"average"`` or ``"sum"`` (see the module docstring); None for the term's default.
        teacher_weights: ``"uniform"``, ``"dice"`` or ``"confidence"``.
        teacher_dice: held-out Dice per teacher (needed for ``"dice"``).
        class_dice: held-out Dice per teacher and foreground class (needed for ``"class_dice"``).
    """

    temperature: float
    combine: str | None = None
    teacher_weights: str = "uniform"
    teacher_dice: dict[str, float] | None = None
    class_dice: dict[str, list[float]] | None = None


class DistillationTerm(nn.Module):
    """Base class: teacher weighting and combination around a per-teacher loss.

    Args:
        settings: temperature, combination and teacher weighting (:class:`TermSettings`).
    """

    name: ClassVar[str] = ""  # what it reads: core.terms.TERM_SPECS[name]
    # works on class distributions (can average teachers, per-voxel weights)
    distribution: ClassVar[bool] = True
    default_combine: ClassVar[str] = "average"

    def __init__(self, settings: TermSettings):
        super().__init__()
        self.temperature = settings.temperature
        self.combine = settings.combine or self.default_combine
        if self.combine not in ("average", "sum"):
            raise ValueError(f"combine must be 'average' or 'sum', got {self.combine!r}")
        if self.combine == "average" and not self.distribution:
            raise ValueError(
                "combine 'average' needs a distribution term; attention maps are combined by 'sum'"
            )
        if settings.teacher_weights in PER_VOXEL_WEIGHTS and not self.distribution:
            raise ValueError(
                f"per-voxel '{settings.teacher_weights}' weights apply to distribution terms only"
            )
        self.teacher_weights = settings.teacher_weights
        self.teacher_dice = settings.teacher_dice or {}
        self.class_dice = settings.class_dice or {}

    @classmethod
    def config_defaults(cls, cfg: DistillationConfig) -> dict[str, Any]:
        """Arguments this term takes from the rest of the distillation config unless its ``args`` set them."""
        return {}

    def weights(
        self,
        teachers: list[str],
        probs: dict[str, torch.Tensor] | None,
        label: torch.Tensor | None = None,
    ) -> list[torch.Tensor | float]:
        """Normalised weights per teacher: scalars, or (B, 1, X, Y, Z) maps for ``confidence`` and ``class_dice``
        (which reads ``label``, (B, 1, X, Y, Z))."""
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
        if self.teacher_weights == "class_dice":
            return self._class_dice_weights(teachers, label)
        assert probs is not None
        scores = [torch.exp((p * torch.log(p.clamp_min(1e-12))).sum(1, keepdim=True)) for p in probs.values()]
        total = torch.stack(scores).sum(0)
        return [s / total for s in scores]

    def _class_dice_weights(
        self, teachers: list[str], label: torch.Tensor | None
    ) -> list[torch.Tensor | float]:
        """Per voxel x: ``w_t(x) = D_t[y(x)] / Σ_t' D_t'[y(x)]``, D_t[c] teacher t's held-out Dice on class c and
        D_t[0] (background) its mean over the foreground classes; uniform where every teacher's D is 0."""
        missing = [t for t in teachers if not self.class_dice.get(t)]
        if missing:
            raise ConfigError(
                f"teacher_weights 'class_dice' needs each teacher's per-class Dice on its held-out cases; missing for "
                f"{', '.join(missing)}"
            )
        if label is None:
            raise ValueError("teacher_weights 'class_dice' needs the batch's label")
        tables = []
        for t in teachers:
            fg = torch.as_tensor(self.class_dice[t], dtype=torch.float32, device=label.device)
            tables.append(torch.cat([fg.mean().reshape(1), fg]))
        table = torch.stack(tables)  # (teachers, K)
        if table.shape[1] <= int(label.max()):
            raise ValueError(
                f"teacher_weights 'class_dice': the teachers' Dice covers {table.shape[1] - 1} foreground classes, "
                f"the label has class {int(label.max())}"
            )
        total = table.sum(0)
        table = torch.where(
            total > 0, table / total.clamp_min(1e-12), torch.full_like(table, 1 / len(teachers))
        )
        return [table[i][label.long()] for i in range(len(teachers))]


class TapTerm(DistillationTerm):
    """A term on the student's tap features: per tap, ``Σ_t w_t · teacher_loss(tap, teacher t)`` (``combine: sum``).

    :meth:`forward` is the one per-tap loop of every tap term; a subclass names the target kind it reads per tap
    (:attr:`target_kind`) and gives one teacher's loss on one tap (:meth:`teacher_loss`). It returns
    ``{tap: loss}``, which the objective logs per tap and averages.

    Args:
        settings: see :class:`TermSettings`.
        taps: which taps (a non-empty subset of ``coarse``, ``fine``; default both).
    """

    distribution = False
    default_combine = "sum"
    # the target kind read per tap: "{tap}" (attention maps), "{tap}_sketch", "{tap}_features"
    target_kind: ClassVar[str] = "{tap}"

    def __init__(self, settings: TermSettings, taps: tuple[str, ...] = ATTENTION_KINDS):
        super().__init__(settings)
        if not taps or any(t not in ATTENTION_KINDS for t in taps):
            raise ValueError(f"taps must be a non-empty subset of {', '.join(ATTENTION_KINDS)}; got {taps}")
        self.taps = tuple(taps)

    @abstractmethod
    def teacher_loss(
        self, student: torch.Tensor, target: torch.Tensor, probs: torch.Tensor | None, tap: str, teacher: str
    ) -> torch.Tensor:
        """One teacher's loss on one tap.

        Args:
            student: the student's tap features (B, C_s, x, y, z).
            target: the teacher's target for the tap, ``targets[target_kind.format(tap=tap)][teacher]``.
            probs: the teacher's distribution (B, K, X, Y, Z) at T, or None when the recipe reads no softmax.
            tap: ``coarse`` or ``fine``.
            teacher: the teacher's name in the targets.

        Returns:
            A scalar.
        """

    def forward(
        self, logits: torch.Tensor, taps: dict[str, torch.Tensor] | None, targets: DistillationTargets
    ) -> dict[str, torch.Tensor]:
        """Per tap, the weighted sum over teachers of :meth:`teacher_loss`.

        Teachers are added in the order of ``targets``, each loss multiplied by its weight, onto a zero scalar.

        Args:
            logits: (B, K, X, Y, Z), unused.
            taps: the student's tap features ``{tap: (B, C_s, x, y, z)}``.
            targets: the teachers' targets; per tap, ``targets[target_kind.format(tap=tap)]`` is
                ``{teacher: tensor}``.

        Returns:
            ``{tap: scalar}`` for each tap of the term.

        Raises:
            ValueError: ``taps`` is None (the student's tap features were not recorded).
        """
        if taps is None:
            raise ValueError(f"{self.name} needs the student's tap features")
        probs = targets.get("softmax", {})
        out = {}
        for tap in self.taps:
            per_teacher = targets[self.target_kind.format(tap=tap)]
            teachers = list(per_teacher)
            weights = self.weights(teachers, None)
            total = torch.zeros((), device=taps[tap].device)
            for w, t in zip(weights, teachers, strict=True):
                total = total + w * self.teacher_loss(taps[tap], per_teacher[t], probs.get(t), tap, t)
            out[tap] = total
        return out


class DistillationObjective(nn.Module):
    """L = L_SEG + Σ_terms weight · multiplier · term, returning the total and every term's value (for logging).

    A term that returns several parts (the tap terms: one per tap) is logged per part as ``<name>_<part>`` and
    counts as their mean. What a term measures besides its value (:attr:`DistributionTerm.stats`: the fraction of
    voxels masked) is returned as ``stat_<name>_<what>``, outside the total. The terms receive the batch's label
    as ``targets["classes"]["label"]``.

    :attr:`multipliers` (one per term, 1 by default) are set by the training loop's
    :class:`~core.training.health.TermHealth` before each step (the warm-up ramp times the balance's scale);
    :attr:`balance_scales`, a buffer saved with the run's resume state, holds the automatic balance's scales.
    """

    def __init__(
        self,
        seg: SegmentationLoss,
        terms: list[tuple[str, float, DistillationTerm]],
        balance: BalanceConfig | None = None,
    ):
        super().__init__()
        self.seg = seg
        self.names = [n for n, _, _ in terms]
        self.term_weights = [w for _, w, _ in terms]
        self.terms = nn.ModuleList(t for _, _, t in terms)
        self.balance = balance or BalanceConfig()
        self.multipliers = [1.0] * len(terms)
        if self.balance.grad_fraction is not None:
            self.register_buffer("balance_scales", torch.ones(len(terms), dtype=torch.float64))

    @property
    def uses_teachers(self) -> bool:
        return any(w > 0 for w in self.term_weights)

    def effective_weight(self, index: int) -> float:
        """The weight term ``index`` enters the total with at this step."""
        m = self.multipliers[index]
        return self.term_weights[index] if m == 1.0 else self.term_weights[index] * m

    def forward(
        self,
        logits: torch.Tensor,
        label: torch.Tensor,
        taps: dict[str, torch.Tensor] | None = None,
        targets: DistillationTargets | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args: logits (B, K, X, Y, Z); label (B, 1, X, Y, Z); taps ``{tap: (B, C, x, y, z)}``; the targets.

        Returns:
            ``{"seg", <term>, <term>_<tap>…, stat_<term>_<what>…, "total"}``, scalars.
        """
        values = {"seg": self.seg(logits, label)}
        total = values["seg"]
        if targets is not None:
            targets = {**targets, "classes": {"label": label}}
        for i, (name, weight, term) in enumerate(zip(self.names, self.term_weights, self.terms, strict=True)):
            if weight == 0:
                continue
            if targets is None:
                raise ValueError(f"term '{name}' needs the teachers' cached targets")
            out = term(logits, taps, targets)
            if isinstance(out, dict):
                values.update({f"{name}_{part}": v for part, v in out.items()})
                out = torch.stack(list(out.values())).mean()
            values[name] = out
            values.update(
                {f"{STAT_PREFIX}{name}_{k}": v.detach() for k, v in getattr(term, "stats", {}).items()}
            )
            total = total + self.effective_weight(i) * out
        values["total"] = total
        return values


def _term_from_config(
    term: TermConfig,
    cfg: DistillationConfig,
    teacher_dice: dict[str, float],
    channels: dict[str, Any] | None,
    class_dice: dict[str, list[float]] | None = None,
) -> DistillationTerm:
    cls = TERMS[term.name]
    args = {**cls.config_defaults(cfg), **term.args}
    if TERM_SPECS[term.name].needs_channels:
        args["channels"] = channels
    settings = TermSettings(cfg.temperature, term.combine, term.teacher_weights, teacher_dice, class_dice)
    try:
        return cls(settings, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"distillation term '{term.name}': {exc}") from None


def build_objective(
    cfg: DistillationConfig,
    focal_gamma: float = 2.0,
    teacher_dice: dict[str, float] | None = None,
    channels: dict[str, Any] | None = None,
    class_dice: dict[str, list[float]] | None = None,
) -> DistillationObjective:
    """The objective for ``cfg``: L_SEG alone when ``kind`` is ``none``, else L_SEG plus every configured term.

    Raises:
        ConfigError: a term's arguments are invalid (the message names the term).
    """
    terms = [] if cfg.kind == "none" else cfg.terms
    built = [
        (t.name, t.weight, _term_from_config(t, cfg, teacher_dice or {}, channels, class_dice)) for t in terms
    ]
    return DistillationObjective(SegmentationLoss(focal_gamma), built, cfg.balance if terms else None)
