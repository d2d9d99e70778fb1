"""Teachers fed their own inputs: a registered network with its own preprocessing (another spacing) and a MONAI
bundle (network, preprocessing and inferer from its config). Their outputs land on the store's grid; each is checked
against the same teacher's output brought onto that grid by an independent route (scipy / MONAI ResampleToMatch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.config import load_config
from core.data.layouts import read_dataset
from core.data.preprocessing import build_preprocessing, preprocess_case
from core.errors import TeachCacheError
from core.inference import predict_volume
from core.models.checkpoint import build_from_checkpoint
from core.models.registry import get_spec
from core.store.teacher_store import TeacherStore
from core.teachers.base import list_teacher_kinds, register_teacher_kind, teacher_kind
from teachcache.cli import app
from tests.conftest import derived_config

runner = CliRunner()


def _onto_store(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape) -> np.ndarray:
    """(C, …) resampled with scipy's trilinear interpolation: the independent route."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0).reshape(3, -1)
    voxels = (np.linalg.inv(src_affine) @ dst_affine @ np.vstack([grid, np.ones(grid.shape[1])]))[:3]
    return np.stack([map_coordinates(c, voxels, order=1, mode="nearest").reshape(shape) for c in volume])


def _same_after_encoding(store: TeacherStore, key: str, case: str, logits: np.ndarray) -> None:
    """The cached probabilities equal the independently resampled logits passed through the store's encoding (the
    int8 margins' step, 0.22 nats near 0, would otherwise dominate for a barely trained teacher)."""
    encoding = store.entry_encoding(key, case)
    expected = encoding.decode(encoding.encode(logits.astype(np.float32)), 1.0)
    cached = store.read_softmax(key, case)
    diff = np.abs(cached - expected)
    assert diff.mean() < 1e-3, diff.mean()
    assert (
        diff > 1e-3
    ).mean() < 0.02  # voxels one quantisation step apart: interpolation rounding at a step edge


OWN = {
    "target_spacing": [1.5, 1.5, 1.5],
    "foreground_threshold": -500.0,
    "min_size": [32, 32, 32],
    "size_divisor": 32,
}


def test_teacher_with_its_own_spacing_lands_on_the_store_grid(trained):
    root, data = trained
    cfg, _ = derived_config(root, data, "own", **{"teachers.2.preprocessing": OWN})
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    store = TeacherStore.open(cfg.store.path)
    teacher = cfg.teacher("dynunet")
    case = store.case_ids()[0]

    # the independent route: the teacher's own preprocessing and inference, then scipy onto the store grid
    ds = read_dataset(cfg.dataset)
    pc = preprocess_case(
        build_preprocessing(teacher.preprocessing, ds.channel_names), ds.case(case), ds.num_classes
    )
    assert not np.allclose(
        np.abs(np.diag(pc.affine)[:3]), np.abs(np.diag(np.asarray(store.case_attrs(case)["affine"]))[:3])
    )
    model, _ = build_from_checkpoint(teacher.checkpoint, teacher.arch, 2, 2, teacher.args)
    spec = get_spec(teacher.arch)
    out = predict_volume(model, pc.image, cfg.inference_for(teacher), torch.device("cpu"), spec, amp=False)
    shape = store.case_shape(case)
    store_affine = np.asarray(store.case_attrs(case)["affine"])
    expected = _onto_store(out["logits"], pc.affine, store_affine, shape)
    _same_after_encoding(store, "dynunet/all_folds", case, expected)

    fine_full = torch.nn.functional.interpolate(
        torch.from_numpy(out["fine"])[None, None],
        size=pc.image.shape[1:],
        mode="trilinear",
        align_corners=False,
    )[0].numpy()
    fine = _onto_store(fine_full, pc.affine, store_affine, shape)[0]
    s = spec.taps["fine"].stride
    pooled = fine.reshape(shape[0] // s, s, shape[1] // s, s, shape[2] // s, s).mean((1, 3, 5))
    stored, _ = store.read_attention("dynunet/all_folds", case, "fine")
    assert stored.shape == pooled.shape
    assert np.corrcoef(stored.ravel(), pooled.ravel())[0, 1] > 0.99

    # the teacher's preprocessing is part of the entry's key and provenance: changing it makes the entry stale
    attrs = store.entry_attrs("dynunet/all_folds", case)
    assert attrs["entry_key"]["teacher_preprocessing"]["target_spacing"] == [1.5, 1.5, 1.5]
    assert store.teacher_metadata("dynunet/all_folds")["kind"] == "own_preprocessing"
    changed, _ = derived_config(
        root, data, "own", **{"teachers.2.preprocessing": {**OWN, "target_spacing": [1.8] * 3}}
    )
    summary = cache_teachers(changed, names=["dynunet"], progress=False)
    assert summary.written["dynunet/all_folds"] == len(store.case_ids())


def _bundle(folder: Path, channels: dict[str, str], network: dict | None = None) -> Path:
    from monai.bundle import ConfigParser

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    net = network or {"_target_": "DynUNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 2,
                      "kernel_size": [3] * 5, "strides": [1, 2, 2, 2, 2], "upsample_kernel_size": [2] * 4,
                      "filters": [8, 16, 24, 32, 48], "norm_name": "instance"}  # fmt: skip
    config = {
        "bundle_root": ".",
        "network_def": net,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.6, 1.6, 1.6], "mode": "bilinear"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True},
            {"_target_": "SpatialPadd", "keys": "image", "spatial_size": [32, 32, 32]},
            {"_target_": "DivisiblePadd", "keys": "image", "k": 16}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 1, "overlap": 0.5},
    }  # fmt: skip
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    meta = {"version": "0.1.0", "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": len(channels), "spatial_shape": [32, 32, 32],
                             "channel_def": channels}},
        "outputs": {"pred": {"type": "image", "num_channels": 2, "channel_def": {"0": "background", "1": "tumour"}}}}}  # fmt: skip
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    parser = ConfigParser(config)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "models" / "model.pt")
    return folder


def test_monai_bundle_teacher_is_cached_on_the_store_grid(trained, tmp_path):
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    root, data = trained
    bundle = _bundle(tmp_path / "petct_dynunet", {"0": "CT", "1": "PET"})
    cfg, config_path = derived_config(root, data, "bundle")
    raw = config_path.read_text().replace("teachers:\n", f"teachers:\n- name: zoo\n  bundle: {bundle}\n", 1)
    config_path.write_text(raw)
    cfg = load_config(config_path)
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["cache", "-c", str(config_path), "-t", "zoo", "-q"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(cfg.store.path)
    assert store.teacher_keys() == ["zoo/all_folds"]
    prov = store.teacher_metadata("zoo/all_folds")
    assert prov["kind"] == "bundle" and prov["taps"]["coarse"] == {"module": "bottleneck", "stride": 16}

    # the independent route: the bundle run by MONAI itself (its preprocessing, its inferer), ResampleToMatch
    case = store.case_ids()[1]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    files = [str(p) for p in read_dataset(cfg.dataset).case(case).images]
    image = parser.get_parsed_content("preprocessing")({"image": files})["image"]
    with torch.no_grad():
        logits = parser.get_parsed_content("inferer")(image[None], net)[0]
    dst = MetaTensor(
        torch.zeros(1, *store.case_shape(case)), affine=torch.as_tensor(store.case_attrs(case)["affine"])
    )
    moved = ResampleToMatch(mode="bilinear", padding_mode="border")(
        MetaTensor(logits, affine=image.affine), dst
    )
    _same_after_encoding(store, "zoo/all_folds", case, np.asarray(moved.numpy(), dtype=np.float32))


def test_bundle_teachers_refused_with_one_message_and_nothing_written(trained, tmp_path):
    root, data = trained

    def refused(bundle: Path, needle: str, name: str) -> None:
        cfg, path = derived_config(root, data, name)
        path.write_text(
            path.read_text().replace("teachers:\n", f"teachers:\n- name: zoo\n  bundle: {bundle}\n", 1)
        )
        preprocess_dataset(load_config(path), progress=False)
        result = runner.invoke(app, ["cache", "-c", str(path), "-t", "zoo", "-q"])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert needle in " ".join(result.output.split()), result.output
        assert TeacherStore.open(cfg.store.path).teacher_keys() == []

    refused(_bundle(tmp_path / "mri", {"0": "T2W", "1": "ADC"}), "reads channels ['T2W', 'ADC']", "b1")
    broken = _bundle(tmp_path / "broken", {"0": "CT", "1": "PET"})
    config = json.loads((broken / "configs" / "inference.json").read_text())
    config["network_def"].update(kernel_size=[3], strides=[1, 2], upsample_kernel_size=[2])  # not a network
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    refused(broken, "its network_def cannot be built", "b2")
    unet = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 2, "channels": [4, 8, 16],
            "strides": [2, 2]}  # fmt: skip
    refused(_bundle(tmp_path / "unet", {"0": "CT", "1": "PET"}, unet), "declare them: taps:", "b3")
    refused(tmp_path / "absent", "the bundle folder does not exist", "b4")


def test_teacher_reading_an_unknown_channel_is_refused(trained):
    root, data = trained
    cfg, _ = derived_config(root, data, "chan", **{"teachers.2.channels": ["PET", "MRI"]})
    preprocess_dataset(cfg, progress=False)
    with pytest.raises(TeachCacheError, match="reads channel\\(s\\) MRI, which the dataset does not have"):
        cache_teachers(cfg, names=["dynunet"], progress=False)
    assert TeacherStore.open(cfg.store.path).teacher_keys() == []


def test_every_teacher_kind_is_registered_once():
    # one table of kinds, filled by importing core.teachers; every kind TeacherConfig can name is in it
    assert list_teacher_kinds() == ["bundle", "nnunet", "own_preprocessing", "registry"]
    kind = teacher_kind("registry")
    with pytest.raises(ValueError, match="teacher kind 'registry' is already registered"):
        register_teacher_kind(
            "registry", load=kind.load, predict=kind.predict, check_windows=kind.check_windows
        )
    with pytest.raises(TeachCacheError, match="unknown teacher kind 'zoo'; registered: bundle, nnunet"):
        teacher_kind("zoo")
