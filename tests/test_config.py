from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from core.config import load_config
from core.errors import ConfigError
from teachcache.cli import app
from tests.conftest import tiny_config_dict, write_config

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_is_valid():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert [t.name for t in cfg.teachers] == ["unetr", "swin_unetr", "dynunet"]
    assert cfg.student.arch == "basic_unet"
    assert len(cfg.preprocessing_hash()) == 64


def test_mri_demo_config_is_valid():
    cfg = load_config(REPO / "configs" / "demo-mri.yaml")
    assert cfg.dataset.synthetic is not None and cfg.dataset.synthetic.kind == "mri"
    assert cfg.store.path != load_config(REPO / "configs" / "demo.yaml").store.path


def test_thin_demo_config_is_valid():
    cfg = load_config(REPO / "configs" / "demo-thin.yaml")
    assert cfg.dataset.synthetic is not None and cfg.dataset.synthetic.kind == "thin"
    assert all(t.per_fold for t in cfg.teachers)


def test_unknown_key_is_named(tmp_path):
    data = tiny_config_dict(tmp_path)
    data["training"]["epochz"] = 3
    with pytest.raises(ConfigError, match=r"training\.epochz: unknown key"):
        load_config(write_config(tmp_path, data))


def test_wrong_type_is_named_with_teacher_name(tmp_path):
    data = tiny_config_dict(tmp_path)
    data["teachers"][1]["training"] = {"epochs": "ten"}
    with pytest.raises(ConfigError, match=r"teachers\[swin\]\.training\.epochs"):
        load_config(write_config(tmp_path, data))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_duplicate_teacher_and_unknown_distilled_teacher(tmp_path):
    data = tiny_config_dict(tmp_path)
    data["teachers"][1]["name"] = "unetr"
    with pytest.raises(ConfigError, match="repeated: unetr"):
        load_config(write_config(tmp_path, data))
    data = tiny_config_dict(tmp_path)
    data["distillation"]["teachers"] = ["ghost"]
    with pytest.raises(ConfigError, match="'ghost'"):
        load_config(write_config(tmp_path, data))


def test_preprocessing_hash_tracks_preprocessing_only(tmp_path):
    a = load_config(write_config(tmp_path, tiny_config_dict(tmp_path)))
    data = tiny_config_dict(tmp_path)
    data["training"]["epochs"] = 9
    b = load_config(write_config(tmp_path, data))
    data["preprocessing"]["target_spacing"] = [1.0, 1.0, 1.0]
    c = load_config(write_config(tmp_path, data))
    assert a.preprocessing_hash() == b.preprocessing_hash() != c.preprocessing_hash()


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    data = tiny_config_dict(tmp_path)
    data["store"]["pathh"] = "x"
    path = write_config(tmp_path, data)
    result = CliRunner().invoke(app, ["preprocess", "--config", str(path)])
    assert result.exit_code == 2
    assert "store.pathh: unknown key" in result.output
    assert "Traceback" not in result.output
    assert yaml.safe_load(path.read_text())["store"]["pathh"] == "x"
    assert not (tmp_path / "store.zarr").exists()


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    base = tiny_config_dict(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text(
        "extends: ../base.yaml\n"
        "experiment: child\n"
        "training: {epochs: 7}\n"
        "distillation: {kind: pwd-only, terms: [{name: pwd, weight: 2.0}]}\n"
    )
    cfg = load_config(child)
    assert cfg.experiment == "child" and cfg.training.epochs == 7
    assert cfg.training.batch_size == base["training"]["batch_size"], "untouched keys come from the base"
    assert [t.name for t in cfg.distillation.terms] == ["pwd"], "lists are replaced, not merged"
    assert cfg.distillation.temperature == 2.0


def test_extends_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="'extends' forms a cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_ablation_recipe_loads_and_builds(path):
    from core.losses.distillation import build_objective

    cfg = load_config(path)
    assert cfg.distillation.kind == path.stem, "runs of a recipe go to kd-<file name>"
    widths = {"coarse": 8, "fine": 8}
    channels = {"student": widths, "teachers": {t.name: widths for t in cfg.distilled_teachers()}}
    objective = build_objective(
        cfg.distillation, teacher_dice={t.name: 0.5 for t in cfg.teachers}, channels=channels
    )
    assert objective.uses_teachers == (path.stem != "none")


def test_augmentation_keys_are_validated(tmp_path):
    data = tiny_config_dict(tmp_path)
    data["training"]["augmentation"] = {"gamma": [2.0, 0.5], "rotate_degrees": 15}
    with pytest.raises(ConfigError, match=r"training\.augmentation\.gamma: gamma must be \[low, high\]"):
        load_config(write_config(tmp_path, data))
    data["training"]["augmentation"] = {"gamma": [0.7, 1.5], "noise_std": 0.1}
    cfg = load_config(write_config(tmp_path, data))
    assert cfg.training.augmentation.gamma == (0.7, 1.5) and cfg.training.augmentation.flip


def test_the_two_stages_never_import_each_other():
    """README: cache_teachers and train_student share only core (a store travels to a machine without stage 1)."""
    import ast

    for stage, other in (("cache_teachers", "train_student"), ("train_student", "cache_teachers")):
        for path in (REPO / stage).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                assert not any(n.split(".")[0] == other for n in names), f"{path.name} imports {other}"


def test_every_ablation_states_its_whole_recipe_and_the_paper_recipe_is_frozen():
    """A recipe in configs/ablations/ inherits its dataset and training from the demo but never its distillation:
    changing the demo's default recipe must not change a reproduction (configs/ablations/none.yaml trains no term)."""
    from core.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "ablations"
    for path in sorted(root.glob("*.yaml")):
        if path.name == "none.yaml":
            continue
        own = yaml.safe_load(path.read_text())["distillation"]
        assert set(own) == {"kind", "source", "temperature", "attention", "teachers", "balance", "terms"}, (
            path.name
        )
        assert set(own["balance"]) == {"warmup_epochs", "grad_fraction", "every"}, path.name
        for term in own["terms"]:
            assert set(term) == {"name", "weight", "combine", "teacher_weights", "args"}, path.name
    paper = load_config(root / "teachformer-paper.yaml").distillation
    assert (paper.kind, paper.source, paper.temperature, paper.teachers) == (
        "teachformer-paper",
        "cache",
        2.0,
        None,
    )
    assert (paper.attention.p, paper.attention.norm) == (2.0, "l2")
    assert not paper.balance.changes_training
    assert [(t.name, t.weight, t.teacher_weights, t.combine, t.args) for t in paper.terms] == [
        ("pwd", 1.0, "uniform", None, {}),
        ("afs", 1.0, "uniform", None, {}),
    ]
    # `args: {}` takes the terms' defaults: pinned here, so a change of a default is a change of the paper's recipe
    from core.losses.distillation import build_objective
    from core.losses.weighting import VoxelWeighting

    objective = build_objective(paper)
    built = dict(zip(objective.names, objective.terms, strict=True))
    assert built["pwd"].spatial == VoxelWeighting(balance="voxel", regions="label", error_weight=None)
    assert built["pwd"].spatial.plain
