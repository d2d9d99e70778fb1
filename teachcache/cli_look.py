"""``teachcache ls / show / export / view / stats / diff``: seeing, exporting and summarising what the teachers wrote.

Registered on the ``teachcache`` app by :mod:`teachcache.cli` (imported at its end).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from core.errors import TeachCacheError
from teachcache.cli import app, out, user_errors

StoreArg = Annotated[str, typer.Argument(help="Store path or URL.")]
CaseArg = Annotated[str, typer.Argument(help="Case identifier (`teachcache ls STORE` lists them).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", "-j", help="Threads (default: one per core).", min=1)
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _open(store: str):
    from core.store.teacher_store import TeacherStore

    return TeacherStore.open(store)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@contextmanager
def _bar(label: str, enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(on_total, advance) callbacks driving a progress bar whose total is known only once the work is planned."""
    from core.progress import ProgressBar

    held: dict[str, ProgressBar] = {}

    def on_total(n: int) -> None:
        held["bar"] = ProgressBar(label, n, enabled).__enter__()

    def advance(k: int) -> None:
        if "bar" in held:
            held["bar"].advance(k)

    try:
        yield on_total, advance
    finally:
        if "bar" in held:
            held["bar"].__exit__(None, None, None)


@app.command("ls")
@user_errors
def ls(store: StoreArg, as_json: JsonOption = False) -> None:
    """List a store's teachers and cases, one line each, with how complete each is."""
    s = _open(store)
    cases = s.case_ids()
    keys = s.teacher_keys()
    teachers = [
        {"teacher": k, "complete": sum(s.has_entry(k, c) for c in cases), "cases": len(cases)} for k in keys
    ]
    rows = [
        {"case": c, "shape": list(s.case_shape(c)), "teachers": sum(s.has_entry(k, c) for k in keys)}
        for c in cases
    ]
    if as_json:
        _print_json({"store": s.location, "teachers": teachers, "cases": rows, "teacher_count": len(keys)})
        return
    for t in teachers:
        state = "complete" if t["complete"] == t["cases"] else "INCOMPLETE"
        out.print(f"teacher  {t['teacher']:<28} {t['complete']}/{t['cases']} cases  {state}", highlight=False)
    for r in rows:
        state = "complete" if r["teachers"] == len(keys) else "INCOMPLETE"
        shape = "×".join(map(str, r["shape"]))
        out.print(
            f"case     {r['case']:<28} {shape:<14} {r['teachers']}/{len(keys)} teachers  {state}",
            highlight=False,
        )


def _axis(axis: str) -> int:
    from core.inspection.views import AXES

    key = axis.lower()
    if key in AXES:
        return AXES[key]
    if key in ("0", "1", "2"):
        return int(key)
    raise TeachCacheError(f"--axis must be x, y or z (or 0, 1, 2), got '{axis}'")


@app.command()
@user_errors
def show(
    store: StoreArg,
    case: CaseArg,
    teacher: Annotated[
        list[str] | None,
        typer.Option(
            "--teacher",
            "-t",
            help="Teacher to show (repeatable): a name, or a copy such as unetr/fold_0. Default: every teacher, each "
            "by its copy that did not train on the case.",
        ),
    ] = None,
    slice_: Annotated[
        int | None, typer.Option("--slice", "-s", help="Slice index along --axis (default: most foreground).")
    ] = None,
    axis: Annotated[str, typer.Option("--axis", "-a", help="x, y or z.")] = "z",
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="PNG to write (default: <case>.png).")
    ] = None,
) -> None:
    """Draw one slice of a case as a PNG: image channels, label, where the teachers disagree, and per teacher its
    foreground probability and coarse and fine attention maps over the scan."""
    from core.inspection.views import render_case, resolve_case, resolve_teachers

    s = _open(store)
    case_id = resolve_case(s, case)
    teachers = resolve_teachers(s, teacher, case_id)
    drawn = render_case(s, case_id, teachers, output or Path(f"{case_id}.png"), _axis(axis), slice_)
    out.print(
        f"{drawn['path']}: {case_id}, slice {drawn['axis']} = {drawn['slice']}, {len(teachers)} teacher(s) "
        f"({', '.join(teachers)}); teachers disagree on {drawn['disagreeing_voxels']} voxels",
        highlight=False,
    )


@app.command()
@user_errors
def export(
    store: StoreArg,
    case: CaseArg,
    teacher: Annotated[str, typer.Option("--teacher", "-t", help="Teacher name or copy (unetr/fold_0).")],
    what: Annotated[str, typer.Option("--what", "-w", help="probs, coarse or fine.")],
    output: Annotated[Path, typer.Option("--out", "-o", help="NIfTI file to write (.nii.gz or .nii).")],
    original: Annotated[
        bool,
        typer.Option("--original", help="Resample onto the raw image's grid (else the preprocessed grid)."),
    ] = False,
    cls: Annotated[
        str | None,
        typer.Option(
            "--class", help="Class name or index for probs (default: foreground of a binary task, else all)."
        ),
    ] = None,
) -> None:
    """Write a teacher's probabilities or attention map of one case as NIfTI in the case's geometry, to open over
    the scan in 3D Slicer or ITK-SNAP."""
    from core.inspection.views import export_nifti, resolve_case, resolve_teachers

    s = _open(store)
    case_id = resolve_case(s, case)
    (key,) = resolve_teachers(s, [teacher], case_id)
    written = export_nifti(s, case_id, key, what, output, original=original, cls=cls)
    detail = f", class {written['class']}" if written["class"] else ""
    out.print(
        f"{written['path']}: {key} {what} of {case_id}{detail}, {'×'.join(map(str, written['shape']))} on the "
        f"{written['geometry']} grid",
        highlight=False,
    )


@app.command()
@user_errors
def view(
    store: StoreArg,
    case: CaseArg,
    teacher: Annotated[
        list[str] | None, typer.Option("--teacher", "-t", help="Teacher(s) to add (default: every teacher).")
    ] = None,
) -> None:
    """Open a case in napari: image channels, label, each teacher's probability and attention maps as layers at
    their true scale, read lazily from Zarr. Needs the viewer extra: pip install 'teachcache[viewer]'."""
    from core.inspection.views import napari_layers, resolve_case, resolve_teachers

    try:
        import napari
    except ImportError:
        raise TeachCacheError(
            "teachcache view needs napari, which is not installed: pip install 'teachcache[viewer]' "
            "(or use `teachcache show` for a PNG, `teachcache export` for NIfTI)"
        ) from None
    s = _open(store)
    case_id = resolve_case(s, case)
    layers = napari_layers(s, case_id, resolve_teachers(s, teacher, case_id))
    viewer = napari.Viewer(title=f"teachcache — {case_id}")
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    napari.run()


@app.command()
@user_errors
def stats(
    store: StoreArg,
    fold: Annotated[
        int | None, typer.Option("--fold", "-f", help="Only this fold's validation cases.", min=0)
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for stats[-fold<k>].json and .png (default: stats/ beside the store)."
        ),
    ] = None,
    workers: WorkersOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Per teacher: Dice against the labels, mean entropy, calibration (ECE) and agreement with the other teachers,
    each case scored by the teacher copy that did not train on it; computed in parallel with dask."""
    from core.inspection.stats import stats_chart, store_stats

    s = _open(store)
    folder = output if output is not None else _beside_store(store) / "stats"
    if not folder.parent.is_dir():
        raise TeachCacheError(
            f"output folder {folder}: {folder.parent} does not exist; create it or choose another -o"
        )
    with _bar("teacher stats", not quiet and not as_json) as (on_total, advance):
        result = store_stats(s, fold=fold, workers=workers, progress=advance, on_total=on_total)
    folder.mkdir(exist_ok=True)
    stem = "stats" if fold is None else f"stats-fold{fold}"
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    stats_chart(result, folder / f"{stem}.png")
    if as_json:
        _print_json(result)
        return
    scope = f"fold {fold}'s validation cases" if fold is not None else "every case"
    t = Table(title=f"teachers over {result['cases']} cases ({scope}), preprocessed grid")
    for col in ("teacher", "copies", "cases", "Dice", "entropy (nats)", "ECE", "agreement"):
        t.add_column(col, justify="left" if col in ("teacher", "copies") else "right")
    for r in result["teachers"]:
        copies = r["copies"][0] if len(r["copies"]) == 1 else f"{len(r['copies'])} fold copies"
        agreement = f"{r['agreement']:.3f}" if r["agreement"] is not None else "—"
        t.add_row(r["teacher"], copies, str(r["cases"]), f"{r['dice']:.3f}", f"{r['entropy']:.4f}",
                  f"{r['ece']:.4f}", agreement)  # fmt: skip
    out.print(t)
    out.print(f"written: {folder / stem}.json, {folder / stem}.png", highlight=False)


def _beside_store(store: str) -> Path:
    if "://" in store and not store.startswith("file://"):
        return Path.cwd()
    return Path(store.removeprefix("file://")).resolve().parent


@app.command()
@user_errors
def diff(
    store_a: Annotated[str, typer.Argument(help="First store (A).")],
    store_b: Annotated[str, typer.Argument(help="Second store (B), of the same cases.")],
    workers: WorkersOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Compare two stores of the same cases (two encodings, two checkpoints): per teacher and array, the max and mean
    absolute difference of the decoded values and, for the softmax, KL(A ‖ B)."""
    from core.inspection.stats import diff_stores

    a, b = _open(store_a), _open(store_b)
    with _bar("diff", not quiet and not as_json) as (on_total, advance):
        result = diff_stores(a, b, workers=workers, progress=advance, on_total=on_total)
    if as_json:
        _print_json(result)
        return
    t = Table(title=f"A = {a.location}\nB = {b.location}")
    for col in ("teacher", "cases", "array", "max |A−B|", "mean |A−B|", "KL(A‖B)"):
        t.add_column(col, justify="left" if col in ("teacher", "array") else "right")
    for row in result["teachers"]:
        for arr in row["arrays"]:
            if "max" in arr:
                kl = f"{arr['kl']:.2e}" if "kl" in arr else ""
                t.add_row(
                    row["teacher"],
                    str(row["cases"]),
                    arr["array"],
                    f"{arr['max']:.3g}",
                    f"{arr['mean']:.3g}",
                    kl,
                )
            elif "only_in" in arr:
                t.add_row(
                    row["teacher"], str(row["cases"]), arr["array"], f"only in {arr['only_in']}", "", ""
                )
            else:
                shapes = f"shape {arr['shape_a']} vs {arr['shape_b']}"
                t.add_row(row["teacher"], str(row["cases"]), arr["array"], shapes, "", "")
    out.print(t)
    for label, key in (("teachers only in A", "only_in_a"), ("teachers only in B", "only_in_b"),
                       ("cases only in A", "cases_only_in_a"), ("cases only in B", "cases_only_in_b")):  # fmt: skip
        if result[key]:
            out.print(f"{label}: {', '.join(result[key])}", highlight=False)
