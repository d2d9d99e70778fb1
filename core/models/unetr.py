"""MONAI UNETR (Hatamizadeh et al., WACV 2022) as a teacher.

Taps: coarse = the ViT's last hidden state reshaped to a grid (``proj_feat``), captured as the input of
``decoder5`` (stride 16, ``hidden_size`` channels); fine = ``decoder3`` output (stride 2).
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets import UNETR
from torch import nn

from core.models.registry import ModelSpec, TapSpec, register_model

__all__ = ["build_unetr"]


def build_unetr(in_channels: int, out_channels: int, img_size: Any = 96, **args: Any) -> nn.Module:
    """UNETR with MONAI's published defaults (feature_size 16, hidden 768, mlp 3072, 12 heads).

    ``img_size`` is fixed at construction: inference windows must have exactly this size.
    """
    return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=img_size, **args)


register_model(
    ModelSpec(
        name="unetr",
        build=build_unetr,
        coarse=TapSpec("decoder5", stride=16, capture="input", index=0),
        fine=TapSpec("decoder3", stride=2),
        size_divisor=16,
        fixed_input=True,
        description="MONAI UNETR: ViT encoder (16³ patches) with a convolutional decoder",
    )
)
