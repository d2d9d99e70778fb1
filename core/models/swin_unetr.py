"""MONAI SwinUNETR (Hatamizadeh et al., 2022), MONAI ≥ 1.5 API (no ``img_size``; sizes divisible by 32).

Taps: coarse = ``encoder10`` output (stride 32, 16·feature_size channels); fine = ``decoder2`` output (stride 2).
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets import SwinUNETR
from torch import nn

from core.models.registry import ModelSpec, TapSpec, register_model

__all__ = ["build_swin_unetr"]


def build_swin_unetr(in_channels: int, out_channels: int, feature_size: int = 48, **args: Any) -> nn.Module:
    """SwinUNETR as published (feature_size 48, depths 2/2/2/2, heads 3/6/12/24: 62.2M parameters for 1 → 14)."""
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, **args)


register_model(
    ModelSpec(
        name="swin_unetr",
        build=build_swin_unetr,
        coarse=TapSpec("encoder10", stride=32),
        fine=TapSpec("decoder2", stride=2),
        size_divisor=32,
        description="MONAI SwinUNETR: shifted-window transformer encoder with a convolutional decoder",
    )
)
