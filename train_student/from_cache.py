"""Targets from the store: every entry a recipe reads checked before training (complete, computed from this config
and checkpoint, with the sketches its terms need, not trained on the fold's validation cases)."""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch

from core.config import Config
from core.data.patches import TargetRequest
from core.errors import ConfigError, StoreError
from core.experiment import entry_key
from core.models import ModelSpec, TapRecorder
from core.models.checkpoint import file_sha256
from core.store.provenance import entry_hash, entry_key_difference
from core.store.teacher_store import TeacherStore
from train_student.fold import (
    FoldTeachers,
    Recipe,
    ResolvedTeacher,
    StudentFold,
    TeacherDice,
    TeacherReads,
    leaked_cases,
    refuse_leakage,
    refuse_unknown_dice,
)

__all__ = ["TapGridWarning", "cache_reads", "cached_teacher_dice", "tap_channels"]


def cached_teacher_dice(store: TeacherStore, teachers: FoldTeachers, val: list[str]) -> TeacherDice:
    """Each teacher's Dice for ``teacher_weights: dice`` and ``class_dice``, measured on cases the student is not
    scored on.

    The Dice on the cases held out of the teacher's own training (``training.holdout``, recorded as
    ``holdout_mean_dice`` and, per class, ``holdout_dice_per_class``); for a teacher trained elsewhere, the
    validation Dice its checkpoint records when its validation cases are known and none is one of ``val`` (the mean
    only). ``None`` when neither is available.
    """
    dice = TeacherDice()
    for key in teachers.keys:
        if key not in store.teacher_keys():
            dice.mean[key] = dice.per_class[key] = None
            continue
        prov = store.teacher_metadata(key)
        dice.record(key, prov)
        own_val = prov.get("val_cases")
        unseen = own_val is not None and not set(own_val) & set(
            val
        )  # the teacher's validation is not the student's
        if dice.mean[key] is None and prov.get("val_mean_dice") is not None and unseen:
            dice.mean[key] = float(prov["val_mean_dice"])
    return dice


def _check_cached_teacher(
    cfg: Config,
    store: TeacherStore,
    teacher: ResolvedTeacher,
    train: list[str],
    val: list[str],
    allow_leakage: bool,
) -> tuple[list[str] | None, dict[str, Any]]:
    """Refuse a teacher that is not (fully) cached, cached from other settings or weights, or trained on ``val``.

    Every entry the run reads (one per training case; validation scores the student against labels only) must be
    complete and carry the ``entry_hash`` that this config and the teacher's checkpoint give
    (:func:`core.experiment.entry_key`, computed once here for all its entries). The checkpoint's hash is the file's
    when it is present, else the one the teacher's provenance records (a store copied to another machine without the
    checkpoints). Attributes only: no array is read.

    Returns:
        The validation cases it was trained on (``None`` when its checkpoint did not record its training cases, so
        leakage could not be checked), and the entry key of its entries.
    """
    name = teacher.key
    prov = store.teacher_metadata(name)  # StoreError "not cached: run make cache FOLD=k"
    missing = [c for c in train if not store.has_entry(name, c)]
    if missing:
        raise StoreError(
            f"{store.location}: teacher '{name}' has no complete cache for {len(missing)} training case(s) "
            f"({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}); run `make cache` to finish it"
        )
    sha = prov["checkpoint_sha256"]
    if teacher.checkpoint.is_file():
        sha = file_sha256(teacher.checkpoint)
        if sha != prov["checkpoint_sha256"]:
            raise StoreError(
                f"teacher '{name}': {teacher.checkpoint} changed since it was cached (sha256 "
                f"{prov['checkpoint_sha256'][:12]}… in the store); the cache is stale — re-run `make cache`"
            )
    wanted = entry_key(cfg, teacher.config, sha, store)
    _check_entries(store, name, train, wanted)
    leaked = leaked_cases(prov.get("train_cases"), val)
    refuse_leakage(name, leaked, "this fold", allow_leakage)
    return leaked, wanted


def _check_entries(store: TeacherStore, teacher: str, cases: list[str], wanted: dict[str, Any]) -> None:
    """Refuse when any of ``cases``' entries of ``teacher`` was computed from another entry key than ``wanted``."""
    wanted_hash = entry_hash(wanted)
    stale: dict[str, list[str]] = {}  # case -> the key fields that differ
    for case_id in cases:
        attrs = store.entry_attrs(teacher, case_id)
        if attrs.get("entry_hash") != wanted_hash:
            stale[case_id] = entry_key_difference(attrs.get("entry_key"), wanted) or ["entry_hash"]
    if not stale:
        return
    examples = list(stale)[:3]
    fields = sorted({f for diff in stale.values() for f in diff})
    first = store.entry_attrs(teacher, examples[0]).get("entry_key")
    if not isinstance(first, dict):
        why = "cached before entries recorded what they were computed from"
    else:
        shown = [f for f in fields if f in wanted][:3]
        parts = [f"{f} ({_short(first.get(f))} in the store, {_short(wanted[f])} wanted)" for f in shown]
        why = "differs in " + ", ".join(parts + [f for f in fields if f not in shown])
    raise StoreError(
        f"{store.location}: teacher '{teacher}' has {len(stale)} of the {len(cases)} training case(s) of this "
        f"fold cached with other settings or weights than this config and checkpoint ({', '.join(examples)}"
        f"{'…' if len(stale) > len(examples) else ''}: {why}); run `make cache` to recompute them"
    )


def _short(value: Any) -> str:
    """A value for a one-line message: hashes cut to 12 characters."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"{text[:12]}…" if isinstance(value, str) and len(value) == 64 else text


class TapGridWarning(UserWarning):
    """A teacher's tap map covers a training patch with fewer than 2 cells on some axis: its term carries nothing."""


def _warn_small_tap_grids(
    store: TeacherStore, teachers: FoldTeachers, taps: tuple[str, ...], patch_size: tuple[int, ...]
) -> None:
    """Warn when a map-based term would compare maps of one cell per axis on a training patch.

    A normalised map of one cell is the same for every network, so an attention or relation term on it is exactly
    zero (SwinUNETR's stride-32 coarse map on a 32³ patch): the term costs time and teaches nothing.
    """
    for name in teachers.keys:
        recorded = store.teacher_metadata(name).get("taps", {})
        for tap in taps:
            stride = recorded.get(tap, {}).get("stride")
            if not stride:
                continue
            cells = [p // stride for p in patch_size]
            if min(cells) < 2:
                warnings.warn(
                    TapGridWarning(
                        f"teacher '{name}': its {tap} map (stride {stride}) covers a training patch of "
                        f"{tuple(patch_size)} with {'×'.join(map(str, cells))} cell(s), so its {tap} term compares "
                        f"one number per axis and carries nothing; raise training.patch_size to at least "
                        f"{2 * stride} on every axis, or leave that teacher or tap out (term args: taps)"
                    ),
                    stacklevel=3,
                )


def cache_reads(
    run: StudentFold, recipe: Recipe, teacher_dice: TeacherDice, allow_leakage: bool
) -> TeacherReads:
    """Check every entry the recipe reads from the store; the request the patches then carry.

    Raises:
        ConfigError: terms but no teachers, or ``teacher_weights: dice`` (``class_dice``) without each teacher's
            held-out (per-class) Dice.
        StoreError: teachers not (fully) cached, cached from other settings or weights, cached without the feature
            sketches a term reads, or trained on validation cases without ``allow_leakage``.
    """
    store, teachers, needed = run.store, run.teachers, recipe.needed
    if not needed.any:
        return TeacherReads()
    if not teachers.teachers:
        raise ConfigError("distillation terms are configured but no teachers are")
    if not store.teacher_keys():
        raise StoreError(
            f"{store.location} holds no teacher outputs yet; run `make cache FOLD={teachers.fold}` before `make distil`"
        )
    checked = {
        t.key: _check_cached_teacher(run.cfg, store, t, run.train, run.val, allow_leakage)
        for t in teachers.teachers
    }
    leakage = {key: leaked for key, (leaked, _) in checked.items()}
    refuse_unknown_dice(recipe.config, teachers, teacher_dice, len(run.class_names))
    if needed.sketches or needed.features:
        lacking = [t for t in teachers.keys if not store.has_sketch(t, run.train[0], "fine")]
        if lacking:
            raise StoreError(
                f"the configured relation terms need feature sketches, which {', '.join(lacking)} were cached "
                "without; set store.feature_sketch_channels and re-run `make cache`"
            )
    request = TargetRequest.for_recipe(teachers.keys, recipe.config.temperature, needed)
    _warn_small_tap_grids(store, teachers, needed.taps, run.cfg.training.patch_size)
    checkpoints = {t: store.teacher_metadata(t)["checkpoint_sha256"] for t in teachers.keys}
    return TeacherReads(checkpoints, leakage, request, {key: h for key, (_, h) in checked.items()})


def tap_channels(run: StudentFold, model: torch.nn.Module, spec: ModelSpec) -> dict[str, Any]:
    """Tap widths of the student (one forward pass on a zero patch) and of each teacher (its sketches' records)."""
    with TapRecorder(model, spec.taps) as recorder, torch.no_grad():
        model.eval()(torch.zeros(1, run.in_channels, *run.cfg.training.patch_size))
    model.train()
    student = {tap: int(f.shape[1]) for tap, f in recorder.features.items()}
    teachers = {}
    case_id, store = run.train[0], run.store
    for key in run.teachers.keys:
        store.teacher_metadata(key)  # StoreError "not cached: run make cache"
        sketch = store.entry_attrs(key, case_id).get("sketch") if store.has_entry(key, case_id) else None
        if not sketch:
            raise StoreError(
                f"the configured feature terms need feature sketches, which {key} was cached without; set "
                "store.feature_sketch_channels and re-run `make cache`"
            )
        teachers[key] = {tap: int(sketch[tap]["channels_in"]) for tap in ("coarse", "fine")}
    return {"student": student, "teachers": teachers}
