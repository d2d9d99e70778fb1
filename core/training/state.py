"""The state a training run carries from epoch to epoch, and its resume checkpoint.

:class:`RunState` is everything the loop changes: the model's and the optimiser's weights (through
:class:`Optimisation`), the epochs done, the metrics rows, the best, last and selected validation scores, the
early-stopping count and the seconds spent. :meth:`RunState.to_checkpoint` turns it (with the RNG states) into the
plain dict written as ``checkpoint_latest.pth`` — tensors, lists and numbers only, so it loads with
``weights_only=True`` — and :meth:`RunState.restore` puts such a dict back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import TrainingConfig
from core.training.run import LossFn

__all__ = ["Optimisation", "RunState", "Scores"]


@dataclass
class Optimisation:
    """What one training step updates: Adam over the model and the loss's own parameters, its schedule and scaler.

    Terms with learnable parts (MSKD's student-side projections) train with the model (``extra``); only the model is
    saved. The gradient scaler is on for fp16 autocast on CUDA (no bf16), off otherwise.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    extra: list[nn.Parameter]

    @classmethod
    def build(
        cls, model: nn.Module, loss_fn: LossFn, cfg: TrainingConfig, device: torch.device
    ) -> Optimisation:
        extra = list(loss_fn.to(device).parameters()) if isinstance(loss_fn, nn.Module) else []
        optimizer = torch.optim.Adam([*model.parameters(), *extra], lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.epochs, power=0.9)
        use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
        return cls(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=use_scaler), extra)


@dataclass(frozen=True)
class Scores:
    """The validation scores of one epoch.

    Attributes:
        epoch: the epoch scored (-1: none yet).
        mean_dice: mean of ``dice_per_class``.
        dice_per_class: mean Dice per foreground class over the validation cases, (K-1,).
        case_dice: Dice per validation case and foreground class, (N_cases, K-1); empty for the best epoch, whose
            per-case scores are not kept.
        case_hd95: HD95 (mm) per validation case and foreground class, (N_cases, K-1).
        holdout_mean_dice: mean Dice on the held-out training cases (the selected epoch only).
    """

    epoch: int
    mean_dice: float
    dice_per_class: list[float]
    case_dice: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    case_hd95: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    holdout_mean_dice: float = -1.0


@dataclass
class RunState:
    """Everything the training loop changes, from one epoch to the next.

    Attributes:
        model: the network being trained (not wrapped for data-parallel training).
        loss_fn: the loss (its own parameters, if any, are trained and resumed with the model).
        opt: optimiser, learning-rate schedule and gradient scaler.
        num_foreground: K-1, the foreground classes scored.
        run_key: the run's key (:func:`core.training.run.run_key`): only the same run resumes from its checkpoint.
        run_fields: what the run is (:func:`core.training.run.run_fields`), recorded in the checkpoint to name what
            differs when another run finds it.
        epochs_done: complete epochs so far (the next epoch's index).
        rows: one ``metrics.csv`` row per complete epoch.
        best: the epoch with the best validation Dice (optimistic: chosen on the cases it is scored on).
        last: the last validation (the final model's scores once training ends).
        selected: the epoch with the best Dice on the held-out training cases, and its validation scores.
        stale: epochs since the held-out Dice last improved (early stopping).
        seconds_before: training seconds spent by earlier processes of this run (a resumed run).
        teacher_seconds_before: of those, the seconds teachers ran in (online distillation).
        teacher_clock: the run's teachers in memory (their ``seconds`` in this process); ``None``: none.
        started: ``time.perf_counter()`` when this process began training.
        steps_done: training steps counted by the progress bar and the kill hook (not resumed: recounted).
        latency: seconds to predict one validation volume (the last validation's mean; not resumed).
        last_holdout: the last validation's scores on the held-out training cases (not resumed).
    """

    model: nn.Module
    loss_fn: LossFn
    opt: Optimisation
    num_foreground: int
    run_key: str
    run_fields: dict[str, Any]
    epochs_done: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: Scores = field(default_factory=lambda: Scores(0, -1.0, []))
    last: Scores = field(init=False)
    selected: Scores = field(init=False)
    stale: int = 0
    seconds_before: float = 0.0
    teacher_seconds_before: float = 0.0
    teacher_clock: Any = None
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0
    latency: float = float("nan")
    last_holdout: Scores | None = None

    def __post_init__(self) -> None:
        empty = np.empty((0, self.num_foreground))
        self.last = Scores(-1, float("nan"), [], empty, empty)
        self.selected = Scores(-1, float("nan"), [], empty, empty, holdout_mean_dice=-1.0)

    @property
    def seconds(self) -> float:
        """Training seconds of the whole run so far, earlier processes included."""
        return self.seconds_before + time.perf_counter() - self.started

    @property
    def teacher_seconds(self) -> float | None:
        """Seconds the run's teachers ran in forward passes, earlier processes included; ``None``: no teachers."""
        if self.teacher_clock is None:
            return None
        return self.teacher_seconds_before + float(self.teacher_clock.seconds)

    def to_checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue after the last complete epoch (the ``checkpoint_latest.pth`` payload)."""
        last, selected = self.last, self.selected
        return {
            "run_key": self.run_key,
            "run_fields": json.dumps(self.run_fields),
            "epoch": self.epochs_done - 1,
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict() if isinstance(self.loss_fn, nn.Module) else {},
            "optimizer": self.opt.optimizer.state_dict(),
            "scheduler": self.opt.scheduler.state_dict(),
            "scaler": self.opt.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rows": self.rows,
            "best": [self.best.mean_dice, list(self.best.dice_per_class), self.best.epoch],
            "stale": self.stale,
            "last": [
                last.mean_dice,
                list(last.dice_per_class),
                last.epoch,
                *(np.asarray(a).tolist() for a in (last.case_dice, last.case_hd95)),
            ],
            "seconds": self.seconds,
            "teacher_seconds": self.teacher_seconds,
            "selected": [
                selected.holdout_mean_dice,
                selected.epoch,
                list(selected.dice_per_class),
                *(np.asarray(a).tolist() for a in (selected.case_dice, selected.case_hd95)),
            ],
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint`` (:meth:`to_checkpoint`'s dict, of the same run): the weights, optimiser, RNG
        states, scores and rows are put back; the run goes on with the epoch after it."""
        self.model.load_state_dict(checkpoint["model"])
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.load_state_dict(checkpoint["loss"])
        self.opt.optimizer.load_state_dict(checkpoint["optimizer"])
        self.opt.scheduler.load_state_dict(checkpoint["scheduler"])
        self.opt.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"])
        if checkpoint.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        self.rows, self.stale = list(checkpoint["rows"]), int(checkpoint["stale"])
        self.seconds_before = float(checkpoint["seconds"])
        self.teacher_seconds_before = float(checkpoint.get("teacher_seconds") or 0.0)
        mean_dice, per_class, epoch = checkpoint["best"]
        self.best = Scores(int(epoch), float(mean_dice), list(per_class))
        mean_dice, per_class, epoch, dice, hd95 = checkpoint["last"]
        self.last = Scores(int(epoch), float(mean_dice), list(per_class), *self._per_case(dice, hd95))
        held, epoch, per_class, dice, hd95 = checkpoint["selected"]
        mean_dice = float(np.mean(per_class)) if per_class else float("nan")
        self.selected = Scores(
            int(epoch), mean_dice, list(per_class), *self._per_case(dice, hd95), float(held)
        )
        self.epochs_done = int(checkpoint["epoch"]) + 1

    def _per_case(self, dice: list[Any], hd95: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Per-case lists from a checkpoint back as (N_cases, K-1) arrays."""
        return (
            np.asarray(dice).reshape(-1, self.num_foreground),
            np.asarray(hd95).reshape(-1, self.num_foreground),
        )
