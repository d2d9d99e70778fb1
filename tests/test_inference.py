"""Sliding-window inference returns logits and both tap maps stitched on the right grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.config import InferenceConfig
from core.errors import ConfigError
from core.inference import check_window, predict_volume
from core.models import get_spec
from core.models.registry import ModelSpec, TapSpec
from core.models.taps import attention_map


class _Pool(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool3d(x, self.k)


class _Equivariant(nn.Module):
    """Logits and taps are local functions of the input, so windows aligned to the strides stitch exactly."""

    def __init__(self):
        super().__init__()
        self.coarse, self.fine = _Pool(16), _Pool(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.coarse(x)
        self.fine(x)
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)


SPEC = ModelSpec("equivariant", lambda *a: _Equivariant(), TapSpec("coarse", 16), TapSpec("fine", 2), 16)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_stitched_outputs_equal_a_whole_volume_pass(mode):
    image = torch.rand(2, 64, 48, 32) + 0.5
    out = predict_volume(
        _Equivariant(),
        image.numpy(),
        InferenceConfig(roi_size=(32, 32, 32), overlap=0.5, mode=mode),
        torch.device("cpu"),
        spec=SPEC,
    )
    x = image[None]
    assert np.allclose(out["logits"], torch.cat([x[:, :1], -x[:, :1]], 1)[0].numpy(), atol=1e-5)
    assert out["coarse"].shape == (4, 3, 2) and out["fine"].shape == (32, 24, 16)
    assert np.allclose(out["coarse"], attention_map(nn.functional.avg_pool3d(x, 16))[0, 0].numpy(), rtol=1e-4)
    assert np.allclose(out["fine"], attention_map(nn.functional.avg_pool3d(x, 2))[0, 0].numpy(), rtol=1e-4)


def test_a_step_rounded_down_to_the_tap_stride_stitches_exactly():
    # a 48³ window at overlap 0.5 would step by 24, off the stride-16 coarse grid; it steps by 16 instead
    image = torch.rand(2, 80, 64, 48) + 0.5
    cfg = InferenceConfig(roi_size=(48, 48, 48), overlap=0.5)
    check_window(SPEC, cfg, tuple(image.shape[1:]), {})
    out = predict_volume(_Equivariant(), image.numpy(), cfg, torch.device("cpu"), spec=SPEC)
    x = image[None]
    assert out["coarse"].shape == (5, 4, 3) and out["fine"].shape == (40, 32, 24)
    assert np.allclose(out["coarse"], attention_map(nn.functional.avg_pool3d(x, 16))[0, 0].numpy(), rtol=1e-4)
    assert np.allclose(out["fine"], attention_map(nn.functional.avg_pool3d(x, 2))[0, 0].numpy(), rtol=1e-4)


def test_window_checks_name_the_fix():
    swin = get_spec("swin_unetr")
    with pytest.raises(ConfigError, match=r"less than its tap stride 32 .*use roi_size 64"):
        check_window(swin, InferenceConfig(roi_size=(32, 32, 32), overlap=0.5), (64, 64, 64), {})
    check_window(swin, InferenceConfig(roi_size=(64, 64, 64), overlap=0.5), (64, 64, 64), {})
    with pytest.raises(ConfigError, match="only accepts windows of its img_size"):
        check_window(
            get_spec("unetr"), InferenceConfig(roi_size=(32, 32, 32)), (64, 64, 64), {"img_size": 48}
        )
    with pytest.raises(ConfigError, match=r"smaller than inference\.roi_size"):
        check_window(get_spec("dynunet"), InferenceConfig(roi_size=(64, 64, 64)), (32, 64, 64), {})


def test_a_grid_that_would_cut_a_tap_map_short_is_refused():
    # size_divisor 16 with SwinUNETR's stride-32 coarse tap: an 80-voxel axis holds 2.5 cells; its map would keep 2
    swin = get_spec("swin_unetr")
    with pytest.raises(ConfigError, match=r"coarse tap has stride 32.*preprocessing\.size_divisor"):
        check_window(swin, InferenceConfig(roi_size=(64, 64, 64), overlap=0.5), (80, 64, 64), {})
    # the student's validation stitches no taps: the same grid is fine for it
    check_window(swin, InferenceConfig(roi_size=(64, 64, 64), overlap=0.5), (80, 64, 64), {}, taps=False)


def test_swin_unetr_published_96_window_stitches_exact_tap_grids():
    from core.inference import aligned_overlap
    from core.models import create_model

    swin = get_spec("swin_unetr")
    cfg = InferenceConfig(roi_size=(96, 96, 96), overlap=0.5, sw_batch_size=1)
    check_window(swin, cfg, (96, 128, 160), {})
    overlap = aligned_overlap(swin, cfg)
    assert [int(96 * (1 - o)) for o in overlap] == [32, 32, 32], "steps of 48 rounded down to the stride"
    assert all(o >= 0.5 for o in overlap), "never less overlap than asked"
    torch.manual_seed(0)
    model = create_model(
        "swin_unetr", 1, 3, {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24]}
    )
    out = predict_volume(
        model, np.random.rand(1, 96, 128, 160).astype(np.float32), cfg, torch.device("cpu"), spec=swin
    )
    assert out["logits"].shape == (3, 96, 128, 160)
    assert out["coarse"].shape == (3, 4, 5) and out["fine"].shape == (48, 64, 80)
    assert np.isfinite(out["coarse"]).all() and (out["coarse"] > 0).all(), "every coarse cell is covered"


def test_windows_that_already_start_on_the_grid_keep_their_overlap():
    from core.inference import aligned_overlap

    assert (
        aligned_overlap(get_spec("swin_unetr"), InferenceConfig(roi_size=(64, 64, 64), overlap=0.5))
        == (0.5,) * 3
    )
    assert (
        aligned_overlap(get_spec("swin_unetr"), InferenceConfig(roi_size=(32, 32, 32), overlap=0.0))
        == (0.0,) * 3
    )


def test_a_refusal_names_the_teacher_and_the_case():
    swin = get_spec("swin_unetr")
    cfg = InferenceConfig(roi_size=(64, 64, 64), overlap=0.5)
    with pytest.raises(
        ConfigError, match=r"^'big_swin' \(swin_unetr\), case 'HN_007': its coarse tap has stride 32"
    ):
        check_window(swin, cfg, (80, 64, 64), {}, name="big_swin", case_id="HN_007")
    # a network that accepts 48-voxel windows (size divisor 16) but taps at stride 32
    deep = ModelSpec("deep", lambda *a: _Equivariant(), TapSpec("coarse", 32), TapSpec("fine", 2), 16)
    with pytest.raises(ConfigError, match=r"^'deep': its coarse tap has stride 32, but the window \(48, 64"):
        check_window(deep, InferenceConfig(roi_size=(48, 64, 64)), (96, 64, 64), {})


def test_caching_refuses_a_grid_that_would_cut_a_tap_map_short_before_writing_anything(tmp_path):
    """size_divisor 16 leaves 48-voxel axes: fine for DynUNet (stride 16), 1.5 cells of SwinUNETR's coarse tap."""
    from cache_teachers import cache_teachers, preprocess_dataset
    from core.config import load_config
    from core.data.synthetic import write_synthetic_dataset
    from core.models import create_model
    from core.store.teacher_store import TeacherStore
    from tests.conftest import tiny_config_dict, write_config

    data = tiny_config_dict(tmp_path)
    data["dataset"]["synthetic"]["num_cases"] = 3
    data["preprocessing"].update(size_divisor=16, min_size=[48, 32, 32])
    data["teachers"] = [t for t in data["teachers"] if t["name"] in ("dynunet", "swin")]
    cfg = load_config(write_config(tmp_path, data))
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    preprocess_dataset(cfg, progress=False)
    store = TeacherStore.open(cfg.store.path)
    assert store.case_shape(store.case_ids()[0])[0] == 48
    meta = store.metadata["dataset"]
    for teacher in cfg.teachers:  # untrained weights of the right architecture: the window check comes first
        teacher.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        model = create_model(teacher.arch, len(meta["channel_names"]), len(meta["class_names"]), teacher.args)
        torch.save(model.state_dict(), teacher.checkpoint)
    with pytest.raises(
        ConfigError, match=r"coarse tap has stride 32.*preprocessing\.size_divisor to a multiple of 32"
    ):
        cache_teachers(cfg, progress=False)
    store = TeacherStore.open(cfg.store.path)
    assert not any(store.has_entry(t.name, c) for t in cfg.teachers for c in store.case_ids())
