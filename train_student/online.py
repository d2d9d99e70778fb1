"""Targets from teachers in memory (online distillation): the fold's teachers loaded from their checkpoints and
checked for what the recipe reads. In ``patch`` mode they then compute the targets on each augmented batch
(:class:`core.teachers.online.OnlineTargets`); in ``context`` mode on the cache's windows around each patch, before
its augmentation (:class:`core.teachers.context.ContextTargets`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.config import InferenceConfig, TeacherConfig
from core.data.patches import TargetRequest
from core.errors import ConfigError
from core.experiment import entry_key
from core.inference import check_window
from core.models import ModelSpec, get_spec
from core.models.checkpoint import build_from_checkpoint, file_sha256
from train_student.fold import (
    Recipe,
    StudentFold,
    TeacherDice,
    TeacherReads,
    leaked_cases,
    refuse_leakage,
    refuse_unknown_dice,
)

__all__ = ["LiveTeachers", "load_live_teachers", "online_reads"]


@dataclass
class LiveTeachers:
    """The fold's teachers loaded from their checkpoints, for online distillation.

    Attributes:
        models: ``(key, model, spec)`` per teacher.
        inference: each teacher's sliding window (the cache's: context mode runs it).
        dice: each teacher's held-out Dice, mean and per class (for ``teacher_weights: dice``, ``class_dice``).
        checkpoints: each checkpoint's SHA-256.
        leakage: per teacher, the validation cases it was trained on (``None``: not recorded).
    """

    models: list[tuple[str, torch.nn.Module, ModelSpec]] = field(default_factory=list)
    inference: dict[str, InferenceConfig] = field(default_factory=dict)
    dice: TeacherDice = field(default_factory=TeacherDice)
    checkpoints: dict[str, str] = field(default_factory=dict)
    leakage: dict[str, list[str] | None] = field(default_factory=dict)


def _online_spec(run: StudentFold, teacher: TeacherConfig, mode: str) -> ModelSpec:
    """A teacher's registry entry, when it can run online on the store's grid: on the student's patches (``patch``),
    or with its cached sliding window over every training case (``context``).

    Raises:
        ConfigError: a teacher fed its own inputs; in patch mode a fixed-input teacher (UNETR) whose input size is
            not the training patch size; in context mode a window it cannot run on a training case.
    """
    if teacher.kind != "registry":
        raise ConfigError(
            f"teacher '{teacher.name}' is fed its own inputs ({teacher.kind}): online distillation runs teachers "
            "on the store's grid, which is not what it was trained on; distil from the cache "
            "(distillation.source: cache)"
        )
    spec = get_spec(teacher.arch)
    if mode == "context":
        inference = run.cfg.inference_for(teacher)
        for case_id in run.fit_cases:
            shape = run.store.case_shape(case_id)
            check_window(spec, inference, shape, teacher.args, name=teacher.name, case_id=case_id)
        return spec
    patch_size = run.cfg.training.patch_size
    fixed = spec.input_size(teacher.args)
    if fixed is not None and tuple(fixed) != tuple(patch_size):
        raise ConfigError(
            f"teacher '{teacher.name}' ({teacher.arch}) only accepts inputs of {tuple(fixed)}, but online "
            f"distillation feeds it the training patches of {tuple(patch_size)}; use the cache, or "
            "set training.patch_size to its input size"
        )
    return spec


def load_live_teachers(run: StudentFold, mode: str = "patch") -> LiveTeachers:
    """Load the fold's distilled teachers from their checkpoints, for online distillation in ``mode``.

    Raises:
        CheckpointError: a checkpoint is missing, unsafe, or does not fit its architecture.
        ConfigError: a teacher fed its own inputs; in patch mode a fixed-input teacher (UNETR) whose input size is
            not the training patch size; in context mode a sliding window it cannot run on a training case.
    """
    live = LiveTeachers()
    for resolved in run.teachers.teachers:
        teacher, key = resolved.config, resolved.key
        spec = _online_spec(run, teacher, mode)
        live.inference[key] = run.cfg.inference_for(teacher)
        model, ckpt = build_from_checkpoint(
            teacher.checkpoint, teacher.arch, run.in_channels, len(run.class_names), teacher.args
        )
        live.models.append((key, model, spec))
        live.checkpoints[key] = file_sha256(teacher.checkpoint)
        live.dice.record(key, ckpt.meta)
        live.leakage[key] = leaked_cases(ckpt.meta.get("train_cases"), run.val)
    return live


def online_reads(run: StudentFold, recipe: Recipe, live: LiveTeachers, allow_leakage: bool) -> TeacherReads:
    """Check the loaded teachers for what the recipe reads; the request they then compute on each batch.

    Raises:
        ConfigError: ``teacher_weights: dice`` (``class_dice``) without each teacher's held-out (per-class) Dice.
        StoreError: a teacher trained on validation cases, without ``allow_leakage``.
    """
    reads = TeacherReads(live.checkpoints, live.leakage)
    configs = {t.key: t.config for t in run.teachers.teachers}
    reads.entry_keys = {  # what the cache would write for these teachers: pairs the run with its cached twin
        key: entry_key(run.cfg, configs[key], sha, run.store) for key, sha in live.checkpoints.items()
    }
    if recipe.needed.any:
        refuse_unknown_dice(recipe.config, run.teachers, live.dice, len(run.class_names))
        for key, leaked in live.leakage.items():
            refuse_leakage(key, leaked, f"fold {run.fold}", allow_leakage)
        reads.request = TargetRequest.for_recipe(run.teachers.keys, recipe.config.temperature, recipe.needed)
    return reads
