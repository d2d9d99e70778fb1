"""One student run's fold: the recipe it trains, the fold's teachers resolved once, and the checks both sources share.

:class:`FoldTeachers` binds each distilled teacher to the fold (its checkpoint and store key) once per run; every
check of the run (:mod:`train_student.from_cache`, :mod:`train_student.online`) takes it. What a recipe reads of its
teachers follows from its terms alone (:func:`core.terms.targets_needed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.config import Config, DistillationConfig, TeacherConfig
from core.data.patches import TargetRequest, fine_alignment
from core.data.splits import holdout_split
from core.errors import ConfigError, StoreError
from core.experiment import fold_split, open_store_for, raw_dataset_status
from core.inference import resolve_device
from core.models import ModelSpec, get_spec
from core.store.teacher_store import TeacherStore
from core.terms import TargetsNeeded, targets_needed
from core.training.run import run_seed

__all__ = [
    "FoldTeachers",
    "Recipe",
    "ResolvedTeacher",
    "StudentFold",
    "TeacherDice",
    "TeacherReads",
    "cached_alignment",
    "leaked_cases",
    "refuse_leakage",
    "refuse_unknown_dice",
]


@dataclass(frozen=True)
class Recipe:
    """The distillation a run trains: the config's, with the ``kd`` and ``source`` overrides applied.

    Attributes:
        config: the distillation settings (``source`` ``"online"`` read as ``"online-patch"``).
        online: the fold's teachers run in memory instead of being read from the store.
        needed: what its terms read of the teachers (nothing when ``kind`` is ``none``).
        twin_needed: what the config's own recipe reads: the cached run every arm of the fold is paired with, whose
            patches they all draw (:func:`cached_alignment`).
    """

    config: DistillationConfig
    online: bool
    needed: TargetsNeeded
    twin_needed: TargetsNeeded

    @classmethod
    def of(cls, distillation: DistillationConfig, kd: str | None, source: str | None) -> Recipe:
        """The recipe with its overrides; terms online teachers cannot serve are refused here, before anything is read.

        Raises:
            ConfigError: an online recipe with a term on the store's feature sketches.
        """
        dcfg = distillation if kd is None else distillation.model_copy(update={"kind": kd})
        if source is not None:
            dcfg = dcfg.model_copy(update={"source": "online-patch" if source == "online" else source})
        online = dcfg.source != "cache" and dcfg.kind != "none"
        if online:
            _refuse_offline_only_terms(dcfg)
        terms = [] if dcfg.kind == "none" else [(t.name, t.weight) for t in dcfg.terms]
        twin = targets_needed([(t.name, t.weight) for t in distillation.terms])
        return cls(dcfg, online, targets_needed(terms), twin)

    @property
    def mode(self) -> str | None:
        """``"patch"`` or ``"context"`` when distilled online, else ``None``."""
        return self.config.online_mode if self.online else None

    @property
    def run_kind(self) -> str:
        """The run's kind in its name and folder: ``<kind>``, or ``<kind>-online-patch`` / ``-online-context``."""
        return f"{self.config.kind}-online-{self.mode}" if self.online else self.config.kind


def _refuse_offline_only_terms(dcfg: DistillationConfig) -> None:
    """Online teachers give softmax and attention maps; terms on cached feature sketches need the store."""
    offline = [t.name for t in dcfg.terms if targets_needed([(t.name, t.weight)]).offline_only]
    if offline:
        raise ConfigError(
            f"distillation terms {', '.join(offline)} read the store's feature sketches, which online teachers do "
            f"not produce (distillation.source: {dcfg.source}); online distillation, patch or context, trains "
            "softmax and attention terms (teachformer, pwd-only, afs-only, cwd, dist). Use distillation.source: "
            "cache for these"
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
class StudentFold:
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
    def open(cls, cfg: Config, fold: int, seed: int | None) -> StudentFold:
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
class TeacherReads:
    """The teachers as the run reads them, checked.

    Attributes:
        checkpoints: per teacher key, the SHA-256 of the checkpoint its targets come from (recorded in ``meta``).
        leakage: per teacher key, the validation cases it was trained on (``None``: not recorded).
        request: the targets each batch carries; ``None`` when the recipe reads no teacher.
        entry_keys: per teacher key, the entry key (:func:`core.experiment.entry_key`) of the store entries its
            targets are (cached), or that the cache would write for that teacher and these settings (online);
            recorded by the run, and checked by the cross-validation report before it pools runs.
    """

    checkpoints: dict[str, str] = field(default_factory=dict)
    leakage: dict[str, list[str] | None] = field(default_factory=dict)
    request: TargetRequest | None = None
    entry_keys: dict[str, dict[str, Any]] = field(default_factory=dict)


def leaked_cases(trained_on: list[str] | None, val: list[str]) -> list[str] | None:
    """The validation cases a teacher was trained on; ``None`` when its training cases are not recorded."""
    return sorted(set(trained_on) & set(val)) if trained_on is not None else None


def refuse_leakage(key: str, leaked: list[str] | None, where: str, allow_leakage: bool) -> None:
    """Refuse a teacher trained on validation cases of ``where`` (the fold), unless ``allow_leakage``."""
    if leaked and not allow_leakage:
        raise StoreError(
            f"teacher '{key}' was trained on {len(leaked)} validation case(s) of {where} "
            f"({', '.join(leaked[:3])}{'…' if len(leaked) > 3 else ''}): its targets would leak the validation "
            "labels. Use teachers trained on this fold's training cases, or pass --allow-leakage (recorded in "
            "the run's outputs)"
        )


@dataclass
class TeacherDice:
    """Each teacher's Dice on cases held out of its own training, for Dice-weighted teachers.

    Attributes:
        mean: the mean over foreground classes (``teacher_weights: dice``); ``None`` when not recorded.
        per_class: per foreground class (``teacher_weights: class_dice``); ``None`` when not recorded.
    """

    mean: dict[str, float | None] = field(default_factory=dict)
    per_class: dict[str, list[float] | None] = field(default_factory=dict)

    def record(self, key: str, provenance: dict[str, Any]) -> None:
        """Read ``holdout_mean_dice`` and ``holdout_dice_per_class`` from a checkpoint's meta or a store's
        provenance."""
        held, per_class = provenance.get("holdout_mean_dice"), provenance.get("holdout_dice_per_class")
        self.mean[key] = float(held) if held is not None else None
        self.per_class[key] = [float(d) for d in per_class] if per_class else None


def refuse_unknown_dice(
    dcfg: DistillationConfig, teachers: FoldTeachers, dice: TeacherDice, num_classes: int | None = None
) -> None:
    """``teacher_weights: dice`` (``class_dice``) needs each teacher's (per-class) Dice on cases held out of its own
    training — for ``class_dice``, one per foreground class of the ``num_classes``."""
    for term in dcfg.terms:
        if term.weight == 0 or term.teacher_weights not in ("dice", "class_dice"):
            continue
        known = dice.mean if term.teacher_weights == "dice" else dice.per_class
        unknown = [t for t in teachers.keys if known.get(t) is None]
        if unknown:
            what = "Dice" if term.teacher_weights == "dice" else "per-class Dice"
            raise ConfigError(
                f"distillation term '{term.name}' weighs teachers by their {what} on cases held out of their own "
                f"training, which is not recorded for {', '.join(unknown)} (a teacher's Dice on fold {teachers.fold}'s "
                "validation cases is never used: the student is scored there). Train the teachers with "
                "training.holdout > 0 (`make teachers`, then `make cache`), or use teacher_weights 'uniform' or "
                "'confidence'"
            )
        if term.teacher_weights == "class_dice" and num_classes is not None:
            wrong = {
                t: len(d) for t, d in dice.per_class.items() if d is not None and len(d) != num_classes - 1
            }
            if wrong:
                raise ConfigError(
                    f"distillation term '{term.name}' weighs teachers by their per-class Dice, but "
                    + ", ".join(f"{t} recorded {n}" for t, n in wrong.items())
                    + f" classes where this dataset has {num_classes - 1} foreground classes; those teachers were "
                    "trained on another task: re-train them on this dataset"
                )


def cached_alignment(run: StudentFold, needed: TargetsNeeded) -> int | TargetRequest | None:
    """Where the patches of the fold's cached run with a recipe reading ``needed`` start (its fine maps' stride).

    Every student arm of a fold — without distillation, cached, online — passes this to its patches, so with the
    same seed they all draw the same boxes and augmentations: the arms then differ only in their targets. For
    registered networks on the store's grid read for their attention maps, their fine taps' stride (what the cached
    maps have, on every case); otherwise, when the teachers are cached, the cached run's own request (its maps'
    strides read case by case, as that run reads them); ``None`` (the patch dataset's own rule) for a teacher fed
    its own way and not cached.
    """
    if not (needed.attention or needed.sketches or needed.features):
        return 1
    teachers = run.teachers.teachers
    registry = all(t.config.kind == "registry" for t in teachers)
    if registry and not (needed.sketches or needed.features):
        return fine_alignment([get_spec(t.config.arch).taps["fine"].stride for t in teachers])
    if not run.fit_cases:
        return None  # the patch dataset refuses an empty training set with its own message
    first, keys = run.fit_cases[0], run.teachers.keys
    cached = all(run.store.has_entry(key, first) for key in keys) and (
        not (needed.sketches or needed.features) or all(run.store.has_sketch(k, first, "fine") for k in keys)
    )
    if cached:
        return TargetRequest.for_recipe(keys, 1.0, needed)
    return (
        fine_alignment([get_spec(t.config.arch).taps["fine"].stride for t in teachers]) if registry else None
    )
