"""The cross-validation report: every run kind over every fold it was trained on, compared over folds.

Reads only what runs wrote (``summary.json`` and ``validation_per_case.csv`` of the headline models: final, or
chosen on held-out training cases) under
``runs_dir/students/kd-<kind>/fold_<k>/`` and ``runs_dir/teachers/<name>/fold_<k>/``. Writes
``runs_dir/report.json``, ``report.md`` and ``report_dice.png`` (per-case Dice of each run kind), each whole or
not at all.

The fold is the unit of inference (:mod:`core.evaluation.statistics`): the primary endpoint declared in
``evaluation.primary_endpoint`` first, every other comparison secondary with Holm-adjusted p-values, and the
equivalence of each cached recipe with its online-context twin. Runs of mixed provenance are refused before
anything is written (:mod:`core.evaluation.provenance`). The per-case paired tests stay, labelled secondary: the
cases of one fold's model are not independent replicates of a recipe.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from contextvars import ContextVar
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.errors import ConfigError, TeachCacheError
from core.evaluation.cv_report_markdown import cv_report_markdown
from core.evaluation.kd_health import MOST as HEALTH_MOST
from core.evaluation.kd_health import verdict as kd_verdict
from core.evaluation.ledger import Ledger
from core.evaluation.provenance import RunRecord, check_pooling
from core.evaluation.scoring import HOLDOUT_CSV, VALIDATION_CSV
from core.evaluation.statistics import ComparisonError, FoldComparison, compare_folds, equivalence, holm

__all__ = ["build_cv_report", "fold_ensemble", "paired_tests"]

BASELINE = "student kd-none"
# which cases a report compares: the validation cases (the CV report) or the held-out training cases (a screening)
SCORES_FILES = {"validation": VALIDATION_CSV, "holdout": HOLDOUT_CSV}
REPORT_STEMS = {"validation": "report", "holdout": "screening"}
_SCORES: ContextVar[str] = ContextVar("per-case scores file", default=SCORES_FILES["validation"])


def _runs(cfg: Config) -> dict[str, dict[tuple[int, int | None], Path]]:
    """``{run name: {(fold, seed): run folder}}`` for every finished run (a summary and per-case scores); ``seed`` is
    ``None`` for the config's own seed, else a repeat's (``kd-<kind>/seed_<s>/fold_<k>``). Runs the ledger
    (``output.results_dir``) keeps and ``runs_dir`` lacks are read from the ledger."""
    found: dict[str, dict[tuple[int, int | None], Path]] = {}
    patterns = (
        ("teacher", "teachers/*/fold_*"),
        ("student", "students/kd-*/fold_*"),
        ("student", "students/kd-*/seed_*/fold_*"),
    )
    ledger = Ledger.of(cfg)
    for role, pattern in patterns:
        here = [(folder, folder) for folder in sorted(cfg.output.runs_dir.glob(pattern))]
        kept = ledger.run_folders(pattern) if ledger is not None else []
        for folder, where in [*kept, *here]:  # a run folder under runs_dir wins over the ledger's copy
            if not ((where / "summary.json").is_file() and (where / _SCORES.get()).is_file()):
                continue
            repeat = folder.parent.name.startswith("seed_")
            name = f"{role} {(folder.parent.parent if repeat else folder.parent).name}"
            seed = int(folder.parent.name.removeprefix("seed_")) if repeat else None
            fold = int(folder.name.removeprefix("fold_"))
            found.setdefault(name, {})[(fold, seed)] = where
    return found


def _cache_seconds(cfg: Config, folds: list[int]) -> dict[str, float]:
    """Per fold, the seconds ``make cache`` took for the fold's distilled teachers (the store's ``cache_seconds``;
    a teacher cached for every fold counts in each): the cost the cached runs share. Empty without a store."""
    from core.experiment import open_store_for

    try:
        store = open_store_for(cfg)
    except TeachCacheError:
        return {}
    cached = set(store.teacher_keys())
    out = {}
    for fold in folds:
        keys = [t.store_key(fold) for t in cfg.distilled_teachers()]
        seconds = [store.teacher_metadata(k).get("cache_seconds") for k in keys if k in cached]
        if seconds and all(isinstance(v, int | float) for v in seconds) and len(seconds) == len(keys):
            out[str(fold)] = round(float(sum(seconds)), 2)
    return out


def _ensemble(
    cfg: Config, folds: list[int], held_out: dict[int, list[str]] | None = None
) -> dict[str, tuple[float, float]]:
    """Per validation case (``"<fold>/<case>"``), the Dice and HD95 of the teachers' ensemble: the argmax of their
    cached class distributions averaged with equal weights, read from the store (the teachers distilled on each fold,
    as stage 2 reads them). Scored like the runs' headlines: in the original geometry when the raw dataset the store
    was made from is at hand, else on the preprocessed grid. Folds whose teachers are not all cached are left out.
    With ``held_out`` (a screening), each fold's held-out training cases instead, on the preprocessed grid as
    ``holdout_per_case.csv`` scores them — only those every teacher held out of its own training too (its store
    provenance's ``holdout_cases``): an ensemble scored on its teachers' training cases would flatter them."""
    from core.data.layouts import read_dataset
    from core.evaluation.geometry import original_label, original_spacing, to_original_geometry
    from core.evaluation.metrics import dice_per_class, hd95_per_class
    from core.experiment import fold_split, open_store_for

    try:
        store = open_store_for(cfg)
    except TeachCacheError:
        return {}
    try:
        original = read_dataset(cfg.dataset).manifest_hash() == store.metadata["dataset"]["manifest_hash"]
    except (TeachCacheError, OSError):
        original = False
    teachers = cfg.distilled_teachers()
    cached = set(store.teacher_keys())
    num_classes = len(store.metadata["dataset"]["class_names"])
    out: dict[str, tuple[float, float]] = {}
    if held_out is not None:
        original = False
    for fold in folds:
        keys = [t.store_key(fold) for t in teachers]
        _, val = fold_split(cfg, store, fold)
        if held_out is not None:
            unseen = [
                set(store.teacher_metadata(k).get("holdout_cases") or []) if k in cached else set()
                for k in keys
            ]
            val = [c for c in held_out.get(fold, []) if all(c in u for u in unseen)]
        if not keys or not set(keys) <= cached or not all(store.has_entry(k, c) for k in keys for c in val):
            continue
        for case in val:
            mean = np.mean([store.read_softmax(k, case) for k in keys], axis=0)
            attrs = store.case_attrs(case)
            prediction, label, spacing = mean.argmax(0), store.read_label(case), attrs["spacing"]
            if original:
                prediction = to_original_geometry(
                    prediction, attrs["affine"], attrs["original_affine"], attrs["original_shape"]
                )
                label, spacing = original_label(store, case), original_spacing(attrs["original_affine"])
            out[f"{fold}/{case}"] = (
                float(np.mean(dice_per_class(prediction, label, num_classes))),
                float(np.mean(hd95_per_class(prediction, label, num_classes, spacing))),
            )
    return out


def fold_ensemble(cfg: Config, fold: int, on: str) -> dict[str, tuple[float, float]]:
    """One fold's teacher-ensemble scores as the report computes them, on the validation cases (``on``
    ``"validation"``) or the screening's held-out ones (``"holdout"``), for the ledger."""
    if on == "validation":
        return _ensemble(cfg, [fold])
    token = _SCORES.set(SCORES_FILES[on])
    try:
        return _ensemble(cfg, [fold], _held_out_cases(_runs(cfg)))
    finally:
        _SCORES.reset(token)


@cache
def _case_rows(folder: Path) -> tuple[dict[str, str], ...]:
    """A run's per-case scores (``validation_per_case.csv``, or ``holdout_per_case.csv`` for a screening), read once
    per report (:func:`build_cv_report` clears the cache)."""
    with open(folder / _SCORES.get()) as f:
        return tuple(csv.DictReader(f))


def _per_case(folder: Path) -> dict[str, tuple[float, float]]:
    # runs written before HD95 was measured have no mean_hd95_mm column
    return {
        r["case"]: (float(r["mean_dice"]), float(r.get("mean_hd95_mm", "nan"))) for r in _case_rows(folder)
    }


def _per_class(folders: list[Path]) -> dict[str, dict[str, float]]:
    """Per class, the mean over the runs' validation cases of its Dice and HD95 (``dice_<class>``,
    ``hd95_mm_<class>`` columns; HD95 over the cases where it is finite): ``{"dice": {...}, "hd95_mm": {...}}``."""
    columns: dict[str, list[float]] = {}
    for folder in folders:
        for r in _case_rows(folder):
            for key, value in r.items():
                if key.startswith(("dice_", "hd95_mm_")):
                    columns.setdefault(key, []).append(float(value))
    out: dict[str, dict[str, float]] = {"dice": {}, "hd95_mm": {}}
    for key, values in columns.items():
        metric, name = (
            ("hd95_mm", key.removeprefix("hd95_mm_")) if key.startswith("hd95") else ("dice", key[5:])
        )
        finite = [v for v in values if math.isfinite(v)]
        out[metric][name] = float(np.mean(finite)) if finite else math.nan
    return out


def paired_tests(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired comparison of two runs on the same cases: mean difference (a − b), Wilcoxon signed-rank and paired t.

    Returns:
        ``{"n", "mean_difference", "wilcoxon_p", "t_test_p"}``; p-values are NaN with fewer than 2 cases or no
        difference at all.
    """
    from scipy import stats

    x, y = np.asarray(a, float), np.asarray(b, float)
    d = x - y
    out = {"n": len(d), "mean_difference": float(d.mean()) if len(d) else math.nan}
    if len(d) < 2 or not np.any(d != 0):
        return {**out, "wilcoxon_p": math.nan, "t_test_p": math.nan}
    out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue)
    out["t_test_p"] = float(stats.ttest_rel(x, y).pvalue)
    return out


ENSEMBLE = "teacher ensemble (cached, equal weights)"

# a run's per-case (Dice, HD95) of each of its (fold, seed) folders
RunCases = dict[tuple[int, int | None], dict[str, tuple[float, float]]]


def build_cv_report(cfg: Config, allow_mixed: bool = False, on: str = "validation") -> dict[str, Any]:
    """Collect every run over its folds; check they may be pooled (:mod:`core.evaluation.provenance`); compare runs
    over folds (primary endpoint, secondary comparisons with Holm-adjusted p-values, equivalence of cached and
    online-context twins) and, secondary, per case.

    Args:
        cfg: the experiment.
        allow_mixed: pool runs of mixed provenance anyway (the report's header says so).
        on: ``"validation"`` — the validation cases (``report.json``, ``report.md``, ``report_dice.png``); or
            ``"holdout"`` — a screening: the final models on the training cases held out of training
            (``holdout_per_case.csv``; ``screening.*``), so recipes are chosen without the validation cases.

    Raises:
        TeachCacheError: no finished run (with per-case scores) under ``output.runs_dir``.
        ConfigError: ``evaluation.primary_endpoint`` names a run kind with no finished run; nothing is written.
        MixedProvenanceError: runs pooled in one row, or paired, are not the same experiment (without
            ``allow_mixed``); nothing is written.
    """
    token = _SCORES.set(SCORES_FILES[on])
    try:
        return _build(cfg, allow_mixed, on)
    finally:
        _SCORES.reset(token)


def _build(cfg: Config, allow_mixed: bool, on: str) -> dict[str, Any]:
    _case_rows.cache_clear()  # a report reads each run's per-case scores once, as they are now
    runs = _runs(cfg)
    if not runs:
        how = (
            "`make distil FOLD=k`" if on == "validation" else "`make screen` (runs with training.holdout > 0)"
        )
        raise TeachCacheError(
            f"no finished run with {SCORES_FILES[on]} under {cfg.output.runs_dir}; run {how} first"
        )
    # a screening compares its recipes with no-KD on held-out cases: the experiment's declared endpoint (which may
    # name a run kind only the cross-validation trains) is not its question
    arm, baseline = _primary_endpoint(cfg, list(runs), declared=on == "validation")
    pooling = check_pooling(
        {name: _records(name, found) for name, found in runs.items()},
        [(arm, baseline), *_secondary_pairs(list(runs), (arm, baseline))],
        allow_mixed,
    )
    rows, cases_of, scores_of = [], {}, {}
    for name, found in runs.items():
        row, cases_of[name], scores_of[name] = _run_row(name, found)
        rows.append(row)
    folds = sorted({fold for found in runs.values() for fold, _ in found})
    ensemble = _ensemble(cfg, folds, None if on == "validation" else _held_out_cases(runs))
    ledger = Ledger.of(cfg)
    for fold in folds if ledger is not None else []:  # folds whose teachers are not cached here: the ledger's
        if not any(key.startswith(f"{fold}/") for key in ensemble):
            ensemble |= ledger.ensemble(fold, on)
    if ensemble:
        rows.append(_ensemble_row(ensemble))
        cases_of[ENSEMBLE] = ensemble
    if on == "holdout":  # a screening shows nothing scored on the validation cases
        for row in rows:
            row["postprocessing"] = None
    report = {
        "experiment": cfg.experiment,
        "provenance": pooling.as_json(),
        "fold_level": _fold_level(cfg, scores_of, arm, baseline)
        | dict(zip(("per_class", "harm_flags"), _per_class_vs_baseline(cfg, runs, BASELINE), strict=True)),
        "runs": rows,
        "paired_vs_no_kd": _paired_vs_no_kd(cases_of, scores_of),
        "cached_vs_online": _cached_vs_online(cases_of, scores_of),
        "against_teacher_ensemble": _against_ensemble(cases_of),
        "cache_seconds": _cache_seconds(cfg, sorted({fold for found in runs.values() for fold, _ in found})),
        "health_warnings": health_warnings(rows),
        "cases": on,
    }
    seconds = {r["run"]: r.get("training_seconds_per_run") for r in rows}
    fold_level = report["fold_level"]
    for entry in [fold_level["primary"], *fold_level["secondary"], *fold_level["equivalence"]]:
        entry["seconds_per_run"] = [
            seconds.get(entry["run"]),
            seconds.get(entry["against"]),
        ]  # cost beside effect
    _write(cfg.output.runs_dir, report, cases_of, REPORT_STEMS[on])
    return report


def _held_out_cases(runs: dict[str, dict[tuple[int, int | None], Path]]) -> dict[int, list[str]]:
    """Per fold, the training cases the screening's baseline run held out (every arm of a fold holds out the same:
    the split depends on the fold's cases and the experiment's seed)."""
    baseline = runs.get(BASELINE, {})
    return {
        fold: json.loads((folder / "summary.json").read_text()).get("holdout_cases") or []
        for (fold, seed), folder in sorted(baseline.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1))
        if seed is None
    }


def _write(
    runs_dir: Path,
    report: dict[str, Any],
    cases_of: dict[str, dict[str, tuple[float, float]]],
    stem: str = "report",
) -> None:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>_dice.png`` whole: each to a temporary file first, then
    all three renamed into place, so a failure leaves the previous report (or none), never half of one."""
    out = {
        runs_dir / f"{stem}.json": lambda p: p.write_text(json.dumps(report, indent=2) + "\n"),
        runs_dir / f"{stem}.md": lambda p: p.write_text(cv_report_markdown(report)),
        runs_dir / f"{stem}_dice.png": lambda p: _plot(cases_of, p, report["experiment"]),
    }
    staged = {path: path.with_name(f".{path.name}.partial") for path in out}
    runs_dir.mkdir(parents=True, exist_ok=True)  # a report read wholly from the ledger has no runs folder yet
    try:
        for path, write in out.items():
            write(staged[path])
        for path, partial in staged.items():
            os.replace(partial, path)
    finally:
        for partial in staged.values():
            partial.unlink(missing_ok=True)


def _records(name: str, found: dict[tuple[int, int | None], Path]) -> list[RunRecord]:
    """A row's run folders with their summaries, in (fold, seed) order."""
    return [
        RunRecord(name, fold, seed, folder, json.loads((folder / "summary.json").read_text()))
        for (fold, seed), folder in sorted(
            found.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])
        )
    ]


def _class_scores(
    found: dict[tuple[int, int | None], Path],
) -> dict[str, dict[tuple[int, int | None], dict[str, float]]]:
    """Per class, per (fold, seed) run, per case: the class's Dice (the ``dice_<class>`` columns)."""
    out: dict[str, dict[tuple[int, int | None], dict[str, float]]] = {}
    for key, folder in found.items():
        for r in _case_rows(folder):
            for column, value in r.items():
                if column.startswith("dice_"):
                    out.setdefault(column.removeprefix("dice_"), {}).setdefault(key, {})[r["case"]] = float(
                        value
                    )
    return out


def _signed_points(v: float) -> str:
    """A Dice difference in points with a true minus sign (−8.1)."""
    return f"{100 * v:.1f}".replace("-", "−")


def _per_class_vs_baseline(
    cfg: Config, runs: dict[str, dict[tuple[int, int | None], Path]], baseline: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each student run against ``baseline`` over folds, class by class (95 % t-interval, unadjusted: a safety
    check, not a claim), and the harm flags: a class whose interval lies wholly below zero."""
    if baseline not in runs:
        return [], []
    theirs = _class_scores(runs[baseline])
    entries, flags = [], []
    for name, found in runs.items():
        if not name.startswith("student ") or name == baseline:
            continue
        for cls, mine in _class_scores(found).items():
            if cls not in theirs:
                continue
            try:
                c = compare_folds(
                    mine,
                    theirs[cls],
                    resamples=cfg.evaluation.bootstrap_resamples,
                    seed=cfg.evaluation.bootstrap_seed,
                )
            except ComparisonError:
                continue
            entries.append(
                {
                    "run": name,
                    "against": baseline,
                    "class": cls,
                    "n_folds": c.n_folds,
                    "mean_difference": c.mean_difference,
                    "t_interval": list(c.t_interval),
                    "verdict": c.verdict,
                }
            )
            if c.t_interval[1] < 0:
                low, high = (_signed_points(v) for v in c.t_interval)
                flags.append(
                    f"{name.removeprefix('student ')} hurts class {cls}: {_signed_points(c.mean_difference)} points "
                    f"against {baseline.removeprefix('student ')}, 95 % CI [{low}, {high}]"
                )
    return entries, flags


def _read_run(found: dict[tuple[int, int | None], Path]) -> tuple[RunCases, list[dict[str, Any]]]:
    """Read one run's folders in (fold, seed) order.

    Returns:
        ``(scores, summaries)``: per (fold, seed) the per-case (Dice, HD95); each folder's ``summary.json``.
    """
    scores: RunCases = {}
    summaries = []
    for key, folder in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
        scores[key] = _per_case(folder)
        summaries.append(json.loads((folder / "summary.json").read_text()))
    return scores, summaries


def _run_row(
    name: str, found: dict[tuple[int, int | None], Path]
) -> tuple[dict[str, Any], dict[str, tuple[float, float]], RunCases]:
    """One run's report row, its per-case (Dice, HD95) averaged over the seeds it was trained with (keyed
    ``"<fold>/<case>"``, for the per-case tables), and its scores per (fold, seed) (for the fold-level ones)."""
    scores, summaries = _read_run(found)
    by_case: dict[str, list[tuple[float, float]]] = {}
    seed_fold_dice: dict[int | None, dict[int, float]] = {}
    for (fold, seed), per in scores.items():
        for c, v in per.items():
            by_case.setdefault(f"{fold}/{c}", []).append(v)
        seed_fold_dice.setdefault(seed, {})[fold] = float(np.mean([v[0] for v in per.values()]))
    per_case = {
        c: (float(np.mean([v[0] for v in vs])), float(np.mean([v[1] for v in vs])))
        for c, vs in by_case.items()
    }
    folds = sorted({fold for fold, _ in found})
    fold_dice = [float(np.mean([d[f] for d in seed_fold_dice.values() if f in d])) for f in folds]
    # seed spread: the sd over seeds of the mean over folds, from seeds that trained every fold
    complete = [np.mean(list(d.values())) for d in seed_fold_dice.values() if set(d) == set(folds)]
    latency = [
        float(s["seconds_per_volume"])
        for s in summaries
        if isinstance(s.get("seconds_per_volume"), int | float) and math.isfinite(s["seconds_per_volume"])
    ]
    row = _row(name, folds, per_case, fold_dice, summaries[-1].get("parameters")) | {
        "gflops_per_window": summaries[-1].get("gflops_per_window"),
        "seconds_per_volume": float(np.mean(latency)) if latency else math.nan,
        # cost beside effect: the mean wall time of one training run, and of it the teachers' forward passes
        "training_seconds_per_run": _mean_of(summaries, "seconds"),
        "teacher_seconds_per_run": _mean_of(summaries, "teacher_forward_seconds"),
        "per_class": _per_class(list(found.values())),
        "seeds": len(seed_fold_dice),
        "training_runs": len(scores),  # (fold, seed) runs
        "dice_std_over_seeds": float(np.std(complete, ddof=1)) if len(complete) > 1 else math.nan,
        "kd_health": _health(list(found.values())),
        "postprocessing": _postprocessing(summaries),
    }
    return row, per_case, scores


def _postprocessing(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A row's headline Dice without and with the postprocessing its runs chose on their held-out cases (the mean
    over the runs that chose on some), and how often each class was chosen; ``None`` when no run had held-out cases."""
    chosen = [s for s in summaries if s.get("postprocessing")]
    if not chosen:
        return None
    counts: dict[str, int] = {}
    for s in chosen:
        for c in s["postprocessing"]["largest_component_classes"]:
            counts[str(c)] = counts.get(str(c), 0) + 1
    return {
        "runs": len(chosen),
        "dice_without": float(np.mean([s["headline_mean_dice"] for s in chosen])),
        "dice_with": float(np.mean([s["postprocessing"]["headline_mean_dice"] for s in chosen])),
        "classes_chosen": counts,
    }


def _health(folders: list[Path]) -> dict[str, dict[str, Any]]:
    """Per KD term of a row, what the health check says of its runs, judged now from each run's ``metrics.csv``
    (:func:`core.evaluation.kd_health.verdict`, so every run of the report meets the same thresholds): the runs
    measured, how many of them the term dominated or opposed L_SEG in, and the median over runs of its median ratio
    and cosine."""
    terms: dict[str, dict[str, Any]] = {}
    for folder in folders:
        metrics = folder / "metrics.csv"
        if not metrics.is_file():
            continue
        with open(metrics) as f:
            rows = list(csv.DictReader(f))
        names = sorted(
            {k.removeprefix("grad_ratio_") for r in rows for k in r if k.startswith("grad_ratio_")}
        )
        for term, t in (kd_verdict(rows, names).get("terms") or {}).items():
            e = terms.setdefault(term, {"runs": 0, "dominates": 0, "opposes": 0, "ratio": [], "cosine": []})
            e["runs"] += 1
            e["dominates"] += int(t["dominant_epochs"] > HEALTH_MOST)
            e["opposes"] += int(t["opposing_epochs"] > HEALTH_MOST)
            e["ratio"].append(t["ratio_median"])
            e["cosine"].append(t["cosine_median"])
    return {
        term: {
            **{k: e[k] for k in ("runs", "dominates", "opposes")},
            "ratio_median": float(np.median(e["ratio"])),
            "cosine_median": float(np.median(e["cosine"])),
        }
        for term, e in terms.items()
    }


def health_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per run kind and KD term that dominated or opposed L_SEG in most of its runs."""
    said = []
    for row in rows:
        for term, h in (row.get("kd_health") or {}).items():
            for what, stat in (
                ("dominates", f"median ratio {h['ratio_median']:.2f}"),
                ("opposes", f"median cosine {h['cosine_median']:+.2f}"),
            ):
                if h[what] * 2 > h["runs"]:
                    said.append(
                        f"{row['run']}: KD term '{term}' {what} L_SEG in {h[what]} of {h['runs']} runs ({stat})"
                    )
    return said


def _mean_of(summaries: list[dict[str, Any]], key: str) -> float:
    """The mean of a number the runs' summaries record (NaN when none records it)."""
    values = [float(s[key]) for s in summaries if isinstance(s.get(key), int | float)]
    return float(np.mean(values)) if values else math.nan


def _primary_endpoint(cfg: Config, names: list[str], declared: bool = True) -> tuple[str, str]:
    """The primary endpoint's two runs (``"student kd-<arm>"``, ``"student kd-<baseline>"``): the declared ones, or
    with ``declared=False`` (a screening) the default, the config's own recipe from the cache minus no-KD.

    Raises:
        ConfigError: ``evaluation.primary_endpoint.arm`` or ``.baseline``, set in the config, names a run kind
            with no finished run (the defaults — the config's own recipe from the cache minus no-KD — may be
            missing: the report then says so).
    """
    if not declared:
        return f"student kd-{cfg.distillation.kind}", BASELINE
    endpoint = cfg.evaluation.primary_endpoint
    kinds = sorted(n.removeprefix("student kd-") for n in names if n.startswith("student kd-"))
    declared = {
        "arm": endpoint.arm,
        "baseline": endpoint.baseline if "baseline" in endpoint.model_fields_set else None,
    }
    for key, kind in declared.items():
        if kind is not None and kind not in kinds:
            raise ConfigError(
                f"evaluation.primary_endpoint.{key} names the run kind '{kind}', which has no finished run "
                f"under {cfg.output.runs_dir / 'students'} (run kinds there: "
                f"{', '.join(kinds) or 'no student run yet'}); no report written"
            )
    return f"student kd-{endpoint.arm or cfg.distillation.kind}", f"student kd-{endpoint.baseline}"


def _online_twins(names: list[str]) -> list[tuple[str, str]]:
    """Each student run distilled online (``kd-<kind>-online``, or ``kd-<kind>-online-<mode>``) with its cached
    twin (``kd-<kind>``), where both exist: ``[(cached, online)]``."""
    out = []
    for name in names:
        match = re.fullmatch(r"(student kd-.+?)-online(-[A-Za-z0-9_.]+)?", name)
        if match and match.group(1) in names:
            out.append((match.group(1), name))
    return out


def _fold_scores(cases: RunCases) -> dict[tuple[int, int | None], dict[str, float]]:
    """A run's per-case Dice per (fold, seed): the input of :func:`compare_folds`."""
    return {key: {c: v[0] for c, v in per.items()} for key, per in cases.items()}


def _compare(cfg: Config, scores_of: dict[str, RunCases], run: str, against: str) -> FoldComparison | str:
    """``run`` against ``against`` over folds, or why there is no interval (naming the runs and their folds)."""
    missing = [n for n in (run, against) if n not in scores_of]
    if missing:
        return f"no finished run of {' or '.join(missing)}"
    if run == against:
        return f"{run} against itself: set evaluation.primary_endpoint.arm to another run kind"
    try:
        return compare_folds(
            _fold_scores(scores_of[run]),
            _fold_scores(scores_of[against]),
            resamples=cfg.evaluation.bootstrap_resamples,
            seed=cfg.evaluation.bootstrap_seed,
        )
    except ComparisonError:
        folds = {n: sorted({f for f, _ in scores_of[n]}) for n in (run, against)}
        return (
            f"an interval over folds needs at least two folds run by both: {run} ran fold(s) "
            f"{', '.join(map(str, folds[run]))}; {against} fold(s) {', '.join(map(str, folds[against]))}"
        )


def _comparison_entry(run: str, against: str, result: FoldComparison | str) -> dict[str, Any]:
    """A fold-level comparison as the report records it: the statistics and the claim, or why there are none."""
    if isinstance(result, str):
        return {"run": run, "against": against, "unavailable": result}
    return {"run": run, "against": against, "n_folds": result.n_folds, **asdict(result)}


def _ensemble_row(ensemble: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The report row of the teachers' ensemble, from its per-case (Dice, HD95) keyed ``"<fold>/<case>"``."""
    folds = sorted({int(c.split("/")[0]) for c in ensemble})
    fold_dice = [float(np.mean([v[0] for c, v in ensemble.items() if c.startswith(f"{f}/")])) for f in folds]
    return _row(ENSEMBLE, folds, ensemble, fold_dice, None) | {"seeds": 1, "dice_std_over_seeds": math.nan}


def _paired_dice(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> dict[str, float]:
    """:func:`paired_tests` of the per-case Dice of ``a`` against ``b`` on the cases both scored."""
    common = sorted(set(a) & set(b))
    return paired_tests([a[c][0] for c in common], [b[c][0] for c in common])


def _common_runs(
    a: RunCases, b: RunCases
) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """Two runs' per-case (Dice, HD95) keyed ``"<fold>/<case>"``, each averaged over the (fold, seed) runs both have
    only: a twin trained with fewer seeds is paired with the same seeds of the other."""
    common = set(a) & set(b)

    def averaged(cases: RunCases) -> dict[str, tuple[float, float]]:
        by_case: dict[str, list[tuple[float, float]]] = {}
        for key in common:
            for c, v in cases[key].items():
                by_case.setdefault(f"{key[0]}/{c}", []).append(v)
        return {
            c: (float(np.mean([v[0] for v in vs])), float(np.mean([v[1] for v in vs])))
            for c, vs in by_case.items()
        }

    return averaged(a), averaged(b)


def _paired_vs_no_kd(
    cases_of: dict[str, dict[str, tuple[float, float]]], scores_of: dict[str, RunCases]
) -> list[dict[str, Any]]:
    """Each distilled student paired per case against the student without distillation (same folds and seeds)."""
    if BASELINE not in cases_of:
        return []
    out = []
    for name in cases_of:
        if name.startswith("student") and name != BASELINE and name in scores_of:
            mine, theirs = _common_runs(scores_of[name], scores_of[BASELINE])
            out.append({"run": name, "against": BASELINE, "metric": "dice", **_paired_dice(mine, theirs)})
    return out


def _cached_vs_online(
    cases_of: dict[str, dict[str, tuple[float, float]]], scores_of: dict[str, RunCases]
) -> list[dict[str, Any]]:
    """Each student distilled from the cache paired per case against the same recipe distilled online (same folds
    and seeds: a context twin trained with seed 0 only is paired with the cached run's seed 0)."""
    out = []
    for cached, online in _online_twins(list(cases_of)):
        mine, theirs = _common_runs(scores_of[cached], scores_of[online])
        out.append({"run": cached, "against": online, "metric": "dice", **_paired_dice(mine, theirs)})
    return out


def _secondary_pairs(names: list[str], primary: tuple[str, str]) -> list[tuple[str, str]]:
    """Every comparison but the primary: each other student against the primary's baseline, then each cached
    recipe against each of its online twins, patch and context (cached − online)."""
    baseline = primary[1]
    students = [n for n in names if n.startswith("student ") and n != baseline] if baseline in names else []
    pairs = [(n, baseline) for n in students] + _online_twins(names)
    return [pair for pair in pairs if pair != primary]


def _equivalence_entry(cfg: Config, run: str, against: str, result: FoldComparison | str) -> dict[str, Any]:
    """TOST of a cached recipe against its online-context twin over folds, against ``evaluation.equivalence_margin``."""
    if isinstance(result, str):
        return {"run": run, "against": against, "unavailable": result}
    tost = equivalence(result, cfg.evaluation.equivalence_margin)
    return {
        "run": run,
        "against": against,
        "n_folds": result.n_folds,
        "mean_difference": result.mean_difference,
        **asdict(tost),
    }


def _fold_level(cfg: Config, scores_of: dict[str, RunCases], arm: str, baseline: str) -> dict[str, Any]:
    """The fold-level comparisons: the primary endpoint, the secondary ones with Holm-adjusted t p-values (over
    the secondary family; the primary is tested alone), and the equivalence of each cached/online pair."""
    names = list(scores_of)
    pairs = [(arm, baseline), *_secondary_pairs(names, (arm, baseline))]
    results = {pair: _compare(cfg, scores_of, *pair) for pair in pairs}
    primary, *secondary = [_comparison_entry(*pair, results[pair]) for pair in pairs]
    for entry, p in zip(secondary, holm([c.get("t_p", math.nan) for c in secondary]), strict=True):
        entry["holm_p"] = p
        if "verdict" in entry and not entry["verdict"].startswith("not shown") and not p <= 0.05:
            # a secondary claim stands only after the family's adjustment: its unadjusted CI is kept beside
            entry["verdict"] = (
                f"not shown after Holm adjustment (Holm p {p:.3g}; unadjusted, {entry['verdict']})"
            )
    if primary.get("unavailable") and arm not in scores_of:
        primary["unavailable"] += (
            " (the default arm is distillation.kind; evaluation.primary_endpoint.arm sets it)"
        )
    return {
        "unit": "fold",
        "metric": "mean foreground Dice; differences run − against, in Dice units (0.01 = 1 point)",
        "verdict_interval": "t",
        "confidence": 0.95,
        "bootstrap": {
            "resamples": cfg.evaluation.bootstrap_resamples,
            "seed": cfg.evaluation.bootstrap_seed,
            "levels": ["fold", "case"],
        },
        "primary": primary,
        "secondary": secondary,
        "holm_family": len([c for c in secondary if math.isfinite(c.get("t_p", math.nan))]),
        "equivalence_margin": cfg.evaluation.equivalence_margin,
        "equivalence": [
            _equivalence_entry(cfg, *pair, results[pair])
            for pair in _online_twins(names)
            if pair[1].endswith("-online-context")  # the twin that computes the cache's own targets
        ],
    }


def _against_ensemble(cases_of: dict[str, dict[str, tuple[float, float]]]) -> list[dict[str, Any]]:
    """Each student's mean Dice against the teacher ensemble's on the cases both scored."""
    if ENSEMBLE not in cases_of:
        return []
    teachers = cases_of[ENSEMBLE]
    out = []
    for name, per_case in cases_of.items():
        common = sorted(set(per_case) & set(teachers))
        if not name.startswith("student") or not common:
            continue
        student = float(np.mean([per_case[c][0] for c in common]))
        reference = float(np.mean([teachers[c][0] for c in common]))
        out.append(
            {
                "run": name,
                "n": len(common),
                "dice": student,
                "ensemble_dice": reference,
                "ratio": student / reference if reference > 0 else math.nan,
            }
        )
    return out


def _row(
    name: str,
    folds: list[int],
    per_case: dict[str, tuple[float, float]],
    fold_dice: list[float],
    params: int | None,
) -> dict[str, Any]:
    dice = np.array([v[0] for v in per_case.values()])
    hd = np.array([v[1] for v in per_case.values()])
    return {
        "run": name,
        "folds": folds,
        "cases": len(per_case),
        "dice_mean_over_folds": float(np.mean(fold_dice)),
        "dice_std_over_folds": float(np.std(fold_dice, ddof=1)) if len(fold_dice) > 1 else math.nan,
        "dice_mean_over_cases": float(dice.mean()),
        "dice_std_over_cases": float(dice.std(ddof=1)) if len(dice) > 1 else math.nan,
        "hd95_mm_mean_over_cases": float(hd.mean()),
        "parameters": params,
    }


def _plot(cases_of: dict[str, dict[str, tuple[float, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cases_of)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    ax.boxplot([[v[0] for v in cases_of[n].values()] for n in names], showmeans=True)
    ax.set_xticks(
        range(1, len(names) + 1), [n.replace("student ", "").replace("teacher ", "T ") for n in names]
    )
    ax.tick_params(axis="x", rotation=30)
    ax.set_ylabel("Dice per validation case (headline models)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: every fold trained")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
