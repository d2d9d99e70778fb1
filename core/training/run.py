"""What a training run is and what it produced: :class:`TrainingRun` in, :class:`FitResult` out.

A run is one object — what to train, on which patches and cases, with which loss, and where its files go — and it
has a key: the sha256 of its settings, cases, seed and loss (:func:`run_key`). A killed run is resumed, and a
finished run is recognised (``skip_done``), only by a run with the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import InferenceConfig, TrainingConfig
from core.data.patches import PatchDataset
from core.models.registry import ModelSpec
from core.store.teacher_store import TeacherStore
from core.terms import DistillationTargets

__all__ = [
    "FitResult",
    "LossFn",
    "TargetSource",
    "TrainingRun",
    "count_parameters",
    "resolve_num_workers",
    "run_fields",
    "run_key",
    "run_seed",
]

LossFn = Callable[..., dict[str, torch.Tensor]]
TargetSource = Callable[[dict[str, torch.Tensor]], DistillationTargets]


@dataclass(frozen=True)
class FitResult:
    """What a training run produced (also written as ``summary.json``).

    The headline (``headline_*``, ``checkpoint``) is chosen without the validation cases: the **final** model
    (``final_*``, ``checkpoint_final.pth``), as nnU-Net reports, or the epoch with the best Dice on cases held out of
    training (``headline == "holdout"``). ``best_*`` is the epoch with the best validation Dice — chosen on the very
    cases it is scored on, so optimistic; shown beside the headline, labelled as such.
    """

    name: str
    arch: str
    parameters: int
    best_mean_dice: float
    best_dice_per_class: list[float]
    best_epoch: int
    epochs_run: int
    seconds: float
    checkpoint: str
    metrics_csv: str
    final_mean_dice: float = float("nan")
    final_dice_per_class: list[float] = field(default_factory=list)
    final_epoch: int = -1
    final_hd95_per_class: list[float] = field(default_factory=list)
    checkpoint_final: str = ""
    per_case_csv: str = ""
    headline: str = "final"
    headline_epoch: int = -1
    headline_mean_dice: float = float("nan")
    headline_dice_per_class: list[float] = field(default_factory=list)
    headline_hd95_per_class: list[float] = field(default_factory=list)
    holdout_cases: list[str] = field(default_factory=list)
    holdout_mean_dice: float | None = None
    world_size: int = 1
    replicas_identical: bool | None = None
    evaluated_in: str = "preprocessed grid"
    seconds_per_volume: float = float("nan")
    gflops_per_window: float | None = None
    teacher_forward_seconds: float | None = None
    # the KD terms' gradient health (core.training.health.TermHealth.verdict); None without KD terms
    kd_health: dict[str, Any] | None = None
    # with held-out cases: the largest-component classes chosen on them and the headline's validation scores with
    # them (core.evaluation.postprocess); None without held-out cases
    postprocessing: dict[str, Any] | None = None
    # the final model's mean Dice on the held-out cases (holdout_per_case.csv; what a screening compares)
    final_holdout_mean_dice: float | None = None


@dataclass(frozen=True, eq=False)
class TrainingRun:
    """One training run: what to train, on which patches and cases, with which loss, and where its files go.

    Attributes:
        name: run name shown in the progress bar and summary.
        model: the network (moved to ``device`` when trained).
        spec: its registry entry (taps, name).
        args: its constructor arguments, recorded in the checkpoints.
        in_channels: input modalities, recorded in the checkpoints.
        num_classes: K including background.
        dataset: training patches.
        store: the store holding the validation cases.
        val_cases: validation case ids.
        cfg: loop settings.
        inference: sliding-window settings for validation.
        loss_fn: ``loss_fn(logits, label, taps, targets) -> {"total": ..., term: ...}``.
        out_dir: the run's folder: metrics, curves, summary, checkpoints.
        checkpoint_path: where a copy of the headline checkpoint goes (a teacher's configured ``checkpoint``,
            inside ``out_dir`` or elsewhere); ``None``: only the run folder's own checkpoints.
        device: training device.
        target_source: turns a batch into distillation targets; ``None`` when not distilling.
        capture_taps: record the model's coarse and fine features for the loss.
        meta: extra fields recorded in the checkpoints and summary (fold, training cases, …).
        recorded: fields recorded in the checkpoints and summary beside ``meta`` that describe the run without
            being part of its key (what they hold is already in it, e.g. the inputs the model expects, which
            ``teachcache predict`` reads back), so recording more never makes a finished run look like another.
        teacher_clock: teachers run during training (online distillation) and their ``seconds`` so far in forward
            passes; recorded as ``teacher_forward_seconds`` (``None``: no teacher runs).
        holdout_cases: training cases held out of ``dataset`` to choose the headline checkpoint and stop early
            (``training.holdout``); empty: the final model is the headline.
        skip_done: when the run folder already holds a finished run with the same key (same settings, cases,
            seed, loss), return its result instead of training again (``make cv`` re-run).
        original_geometry: score the headline model once more at the end in each validation case's original
            geometry (needs the raw label files, unchanged since preprocessing); its per-case scores are then the
            run's headline. In-training validation stays on the preprocessed grid.
    """

    name: str
    model: nn.Module
    spec: ModelSpec
    args: dict[str, Any]
    in_channels: int
    num_classes: int
    dataset: PatchDataset
    store: TeacherStore
    val_cases: list[str]
    cfg: TrainingConfig
    inference: InferenceConfig
    loss_fn: LossFn
    out_dir: Path
    checkpoint_path: Path | None
    device: torch.device
    target_source: TargetSource | None = None
    capture_taps: bool = False
    meta: dict[str, Any] | None = None
    recorded: dict[str, Any] | None = None
    teacher_clock: Any = None
    holdout_cases: list[str] = field(default_factory=list)
    skip_done: bool = False
    original_geometry: bool = False

    @property
    def recorded_fields(self) -> dict[str, Any]:
        """``meta`` and ``recorded`` together: what every checkpoint and the summary record beside the scores."""
        return {**(self.meta or {}), **(self.recorded or {})}

    @property
    def foreground_names(self) -> list[str]:
        """The K-1 foreground class names (``meta["class_names"]`` without background, else ``class_<i>``)."""
        class_names = self.recorded_fields.get("class_names") or [
            f"class_{i}" for i in range(self.num_classes)
        ]
        return list(class_names[1:])


def run_fields(run: TrainingRun) -> dict[str, Any]:
    """What a run is: its settings, cases, seed and loss, as JSON-able values."""
    payload = {
        "name": run.name,
        "arch": run.spec.name,
        "args": run.args,
        "num_classes": run.num_classes,
        "cases": list(run.dataset.case_ids),
        "patch": list(run.dataset.patch_size),
        "dataset_seed": run.dataset.seed,
        "length": len(run.dataset),
        "targets": repr(run.dataset.targets),
        "val_cases": list(run.val_cases),
        "holdout_cases": list(run.holdout_cases),
        "training": run.cfg.model_dump(mode="json"),
        "inference": run.inference.model_dump(mode="json"),
        "loss": getattr(run.loss_fn, "names", None),
        "loss_weights": getattr(run.loss_fn, "term_weights", None),
        "meta": run.meta or {},
    }
    if getattr(run.dataset, "align", None) is not None:  # patches snapped to a cached twin's (student arms)
        payload["align"] = run.dataset.align
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def run_key(run: TrainingRun) -> str:
    """What a run is, hashed (sha256 hex of :func:`run_fields`): a partial run is resumed, and a finished one
    recognised, only by the same run."""
    return hashlib.sha256(json.dumps(run_fields(run), sort_keys=True, default=str).encode()).hexdigest()


def run_seed(experiment_seed: int, training_seed: int) -> int:
    """The seed of one training run, from the experiment's ``seed`` and the run's ``training.seed`` together.

    Either one changes the network's initialisation and the patches drawn.
    """
    return int(np.random.SeedSequence([experiment_seed, training_seed]).generate_state(1)[0] % 2**31)


def resolve_num_workers(setting: int | str, device: torch.device) -> int:
    """``training.num_workers``: a number, or ``"auto"`` — 0 on CPU (the workers would take the cores the model
    trains on), and on CUDA half the CPU cores, at most 8, so patches are read while the GPU trains."""
    if setting != "auto":
        return int(setting)
    return min(8, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
