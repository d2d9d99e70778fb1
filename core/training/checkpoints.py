"""A run folder's files that outlive a process: the staging folder, its swap into place, and the checkpoints.

A run's folder is replaced as a whole or not at all: everything is written into a staging folder beside it
(``.<name>.partial``) and swapped in when the run ends (:func:`publish_run_dir`; :func:`recover_run_dir` mends a
swap cut between its two renames). After every epoch the staging folder gets ``checkpoint_latest.pth``
(:func:`save_latest`), from which a killed run of the same key resumes (:func:`resumable_state`). Model checkpoints
— final, selected on the held-out cases, best on validation — are written by one function, :func:`save_model`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from core.errors import TrainingError
from core.evaluation.provenance import dotted
from core.models.checkpoint import save_checkpoint
from core.training.run import FitResult, TrainingRun, run_fields
from core.training.state import RunState, Scores

__all__ = [
    "BEST_CHECKPOINT",
    "FINAL_CHECKPOINT",
    "LATEST_CHECKPOINT",
    "OWN_CHECKPOINTS",
    "SELECTED_CHECKPOINT",
    "ResumeDiscardedWarning",
    "finished_run",
    "publish_run_dir",
    "recover_run_dir",
    "resumable_state",
    "save_latest",
    "save_model",
    "staging_dir",
    "warn_if_discarding",
    "write_error",
]

LATEST_CHECKPOINT = "checkpoint_latest.pth"
FINAL_CHECKPOINT = "checkpoint_final.pth"
SELECTED_CHECKPOINT = "checkpoint_selected.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"
OWN_CHECKPOINTS = (FINAL_CHECKPOINT, SELECTED_CHECKPOINT, BEST_CHECKPOINT, LATEST_CHECKPOINT)


def staging_dir(out_dir: Path) -> Path:
    """Where a run into ``out_dir`` writes until it is published: ``.<name>.partial`` beside it."""
    return out_dir.parent / f".{out_dir.name}.partial"


def _replaced_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.replaced"


def recover_run_dir(out_dir: Path, keep_staging: bool = False) -> None:
    """Bring a run folder back to a whole state after a process was killed while writing or swapping it.

    A leftover staging folder (a run killed before it finished) is removed, unless ``keep_staging`` (to resume
    from it); a previous run set aside by a swap that was cut between its two renames is put back.
    """
    staging, replaced = staging_dir(out_dir), _replaced_dir(out_dir)
    if staging.exists() and not keep_staging:
        shutil.rmtree(staging)
    if replaced.exists():
        if out_dir.exists():
            shutil.rmtree(replaced)
        else:
            os.replace(replaced, out_dir)


def publish_run_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished staging folder in for ``out_dir`` (two renames; :func:`recover_run_dir` mends a cut)."""
    replaced = _replaced_dir(out_dir)
    if out_dir.exists():
        os.replace(out_dir, replaced)
    os.replace(staging, out_dir)
    if replaced.exists():
        shutil.rmtree(replaced)


def write_error(out_dir: Path, exc: OSError) -> TrainingError:
    """The error to raise when the run folder ``out_dir`` cannot be written (``exc`` says why)."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return TrainingError(
        f"cannot write the run folder {out_dir}: {exc.strerror or exc}{where}. Free space or fix permissions, or set "
        "output.runs_dir to a writable location; nothing of this run was published (a previous run there is kept)"
    )


class ResumeDiscardedWarning(UserWarning):
    """A killed run was found in the staging folder, made with other settings: it is discarded, training starts
    afresh."""


def _load_latest(staging: Path) -> Any:
    """The contents of the staging folder's ``checkpoint_latest.pth``; ``None`` when absent or unreadable."""
    path = staging / LATEST_CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable state is no state
        return None


def warn_if_discarding(staging: Path, run: TrainingRun, key: str) -> None:
    """Say what differs when a killed run of other settings is about to be discarded."""
    if not (staging / LATEST_CHECKPOINT).is_file():
        return
    state = _load_latest(staging)
    if isinstance(state, dict) and state.get("run_key") == key:
        return
    if not isinstance(state, dict):
        what = "is unreadable"
    elif "run_fields" not in state:
        what = "was written by an older TeachCache"
    else:
        before, now = dotted(json.loads(state["run_fields"])), dotted(run_fields(run))
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        what = f"differs in {', '.join(changed[:6])}{'…' if len(changed) > 6 else ''}"
    warnings.warn(
        ResumeDiscardedWarning(
            f"{run.name}: the killed run in {staging} {what} — it cannot be resumed with these settings, so it is "
            "discarded and training starts afresh (restore the old settings before re-running to resume it instead)"
        ),
        stacklevel=4,  # the caller of `fit` (fit → its staging preparation → here)
    )


def finished_run(out_dir: Path, key: str, exported: Path | None) -> FitResult | None:
    """The result of the finished run in ``out_dir`` when it is the run ``key`` describes, else ``None``."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("run_key") != key or (exported is not None and not exported.is_file()):
        return None
    names = {f.name for f in fields(FitResult)}
    return FitResult(**{k: v for k, v in summary.items() if k in names})


def resumable_state(staging: Path, key: str) -> dict[str, Any] | None:
    """The latest state of a killed run with the same key, or ``None`` (no partial run, or another run's)."""
    state = _load_latest(staging)
    return state if isinstance(state, dict) and state.get("run_key") == key else None


def save_latest(staging: Path, state: RunState) -> None:
    """Everything needed to continue after the state's last epoch, written atomically as the staging folder's
    ``checkpoint_latest.pth`` (loadable with ``weights_only=True``)."""
    path = staging / LATEST_CHECKPOINT
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state.to_checkpoint(), tmp)
    os.replace(tmp, path)


def save_model(run: TrainingRun, path: Path, scores: Scores, chosen: dict[str, Any]) -> None:
    """Write ``run.model`` as a checkpoint that records the run and the validation ``scores`` it was chosen with.

    Args:
        path: the checkpoint file (final, selected or best).
        scores: the validation scores of the epoch the weights are from.
        chosen: how the weights were chosen — ``selection`` (``"final"``, ``"best on the held-out training
            cases"``, …) and, with held-out cases, ``holdout_mean_dice`` and ``holdout_cases`` — in the order the
            checkpoint's ``meta`` lists them (each file keeps the order it always had, so its bytes do not change).
    """
    meta = {
        **run.recorded_fields,
        "epoch": scores.epoch,
        "val_mean_dice": scores.mean_dice,
        "val_dice": scores.dice_per_class,
        **chosen,
    }
    save_checkpoint(path, run.model, run.spec.name, run.in_channels, run.num_classes, run.args, meta)
