"""``teachcache ls / inspect / show / export / view / stats / diff / verify``: seeing, exporting, summarising and
checking what the teachers wrote into a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from core.errors import TeachCacheError
from teachcache.app import (
    JsonOption,
    JsonTableOption,
    JsonTablesOption,
    QuietBarOption,
    StoreArg,
    err,
    load_experiment,
    out,
    print_json,
    progress_bar,
    user_errors,
)

if TYPE_CHECKING:
    from core.store.teacher_store import TeacherStore

__all__ = ["commands", "diff", "export", "inspect", "ls", "show", "stats", "verify", "view"]

commands = typer.Typer()
"""This module\'s commands; :mod:`teachcache.cli` adds them to the app."""

CaseArg = Annotated[str, typer.Argument(help="Case identifier (`teachcache ls STORE` lists them).")]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", "-j", help="Threads (default: one per core).", min=1)
]


def _open(store: str) -> TeacherStore:
    from core.store.teacher_store import TeacherStore

    return TeacherStore.open(store)


@commands.command("ls")
@user_errors
def ls(store: StoreArg, as_json: JsonTableOption = False) -> None:
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
        print_json({"store": s.location, "teachers": teachers, "cases": rows, "teacher_count": len(keys)})
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


@commands.command()
@user_errors
def inspect(
    store: StoreArg,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", "-t", help="Only this teacher (name or copy), with its provenance."),
    ] = None,
    case: Annotated[str | None, typer.Option("--case", help="Only this case's arrays.")] = None,
    as_json: JsonTablesOption = False,
) -> None:
    """Show a store's teachers, cases and arrays (shapes, dtypes, chunks, shards, codecs, stored vs raw bytes) and
    each teacher's provenance."""
    from core.inspection.describe import describe_store
    from core.inspection.views import resolve_case, resolve_teachers

    opened = _open(store)
    keys = None
    if teacher is not None:  # a copy, or a name: every copy of it (one per fold)
        keys = [k for k in opened.teacher_keys() if teacher in (k, k.split("/")[0])]
        keys = keys or resolve_teachers(opened, [teacher])  # none: the error naming the cached teachers
    if case is not None:
        resolve_case(opened, case)
    info = describe_store(opened, teachers=keys, case=case)
    if as_json:
        print_json(info)
        return
    ds = info["dataset"]
    out.print(
        f"[bold]{info['store']}[/] (format {info['format_version']}): {ds['name']}, {len(info['cases'])} cases, "
        f"channels {', '.join(ds['channel_names'])}, classes {', '.join(ds['class_names'])}, "
        f"{_bytes(info['stored_bytes'])} stored of {_bytes(info['raw_bytes'])} raw"
    )
    out.print(_teachers_table(info))
    if teacher is not None:
        for row in info["teachers"]:
            out.print(f"[bold]provenance of {row['name']}[/]")
            out.print_json(json.dumps(row["provenance"]))
    if case is None:
        out.print(_cases_table(info))
    out.print(_arrays_table(info, case))


def _bytes(n: float) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _teachers_table(info: dict[str, Any]) -> Table:
    """``inspect``'s teachers: architecture, training fold, completeness, checkpoint hash, caching time."""
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
    return t


def _cases_table(info: dict[str, Any]) -> Table:
    """``inspect``'s cases: shape and how many teachers are cached for each."""
    cs = Table(title="cases")
    for col in ("case", "shape", "teachers cached"):
        cs.add_column(col)
    for c in info["cases"]:
        cached = f"{len(c['teachers_complete'])}/{len(info['teachers'])}"
        cs.add_row(c["case_id"], "×".join(map(str, c["shape"])), cached)
    return cs


def _arrays_table(info: dict[str, Any], case: str | None) -> Table:
    """``inspect``'s arrays of one case (``case``, else the first): layout, codecs and bytes of each."""
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
    return a


def _axis(axis: str) -> int:
    """``--axis`` (x, y, z or 0, 1, 2) as an array axis."""
    from core.inspection.views import AXES

    key = axis.lower()
    if key in AXES:
        return AXES[key]
    if key in ("0", "1", "2"):
        return int(key)
    raise TeachCacheError(f"--axis must be x, y or z (or 0, 1, 2), got '{axis}'")


@commands.command()
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


@commands.command()
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


@commands.command()
@user_errors
def view(
    store: StoreArg,
    case: CaseArg,
    teacher: Annotated[
        list[str] | None, typer.Option("--teacher", "-t", help="Teacher(s) to add (default: every teacher).")
    ] = None,
) -> None:
    """Open a case in napari: image channels, label, each teacher's probability and attention maps as layers at
    their true scale, read lazily from Zarr. Needs the viewer extra: pip install 'teachcache\\[viewer]'."""
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


@commands.command()
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
    as_json: JsonTableOption = False,
    quiet: QuietBarOption = False,
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
    from core.paths import require_writable

    # stats/ beside the store by default: a store on a read-only share needs -o (said before the work starts)
    require_writable(folder, "the statistics", "choose another folder with -o")
    with progress_bar("teacher stats", not quiet and not as_json) as (on_total, advance):
        result = store_stats(s, fold=fold, workers=workers, progress=advance, on_total=on_total)
    stem = "stats" if fold is None else f"stats-fold{fold}"
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    stats_chart(result, folder / f"{stem}.png")
    if as_json:
        print_json(result)
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
    files = result.get("files")
    if files and files["entries"]:
        out.print(
            f"files: {files['files_per_entry']:.1f} per (teacher, case) entry, {files['data_files_per_array']:.2f} "
            f"data file(s) per array, over {files['entries']} entries",
            highlight=False,
        )
    out.print(f"written: {folder / stem}.json, {folder / stem}.png", highlight=False)


def _beside_store(store: str) -> Path:
    """The folder holding a local store (the working directory for a remote one)."""
    if "://" in store and not store.startswith("file://"):
        return Path.cwd()
    return Path(store.removeprefix("file://")).resolve().parent


@commands.command()
@user_errors
def diff(
    store_a: Annotated[str, typer.Argument(help="First store (A).")],
    store_b: Annotated[str, typer.Argument(help="Second store (B), of the same cases.")],
    workers: WorkersOption = None,
    as_json: JsonTableOption = False,
    quiet: QuietBarOption = False,
) -> None:
    """Compare two stores of the same cases (two encodings, two checkpoints): per teacher and array, the max and mean
    absolute difference of the decoded values and, for the softmax, KL(A ‖ B)."""
    from core.inspection.stats import diff_stores

    a, b = _open(store_a), _open(store_b)
    with progress_bar("diff", not quiet and not as_json) as (on_total, advance):
        result = diff_stores(a, b, workers=workers, progress=advance, on_total=on_total)
    if as_json:
        print_json(result)
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


@commands.command()
@user_errors
def verify(
    store: StoreArg,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Also check that every teacher this experiment configures is cached."
        ),
    ] = None,
    rehash: Annotated[
        bool,
        typer.Option(
            "--rehash",
            help="First bring a store written before format 2.2 up to it in place: every case and entry without "
            "chunk checksums or digests is re-encoded with them (values unchanged; a damaged one is left alone and "
            "named). Takes the store's write lock.",
        ),
    ] = False,
    as_json: JsonOption = False,
    quiet: QuietBarOption = False,
) -> None:
    """Check every case and teacher entry: complete, no lost, corrupt or moved chunk, right shapes, finite, softmax
    sums to 1, provenance.

    Exit codes: 0 the store is sound; 1 problems found (listed); 2 not a store, or a bad argument; 3 the check
    itself could not finish (the message says why) — so scripts can tell a bad store from a failed check.
    """
    from core.store.verify import verify_store

    configured = load_experiment(config).teachers if config is not None else None
    expected = [t.name for t in configured] if configured is not None else None
    if rehash:
        from core.store.rehash import rehash_store

        _open(store)  # a StoreError for a missing or foreign store, before the lock file is made
        with progress_bar("rehash", not quiet and not as_json) as (on_total, advance):
            started: list[int] = []

            def on_group(done: int, total: int) -> None:
                if not started:
                    on_total(total)
                    started.append(total)
                advance(1)

            done = rehash_store(store, on_group)
        if not as_json:
            out.print(
                f"rehash: {done.rewritten} case(s)/entries given checksums and digests, {done.current} already had "
                f"them, {len(done.damaged)} damaged left alone",
                highlight=False,
            )
    opened = _open(store)
    try:
        result = verify_store(opened, expected_teachers=expected, teachers=configured)
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
        print_json(result)
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
