"""Train the student for one fold from the store: segmentation loss plus the configured distillation terms.

:func:`student_run` resolves the fold's teachers once (:class:`~train_student.fold.FoldTeachers`), checks them where
the recipe reads them (the store's entries, :mod:`train_student.from_cache`, or the checkpoints of teachers run in
memory, :mod:`train_student.online`), builds the student and its objective, and hands
:func:`core.training.loop.fit` a :class:`~core.training.run.TrainingRun`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from core.config import Config
from core.data.patches import targets_from_batch, training_patches
from core.experiment import student_dir
from core.inference import check_window
from core.losses.distillation import build_objective
from core.models import create_model
from core.source_code import code_version
from core.teachers.context import ContextTargets, ContextTeacher
from core.teachers.online import OnlineTargets
from core.terms import builds_with_channels
from core.training.loop import fit
from core.training.run import FitResult, TargetSource, TrainingRun
from train_student.fold import Recipe, StudentFold, TeacherDice, TeacherReads, cached_alignment
from train_student.from_cache import cache_reads, cached_teacher_dice, tap_channels
from train_student.integrity import check_chunks
from train_student.online import LiveTeachers, load_live_teachers, online_reads

__all__ = ["distil", "student_run"]


def distil(
    cfg: Config,
    fold: int,
    kd: str | None = None,
    progress: bool = True,
    allow_leakage: bool = False,
    skip_done: bool = False,
    seed: int | None = None,
    source: str | None = None,
    skip_integrity_check: bool = False,
) -> FitResult:
    """Train ``cfg.student`` on ``fold``'s training cases, reading only the store.

    The run is :func:`student_run`'s (every argument but ``progress`` is its), trained by :func:`core.training.loop.fit`.
    """
    return fit(
        student_run(cfg, fold, kd, allow_leakage, skip_done, seed, source, skip_integrity_check),
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
    skip_integrity_check: bool = False,
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
        source: override ``distillation.source``: ``"cache"`` (targets from the store), ``"online-patch"`` (or
            ``"online"``: the fold's teachers in memory compute them on each augmented batch; runs go to
            ``kd-<kind>-online-patch/``) or ``"online-context"`` (the teachers run the cache's windows around each
            patch; ``kd-<kind>-online-context/``).
        skip_integrity_check: do not check, before training, the digests of the chunks the run reads
            (:func:`train_student.integrity.check_chunks`); a warning says so.

    Returns:
        The :class:`~core.training.run.TrainingRun`; its files go to ``runs_dir/students/kd-<kind>/fold_<k>/``.

    Raises:
        StoreError: no store, a stale store or checkpoint, teachers not (fully) cached or cached from other
            settings — each says to run ``make cache`` — teachers trained on validation cases (leakage) without
            ``allow_leakage``, a ``splits.file`` that disagrees with the store's folds, or a chunk the run would
            read that is lost, moved from another case or teacher, or damaged.
    """
    recipe = Recipe.of(cfg.distillation, kd, source)
    run = StudentFold.open(cfg, fold, seed)
    live = load_live_teachers(run, recipe.mode) if recipe.online else None
    teacher_dice = live.dice if live is not None else cached_teacher_dice(run.store, run.teachers, run.val)
    model, loss = _student_and_objective(run, recipe, teacher_dice)
    if live is not None:
        reads = online_reads(run, recipe, live, allow_leakage)
    else:
        reads = cache_reads(run, recipe, teacher_dice, allow_leakage)
    read_entries = list(reads.checkpoints) if reads.request is not None and live is None else []
    store_check = check_chunks(
        run.store, [*run.train, *run.val], run.fit_cases, read_entries, skip=skip_integrity_check
    )
    spec, inference = run.student_spec, run.cfg.inference
    for case_id in run.val:  # the student's window fits every validation case, checked before training
        check_window(spec, inference, run.store.case_shape(case_id), run.cfg.student.args, taps=False)
    training = _training_run(run, recipe, model, loss, reads, live, allow_leakage, skip_done)
    training.recorded["store_check"] = store_check.to_dict() if store_check is not None else None
    return training


def _student_and_objective(
    run: StudentFold, recipe: Recipe, teacher_dice: TeacherDice
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student, initialised from the run's seed, and its objective (built with the tap widths its terms need)."""
    cfg, dcfg = run.cfg, recipe.config
    torch.manual_seed(run.seed)
    model = create_model(cfg.student.arch, run.in_channels, len(run.class_names), cfg.student.args)
    channels = None
    if dcfg.kind != "none" and builds_with_channels(t.name for t in dcfg.terms):
        channels = tap_channels(run, model, run.student_spec)
    return model, build_objective(
        dcfg, cfg.training.focal_gamma, teacher_dice.mean, channels, teacher_dice.per_class
    )


def _targets(
    run: StudentFold, recipe: Recipe, reads: TeacherReads, live: LiveTeachers | None
) -> tuple[TargetSource | None, ContextTargets | None, OnlineTargets | None]:
    """Where the run's targets come from: ``(source, context, online)``.

    ``source`` turns a batch into targets: the cached (or context-computed) maps the patches carry, or the patch-mode
    teachers run on the augmented batch. ``context`` computes each patch's targets in the patch dataset (context
    mode); ``online`` is the patch-mode source. Both online ones clock their teachers' forward passes.
    """
    if reads.request is None:
        return None, None, None
    p = recipe.config.attention.p
    if live is not None and recipe.mode == "patch":
        online = OnlineTargets(live.models, reads.request, p, run.device, run.cfg.training.amp)
        return online, None, online
    context = None
    if live is not None:
        teachers = [ContextTeacher(key, m, spec, live.inference[key]) for key, m, spec in live.models]
        context = ContextTargets(teachers, reads.request, p, run.device, run.cfg.training.amp)
    return partial(targets_from_batch, request=reads.request, device=run.device), context, None


def _training_run(
    run: StudentFold,
    recipe: Recipe,
    model: torch.nn.Module,
    loss: torch.nn.Module,
    reads: TeacherReads,
    live: LiveTeachers | None,
    allow_leakage: bool,
    skip_done: bool,
) -> TrainingRun:
    """The checked pieces as one :class:`~core.training.run.TrainingRun`, with what its key and records hold."""
    cfg, store = run.cfg, run.store
    source, context, online = _targets(run, recipe, reads, live)
    cached = reads.request is not None and live is None
    return TrainingRun(
        name=f"student kd-{recipe.run_kind}",
        model=model,
        spec=run.student_spec,
        args=cfg.student.args,
        in_channels=run.in_channels,
        num_classes=len(run.class_names),
        dataset=training_patches(
            store.location,
            run.fit_cases,
            cfg.training,
            run.seed,
            None if online is not None else reads.request,
            context=context,
            # every arm draws the patches of the fold's cached run (no distillation and online alike)
            align=None if cached else cached_alignment(run, recipe.twin_needed),
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
        target_source=source,
        teacher_clock=context or online,
        capture_taps=recipe.needed.student_taps,
        meta=_run_meta(run, recipe, reads, allow_leakage),
        # what `teachcache predict` and `export-model` need to feed the student as it was trained, so a run folder
        # alone (without its config or store) predicts: already in the run key through the store and settings
        recorded={
            "channel_names": list(run.channel_names),
            "preprocessing": store.metadata["preprocessing"],
            "inference": cfg.inference.model_dump(mode="json"),
            "patch_size": list(cfg.training.patch_size),
            # provenance the cross-validation report checks before pooling runs (docs/evaluation.md)
            "code": code_version(),
            "teacher_entry_keys": reads.entry_keys,
        },
    )


def _run_meta(run: StudentFold, recipe: Recipe, reads: TeacherReads, allow_leakage: bool) -> dict[str, Any]:
    """What the run is, recorded in its checkpoints and summary, and hashed into its run key."""
    cfg, store = run.cfg, run.store
    return {
        "role": "student",
        "fold": run.fold,
        "train_cases": run.train,  # the fold's training cases, held-out ones included
        "fit_cases": run.fit_cases,
        "val_cases": run.val,
        "class_names": run.class_names,
        "distillation": recipe.config.key_fields(),
        "teachers": reads.checkpoints,
        "source": recipe.config.source if recipe.online else "cache",
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
