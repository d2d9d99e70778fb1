"""The cross-validation report pools only runs that are the same experiment (issue 23, checked provenance).

Runs are written by hand (``summary.json`` with what real runs record: ``run_fields``, ``teacher_entry_keys``,
``code``) so each test changes exactly one thing; the real runs' records are checked in tests/test_context.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from teachcache.cli import app
from tests.test_cross_validation import _fake_runs

runner = CliRunner()
COMMIT = "a" * 40


def _entry(fold: int, roi: int = 32) -> dict:
    return {"checkpoint_sha256": f"{fold:064d}", "arch": "unetr", "inference": {"roi_size": [roi] * 3}}


def _record(root: Path, change=None) -> None:
    """Give every fake run the provenance a real one records; ``change(kind, fold, seed, summary)`` edits one."""
    for summary_path in sorted((root / "runs" / "students").rglob("summary.json")):
        folder = summary_path.parent
        repeat = folder.parent.name.startswith("seed_")
        kind = (folder.parent.parent if repeat else folder.parent).name.removeprefix("kd-")
        fold = int(folder.name.removeprefix("fold_"))
        seed = int(folder.parent.name.removeprefix("seed_")) if repeat else None
        summary = json.loads(summary_path.read_text())
        teachers = {} if kind == "none" else {f"unetr/fold_{fold}": _entry(fold)}
        summary |= {
            "run_fields": {
                "name": f"student kd-{kind}",
                "cases": [f"f{fold}c{i}" for i in range(4)],
                "dataset_seed": seed or 0,
                "inference": {"roi_size": [32, 32, 32]},
                "training": {"epochs": 20, "seed": seed or 0},
                "targets": f"TargetRequest(teachers=('unetr/fold_{fold}',))" if teachers else "None",
                "meta": {"fold": fold, "teachers": {k: v["checkpoint_sha256"] for k, v in teachers.items()}},
            },
            "teacher_entry_keys": teachers,
            "code": {"commit": COMMIT, "dirty": False},
        }
        if change is not None:
            change(kind, fold, seed, summary)
        summary_path.write_text(json.dumps(summary))


def _report(path: Path, *args: str):
    return runner.invoke(app, ["report", "-c", str(path), *args])


def test_runs_of_one_experiment_are_pooled_and_their_commit_named(tmp_path):
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03, "teachformer-online-context": 0.03})
    _record(tmp_path)
    result = _report(path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert report["provenance"] == {"allow_mixed": False, "mixed": [], "warnings": [], "commits": [COMMIT]}
    assert f"made by commit `{COMMIT[:12]}`" in (tmp_path / "runs" / "report.md").read_text()


def test_a_fold_run_with_other_settings_is_refused_and_nothing_written(tmp_path):
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03})

    def other_window(kind, fold, seed, summary):
        if kind == "teachformer" and fold == 2 and seed is None:
            summary["run_fields"]["inference"]["roi_size"] = [64, 64, 64]

    _record(tmp_path, other_window)
    result = _report(path)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert (
        "kd-teachformer fold 0 and kd-teachformer fold 2 differ in their settings: inference.roi_size"
        in message
    )
    assert "--allow-mixed" in message
    assert not (tmp_path / "runs" / "report.json").exists() and not (tmp_path / "runs" / "report.md").exists()

    result = _report(path, "--allow-mixed")
    assert result.exit_code == 0, result.output
    assert "pooled with --allow-mixed" in " ".join(result.output.split())
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "**Pooled with --allow-mixed**" in md and "inference.roi_size" in md
    assert md.index("**Pooled with --allow-mixed**") < md.index("## Over folds")


def test_teachers_cached_with_other_settings_in_one_fold_are_refused(tmp_path):
    """A fold whose teachers were cached on another grid (its entry keys differ in more than the checkpoint)."""
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03}, seeds=(None,))

    def other_grid(kind, fold, seed, summary):
        if kind == "teachformer" and fold == 0:
            summary["teacher_entry_keys"] = {"unetr/fold_0": _entry(0, roi=64)}

    _record(tmp_path, other_grid)
    result = _report(path)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert (
        "teacher entries (besides each fold's checkpoint)" in message
        and "unetr: inference.roi_size" in message
    )


def test_a_cached_run_and_its_online_twin_from_different_teachers_are_refused(tmp_path):
    path = _fake_runs(
        tmp_path, {"none": 0.0, "teachformer": 0.03, "teachformer-online-context": 0.03}, seeds=(None,)
    )

    def other_checkpoint(kind, fold, seed, summary):
        if kind == "teachformer-online-context" and fold == 3:
            summary["teacher_entry_keys"]["unetr/fold_3"]["checkpoint_sha256"] = "f" * 64

    _record(tmp_path, other_checkpoint)
    result = _report(path)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert (
        "kd-teachformer fold 3 and kd-teachformer-online-context fold 3 are paired but learnt from" in message
    )
    assert "unetr: checkpoint_sha256" in message


def test_two_arms_trained_for_other_epochs_are_not_a_comparison(tmp_path):
    """Paired arms differ in their recipe only: a no-KD baseline trained longer than the cached run is refused."""
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03}, seeds=(None,))

    def longer(kind, fold, seed, summary):
        if kind == "none":
            summary["run_fields"]["training"]["epochs"] = 40

    _record(tmp_path, longer)
    result = _report(path)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert (
        "kd-teachformer fold 0 and kd-none fold 0 are paired but differ in more than their arm: training.epochs"
        in (message)
    )


def test_a_per_fold_nnunet_teacher_is_the_same_teacher_in_every_fold(tmp_path):
    """Its fold's own weights and nnU-Net fold differ by fold by design; its configuration and window do not."""
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03}, seeds=(None,))

    def nnunet(kind, fold, seed, summary):
        if kind == "teachformer":
            key = {
                "checkpoint_sha256": None,
                "teacher_kind": "nnunet",
                "nnunet": {"folds": [fold], "checkpoints_sha256": [f"{fold:064d}"], "plans_sha256": "p" * 64},
                "inference": {"roi_size": [32, 32, 32]},
            }
            summary["teacher_entry_keys"] = {f"nnu/fold_{fold}": key}
            if fold == 4:
                summary["teacher_entry_keys"] = {
                    f"nnu/fold_{fold}": {**key, "inference": {"roi_size": [64] * 3}}
                }

    _record(tmp_path, nnunet)
    result = _report(path)
    assert result.exit_code == 2, "another window in fold 4 is still a difference"
    assert "nnu: inference.roi_size" in " ".join(result.output.split())
    assert "nnunet.folds" not in result.output and "checkpoints_sha256" not in result.output


def test_runs_of_other_commits_or_a_dirty_tree_are_a_warning_not_a_refusal(tmp_path):
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03}, seeds=(None,))

    def later_commit(kind, fold, seed, summary):
        if fold == 4:
            summary["code"] = {"commit": "b" * 40, "dirty": True}

    _record(tmp_path, later_commit)
    result = _report(path)
    assert result.exit_code == 0, result.output
    warnings = json.loads((tmp_path / "runs" / "report.json").read_text())["provenance"]["warnings"]
    assert warnings[0] == f"runs made by 2 commits ({'a' * 10}, {'b' * 10})"
    assert warnings[1].startswith("2 run(s) made from a tree with uncommitted changes")
    assert "Provenance warnings:" in (tmp_path / "runs" / "report.md").read_text()
    assert "provenance: runs made by 2 commits" in " ".join(result.output.split())


def test_the_demo_doc_is_generated_from_the_report_between_its_markers(tmp_path):
    """`make demo-doc`: docs/demo.md's evidence comes from report.json; the typed text around it is kept."""
    import subprocess
    import sys

    path = _fake_runs(
        tmp_path,
        {
            "none": 0.0,
            "teachformer": 0.03,
            "teachformer-online-patch": 0.0,
            "teachformer-online-context": 0.03,
        },
    )
    _record(tmp_path)
    assert _report(path).exit_code == 0
    doc = tmp_path / "demo.md"
    script = Path(__file__).resolve().parents[1] / "scripts" / "demo_doc.py"
    doc.write_text("# typed\n\nno markers\n")
    run = [sys.executable, str(script), "--config", str(path), "--doc", str(doc)]
    refused = subprocess.run(run, capture_output=True, text=True)
    assert refused.returncode == 2 and "has no generated part" in refused.stderr
    assert doc.read_text() == "# typed\n\nno markers\n"

    from scripts.demo_doc import BEGIN, END

    doc.write_text(f"# typed before\n\n{BEGIN}\nstale numbers\n{END}\n\ntyped after\n")
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = doc.read_text()
    assert text.startswith("# typed before\n\n" + BEGIN) and text.endswith(END + "\n\ntyped after\n")
    assert "stale numbers" not in text
    assert "- **Primary endpoint** (kd-teachformer − kd-none, 5 folds): improves Dice by +3." in text
    assert "online-context, TOST): **equivalent** within ±2.0 Dice points" in text
    assert (
        "**The cache against per-patch online distillation** (TeachFormer's regime) (kd-teachformer − "
        in text
    )
    assert "improves Dice by +3." in text.split("per-patch online distillation")[1]
    assert f"runs made by commit `{COMMIT[:12]}`" in text
    assert "### Over folds: the fold is the unit" in text and "### Runs" in text
