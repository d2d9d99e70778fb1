"""The cross-validation report: every run kind over every fold it was trained on, per case, with paired tests.

Reads only what runs wrote (``summary.json`` and ``validation_per_case.csv`` of the headline models: final, or
chosen on held-out training cases) under
``runs_dir/students/kd-<kind>/fold_<k>/`` and ``runs_dir/teachers/<name>/fold_<k>/``. Writes
``runs_dir/report.json``, ``report.md`` and ``report_dice.png`` (per-case Dice of each run kind).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.errors import TeachCacheError

__all__ = ["build_cv_report", "cv_report_markdown", "paired_tests"]

BASELINE = "student kd-none"


def _runs(cfg: Config) -> dict[str, dict[tuple[int, int | None], Path]]:
    """``{run name: {(fold, seed): run folder}}`` for every finished run (a summary and per-case scores); ``seed`` is
    ``None`` for the config's own seed, else a repeat's (``kd-<kind>/seed_<s>/fold_<k>``)."""
    found: dict[str, dict[tuple[int, int | None], Path]] = {}
    patterns = (
        ("teacher", "teachers/*/fold_*"),
        ("student", "students/kd-*/fold_*"),
        ("student", "students/kd-*/seed_*/fold_*"),
    )
    for role, pattern in patterns:
        for folder in sorted(cfg.output.runs_dir.glob(pattern)):
            if not ((folder / "summary.json").is_file() and (folder / "validation_per_case.csv").is_file()):
                continue
            repeat = folder.parent.name.startswith("seed_")
            name = f"{role} {(folder.parent.parent if repeat else folder.parent).name}"
            seed = int(folder.parent.name.removeprefix("seed_")) if repeat else None
            fold = int(folder.name.removeprefix("fold_"))
            found.setdefault(name, {})[(fold, seed)] = folder
    return found


def _ensemble(cfg: Config, folds: list[int]) -> dict[str, tuple[float, float]]:
    """Per validation case (``"<fold>/<case>"``), the Dice and HD95 of the teachers' ensemble: the argmax of their
    cached class distributions averaged with equal weights, read from the store (the teachers distilled on each fold,
    as stage 2 reads them). Scored like the runs' headlines: in the original geometry when the raw dataset the store
    was made from is at hand, else on the preprocessed grid. Folds whose teachers are not all cached are left out."""
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
    for fold in folds:
        keys = [t.store_key(fold) for t in teachers]
        _, val = fold_split(cfg, store, fold)
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


def _per_case(folder: Path) -> dict[str, tuple[float, float]]:
    with open(folder / "validation_per_case.csv") as f:
        # runs written before HD95 was measured have no mean_hd95_mm column
        return {
            r["case"]: (float(r["mean_dice"]), float(r.get("mean_hd95_mm", "nan"))) for r in csv.DictReader(f)
        }


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


def build_cv_report(cfg: Config) -> dict[str, Any]:
    """Collect every run over its folds and compare each distilled student with the no-KD student, per case.

    Raises:
        TeachCacheError: no finished run (with per-case scores) under ``output.runs_dir``.
    """
    runs = _runs(cfg)
    if not runs:
        raise TeachCacheError(
            f"no finished run with per-case scores under {cfg.output.runs_dir}; run `make distil FOLD=k` first"
        )
    rows, cases_of = [], {}
    for name, found in runs.items():
        row, cases_of[name] = _run_row(name, found)
        rows.append(row)
    ensemble = _ensemble(cfg, sorted({fold for found in runs.values() for fold, _ in found}))
    if ensemble:
        rows.append(_ensemble_row(ensemble))
        cases_of[ENSEMBLE] = ensemble
    report = {
        "experiment": cfg.experiment,
        "runs": rows,
        "paired_vs_no_kd": _paired_vs_no_kd(cases_of),
        "cached_vs_online": _cached_vs_online(cases_of),
        "against_teacher_ensemble": _against_ensemble(cases_of),
    }
    out = cfg.output.runs_dir / "report"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(cv_report_markdown(report))
    _plot(cases_of, cfg.output.runs_dir / "report_dice.png", cfg.experiment)
    return report


def _read_run(
    found: dict[tuple[int, int | None], Path],
) -> tuple[dict[str, list[tuple[float, float]]], dict[int | None, dict[int, float]], list[dict[str, Any]]]:
    """Read one run's folders in (fold, seed) order.

    Returns:
        ``(by_case, seed_fold_dice, summaries)``: per ``"<fold>/<case>"`` the (Dice, HD95) of every seed; per seed
        the mean Dice of each fold; each folder's ``summary.json``.
    """
    by_case: dict[str, list[tuple[float, float]]] = {}
    seed_fold_dice: dict[int | None, dict[int, float]] = {}
    summaries = []
    for (fold, seed), folder in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
        scores = _per_case(folder)
        for c, v in scores.items():
            by_case.setdefault(f"{fold}/{c}", []).append(v)
        seed_fold_dice.setdefault(seed, {})[fold] = float(np.mean([v[0] for v in scores.values()]))
        summaries.append(json.loads((folder / "summary.json").read_text()))
    return by_case, seed_fold_dice, summaries


def _run_row(
    name: str, found: dict[tuple[int, int | None], Path]
) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    """One run's report row and its per-case (Dice, HD95); per case the mean over the seeds it was trained with
    (the case is the unit of the paired tests)."""
    by_case, seed_fold_dice, summaries = _read_run(found)
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
        "seeds": len(seed_fold_dice),
        "dice_std_over_seeds": float(np.std(complete, ddof=1)) if len(complete) > 1 else math.nan,
    }
    return row, per_case


def _ensemble_row(ensemble: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The report row of the teachers' ensemble, from its per-case (Dice, HD95) keyed ``"<fold>/<case>"``."""
    folds = sorted({int(c.split("/")[0]) for c in ensemble})
    fold_dice = [float(np.mean([v[0] for c, v in ensemble.items() if c.startswith(f"{f}/")])) for f in folds]
    return _row(ENSEMBLE, folds, ensemble, fold_dice, None) | {"seeds": 1, "dice_std_over_seeds": math.nan}


def _paired_dice(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> dict[str, float]:
    """:func:`paired_tests` of the per-case Dice of ``a`` against ``b`` on the cases both scored."""
    common = sorted(set(a) & set(b))
    return paired_tests([a[c][0] for c in common], [b[c][0] for c in common])


def _paired_vs_no_kd(cases_of: dict[str, dict[str, tuple[float, float]]]) -> list[dict[str, Any]]:
    """Each distilled student paired per case against the student without distillation."""
    if BASELINE not in cases_of:
        return []
    return [
        {"run": name, "against": BASELINE, "metric": "dice", **_paired_dice(per_case, cases_of[BASELINE])}
        for name, per_case in cases_of.items()
        if name.startswith("student") and name != BASELINE
    ]


def _cached_vs_online(cases_of: dict[str, dict[str, tuple[float, float]]]) -> list[dict[str, Any]]:
    """Each student distilled from the cache paired per case against the same recipe distilled online."""
    out = []
    for name, per_case in cases_of.items():
        cached = name.removesuffix("-online")
        if name.startswith("student") and name.endswith("-online") and cached in cases_of:
            out.append(
                {"run": cached, "against": name, "metric": "dice", **_paired_dice(cases_of[cached], per_case)}
            )
    return out


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


def _fmt(v: float, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


_RUNS_INTRO = (
    "Headline models (chosen without the validation cases: the final model, or the epoch best on held-out "
    "training cases). Dice and HD95 averaged over foreground classes per case; ± is the standard deviation over "
    "folds, over cases, and over seeds (a run repeated with several training seeds is averaged per case first). "
    "The teacher ensemble is the argmax of the distilled teachers' cached distributions, averaged."
)


def _table(intro: str, header: str, rule: str, rows: list[str]) -> list[str]:
    """A markdown section: a blank line, the intro, a blank line, then the table."""
    return ["", intro, "", header, rule, *rows]


def _run_line(r: dict[str, Any]) -> str:
    return (
        f"| {r['run']} | {','.join(map(str, r['folds']))} | {r.get('seeds', 1)} | {r['cases']} | "
        f"{_fmt(r['dice_mean_over_folds'])} ± {_fmt(r['dice_std_over_folds'])} | "
        f"{_fmt(r['dice_mean_over_cases'])} ± {_fmt(r['dice_std_over_cases'])} | "
        f"{_fmt(r.get('dice_std_over_seeds', math.nan))} | "
        f"{_fmt(r['hd95_mm_mean_over_cases'], 2)} | {r['parameters'] or '—'} | "
        f"{_fmt(r.get('gflops_per_window'), 2)} | {_fmt(r.get('seconds_per_volume', math.nan), 2)} |"
    )


def _paired_line(c: dict[str, Any]) -> str:
    return (
        f"| {c['run']} | {c['n']} | {_fmt(c['mean_difference'])} | {_fmt(c['wilcoxon_p'])} | "
        f"{_fmt(c['t_test_p'])} |"
    )


def _online_line(c: dict[str, Any]) -> str:
    return (
        f"| {c['run']} | {c['against']} | {c['n']} | {_fmt(c['mean_difference'])} | "
        f"{_fmt(c['wilcoxon_p'])} | {_fmt(c['t_test_p'])} |"
    )


def _ensemble_line(c: dict[str, Any]) -> str:
    return (
        f"| {c['run']} | {c['n']} | {_fmt(c['dice'])} | {_fmt(c['ensemble_dice'])} | {_fmt(c['ratio'], 3)} |"
    )


# the comparison tables after the runs' table: report key, intro, header, rule, one line per entry
_COMPARISONS: tuple[tuple[str, str, str, str, Callable[[dict[str, Any]], str]], ...] = (
    (
        "paired_vs_no_kd",
        "Paired per case against the student without distillation (same cases, same folds):",
        "| run | cases | Dice difference | Wilcoxon p | paired t p |",
        "|---|---:|---:|---:|---:|",
        _paired_line,
    ),
    (
        "cached_vs_online",
        "Distilled from the cache against the same recipe distilled online (teachers in memory), per case:",
        "| cached run | online run | cases | Dice difference (cached − online) | Wilcoxon p | paired t p |",
        "|---|---|---:|---:|---:|---:|",
        _online_line,
    ),
    (
        "against_teacher_ensemble",
        "Each student against the teacher ensemble on the same cases (the share of the ensemble's Dice it reaches):",
        "| run | cases | student Dice | ensemble Dice | ratio |",
        "|---|---:|---:|---:|---:|",
        _ensemble_line,
    ),
)


def cv_report_markdown(report: dict[str, Any]) -> str:
    """The cross-validation report as markdown: the runs' table, then each comparison that has entries."""
    lines = [f"# {report['experiment']}: cross-validation"]
    lines += _table(
        _RUNS_INTRO,
        "| run | folds | seeds | cases | Dice, mean ± sd over folds | Dice, mean ± sd over cases | sd over seeds "
        "| HD95 mm | params | GFLOPs / window | s / volume |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        [_run_line(r) for r in report["runs"]],
    )
    for key, intro, header, rule, line in _COMPARISONS:
        if report.get(key):
            lines += _table(intro, header, rule, [line(c) for c in report[key]])
    return "\n".join(lines) + "\n"


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
