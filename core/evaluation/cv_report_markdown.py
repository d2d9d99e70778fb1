"""The cross-validation report as markdown (``report.md``), rendered from the report's JSON (:mod:`core.evaluation.cv_report`).

The fold-level comparisons first (the primary endpoint, then the secondary comparisons with Holm-adjusted p-values
and the equivalence verdicts), the runs' table, then the per-case comparisons, labelled secondary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["cv_report_markdown", "report_sections"]


def _fmt(v: float, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


_RUNS_INTRO = (
    "Headline models (chosen without the validation cases: the final model, or the epoch best on held-out "
    "training cases). Dice and HD95 averaged over foreground classes per case; ± is the standard deviation over "
    "folds, over cases, and over seeds (a run repeated with several training seeds is averaged per case first). "
    "The teacher ensemble is the argmax of the distilled teachers' cached distributions, averaged. Cost: the mean "
    "wall time of one training run (validation included) and, for runs distilled online, the seconds of it spent "
    "in the teachers' forward passes (a cached run's teachers ran once, in `make cache`)."
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
        f"{_fmt(r.get('gflops_per_window'), 2)} | {_fmt(r.get('seconds_per_volume', math.nan), 2)} | "
        f"{_fmt(r.get('training_seconds_per_run', math.nan), 0)} | {_fmt(r.get('teacher_seconds_per_run', math.nan), 0)} |"
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
        "Secondary, per case: each student paired per case against the student without distillation (same "
        "cases, folds and seeds):",
        "| run | cases | Dice difference | Wilcoxon p | paired t p |",
        "|---|---:|---:|---:|---:|",
        _paired_line,
    ),
    (
        "cached_vs_online",
        "Secondary, per case: distilled from the cache against the same recipe distilled online, patch or "
        "context (teachers in memory; the folds and seeds both ran):",
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
    """The cross-validation report as markdown: the fold-level comparisons (primary endpoint first), the runs'
    table, then each per-case comparison that has entries, labelled secondary."""
    lines = [f"# {report['experiment']}: cross-validation"]
    if report.get("cases") == "holdout":
        lines = [
            f"# {report['experiment']}: screening on the held-out training cases",
            "",
            "Every score below is the final model's on the training cases each run held out of training "
            "(`holdout_per_case.csv`): the validation cases are not looked at, so the recipe chosen here can then be "
            "evaluated on them (docs/recipes.md).",
        ]
    for section in report_sections(report).values():
        lines += section
    return "\n".join(lines) + "\n"


def report_sections(report: dict[str, Any]) -> dict[str, list[str]]:
    """The report's markdown sections, in order, by name (``provenance``, ``fold_level``, ``runs``, ``per_class``,
    ``per_case``): what ``report.md`` is made of, and what ``scripts/demo_doc.py`` puts into docs/demo.md."""
    runs = ["", "## Runs"]
    runs += _table(
        _RUNS_INTRO,
        "| run | folds | seeds | cases | Dice, mean ± sd over folds | Dice, mean ± sd over cases | sd over seeds "
        "| HD95 mm | params | GFLOPs / window | s / volume | training s / run | teacher s / run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        [_run_line(r) for r in report["runs"]],
    )
    runs += _cache_cost(report.get("cache_seconds") or {})
    per_case: list[str] = []
    if any(report.get(key) for key, *_ in _COMPARISONS):
        per_case += ["", "## Per case: secondary (cases are not independent replicates)", "", _PER_CASE_INTRO]
    for key, intro, header, rule, line in _COMPARISONS:
        if report.get(key):
            per_case += _table(intro, header, rule, [line(c) for c in report[key]])
    runs += postprocessing_markdown(report["runs"])
    if report.get("health_warnings"):
        runs += [
            "",
            "**Health check** (a KD term whose weighted gradient dominated L_SEG's, or pointed against it, in most "
            "epochs of most of a row's runs; docs/losses.md):",
            "",
            *[f"- {w}" for w in report["health_warnings"]],
        ]
    return {
        "provenance": _provenance_markdown(report.get("provenance") or {}),
        "fold_level": _fold_level_markdown(report["fold_level"]) if report.get("fold_level") else [],
        "runs": runs,
        "per_class": _per_class_markdown(report["runs"]),
        "per_case": per_case,
    }


def postprocessing_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The rows whose runs chose postprocessing on held-out cases: their Dice without and with it."""
    processed = [r for r in rows if r.get("postprocessing")]
    if not processed:
        return []
    lines = []
    for r in processed:
        pp = r["postprocessing"]
        classes = ", ".join(f"{c} ({n})" for c, n in pp["classes_chosen"].items()) or "none"
        lines.append(
            f"| {r['run']} | {pp['runs']} | {pp['dice_without']:.4f} | {pp['dice_with']:.4f} | {classes} |"
        )
    return _table(
        "Postprocessing — the largest connected component kept for the classes each run chose on its held-out "
        "cases (never on the validation cases), headline validation Dice without and with it (mean over runs):",
        "| run | runs | Dice without | Dice with | classes chosen (runs) |",
        "|---|---:|---:|---:|---|",
        lines,
    )


def _cache_cost(seconds: dict[str, float]) -> list[str]:
    """What the cached runs share: the cache stage's seconds per fold (teachers run once, every window once)."""
    if not seconds:
        return []
    folds = ", ".join(f"fold {k} {v:.0f} s" for k, v in seconds.items())
    mean = sum(seconds.values()) / len(seconds)
    return [
        "",
        f"Caching the distilled teachers (`make cache`) took {mean:.0f} s per fold on average ({folds}; a teacher "
        "serving every fold counts in each): shared by every seed and every recipe distilled from the cache.",
    ]


def _per_class_markdown(runs: list[dict[str, Any]]) -> list[str]:
    """Per class, each run's Dice and HD95 (means over its validation cases); nothing when no run records them."""
    classes = list(dict.fromkeys(c for r in runs for c in (r.get("per_class") or {}).get("dice", {})))
    if not classes:
        return []
    cells = [f"{c} Dice | {c} HD95 mm" for c in classes]
    rows = []
    for r in runs:
        per = r.get("per_class") or {"dice": {}, "hd95_mm": {}}
        values = [
            f"{_fmt(per['dice'].get(c, math.nan))} | {_fmt(per['hd95_mm'].get(c, math.nan), 2)}"
            for c in classes
        ]
        rows.append(f"| {r['run']} | " + " | ".join(values) + " |")
    return _table(
        "Per class (means over every validation case of every fold and seed; HD95 over the cases where it is finite):",
        "| run | " + " | ".join(cells) + " |",
        "|---|" + "---:|" * (2 * len(classes)),
        rows,
    )


def _provenance_markdown(prov: dict[str, Any]) -> list[str]:
    """The header's provenance lines: runs pooled despite mixed provenance (``--allow-mixed``), then warnings."""
    lines = []
    if prov.get("mixed"):
        lines += ["", "**Pooled with --allow-mixed**: these runs are not the same experiment:", ""]
        lines += [f"- {m}" for m in prov["mixed"]]
    elif prov.get("allow_mixed"):
        lines += ["", "**Built with --allow-mixed**: no runs of mixed provenance were found to pool."]
    if prov.get("warnings"):
        lines += ["", "Provenance warnings:", ""] + [f"- {w}" for w in prov["warnings"]]
    commits = prov.get("commits") or []
    if len(commits) == 1:
        lines += ["", f"Every run recording its code was made by commit `{commits[0][:12]}`."]
    return lines


_PER_CASE_INTRO = (
    "The cases validated by one fold's model share that model, and a fold's seeds share its teachers and cases: "
    "the p-values below treat cases as independent and overstate the evidence. The fold-level comparisons above "
    "are the ones to cite."
)


def _fold_level_markdown(fold: dict[str, Any]) -> list[str]:
    """The fold-level section: how it is computed, the primary endpoint in words, the secondary table with Holm
    p-values, and the equivalence table."""
    boot = fold["bootstrap"]
    lines = [
        "",
        "## Over folds: the fold is the unit",
        "",
        "Per fold, the mean Dice (foreground classes) over its validation cases and seeds; each comparison is the "
        "mean over folds of the per-fold difference (run − against), in Dice points. The verdict reads the 95 % "
        "t-interval over the fold differences; beside it, a hierarchical bootstrap interval (folds resampled, then "
        f"cases within each fold; {boot['resamples']} resamples, seed {boot['seed']}). The Wilcoxon p on fold "
        "means is descriptive only: with n folds it cannot go below 2 / 2ⁿ (0.0625 for 5 folds), shown as "
        '"min". The primary endpoint is tested alone; the secondary p-values are Holm-adjusted over the '
        f"{fold['holm_family']} secondary comparison(s) with a test, and a secondary verdict claims an effect only "
        "when its Holm p is at most 0.05 as well as its 95 % t-interval excluding zero.",
        "",
        f"**Primary endpoint** (`evaluation.primary_endpoint`): {_claim(fold['primary'])}",
    ]
    if fold["secondary"]:
        lines += _table(
            "Secondary comparisons:",
            "| run | against | s per run (run / against) | folds | difference, points | 95 % CI (t) "
            "| 95 % CI (bootstrap) | t p | Holm p | Wilcoxon p (min) | verdict |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            [_secondary_line(c) for c in fold["secondary"]],
        )
    if fold.get("harm_flags"):
        lines += [
            "",
            "**Harm flags** (a class whose 95 % CI against the student without KD lies wholly below zero):",
            "",
        ]
        lines += [f"- {f}" for f in fold["harm_flags"]]
    if fold["equivalence"]:
        lines += _table(
            f"Equivalence of each cached recipe with its online-context twin (the teachers run afresh on the "
            "cache's own windows around every patch: the targets the cache should hold): two one-sided tests against "
            f"±{_points(fold['equivalence_margin'])} points (`evaluation.equivalence_margin`); equivalent when "
            "the 90 % CI lies inside the margin, not equivalent when the 95 % CI lies wholly outside it, "
            "inconclusive otherwise.",
            "| cached run | online run | s per run (cached / online) | folds | difference, points | 90 % CI "
            "| 95 % CI | TOST p | verdict |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
            [_equivalence_line(c) for c in fold["equivalence"]],
        )
    if fold.get("per_class"):
        lines += _table(
            "Per class, each student against the student without KD over folds (95 % t-interval, not adjusted for "
            "multiplicity: a safety check for harm, not a claim):",
            "| run | against | class | folds | difference, points | 95 % CI (t) | verdict |",
            "|---|---|---|---:|---:|---:|---|",
            [
                f"| {c['run']} | {c['against']} | {c['class']} | {c['n_folds']} | "
                f"{_points(c['mean_difference'], 2, '+')} | {_interval(c['t_interval'])} | {c['verdict']} |"
                for c in fold["per_class"]
            ],
        )
    return lines


def _points(v: float | None, digits: int = 1, sign: str = "") -> str:
    """A Dice value or difference in points (× 100), with a true minus sign; "—" when there is none."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{100 * v:{sign}.{digits}f}".replace("-", "−")


def _interval(ci: list[float] | tuple[float, float], digits: int = 2) -> str:
    return f"[{_points(ci[0], digits)}, {_points(ci[1], digits)}]"


def _p(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else ("< 0.001" if v < 0.001 else f"{v:.3g}")


def _claim(c: dict[str, Any]) -> str:
    """A fold-level comparison in words: the verdict with its effect and CI, then the rest in brackets."""
    if "unavailable" in c:
        return f"{c['run']} − {c['against']}: no interval ({c['unavailable']})."
    return (
        f"{c['run']} − {c['against']}, {c['n_folds']} folds: {c['verdict']} (hierarchical bootstrap 95 % CI "
        f"{_interval(c['bootstrap_interval'], 1)}; t p = {_p(c['t_p'])}; Wilcoxon p = {_p(c['wilcoxon_p'])}, "
        f"descriptive, min {_p(c['wilcoxon_min_p'])})."
    )


def _comparison_line(c: dict[str, Any], cells: Callable[[dict[str, Any]], list[str]], width: int) -> str:
    """A fold-level table row: the two runs, ``width`` statistics and the verdict; dashes and the reason when the
    comparison has no interval."""
    rest = ["—"] * width + [f"no interval: {c['unavailable']}"] if "unavailable" in c else cells(c)
    return "| " + " | ".join([c["run"], c["against"], _cost(c), *rest]) + " |"


def _cost(c: dict[str, Any]) -> str:
    """The two runs' mean training seconds per run (teachers' forward passes included for an online run)."""
    seconds = c.get("seconds_per_run") or [None, None]
    return " / ".join("—" if v is None or not math.isfinite(v) else f"{v:,.0f}" for v in seconds)


def _secondary_line(c: dict[str, Any]) -> str:
    return _comparison_line(
        c,
        lambda c: [
            str(c["n_folds"]),
            _points(c["mean_difference"], 2, "+"),
            _interval(c["t_interval"]),
            _interval(c["bootstrap_interval"]),
            _p(c["t_p"]),
            _p(c["holm_p"]),
            f"{_p(c['wilcoxon_p'])} ({_p(c['wilcoxon_min_p'])})",
            c["verdict"],
        ],
        width=7,
    )


def _equivalence_line(c: dict[str, Any]) -> str:
    return _comparison_line(
        c,
        lambda c: [
            str(c["n_folds"]),
            _points(c["mean_difference"], 2, "+"),
            _interval(c["interval_90"]),
            _interval(c["interval_95"]),
            _p(c["p"]),
            c["sentence"],
        ],
        width=5,
    )
