"""Validation during and after training: scoring whole volumes, keeping the best and selected epochs, the headline.

Every ``val_every`` epochs (and after the last) :func:`validate_epoch` scores the model with sliding windows on the
validation cases, Dice and HD95 per class, and — with ``training.holdout`` — on the training cases held out of
training. The headline model (:func:`choose_headline`) is chosen without looking at the validation cases: the final
model (as nnU-Net reports), or the epoch with the best Dice on the held-out cases. ``checkpoint_best.pth``, the best
epoch on the validation cases themselves, is kept beside it, labelled as optimistic.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import InferenceConfig
from core.errors import TrainingError
from core.evaluation.metrics import dice_per_class, hd95_per_class
from core.evaluation.postprocess import choose_largest_component, keep_largest_component
from core.inference import predict_volume
from core.models.checkpoint import load_checkpoint
from core.store.teacher_store import TeacherStore
from core.training.checkpoints import BEST_CHECKPOINT, FINAL_CHECKPOINT, SELECTED_CHECKPOINT, save_model
from core.training.run import TrainingRun
from core.training.state import RunState, Scores

__all__ = [
    "Headline",
    "choose_headline",
    "choose_postprocessing",
    "evaluate",
    "final_holdout_scores",
    "score_postprocessed",
    "skip_validation",
    "validate_epoch",
    "write_per_case_csv",
]


def evaluate(
    model: nn.Module,
    store: TeacherStore,
    case_ids: list[str],
    inference: InferenceConfig,
    num_classes: int,
    device: torch.device,
    amp: bool = True,
    original: bool = False,
    timings: list[float] | None = None,
    postprocess: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Dice and HD95 (mm) per foreground class of each case, predicted with sliding windows over the whole volume.

    On the store's preprocessed grid, at its spacing; with ``original``, in the case's original geometry: the
    prediction resampled back onto the original grid (:mod:`core.evaluation.geometry`) and scored against the
    original label file, at the original spacing, as nnU-Net evaluates. :func:`core.evaluation.metrics.hd95_per_class`
    says what empty masks score.

    Args:
        timings: when given, each case's prediction time in seconds (sliding windows over the whole volume) is
            appended to it.
        postprocess: the classes whose largest connected component alone is kept, on the preprocessed grid
            (:mod:`core.evaluation.postprocess`).

    Returns:
        ``(dice, hd95)``, each (N_cases, K-1).
    """
    from core.evaluation.geometry import original_label, original_spacing, to_original_geometry

    dice, hd95 = [], []
    for case_id in case_ids:
        prediction = _predict(model, store, case_id, inference, device, amp, timings)
        prediction = keep_largest_component(prediction, postprocess)
        attrs = store.case_attrs(case_id)
        label, spacing = store.read_label(case_id), attrs["spacing"]
        if original:
            reference = original_label(store, case_id)
            if reference is None:
                raise TrainingError(
                    f"case '{case_id}': its original label file {attrs['source_files'][-1]} is not at hand to score "
                    "in the original geometry"
                )
            prediction = to_original_geometry(
                prediction, attrs["affine"], attrs["original_affine"], attrs["original_shape"]
            )
            label, spacing = reference, original_spacing(attrs["original_affine"])
        dice.append(dice_per_class(prediction, label, num_classes))
        hd95.append(hd95_per_class(prediction, label, num_classes, spacing))
    model.train()
    return np.asarray(dice, dtype=np.float64), np.asarray(hd95, dtype=np.float64)


def _predict(
    model: nn.Module,
    store: TeacherStore,
    case_id: str,
    inference: InferenceConfig,
    device: torch.device,
    amp: bool,
    timings: list[float] | None = None,
) -> np.ndarray:
    """The model's class map of one stored case, on the preprocessed grid (sliding windows over the whole volume)."""
    started = time.perf_counter()
    logits = predict_volume(model, store.read_image(case_id), inference, device, amp=amp)["logits"]
    if timings is not None:
        timings.append(time.perf_counter() - started)
    return logits.argmax(0)


def choose_postprocessing(run: TrainingRun) -> dict[str, Any] | None:
    """With held-out cases, which classes' largest connected component to keep (decided on those cases alone,
    :func:`core.evaluation.postprocess.choose_largest_component`); ``None`` without held-out cases. ``run.model``
    holds the headline weights."""
    if not run.holdout_cases:
        return None
    predictions = [
        _predict(run.model, run.store, c, run.inference, run.device, run.cfg.amp) for c in run.holdout_cases
    ]
    labels = [run.store.read_label(c) for c in run.holdout_cases]
    run.model.train()
    return choose_largest_component(predictions, labels, run.num_classes)


def _score(run: TrainingRun, case_ids: list[str], **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`evaluate` of ``run.model`` on ``case_ids`` with the run's settings."""
    return evaluate(
        run.model, run.store, case_ids, run.inference, run.num_classes, run.device, run.cfg.amp, **options
    )


def _validation_columns(run: TrainingRun, dice: list[Any], mean_dice: Any, mean_hd95: Any) -> dict[str, Any]:
    """The validation columns of a ``metrics.csv`` row (``""`` values: not validated that epoch)."""
    return {
        **{f"val_dice_{n}": d for n, d in zip(run.foreground_names, dice, strict=True)},
        "val_mean_dice": mean_dice,
        "val_mean_hd95": mean_hd95,
    }


def validate_epoch(run: TrainingRun, state: RunState, epoch: int, row: dict[str, Any], staging: Path) -> None:
    """Score the model after ``epoch`` and keep what the scores choose.

    Fills ``row``'s validation (and held-out) columns; updates ``state.last``, ``state.best`` (writing
    ``checkpoint_best.pth`` when it improves), ``state.selected`` (``checkpoint_selected.pth``), ``state.stale`` and
    ``state.latency``.
    """
    timings: list[float] = []
    case_dice, case_hd95 = _score(run, run.val_cases, timings=timings)
    state.latency = float(np.mean(timings)) if timings else state.latency
    per_class = case_dice.mean(axis=0).tolist()
    scores = Scores(epoch, float(np.mean(per_class)), per_class, case_dice, case_hd95)
    row.update(_validation_columns(run, per_class, scores.mean_dice, float(case_hd95.mean())))
    state.last = scores
    if scores.mean_dice > state.best.mean_dice:
        state.best = Scores(epoch, scores.mean_dice, per_class)
        save_model(
            run, staging / BEST_CHECKPOINT, scores, {"selection": "best on the validation cases (optimistic)"}
        )
    if not run.holdout_cases:
        return
    held, held_hd95 = _score(run, list(run.holdout_cases))
    held_dice = float(held.mean(axis=0).mean())
    state.last_holdout = Scores(epoch, held_dice, held.mean(axis=0).tolist(), held, held_hd95)
    row["holdout_mean_dice"] = held_dice
    if held_dice > state.selected.holdout_mean_dice:
        state.selected = replace(scores, holdout_mean_dice=held_dice)
        save_model(
            run,
            staging / SELECTED_CHECKPOINT,
            scores,
            {
                "holdout_mean_dice": held_dice,
                "holdout_cases": list(run.holdout_cases),
                "selection": "best on the held-out training cases",
                # per foreground class: what teacher_weights 'class_dice' weighs a teacher by (after the fields
                # older checkpoints have, which keep their order)
                "holdout_dice_per_class": held.mean(axis=0).tolist(),
            },
        )
    state.stale = epoch - state.selected.epoch


def skip_validation(run: TrainingRun, row: dict[str, Any]) -> None:
    """Fill ``row``'s validation (and held-out) columns with ``""``: not validated this epoch."""
    row.update(_validation_columns(run, [""] * len(run.foreground_names), "", ""))
    if run.holdout_cases:
        row["holdout_mean_dice"] = ""


@dataclass(frozen=True)
class Headline:
    """The run's headline model and its scores.

    Attributes:
        kind: ``"final"`` (the final model) or ``"holdout"`` (the epoch chosen on the held-out cases).
        checkpoint: its file name in the run folder.
        scores: its validation scores (per case: (N_cases, K-1)).
        evaluated_in: ``"preprocessed grid"``, or ``"original geometry"`` when scored again there.
    """

    kind: str
    checkpoint: str
    scores: Scores
    evaluated_in: str = "preprocessed grid"


def choose_headline(run: TrainingRun, state: RunState, staging: Path) -> Headline:
    """The headline, chosen without the validation cases: the epoch selected on the held-out cases when there are
    some, else the final model; with ``run.original_geometry`` scored once more in the original geometry (the
    selected weights are then loaded into ``run.model``, which holds the headline's weights on return)."""
    if run.holdout_cases:
        headline = Headline("holdout", SELECTED_CHECKPOINT, state.selected)
        run.model.load_state_dict(load_checkpoint(staging / SELECTED_CHECKPOINT).state_dict)
    else:
        headline = Headline("final", FINAL_CHECKPOINT, state.last)
    if not run.original_geometry:
        return headline
    case_dice, case_hd95 = _score(run, run.val_cases, original=True)
    per_class = case_dice.mean(axis=0).tolist()
    scores = replace(
        headline.scores,
        mean_dice=float(np.mean(per_class)),
        dice_per_class=per_class,
        case_dice=case_dice,
        case_hd95=case_hd95,
    )
    return replace(headline, scores=scores, evaluated_in="original geometry")


def final_holdout_scores(run: TrainingRun, state: RunState) -> Scores | None:
    """The final model's scores on the held-out training cases (what a screening compares recipes on: no epoch is
    chosen on them); ``None`` without held-out cases. Call before the headline's weights are loaded."""
    if not run.holdout_cases:
        return None
    if state.last_holdout is not None and state.last_holdout.epoch == state.last.epoch:
        return state.last_holdout
    held, held_hd95 = _score(run, list(run.holdout_cases))
    return Scores(
        state.last.epoch, float(held.mean(axis=0).mean()), held.mean(axis=0).tolist(), held, held_hd95
    )


def write_per_case_csv(path: Path, run: TrainingRun, scores: Scores, cases: list[str] | None = None) -> None:
    """``validation_per_case.csv``: Dice and HD95 (mm) per validation case (or ``cases``) and foreground class, and
    their means."""
    names = run.foreground_names
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "case",
                *(f"dice_{n}" for n in names),
                "mean_dice",
                *(f"hd95_mm_{n}" for n in names),
                "mean_hd95_mm",
            ]
        )
        rows = zip(cases or run.val_cases, scores.case_dice, scores.case_hd95, strict=True)
        for case_id, one_dice, one_hd in rows:
            writer.writerow(
                [
                    case_id,
                    *(f"{d:.6f}" for d in one_dice),
                    f"{float(np.mean(one_dice)):.6f}",
                    *(f"{h:.4f}" for h in one_hd),
                    f"{float(np.mean(one_hd)):.4f}",
                ]
            )


def score_postprocessed(run: TrainingRun, headline: Headline, classes: Sequence[int]) -> Scores:
    """The headline's validation scores once more with ``classes``' largest component kept (in the geometry the
    headline was scored in); ``run.model`` holds the headline weights."""
    case_dice, case_hd95 = _score(
        run, run.val_cases, original=headline.evaluated_in == "original geometry", postprocess=classes
    )
    per_class = case_dice.mean(axis=0).tolist()
    return replace(
        headline.scores,
        mean_dice=float(np.mean(per_class)),
        dice_per_class=per_class,
        case_dice=case_dice,
        case_hd95=case_hd95,
    )
