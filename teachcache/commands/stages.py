"""``teachcache synth / preprocess / teachers / cache / distil / cv / report``: the pipeline, one stage a command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from core.errors import TeachCacheError
from teachcache.app import (
    DEFAULT_CONFIG,
    ConfigOption,
    FoldOption,
    QuietOption,
    err,
    load_experiment,
    one_line_warnings,
    out,
    user_errors,
)

if TYPE_CHECKING:
    from core.config import Config

__all__ = ["cache", "commands", "cv", "distil", "preprocess", "report", "synth", "teachers"]

commands = typer.Typer()
"""This module\'s commands; :mod:`teachcache.cli` adds them to the app."""

TeacherOption = Annotated[
    list[str] | None, typer.Option("--teacher", "-t", help="Only this teacher (repeatable).")
]


AllowMixedOption = Annotated[
    bool,
    typer.Option(
        "--allow-mixed",
        help="Pool runs of mixed provenance (settings or teacher entries that differ) anyway; the report's header "
        "says so.",
    ),
]
RecipeOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--recipe",
        help="Also train this recipe (a file holding a distillation section, e.g. configs/recipes/cb-pwd.yaml) on "
        "every fold and seed, from the same cache (repeatable).",
    ),
]
ScreenOption = Annotated[
    bool,
    typer.Option(
        "--screen",
        help="The screening: runs in runs_dir/screening/, each student holding evaluation.screening_holdout of its "
        "training cases out; recipes compared on those cases (screening.md), never on the validation cases.",
    ),
]

# where a student's targets come from (distillation.source); "online" is online-patch's old name
SOURCES = ("cache", "online-patch", "online-context", "online")


@commands.command()
@user_errors
def synth(config: ConfigOption = DEFAULT_CONFIG, quiet: QuietOption = False) -> None:
    """Write the embedded synthetic dataset to dataset.raw_dir (skipped if it is already there).

    With no dataset.synthetic in the config, the dataset at dataset.raw_dir is used as it is (every make target
    runs this step first), and one without dataset.json is an error naming the folder.
    """
    from core.data.synthetic import write_synthetic_dataset
    from core.errors import DatasetError

    cfg = load_experiment(config)
    if cfg.dataset.synthetic is None and cfg.dataset.layout in ("hecktor", "picai"):
        from core.data.layouts import read_dataset

        ds = read_dataset(
            cfg.dataset
        )  # the layout's own files (no dataset.json): one message if they are not there
        out.print(f"using the {ds.layout} dataset at {cfg.dataset.raw_dir}: {len(ds.cases)} cases")
        return
    if cfg.dataset.synthetic is None:
        if (cfg.dataset.raw_dir / "dataset.json").is_file():
            out.print(
                f"using the dataset at {cfg.dataset.raw_dir} (no dataset.synthetic: nothing to generate)"
            )
            return
        raise DatasetError(
            f"{config}: dataset.raw_dir {cfg.dataset.raw_dir} holds no dataset.json, and there is no "
            "dataset.synthetic block to generate one: point raw_dir at an nnU-Net v2 raw dataset (dataset.json, "
            "imagesTr/, labelsTr/) or add dataset.synthetic"
        )
    if (cfg.dataset.raw_dir / "dataset.json").is_file():
        out.print(f"dataset already at {cfg.dataset.raw_dir}")
        return
    ids = write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=not quiet)
    out.print(f"wrote {len(ids)} {cfg.dataset.synthetic.kind} cases to {cfg.dataset.raw_dir}")


@commands.command()
@user_errors
def preprocess(
    config: ConfigOption = DEFAULT_CONFIG,
    overwrite: Annotated[bool, typer.Option(help="Rebuild the store from scratch.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Preprocess every case (MONAI) into the store and write the fold splits."""
    from cache_teachers import preprocess_dataset

    cfg = load_experiment(config)
    with one_line_warnings():
        s = preprocess_dataset(cfg, overwrite=overwrite, progress=not quiet)
    out.print(
        f"{s.written} case(s) preprocessed, {s.skipped} already in {cfg.store.path}; splits: {s.splits_file}"
    )


@commands.command()
@user_errors
def teachers(
    config: ConfigOption = DEFAULT_CONFIG,
    fold: FoldOption = 0,
    teacher: TeacherOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train the demo teachers on one fold (real users point the config at their own checkpoints)."""
    from cache_teachers import train_teachers

    cfg = load_experiment(config)
    with one_line_warnings():
        results = train_teachers(cfg, fold, teacher, progress=not quiet)
    for r in results:
        out.print(_fit_line(r), highlight=False, soft_wrap=True)


@commands.command()
@user_errors
def cache(
    config: ConfigOption = DEFAULT_CONFIG,
    overwrite: Annotated[bool, typer.Option(help="Recompute entries that are already complete.")] = False,
    teacher: TeacherOption = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Spread entries over a local dask cluster of N worker processes.", min=1),
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Spread entries over the dask.distributed scheduler at this address.")
    ] = None,
    fold: Annotated[
        list[int] | None,
        typer.Option(
            "--fold",
            "-f",
            help="Cache this fold's per-fold teachers (repeatable); default: every fold with checkpoints.",
            min=0,
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Run each teacher once over every case and write its softmax and attention maps into the store.

    A teacher whose checkpoint path holds {fold} is cached once per fold, from that fold's checkpoint."""
    from cache_teachers import cache_teachers

    cfg = load_experiment(config)
    s = cache_teachers(
        cfg,
        overwrite=overwrite,
        names=teacher,
        progress=not quiet,
        workers=workers,
        scheduler=scheduler,
        folds=fold,
    )
    for name in s.written:
        out.print(
            f"{name}: {s.written[name]} written, {s.skipped[name]} already cached ({s.seconds[name]:.1f} s)"
        )


@commands.command()
@user_errors
def distil(
    config: ConfigOption = DEFAULT_CONFIG,
    fold: FoldOption = 0,
    kd: Annotated[
        str | None,
        typer.Option(
            help="'none' trains the no-KD baseline (L_SEG only). Other recipes are configs: "
            "-c configs/ablations/NAME.yaml."
        ),
    ] = None,
    allow_leakage: Annotated[
        bool,
        typer.Option(
            help="Distil from teachers trained on this fold's validation cases (recorded in the run)."
        ),
    ] = False,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Repeat the run with this training seed (into kd-<kind>/seed_<s>/fold_<k>).", min=0
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="'cache' (targets from the store); 'online-patch' (or 'online': the fold's teachers in memory on "
            "each augmented patch, into kd-<kind>-online-patch/); 'online-context' (the teachers run the cache's "
            "windows around each patch, into kd-<kind>-online-context/); default: distillation.source."
        ),
    ] = None,
    skip_integrity_check: Annotated[
        bool,
        typer.Option(
            help="Do not check, before training, that every chunk the run reads is present and is the one written "
            "there (the check reads the stored bytes once; a warning says it was skipped)."
        ),
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Train the student for one fold from the store (no teacher in memory)."""
    from train_student import distil as run

    cfg = load_experiment(config)
    if kd is not None and kd not in ("none", cfg.distillation.kind):
        # a new name would only rename the output folder while training the config's own terms
        raise TeachCacheError(
            f"--kd {kd}: --kd only switches distillation off (--kd none); the terms come from the config "
            f"({config} trains '{cfg.distillation.kind}'). To train another recipe, pass its config, e.g. "
            f"`make distil FOLD={fold} CONFIG=configs/ablations/{kd}.yaml`"
        )
    with one_line_warnings():
        if source not in (None, *SOURCES):
            raise TeachCacheError(f"--source {source}: use one of {', '.join(SOURCES)}")
        r = run(
            cfg,
            fold,
            kd,
            progress=not quiet,
            allow_leakage=allow_leakage,
            seed=seed,
            source=source,
            skip_integrity_check=skip_integrity_check,
        )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun (make distil GPUS=n), process 0 speaks
        out.print(_fit_line(r), highlight=False, soft_wrap=True)


@commands.command()
@user_errors
def cv(
    config: ConfigOption = DEFAULT_CONFIG,
    fold: Annotated[
        list[int] | None,
        typer.Option("--fold", "-f", help="Only this fold (repeatable); default: every fold.", min=0),
    ] = None,
    seed: Annotated[
        list[int] | None,
        typer.Option("--seed", help="Repeat every student run with this training seed (repeatable).", min=0),
    ] = None,
    online: Annotated[
        bool,
        typer.Option(
            help="Also train each distilled student online: on each patch (online-patch) with every seed, and on "
            "the cache's windows around each patch (online-context) with the seeds of evaluation.context_seeds."
        ),
    ] = False,
    allow_mixed: AllowMixedOption = False,
    recipe: RecipeOption = None,
    screen: ScreenOption = False,
    quiet: QuietOption = False,
) -> None:
    """Cross-validation: per fold, train the teachers, cache them, train the no-KD and the distilled student (and
    each --recipe's); then the report. With --screen, the students hold cases out of training and the recipes are
    compared on those (runs_dir/screening/screening.md). Re-running skips what is finished and resumes what was
    killed."""
    from teachcache.cv import run_cv

    base = load_experiment(config)
    cfg, recipes = _with_recipes(base, recipe or [], screen)
    with one_line_warnings():
        run_cv(
            cfg,
            fold,
            progress=not quiet,
            say=lambda line: out.print(line, highlight=False),
            seeds=seed,
            online=online,
            allow_mixed=allow_mixed,
            recipes=recipes,
            screen=screen,
            teachers_from=base,
        )
    out.print(f"report: {cfg.output.runs_dir / ('screening.md' if screen else 'report.md')}")


def _with_recipes(cfg: Config, paths: list[Path], screen: bool) -> tuple[Config, list[Config]]:
    """The experiment (as a screening runs it, with ``screen``) and each recipe file applied to it, each recipe's
    terms built once here so a bad argument is refused before anything trains; two recipes of one kind would share a
    run folder and are refused."""
    from core.config import apply_recipe
    from core.losses.distillation import build_objective
    from core.terms import builds_with_channels
    from teachcache.cv import screening_config

    if screen:
        cfg = screening_config(cfg)
    recipes = [apply_recipe(cfg, p) for p in paths]
    for path, r in zip(paths, recipes, strict=True):
        if not builds_with_channels(
            t.name for t in r.distillation.terms
        ):  # those need the networks' tap widths
            try:
                build_objective(r.distillation, r.training.focal_gamma)
            except TeachCacheError as exc:
                raise TeachCacheError(f"{path}: {exc}") from None
    from teachcache.cv import _same_recipe

    for path, r in zip(paths, recipes, strict=True):
        if r.distillation.kind == cfg.distillation.kind and not _same_recipe(r, cfg):
            raise TeachCacheError(
                f"{path}: its distillation.kind '{r.distillation.kind}' is the experiment's own recipe's, with other "
                "terms or settings; each kind is one run folder (kd-<kind>), so give the recipe its own kind"
            )
    kinds = [r.distillation.kind for r in recipes]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise TeachCacheError(
            f"--recipe: several recipe files have distillation.kind {', '.join(repeated)}; each kind is one run "
            "folder (kd-<kind>), so give each recipe its own kind"
        )
    return cfg, recipes


def _fit_line(r: Any) -> str:
    """One run's result: the headline (chosen without the validation cases) and the optimistic best-on-validation."""
    if r.headline == "holdout":
        what = f"epoch {r.headline_epoch}, chosen on {len(r.holdout_cases)} held-out training case(s)"
    else:
        what = "final model"
    return (
        f"{r.name}: val Dice {r.headline_mean_dice:.4f} ({what}; best-on-validation epoch {r.best_epoch}: "
        f"{r.best_mean_dice:.4f}, chosen on the same cases) → {r.checkpoint}"
    )


@commands.command()
@user_errors
def report(
    config: ConfigOption = DEFAULT_CONFIG,
    fold: Annotated[
        int | None,
        typer.Option("--fold", "-f", help="One fold's table; without it, every fold trained.", min=0),
    ] = None,
    allow_mixed: AllowMixedOption = False,
    screen: ScreenOption = False,
) -> None:
    """Every run over the folds it was trained on, compared over folds (the primary endpoint of
    evaluation.primary_endpoint with its 95 % CI, the other comparisons Holm-adjusted, cached vs online
    equivalence) and, secondary, per case; or, with --fold, one fold's table with each stage's wall time. With
    --screen, the screening's runs compared on their held-out training cases."""
    cfg = load_experiment(config)
    if screen:
        from teachcache.cv import screening_config

        _cv_report(screening_config(cfg), allow_mixed, on="holdout")
    elif fold is None:
        _cv_report(cfg, allow_mixed)
    else:
        _fold_report(cfg, fold)


def _fold_report(cfg: Config, fold: int) -> None:
    """One fold's models (final and best-on-validation Dice, parameters) and each stage's wall time."""
    from core.evaluation.report import build_report

    rep = build_report(cfg, fold)
    t = Table(title=f"{rep['experiment']}: validation on fold {fold}")
    for col in ("model", "val Dice", "best epoch*", "params"):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for r in rep["models"]:
        t.add_row(r["model"], f"{r['dice']:.4f}", f"{r['best_on_val_dice']:.4f}", f"{r['parameters']:,}")
    out.print(t)
    out.print("  val Dice: the final model's. *best epoch's Dice, chosen on the same cases: optimistic.")
    for r in rep["models"]:
        if r["model"].startswith("student"):
            out.print(f"  {r['model'].removeprefix('student ')}: {r['terms']}", highlight=False)
    s = Table(title="wall time per stage")
    s.add_column("stage")
    s.add_column("seconds", justify="right")
    for stage, secs in rep["stage_seconds"].items():
        s.add_row(stage, "—" if secs is None else f"{secs:.1f}")
    out.print(s)
    out.print(f"written to {cfg.output.runs_dir}/report_fold_{fold}.md and .json")


def _fold_level_lines(fold: dict[str, Any]) -> None:
    """The fold-level claims in words: the primary endpoint, then each cached/online equivalence verdict."""
    primary = fold["primary"]
    what = primary.get("verdict") or f"no interval ({primary['unavailable']})"
    out.print(
        f"  primary endpoint, over folds: {primary['run']} − {primary['against']}: {what}", highlight=False
    )
    for c in fold["equivalence"]:
        what = c.get("sentence") or f"no interval ({c['unavailable']})"
        out.print(f"  {c['run']} vs {c['against']}, over folds: {what}", highlight=False)


def _cv_report(cfg: Config, allow_mixed: bool = False, on: str = "validation") -> None:
    """Every run over its folds (Dice per fold and per case, HD95), the fold-level claims, the per-case paired
    tests (secondary) and the teacher-ensemble ratio."""
    from core.evaluation.cv_report import build_cv_report

    rep = build_cv_report(cfg, allow_mixed, on)
    prov = rep["provenance"]
    for line in ([f"pooled with --allow-mixed: {m}" for m in prov["mixed"]]) + prov["warnings"]:
        err.print(f"provenance: {line}", highlight=False, soft_wrap=True)
    t = Table(title=f"{rep['experiment']}: headline models over the folds trained (Dice per case)")
    for col in ("run", "folds", "cases", "Dice (folds)", "Dice (cases)", "HD95 mm"):
        t.add_column(col, justify="left" if col in ("run", "folds") else "right", no_wrap=True)
    for r in rep["runs"]:
        sd = r["dice_std_over_folds"]
        t.add_row(
            r["run"],
            ",".join(map(str, r["folds"])),
            str(r["cases"]),
            f"{r['dice_mean_over_folds']:.4f}" + ("" if sd != sd else f" ± {sd:.4f}"),
            f"{r['dice_mean_over_cases']:.4f} ± {r['dice_std_over_cases']:.4f}",
            f"{r['hd95_mm_mean_over_cases']:.2f}",
        )
    out.print(t)
    _fold_level_lines(rep["fold_level"])
    for flag in rep["fold_level"].get("harm_flags", []):
        out.print(f"  harm flag, over folds: {flag}", highlight=False, soft_wrap=True)
    for warning in rep.get("health_warnings", []):
        out.print(f"  health check: {warning}", highlight=False, soft_wrap=True)
    for c in rep["paired_vs_no_kd"]:
        out.print(
            f"  {c['run']} − no KD, per case (secondary): Dice {c['mean_difference']:+.4f} over {c['n']} cases, "
            f"Wilcoxon p = {c['wilcoxon_p']:.3g}, paired t p = {c['t_test_p']:.3g}",
            highlight=False,
        )
    for c in rep.get("against_teacher_ensemble", []):
        out.print(
            f"  {c['run']}: {c['ratio']:.1%} of the teacher ensemble's Dice ({c['dice']:.4f} / "
            f"{c['ensemble_dice']:.4f}, {c['n']} cases)",
            highlight=False,
        )
    stem = "screening" if on == "holdout" else "report"
    out.print(f"written to {cfg.output.runs_dir}/{stem}.md, .json and {stem}_dice.png")
