"""3D UX-Net (Lee et al., ICLR 2023), written from the paper with MONAI's UNETR blocks for the decoder.

Encoder: a 7×7×7 stride-2 stem, then four stages of UX blocks — a 7×7×7 depthwise convolution, a channel
LayerNorm, and "pointwise depthwise scaling" (two grouped 1×1×1 convolutions, groups = channels, with a 4× GELU
expansion) in place of ConvNeXt's MLP, with layer scale and a residual — separated by 2×2×2 stride-2 downsampling.
Decoder: UNETR-style residual blocks on the input and the four stage outputs, a 768-wide bottleneck
(``encoder5``), and four up-blocks back to full resolution.

Taps: coarse = ``encoder5`` output (stride 16, ``hidden_size`` channels, En); fine = ``decoder2`` output
(stride 1), the second-to-last decoder block (``decoder1`` refines it before the head).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from core.models.registry import ModelSpec, TapSpec, register_model

__all__ = ["UXNet", "build_uxnet", "build_uxnet_light"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, X, Y, Z)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class UXBlock(nn.Module):
    """Depthwise 7³ convolution → LayerNorm → grouped 1³ expansion (4×) → GELU → grouped 1³ projection, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6, kernel_size: int = 7):
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = ChannelLayerNorm(dim)
        self.pwconv1 = nn.Conv3d(dim, 4 * dim, 1, groups=dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv3d(4 * dim, dim, 1, groups=dim)
        self.gamma = nn.Parameter(torch.full((1, dim, 1, 1, 1), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma * y


class UXNetEncoder(nn.Module):
    """Stem (stride 2) and four stages; returns the four stage outputs at strides 2, 4, 8 and 16."""

    def __init__(self, in_channels: int, widths: Sequence[int], depths: Sequence[int], kernel_size: int = 7):
        super().__init__()
        self.downsample = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv3d(in_channels, widths[0], 7, stride=2, padding=3), ChannelLayerNorm(widths[0])
                )
            ]
        )
        for a, b in itertools.pairwise(widths):
            self.downsample.append(nn.Sequential(ChannelLayerNorm(a), nn.Conv3d(a, b, 2, stride=2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*(UXBlock(w, kernel_size=kernel_size) for _ in range(d)))
            for w, d in zip(widths, depths, strict=True)
        )
        self.norms = nn.ModuleList(ChannelLayerNorm(w) for w in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for down, stage, norm in zip(self.downsample, self.stages, self.norms, strict=True):
            x = stage(down(x))
            outs.append(norm(x))
        return outs


class UXNet(nn.Module):
    """3D UX-Net: (B, C, X, Y, Z) → (B, K, X, Y, Z) logits; sizes must be multiples of 16.

    Args:
        in_channels: input modalities.
        out_channels: classes K.
        widths: the four stage widths (48, 96, 192, 384 published).
        depths: UX blocks per stage (2, 2, 2, 2 published).
        hidden_size: bottleneck width (768 published).
        kernel_size: depthwise kernel (7 published).
        norm_name: normalisation of the decoder blocks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 2, 2),
        hidden_size: int = 768,
        kernel_size: int = 7,
        norm_name: str = "instance",
    ):
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError("widths and depths must each have 4 entries")
        w = list(widths)
        self.uxnet_3d = UXNetEncoder(in_channels, w, depths, kernel_size)
        block = {"spatial_dims": 3, "kernel_size": 3, "stride": 1, "norm_name": norm_name, "res_block": True}
        up = {
            "spatial_dims": 3,
            "kernel_size": 3,
            "upsample_kernel_size": 2,
            "norm_name": norm_name,
            "res_block": True,
        }
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=w[0], **block)
        self.encoder2 = UnetrBasicBlock(in_channels=w[0], out_channels=w[1], **block)
        self.encoder3 = UnetrBasicBlock(in_channels=w[1], out_channels=w[2], **block)
        self.encoder4 = UnetrBasicBlock(in_channels=w[2], out_channels=w[3], **block)
        self.encoder5 = UnetrBasicBlock(in_channels=w[3], out_channels=hidden_size, **block)
        self.decoder5 = UnetrUpBlock(in_channels=hidden_size, out_channels=w[3], **up)
        self.decoder4 = UnetrUpBlock(in_channels=w[3], out_channels=w[2], **up)
        self.decoder3 = UnetrUpBlock(in_channels=w[2], out_channels=w[1], **up)
        self.decoder2 = UnetrUpBlock(in_channels=w[1], out_channels=w[0], **up)
        self.decoder1 = UnetrBasicBlock(in_channels=w[0], out_channels=w[0], **block)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=w[0], out_channels=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s2, s4, s8, s16 = self.uxnet_3d(x)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(s2)
        enc3 = self.encoder3(s4)
        enc4 = self.encoder4(s8)
        hidden = self.encoder5(s16)
        dec = self.decoder5(hidden, enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(self.decoder1(dec))


def build_uxnet(
    in_channels: int,
    out_channels: int,
    widths: Sequence[int] = (48, 96, 192, 384),
    depths: Sequence[int] = (2, 2, 2, 2),
    hidden_size: int = 768,
    kernel_size: int = 7,
    norm_name: str = "instance",
) -> nn.Module:
    """3D UX-Net as published (widths 48/96/192/384, depths 2/2/2/2, bottleneck 768)."""
    return UXNet(in_channels, out_channels, widths, depths, hidden_size, kernel_size, norm_name)


def build_uxnet_light(
    in_channels: int,
    out_channels: int,
    widths: Sequence[int] = (4, 8, 16, 32),
    depths: Sequence[int] = (1, 1, 1, 1),
    hidden_size: int = 64,
    kernel_size: int = 7,
    norm_name: str = "instance",
) -> nn.Module:
    """3D UX-Net Light: widths 4/8/16/32, one block per stage, a 64-wide bottleneck.

    The full-resolution decoder blocks dominate the cost, so the first width sets it: 0.39M parameters and
    8.9 GFLOPs at 96³ (1 → 14), 16× fewer FLOPs than UNETR and 137× fewer parameters than 3D UX-Net.
    """
    return UXNet(in_channels, out_channels, widths, depths, hidden_size, kernel_size, norm_name)


_TAPS = {"coarse": TapSpec("encoder5", stride=16), "fine": TapSpec("decoder2", stride=1)}
for _name, _build, _description in (
    ("uxnet", build_uxnet, "3D UX-Net: 7³ depthwise-convolution encoder with a UNETR-style decoder"),
    ("uxnet_light", build_uxnet_light, "3D UX-Net Light (student): narrower, one block per stage"),
):
    register_model(
        ModelSpec(
            name=_name,
            build=_build,
            coarse=_TAPS["coarse"],
            fine=_TAPS["fine"],
            size_divisor=16,
            description=_description,
        )
    )
