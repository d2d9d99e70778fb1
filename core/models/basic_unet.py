"""MONAI BasicUNet as the light student.

Taps: coarse = ``down_4`` output (stride 16, deepest encoder); fine = ``upcat_2`` output (stride 2), the
second-to-last of the four decoder blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import BasicUNet
from torch import nn

from core.models.registry import ModelSpec, TapSpec, register_model

__all__ = ["build_basic_unet"]


def build_basic_unet(
    in_channels: int,
    out_channels: int,
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    norm: str = "instance",
    dropout: float = 0.0,
) -> nn.Module:
    """BasicUNet; ``features`` are the six widths (conv_0, down_1..down_4, final upsampling)."""
    return BasicUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(features),
        norm=norm,
        dropout=dropout,
    )


register_model(
    ModelSpec(
        name="basic_unet",
        build=build_basic_unet,
        coarse=TapSpec("down_4", stride=16),
        fine=TapSpec("upcat_2", stride=2),
        size_divisor=16,
        description="MONAI BasicUNet, a small U-Net for students",
    )
)
