"""``teachcache bench / bench-store``: step time, memory and cache-stage overhead; the store's encodings and reads.

The measurements live in :mod:`teachcache.bench` and :mod:`cache_teachers.bench_store`; this module parses the
options, prepares fold 0's teachers when they are missing, and prints the tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from teachcache.app import (
    DEFAULT_CONFIG,
    ConfigOption,
    JsonTablesOption,
    QuietOption,
    load_experiment,
    one_line_warnings,
    out,
    print_json,
    user_errors,
)

if TYPE_CHECKING:
    from core.config import Config

__all__ = ["bench", "bench_store", "commands"]

commands = typer.Typer()
"""This module\'s commands; :mod:`teachcache.cli` adds them to the app."""


@commands.command()
@user_errors
def bench(
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            "-p",
            help="cpu: the demo's sizes; gpu: the paper's (a machine with a GPU); gpu-smoke: the GPU preset's code "
            "path at a reduced size, on any machine, in under a minute (its numbers mean nothing).",
        ),
    ] = "cpu",
    part: Annotated[
        list[str] | None,
        typer.Option(
            "--part",
            help="Only these measurements (repeatable): steps, store, cache, amortise, loader, integrity; the "
            "others are carried from the preset's last results.",
        ),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where results-<preset>.json/.md/.png go.")] = Path(
        "bench"
    ),
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Time this experiment instead of the preset's (configs/*.yaml)."),
    ] = None,
    benchmarks: Annotated[
        Path, typer.Option("--benchmarks", help="The markdown file whose preset block is replaced.")
    ] = Path("BENCHMARKS.md"),
    quiet: QuietOption = False,
) -> None:
    """Step time (no KD, cached, online) with loading, peak memory, store bytes, cache-stage overhead, what the
    cache saves over k students, and the paper-size loader.

    Fold 0's teachers are trained (cpu: the demo's) or initialised (gpu: speed does not depend on the weights) and
    cached first when they are not yet; that preparation is not timed. Writes bench/results-<preset>.json, .md and
    .png and the preset's block in BENCHMARKS.md.
    """
    from core.errors import ConfigError
    from teachcache.bench import BENCH_PARTS, PRESETS, RANDOM_TEACHER_PRESETS, run_bench

    if preset not in PRESETS:
        raise ConfigError(f"unknown bench preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    unknown = sorted(set(part or []) - set(BENCH_PARTS))
    if unknown:
        raise ConfigError(f"unknown bench part(s) {', '.join(unknown)}; choose from {', '.join(BENCH_PARTS)}")
    experiment = str(config) if config else PRESETS[preset]["config"]
    needs_store = not part or set(part) & {"steps", "store", "cache", "amortise"}
    if needs_store:
        _bench_prepare(Path(experiment), random_teachers=preset in RANDOM_TEACHER_PRESETS, quiet=quiet)
    with one_line_warnings():
        results = run_bench(
            preset,
            out_dir,
            part,
            progress=lambda line: out.print(line, highlight=False),
            config=experiment,
            benchmarks=benchmarks,
        )
    out.print(
        f"written to {out_dir}/results-{preset}.json, .md, .png and {benchmarks} ({results['seconds'] / 60:.1f} min)"
    )


def _bench_prepare(config: Path, random_teachers: bool, quiet: bool) -> None:
    """Fold 0's teachers, trained (or initialised) and cached, unless they already are."""
    from cache_teachers import cache_teachers, train_teachers
    from core.experiment import open_store_for
    from core.models.checkpoint import save_checkpoint
    from core.models.registry import create_model, get_spec

    cfg = load_experiment(config)
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
                {"role": "teacher", "fold": 0, "note": "randomly initialised for make bench (speed only)"},
            )
    elif missing:
        out.print(
            f"bench: training fold 0's teachers first ({', '.join(t.name for t in missing)}; not timed)"
        )
        with one_line_warnings():
            train_teachers(cfg, 0, [t.name for t in missing], progress=not quiet)
    summary = cache_teachers(cfg, progress=not quiet, folds=[0])
    if sum(summary.written.values()):
        out.print(
            f"bench: cached fold 0's teachers first ({sum(summary.written.values())} entries; not timed)"
        )


@commands.command("bench-store")
@user_errors
def bench_store(
    config: ConfigOption = DEFAULT_CONFIG,
    cases: Annotated[int, typer.Option(help="Validation cases of fold 0 to encode.", min=1)] = 4,
    as_json: JsonTablesOption = False,
) -> None:
    """Measure every softmax encoding (B/voxel, KL at T=1,2,4, MB/s) and the time to read one training patch."""
    from cache_teachers.bench_store import (
        bench_encodings,
        bench_patch_read,
        bench_softmax_codecs,
        results_table,
        sketch_fidelity,
        store_costs,
    )

    cfg = load_experiment(config)
    results = results_table(bench_encodings(cfg, cases))
    patch = bench_patch_read(cfg)
    costs = store_costs(cfg)
    sketches = sketch_fidelity(cfg)
    codecs = bench_softmax_codecs(cfg)
    report = {
        "encodings": results,
        "softmax_codecs": codecs,
        "patch_read": patch,
        "store_bytes_per_voxel": costs,
        "sketches": sketches,
    }
    path = cfg.output.runs_dir / "bench_store.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        print_json(report)
        return
    out.print(_encodings_table(results, len(cfg.teachers), cases))
    out.print(_codecs_table(codecs))
    out.print(_costs_table(cfg, costs))
    if sketches:
        out.print(_sketches_table(sketches))
    out.print(
        f"one training patch of {cfg.training.patch_size} with {patch['teachers']} teacher(s)' softmax and maps: "
        f"{patch['mean_s'] * 1000:.1f} ms mean, {patch['p95_s'] * 1000:.1f} ms p95; written to {path}"
    )


def _encodings_table(results: list[dict[str, Any]], teachers: int, cases: int) -> Table:
    """Per softmax encoding: stored bytes per voxel, KL to the exact softmax at three temperatures, MB/s."""
    t = Table(title=f"softmax encodings on {teachers} teacher(s) × {cases} case(s)")
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
    return t


def _codecs_table(codecs: dict[str, Any]) -> Table:
    """The cached softmax's stored bytes under each lossless pipeline a zarr v3 reader decodes (same KL)."""
    t = Table(
        title=f"`{codecs['encoding']}` margins of {codecs['entries']} entries under other lossless pipelines "
        "(the KL is the encoding's, unchanged)"
    )
    t.add_column("filters + compressor (each then CRC-32C)")
    t.add_column("B/voxel/teacher", justify="right")
    for name, value in codecs["bytes_per_voxel"].items():
        t.add_row(name, f"{value:.4f}" if value is not None else "does not round-trip")
    return t


def _costs_table(cfg: Config, costs: dict[str, float]) -> Table:
    """What the experiment's store costs per array kind, in stored bytes per case voxel."""
    c = Table(
        title=f"what {cfg.store.path} costs, in stored bytes per case voxel (teacher arrays: per teacher)"
    )
    c.add_column("array")
    c.add_column("B/voxel", justify="right")
    for kind, value in costs.items():
        c.add_row(kind, f"{value:.4f}")
    return c


def _sketches_table(sketches: list[dict[str, Any]]) -> Table:
    """Per teacher and tap: how well the feature sketch keeps cosine similarities (voxel pairs, class prototypes)."""
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
    return k
