"""Targets from teachers in memory (online distillation): the fold's teachers loaded from their checkpoints and
checked for what the recipe reads; they then compute the targets on each augmented batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.config import TeacherConfig
from core.data.patches import TargetRequest
from core.errors import ConfigError
from core.models import ModelSpec, get_spec
from core.models.checkpoint import build_from_checkpoint, file_sha256
from train_student.fold import (
    Recipe,
    StudentFold,
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
        dice: each teacher's held-out Dice (for ``teacher_weights: dice``); ``None`` when not recorded.
        checkpoints: each checkpoint's SHA-256.
        leakage: per teacher, the validation cases it was trained on (``None``: not recorded).
    """

    models: list[tuple[str, torch.nn.Module, ModelSpec]] = field(default_factory=list)
    dice: dict[str, float | None] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    leakage: dict[str, list[str] | None] = field(default_factory=dict)


def _online_spec(teacher: TeacherConfig, patch_size: tuple[int, ...]) -> ModelSpec:
    """A teacher's registry entry, when it can run online: on the student's patches of the store's grid.

    Raises:
        ConfigError: a teacher fed its own inputs, or a fixed-input teacher (UNETR) whose input size is not
            ``patch_size``.
    """
    if teacher.kind != "registry":
        raise ConfigError(
            f"teacher '{teacher.name}' is fed its own inputs ({teacher.kind}): online distillation runs teachers "
            "on the student's patches of the store's grid, which is not what it was trained on; distil from the "
            "cache (distillation.source: cache)"
        )
    spec = get_spec(teacher.arch)
    fixed = spec.input_size(teacher.args)
    if fixed is not None and tuple(fixed) != tuple(patch_size):
        raise ConfigError(
            f"teacher '{teacher.name}' ({teacher.arch}) only accepts inputs of {tuple(fixed)}, but online "
            f"distillation feeds it the training patches of {tuple(patch_size)}; use the cache, or "
            "set training.patch_size to its input size"
        )
    return spec


def load_live_teachers(run: StudentFold) -> LiveTeachers:
    """Load the fold's distilled teachers from their checkpoints, for online distillation.

    Raises:
        CheckpointError: a checkpoint is missing, unsafe, or does not fit its architecture.
        ConfigError: a teacher fed its own inputs, or a fixed-input teacher (UNETR) whose input size is not the
            training patch size.
    """
    live = LiveTeachers()
    for resolved in run.teachers.teachers:
        teacher, key = resolved.config, resolved.key
        spec = _online_spec(teacher, run.cfg.training.patch_size)
        model, ckpt = build_from_checkpoint(
            teacher.checkpoint, teacher.arch, run.in_channels, len(run.class_names), teacher.args
        )
        live.models.append((key, model, spec))
        live.checkpoints[key] = file_sha256(teacher.checkpoint)
        held = ckpt.meta.get("holdout_mean_dice")
        live.dice[key] = float(held) if held is not None else None
        live.leakage[key] = leaked_cases(ckpt.meta.get("train_cases"), run.val)
    return live


def online_reads(run: StudentFold, recipe: Recipe, live: LiveTeachers, allow_leakage: bool) -> TeacherReads:
    """Check the loaded teachers for what the recipe reads; the request they then compute on each batch.

    Raises:
        ConfigError: ``teacher_weights: dice`` without each teacher's held-out Dice.
        StoreError: a teacher trained on validation cases, without ``allow_leakage``.
    """
    reads = TeacherReads(live.checkpoints, live.leakage)
    if recipe.needed.any:
        refuse_unknown_dice(recipe.config, run.teachers, live.dice)
        for key, leaked in live.leakage.items():
            refuse_leakage(key, leaked, f"fold {run.fold}", allow_leakage)
        reads.request = TargetRequest.for_recipe(run.teachers.keys, recipe.config.temperature, recipe.needed)
    return reads
