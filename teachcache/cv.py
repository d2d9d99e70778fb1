"""``make cv``: the whole chain — teachers, cache, no-KD student, distilled student — over the folds, resumable.

Each fold's teachers are trained (when the config trains them: their checkpoint for the fold is missing or was made
by ``teachcache teachers``), cached under ``<name>/fold_<k>``, and the fold's two students trained from the store.
Re-running skips every run already finished with the same settings (its ``run_key``) and every entry already cached,
and resumes a killed run from its last epoch; the cross-validation report is written at the end. With a ledger
(``output.results_dir``, :mod:`core.evaluation.ledger`), each finished run's records are kept there as it finishes,
and a fold whose every planned run the ledger holds with the same settings is skipped whole, teachers included.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import Config
from core.errors import ConfigError
from core.evaluation.ledger import FoldData, Ledger
from core.experiment import fold_split, open_store_for, store_splits, student_dir, teacher_dir
from core.user_cache import FileHashCache, default_hash_cache

__all__ = ["CvSummary", "planned_folder", "run_cv", "run_identity", "screening_config"]


@dataclass
class CvSummary:
    """The folds run, and per fold the runs trained or found finished (``"<run>: <headline Dice>"``)."""

    folds: list[int]
    runs: dict[int, list[str]] = field(default_factory=dict)


def _trains_teacher(cfg: Config, name: str, fold: int) -> bool:
    """A teacher is trained here when its fold checkpoint is missing or is one ``teachcache teachers`` made."""
    teacher = cfg.teacher(name).for_fold(fold)
    return not teacher.checkpoint.is_file() or (teacher_dir(cfg, name, fold) / "summary.json").is_file()


def _same_recipe(a: Config, b: Config) -> bool:
    """Two configs distil with the same recipe (every distillation key but ``kind`` equal): the config's own recipe
    is not trained twice under another name."""
    da, db = a.distillation, b.distillation
    return da.model_dump(exclude={"kind"}) == db.model_dump(exclude={"kind"})


def screening_config(cfg: Config) -> Config:
    """The experiment as a screening runs it (``make screen``): its runs in ``<runs_dir>/screening/`` (the same store
    and teacher checkpoints), every student holding ``evaluation.screening_holdout`` of its fold's training cases out
    of training (unless ``training.holdout`` already does), so recipes are compared on those cases, never on the
    validation cases."""
    holdout = cfg.training.holdout or cfg.evaluation.screening_holdout
    results = cfg.output.results_dir
    return cfg.model_copy(
        update={
            "output": cfg.output.model_copy(
                update={
                    "runs_dir": cfg.output.runs_dir / "screening",
                    "results_dir": None if results is None else results / "screening",
                }
            ),
            "training": cfg.training.model_copy(update={"holdout": holdout}),
        }
    )


def _file_sha256(path: Path) -> str:
    """The file's sha256 from the per-user hash cache (:mod:`core.user_cache`): a study plans every arm × seed of a
    fold, and a pretrained teacher's checkpoint can be hundreds of MB, so it is read once per size and mtime."""
    cache = FileHashCache(default_hash_cache())
    digest = cache.sha256(path)
    cache.save()
    return digest


def _teacher_identity(teacher: Any, fold: int, home: Config) -> dict[str, Any]:
    """A teacher's settings without its checkpoint path; a pretrained teacher's (a checkpoint ``make cv`` did not
    train) with the checkpoint's digest, since its weights are not decided by the config."""
    out = teacher.model_dump(mode="json", exclude={"checkpoint"})
    checkpoint = teacher.for_fold(fold).checkpoint
    trained_here = (teacher_dir(home, teacher.name, fold) / "summary.json").is_file()
    if checkpoint.is_file() and not trained_here:
        out["weights_sha256"] = _file_sha256(checkpoint)
    return out


def run_identity(
    cfg: Config,
    fold: int,
    seed: int | None,
    kd: str | None,
    source: str | None,
    data: FoldData,
    home: Config | None = None,
) -> str:
    """The identity of the student run ``distil(cfg, fold, kd, seed=seed, source=source)`` would train: sha256 of
    what decides it, known before its teachers are trained (module docstring). ``home`` is the experiment whose runs
    folder trains the teachers (a screening's :func:`~teachcache.cv.screening_config` keeps them there)."""
    from train_student.fold import Recipe

    recipe = Recipe.of(cfg.distillation, kd, source)
    training = cfg.training if seed is None else cfg.training.model_copy(update={"seed": seed})
    payload = {
        "experiment": cfg.experiment,
        "seed": cfg.seed,
        "dataset_manifest": data.manifest_hash,
        "cases": [list(data.train), list(data.val)],
        "preprocessing": cfg.preprocessing.model_dump(mode="json"),
        # the store's path is in every run's provenance (pooled runs must agree on it); its sketch settings decide
        # what the relation terms read
        "store": cfg.store.model_dump(mode="json"),
        "teachers": [_teacher_identity(t, fold, home or cfg) for t in cfg.distilled_teachers()],
        "student": cfg.student.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
        "inference": cfg.inference.model_dump(mode="json"),
        "recipe": recipe.config.key_fields(),
        # every arm of a fold draws the patches of the config's own cached recipe (no-KD too)
        "patches_of": sorted(recipe.twin_needed.kinds),
        "run_kind": recipe.run_kind,
        "fold": fold,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def planned_folder(cfg: Config, fold: int, seed: int | None, kd: str | None, source: str | None):
    """The run folder of ``distil(cfg, fold, kd, seed=seed, source=source)``."""
    from train_student.fold import Recipe

    kind = Recipe.of(cfg.distillation, kd, source).run_kind
    return student_dir(cfg, kind, fold, seed if seed is not None and seed != cfg.training.seed else None)


def run_cv(
    cfg: Config,
    folds: list[int] | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    seeds: list[int] | None = None,
    online: bool = False,
    allow_mixed: bool = False,
    recipes: list[Config] | None = None,
    screen: bool = False,
    teachers_from: Config | None = None,
) -> CvSummary:
    """Run the chain for ``folds`` (default: every fold of the store's splits) and write the CV report.

    With ``seeds``, each student run is repeated with each training seed (teachers are trained once per fold); the
    config's own ``training.seed`` trains into the usual folder, others into ``kd-<kind>/seed_<s>/``. With
    ``online``, each distilled student is also trained with the teachers in memory on each patch
    (``kd-<kind>-online-patch/``), and for the seeds of ``evaluation.context_seeds`` with the teachers running the
    cache's windows around each patch (``kd-<kind>-online-context/``). ``recipes`` (the config with each recipe file
    applied, :func:`core.config.apply_recipe`) are trained beside the config's own recipe, from the same cache. With
    ``screen``, ``cfg`` is already :func:`screening_config`'s and the report compares the held-out cases
    (``screening.md``); ``teachers_from`` is then the experiment as it is, whose runs folder trains the teachers (a
    screening leaves their runs, like their checkpoints and cache, to the experiment). With a ledger, each run's
    records go there as it finishes (a teacher's to ``teachers_from``'s ledger), each fold's teacher-ensemble scores
    after its runs, and a fold the ledger holds whole is not trained (:mod:`core.evaluation.ledger`).

    Raises:
        ConfigError: a fold the splits do not have.
        MixedProvenanceError: the runs of a row, or of a compared pair, are not the same experiment (without
            ``allow_mixed``): the report is not written.
        StoreError, CheckpointError, TrainingError: as the stages raise them (each names its fix).
    """
    from cache_teachers import cache_teachers, train_teachers
    from core.evaluation.cv_report import build_cv_report, fold_ensemble
    from train_student import distil

    store = open_store_for(cfg)
    num_folds = len(store_splits(cfg, store))
    folds = list(range(num_folds)) if folds is None else folds
    bad = [k for k in folds if not 0 <= k < num_folds]
    if bad:
        raise ConfigError(
            f"fold(s) {', '.join(map(str, bad))} do not exist: the store's splits have folds 0–{num_folds - 1}"
        )
    summary = CvSummary(folds=folds)
    home = teachers_from or cfg
    ledger, home_ledger = Ledger.of(cfg), Ledger.of(home)
    others = [r for r in recipes or [] if not _same_recipe(r, cfg)]
    for fold in folds:
        done = summary.runs.setdefault(fold, [])
        data = FoldData(store.metadata["dataset"]["manifest_hash"], *map(tuple, fold_split(cfg, store, fold)))
        planned = []
        for seed in seeds or [cfg.training.seed]:
            runs = [(cfg, "none", None), (cfg, None, None)]
            if online:
                runs.append((cfg, None, "online-patch"))
                if seed in cfg.evaluation.context_seeds:
                    runs.append((cfg, None, "online-context"))
            runs += [(recipe, None, None) for recipe in others]
            planned += [(run_cfg, kd, source, seed) for run_cfg, kd, source in runs]
        identities = [
            run_identity(run_cfg, fold, seed, kd, source, data, home) for run_cfg, kd, source, seed in planned
        ]
        if ledger is not None and all(
            ledger.holds(planned_folder(run_cfg, fold, seed, kd, source), identity)
            for (run_cfg, kd, source, seed), identity in zip(planned, identities, strict=True)
        ):
            say(
                f"fold {fold}: its {len(planned)} run(s) are in the ledger {ledger.root} with these settings; not "
                "trained again (delete a run's folder there to retrain it)"
            )
            continue
        own = [t.name for t in home.teachers if _trains_teacher(home, t.name, fold)]
        if own:
            for r in train_teachers(home, fold, own, progress=progress, skip_done=True):
                done.append(f"{r.name}: {r.headline_mean_dice:.4f}")
                say(f"fold {fold}: {done[-1]}")
        if home_ledger is not None:
            for t in home.teachers:
                home_ledger.record(teacher_dir(home, t.name, fold))
        cached = cache_teachers(cfg, folds=[fold], progress=progress)
        say(
            f"fold {fold}: cached {sum(cached.written.values())} entries, {sum(cached.skipped.values())} already"
        )
        for (run_cfg, kd, source, seed), identity in zip(planned, identities, strict=True):
            r = distil(run_cfg, fold, kd, progress=progress, skip_done=True, seed=seed, source=source)
            folder = planned_folder(run_cfg, fold, seed, kd, source)
            if ledger is not None and not ledger.record(folder, identity):
                say(
                    f"fold {fold}: warning: {r.name} left no summary in {folder}; the ledger does not hold it"
                )
            score = (
                f"held-out Dice {r.final_holdout_mean_dice:.4f}" if screen else f"{r.headline_mean_dice:.4f}"
            )
            done.append(f"{r.name} (seed {seed}): {score}")
            say(f"fold {fold}: {done[-1]}")
        if ledger is not None:
            on = "holdout" if screen else "validation"
            ledger.record_ensemble(fold, on, fold_ensemble(cfg, fold, on))
        # the experiment's teachers on its validation cases: the dataset check
        if screen and home_ledger is not None:
            home_ledger.record_ensemble(fold, "validation", fold_ensemble(home, fold, "validation"))
    build_cv_report(cfg, allow_mixed, on="holdout" if screen else "validation")
    return summary
