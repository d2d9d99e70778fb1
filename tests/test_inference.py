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


def test_window_checks_name_the_fix():
    swin = get_spec("swin_unetr")
    with pytest.raises(ConfigError, match="not a multiple of its coarse tap stride 32; use roi_size 64"):
        check_window(swin, InferenceConfig(roi_size=(32, 32, 32), overlap=0.5), (64, 64, 64), {})
    check_window(swin, InferenceConfig(roi_size=(64, 64, 64), overlap=0.5), (64, 64, 64), {})
    with pytest.raises(ConfigError, match="only accepts windows of its img_size"):
        check_window(
            get_spec("unetr"), InferenceConfig(roi_size=(32, 32, 32)), (64, 64, 64), {"img_size": 48}
        )
    with pytest.raises(ConfigError, match=r"smaller than inference\.roi_size"):
        check_window(get_spec("dynunet"), InferenceConfig(roi_size=(64, 64, 64)), (32, 64, 64), {})
