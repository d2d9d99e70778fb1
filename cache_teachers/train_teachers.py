"""Train the demo teachers for one fold (no pretrained weights can be downloaded here).

Uses the same loop as students (``core.training.loop.fit``) with the segmentation loss only. A real user skips this
and points each teacher's ``checkpoint`` at their own trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import Config, TeacherConfig
from core.data.patches import training_patches
from core.data.splits import holdout_split
from core.errors import CheckpointError, ConfigError
from core.experiment import fold_split, open_store_for, raw_dataset_status, splits_path, teacher_dir
from core.inference import check_window, resolve_device
from core.losses.distillation import DistillationObjective
from core.losses.segmentation import SegmentationLoss
from core.models import create_model, get_spec
from core.models.checkpoint import load_checkpoint
from core.paths import require_writable
from core.store.teacher_store import TeacherStore
from core.training.loop import fit
from core.training.run import FitResult, TrainingRun, run_seed

__all__ = ["train_teachers"]


def _refuse_foreign_checkpoint(path: Path, name: str, fold: int, run_dir: Path) -> None:
    """Training writes the teacher's ``checkpoint`` path: never over weights it did not make for this fold."""
    if not path.is_file() or path.resolve().is_relative_to(run_dir.resolve()):
        return
    try:
        meta = load_checkpoint(path).meta
    except CheckpointError:
        meta = {}
    if meta.get("role") != "teacher" or meta.get("fold") != fold:
        made = f"fold {meta.get('fold')}" if meta.get("role") == "teacher" else "not by `teachcache teachers`"
        raise CheckpointError(
            f"teacher '{name}': training fold {fold} would overwrite {path}, which holds weights made {made}; "
            f"point teachers[{name}].checkpoint at a path of this fold (e.g. inside {run_dir}) or move the file"
        )


@dataclass(frozen=True)
class _Fold:
    """What every teacher of one fold trains and is scored on.

    Attributes:
        number: the fold.
        store: the store holding the preprocessed cases.
        train: the fold's training cases (held-out ones included).
        val: its validation cases.
        original_geometry: the raw dataset matches the store, so the headline is scored in original geometry.
    """

    number: int
    store: TeacherStore
    train: list[str]
    val: list[str]
    original_geometry: bool


def train_teachers(
    cfg: Config,
    fold: int,
    names: list[str] | None = None,
    progress: bool = True,
    skip_done: bool = False,
) -> list[FitResult]:
    """Train each configured teacher (or those in ``names``) on ``fold``'s training cases.

    Each checkpoint is written to the teacher's ``checkpoint`` path (``{fold}`` replaced by ``fold``): the final model,
    or the epoch chosen on the cases ``training.holdout`` carves out of the fold's training cases, whose Dice is
    then the teacher's for ``teacher_weights: dice``. It records the architecture, its arguments, the fold and the
    exact training cases (for the store's leakage check).

    Raises:
        StoreError: the store is missing or stale (run ``teachcache preprocess``).
        ConfigError: an unknown teacher name, or window settings a network cannot use.
    """
    store = open_store_for(cfg)
    train, val = fold_split(cfg, store, fold)
    cases = _Fold(fold, store, train, val, raw_dataset_status(cfg, store) == "matches")
    teachers = _teachers_to_train(cfg, fold, names)
    for teacher in teachers:  # before the first epoch: a teacher trained for nothing is an hour lost
        require_writable(
            teacher.checkpoint.parent,
            f"the checkpoint of teacher '{teacher.name}'",
            "point teachers[].checkpoint at a writable place",
        )
        require_writable(
            teacher_dir(cfg, teacher.name, fold).parent,
            f"the run folder of teacher '{teacher.name}'",
            "point output.runs_dir at a writable place",
        )
    # each run is built just before it trains: its seeded initialisation follows the previous teacher's training
    return [fit(_teacher_run(cfg, teacher, cases, skip_done), progress=progress) for teacher in teachers]


def _teachers_to_train(cfg: Config, fold: int, names: list[str] | None) -> list[TeacherConfig]:
    """The teachers named (all when ``names`` is empty), for ``fold``; pretrained ones are refused."""
    teachers = (
        [cfg.teacher(n).for_fold(fold) for n in names] if names else [t.for_fold(fold) for t in cfg.teachers]
    )
    pretrained = [t.name for t in teachers if t.kind != "registry"]
    if pretrained:
        raise ConfigError(
            f"teacher(s) {', '.join(pretrained)} are pretrained (a MONAI bundle, or fed their own preprocessing): "
            "`teachcache teachers` trains only registered networks on the store's volumes; name the others with -t, "
            "or cache the pretrained ones directly (`make cache`)"
        )
    return teachers


def _teacher_run(cfg: Config, teacher: TeacherConfig, fold: _Fold, skip_done: bool) -> TrainingRun:
    """One teacher's training run on ``fold``, its network initialised from the run's seed."""
    out_dir = teacher_dir(cfg, teacher.name, fold.number)
    _refuse_foreign_checkpoint(teacher.checkpoint, teacher.name, fold.number, out_dir)
    spec, inference = get_spec(teacher.arch), cfg.inference_for(teacher)
    for case_id in fold.val:
        check_window(
            spec,
            inference,
            fold.store.case_shape(case_id),
            teacher.args,
            taps=False,
            name=teacher.name,
            case_id=case_id,
        )
    seed = run_seed(cfg.seed, teacher.training.seed)
    fit_cases, holdout = holdout_split(fold.train, teacher.training.holdout, seed)
    dataset = fold.store.metadata["dataset"]
    in_channels, class_names = len(dataset["channel_names"]), dataset["class_names"]
    torch.manual_seed(seed)
    return TrainingRun(
        name=f"teacher {teacher.name}",
        model=create_model(teacher.arch, in_channels, len(class_names), teacher.args),
        spec=spec,
        args=teacher.args,
        in_channels=in_channels,
        num_classes=len(class_names),
        dataset=training_patches(fold.store.location, fit_cases, teacher.training, seed),
        store=fold.store,
        val_cases=fold.val,
        cfg=teacher.training,
        inference=inference,
        loss_fn=DistillationObjective(SegmentationLoss(teacher.training.focal_gamma), []),
        out_dir=out_dir,
        checkpoint_path=teacher.checkpoint,
        device=resolve_device(teacher.training.device),
        holdout_cases=holdout,
        skip_done=skip_done,
        original_geometry=fold.original_geometry,
        meta={
            "role": "teacher",
            "teacher": teacher.name,
            "fold": fold.number,
            "train_cases": fold.train,  # the fold's training cases, held-out ones included
            "fit_cases": fit_cases,
            "val_cases": fold.val,
            "class_names": class_names,
            "splits_file": str(splits_path(cfg)),
            "preprocessing_hash": cfg.preprocessing_hash(),
            "seed": seed,
        },
    )
