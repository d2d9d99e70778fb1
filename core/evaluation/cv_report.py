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
    all_folds: set[int] = set()
    for name, found in runs.items():
        # per case: the mean over the seeds it was trained with (the case is the unit of the paired tests)
        by_case: dict[str, list[tuple[float, float]]] = {}
        seed_fold_dice: dict[int | None, dict[int, float]] = {}
        params, gflops, latency = None, None, []
        for (fold, seed), folder in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
            scores = _per_case(folder)
            for c, v in scores.items():
                by_case.setdefault(f"{fold}/{c}", []).append(v)
            seed_fold_dice.setdefault(seed, {})[fold] = float(np.mean([v[0] for v in scores.values()]))
            summary = json.loads((folder / "summary.json").read_text())
            params, gflops = summary.get("parameters"), summary.get("gflops_per_window")
            seconds = summary.get("seconds_per_volume")
            if isinstance(seconds, int | float) and math.isfinite(seconds):
                latency.append(float(seconds))
        per_case = {
            c: (float(np.mean([v[0] for v in vs])), float(np.mean([v[1] for v in vs])))
            for c, vs in by_case.items()
        }
        folds = sorted({fold for fold, _ in found})
        all_folds |= set(folds)
        fold_dice = [float(np.mean([d[f] for d in seed_fold_dice.values() if f in d])) for f in folds]
        # seed spread: the sd over seeds of the mean over folds, from seeds that trained every fold
        complete = [np.mean(list(d.values())) for d in seed_fold_dice.values() if set(d) == set(folds)]
        rows.append(
            _row(name, folds, per_case, fold_dice, params)
            | {
                "gflops_per_window": gflops,
                "seconds_per_volume": float(np.mean(latency)) if latency else math.nan,
                "seeds": len(seed_fold_dice),
                "dice_std_over_seeds": float(np.std(complete, ddof=1)) if len(complete) > 1 else math.nan,
            }
        )
        cases_of[name] = per_case
    ensemble = _ensemble(cfg, sorted(all_folds))
    if ensemble:
        ens_folds = sorted({int(c.split("/")[0]) for c in ensemble})
        fold_dice = [
            float(np.mean([v[0] for c, v in ensemble.items() if c.startswith(f"{f}/")])) for f in ens_folds
        ]
        name = "teacher ensemble (cached, equal weights)"
        rows.append(
            _row(name, ens_folds, ensemble, fold_dice, None) | {"seeds": 1, "dice_std_over_seeds": math.nan}
        )
        cases_of[name] = ensemble
    comparisons = []
    if BASELINE in cases_of:
        base = cases_of[BASELINE]
        for name, per_case in cases_of.items():
            if not name.startswith("student") or name == BASELINE:
                continue
            common = sorted(set(per_case) & set(base))
            test = paired_tests([per_case[c][0] for c in common], [base[c][0] for c in common])
            comparisons.append({"run": name, "against": BASELINE, "metric": "dice", **test})
    cached_vs_online = []
    for name, per_case in cases_of.items():
        cached = name.removesuffix("-online")
        if name.startswith("student") and name.endswith("-online") and cached in cases_of:
            common = sorted(set(per_case) & set(cases_of[cached]))
            test = paired_tests([cases_of[cached][c][0] for c in common], [per_case[c][0] for c in common])
            cached_vs_online.append({"run": cached, "against": name, "metric": "dice", **test})
    against_ensemble = []
    ensemble_name = "teacher ensemble (cached, equal weights)"
    if ensemble_name in cases_of:
        teachers = cases_of[ensemble_name]
        for name, per_case in cases_of.items():
            common = sorted(set(per_case) & set(teachers))
            if not name.startswith("student") or not common:
                continue
            student = float(np.mean([per_case[c][0] for c in common]))
            reference = float(np.mean([teachers[c][0] for c in common]))
            against_ensemble.append(
                {
                    "run": name,
                    "n": len(common),
                    "dice": student,
                    "ensemble_dice": reference,
                    "ratio": student / reference if reference > 0 else math.nan,
                }
            )
    report = {
        "experiment": cfg.experiment,
        "runs": rows,
        "paired_vs_no_kd": comparisons,
        "cached_vs_online": cached_vs_online,
        "against_teacher_ensemble": against_ensemble,
    }
    out = cfg.output.runs_dir / "report"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(cv_report_markdown(report))
    _plot(cases_of, cfg.output.runs_dir / "report_dice.png", cfg.experiment)
    return report


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


def cv_report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['experiment']}: cross-validation",
        "",
        "Headline models (chosen without the validation cases: the final model, or the epoch best on held-out "
        "training cases). Dice and HD95 averaged over foreground classes per case; ± is the standard deviation over "
        "folds, over cases, and over seeds (a run repeated with several training seeds is averaged per case first). "
        "The teacher ensemble is the argmax of the distilled teachers' cached distributions, averaged.",
        "",
        "| run | folds | seeds | cases | Dice, mean ± sd over folds | Dice, mean ± sd over cases | sd over seeds "
        "| HD95 mm | params | GFLOPs / window | s / volume |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['run']} | {','.join(map(str, r['folds']))} | {r.get('seeds', 1)} | {r['cases']} | "
            f"{_fmt(r['dice_mean_over_folds'])} ± {_fmt(r['dice_std_over_folds'])} | "
            f"{_fmt(r['dice_mean_over_cases'])} ± {_fmt(r['dice_std_over_cases'])} | "
            f"{_fmt(r.get('dice_std_over_seeds', math.nan))} | "
            f"{_fmt(r['hd95_mm_mean_over_cases'], 2)} | {r['parameters'] or '—'} | "
            f"{_fmt(r.get('gflops_per_window'), 2)} | {_fmt(r.get('seconds_per_volume', math.nan), 2)} |"
        )
    if report["paired_vs_no_kd"]:
        lines += [
            "",
            "Paired per case against the student without distillation (same cases, same folds):",
            "",
            "| run | cases | Dice difference | Wilcoxon p | paired t p |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in report["paired_vs_no_kd"]:
            lines.append(
                f"| {c['run']} | {c['n']} | {_fmt(c['mean_difference'])} | {_fmt(c['wilcoxon_p'])} | "
                f"{_fmt(c['t_test_p'])} |"
            )
    if report.get("cached_vs_online"):
        lines += [
            "",
            "Distilled from the cache against the same recipe distilled online (teachers in memory), per case:",
            "",
            "| cached run | online run | cases | Dice difference (cached − online) | Wilcoxon p | paired t p |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for c in report["cached_vs_online"]:
            lines.append(
                f"| {c['run']} | {c['against']} | {c['n']} | {_fmt(c['mean_difference'])} | "
                f"{_fmt(c['wilcoxon_p'])} | {_fmt(c['t_test_p'])} |"
            )
    if report.get("against_teacher_ensemble"):
        lines += [
            "",
            "Each student against the teacher ensemble on the same cases (the share of the ensemble's Dice it reaches):",
            "",
            "| run | cases | student Dice | ensemble Dice | ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in report["against_teacher_ensemble"]:
            lines.append(
                f"| {c['run']} | {c['n']} | {_fmt(c['dice'])} | {_fmt(c['ensemble_dice'])} | {_fmt(c['ratio'], 3)} |"
            )
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
