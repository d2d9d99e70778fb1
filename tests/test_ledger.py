"""The study's ledger (``output.results_dir``): a cross-validation's finished runs kept as small records, so a study
resumes on a fresh clone — the runs folder, store and teacher checkpoints gone — without training again what the
ledger holds, and reports the same numbers."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from core.config import load_config
from core.evaluation.ledger import FoldData, Ledger
from teachcache.cli import app
from teachcache.cv import run_identity
from tests.conftest import TINY_TEACHER_TRAINING, tiny_config_dict, write_config

runner = CliRunner()


def cfg_val_cases(cfg):
    from core.experiment import fold_split, open_store_for

    return fold_split(cfg, open_store_for(cfg), 0)[1]


def _config(root):
    data = tiny_config_dict(root)
    teacher = next(t for t in data["teachers"] if t["name"] == "dynunet")
    teacher["checkpoint"] = str(root / "runs" / "teachers" / "dynunet" / "fold_{fold}" / "teacher.pth")
    teacher["training"] = TINY_TEACHER_TRAINING
    data["teachers"] = [teacher]
    data["training"]["epochs"] = 1
    data["output"]["results_dir"] = str(root / "results")
    return data


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """``teachcache cv --fold 0`` with a ledger: ``(config, path, report.json as written)``."""
    from cache_teachers import preprocess_dataset
    from core.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("ledger")
    path = write_config(root, _config(root))
    cfg = load_config(path)
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["cv", "-c", str(path), "--fold", "0", "-q"])
    assert result.exit_code == 0, result.output
    return cfg, path, json.loads((cfg.output.runs_dir / "report.json").read_text())


def test_the_ledger_keeps_each_finished_runs_records_and_no_weights(studied):
    cfg, _, _ = studied
    ledger = cfg.output.results_dir
    for kind in ("kd-none", "kd-teachformer"):
        kept = ledger / "students" / kind / "fold_0"
        assert {p.name for p in kept.iterdir()} == {
            "summary.json",
            "metrics.csv",
            "validation_per_case.csv",
            "ledger.json",
        }
        assert (kept / "validation_per_case.csv").read_bytes() == (
            cfg.output.runs_dir / "students" / kind / "fold_0" / "validation_per_case.csv"
        ).read_bytes()
    assert (ledger / "teachers" / "dynunet" / "fold_0" / "summary.json").is_file()
    assert json.loads((ledger / "teacher_ensemble" / "fold_0.json").read_text())["cases"] == "validation"
    assert not [p for p in ledger.rglob("*") if p.suffix in {".pth", ".pt"}], "the ledger keeps no weights"


def test_a_fresh_clone_with_the_ledger_reports_without_training_again(studied):
    from cache_teachers import preprocess_dataset

    cfg, path, before = studied
    shutil.rmtree(cfg.output.runs_dir)  # a fresh clone: no runs, no teacher checkpoints, no store
    shutil.rmtree(cfg.store.path)
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["cv", "-c", str(path), "--fold", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert "fold 0: its 2 run(s) are in the ledger" in result.output
    assert not (cfg.output.runs_dir / "teachers").exists(), "no teacher was trained again"
    assert not (cfg.output.runs_dir / "students").exists(), "no student was trained again"
    after = json.loads((cfg.output.runs_dir / "report.json").read_text())

    def same(key: str) -> bool:  # as JSON, so NaN equals NaN
        return json.dumps(after[key], sort_keys=True) == json.dumps(before[key], sort_keys=True)

    assert same("fold_level") and same("runs") and same("paired_vs_no_kd")
    assert same("against_teacher_ensemble") and after["against_teacher_ensemble"], (
        "the ensemble's scores come from the ledger when the store has no teacher"
    )


def test_a_runs_identity_follows_its_settings_not_where_its_runs_are_kept(tmp_path):
    data = _config(tmp_path)
    cfg = load_config(write_config(tmp_path, data))
    same = copy.deepcopy(data)
    same["output"] = {"runs_dir": str(tmp_path / "elsewhere"), "results_dir": str(tmp_path / "kept")}
    hotter = copy.deepcopy(data)
    hotter["distillation"]["temperature"] = 4.0
    sketched = copy.deepcopy(data)
    sketched["store"]["feature_sketch_channels"] = 4
    only_pwd = copy.deepcopy(data)
    only_pwd["distillation"]["terms"] = [{"name": "pwd", "weight": 1.0}]
    configs = []
    for name, d in (("b", same), ("c", hotter), ("d", sketched), ("e", only_pwd)):
        (tmp_path / name).mkdir()
        configs.append(load_config(write_config(tmp_path / name, d)))
    other, warmer, sketches, pwd = configs
    fold_data = FoldData("m", ("a", "b"), ("c",))

    def key(c, kd=None, seed=None, data=fold_data, fold=0):
        return run_identity(c, fold, seed, kd, None, data)

    assert key(cfg) == key(other), "moving the runs folder or the ledger changes no run"
    assert key(cfg) != key(warmer), "another temperature is another distilled run"
    assert key(cfg, "none") == key(warmer, "none"), "the no-KD run reads no recipe"
    assert key(cfg) != key(sketches), "the store's settings decide what the terms read"
    assert key(cfg) != key(cfg, seed=7) and key(cfg) != key(cfg, fold=1)
    assert key(cfg) != key(cfg, data=FoldData("n", ("a", "b"), ("c",))), "another dataset"
    assert key(cfg) != key(cfg, data=FoldData("m", ("a", "c"), ("b",))), "other splits"
    assert key(cfg, "none") != key(pwd, "none"), (
        "the no-KD run draws the patches of the config's own recipe, so that recipe's targets enter its identity"
    )
    # a pretrained teacher (a checkpoint make cv did not train) enters by its weights' digest
    checkpoint = cfg.teachers[0].for_fold(0).checkpoint
    checkpoint.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, checkpoint)
    first = key(cfg)
    assert key(cfg) == first
    torch.save({"w": torch.ones(3)}, checkpoint)  # another size: the hash cache keys on size and mtime
    assert key(cfg) != first, "other pretrained weights, another run"


def test_a_screening_keeps_its_runs_in_the_ledgers_screening_folder_and_resumes_from_it(tmp_path):
    from cache_teachers import preprocess_dataset
    from core.data.synthetic import write_synthetic_dataset

    data = _config(tmp_path)
    data["training"]["iterations_per_epoch"] = 2
    path = write_config(tmp_path, data)
    cfg = load_config(path)
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    preprocess_dataset(cfg, progress=False)
    args = ["cv", "-c", str(path), "--screen", "--fold", "0", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ledger = cfg.output.results_dir
    kept = ledger / "screening" / "students" / "kd-none" / "fold_0"
    assert (kept / "holdout_per_case.csv").is_file() and (kept / "ledger.json").is_file()
    assert (ledger / "teachers" / "dynunet" / "fold_0" / "summary.json").is_file(), (
        "the teacher's records go with the experiment's, as its run does"
    )
    assert not (ledger / "screening" / "teachers").exists()
    checked = json.loads((ledger / "teacher_ensemble" / "fold_0.json").read_text())
    assert checked["cases"] == "validation" and len(checked["scores"]) == len(cfg_val_cases(cfg)), (
        "the experiment's ledger keeps its teachers' ensemble on the validation cases: the dataset check"
    )
    before = json.loads((cfg.output.runs_dir / "screening" / "screening.json").read_text())
    shutil.rmtree(cfg.output.runs_dir)
    shutil.rmtree(cfg.store.path)
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fold 0: its 2 run(s) are in the ledger" in result.output
    assert not (cfg.output.runs_dir / "teachers").exists()
    after = json.loads((cfg.output.runs_dir / "screening" / "screening.json").read_text())
    assert json.dumps(after["runs"], sort_keys=True) == json.dumps(before["runs"], sort_keys=True)
    assert after["cases"] == "holdout"


def test_a_stale_run_in_the_runs_folder_is_not_taken_for_the_ledgers(tmp_path):
    runs, kept = tmp_path / "runs", tmp_path / "results"
    ledger = Ledger(kept, runs)
    folder = runs / "students" / "kd-none" / "fold_0"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"run_key": "a"}))
    assert ledger.record(folder, "identity")
    assert ledger.holds(folder, "identity") and not ledger.holds(folder, "other identity")
    (folder / "summary.json").write_text(
        json.dumps({"run_key": "b"})
    )  # e.g. `make distil` with other settings
    assert not ledger.holds(folder, "identity"), "the report would read the runs folder's other run first"
    shutil.rmtree(folder)
    assert ledger.holds(folder, "identity"), "a fresh clone: the ledger's run is the one"
    assert not ledger.record(folder, "identity"), "no finished run, nothing recorded"
