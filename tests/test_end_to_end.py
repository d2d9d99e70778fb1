"""Both stages end to end on a tiny experiment, through the same CLI entry points users call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from core.config import load_config
from core.models.checkpoint import load_checkpoint
from core.store.teacher_store import TeacherStore
from core.terms import ATTENTION_KINDS
from teachcache.cli import app

runner = CliRunner()


def run(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """synth → preprocess → teachers → cache on the tiny config; returns its path."""
    from tests.conftest import tiny_config_dict, write_config

    root = tmp_path_factory.mktemp("e2e")
    config = str(write_config(root, tiny_config_dict(root)))
    run("synth", "-c", config, "-q")
    run("distil", "-c", config, "-q", code=2)  # before anything: no store yet
    run("preprocess", "-c", config, "-q")
    out = run("distil", "-c", config, "-q", code=2)  # preprocessed, but no teacher cached
    assert "make cache" in out
    out = run("cache", "-c", config, "-q", code=2)  # checkpoints do not exist yet
    assert "checkpoint not found" in out and "make teachers" in out
    assert TeacherStore.open(root / "store.zarr").teacher_keys() == [], "nothing half-written"
    run("teachers", "-c", config, "--fold", "0", "-q")
    run("cache", "-c", config, "-q")
    return config


def test_cache_holds_every_teacher_case_and_array(cached):
    cfg = load_config(cached)
    store = TeacherStore.open(cfg.store.path)
    cases = store.case_ids()
    assert len(cases) == 6 and store.teacher_keys() == [
        "dynunet/all_folds",
        "swin/all_folds",
        "unetr/all_folds",
    ]
    strides = {"unetr": (16, 2), "swin": (32, 2), "dynunet": (16, 2)}
    for teacher in store.teacher_keys():
        prov = store.teacher_metadata(teacher)
        assert len(prov["checkpoint_sha256"]) == 64 and prov["fold"] == 0 and prov["train_cases"]
        for case in cases:
            shape = store.case_shape(case)
            probs = store.read_softmax(teacher, case)
            assert probs.shape == (2, *shape)
            assert np.allclose(probs.sum(0), 1.0, atol=1e-3)
            for kind, stride in zip(ATTENTION_KINDS, strides[teacher.split("/")[0]], strict=True):
                amap, recorded = store.read_attention(teacher, case, kind)
                assert amap.shape == tuple(s // stride for s in shape)
                assert recorded == (stride,) * 3 and np.isfinite(amap).all() and (amap >= 0).all()


def test_rerunning_cache_skips_complete_entries(cached):
    out = run("cache", "-c", cached, "-q")
    assert out.count("0 written, 6 already cached") == 3


def test_inspect_json_and_table(cached):
    cfg = load_config(cached)
    info = json.loads(run("inspect", str(cfg.store.path), "--json"))
    assert {t["name"] for t in info["teachers"]} == {"unetr/all_folds", "swin/all_folds", "dynunet/all_folds"}
    assert len(info["cases"]) == 6
    paths = {a["path"] for a in info["arrays"]}
    case = info["cases"][0]["case_id"]
    assert {f"teachers/unetr/all_folds/{case}/{k}" for k in ("softmax", "coarse", "fine")} <= paths
    assert all(a["stored_bytes"] > 0 and a["codecs"] for a in info["arrays"])
    table = run("inspect", str(cfg.store.path))
    assert "softmax" in table and "Blosc" in table


def test_distil_trains_from_the_store_without_any_teacher(cached, monkeypatch):
    from monai.networks import nets

    def refuse(*args, **kwargs):
        raise AssertionError("a teacher network was constructed during distillation")

    for cls in (nets.UNETR, nets.SwinUNETR, nets.DynUNet):
        monkeypatch.setattr(cls, "__init__", refuse)
    run("distil", "-c", cached, "--fold", "0", "-q")
    run("distil", "-c", cached, "--fold", "0", "--kd", "none", "-q")
    cfg = load_config(cached)
    for kind in ("teachformer", "none"):
        out_dir = cfg.output.runs_dir / "students" / f"kd-{kind}" / "fold_0"
        ckpt = load_checkpoint(out_dir / "checkpoint_best.pth")
        assert ckpt.arch == "basic_unet" and ckpt.meta["fold"] == 0
        header, *rows = (out_dir / "metrics.csv").read_text().splitlines()
        assert "val_dice_tumour" in header and len(rows) == 2
        dice = float(rows[-1].split(",")[header.split(",").index("val_mean_dice")])
        assert 0.0 <= dice <= 1.0
        assert (out_dir / "curves.png").stat().st_size > 0
    header = (
        (cfg.output.runs_dir / "students" / "kd-teachformer" / "fold_0" / "metrics.csv")
        .read_text()
        .splitlines()[0]
    )
    assert {"loss_seg", "loss_pwd", "loss_afs_coarse", "loss_afs_fine", "loss_total"} <= set(
        header.split(",")
    )
    report = run("report", "-c", cached, "--fold", "0")
    assert "student kd-none" in report and "student kd-teachformer" in report and "teacher unetr" in report


def test_report_lists_every_recipe_and_kd_cannot_rename_a_recipe(cached, tmp_path):
    # --kd with a new name would have trained the config's own terms into a folder named after another recipe
    out = run("distil", "-c", cached, "--fold", "0", "--kd", "pwd-only", "-q", code=2)
    assert "--kd only switches distillation off" in out and "configs/ablations/pwd-only.yaml" in out
    recipe = tmp_path / "pwd-only.yaml"
    recipe.write_text(
        f"extends: {cached}\n"
        "distillation: {kind: pwd-only, temperature: 4.0, terms: [{name: pwd, weight: 0.5}]}\n"
    )
    run("distil", "-c", str(recipe), "--fold", "0", "-q")
    report = run("report", "-c", cached, "--fold", "0")
    assert "student kd-pwd-only" in report, "a recipe the report was not told about still appears"
    rows = {
        r["model"]: r
        for r in json.loads((Path(cached).parent / "runs" / "report_fold_0.json").read_text())["models"]
    }
    assert rows["student kd-pwd-only"]["terms"] == "pwd×0.5 (T=4)"
    assert rows["student kd-none"]["terms"] == "—"


def test_stale_store_and_bad_checkpoint_are_refused(cached, tmp_path):
    import yaml

    data = yaml.safe_load(Path(cached).read_text())
    data["preprocessing"]["crop_margin"] = 7
    stale = tmp_path / "stale.yaml"
    stale.write_text(yaml.safe_dump(data))
    out = run("distil", "-c", str(stale), "-q", code=2)
    assert "preprocessed with other settings" in out

    data = yaml.safe_load(Path(cached).read_text())
    data["teachers"][0]["checkpoint"] = data["teachers"][2]["checkpoint"]  # unetr pointed at dynunet weights
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(data))
    out = run("cache", "-c", str(wrong), "--overwrite", "-q", code=2)
    assert "holds a 'dynunet' network but the config declares 'unetr'" in out
    store = zarr.open_group(data["store"]["path"], mode="r")
    assert store["teachers/unetr/all_folds"].attrs["teachcache"]["arch"] == "unetr", (
        "existing entries untouched"
    )


def test_help_lists_every_command():
    out = run("--help")
    for command in ("synth", "preprocess", "teachers", "cache", "distil", "inspect", "report", "ls", "show", "export",
                    "view", "stats", "diff"):  # fmt: skip
        assert command in out


def test_looking_at_a_real_cache_show_export_stats(cached, tmp_path):
    """The inspection commands on a store the teachers themselves wrote (tests/test_look.py pins their numbers)."""
    import nibabel as nib

    store = load_config(cached).store.path
    case = TeacherStore.open(store).case_ids()[0]
    assert "teachers" in run("show", store, case, "-o", str(tmp_path / "case.png"))
    assert (tmp_path / "case.png").stat().st_size > 20_000
    run("export", store, case, "-t", "swin", "-w", "probs", "--original", "-o", str(tmp_path / "p.nii.gz"))
    raw = TeacherStore.open(store).case_attrs(case)["source_files"][0]
    assert nib.load(tmp_path / "p.nii.gz").shape == nib.load(raw).shape[:3]  # on the raw image's grid
    stats = json.loads(run("stats", store, "--json", "-q", "-o", str(tmp_path / "stats")))
    assert {r["teacher"] for r in stats["teachers"]} == {"unetr", "swin", "dynunet"}
    assert all(0.0 <= r["dice"] <= 1.0 and r["cases"] == 6 for r in stats["teachers"])


def test_student_checkpoint_loads_into_a_fresh_model(cached):
    from core.models.checkpoint import build_from_checkpoint

    cfg = load_config(cached)
    path = cfg.output.runs_dir / "students" / "kd-teachformer" / "fold_0" / "checkpoint_best.pth"
    if not path.exists():
        run("distil", "-c", cached, "--fold", "0", "-q")
    model, _ = build_from_checkpoint(path, cfg.student.arch, 2, 2, cfg.student.args)
    with torch.no_grad():
        assert model(torch.zeros(1, 2, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_bench_store_measures_every_encoding(cached):
    report = json.loads(run("bench-store", "-c", cached, "--cases", "1", "--json"))
    names = {r["encoding"] for r in report["encodings"]}
    assert {"prob-uint8", "logprob-float16", "margin-asinh-int8-delta"} <= names
    for r in report["encodings"]:
        assert r["bytes_per_voxel"] > 0 and r["write_mb_s"] > 0 and set(r["kl"]) == {"T=1", "T=2", "T=4"}
    assert report["patch_read"]["mean_s"] > 0 and report["patch_read"]["teachers"] == 3
    assert report["store_bytes_per_voxel"]["teacher softmax"] > 0
    codecs = report["softmax_codecs"]["bytes_per_voxel"]
    from cache_teachers.bench_store import STORE_PIPELINE

    store_own = codecs[STORE_PIPELINE]
    # the store's own pipeline, rewritten, costs what the store's softmax costs (same chunks, shards and codecs)
    assert store_own == pytest.approx(report["store_bytes_per_voxel"]["teacher softmax"], rel=0.05)
    assert codecs["delta(z) + zstd 22"] > 0


def test_three_modality_mri_through_both_stages(tmp_path):
    """The MRI variant (T2W, ADC, HBV): three input channels from preprocessing to a distilled student."""
    from tests.conftest import tiny_config_dict, write_config

    data = tiny_config_dict(tmp_path)
    data["dataset"]["synthetic"] = {
        "kind": "mri",
        "num_cases": 6,
        "shape": [64, 64, 16],
        "spacing": [1.0, 1.0, 3.0],
    }
    data["preprocessing"]["foreground_threshold"] = 20.0
    data["teachers"] = [data["teachers"][2]]  # dynunet only, to keep the test short
    config = str(write_config(tmp_path, data))
    for command in (
        ["synth"],
        ["preprocess"],
        ["teachers", "--fold", "0"],
        ["cache"],
        ["distil", "--fold", "0"],
    ):
        run(*command, "-c", config, "-q")
    cfg = load_config(config)
    store = TeacherStore.open(cfg.store.path)
    case = store.case_ids()[0]
    assert store.metadata["dataset"]["channel_names"] == ["T2W", "ADC", "HBV"]
    assert store.read_image(case).shape[0] == 3
    assert store.read_softmax("dynunet/all_folds", case).shape[0] == 2
    ckpt = load_checkpoint(
        cfg.output.runs_dir / "students" / "kd-teachformer" / "fold_0" / "checkpoint_best.pth"
    )
    assert ckpt.in_channels == 3


def test_verify_tells_a_failed_check_from_a_bad_store(cached, monkeypatch):
    import core.store.verify

    store = str(load_config(cached).store.path)
    assert runner.invoke(app, ["verify", store]).exit_code == 0

    def crash(*args, **kwargs):
        raise RuntimeError("blosc: decompression failed")

    monkeypatch.setattr(core.store.verify, "verify_store", crash)
    result = runner.invoke(app, ["verify", store])
    assert result.exit_code == 3, result.output
    assert "verify could not finish" in result.output and "blosc" in result.output
    assert runner.invoke(app, ["verify", str(Path(store).parent / "absent.zarr")]).exit_code == 2
