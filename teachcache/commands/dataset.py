"""``teachcache dataset check``: what a raw dataset folder holds, and every problem per case, before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from core.errors import TeachCacheError
from teachcache.app import JsonOption, QuietBarOption, err, out, print_json, progress_bar, user_errors

__all__ = ["check", "commands", "dataset_app"]

dataset_app = typer.Typer(help="Raw datasets: check a folder before preprocessing it.", no_args_is_help=True)
"""``teachcache dataset``: the raw-dataset subcommands."""
commands = typer.Typer()
"""This module's commands (the ``dataset`` group); :mod:`teachcache.cli` adds them to the app."""
commands.add_typer(dataset_app, name="dataset")


@dataset_app.command("check")
@user_errors
def check(
    path: Annotated[Path, typer.Argument(help="The raw dataset folder.")],
    layout: Annotated[
        str | None,
        typer.Option(
            "--layout", "-l", help="nnunet, msd, hecktor or picai (default: guessed from the folder)."
        ),
    ] = None,
    labels_dir: Annotated[
        Path | None,
        typer.Option("--labels-dir", help="PI-CAI: the picai_labels folder (human_expert masks)."),
    ] = None,
    bbox: Annotated[
        Path | None, typer.Option("--bbox", help="HECKTOR: bbox.csv (default: found beside the images).")
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietBarOption = False,
) -> None:
    """Report the cases, modalities, spacings, shapes and label values found, and every problem per case with the
    file's path (unreadable or missing files, modalities that do not overlap, NaN voxels, label values outside the
    classes, empty labels where the dataset has none, a box outside the image, duplicate or unsafe case ids).
    Exit 0: no problem; 1: problems listed; 2: bad arguments."""
    from core.config import DatasetConfig
    from core.data.check import check_dataset
    from core.data.layouts import LAYOUTS

    if layout is not None and layout not in LAYOUTS:
        raise TeachCacheError(f"--layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    if not path.is_dir():
        raise TeachCacheError(f"dataset folder not found: {path}")
    cfg = DatasetConfig(raw_dir=path, labels_dir=labels_dir, bbox_file=bbox)
    with progress_bar("checking cases", not quiet and not as_json) as (on_total, advance):
        report = check_dataset(cfg, layout, progress=advance, on_total=on_total)
    if as_json:
        print_json(report)
    else:
        _print_check(report)
    if not report["ok"]:
        raise typer.Exit(code=1)


def _print_check(report: dict[str, Any]) -> None:
    """The dataset's summary and per-modality table on stdout; each problem on stderr; then the verdict."""
    if report.get("name"):
        out.print(
            f"[bold]{escape(report['root'])}[/]: {report['layout']} layout, {report['name']}, {report['cases']} "
            f"cases ({report['patients']} patients), channels {', '.join(report['channels'])}, classes "
            f"{', '.join(report['classes'])}; label values found {report['label_values']}; "
            f"{report['lesion_free']} case(s) without foreground",
            highlight=False,
        )
        if report["skipped"]:
            out.print(f"skipped {len(report['skipped'])} case(s): {escape('; '.join(report['skipped'][:3]))}"
                      + (" …" if len(report["skipped"]) > 3 else ""), highlight=False)  # fmt: skip
        t = Table(title="modalities (over the cases)")
        for col in ("modality", "spacing min (mm)", "median", "max", "shape min", "shape max"):
            t.add_column(col)
        for name, sp in report["spacing"].items():
            sh = report["shapes"][name]
            t.add_row(name, *(str(sp[k]) for k in ("min", "median", "max")), str(sh["min"]), str(sh["max"]))
        out.print(t)
    for p in report["problems"]:
        where = f" ({p['file']})" if p.get("file") and p["file"] not in p["problem"] else ""
        err.print(f"[red]problem:[/] {escape(p['case'])}{escape(where)}: {escape(p['problem'])}",
                  highlight=False, soft_wrap=True)  # fmt: skip
    if report["ok"]:
        out.print("ok: no problem found")
    else:
        err.print(f"{len(report['problems'])} problem(s)")
