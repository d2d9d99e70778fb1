"""MONAI DynUNet in nnU-Net's 3D full-resolution shape: five levels, 3×3×3 kernels, strides 1/2/2/2/2.

Taps: coarse = ``bottleneck`` output (stride 16); fine = ``upsamples.2`` output, the second-to-last of the
four decoder blocks (stride 2).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet
from torch import nn

from core.models.registry import ModelSpec, TapSpec, register_model

__all__ = ["build_dynunet"]


def build_dynunet(
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] = (32, 64, 128, 256, 320),
    norm_name: str = "instance",
    res_block: bool = False,
) -> nn.Module:
    """nnU-Net-style DynUNet; ``filters`` gives the five level widths (nnU-Net's default 32…320)."""
    if len(filters) != 5:
        raise ValueError(f"filters must have 5 entries (one per level), got {len(filters)}")
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * 5,
        strides=[1, 2, 2, 2, 2],
        upsample_kernel_size=[2] * 4,
        filters=list(filters),
        norm_name=norm_name,
        res_block=res_block,
    )


register_model(
    ModelSpec(
        name="dynunet",
        build=build_dynunet,
        coarse=TapSpec("bottleneck", stride=16),
        fine=TapSpec("upsamples.2", stride=2),
        size_divisor=16,
        description="MONAI DynUNet, nnU-Net's 3D full-resolution U-Net",
    )
)
