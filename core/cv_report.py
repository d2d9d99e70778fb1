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


def _runs(cfg: Config) -> dict[str, dict[int, Path]]:
    """``{run name: {fold: run folder}}`` for every finished run (a summary and per-case scores)."""
    found: dict[str, dict[int, Path]] = {}
    for role, pattern in (("teacher", "teachers/*/fold_*"), ("student", "students/kd-*/fold_*")):
        for folder in sorted(cfg.output.runs_dir.glob(pattern)):
            if not ((folder / "summary.json").is_file() and (folder / "validation_per_case.csv").is_file()):
                continue
            name = f"{role} {folder.parent.name}"
            fold = int(folder.name.removeprefix("fold_"))
            found.setdefault(name, {})[fold] = folder
    return found


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
    for name, folds in runs.items():
        per_case: dict[str, tuple[float, float]] = {}
        fold_dice = []
        params = None
        for fold, folder in sorted(folds.items()):
            scores = _per_case(folder)
            per_case.update({f"{fold}/{c}": v for c, v in scores.items()})
            fold_dice.append(float(np.mean([v[0] for v in scores.values()])))
            params = json.loads((folder / "summary.json").read_text()).get("parameters")
        cases_of[name] = per_case
        dice = np.array([v[0] for v in per_case.values()])
        hd = np.array([v[1] for v in per_case.values()])
        rows.append(
            {
                "run": name,
                "folds": sorted(folds),
                "cases": len(per_case),
                "dice_mean_over_folds": float(np.mean(fold_dice)),
                "dice_std_over_folds": float(np.std(fold_dice, ddof=1)) if len(fold_dice) > 1 else math.nan,
                "dice_mean_over_cases": float(dice.mean()),
                "dice_std_over_cases": float(dice.std(ddof=1)) if len(dice) > 1 else math.nan,
                "hd95_mm_mean_over_cases": float(hd.mean()),
                "parameters": params,
            }
        )
    comparisons = []
    if BASELINE in cases_of:
        base = cases_of[BASELINE]
        for name, per_case in cases_of.items():
            if not name.startswith("student") or name == BASELINE:
                continue
            common = sorted(set(per_case) & set(base))
            test = paired_tests([per_case[c][0] for c in common], [base[c][0] for c in common])
            comparisons.append({"run": name, "against": BASELINE, "metric": "dice", **test})
    report = {"experiment": cfg.experiment, "runs": rows, "paired_vs_no_kd": comparisons}
    out = cfg.output.runs_dir / "report"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(cv_report_markdown(report))
    _plot(cases_of, cfg.output.runs_dir / "report_dice.png", cfg.experiment)
    return report


def _fmt(v: float, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def cv_report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['experiment']}: cross-validation",
        "",
        "Final models (nothing chosen on the validation cases). Dice and HD95 averaged over foreground classes per "
        "case; ± is the standard deviation over folds, and over cases.",
        "",
        "| run | folds | cases | Dice, mean ± sd over folds | Dice, mean ± sd over cases | HD95 mm | params |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['run']} | {','.join(map(str, r['folds']))} | {r['cases']} | "
            f"{_fmt(r['dice_mean_over_folds'])} ± {_fmt(r['dice_std_over_folds'])} | "
            f"{_fmt(r['dice_mean_over_cases'])} ± {_fmt(r['dice_std_over_cases'])} | "
            f"{_fmt(r['hd95_mm_mean_over_cases'], 2)} | {r['parameters'] or '—'} |"
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
