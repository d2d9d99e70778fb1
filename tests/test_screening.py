"""Recipe files and the screening that chooses among them without the validation cases (`make screen`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from core.config import apply_recipe, load_config
from core.errors import ConfigError
from teachcache.cli import app
from tests.conftest import cache_random_teachers, tiny_config_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
runner = CliRunner()


def test_every_recipe_applies_to_every_demo_dataset_and_keeps_the_rest_of_the_config():
    from core.losses.distillation import build_objective

    assert len(RECIPES) >= 5
    for dataset in ("demo", "demo-thin", "demo-mri", "demo-organ"):
        cfg = load_config(ROOT / "configs" / f"{dataset}.yaml")
        kinds = []
        for path in RECIPES:
            recipe = apply_recipe(cfg, path)
            kinds.append(recipe.distillation.kind)
            assert recipe.model_dump(exclude={"distillation"}) == cfg.model_dump(exclude={"distillation"})
            assert set(yaml.safe_load(path.read_text())["distillation"]) == {
                "kind",
                "source",
                "temperature",
                "attention",
                "teachers",
                "balance",
                "terms",
            }, f"{path.name} states its whole recipe"
            build_objective(recipe.distillation, teacher_dice={t.store_key(0): 0.8 for t in cfg.teachers})
        assert len(set(kinds)) == len(kinds), "each recipe its own run folder"


def test_the_papers_recipe_file_is_the_frozen_ablation():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    recipe = apply_recipe(cfg, ROOT / "configs" / "recipes" / "teachformer-paper.yaml").distillation
    ablation = load_config(ROOT / "configs" / "ablations" / "teachformer-paper.yaml").distillation
    assert recipe == ablation


def test_a_recipe_file_holds_a_distillation_section_and_nothing_else(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    other = tmp_path / "bad.yaml"
    other.write_text(yaml.safe_dump({"distillation": {"kind": "x"}, "training": {"epochs": 1}}))
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: a recipe file holds one key, 'distillation'.*training"
    ):
        apply_recipe(cfg, other)
    other.write_text(yaml.safe_dump({"distillation": {"temperature": 3.0}}))
    with pytest.raises(ConfigError, match=r"needs a distillation\.kind"):
        apply_recipe(cfg, other)
    other.write_text(yaml.safe_dump({"distillation": {"kind": "x", "terms": [{"name": "nope"}]}}))
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml applied to demo.*unknown distillation term 'nope'"):
        apply_recipe(cfg, other)


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    """A tiny experiment (random seeded teachers, cached) screened on folds 0 and 1 with one extra recipe."""
    root = tmp_path_factory.mktemp("screen")
    data = tiny_config_dict(root)
    data["teachers"] = [t for t in data["teachers"] if t["name"] == "dynunet"]
    data["training"].update({"epochs": 1, "iterations_per_epoch": 2})
    path = cache_random_teachers(root, data, seed=3)
    recipe = ROOT / "configs" / "recipes" / "cb-pwd.yaml"
    paper = ROOT / "configs" / "recipes" / "teachformer-paper.yaml"
    args = ["cv", "-c", str(path), "--screen", "--fold", "0", "--fold", "1", "-q"]
    result = runner.invoke(app, [*args, "--recipe", str(recipe), "--recipe", str(paper)])
    assert result.exit_code == 0, result.output
    return load_config(path), path, result.output


def test_the_screening_compares_recipes_on_held_out_cases_in_its_own_folder(screened):
    cfg, _, output = screened
    screening = cfg.output.runs_dir / "screening"
    report = json.loads((screening / "screening.json").read_text())
    assert report["cases"] == "holdout"
    rows = {r["run"] for r in report["runs"]}
    assert rows == {"student kd-none", "student kd-teachformer", "student kd-cb-pwd"}, (
        "the paper's recipe file is the config's own recipe: trained once, under the config's kind; no ensemble "
        "row: these teachers held out none of the students' held-out cases (scored there they would be flattered)"
    )
    per_fold: dict[int, list[str]] = {}
    for kind in ("none", "teachformer", "cb-pwd"):
        for fold in (0, 1):
            run = screening / "students" / f"kd-{kind}" / f"fold_{fold}"
            summary = json.loads((run / "summary.json").read_text())
            held = summary["holdout_cases"]
            assert held and summary["run_fields"]["training"]["holdout"] == cfg.evaluation.screening_holdout
            cases = [
                line.split(",")[0] for line in (run / "holdout_per_case.csv").read_text().splitlines()[1:]
            ]
            assert cases == held and not set(held) & set(summary["val_cases"])
            assert per_fold.setdefault(fold, held) == held, "every arm of a fold holds out the same cases"
            assert summary["final_holdout_mean_dice"] is not None
    text = (screening / "screening.md").read_text()
    assert "screening on the held-out training cases" in text and "kd-cb-pwd" in text
    assert not (screening / "report.md").exists(), (
        "no report on the validation cases is written by a screening"
    )
    assert not (cfg.output.runs_dir / "students").exists(), "the experiment's own runs folder is untouched"
    assert "held-out Dice" in output


def test_report_screen_rewrites_the_screening_from_its_runs(screened):
    cfg, path, _ = screened
    screening = cfg.output.runs_dir / "screening" / "screening.md"
    screening.unlink()
    result = runner.invoke(app, ["report", "-c", str(path), "--screen"])
    assert result.exit_code == 0, result.output
    assert screening.is_file() and "screening.md" in result.output


def test_two_recipe_files_of_one_kind_are_refused(screened, tmp_path):
    _, path, _ = screened
    twin = tmp_path / "twin.yaml"
    twin.write_text((ROOT / "configs" / "recipes" / "cb-pwd.yaml").read_text())
    result = runner.invoke(
        app,
        ["cv", "-c", str(path), "--recipe", str(ROOT / "configs/recipes/cb-pwd.yaml"), "--recipe", str(twin)],
    )
    assert result.exit_code == 2 and "distillation.kind cb-pwd" in result.output, result.output


def test_a_bad_recipe_is_refused_before_anything_trains(screened, tmp_path):
    cfg, path, _ = screened
    bad = tmp_path / "bad-recipe.yaml"
    recipe = yaml.safe_load((ROOT / "configs" / "recipes" / "cb-pwd.yaml").read_text())
    recipe["distillation"]["kind"] = "bad"
    recipe["distillation"]["terms"][0]["args"] = {"balance": "klass"}
    bad.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["cv", "-c", str(path), "--screen", "--recipe", str(bad), "-q"])
    assert result.exit_code == 2 and "bad-recipe.yaml" in result.output and "balance" in result.output
    assert not (cfg.output.runs_dir / "screening" / "students" / "kd-bad").exists()


def test_a_screening_trains_missing_teachers_in_the_experiments_own_runs_folder(tmp_path):
    from cache_teachers import preprocess_dataset
    from core.data.synthetic import write_synthetic_dataset
    from tests.conftest import write_config

    data = tiny_config_dict(tmp_path)
    teacher = next(t for t in data["teachers"] if t["name"] == "dynunet")
    teacher["checkpoint"] = str(tmp_path / "runs" / "teachers" / "dynunet" / "fold_{fold}" / "teacher.pth")
    teacher["training"] = {**teacher["training"], "epochs": 1, "iterations_per_epoch": 2}
    data["teachers"] = [teacher]
    data["training"].update({"epochs": 1, "iterations_per_epoch": 2})
    path = write_config(tmp_path, data)
    cfg = load_config(path)
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["cv", "-c", str(path), "--screen", "--fold", "0", "-q"])
    assert result.exit_code == 0, result.output
    runs = cfg.output.runs_dir
    assert (runs / "teachers" / "dynunet" / "fold_0" / "summary.json").is_file(), (
        "the experiment's teacher run"
    )
    assert not (runs / "screening" / "teachers").exists(), "a screening leaves teacher runs to the experiment"
    assert (runs / "screening" / "students" / "kd-none" / "fold_0" / "holdout_per_case.csv").is_file()


def test_a_recipe_file_of_the_experiments_own_kind_with_other_terms_is_refused(screened, tmp_path):
    cfg, path, _ = screened
    impostor = tmp_path / "impostor.yaml"
    recipe = yaml.safe_load((ROOT / "configs" / "recipes" / "cb-pwd.yaml").read_text())
    recipe["distillation"]["kind"] = cfg.distillation.kind  # cb-pwd's terms under the experiment's own kind
    impostor.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(
        app, ["cv", "-c", str(path), "--screen", "--fold", "0", "--recipe", str(impostor), "-q"]
    )
    assert result.exit_code == 2, result.output
    assert "impostor.yaml" in result.output and f"'{cfg.distillation.kind}'" in result.output


def test_a_screening_report_ignores_an_endpoint_only_the_cross_validation_trains(screened, tmp_path):
    """The experiment may declare its primary endpoint on the online-context twin (`make cv ONLINE=1`); the screening
    has no such run and compares its recipes with no-KD on held-out cases all the same."""
    cfg, path, _ = screened
    data = yaml.safe_load(Path(path).read_text())
    data.setdefault("evaluation", {})["primary_endpoint"] = {"arm": "teachformer-online-context"}
    declared = tmp_path / "declared.yaml"
    declared.write_text(yaml.safe_dump(data))
    screening = cfg.output.runs_dir / "screening" / "screening.json"
    screening.unlink()
    result = runner.invoke(app, ["report", "-c", str(declared), "--screen"])
    assert result.exit_code == 0, result.output
    report = json.loads(screening.read_text())
    primary = report["fold_level"]["primary"]
    assert (primary["run"], primary["against"]) == ("student kd-teachformer", "student kd-none")
