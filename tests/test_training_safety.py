"""A run never publishes a half-written or non-finite result: NaN losses stop it, folders are swapped whole."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import zarr
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.store.teacher_store import TeacherStore
from core.training.checkpoints import recover_run_dir
from teachcache.cli import app
from tests.conftest import derived_config

runner = CliRunner()


def _one_teacher_cache(trained, name: str):
    root, data = trained
    cfg, path = derived_config(
        root,
        data,
        name,
        **{"distillation.teachers": ["dynunet"], "training.epochs": 1, "training.iterations_per_epoch": 2},
    )
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    return cfg, path


def _fingerprint(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_non_finite_term_stops_training_naming_it_and_keeps_the_previous_run(trained):
    cfg, path = _one_teacher_cache(trained, "nan_term")
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "-q"])
    assert result.exit_code == 0, result.output
    out_dir = cfg.output.runs_dir / "students" / "kd-teachformer" / "fold_0"
    before = _fingerprint(out_dir)
    # a store written by a teacher that produced NaN in its coarse attention maps (no longer cached today): the
    # digests are recorded over the NaN chunks, as the writer would have, so the integrity check passes them
    store = TeacherStore.open(cfg.store.path, mode="a")
    root = zarr.open_group(cfg.store.path, mode="a")
    for case in root["teachers/dynunet/all_folds"].group_keys():
        entry = f"teachers/dynunet/all_folds/{case}"
        arr = root[f"{entry}/coarse"]
        arr[...] = np.full(arr.shape, np.nan, dtype=arr.dtype)
        group = root[entry]
        for key in ("chunk_digests", "attrs_digest"):
            del group.attrs[key]
        store.record_digests(group, entry)
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert (
        "non-finite" in result.output
        and "'afs_coarse'" in result.output
        and "teachcache verify" in result.output
    )
    assert _fingerprint(out_dir) == before, "the finished run is untouched by the failed re-run"
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["fold_0"], "no staging folder is left behind"


def test_a_rerun_replaces_the_run_folder_whole(trained):
    cfg, path = _one_teacher_cache(trained, "rerun")
    out_dir = cfg.output.runs_dir / "students" / "kd-none" / "fold_0"
    assert runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "--kd", "none", "-q"]).exit_code == 0
    (out_dir / "leftover.txt").write_text("from the first run")
    first = json.loads((out_dir / "summary.json").read_text())
    assert runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "--kd", "none", "-q"]).exit_code == 0
    assert not (out_dir / "leftover.txt").exists(), "nothing of the first run survives beside the second"
    second = json.loads((out_dir / "summary.json").read_text())
    assert second["checkpoint"] == first["checkpoint"] == str(out_dir / "checkpoint_final.pth"), (
        "the headline"
    )
    assert (out_dir / "checkpoint_best.pth").is_file() and (out_dir / "metrics.csv").is_file()


def test_recovery_after_a_kill_mid_run_or_mid_swap(tmp_path):
    run = tmp_path / "fold_0"
    run.mkdir()
    (run / "summary.json").write_text("old")
    # killed while training: a staging folder is left; the old run is whole and stays
    (tmp_path / ".fold_0.partial").mkdir()
    (tmp_path / ".fold_0.partial" / "metrics.csv").write_text("half")
    recover_run_dir(run)
    assert not (tmp_path / ".fold_0.partial").exists() and (run / "summary.json").read_text() == "old"
    # killed between the swap's two renames: the old run was set aside and is put back
    run.rename(tmp_path / ".fold_0.replaced")
    recover_run_dir(run)
    assert (run / "summary.json").read_text() == "old" and not (tmp_path / ".fold_0.replaced").exists()


def test_an_unwritable_runs_folder_is_one_message(trained, tmp_path):
    cfg, path = _one_teacher_cache(trained, "unwritable_runs")
    (tmp_path / "a_file").write_text("")
    text = path.read_text().replace(str(cfg.output.runs_dir), str(tmp_path / "a_file" / "runs"))
    path.write_text(text)
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "--kd", "none", "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "cannot write the run folder" in result.output


def test_a_one_cell_tap_grid_is_a_clear_warning(trained):
    # the tiny SwinUNETR's coarse tap has stride 32: on a 32³ patch its map is one cell, the afs term exactly 0
    root, data = trained
    cfg, path = derived_config(
        root,
        data,
        "one_cell",
        **{"training.epochs": 1, "training.iterations_per_epoch": 1, "distillation.teachers": ["swin"]},
    )
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["swin"], progress=False)
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "-q"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert (
        "warning: teacher 'swin/all_folds': its coarse map (stride 32) covers a training patch of (32, 32, 32) with 1×1×1"
        in text
    )
    assert "fine map" not in text, "the stride-2 fine map has 16 cells per axis: no warning"


def test_training_never_overwrites_a_teacher_checkpoint_it_did_not_make_for_this_fold(trained, tmp_path):
    import shutil

    root, data = trained
    own = tmp_path / "my_teacher.pth"
    shutil.copyfile(data["teachers"][2]["checkpoint"], own)  # made by `teachers` for fold 0
    before = own.read_bytes()
    cfg, path = derived_config(root, data, "foreign_ckpt", **{"teachers.2.checkpoint": str(own)})
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["teachers", "-c", str(path), "--fold", "1", "-t", "dynunet", "-q"])
    assert result.exit_code == 2, result.output
    assert "would overwrite" in result.output and "fold 0" in result.output
    assert own.read_bytes() == before


def test_an_empty_zarr_folder_with_user_files_is_never_removed(tmp_path):
    import zarr

    from core.store.teacher_store import TeacherStore

    folder = tmp_path / "store.zarr"
    zarr.open_group(str(folder), mode="w")
    (folder / "notes.txt").write_text("mine")
    with contextlib.suppress(Exception):  # refusing is fine; deleting is not
        TeacherStore.create(
            folder, dataset={"manifest_hash": "x"}, preprocessing={}, preprocessing_hash="h", splits=[]
        )
    assert (folder / "notes.txt").read_text() == "mine"
