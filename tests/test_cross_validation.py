"""Cross-validation as a user runs it: per-fold teachers in the store, `teachcache cv` over folds, resumable, and
model selection that never looks at the validation cases."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from core.config import load_config
from core.data.splits import holdout_split
from core.errors import ConfigError
from core.store.teacher_store import TeacherStore
from teachcache.cli import app
from tests.conftest import TINY_TEACHER_TRAINING, tiny_config_dict, write_config

runner = CliRunner()


@pytest.fixture(scope="module")
def per_fold(tmp_path_factory):
    """A tiny experiment whose one teacher has a checkpoint per fold (``{fold}`` in its path), held-out selection for
    the teacher (its Dice weighs it) and Dice-weighted distillation; `teachcache cv` run on folds 0 and 1."""
    from cache_teachers import preprocess_dataset
    from core.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("per_fold")
    data = tiny_config_dict(root)
    teacher = next(t for t in data["teachers"] if t["name"] == "dynunet")
    teacher["checkpoint"] = str(root / "runs" / "teachers" / "dynunet" / "fold_{fold}" / "teacher.pth")
    teacher["training"] = {**TINY_TEACHER_TRAINING, "holdout": 0.3}
    data["teachers"] = [teacher]
    data["training"]["epochs"] = 1
    data["distillation"]["terms"] = [{"name": "pwd", "weight": 1.0, "teacher_weights": "dice"}]
    path = write_config(root, data)
    cfg = load_config(path)
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["cv", "-c", str(path), "--fold", "0", "--fold", "1", "-q"])
    assert result.exit_code == 0, result.output
    return cfg, path, result.output


def test_each_fold_has_its_own_teacher_which_never_saw_that_folds_validation_cases(per_fold):
    cfg, _, _ = per_fold
    store = TeacherStore.open(cfg.store.path)
    assert store.teacher_keys() == ["dynunet/fold_0", "dynunet/fold_1"]
    splits = store.metadata["splits"]
    for fold in (0, 1):
        prov = store.teacher_metadata(f"dynunet/fold_{fold}")
        assert prov["fold"] == prov["cached_for_fold"] == fold and prov["slot"] == f"fold_{fold}"
        assert not set(prov["train_cases"]) & set(splits[fold]["val"]), (
            "the fold's teacher never saw its val cases"
        )
        assert all(store.has_entry(f"dynunet/fold_{fold}", c) for c in store.case_ids())
        summary = json.loads(
            (
                cfg.output.runs_dir / "students" / "kd-teachformer" / f"fold_{fold}" / "summary.json"
            ).read_text()
        )
        assert list(summary["teachers"]) == [f"dynunet/fold_{fold}"], (
            "fold k's student learns from fold k's teacher"
        )
    sha = {store.teacher_metadata(f"dynunet/fold_{k}")["checkpoint_sha256"] for k in (0, 1)}
    assert len(sha) == 2, "two folds, two different teachers"


def test_teacher_dice_weights_come_from_cases_held_out_of_the_teachers_training(per_fold):
    cfg, _, _ = per_fold
    store = TeacherStore.open(cfg.store.path)
    splits = store.metadata["splits"]
    for fold in (0, 1):
        prov = store.teacher_metadata(f"dynunet/fold_{fold}")
        held = prov["holdout_cases"]
        assert held and set(held) <= set(splits[fold]["train"]) and not set(held) & set(splits[fold]["val"])
        assert 0.0 <= prov["holdout_mean_dice"] <= 1.0
        # per class too (teacher_weights: class_dice): one Dice per foreground class, their mean the mean
        assert len(prov["holdout_dice_per_class"]) == len(store.metadata["dataset"]["class_names"]) - 1
        assert sum(prov["holdout_dice_per_class"]) / len(prov["holdout_dice_per_class"]) == pytest.approx(
            prov["holdout_mean_dice"]
        )
        teacher_run = json.loads(
            (cfg.output.runs_dir / "teachers" / "dynunet" / f"fold_{fold}" / "summary.json").read_text()
        )
        assert not set(held) & set(teacher_run["fit_cases"]), "held-out cases are not trained on"
        assert teacher_run["headline"] == "holdout"


def test_a_student_weighs_its_teachers_by_their_per_class_holdout_dice(per_fold, tmp_path):
    import yaml

    _, path, _ = per_fold
    data = yaml.safe_load(Path(path).read_text())
    data["distillation"]["terms"] = [{"name": "pwd", "weight": 1.0, "teacher_weights": "class_dice"}]
    data["output"]["runs_dir"] = str(tmp_path / "runs")
    other = tmp_path / "class_dice.yaml"
    other.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["distil", "-c", str(other), "--fold", "0", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs/students/kd-teachformer/fold_0/summary.json").read_text())
    assert summary["distillation"]["terms"][0]["teacher_weights"] == "class_dice"


def test_the_cv_report_and_a_rerun_that_trains_nothing(per_fold):
    cfg, path, output = per_fold
    report = cfg.output.runs_dir / "report.md"
    assert report.is_file() and "kd-teachformer" in report.read_text()
    assert "fold 1: student kd-teachformer" in output
    summaries = sorted(cfg.output.runs_dir.rglob("summary.json"))
    assert len(summaries) == 6, summaries  # 2 folds × (teacher, kd-none, kd-teachformer)
    before = {p: p.stat().st_mtime_ns for p in summaries}
    again = runner.invoke(app, ["cv", "-c", str(path), "--fold", "0", "--fold", "1", "-q"])
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in summaries} == before, "a finished run is not trained again"
    assert "cached 0 entries" in again.output


def test_the_report_has_the_teacher_ensemble_and_seed_repeats(per_fold):
    cfg, path, _ = per_fold
    result = runner.invoke(app, ["cv", "-c", str(path), "--fold", "0", "--seed", "0", "--seed", "3", "-q"])
    assert result.exit_code == 0, result.output
    repeat = cfg.output.runs_dir / "students" / "kd-none" / "seed_3" / "fold_0" / "summary.json"
    first = cfg.output.runs_dir / "students" / "kd-none" / "fold_0" / "summary.json"
    assert (
        json.loads(repeat.read_text())["training_seed"] == 3
        and json.loads(first.read_text())["training_seed"] == 0
    )
    assert json.loads(repeat.read_text())["seed"] != json.loads(first.read_text())["seed"], "another run seed"
    report = json.loads((cfg.output.runs_dir / "report.json").read_text())
    rows = {r["run"]: r for r in report["runs"]}
    assert rows["student kd-none"]["seeds"] == 2 and rows["student kd-none"]["folds"] == [0, 1]
    ensemble = rows["teacher ensemble (cached, equal weights)"]
    assert ensemble["folds"] == [0, 1] and ensemble["cases"] == rows["student kd-none"]["cases"]
    against = {c["run"]: c for c in report["against_teacher_ensemble"]}
    assert against["student kd-none"]["ratio"] == pytest.approx(
        against["student kd-none"]["dice"] / against["student kd-none"]["ensemble_dice"]
    )
    assert "| sd over seeds |" in (cfg.output.runs_dir / "report.md").read_text()
    primary = report["fold_level"]["primary"]  # fold 0 with seeds 0 and 3, fold 1 with seed 0: two folds
    assert (primary["run"], primary["against"], primary["folds"]) == (
        "student kd-teachformer",
        "student kd-none",
        [0, 1],
    )
    assert (
        rows["student kd-none"]["gflops_per_window"] > 0 and rows["student kd-none"]["seconds_per_volume"] > 0
    )


def test_a_checkpoint_made_for_another_fold_is_refused(per_fold):
    cfg, path, _ = per_fold
    fold0 = cfg.teachers[0].for_fold(0).checkpoint
    fold2 = cfg.teachers[0].for_fold(2).checkpoint
    fold2.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fold0, fold2)
    try:
        result = runner.invoke(app, ["cache", "-c", str(path), "--fold", "2", "-q"])
    finally:
        fold2.unlink()
    assert result.exit_code == 2, result.output
    assert "records being trained for fold 0" in result.output and "make teachers FOLD=2" in result.output


def test_bad_folds_are_refused_naming_the_fix(per_fold):
    _, path, _ = per_fold
    result = runner.invoke(app, ["cv", "-c", str(path), "--fold", "7", "-q"])
    assert result.exit_code == 2 and "fold(s) 7 do not exist" in result.output, result.output
    result = runner.invoke(app, ["cache", "-c", str(path), "--fold", "7", "-q"])
    assert result.exit_code == 2 and "fold 7 does not exist" in result.output, result.output
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "2", "-q"])
    assert result.exit_code == 2, result.output
    assert "'dynunet/fold_2' is not cached" in result.output and "make cache FOLD=2" in result.output


def test_dice_weights_without_held_out_teacher_dice_are_refused(per_fold, tmp_path):
    cfg, path, _ = per_fold
    # the same experiment, its teacher without held-out cases: only its fold's validation Dice is known
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    data["teachers"][0]["training"].pop("holdout")
    data["output"]["runs_dir"] = str(tmp_path / "runs")
    data["teachers"][0]["checkpoint"] = str(tmp_path / "teachers" / "fold_{fold}.pth")
    other = tmp_path / "no_holdout.yaml"
    other.write_text(yaml.safe_dump(data))
    assert runner.invoke(app, ["teachers", "-c", str(other), "--fold", "0", "-q"]).exit_code == 0
    # its own store slot: cache into a copy of the store so the module's store stays as cv left it
    shutil.copytree(cfg.store.path, tmp_path / "store.zarr")
    data["store"]["path"] = str(tmp_path / "store.zarr")
    other.write_text(yaml.safe_dump(data))
    assert runner.invoke(app, ["cache", "-c", str(other), "--fold", "0", "-q", "--overwrite"]).exit_code == 0
    result = runner.invoke(app, ["distil", "-c", str(other), "--fold", "0", "-q"])
    assert result.exit_code == 2, result.output
    assert "held out of their own training" in result.output and "training.holdout > 0" in result.output


def test_student_selection_on_held_out_training_cases(per_fold, tmp_path):
    import yaml

    _, path, _ = per_fold
    data = yaml.safe_load(Path(path).read_text())
    data["training"].update({"holdout": 0.3, "epochs": 2})
    data["output"]["runs_dir"] = str(tmp_path / "runs")
    other = tmp_path / "holdout.yaml"
    other.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["distil", "-c", str(other), "--fold", "0", "--kd", "none", "-q"])
    assert result.exit_code == 0, result.output
    assert "chosen on 1 held-out training case(s)" in result.output
    run = tmp_path / "runs" / "students" / "kd-none" / "fold_0"
    summary = json.loads((run / "summary.json").read_text())
    held, val = summary["holdout_cases"], summary["val_cases"]
    assert summary["headline"] == "holdout" and summary["checkpoint"] == str(run / "checkpoint_selected.pth")
    assert len(held) == 1 and set(held) <= set(summary["train_cases"])
    assert not set(held) & set(summary["fit_cases"]) and not set(held) & set(val)
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert all(r["holdout_mean_dice"] != "" for r in rows), (
        "the held-out Dice is measured at every validation"
    )
    best_epoch = max(range(len(rows)), key=lambda i: float(rows[i]["holdout_mean_dice"]))
    assert summary["headline_epoch"] == best_epoch, "the headline epoch is the best on the held-out cases"
    per_case = list(csv.DictReader((run / "validation_per_case.csv").read_text().splitlines()))
    assert [r["case"] for r in per_case] == val
    # the selected epoch's weights, scored in the original geometry
    assert summary["evaluated_in"] == "original geometry"
    assert summary["headline_mean_dice"] == pytest.approx(
        np.mean([float(r["mean_dice"]) for r in per_case]), abs=1e-5
    )
    assert summary["seconds_per_volume"] > 0 and summary["gflops_per_window"] > 0


def test_holdout_split_is_deterministic_and_leaves_cases_to_train_on():
    train = [f"c{i}" for i in range(10)]
    fit, held = holdout_split(train, 0.2, seed=3)
    assert (
        len(held) == 2 and sorted(fit + held) == sorted(train) and (fit, held) == holdout_split(train, 0.2, 3)
    )
    assert holdout_split(train, 0.0, 3) == (train, [])
    assert len(holdout_split(["a", "b"], 0.4, 0)[1]) == 1
    with pytest.raises(ConfigError, match="at least 2 training cases"):
        holdout_split(["a"], 0.2, 0)


def _fake_runs(root: Path, kinds: dict[str, float], folds: int = 5, seeds=(None, 1), evaluation=None) -> Path:
    """A config and finished student runs written by hand (a ``summary.json`` and per-case scores per (fold,
    seed)): per run kind, a Dice shift over ``kd-none``; each fold its own level, four cases a fold."""
    data = tiny_config_dict(root)
    if evaluation is not None:
        data["evaluation"] = evaluation
    path = write_config(root, data)
    rng = np.random.default_rng(0)
    for kind, shift in kinds.items():
        for fold in range(folds):
            for seed in seeds:
                folder = root / "runs" / "students" / f"kd-{kind}"
                folder = (folder / f"seed_{seed}" if seed is not None else folder) / f"fold_{fold}"
                folder.mkdir(parents=True)
                (folder / "summary.json").write_text(
                    json.dumps({"parameters": 10, "seconds_per_volume": 1.0})
                )
                scores = [0.6 + 0.03 * fold + shift + rng.normal(0, 0.005) for _ in range(4)]
                rows = [f"f{fold}c{i},{d:.5f},3.0" for i, d in enumerate(scores)]
                (folder / "validation_per_case.csv").write_text(
                    "\n".join(["case,mean_dice,mean_hd95_mm", *rows])
                )
    return path


def test_the_report_compares_over_folds_primary_endpoint_first(tmp_path):
    kinds = {
        "none": 0.0,
        "teachformer": 0.03,
        "teachformer-online-patch": 0.0,
        "teachformer-online-context": 0.029,
        "pwd": 0.0,
    }
    path = _fake_runs(tmp_path, kinds)
    result = runner.invoke(app, ["report", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "primary endpoint, over folds: student kd-teachformer − student kd-none: improves Dice by +3" in (
        " ".join(result.output.split())
    )
    report = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert list(report)[:3] == ["experiment", "provenance", "fold_level"]
    fold = report["fold_level"]
    primary = fold["primary"]
    assert (primary["run"], primary["against"], primary["n_folds"]) == (
        "student kd-teachformer",
        "student kd-none",
        5,
    )
    assert primary["t_interval"][0] > 0 and primary["verdict"].startswith("improves Dice by +3.")
    assert primary["verdict_interval"] == "t" and primary["wilcoxon_min_p"] == 0.0625
    assert fold["bootstrap"] == {"resamples": 10_000, "seed": 0, "levels": ["fold", "case"]}
    secondary = {(c["run"], c["against"]): c for c in fold["secondary"]}
    assert set(secondary) == {
        ("student kd-pwd", "student kd-none"),
        ("student kd-teachformer-online-patch", "student kd-none"),
        ("student kd-teachformer-online-context", "student kd-none"),
        ("student kd-teachformer", "student kd-teachformer-online-patch"),
        ("student kd-teachformer", "student kd-teachformer-online-context"),
    }
    from core.evaluation.statistics import holm

    pairs = list(secondary.values())
    assert [c["holm_p"] for c in pairs] == pytest.approx(holm([c["t_p"] for c in pairs]))
    assert secondary[("student kd-pwd", "student kd-none")]["verdict"].startswith("not shown")
    patch = secondary[("student kd-teachformer", "student kd-teachformer-online-patch")]
    assert patch["verdict"].startswith("improves Dice by +3"), "the cache beats per-patch targets"
    (tost,) = fold["equivalence"]  # only the context twin computes the cache's own targets
    assert (tost["run"], tost["against"], tost["margin"]) == (
        "student kd-teachformer",
        "student kd-teachformer-online-context",
        0.02,
    )
    assert tost["verdict"] == "equivalent", "0.1 points apart, ±0.5 point noise: inside ±2 points"
    md = (tmp_path / "runs" / "report.md").read_text()
    order = [md.index(s) for s in ("**Primary endpoint**", "Secondary comparisons", "Equivalence", "## Runs")]
    assert order == sorted(order)
    assert "## Per case: secondary (cases are not independent replicates)" in md
    assert md.index("## Runs") < md.index("Secondary, per case")


def test_the_primary_endpoint_is_the_one_the_config_declares(tmp_path):
    evaluation = {
        "primary_endpoint": {"arm": "pwd"},
        "equivalence_margin": 0.001,
        "bootstrap_resamples": 500,
        "bootstrap_seed": 4,
    }
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03, "pwd": -0.02}, evaluation=evaluation)
    assert runner.invoke(app, ["report", "-c", str(path)]).exit_code == 0
    fold = json.loads((tmp_path / "runs" / "report.json").read_text())["fold_level"]
    assert fold["primary"]["run"] == "student kd-pwd" and fold["primary"]["verdict"].startswith(
        "worsens Dice by 2"
    )
    assert fold["primary"]["bootstrap_seed"] == 4 and fold["primary"]["bootstrap_resamples"] == 500
    assert [c["run"] for c in fold["secondary"]] == ["student kd-teachformer"]


def test_a_primary_endpoint_naming_a_missing_run_kind_writes_no_report(tmp_path):
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03}, folds=2, seeds=(None,))
    runs = tmp_path / "runs"

    def refused() -> None:
        for key, endpoint in (("arm", {"arm": "teachformer-online"}), ("baseline", {"baseline": "pwd"})):
            bad = tmp_path / f"bad_{key}.yaml"
            bad.write_text(
                f"extends: {path.name}\nevaluation: {{primary_endpoint: {json.dumps(endpoint)}}}\n"
            )
            result = runner.invoke(app, ["report", "-c", str(bad)])
            assert result.exit_code == 2, result.output
            message = " ".join(result.output.split())
            assert f"evaluation.primary_endpoint.{key} names the run kind" in message
            assert "(run kinds there: none, teachformer)" in message

    refused()
    assert not [p.name for p in runs.iterdir() if p.is_file()], "nothing written, not even a part"
    assert runner.invoke(app, ["report", "-c", str(path)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()}
    assert set(before) == {"report.json", "report.md", "report_dice.png"}
    refused()
    assert {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()} == before, "the last report stands"


def test_one_fold_gives_no_interval_and_says_which_runs_ran_which_folds(tmp_path):
    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03}, folds=1)
    result = runner.invoke(app, ["report", "-c", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert report["fold_level"]["primary"]["unavailable"] == (
        "an interval over folds needs at least two folds run by both: student kd-teachformer ran fold(s) 0; "
        "student kd-none fold(s) 0"
    )
    assert (
        "no interval (an interval over folds needs at least two folds"
        in (tmp_path / "runs" / "report.md").read_text()
    )
    # the default primary arm (distillation.kind) not trained yet: said, not refused
    (tmp_path / "runs" / "students" / "kd-teachformer").rename(tmp_path / "runs" / "students" / "kd-pwd")
    assert runner.invoke(app, ["report", "-c", str(path)]).exit_code == 0
    primary = json.loads((tmp_path / "runs" / "report.json").read_text())["fold_level"]["primary"]
    assert primary["unavailable"].startswith("no finished run of student kd-teachformer (the default arm")


def test_the_evaluation_section_is_strict_and_changes_no_hash(tmp_path):
    data = tiny_config_dict(tmp_path)
    plain = load_config(write_config(tmp_path, data))
    data["evaluation"] = {"primary_endpoint": {"arm": "pwd"}, "equivalence_margin": 0.01}
    declared = load_config(write_config(tmp_path, data))
    assert declared.preprocessing_hash() == plain.preprocessing_hash()
    assert declared.model_dump(exclude={"evaluation"}) == plain.model_dump(exclude={"evaluation"})
    assert plain.evaluation.primary_endpoint.arm is None and plain.evaluation.equivalence_margin == 0.02
    for bad, where in (
        ({"equivalence_margin": 0}, "evaluation.equivalence_margin: Input should be greater than 0"),
        ({"equivalence_margin": -0.02}, "evaluation.equivalence_margin: Input should be greater than 0"),
        ({"primary_endpoint": {"arm": "none"}}, "arm and baseline are both 'none'"),
        ({"primary_ednpoint": {}}, "evaluation.primary_ednpoint: unknown key"),
    ):
        data["evaluation"] = bad
        with pytest.raises(ConfigError, match=where):
            load_config(write_config(tmp_path, data))


def test_a_twin_trained_with_fewer_seeds_is_paired_with_the_same_seeds(tmp_path):
    """The context twin runs seed 0 only: per case and over folds it is compared with the cached run's seed 0,
    not with the cached run averaged over its seeds."""
    import shutil

    path = _fake_runs(tmp_path, {"none": 0.0, "teachformer": 0.03, "teachformer-online-context": 0.03})
    shutil.rmtree(tmp_path / "runs" / "students" / "kd-teachformer-online-context" / "seed_1")
    cached_seed_1 = tmp_path / "runs" / "students" / "kd-teachformer" / "seed_1"
    for csv_path in cached_seed_1.rglob("validation_per_case.csv"):  # seed 1 of the cached run far better
        lines = csv_path.read_text().splitlines()
        rows = [",".join([c, f"{float(d) + 0.2:.5f}", h]) for c, d, h in (r.split(",") for r in lines[1:])]
        csv_path.write_text("\n".join([lines[0], *rows]))
    assert runner.invoke(app, ["report", "-c", str(path)]).exit_code == 0
    report = json.loads((tmp_path / "runs" / "report.json").read_text())
    (per_case,) = report["cached_vs_online"]
    assert per_case["n"] == 20 and abs(per_case["mean_difference"]) < 0.01
    (tost,) = report["fold_level"]["equivalence"]
    assert abs(tost["mean_difference"]) < 0.01 and tost["verdict"] == "equivalent"


def test_a_class_distillation_hurts_is_flagged_over_folds(tmp_path):
    """Per class over folds: a thin class whose Dice falls in every fold is flagged with its CI; a class that
    gains a little is not."""
    path = write_config(tmp_path, tiny_config_dict(tmp_path))
    rng = np.random.default_rng(1)
    for kind, shift in (("none", (0.0, 0.0)), ("teachformer", (0.01, -0.08))):
        for fold in range(5):
            folder = tmp_path / "runs" / "students" / f"kd-{kind}" / f"fold_{fold}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps({"parameters": 10}))
            rows = []
            for i in range(4):
                organ = 0.8 + shift[0] + rng.normal(0, 0.01)
                vessel = 0.5 + 0.02 * fold + shift[1] + rng.normal(0, 0.01)
                rows.append(f"f{fold}c{i},{organ:.4f},{vessel:.4f},{(organ + vessel) / 2:.4f},2.0,3.0,2.5")
            header = "case,dice_organ,dice_vessel,mean_dice,hd95_mm_organ,hd95_mm_vessel,mean_hd95_mm"
            (folder / "validation_per_case.csv").write_text("\n".join([header, *rows]))
    result = runner.invoke(app, ["report", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "harm flag, over folds: kd-teachformer hurts class vessel" in " ".join(result.output.split())
    fold = json.loads((tmp_path / "runs" / "report.json").read_text())["fold_level"]
    by_class = {c["class"]: c for c in fold["per_class"]}
    assert set(by_class) == {"organ", "vessel"}
    assert by_class["vessel"]["t_interval"][1] < 0 < by_class["organ"]["t_interval"][0]
    (flag,) = fold["harm_flags"]
    assert flag.startswith("kd-teachformer hurts class vessel: −8.") and "against kd-none, 95 % CI [−" in flag
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "**Harm flags**" in md and f"- {flag}" in md
    assert "| student kd-teachformer | student kd-none | vessel | 5 |" in md
