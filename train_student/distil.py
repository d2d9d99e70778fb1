"""Train the student for one fold from the store: segmentation loss plus the configured distillation terms."""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch

from core.config import Config
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
from core.losses.distillation import TERMS, build_objective
from core.models import ModelSpec, TapRecorder, create_model, get_spec
from core.models.checkpoint import file_sha256
from core.store.teacher_store import TeacherStore, entry_hash, entry_key_difference
from core.teachers.online import OnlineTargets
from core.training.loop import FitResult, TrainingRun, fit, run_seed

__all__ = ["RawDataChangedWarning", "TapGridWarning", "distil", "raw_dataset_status", "student_run"]


def _check_teachers(
    cfg: Config,
    store: TeacherStore,
    fold: int,
    train: list[str],
    val: list[str],
    allow_leakage: bool,
) -> dict[str, list[str] | None]:
    """Refuse teachers that are not (fully) cached, cached from other settings or weights, or trained on ``val``.

    Every entry the run reads (one per teacher and training case; validation scores the student against labels
    only) must be complete and carry the ``entry_hash`` that this config and the teacher's checkpoint give
    (:func:`core.experiment.entry_key`). The checkpoint's hash is the file's when it is present, else the one the
    teacher's provenance records (a store copied to another machine without the checkpoints). Attributes only: no
    array is read.

    Returns:
        Per teacher key (``<name>/fold_<k>`` or ``<name>/all_folds``), the validation cases it was trained on
        (``None`` when its checkpoint did not record its training cases, so leakage could not be checked).
    """
    leakage: dict[str, list[str] | None] = {}
    for configured in cfg.distilled_teachers():
        teacher, name = configured.for_fold(fold), configured.store_key(fold)
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
        _check_entries(store, name, train, entry_key(cfg, teacher, sha, store))
        trained_on = prov.get("train_cases")
        leaked = sorted(set(trained_on) & set(val)) if trained_on is not None else None
        if leaked and not allow_leakage:
            raise StoreError(
                f"teacher '{name}' was trained on {len(leaked)} validation case(s) of this fold "
                f"({', '.join(leaked[:3])}{'…' if len(leaked) > 3 else ''}): its targets would leak the validation "
                "labels. Use teachers trained on this fold's training cases, or pass --allow-leakage (recorded in "
                "the run's outputs)"
            )
        leakage[name] = leaked
    return leakage


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
    store: TeacherStore, teachers: list[str], needs: frozenset[str], patch_size: tuple[int, ...]
) -> None:
    """Warn when a map-based term would compare maps of one cell per axis on a training patch.

    A normalised map of one cell is the same for every network, so an attention or relation term on it is exactly
    zero (SwinUNETR's stride-32 coarse map on a 32³ patch): the term costs time and teaches nothing.
    """
    used = {tap for tap in ("coarse", "fine") if {tap, f"{tap}_sketch", f"{tap}_features"} & needs}
    for name in teachers:
        taps = store.teacher_metadata(name).get("taps", {})
        for tap in sorted(used):
            stride = taps.get(tap, {}).get("stride")
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
                    stacklevel=2,
                )


def _tap_channels(
    cfg: Config,
    store: TeacherStore,
    model: torch.nn.Module,
    spec: ModelSpec,
    in_channels: int,
    case_id: str,
    fold: int,
) -> dict[str, Any]:
    """Tap widths of the student (one forward pass on a zero patch) and of each teacher (its sketches' records)."""
    with TapRecorder(model, spec.taps) as recorder, torch.no_grad():
        model.eval()(torch.zeros(1, in_channels, *cfg.training.patch_size))
    model.train()
    student = {tap: int(f.shape[1]) for tap, f in recorder.features.items()}
    teachers = {}
    for t in cfg.distilled_teachers():
        key = t.store_key(fold)
        store.teacher_metadata(key)  # StoreError "not cached: run make cache"
        sketch = store.entry_attrs(key, case_id).get("sketch") if store.has_entry(key, case_id) else None
        if not sketch:
            raise StoreError(
                f"the configured feature terms need feature sketches, which {key} was cached without; set "
                "store.feature_sketch_channels and re-run `make cache`"
            )
        teachers[key] = {tap: int(sketch[tap]["channels_in"]) for tap in ("coarse", "fine")}
    return {"student": student, "teachers": teachers}


def _refuse_offline_only_terms(dcfg: Any) -> None:
    """Online teachers give softmax and attention maps; terms on cached feature sketches need the store."""
    from core.terms import ONLINE_KINDS

    offline = [t.name for t in dcfg.terms if t.weight > 0 and not TERMS[t.name].needs <= ONLINE_KINDS]
    if offline:
        raise ConfigError(
            f"distillation terms {', '.join(offline)} read the store's feature sketches, which online teachers do "
            "not produce; online distillation trains softmax and attention terms (teachformer, pwd-only, "
            "afs-only, cwd, dist). Use distillation.source: cache for these"
        )


def _online_teachers(
    cfg: Config, fold: int, val: list[str], in_channels: int, num_classes: int
) -> tuple[
    list[tuple[str, torch.nn.Module, ModelSpec]], dict[str, float | None], dict[str, str], dict[str, Any]
]:
    """Load fold ``fold``'s distilled teachers from their checkpoints, for online distillation.

    Returns:
        ``(teachers, dice, sha256, leakage)``: ``(key, model, spec)`` per teacher; each teacher's held-out Dice (for
        ``teacher_weights: dice``); each checkpoint's SHA-256; per teacher, the validation cases it was trained on.

    Raises:
        CheckpointError: a checkpoint is missing, unsafe, or does not fit its architecture.
        ConfigError: a fixed-input teacher (UNETR) whose input size is not the training patch size.
    """
    from core.models.checkpoint import build_from_checkpoint

    live, dice, shas, leakage = [], {}, {}, {}
    for configured in cfg.distilled_teachers():
        teacher, key = configured.for_fold(fold), configured.store_key(fold)
        if teacher.kind != "registry":
            raise ConfigError(
                f"teacher '{teacher.name}' is fed its own inputs ({teacher.kind}): online distillation runs teachers "
                "on the student's patches of the store's grid, which is not what it was trained on; distil from the "
                "cache (distillation.source: cache)"
            )
        spec = get_spec(teacher.arch)
        fixed = spec.input_size(teacher.args)
        if fixed is not None and tuple(fixed) != tuple(cfg.training.patch_size):
            raise ConfigError(
                f"teacher '{teacher.name}' ({teacher.arch}) only accepts inputs of {tuple(fixed)}, but online "
                f"distillation feeds it the training patches of {tuple(cfg.training.patch_size)}; use the cache, or "
                "set training.patch_size to its input size"
            )
        model, ckpt = build_from_checkpoint(
            teacher.checkpoint, teacher.arch, in_channels, num_classes, teacher.args
        )
        live.append((key, model, spec))
        shas[key] = file_sha256(teacher.checkpoint)
        held = ckpt.meta.get("holdout_mean_dice")
        dice[key] = float(held) if held is not None else None
        trained_on = ckpt.meta.get("train_cases")
        leakage[key] = sorted(set(trained_on) & set(val)) if trained_on is not None else None
    return live, dice, shas, leakage


def _refuse_unknown_dice(
    dcfg: Any, keys: list[str], teacher_dice: dict[str, float | None], fold: int
) -> None:
    """``teacher_weights: dice`` needs each teacher's Dice on cases held out of its own training."""
    unknown = [t for t in keys if teacher_dice.get(t) is None]
    for term in dcfg.terms:
        if term.teacher_weights == "dice" and term.weight > 0 and unknown:
            raise ConfigError(
                f"distillation term '{term.name}' weighs teachers by their Dice on cases held out of their own "
                f"training, which is not recorded for {', '.join(unknown)} (a teacher's Dice on fold {fold}'s "
                "validation cases is never used: the student is scored there). Train the teachers with "
                "training.holdout > 0 (`make teachers`, then `make cache`), or use teacher_weights 'uniform' or "
                "'confidence'"
            )


def _refuse_leakage(leakage: dict[str, Any], fold: int, allow_leakage: bool) -> None:
    for key, leaked in leakage.items():
        if leaked and not allow_leakage:
            raise StoreError(
                f"teacher '{key}' was trained on {len(leaked)} validation case(s) of fold {fold} "
                f"({', '.join(leaked[:3])}{'…' if len(leaked) > 3 else ''}): its targets would leak the validation "
                "labels. Use teachers trained on this fold's training cases, or pass --allow-leakage (recorded in "
                "the run's outputs)"
            )


def _teacher_dice(store: TeacherStore, keys: list[str], val: list[str]) -> dict[str, float | None]:
    """Each teacher's Dice for ``teacher_weights: dice``, measured on cases the student is not scored on.

    The Dice on the cases held out of the teacher's own training (``training.holdout``, recorded as
    ``holdout_mean_dice``); for a teacher trained elsewhere, the validation Dice its checkpoint records when its
    validation cases are known and none is one of ``val``. ``None`` when neither is available.
    """
    dice: dict[str, float | None] = {}
    for key in keys:
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
        The :class:`~core.training.loop.TrainingRun`; its files go to ``runs_dir/students/kd-<kind>/fold_<k>/``.

    Raises:
        StoreError: no store, a stale store or checkpoint, teachers not (fully) cached or cached from other
            settings — each says to run ``make cache`` — teachers trained on validation cases (leakage) without
            ``allow_leakage``, or a ``splits.file`` that disagrees with the store's folds.
    """
    dcfg = cfg.distillation if kd is None else cfg.distillation.model_copy(update={"kind": kd})
    if source is not None:
        dcfg = dcfg.model_copy(update={"source": source})
    online = dcfg.source == "online" and dcfg.kind != "none"
    if online:
        _refuse_offline_only_terms(dcfg)
    repeat = seed is not None and seed != cfg.training.seed
    if repeat:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"seed": seed})})
    store = open_store_for(cfg)
    train, val = fold_split(cfg, store, fold)
    raw_dataset = raw_dataset_status(cfg, store)
    meta = store.metadata["dataset"]
    in_channels, class_names = len(meta["channel_names"]), meta["class_names"]
    keys = [t.store_key(fold) for t in cfg.distilled_teachers()]
    device = resolve_device(cfg.training.device)
    live: list[tuple[str, torch.nn.Module, ModelSpec]] = []
    if online:
        live, teacher_dice, shas, leakage = _online_teachers(cfg, fold, val, in_channels, len(class_names))
    else:
        teacher_dice = _teacher_dice(store, keys, val)
    spec = get_spec(cfg.student.arch)
    seed = run_seed(cfg.seed, cfg.training.seed)
    fit_cases, holdout = holdout_split(train, cfg.training.holdout, seed)
    torch.manual_seed(seed)
    model = create_model(cfg.student.arch, in_channels, len(class_names), cfg.student.args)
    channels = None
    if dcfg.kind != "none" and any(TERMS[t.name].needs_channels for t in dcfg.terms):
        channels = _tap_channels(cfg, store, model, spec, in_channels, train[0], fold)
    loss = build_objective(dcfg, cfg.training.focal_gamma, teacher_dice, channels)
    request = None
    teachers: list[str] = []
    if not online:
        leakage: dict[str, list[str] | None] = {}
        shas: dict[str, str] = {}
    if loss.uses_teachers and online:
        _refuse_unknown_dice(dcfg, keys, teacher_dice, fold)
        teachers = keys
        _refuse_leakage(leakage, fold, allow_leakage)
        request = TargetRequest(
            teachers=tuple(teachers),
            temperature=dcfg.temperature,
            softmax="softmax" in loss.needs,
            attention=bool({"coarse", "fine"} & loss.needs),
        )
    elif loss.uses_teachers:
        teachers = keys
        if not teachers:
            raise ConfigError("distillation terms are configured but no teachers are")
        if not store.teacher_keys():
            raise StoreError(
                f"{store.location} holds no teacher outputs yet; run `make cache FOLD={fold}` before `make distil`"
            )
        leakage = _check_teachers(cfg, store, fold, train, val, allow_leakage)
        _refuse_unknown_dice(dcfg, keys, teacher_dice, fold)
        if {"coarse_sketch", "fine_sketch", "coarse_features", "fine_features"} & loss.needs:
            lacking = [t for t in teachers if not store.has_sketch(t, train[0], "fine")]
            if lacking:
                raise StoreError(
                    f"the configured relation terms need feature sketches, which {', '.join(lacking)} were cached "
                    "without; set store.feature_sketch_channels and re-run `make cache`"
                )
        request = TargetRequest(
            teachers=tuple(teachers),
            temperature=dcfg.temperature,
            softmax="softmax" in loss.needs,
            attention=bool({"coarse", "fine"} & loss.needs),
            sketches=bool({"coarse_sketch", "fine_sketch"} & loss.needs),
            features=bool({"coarse_features", "fine_features"} & loss.needs),
        )
        _warn_small_tap_grids(store, teachers, loss.needs, cfg.training.patch_size)

    for case_id in val:
        check_window(spec, cfg.inference, store.case_shape(case_id), cfg.student.args, taps=False)
    dataset = training_patches(store.location, fit_cases, cfg.training, seed, None if online else request)
    out_dir = student_dir(
        cfg, f"{dcfg.kind}-online" if online else dcfg.kind, fold, cfg.training.seed if repeat else None
    )
    target_source = None
    if request is not None and online:
        target_source = OnlineTargets(live, request, dcfg.attention.p, device, cfg.training.amp)
    elif request is not None:
        target_source = lambda batch: targets_from_batch(batch, request, device)  # noqa: E731
    return TrainingRun(
        name=f"student kd-{dcfg.kind}{'-online' if online else ''}",
        model=model,
        spec=spec,
        args=cfg.student.args,
        in_channels=in_channels,
        num_classes=len(class_names),
        dataset=dataset,
        store=store,
        val_cases=val,
        cfg=cfg.training,
        inference=cfg.inference,
        loss_fn=loss,
        out_dir=out_dir,
        checkpoint_path=None,
        holdout_cases=holdout,
        skip_done=skip_done,
        original_geometry=raw_dataset == "matches",
        device=device,
        target_source=target_source,
        capture_taps=bool(
            {"coarse", "fine", "coarse_sketch", "fine_sketch", "coarse_features", "fine_features"}
            & loss.needs
        ),
        meta={
            "role": "student",
            "fold": fold,
            "train_cases": train,  # the fold's training cases, held-out ones included
            "fit_cases": fit_cases,
            "val_cases": val,
            "class_names": class_names,
            "distillation": dcfg.model_dump(mode="json"),
            "teachers": shas
            if online
            else {t: store.teacher_metadata(t)["checkpoint_sha256"] for t in teachers},
            "source": "online" if online else "cache",
            "allow_leakage": allow_leakage,
            "leaked_val_cases": leakage,
            "splits_from": store.location,  # the store's own folds (train_cases / val_cases above)
            "splits_file": str(cfg.splits.file) if cfg.splits.file else None,
            "store": store.location,
            "preprocessing_hash": cfg.preprocessing_hash(),
            "raw_dataset": raw_dataset,
            "seed": seed,
            "experiment_seed": cfg.seed,
            "training_seed": cfg.training.seed,
        },
        # what `teachcache predict` and `export-model` need to feed the student as it was trained, so a run folder
        # alone (without its config or store) predicts: already in the run key through the store and settings
        recorded={
            "channel_names": list(meta["channel_names"]),
            "preprocessing": store.metadata["preprocessing"],
            "inference": cfg.inference.model_dump(mode="json"),
            "patch_size": list(cfg.training.patch_size),
        },
    )
