"""Train the student for one fold from the store: segmentation loss plus the configured distillation terms.

:func:`student_run` resolves the fold's teachers once (:class:`FoldTeachers`), checks them where the recipe reads
them (the store's entries, or the checkpoints of teachers run in memory), builds the student and its objective, and
hands :func:`core.training.loop.fit` a :class:`~core.training.run.TrainingRun`. What the recipe reads of its
teachers follows from its terms alone (:func:`core.terms.targets_needed`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from core.config import Config, DistillationConfig, TeacherConfig
from core.data.patches import TargetRequest, targets_from_batch, training_patches
from core.data.splits import holdout_split
from core.errors import ConfigError, StoreError
from core.experiment import (
    RawDataChangedWarning,
    entry_key,
    fold_split,
    open_store_for,
    raw_dataset_status,
    student_dir,
)
from core.inference import check_window, resolve_device
from core.losses.distillation import build_objective
from core.models import ModelSpec, TapRecorder, create_model, get_spec
from core.models.checkpoint import file_sha256
from core.store.provenance import entry_hash, entry_key_difference
from core.store.teacher_store import TeacherStore
from core.teachers.online import OnlineTargets
from core.terms import TargetsNeeded, builds_with_channels, targets_needed
from core.training.loop import fit
from core.training.run import FitResult, TargetSource, TrainingRun, run_seed

__all__ = [
    "FoldTeachers",
    "RawDataChangedWarning",
    "ResolvedTeacher",
    "TapGridWarning",
    "distil",
    "raw_dataset_status",
    "student_run",
]


# --- what the run distils, and from which teachers -----------------------------------------------------------------


@dataclass(frozen=True)
class _Recipe:
    """The distillation a run trains: the config's, with the ``kd`` and ``source`` overrides applied.

    Attributes:
        config: the distillation settings.
        online: the fold's teachers run in memory instead of being read from the store.
        needed: what its terms read of the teachers (nothing when ``kind`` is ``none``).
    """

    config: DistillationConfig
    online: bool
    needed: TargetsNeeded

    @classmethod
    def of(cls, distillation: DistillationConfig, kd: str | None, source: str | None) -> _Recipe:
        """The recipe with its overrides; terms online teachers cannot serve are refused here, before anything is read.

        Raises:
            ConfigError: an online recipe with a term on the store's feature sketches.
        """
        dcfg = distillation if kd is None else distillation.model_copy(update={"kind": kd})
        if source is not None:
            dcfg = dcfg.model_copy(update={"source": source})
        online = dcfg.source == "online" and dcfg.kind != "none"
        if online:
            _refuse_offline_only_terms(dcfg)
        terms = [] if dcfg.kind == "none" else [(t.name, t.weight) for t in dcfg.terms]
        return cls(dcfg, online, targets_needed(terms))

    @property
    def run_kind(self) -> str:
        """The run's kind in its name and folder: ``<kind>``, or ``<kind>-online``."""
        return f"{self.config.kind}-online" if self.online else self.config.kind


def _refuse_offline_only_terms(dcfg: DistillationConfig) -> None:
    """Online teachers give softmax and attention maps; terms on cached feature sketches need the store."""
    offline = [t.name for t in dcfg.terms if targets_needed([(t.name, t.weight)]).offline_only]
    if offline:
        raise ConfigError(
            f"distillation terms {', '.join(offline)} read the store's feature sketches, which online teachers do "
            "not produce; online distillation trains softmax and attention terms (teachformer, pwd-only, "
            "afs-only, cwd, dist). Use distillation.source: cache for these"
        )


@dataclass(frozen=True)
class ResolvedTeacher:
    """One distilled teacher bound to a fold.

    Attributes:
        config: the teacher with ``{fold}`` in its checkpoint path replaced (:meth:`TeacherConfig.for_fold`).
        key: where its entries live in the store: ``<name>/fold_<k>`` or ``<name>/all_folds``.
    """

    config: TeacherConfig
    key: str

    @property
    def checkpoint(self) -> Path:
        return self.config.checkpoint


@dataclass(frozen=True)
class FoldTeachers:
    """A fold's distilled teachers, resolved once per run; every check of the run takes this.

    Attributes:
        fold: the cross-validation fold.
        teachers: ``distillation.teachers`` (default all), in the config's order.
    """

    fold: int
    teachers: tuple[ResolvedTeacher, ...]

    @classmethod
    def resolve(cls, cfg: Config, fold: int) -> FoldTeachers:
        return cls(
            fold,
            tuple(ResolvedTeacher(t.for_fold(fold), t.store_key(fold)) for t in cfg.distilled_teachers()),
        )

    @property
    def keys(self) -> list[str]:
        """The teachers' store keys: how targets, Dice and provenance name them."""
        return [t.key for t in self.teachers]


@dataclass(frozen=True)
class _StudentFold:
    """One fold as a student run sees it: the store, its cases, the teachers and the student's inputs.

    Attributes:
        cfg: the experiment, with the repeated run's ``training.seed`` when there is one.
        store: the store the cases (and cached targets) are read from.
        train: the fold's training cases, held-out ones included.
        val: the fold's validation cases (the student is scored there).
        fit_cases: the training cases the student trains on.
        holdout_cases: the training cases held out to choose the headline checkpoint (``training.holdout``).
        raw_dataset: :func:`core.experiment.raw_dataset_status` of the store.
        channel_names: the store's input channels (the student's inputs).
        class_names: the store's classes, background first.
        teachers: the fold's distilled teachers.
        seed: the run's seed (:func:`core.training.run.run_seed`).
        repeat: a repeat of the run with another ``training.seed`` (its own folder).
        device: where the student trains.
    """

    cfg: Config
    store: TeacherStore
    train: list[str]
    val: list[str]
    fit_cases: list[str]
    holdout_cases: list[str]
    raw_dataset: str
    channel_names: list[str]
    class_names: list[str]
    teachers: FoldTeachers
    seed: int
    repeat: bool
    device: torch.device

    @classmethod
    def open(cls, cfg: Config, fold: int, seed: int | None) -> _StudentFold:
        """Open the store for ``fold``; ``seed`` other than ``training.seed`` makes the run a repeat."""
        repeat = seed is not None and seed != cfg.training.seed
        if repeat:
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"seed": seed})})
        store = open_store_for(cfg)
        train, val = fold_split(cfg, store, fold)
        raw_dataset = raw_dataset_status(cfg, store)
        dataset = store.metadata["dataset"]
        teachers = FoldTeachers.resolve(cfg, fold)
        device = resolve_device(cfg.training.device)
        run = run_seed(cfg.seed, cfg.training.seed)
        fit_cases, holdout_cases = holdout_split(train, cfg.training.holdout, run)
        return cls(
            cfg=cfg,
            store=store,
            train=train,
            val=val,
            fit_cases=fit_cases,
            holdout_cases=holdout_cases,
            raw_dataset=raw_dataset,
            channel_names=dataset["channel_names"],
            class_names=dataset["class_names"],
            teachers=teachers,
            seed=run,
            repeat=repeat,
            device=device,
        )

    @property
    def fold(self) -> int:
        return self.teachers.fold

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def student_spec(self) -> ModelSpec:
        return get_spec(self.cfg.student.arch)


@dataclass
class _TeacherReads:
    """The teachers as the run reads them, checked.

    Attributes:
        checkpoints: per teacher key, the SHA-256 of the checkpoint its targets come from (recorded in ``meta``).
        leakage: per teacher key, the validation cases it was trained on (``None``: not recorded).
        request: the targets each batch carries; ``None`` when the recipe reads no teacher.
    """

    checkpoints: dict[str, str] = field(default_factory=dict)
    leakage: dict[str, list[str] | None] = field(default_factory=dict)
    request: TargetRequest | None = None


def _leaked(trained_on: list[str] | None, val: list[str]) -> list[str] | None:
    """The validation cases a teacher was trained on; ``None`` when its training cases are not recorded."""
    return sorted(set(trained_on) & set(val)) if trained_on is not None else None


def _refuse_leakage(key: str, leaked: list[str] | None, where: str, allow_leakage: bool) -> None:
    """Refuse a teacher trained on validation cases of ``where`` (the fold), unless ``allow_leakage``."""
    if leaked and not allow_leakage:
        raise StoreError(
            f"teacher '{key}' was trained on {len(leaked)} validation case(s) of {where} "
            f"({', '.join(leaked[:3])}{'…' if len(leaked) > 3 else ''}): its targets would leak the validation "
            "labels. Use teachers trained on this fold's training cases, or pass --allow-leakage (recorded in "
            "the run's outputs)"
        )


def _refuse_unknown_dice(
    dcfg: DistillationConfig, teachers: FoldTeachers, teacher_dice: dict[str, float | None]
) -> None:
    """``teacher_weights: dice`` needs each teacher's Dice on cases held out of its own training."""
    unknown = [t for t in teachers.keys if teacher_dice.get(t) is None]
    for term in dcfg.terms:
        if term.teacher_weights == "dice" and term.weight > 0 and unknown:
            raise ConfigError(
                f"distillation term '{term.name}' weighs teachers by their Dice on cases held out of their own "
                f"training, which is not recorded for {', '.join(unknown)} (a teacher's Dice on fold {teachers.fold}'s "
                "validation cases is never used: the student is scored there). Train the teachers with "
                "training.holdout > 0 (`make teachers`, then `make cache`), or use teacher_weights 'uniform' or "
                "'confidence'"
            )


# --- targets from the store ----------------------------------------------------------------------------------------


def _cached_teacher_dice(
    store: TeacherStore, teachers: FoldTeachers, val: list[str]
) -> dict[str, float | None]:
    """Each teacher's Dice for ``teacher_weights: dice``, measured on cases the student is not scored on.

    The Dice on the cases held out of the teacher's own training (``training.holdout``, recorded as
    ``holdout_mean_dice``); for a teacher trained elsewhere, the validation Dice its checkpoint records when its
    validation cases are known and none is one of ``val``. ``None`` when neither is available.
    """
    dice: dict[str, float | None] = {}
    for key in teachers.keys:
        if key not in store.teacher_keys():
            dice[key] = None
            continue
        prov = store.teacher_metadata(key)
        own_val = prov.get("val_cases")
        if prov.get("holdout_mean_dice") is not None:
            dice[key] = float(prov["holdout_mean_dice"])
        elif prov.get("val_mean_dice") is not None and own_val is not None and not set(own_val) & set(val):
            dice[key] = float(prov["val_mean_dice"])
        else:
            dice[key] = None
    return dice


def _check_cached_teacher(
    cfg: Config,
    store: TeacherStore,
    teacher: ResolvedTeacher,
    train: list[str],
    val: list[str],
    allow_leakage: bool,
) -> list[str] | None:
    """Refuse a teacher that is not (fully) cached, cached from other settings or weights, or trained on ``val``.

    Every entry the run reads (one per training case; validation scores the student against labels only) must be
    complete and carry the ``entry_hash`` that this config and the teacher's checkpoint give
    (:func:`core.experiment.entry_key`, computed once here for all its entries). The checkpoint's hash is the file's
    when it is present, else the one the teacher's provenance records (a store copied to another machine without the
    checkpoints). Attributes only: no array is read.

    Returns:
        The validation cases it was trained on (``None`` when its checkpoint did not record its training cases, so
        leakage could not be checked).
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
    _check_entries(store, name, train, entry_key(cfg, teacher.config, sha, store))
    leaked = _leaked(prov.get("train_cases"), val)
    _refuse_leakage(name, leaked, "this fold", allow_leakage)
    return leaked


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


def _cache_reads(
    run: _StudentFold, recipe: _Recipe, teacher_dice: dict[str, float | None], allow_leakage: bool
) -> _TeacherReads:
    """Check every entry the recipe reads from the store; the request the patches then carry.

    Raises:
        ConfigError: terms but no teachers, or ``teacher_weights: dice`` without each teacher's held-out Dice.
        StoreError: teachers not (fully) cached, cached from other settings or weights, cached without the feature
            sketches a term reads, or trained on validation cases without ``allow_leakage``.
    """
    store, teachers, needed = run.store, run.teachers, recipe.needed
    if not needed.any:
        return _TeacherReads()
    if not teachers.teachers:
        raise ConfigError("distillation terms are configured but no teachers are")
    if not store.teacher_keys():
        raise StoreError(
            f"{store.location} holds no teacher outputs yet; run `make cache FOLD={teachers.fold}` before `make distil`"
        )
    leakage = {
        t.key: _check_cached_teacher(run.cfg, store, t, run.train, run.val, allow_leakage)
        for t in teachers.teachers
    }
    _refuse_unknown_dice(recipe.config, teachers, teacher_dice)
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
    return _TeacherReads(checkpoints, leakage, request)


def _tap_channels(run: _StudentFold, model: torch.nn.Module, spec: ModelSpec) -> dict[str, Any]:
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


# --- targets from teachers in memory -------------------------------------------------------------------------------


@dataclass
class _LiveTeachers:
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


def _load_live_teachers(run: _StudentFold) -> _LiveTeachers:
    """Load the fold's distilled teachers from their checkpoints, for online distillation.

    Raises:
        CheckpointError: a checkpoint is missing, unsafe, or does not fit its architecture.
        ConfigError: a teacher fed its own inputs, or a fixed-input teacher (UNETR) whose input size is not the
            training patch size.
    """
    from core.models.checkpoint import build_from_checkpoint

    live = _LiveTeachers()
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
        live.leakage[key] = _leaked(ckpt.meta.get("train_cases"), run.val)
    return live


def _online_reads(
    run: _StudentFold, recipe: _Recipe, live: _LiveTeachers, allow_leakage: bool
) -> _TeacherReads:
    """Check the loaded teachers for what the recipe reads; the request they then compute on each batch.

    Raises:
        ConfigError: ``teacher_weights: dice`` without each teacher's held-out Dice.
        StoreError: a teacher trained on validation cases, without ``allow_leakage``.
    """
    reads = _TeacherReads(live.checkpoints, live.leakage)
    if recipe.needed.any:
        _refuse_unknown_dice(recipe.config, run.teachers, live.dice)
        for key, leaked in live.leakage.items():
            _refuse_leakage(key, leaked, f"fold {run.fold}", allow_leakage)
        reads.request = TargetRequest.for_recipe(run.teachers.keys, recipe.config.temperature, recipe.needed)
    return reads


# --- the run -------------------------------------------------------------------------------------------------------


def distil(
    cfg: Config,
    fold: int,
    kd: str | None = None,
    progress: bool = True,
    allow_leakage: bool = False,
    skip_done: bool = False,
    seed: int | None = None,
    source: str | None = None,
) -> FitResult:
    """Train ``cfg.student`` on ``fold``'s training cases, reading only the store.

    The run is :func:`student_run`'s (every argument but ``progress`` is its), trained by :func:`core.training.loop.fit`.
    """
    return fit(
        student_run(cfg, fold, kd, allow_leakage, skip_done, seed, source),
        progress=progress,
    )


def student_run(
    cfg: Config,
    fold: int,
    kd: str | None = None,
    allow_leakage: bool = False,
    skip_done: bool = False,
    seed: int | None = None,
    source: str | None = None,
) -> TrainingRun:
    """Everything a student's training needs, checked and built: model, loss, patches, target source, run folder.

    Args:
        cfg: the experiment.
        fold: cross-validation fold.
        kd: override ``distillation.kind`` (``"none"`` trains the baseline without distillation).
        allow_leakage: accept teachers whose training cases include this fold's validation cases; the leaked
            cases are recorded in the checkpoint and ``summary.json``.
        skip_done: return the finished run already in the run folder when it is this very run (``make cv``).
        seed: repeat the run with this ``training.seed`` (its folder: ``kd-<kind>/seed_<seed>/fold_<k>``); the
            config's own seed (or ``None``) trains into ``kd-<kind>/fold_<k>``.
        source: override ``distillation.source``: ``"cache"`` (targets from the store) or ``"online"`` (the fold's
            teachers in memory compute them on each augmented batch; runs go to ``kd-<kind>-online/``).

    Returns:
        The :class:`~core.training.run.TrainingRun`; its files go to ``runs_dir/students/kd-<kind>/fold_<k>/``.

    Raises:
        StoreError: no store, a stale store or checkpoint, teachers not (fully) cached or cached from other
            settings — each says to run ``make cache`` — teachers trained on validation cases (leakage) without
            ``allow_leakage``, or a ``splits.file`` that disagrees with the store's folds.
    """
    recipe = _Recipe.of(cfg.distillation, kd, source)
    run = _StudentFold.open(cfg, fold, seed)
    live = _load_live_teachers(run) if recipe.online else None
    teacher_dice = live.dice if live is not None else _cached_teacher_dice(run.store, run.teachers, run.val)
    model, loss = _student_and_objective(run, recipe, teacher_dice)
    if live is not None:
        reads = _online_reads(run, recipe, live, allow_leakage)
    else:
        reads = _cache_reads(run, recipe, teacher_dice, allow_leakage)
    spec, inference = run.student_spec, run.cfg.inference
    for case_id in run.val:  # the student's window fits every validation case, checked before training
        check_window(spec, inference, run.store.case_shape(case_id), run.cfg.student.args, taps=False)
    return _training_run(run, recipe, model, loss, reads, live, allow_leakage, skip_done)


def _student_and_objective(
    run: _StudentFold, recipe: _Recipe, teacher_dice: dict[str, float | None]
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student, initialised from the run's seed, and its objective (built with the tap widths its terms need)."""
    cfg, dcfg = run.cfg, recipe.config
    torch.manual_seed(run.seed)
    model = create_model(cfg.student.arch, run.in_channels, len(run.class_names), cfg.student.args)
    channels = None
    if dcfg.kind != "none" and builds_with_channels(t.name for t in dcfg.terms):
        channels = _tap_channels(run, model, run.student_spec)
    return model, build_objective(dcfg, cfg.training.focal_gamma, teacher_dice, channels)


def _target_source(
    run: _StudentFold, recipe: _Recipe, reads: _TeacherReads, live: _LiveTeachers | None
) -> TargetSource | None:
    """Batches into distillation targets: the live teachers' or the cached ones the patches carry."""
    if reads.request is None:
        return None
    if live is not None:
        return OnlineTargets(
            live.models, reads.request, recipe.config.attention.p, run.device, run.cfg.training.amp
        )
    return partial(targets_from_batch, request=reads.request, device=run.device)


def _training_run(
    run: _StudentFold,
    recipe: _Recipe,
    model: torch.nn.Module,
    loss: torch.nn.Module,
    reads: _TeacherReads,
    live: _LiveTeachers | None,
    allow_leakage: bool,
    skip_done: bool,
) -> TrainingRun:
    """The checked pieces as one :class:`~core.training.run.TrainingRun`, with what its key and records hold."""
    cfg, store = run.cfg, run.store
    return TrainingRun(
        name=f"student kd-{recipe.run_kind}",
        model=model,
        spec=run.student_spec,
        args=cfg.student.args,
        in_channels=run.in_channels,
        num_classes=len(run.class_names),
        dataset=training_patches(
            store.location, run.fit_cases, cfg.training, run.seed, None if recipe.online else reads.request
        ),
        store=store,
        val_cases=run.val,
        cfg=cfg.training,
        inference=cfg.inference,
        loss_fn=loss,
        out_dir=student_dir(cfg, recipe.run_kind, run.fold, cfg.training.seed if run.repeat else None),
        checkpoint_path=None,
        holdout_cases=run.holdout_cases,
        skip_done=skip_done,
        original_geometry=run.raw_dataset == "matches",
        device=run.device,
        target_source=_target_source(run, recipe, reads, live),
        capture_taps=recipe.needed.student_taps,
        meta=_run_meta(run, recipe, reads, allow_leakage),
        # what `teachcache predict` and `export-model` need to feed the student as it was trained, so a run folder
        # alone (without its config or store) predicts: already in the run key through the store and settings
        recorded={
            "channel_names": list(run.channel_names),
            "preprocessing": store.metadata["preprocessing"],
            "inference": cfg.inference.model_dump(mode="json"),
            "patch_size": list(cfg.training.patch_size),
        },
    )


def _run_meta(
    run: _StudentFold, recipe: _Recipe, reads: _TeacherReads, allow_leakage: bool
) -> dict[str, Any]:
    """What the run is, recorded in its checkpoints and summary, and hashed into its run key."""
    cfg, store = run.cfg, run.store
    return {
        "role": "student",
        "fold": run.fold,
        "train_cases": run.train,  # the fold's training cases, held-out ones included
        "fit_cases": run.fit_cases,
        "val_cases": run.val,
        "class_names": run.class_names,
        "distillation": recipe.config.model_dump(mode="json"),
        "teachers": reads.checkpoints,
        "source": "online" if recipe.online else "cache",
        "allow_leakage": allow_leakage,
        "leaked_val_cases": reads.leakage,
        "splits_from": store.location,  # the store's own folds (train_cases / val_cases above)
        "splits_file": str(cfg.splits.file) if cfg.splits.file else None,
        "store": store.location,
        "preprocessing_hash": cfg.preprocessing_hash(),
        "raw_dataset": run.raw_dataset,
        "seed": run.seed,
        "experiment_seed": cfg.seed,
        "training_seed": cfg.training.seed,
    }
