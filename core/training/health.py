"""How each distillation term pulls on the student, measured while it trains — and the weights that follow from it.

Every ``distillation.balance.every`` training steps, :class:`TermHealth` measures the gradient of L_SEG and of each KD
term on all of the student's weights (:func:`term_gradients`, the measurement ``scripts/term_gradients.py`` reports
offline) and records, per term, the ratio of its *weighted* gradient norm to L_SEG's and the cosine between the two.
The epoch's means go to ``metrics.csv`` (``grad_ratio_<term>``, ``grad_cosine_<term>``); at the end of the run
:meth:`TermHealth.verdict` says whether a term dominated L_SEG (ratio above ``DOMINANT_RATIO`` in most epochs)
or opposed it (cosine below ``OPPOSING_COSINE`` in most epochs; :mod:`core.evaluation.kd_health`, which the CV
report applies to the same columns) — written to ``summary.json`` (``kd_health``),
warned once in the run's log, and listed by the cross-validation report. Measuring changes no step: the gradients
are taken beside the step's own backward pass, which is unchanged.

The same measurement drives the weights (``docs/losses.md``, "Term balancing and the health check"):

- ``warmup_epochs``: each KD weight is multiplied by ``r(s) = min(1, (s + 1) / S_w)`` at step s, S_w the ramp's
  steps;
- ``grad_fraction: f``: at each measurement, term k's scale becomes ``a_k = f · ‖∇L_SEG‖ / (λ_k ‖∇L_k‖)``
  (clamped to [1e-3, 1e3]), so its weighted gradient norm is f times L_SEG's until the next one. The term enters
  the loss as ``λ_k · r(s) · a_k · L_k``. Its cost per measured step: one backward pass per KD term and one for
  L_SEG, on top of the step's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from core.evaluation.kd_health import DOMINANT_RATIO, OPPOSING_COSINE, verdict
from core.losses.distillation import DistillationObjective

__all__ = ["DOMINANT_RATIO", "OPPOSING_COSINE", "KDHealthWarning", "TermHealth", "term_gradients"]

SCALE_RANGE = (1e-3, 1e3)


class KDHealthWarning(UserWarning):
    """A distillation term dominated or opposed L_SEG for most of a run (said once per run)."""


def term_gradients(
    values: dict[str, torch.Tensor], names: list[str], params: list[nn.Parameter]
) -> dict[str, torch.Tensor]:
    """The gradient of each of ``values[name]`` on ``params``, flattened into one vector (zeros where a parameter is
    unused); the graph is kept for the step's own backward pass."""
    out = {}
    for name in names:
        parts = torch.autograd.grad(values[name], params, retain_graph=True, allow_unused=True)
        out[name] = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).detach().float().flatten()
                for g, p in zip(parts, params, strict=True)
            ]
        )
    return out


class TermHealth:
    """The KD terms' gradient measurement, warm-up ramp and automatic balance for one run.

    Args:
        objective: the run's loss (its :attr:`~DistillationObjective.multipliers` are set before every step).
        model: the student (its trainable weights are measured).
        steps_per_epoch: ``training.iterations_per_epoch``.
        measure: take the gradient measurements (``False`` under ``torchrun``, where DDP reduces gradients in its own
            backward hooks: the ramp still applies; the balance, which needs the measurements, is refused).
    """

    def __init__(
        self, objective: DistillationObjective, model: nn.Module, steps_per_epoch: int, measure: bool = True
    ):
        self.objective, self.model, self.measuring = objective, model, measure
        self.cfg = objective.balance
        self.ramp_steps = self.cfg.warmup_epochs * steps_per_epoch
        self.active = [
            (i, n)
            for i, (n, w) in enumerate(zip(objective.names, objective.term_weights, strict=True))
            if w > 0
        ]
        self._epoch: dict[str, list[tuple[float, float]]] = {}

    @classmethod
    def of(
        cls, loss_fn: Any, model: nn.Module, steps_per_epoch: int, measure: bool = True
    ) -> TermHealth | None:
        """The weights and health check of a distilling objective; ``None`` for a loss without KD terms."""
        if isinstance(loss_fn, DistillationObjective) and loss_fn.uses_teachers:
            return cls(loss_fn, model, steps_per_epoch, measure)
        return None

    def ramp(self, step: int) -> float:
        """r(step): 1 without a warm-up."""
        return 1.0 if self.ramp_steps == 0 else min(1.0, (step + 1) / self.ramp_steps)

    def before_step(self, step: int) -> None:
        """Set the objective's multipliers for training step ``step`` (0-based over the whole run)."""
        r = self.ramp(step)
        scales = getattr(self.objective, "balance_scales", None)
        for i, _ in self.active:
            a = 1.0 if scales is None else float(scales[i])
            self.objective.multipliers[i] = r * a

    def measures(self, step: int) -> bool:
        return self.measuring and self.cfg.every > 0 and step % self.cfg.every == 0

    def measure(
        self, values: dict[str, torch.Tensor], scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """Measure this step's gradients (``values``: the objective's output, still attached to the graph), record
        each term's weighted ratio and cosine, and re-scale the terms when balancing.

        ``scale`` multiplies every loss before its gradient is taken (the step's fp16 gradient scaler, so small
        gradients do not underflow; ratios and cosines do not depend on it). A measurement whose gradient norms are
        zero or not finite is left out.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        names = ["seg", *(n for _, n in self.active)]
        scaled = {n: scale(values[n]) if scale is not None else values[n] for n in names}
        grads = term_gradients(scaled, names, params)
        seg = grads["seg"]
        seg_norm = float(seg.norm())
        if not math.isfinite(seg_norm) or seg_norm == 0:
            return
        scales = getattr(self.objective, "balance_scales", None)
        for i, name in self.active:
            g = grads[name]
            norm = float(g.norm())
            if not math.isfinite(norm):
                continue
            ratio = self.objective.effective_weight(i) * norm / seg_norm
            cosine = float(torch.nn.functional.cosine_similarity(g, seg, dim=0))
            self._epoch.setdefault(name, []).append((ratio, cosine))
            if scales is not None and norm > 0:
                target = self.cfg.grad_fraction * seg_norm / (self.objective.term_weights[i] * norm)
                scales[i] = min(max(target, SCALE_RANGE[0]), SCALE_RANGE[1])

    def epoch_columns(self) -> dict[str, float]:
        """The epoch's mean ratio and cosine per term (``metrics.csv`` columns), and the balance's scales; resets."""
        row: dict[str, float] = {}
        for name, pairs in self._epoch.items():
            row[f"grad_ratio_{name}"] = float(np.mean([r for r, _ in pairs]))
            row[f"grad_cosine_{name}"] = float(np.mean([c for _, c in pairs]))
        scales = getattr(self.objective, "balance_scales", None)
        if scales is not None:
            row.update({f"balance_scale_{n}": float(scales[i]) for i, n in self.active})
        self._epoch = {}
        return row

    def verdict(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """What the run's epochs say of each term (``summary.json``'s ``kd_health``) and the warnings to print
        (:func:`core.evaluation.kd_health.verdict` over the run's KD terms)."""
        if not self.measuring:  # said in the summary, so a run without the check never reads as a healthy one
            return {
                "not_measured": "the health check measures each term's gradient beside the step's own backward "
                "pass, which DDP's gradient reduction does not allow: trained under torchrun"
            }
        found = verdict(rows, [name for _, name in self.active])
        return {**found, "every": self.cfg.every} if found else {}
