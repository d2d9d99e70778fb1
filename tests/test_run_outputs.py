"""What a run leaves for a reviewer: the final model as headline, per-case scores, and a seed that matters."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
from typer.testing import CliRunner

from cache_teachers import preprocess_dataset
from core.models.checkpoint import load_checkpoint
from teachcache.cli import app
from tests.conftest import derived_config

runner = CliRunner()


def _baseline_run(trained, name: str, **changes):
    root, data = trained
    cfg, path = derived_config(
        root, data, name, **{"training.epochs": 2, "training.iterations_per_epoch": 2, **changes}
    )
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "--kd", "none", "-q"])
    assert result.exit_code == 0, result.output
    return cfg, cfg.output.runs_dir / "students" / "kd-none" / "fold_0", result.output


def test_the_final_model_is_the_headline_with_per_case_scores(trained):
    cfg, run, output = _baseline_run(trained, "final_headline")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_epoch"] == 1 and summary["checkpoint_final"] == str(run / "checkpoint_final.pth")
    ckpt = load_checkpoint(run / "checkpoint_final.pth")
    assert ckpt.meta["selection"] == "final" and ckpt.meta["epoch"] == 1
    with open(run / "validation_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == summary["val_cases"]
    per_case = np.array([float(r["dice_tumour"]) for r in rows])
    # the headline: the final model, scored in each case's original geometry (the raw files are at hand)
    assert summary["headline"] == "final" and summary["evaluated_in"] == "original geometry"
    assert np.isclose(per_case.mean(), summary["headline_mean_dice"], atol=1e-5)
    hd95 = np.array([float(r["hd95_mm_tumour"]) for r in rows])
    assert (hd95 >= 0).all() and np.isclose(hd95.mean(), summary["headline_hd95_per_class"][0], atol=1e-3)
    assert "(final model;" in output and "chosen on the same cases" in " ".join(output.split())
    config = str(cfg.output.runs_dir.parent / "final_headline.yaml")
    report = runner.invoke(app, ["report", "-c", config, "--fold", "0"])
    assert report.exit_code == 0, report.output
    assert f"{summary['headline_mean_dice']:.4f}" in report.output and "optimistic" in report.output


def test_the_experiment_seed_changes_initialisation_and_patches(trained):
    _, run_a, _ = _baseline_run(trained, "seed_a", seed=0)
    _, run_b, _ = _baseline_run(trained, "seed_b", seed=1)
    _, run_c, _ = _baseline_run(trained, "seed_c", seed=1)
    a, b, c = (load_checkpoint(r / "checkpoint_final.pth").state_dict for r in (run_a, run_b, run_c))
    assert any(not torch.equal(a[k], b[k]) for k in a), "another experiment seed trains another model"
    assert all(torch.equal(b[k], c[k]) for k in b), "the same seed reproduces the run bit for bit"
    seeds = {json.loads((r / "summary.json").read_text())["seed"] for r in (run_a, run_b, run_c)}
    assert len(seeds) == 2


def test_paired_tests_match_hand_computed_values():
    from core.evaluation.cv_report import paired_tests

    # differences 1, 2, 3, 4: mean 2.5, sd 1.291, t = 3.873 on 3 df → p = 0.0305; Wilcoxon (exact, n = 4,
    # every difference positive) p = 2 / 2⁴ = 0.125
    out = paired_tests([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    assert out["n"] == 4 and out["mean_difference"] == 2.5
    assert abs(out["t_test_p"] - 0.0305) < 5e-4 and abs(out["wilcoxon_p"] - 0.125) < 1e-9
    assert np.isnan(paired_tests([0.5, 0.5], [0.5, 0.5])["wilcoxon_p"]), "no difference: no test"


def test_the_cross_validation_report_pairs_runs_per_case(trained):
    from cache_teachers import cache_teachers

    root, data = trained
    cfg, path = derived_config(
        root,
        data,
        "cv_report",
        **{"training.epochs": 1, "training.iterations_per_epoch": 2, "distillation.teachers": ["dynunet"]},
    )
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    recipe = root / "cv_report_pwd.yaml"
    recipe.write_text(f"extends: {path}\ndistillation: {{kind: pwd-only, terms: [{{name: pwd}}]}}\n")
    for fold in ("0", "1"):  # the fold-0 teacher saw fold 1's validation cases: allowed and recorded here
        for args in (["-c", str(path), "--kd", "none"], ["-c", str(recipe), "--allow-leakage"]):
            result = runner.invoke(app, ["distil", *args, "--fold", fold, "-q"])
            assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", "-c", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((cfg.output.runs_dir / "report.json").read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert runs["student kd-none"]["folds"] == [0, 1] and runs["student kd-pwd-only"]["cases"] == 4
    (pair,) = report["paired_vs_no_kd"]
    assert pair["run"] == "student kd-pwd-only" and pair["n"] == 4
    assert (cfg.output.runs_dir / "report.md").read_text().count("| student kd-") >= 3
    assert (cfg.output.runs_dir / "report_dice.png").stat().st_size > 0


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(trained, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from cache_teachers import cache_teachers

    root, data = trained
    cfg, path = derived_config(
        root,
        data,
        "resume",
        **{"training.epochs": 3, "training.iterations_per_epoch": 2, "distillation.teachers": ["dynunet"]},
    )
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    reference = yaml.safe_load(path.read_text())
    reference["output"]["runs_dir"] = str(tmp_path / "uninterrupted")
    ref_path = tmp_path / "reference.yaml"
    ref_path.write_text(yaml.safe_dump(reference))
    # all three runs are processes of their own, as a user starts them: an in-process run would inherit this test
    # session's torch threads and other global state, which a bit-for-bit comparison must not depend on
    reference_run = subprocess.run(
        [sys.executable, "-m", "teachcache", "distil", "-c", str(ref_path), "--fold", "0", "-q"],
        capture_output=True,
        text=True,
    )
    assert reference_run.returncode == 0, reference_run.stderr

    command = [sys.executable, "-m", "teachcache", "distil", "-c", str(path), "--fold", "0", "-q"]
    killed = subprocess.run(
        command, env={**os.environ, "TEACHCACHE_TEST_KILL_AT_STEP": "3"}, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = cfg.output.runs_dir / "students" / "kd-teachformer" / "fold_0"
    partial = run.parent / ".fold_0.partial"
    assert not run.exists() and (partial / "checkpoint_latest.pth").is_file(), (
        "killed mid-epoch 1, epoch 0 kept"
    )
    state = torch.load(partial / "checkpoint_latest.pth", weights_only=True)
    assert state["epoch"] == 0
    epoch0_seconds = state["rows"][0]["seconds"]
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists() and not (run / "checkpoint_latest.pth").exists()

    uninterrupted = tmp_path / "uninterrupted" / "students" / "kd-teachformer" / "fold_0"
    a = load_checkpoint(run / "checkpoint_final.pth").state_dict
    b = load_checkpoint(uninterrupted / "checkpoint_final.pth").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a), "bit-identical weights"
    rows_a = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    rows_b = list(csv.DictReader((uninterrupted / "metrics.csv").read_text().splitlines()))
    assert float(rows_a[0]["seconds"]) == epoch0_seconds, "epoch 0 was resumed, not trained again"
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows_a] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in rows_b
    ]


def test_a_killed_run_of_other_settings_is_named_and_discarded(trained):
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from cache_teachers import cache_teachers

    root, data = trained
    cfg, path = derived_config(
        root,
        data,
        "resume_changed",
        **{"training.epochs": 2, "training.iterations_per_epoch": 2, "distillation.teachers": ["dynunet"]},
    )
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    command = [
        sys.executable,
        "-m",
        "teachcache",
        "distil",
        "-c",
        str(path),
        "--fold",
        "0",
        "--kd",
        "none",
        "-q",
    ]
    killed = subprocess.run(
        command, env={**os.environ, "TEACHCACHE_TEST_KILL_AT_STEP": "3"}, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    changed = yaml.safe_load(path.read_text())
    changed["training"]["lr"] = 0.002
    path.write_text(yaml.safe_dump(changed))
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "--kd", "none", "-q"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning:" in text and "differs in training.lr" in text and "training starts afresh" in text, text
    summary = json.loads(
        (cfg.output.runs_dir / "students" / "kd-none" / "fold_0" / "summary.json").read_text()
    )
    assert summary["epochs_run"] == 2
