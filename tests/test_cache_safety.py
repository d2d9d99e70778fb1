"""Stage 1 refuses what would make the store lie: non-finite teacher outputs, a store that is not there yet."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.models.checkpoint import load_checkpoint, save_checkpoint
from core.store.teacher_store import TeacherStore
from teachcache.cli import app
from tests.conftest import derived_config, tiny_config_dict, write_config

runner = CliRunner()


def test_a_teacher_producing_nan_is_refused_naming_teacher_and_case(trained, tmp_path):
    root, data = trained
    ckpt = load_checkpoint(data["teachers"][2]["checkpoint"])  # dynunet
    state = {k: v.clone() for k, v in ckpt.state_dict.items()}
    for value in state.values():  # a diverged training's weights
        if value.is_floating_point():
            value.fill_(float("nan"))
    model_path = tmp_path / "diverged.pth"
    from core.models import create_model

    model = create_model(ckpt.arch, ckpt.in_channels, ckpt.out_channels, ckpt.args)
    model.load_state_dict(state)
    save_checkpoint(model_path, model, ckpt.arch, ckpt.in_channels, ckpt.out_channels, ckpt.args, ckpt.meta)
    cfg, path = derived_config(root, data, "nan_teacher", **{"teachers.2.checkpoint": str(model_path)})
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["cache", "-c", str(path), "-t", "dynunet", "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "teacher 'dynunet' produced NaN or Inf on case 'SYNPETCT_000'" in result.output
    store = TeacherStore.open(cfg.store.path)
    assert not any(store.has_entry("dynunet/all_folds", c) for c in store.case_ids()), (
        "nothing non-finite is cached"
    )


def test_a_no_op_rerun_keeps_the_recorded_cache_time(trained):
    root, data = trained
    cfg, _ = derived_config(root, data, "noop_rerun")
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    seconds = TeacherStore.open(cfg.store.path).teacher_metadata("dynunet/all_folds")["cache_seconds"]
    assert seconds > 0
    summary = cache_teachers(cfg, names=["dynunet"], progress=False)
    assert summary.written["dynunet/all_folds"] == 0
    assert TeacherStore.open(cfg.store.path).teacher_metadata("dynunet/all_folds")["cache_seconds"] == seconds


def test_cache_before_preprocess_says_so_and_writes_nothing(tmp_path):
    config = str(write_config(tmp_path, tiny_config_dict(tmp_path)))
    assert runner.invoke(app, ["synth", "-c", config, "-q"]).exit_code == 0
    result = runner.invoke(app, ["cache", "-c", config, "-q"])
    assert result.exit_code == 2, result.output
    assert "no store at" in result.output and "preprocess" in result.output
    assert not (tmp_path / "store.zarr").exists(), "no empty group left behind"
    assert runner.invoke(app, ["preprocess", "-c", config, "-q"]).exit_code == 0


def test_an_empty_group_left_by_an_older_version_does_not_block_preprocess(tmp_path):
    import zarr

    config = str(write_config(tmp_path, tiny_config_dict(tmp_path)))
    assert runner.invoke(app, ["synth", "-c", config, "-q"]).exit_code == 0
    zarr.open_group(str(tmp_path / "store.zarr"), mode="a")  # what `cache` before `preprocess` used to leave
    result = runner.invoke(app, ["preprocess", "-c", config, "-q"])
    assert result.exit_code == 0, result.output
    assert torch.tensor(len(TeacherStore.open(tmp_path / "store.zarr").case_ids())).item() == 6
