"""docs/recipes.md's recipes × datasets table, generated from each dataset's screening (or cross-validation) report.

    .venv/bin/python scripts/recipes_doc.py -c configs/demo.yaml -c configs/demo-thin.yaml \\
        -c configs/demo-organ.yaml -c configs/demo-mri.yaml [--doc docs/recipes.md] [--final]

Reads ``<runs_dir>/screening/screening.json`` (``--final``: ``<runs_dir>/report.json``) of each config, and writes
between ``<!-- recipes:start -->`` and ``<!-- recipes:end -->`` (``recipes-final`` with ``--final``): per recipe and
dataset, the fold-level mean difference to no-KD in Dice points with its 95 % t-interval (and the number of folds),
a mark for a class harm flag or a health-check warning, the teachers' ensemble margin over the student alone on the
validation cases of the experiment's own ``report.json`` (the dataset check, not a choice; without that report, the
screening's on its held-out cases, marked so), and — for the screening
only — the recipe the rule chooses (docs/recipes.md): among recipes with no harm flag on any dataset, the highest
worst-dataset mean difference, ties broken by the mean over datasets. A dataset without a report is listed as not
run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from core.config import load_config

BASELINE = "student kd-none"
ENSEMBLE_PREFIX = "teacher ensemble"


def _points(v: float) -> str:
    return f"{100 * v:+.1f}"


def comparisons(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each student run's fold-level comparison against no-KD (the primary endpoint and the secondary ones)."""
    fold = report.get("fold_level") or {}
    entries = [fold.get("primary") or {}, *(fold.get("secondary") or [])]
    return {
        e["run"].removeprefix("student kd-"): e
        for e in entries
        if e.get("against") == BASELINE and e.get("run", "").startswith("student kd-")
    }


def flagged(report: dict[str, Any]) -> dict[str, list[str]]:
    """Per recipe, its harm flags and health-check warnings."""
    out: dict[str, list[str]] = {}
    for flag in (report.get("fold_level") or {}).get("harm_flags") or []:
        out.setdefault(flag.split(" hurts class ")[0].removeprefix("kd-"), []).append("harm: " + flag)
    for warning in report.get("health_warnings") or []:
        run = warning.split(":")[0].removeprefix("student ").removeprefix("kd-")
        out.setdefault(run, []).append("health: " + warning)
    return out


def ensemble_margin(report: dict[str, Any] | None) -> float | None:
    """The teachers' ensemble's mean Dice minus the student alone's, on the cases both scored (the report's
    ``against_teacher_ensemble`` entry of no-KD); ``None`` without one."""
    for entry in (report or {}).get("against_teacher_ensemble") or []:
        if entry.get("run") == BASELINE:
            return entry["ensemble_dice"] - entry["dice"]
    return None


def ledger_check(cfg: Any) -> tuple[float, int] | None:
    """The dataset check from the ledger, where no cross-validation report exists yet: per fold, the teachers'
    ensemble (``teacher_ensemble/fold_<k>.json``, validation cases) minus the screening's student without KD on the
    same validation cases (its ``validation_per_case.csv``: a student trained on the fold's training cases less the
    screening's held-out ones), averaged over the fold's cases; then over folds. ``(margin, folds)`` or ``None``."""
    root = cfg.output.results_dir
    if root is None:
        return None
    margins = []
    for path in sorted((root / "teacher_ensemble").glob("fold_*.json")):
        kept = json.loads(path.read_text())
        scores = root / "screening" / "students" / "kd-none" / path.stem / "validation_per_case.csv"
        if kept.get("cases") != "validation" or not scores.is_file():
            continue
        with open(scores) as f:
            student = {r["case"]: float(r["mean_dice"]) for r in csv.DictReader(f)}
        ensemble = {key.split("/", 1)[1]: v[0] for key, v in kept["scores"].items()}
        common = sorted(set(student) & set(ensemble))
        if common:
            margins.append(sum(ensemble[c] - student[c] for c in common) / len(common))
    return (sum(margins) / len(margins), len(margins)) if margins else None


def choose(reports: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """The rule of docs/recipes.md over the datasets' reports: the recipe, and why."""
    by_dataset = {name: comparisons(r) for name, r in reports.items()}
    flags = {name: flagged(r) for name, r in reports.items()}
    recipes = sorted(set().union(*(set(c) for c in by_dataset.values()))) if by_dataset else []
    scored = []
    for recipe in recipes:
        if any(f.startswith("harm") for d in flags.values() for f in d.get(recipe, [])):
            continue
        diffs = [c[recipe].get("mean_difference") for c in by_dataset.values() if recipe in c]
        if len(diffs) < len(reports) or any(d is None or not math.isfinite(d) for d in diffs):
            continue
        scored.append((min(diffs), sum(diffs) / len(diffs), recipe))
    if not scored:
        return None, "no recipe was run on every dataset without a harm flag"
    worst, mean, recipe = max(scored)
    why = f"worst dataset {_points(worst)} points, mean over datasets {_points(mean)} points"
    if worst < 0:  # the rule still names the recipe that hurts least; it must not read as one that helps
        why += "; no recipe helps on every dataset: this one hurts least where it hurts"
    return recipe, why


def unfinished(reports: dict[str, dict[str, Any] | None], folds: dict[str, int]) -> list[str]:
    """The datasets whose screening is not complete: no report, or a recipe compared over fewer than the experiment's
    ``folds`` (a study interrupted between folds: the rule must not choose on part of it)."""
    out = []
    for name, report in reports.items():
        entries = comparisons(report) if report is not None else {}
        if not entries or any(e.get("n_folds", 0) < folds.get(name, 0) for e in entries.values()):
            out.append(name)
    return out


def table(
    reports: dict[str, dict[str, Any] | None],
    checks: dict[str, dict[str, Any] | None] | None = None,
    rule: bool = True,
    ledger_checks: dict[str, tuple[float, int] | None] | None = None,
    folds: dict[str, int] | None = None,
) -> list[str]:
    """The markdown table and (``rule``: the screening's) the rule's choice; ``checks`` are the reports the teachers'
    ensemble margin is read from (the experiments' validation reports; default ``reports``); ``folds``: each
    dataset's number of folds, which every recipe must have been compared over before the rule chooses."""
    names = list(reports)
    done = {n: r for n, r in reports.items() if r is not None}
    by_dataset = {n: comparisons(r) for n, r in done.items()}
    flags = {n: flagged(r) for n, r in done.items()}
    recipes = sorted(set().union(*(set(c) for c in by_dataset.values()))) if by_dataset else []
    lines = [
        "| recipe | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    checks = reports if checks is None else checks
    cells = []
    for n in names:  # the validation report's; else the ledger's; else the screening's on its held-out cases
        m, note = ensemble_margin(checks.get(n)), ""
        kept = (ledger_checks or {}).get(n)
        if m is None and kept is not None:
            m, note = kept[0], f" ({kept[1]} folds, student alone from the screening)"
        if m is None and rule:
            m, note = ensemble_margin(reports.get(n)), " (held-out cases)"
        cells.append("not run" if m is None else f"{_points(m)}{note}")
    lines.append("| *teachers' ensemble − no KD (validation cases)* | " + " | ".join(cells) + " |")
    for recipe in recipes:
        cells = []
        for n in names:
            if n not in done:
                cells.append("not run")
                continue
            c = by_dataset[n].get(recipe)
            if c is None or c.get("unavailable"):
                cells.append("—")
                continue
            low, high = c["t_interval"]
            mark = " ⚑" if any(f.startswith("harm") for f in flags[n].get(recipe, [])) else ""
            mark += " ⚠" if any(f.startswith("health") for f in flags[n].get(recipe, [])) else ""
            cells.append(
                f"{_points(c['mean_difference'])} [{_points(low)}, {_points(high)}] ({c['n_folds']}){mark}"
            )
        lines.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each cell: the recipe's mean difference to the student without KD over folds, in Dice points, its 95 % "
        "t-interval and the number of folds; ⚑ a class whose interval lies wholly below zero (harm flag), ⚠ a KD "
        "term that dominated or opposed L_SEG in most runs (health check). The first row is the dataset check: the "
        "teachers' ensemble against the student alone on the validation cases of the experiment's own report; where "
        "that has not been run, against the screening's student without KD on the same validation cases, from the "
        "ledger (a check of the dataset, not of a recipe: no recipe is compared there), or on the screening's "
        "held-out cases; each marked so.",
    ]
    if not rule:  # the final evaluation reports; the choice was made on the screening's held-out cases
        return lines
    waiting = [n for n in unfinished(reports, folds or {}) if n in done]
    if len(done) < len(reports):
        chosen, why = None, "not every dataset has been run"
    elif waiting:
        chosen, why = None, "not every fold has been run: " + ", ".join(waiting)
    else:
        chosen, why = choose(done)
    lines += [
        "",
        f"The rule's choice: **{chosen}** ({why})." if chosen else f"The rule's choice: none yet ({why}).",
    ]
    return lines


def rewrite(doc: Path, marker: str, lines: list[str]) -> None:
    """Replace what lies between the ``<!-- marker:start -->`` and ``<!-- marker:end -->`` lines of ``doc``."""
    text = doc.read_text()
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no <!-- {marker}:start --> … <!-- {marker}:end --> markers")
    doc.write_text(pattern.sub(lambda m: m.group(1) + "\n".join(lines) + "\n" + m.group(2), text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", required=True)
    parser.add_argument("--doc", default="docs/recipes.md")
    parser.add_argument(
        "--final", action="store_true", help="the cross-validation reports, not the screenings"
    )
    args = parser.parse_args()
    reports: dict[str, dict[str, Any] | None] = {}
    checks: dict[str, dict[str, Any] | None] = {}
    kept: dict[str, tuple[float, int] | None] = {}
    folds: dict[str, int] = {}
    for path in args.config:
        cfg = load_config(path)
        file = cfg.output.runs_dir / ("report.json" if args.final else "screening/screening.json")
        reports[cfg.experiment] = json.loads(file.read_text()) if file.is_file() else None
        own = cfg.output.runs_dir / "report.json"
        checks[cfg.experiment] = json.loads(own.read_text()) if own.is_file() else None
        kept[cfg.experiment] = ledger_check(cfg)
        folds[cfg.experiment] = cfg.splits.num_folds
    rewrite(
        Path(args.doc),
        "recipes-final" if args.final else "recipes",
        table(reports, checks, rule=not args.final, ledger_checks=kept, folds=folds),
    )
    print(
        f"{args.doc}: {'final' if args.final else 'screening'} table of {len(reports)} dataset(s) rewritten"
    )


if __name__ == "__main__":
    main()
