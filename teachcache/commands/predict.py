"""``teachcache predict / evaluate / export-model``: using the distilled student on new cases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from core.errors import TeachCacheError
from teachcache.app import JsonSummaryOption, QuietBarOption, out, print_json, user_errors

__all__ = ["commands", "evaluate", "export_model", "predict"]

commands = typer.Typer()
"""This module\'s commands; :mod:`teachcache.cli` adds them to the app."""


def _folds(values: list[str] | None, extra: list[str]) -> list[int] | None:
    """``--folds 0 1 2`` (nnU-Net's way: the numbers after the first arrive as extra arguments), ``--folds 0,1`` or
    ``--folds 0 --folds 1``."""
    if values is None:
        if extra:
            raise TeachCacheError(f"unexpected argument(s): {' '.join(extra)}")
        return None
    folds = []
    for token in [*values, *extra]:
        for part in token.split(","):
            if not part.strip().isdigit():
                raise TeachCacheError(f"--folds takes fold numbers (--folds 0 1 2 3 4), got '{part}'")
            folds.append(int(part))
    return folds


@commands.command(context_settings={"allow_extra_args": True})
@user_errors
def predict(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint",
            "-m",
            help="A student's run folder (runs_dir/students/kd-<kind>/fold_<k>), its kd-<kind> folder (with --folds: "
            "those folds, else every fold in it), or a checkpoint file.",
        ),
    ],
    inputs: Annotated[
        list[Path],
        typer.Option(
            "--input",
            "-i",
            help="A folder of cases (imagesTs/ naming CASE_0000.nii.gz, or CASE_<modality>, or one 4-D file per case) "
            "or a case's files (repeatable).",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write <case>.nii.gz into.")],
    folds: Annotated[
        list[str] | None,
        typer.Option(
            "--folds", "-f", help="Folds whose students are averaged (probabilities): --folds 0 1 2 3 4."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto (CUDA when available).")] = "auto",
    save_probabilities: Annotated[
        bool,
        typer.Option("--save-probabilities", help="Also write probabilities/<case>.nii.gz (X, Y, Z, K)."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace predictions already in the output folder.")
    ] = False,
    postprocess: Annotated[
        bool,
        typer.Option(
            help="Keep only the largest connected component of the classes the students' runs chose on their "
            "held-out cases (every student's choice; none without training.holdout)."
        ),
    ] = True,
    as_json: JsonSummaryOption = False,
    quiet: QuietBarOption = False,
) -> None:
    """Segment new cases with a trained student: the run's own preprocessing, sliding windows (mixed precision on
    CUDA), folds averaged, and a label map per case in the input image's own geometry (shape, affine, orientation)."""
    from core.deploy.predict import predict_cases
    from core.deploy.student_runs import load_students
    from core.inference import resolve_device

    if device not in ("auto", "cpu", "cuda"):
        raise TeachCacheError(f"--device must be cpu, cuda or auto, got '{device}'")
    students = load_students(checkpoint, _folds(folds, list(ctx.args)))
    summary = predict_cases(
        students,
        inputs,
        output,
        resolve_device(device),
        overwrite=overwrite,
        save_probabilities=save_probabilities,
        progress=not quiet and not as_json,
        postprocess=postprocess,
    )
    if as_json:
        print_json(summary)
    else:
        _print_predictions(summary, output)


def _print_predictions(summary: dict[str, Any], output: Path) -> None:
    """``predict``'s table of cases (shape, seconds, sliding-window seconds) and its one-line summary."""
    table = Table(title=f"{len(summary['cases'])} case(s) → {output}")
    for column in ("case", "shape", "seconds", "windows (s)"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for row in summary["cases"]:
        table.add_row(
            row["case"],
            "×".join(map(str, row["shape"])),
            f"{row['seconds']:.2f}",
            f"{row['window_seconds']:.2f}",
        )
    out.print(table)
    folds_used = ", ".join(str(s["fold"]) for s in summary["students"])
    out.print(
        f"{len(summary['students'])} student(s) (fold {folds_used}) on {summary['device']}: "
        f"{summary['seconds_per_case']:.2f} s per case; preprocessing from the {summary['inputs_recorded_in']}; "
        f"summary: {output / 'prediction.json'}",
        highlight=False,
        soft_wrap=True,
    )


@commands.command()
@user_errors
def evaluate(
    pred_dir: Annotated[Path, typer.Argument(help="Folder of predicted label maps (<case>.nii.gz).")],
    label_dir: Annotated[Path, typer.Argument(help="Folder of label files (<case>.nii.gz, e.g. labelsTs/).")],
    as_json: JsonSummaryOption = False,
) -> None:
    """Dice and HD95 per case and class, and their means, with the metric code validation uses, at each label
    file's spacing."""
    from core.evaluation.scoring import evaluate_folder

    scores = evaluate_folder(pred_dir, label_dir)
    if as_json:
        print_json(scores)
        return
    names = scores["class_names"][1:]
    table = Table(title=f"{len(scores['cases'])} case(s): {pred_dir} vs {label_dir}")
    table.add_column("case")
    for name in names:
        table.add_column(f"Dice {name}", justify="right")
        table.add_column(f"HD95 {name} (mm)", justify="right")
    for row in scores["cases"]:
        table.add_row(
            row["case"], *[f"{v:.3f}" for pair in zip(row["dice"], row["hd95"], strict=True) for v in pair]
        )
    table.add_row(
        "mean",
        *[
            f"{v:.3f}"
            for pair in zip(scores["mean_dice_per_class"], scores["mean_hd95_per_class"], strict=True)
            for v in pair
        ],
        style="bold",
    )
    out.print(table)
    out.print(f"mean Dice {scores['mean_dice']:.3f}, mean HD95 {scores['mean_hd95']:.2f} mm", highlight=False)
    if scores["predictions_without_label"]:
        extra = scores["predictions_without_label"]
        out.print(
            f"not scored (no label): {', '.join(extra[:5])}{'…' if len(extra) > 5 else ''}", highlight=False
        )


@commands.command("export-model")
@user_errors
def export_model(
    run: Annotated[
        Path, typer.Argument(help="A student's run folder (…/kd-<kind>/fold_<k>) or checkpoint file.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="student.pt (TorchScript) or student.onnx (ONNX).")
    ],
    fold: Annotated[
        int | None, typer.Option("--fold", help="With a kd-<kind> folder: which fold's student.", min=0)
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
    as_json: JsonSummaryOption = False,
) -> None:
    """Export a student as TorchScript or ONNX, checked against PyTorch on a random window, with the inputs it
    expects (channels, spacing, orientation, normalisation, classes, window) in a JSON beside it (docs/deploy.md)."""
    from core.deploy.export import export_student, record_path
    from core.deploy.student_runs import find_checkpoints, load_student

    found = find_checkpoints(run, [fold] if fold is not None else None)
    if len(found) > 1:
        raise TeachCacheError(
            f"{run} holds {len(found)} fold runs ({', '.join(f'fold_{k}' for _, k in found)}); pick one with --fold K"
        )
    taken = [p for p in (output, record_path(output)) if p.exists()]
    if taken and not overwrite:
        raise TeachCacheError(f"{taken[0]} exists; pass --overwrite to replace it, or choose another name")
    path, k = found[0]
    record = export_student(load_student(path, k), output)
    if as_json:
        print_json(record)
        return
    out.print(
        f"{output} ({record['model']['runtime']}) and {record_path(output)}: {record['model']['arch']} from {path}; "
        f"matches PyTorch within {record['check']['max_abs_difference']:.2g} on a "
        f"{'×'.join(map(str, record['check']['input_shape'][2:]))} window",
        highlight=False,
        soft_wrap=True,
    )
