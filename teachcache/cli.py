"""The ``teachcache`` command: a thin Typer layer over the typed functions of ``core`` and the two stages.

Every error a user can cause is printed as one message (no traceback) with exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import TeachCacheError

app = typer.Typer(
    name="teachcache",
    help="Multi-teacher distillation for 3D medical segmentation through a Zarr cache of teacher outputs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Experiment YAML (validated on load).", show_default=True)
]
FoldOption = Annotated[int, typer.Option("--fold", "-f", help="Cross-validation fold.", min=0)]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DEFAULT_CONFIG = Path("configs/demo.yaml")


def user_errors(fn: F) -> F:
    """Turn a :class:`TeachCacheError` into one red line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TeachCacheError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _load(config: Path):
    from core.config import load_config

    return load_config(config)


@app.command()
@user_errors
def synth(config: ConfigOption = DEFAULT_CONFIG, quiet: QuietOption = False) -> None:
    """Write the embedded synthetic dataset to dataset.raw_dir (skipped if it is already there).

    With no dataset.synthetic in the config, the dataset at dataset.raw_dir is used as it is (every make target
    runs this step first), and one without dataset.json is an error naming the folder.
    """
    from core.data.synthetic import write_synthetic_dataset
    from core.errors import DatasetError

    cfg = _load(config)
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


@app.command()
@user_errors
def preprocess(
    config: ConfigOption = DEFAULT_CONFIG,
    overwrite: Annotated[bool, typer.Option(help="Rebuild the store from scratch.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Preprocess every case (MONAI) into the store and write the fold splits."""
    from cache_teachers import preprocess_dataset

    cfg = _load(config)
    s = preprocess_dataset(cfg, overwrite=overwrite, progress=not quiet)
    out.print(
        f"{s.written} case(s) preprocessed, {s.skipped} already in {cfg.store.path}; splits: {s.splits_file}"
    )


@app.command()
@user_errors
def teachers(
    config: ConfigOption = DEFAULT_CONFIG,
    fold: FoldOption = 0,
    teacher: Annotated[
        list[str] | None, typer.Option("--teacher", "-t", help="Only this teacher (repeatable).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Train the demo teachers on one fold (real users point the config at their own checkpoints)."""
    from cache_teachers import train_teachers

    cfg = _load(config)
    with _one_line_warnings():
        results = train_teachers(cfg, fold, teacher, progress=not quiet)
    for r in results:
        out.print(_fit_line(r), highlight=False, soft_wrap=True)


@app.command()
@user_errors
def cache(
    config: ConfigOption = DEFAULT_CONFIG,
    overwrite: Annotated[bool, typer.Option(help="Recompute entries that are already complete.")] = False,
    teacher: Annotated[
        list[str] | None, typer.Option("--teacher", "-t", help="Only this teacher (repeatable).")
    ] = None,
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

    cfg = _load(config)
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


@app.command()
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
            help="'cache' (targets from the store) or 'online' (the fold's teachers in memory, into "
            "kd-<kind>-online/); default: distillation.source."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Train the student for one fold from the store (no teacher in memory)."""
    from train_student import distil as run

    cfg = _load(config)
    if kd is not None and kd not in ("none", cfg.distillation.kind):
        # a new name would only rename the output folder while training the config's own terms
        raise TeachCacheError(
            f"--kd {kd}: --kd only switches distillation off (--kd none); the terms come from the config "
            f"({config} trains '{cfg.distillation.kind}'). To train another recipe, pass its config, e.g. "
            f"`make distil FOLD={fold} CONFIG=configs/ablations/{kd}.yaml`"
        )
    with _one_line_warnings():
        if source not in (None, "cache", "online"):
            raise TeachCacheError(f"--source {source}: use 'cache' or 'online'")
        r = run(cfg, fold, kd, progress=not quiet, allow_leakage=allow_leakage, seed=seed, source=source)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun (make distil GPUS=n), process 0 speaks
        out.print(_fit_line(r), highlight=False, soft_wrap=True)


@app.command()
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
        typer.Option(help="Also train each distilled student online (teachers in memory), the baseline."),
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Cross-validation: per fold, train the teachers, cache them, train the no-KD and the distilled student; then
    the report. Re-running skips what is finished and resumes what was killed."""
    from teachcache.cv import run_cv

    cfg = _load(config)
    with _one_line_warnings():
        run_cv(
            cfg,
            fold,
            progress=not quiet,
            say=lambda line: out.print(line, highlight=False),
            seeds=seed,
            online=online,
        )
    out.print(f"report: {cfg.output.runs_dir / 'report.md'}")


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """TeachCache's own warnings as one line each, printed as they happen; others as Python prints them."""
    import warnings

    from core.training.loop import ResumeDiscardedWarning
    from train_student.distil import RawDataChangedWarning, TapGridWarning

    ours = (RawDataChangedWarning, TapGridWarning, ResumeDiscardedWarning)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
        if issubclass(category, ours):
            err.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        for category in ours:
            warnings.simplefilter("always", category)
        warnings.showwarning = show
        yield


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


@app.command()
@user_errors
def verify(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Also check that every teacher this experiment configures is cached."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every case and teacher entry: complete, no lost or corrupt chunk, right shapes, finite, softmax sums to
    1, provenance.

    Exit codes: 0 the store is sound; 1 problems found (listed); 2 not a store, or a bad argument; 3 the check
    itself could not finish (the message says why) — so scripts can tell a bad store from a failed check.
    """
    from core.store.teacher_store import TeacherStore
    from core.store.verify import verify_store

    expected = [t.name for t in _load(config).teachers] if config is not None else None
    opened = TeacherStore.open(store)
    try:
        result = verify_store(opened, expected_teachers=expected)
    except TeachCacheError:
        raise
    except Exception as exc:  # the check crashed: not the same as a store with problems
        err.print(
            f"[bold red]error:[/] verify could not finish on {store}: {type(exc).__name__}: {exc}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=3) from None
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    elif result["ok"]:
        out.print(
            f"ok: {result['cases']} cases, {len(result['teachers'])} teacher(s), "
            f"{result['entries_checked']} entries checked"
        )
    else:
        for problem in result["problems"]:
            err.print(f"[red]problem:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
        err.print(f"{len(result['problems'])} problem(s) in {store}")
    if not as_json:
        for note in _verify_notes(result, config is not None):
            out.print(f"note: {note}", highlight=False, soft_wrap=True)
    if not result["ok"]:
        raise typer.Exit(code=1)


def _verify_notes(result: dict[str, Any], with_config: bool) -> list[str]:
    """What ``verify`` could not check: old groups' lost chunks; which teachers a store without them should hold."""
    notes = []
    if result["unchecked_for_lost_chunks"]:
        notes.append(
            f"{result['unchecked_for_lost_chunks']} case(s)/entries were written before every chunk was stored "
            "(store format < 1.3): a lost chunk file cannot be detected there"
        )
    if not result["teachers"] and not with_config:
        notes.append("no teacher is cached yet; pass -c CONFIG to check that every configured teacher is")
    return notes


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
@user_errors
def inspect(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", "-t", help="Only this teacher (name or copy), with its provenance."),
    ] = None,
    case: Annotated[str | None, typer.Option("--case", help="Only this case's arrays.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a store's teachers, cases and arrays (shapes, dtypes, chunks, shards, codecs, stored vs raw bytes) and
    each teacher's provenance."""
    from core.inspection.describe import describe_store
    from core.inspection.views import resolve_case, resolve_teachers
    from core.store.teacher_store import TeacherStore

    opened = TeacherStore.open(store)
    keys = None
    if teacher is not None:  # a copy, or a name: every copy of it (one per fold)
        keys = [k for k in opened.teacher_keys() if teacher in (k, k.split("/")[0])]
        keys = keys or resolve_teachers(opened, [teacher])  # none: the error naming the cached teachers
    if case is not None:
        resolve_case(opened, case)
    info = describe_store(opened, teachers=keys, case=case)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    ds = info["dataset"]
    out.print(
        f"[bold]{info['store']}[/] (format {info['format_version']}): {ds['name']}, {len(info['cases'])} cases, "
        f"channels {', '.join(ds['channel_names'])}, classes {', '.join(ds['class_names'])}, "
        f"{_bytes(info['stored_bytes'])} stored of {_bytes(info['raw_bytes'])} raw"
    )
    t = Table(title="teachers")
    for col in ("teacher", "arch", "trained on fold", "complete", "checkpoint sha256", "cache s"):
        t.add_column(col)
    for row in info["teachers"]:
        t.add_row(
            row["name"],
            row["arch"],
            str(row["fold"]),
            f"{row['complete_cases']}/{row['total_cases']}",
            (row["checkpoint_sha256"] or "")[:12],
            str(row["cache_seconds"] or "—"),
        )
    out.print(t)
    if teacher is not None:
        for row in info["teachers"]:
            out.print(f"[bold]provenance of {row['name']}[/]")
            out.print_json(json.dumps(row["provenance"]))
    if case is None:
        cs = Table(title="cases")
        for col in ("case", "shape", "teachers cached"):
            cs.add_column(col)
        for c in info["cases"]:
            cached = f"{len(c['teachers_complete'])}/{len(info['teachers'])}"
            cs.add_row(c["case_id"], "×".join(map(str, c["shape"])), cached)
        out.print(cs)
    shown = case or (info["cases"][0]["case_id"] if info["cases"] else None)
    a = Table(
        title=f"arrays of case {shown}" + ("" if case else " (--case C for another, --json for every case)")
    )
    for col in ("owner", "array", "shape", "dtype", "chunks (shards)", "codecs", "stored / raw"):
        a.add_column(col, overflow="fold", no_wrap=col == "array")
    for arr in info["arrays"]:
        parts = arr["path"].split("/")
        if shown not in parts:
            continue
        owner = "case" if parts[0] == "cases" else "/".join(parts[1:3])
        chunks = "×".join(map(str, arr["chunks"]))
        if arr["shards"]:
            chunks += f" ({'×'.join(map(str, arr['shards']))})"
        a.add_row(
            owner,
            parts[-1],
            "×".join(map(str, arr["shape"])),
            arr["dtype"],
            chunks,
            arr["codecs"],
            f"{_bytes(arr['stored_bytes'])} / {_bytes(arr['raw_bytes'])}",
        )
    out.print(a)


@app.command()
@user_errors
def report(
    config: ConfigOption = DEFAULT_CONFIG,
    fold: Annotated[
        int | None,
        typer.Option("--fold", "-f", help="One fold's table; without it, every fold trained.", min=0),
    ] = None,
) -> None:
    """Every run over the folds it was trained on, per case, with paired tests against the no-KD student; or,
    with --fold, one fold's table with each stage's wall time."""
    from core.evaluation.report import build_report

    cfg = _load(config)
    if fold is None:
        _cv_report(cfg)
        return
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


def _cv_report(cfg) -> None:
    from core.evaluation.cv_report import build_cv_report

    rep = build_cv_report(cfg)
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
    for c in rep["paired_vs_no_kd"]:
        out.print(
            f"  {c['run']} − no KD: Dice {c['mean_difference']:+.4f} over {c['n']} cases, Wilcoxon p = "
            f"{c['wilcoxon_p']:.3g}, paired t p = {c['t_test_p']:.3g}",
            highlight=False,
        )
    for c in rep.get("against_teacher_ensemble", []):
        out.print(
            f"  {c['run']}: {c['ratio']:.1%} of the teacher ensemble's Dice ({c['dice']:.4f} / "
            f"{c['ensemble_dice']:.4f}, {c['n']} cases)",
            highlight=False,
        )
    out.print(f"written to {cfg.output.runs_dir}/report.md, .json and report_dice.png")


@app.command()
@user_errors
def models(
    input_size: Annotated[int, typer.Option(help="Cubic input size S (voxels).", min=16)] = 96,
    in_channels: Annotated[int, typer.Option(help="Input modalities.", min=1)] = 1,
    out_channels: Annotated[int, typer.Option(help="Classes, background included.", min=2)] = 14,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every registered model with its parameters and GFLOPs (PyTorch's FLOP counter) at one size."""
    from core.models import list_models
    from core.models.profile import profile_model

    rows, skipped = [], {}
    for name in list_models():
        try:
            rows.append(profile_model(name, input_size, in_channels, out_channels).to_dict())
        except TeachCacheError as exc:
            skipped[name] = str(exc)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    t = Table(
        title=f"models at {input_size}³, {in_channels} → {out_channels} (GFLOPs: a multiply-add = 2 FLOPs)"
    )
    for col in ("model", "params (M)", "GFLOPs", "taps (strides)", "description"):
        t.add_column(col, justify="right" if col in ("params (M)", "GFLOPs") else "left", overflow="fold")
    for r in rows:
        t.add_row(
            r["name"],
            f"{r['parameters'] / 1e6:.2f}",
            f"{r['gflops']:.1f}",
            f"{r['coarse_stride']} / {r['fine_stride']}",
            r["description"],
        )
    for name, reason in skipped.items():
        t.add_row(name, "—", "—", "—", reason)
    out.print(t)


@app.command("bench-store")
@user_errors
def bench_store(
    config: ConfigOption = DEFAULT_CONFIG,
    cases: Annotated[int, typer.Option(help="Validation cases of fold 0 to encode.", min=1)] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Measure every softmax encoding (B/voxel, KL at T=1,2,4, MB/s) and the time to read one training patch."""
    from cache_teachers.bench_store import (
        bench_encodings,
        bench_patch_read,
        results_table,
        sketch_fidelity,
        store_costs,
    )

    cfg = _load(config)
    results = results_table(bench_encodings(cfg, cases))
    patch = bench_patch_read(cfg)
    costs = store_costs(cfg)
    sketches = sketch_fidelity(cfg)
    report = {"encodings": results, "patch_read": patch, "store_bytes_per_voxel": costs, "sketches": sketches}
    path = cfg.output.runs_dir / "bench_store.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    t = Table(title=f"softmax encodings on {len(cfg.teachers)} teacher(s) × {cases} case(s)")
    for col in ("encoding", "B/voxel/teacher", "KL T=1", "KL T=2", "KL T=4", "write MB/s", "read MB/s"):
        t.add_column(col, justify="left" if col == "encoding" else "right")
    for r in results:
        kl = r["kl"]
        t.add_row(
            r["encoding"],
            f"{r['bytes_per_voxel']:.4f}",
            *(f"{kl[k]:.2e}" for k in ("T=1", "T=2", "T=4")),
            f"{r['write_mb_s']:.0f}",
            f"{r['read_mb_s']:.0f}",
        )
    out.print(t)
    c = Table(
        title=f"what {cfg.store.path} costs, in stored bytes per case voxel (teacher arrays: per teacher)"
    )
    c.add_column("array")
    c.add_column("B/voxel", justify="right")
    for kind, value in costs.items():
        c.add_row(kind, f"{value:.4f}")
    out.print(c)
    if sketches:
        k = Table(title="feature sketches: relative error of cosine similarities (mean / max over cases)")
        for col in ("teacher", "tap", "C → k", "energy kept", "voxel pairs", "class prototypes"):
            k.add_column(col)
        for r in sketches:
            k.add_row(
                str(r["teacher"]),
                str(r["tap"]),
                f"{r['channels_in']} → {r['channels']}",
                f"{r['energy_mean']:.4f}",
                f"{r['voxel_cosine_mean']:.4f} / {r['voxel_cosine_max']:.4f}",
                f"{r.get('prototype_cosine_mean', float('nan')):.4f} / {r.get('prototype_cosine_max', float('nan')):.4f}",
            )
        out.print(k)
    out.print(
        f"one training patch of {cfg.training.patch_size} with {patch['teachers']} teacher(s)' softmax and maps: "
        f"{patch['mean_s'] * 1000:.1f} ms mean, {patch['p95_s'] * 1000:.1f} ms p95; written to {path}"
    )


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()


@app.command()
@user_errors
def bench(
    preset: Annotated[
        str,
        typer.Option(
            "--preset", "-p", help="cpu: the demo's sizes; gpu: the paper's (a machine with a GPU)."
        ),
    ] = "cpu",
    part: Annotated[
        list[str] | None,
        typer.Option("--part", help="Only these measurements (repeatable): steps, store, cache, loader."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where results-<preset>.json/.md/.png go.")] = Path(
        "bench"
    ),
    quiet: QuietOption = False,
) -> None:
    """Step time (no KD, cached, online), peak memory, store bytes, cache-stage overhead and the paper-size loader.

    Fold 0's teachers are trained (cpu: the demo's) or initialised (gpu: speed does not depend on the weights) and
    cached first when they are not yet; that preparation is not timed. Writes bench/results-<preset>.json, .md and
    .png and the preset's block in BENCHMARKS.md.
    """
    from core.errors import ConfigError
    from teachcache.bench import PRESETS, run_bench

    if preset not in PRESETS:
        raise ConfigError(f"unknown bench preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    unknown = sorted(set(part or []) - {"steps", "store", "cache", "loader"})
    if unknown:
        raise ConfigError(
            f"unknown bench part(s) {', '.join(unknown)}; choose from steps, store, cache, loader"
        )
    needs_store = not part or set(part) & {"steps", "store", "cache"}
    if needs_store:
        _bench_prepare(Path(PRESETS[preset]["config"]), random_teachers=preset == "gpu", quiet=quiet)
    with _one_line_warnings():
        results = run_bench(preset, out_dir, part, progress=lambda line: out.print(line, highlight=False))
    out.print(
        f"written to {out_dir}/results-{preset}.json, .md, .png and BENCHMARKS.md ({results['seconds'] / 60:.1f} min)"
    )


def _bench_prepare(config: Path, random_teachers: bool, quiet: bool) -> None:
    """Fold 0's teachers, trained (or initialised) and cached, unless they already are."""
    from cache_teachers import cache_teachers, train_teachers
    from core.experiment import open_store_for
    from core.models.checkpoint import save_checkpoint
    from core.models.registry import create_model, get_spec

    cfg = _load(config)
    store = open_store_for(cfg)
    meta = store.metadata["dataset"]
    missing = [t for t in (c.for_fold(0) for c in cfg.teachers) if not Path(t.checkpoint).is_file()]
    if missing and random_teachers:
        for t in missing:  # step time, memory and the cache stage's speed do not depend on the weights
            model = create_model(t.arch, len(meta["channel_names"]), len(meta["class_names"]), t.args)
            Path(t.checkpoint).parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                Path(t.checkpoint),
                model,
                get_spec(t.arch).name,
                len(meta["channel_names"]),
                len(meta["class_names"]),
                t.args,
                {"role": "teacher", "fold": 0, "note": "randomly initialised for make bench BENCH=gpu"},
            )
    elif missing:
        out.print(
            f"bench: training fold 0's teachers first ({', '.join(t.name for t in missing)}; not timed)"
        )
        with _one_line_warnings():
            train_teachers(cfg, 0, [t.name for t in missing], progress=not quiet)
    summary = cache_teachers(cfg, progress=not quiet, folds=[0])
    if sum(summary.written.values()):
        out.print(
            f"bench: cached fold 0's teachers first ({sum(summary.written.values())} entries; not timed)"
        )


from teachcache import cli_dataset, cli_look, cli_predict  # noqa: E402, F401  (register ls, show, export, view, stats, diff, dataset, predict, evaluate, export-model)
