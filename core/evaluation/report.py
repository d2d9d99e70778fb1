"""The fold report: each teacher's and student's validation Dice and size, and the wall time of each stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.config import Config
from core.errors import TeachCacheError
from core.experiment import teacher_dir
from core.store.teacher_store import TeacherStore

__all__ = ["build_report", "report_markdown"]


def _summary(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _terms(distillation: dict[str, Any] | None) -> str:
    """A run's distillation recipe in one line, e.g. ``pwd×1 + afs×1 (T=2)``; ``—`` for the no-KD baseline."""
    if not distillation or distillation.get("kind") == "none":
        return "—"
    terms = " + ".join(f"{t['name']}×{t['weight']:g}" for t in distillation.get("terms", []))
    return f"{terms} (T={distillation.get('temperature', 1.0):g})" if terms else "—"


def _model_row(model: str, s: dict[str, Any], terms: str) -> dict[str, Any]:
    """One model's report row from the ``summary.json`` its run wrote."""
    return {
        "model": model,
        "arch": s["arch"],
        "dice": s.get("headline_mean_dice", s.get("final_mean_dice", float("nan"))),
        "dice_per_class": s.get("headline_dice_per_class", s.get("final_dice_per_class", [])),
        "selection": s.get("headline", "final"),
        "best_on_val_dice": s["best_mean_dice"],
        "best_on_val_epoch": s["best_epoch"],
        "parameters": s["parameters"],
        "train_seconds": s["seconds"],
        "terms": terms,
    }


def _model_rows(cfg: Config, fold: int) -> list[dict[str, Any]]:
    """The rows of every teacher of the config, then every student run under ``runs_dir/students/kd-*/``, that
    finished ``fold``."""
    rows = []
    for t in cfg.teachers:
        s = _summary(teacher_dir(cfg, t.name, fold) / "summary.json")
        if s:
            rows.append(_model_row(f"teacher {t.name}", s, "—"))
    students = cfg.output.runs_dir / "students"
    for run in sorted(students.glob("kd-*")) if students.is_dir() else []:
        s = _summary(run / f"fold_{fold}" / "summary.json")
        if s:
            kind = run.name.removeprefix("kd-")
            rows.append(_model_row(f"student kd-{kind}", s, _terms(s.get("distillation"))))
    return rows


def _stage_seconds(cfg: Config, fold: int, rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The wall time of each stage for ``fold``: preprocessing and caching (from the store, when there is one),
    training the teachers (summed) and each distillation run."""
    stages: dict[str, float | None] = {"preprocess": None, "cache": None}
    if TeacherStore.exists(cfg.store.path):
        store = TeacherStore.open(cfg.store.path)
        stages["preprocess"] = store.metadata.get("preprocess_seconds")
        keys = [k for k in store.teacher_keys() if k.rsplit("/", 1)[1] in (f"fold_{fold}", "all_folds")]
        secs = [store.teacher_metadata(k).get("cache_seconds") for k in keys]
        stages["cache"] = round(sum(s for s in secs if s), 2) if any(secs) else None
    stages["train teachers"] = round(
        sum(r["train_seconds"] for r in rows if r["model"].startswith("teacher")), 2
    )
    for r in rows:
        if r["model"].startswith("student"):
            stages[f"distil {r['model'].removeprefix('student ')}"] = r["train_seconds"]
    return stages


def build_report(cfg: Config, fold: int) -> dict[str, Any]:
    """Collect the summaries the stages wrote for ``fold``: every teacher of the config and every student run
    found under ``runs_dir/students/kd-*/``, whatever its recipe.

    Raises:
        TeachCacheError: nothing has been trained for this fold yet.
    """
    rows = _model_rows(cfg, fold)
    if not rows:
        raise TeachCacheError(f"nothing trained for fold {fold} under {cfg.output.runs_dir}; run `make demo`")
    stages = _stage_seconds(cfg, fold, rows)
    report = {"experiment": cfg.experiment, "fold": fold, "models": rows, "stage_seconds": stages}
    out = cfg.output.runs_dir / f"report_fold_{fold}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(report_markdown(report))
    return report


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['experiment']}: fold {report['fold']}",
        "",
        "| model | arch | distillation terms | val Dice | model chosen by | best epoch's val Dice (optimistic) | params |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in report["models"]:
        chosen = "held-out training cases" if r.get("selection") == "holdout" else "final model"
        lines.append(
            f"| {r['model']} | {r['arch']} | {r.get('terms', '—')} | {r['dice']:.4f} | {chosen} | "
            f"{r['best_on_val_dice']:.4f} (epoch {r['best_on_val_epoch']}) | {r['parameters']:,} |"
        )
    lines += [
        "",
        "Val Dice is the headline model's on the fold's validation cases, chosen without them: the final model, or "
        "the epoch with the best Dice on cases held out of training (training.holdout). The best epoch's Dice is "
        "chosen on the same cases it is scored on, so it is optimistic: shown for comparison only.",
    ]
    lines += ["", "| stage | wall time (s) |", "|---|---:|"]
    for stage, secs in report["stage_seconds"].items():
        lines.append(f"| {stage} | {'—' if secs is None else f'{secs:.1f}'} |")
    return "\n".join(lines) + "\n"
