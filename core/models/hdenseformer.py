"""H-DenseFormer (Shi et al., MICCAI 2023): a hybrid densely connected transformer for multimodal tumours.

Written from the paper's description; module names follow the authors' published layout so that their
checkpoints load without remapping.

- **Multi-path parallel embedding**: one transformer path per modality: a 16³ patch embedding (stride 16) with a
  learned position embedding, then densely connected transformer blocks. Each block stacks four layers; layer i
  projects the concatenation of all earlier outputs to ``growth_rate`` channels and applies pre-norm multi-head
  self-attention and a pre-norm feed-forward, and the block's concatenated features are projected back.
- The paths are concatenated, convolved and upsampled step by step (S/8, S/4, S/2, S) and **added** into a
  four-level 3D convolutional encoder at each level.
- A lightweight decoder (transposed convolutions and two 3×3×3 blocks per level) with deep-supervision heads at
  S/2, S/4 and S/8 (kept for checkpoint compatibility; :meth:`forward` returns the full-resolution logits).

Taps: coarse = the fused bottleneck (S/8; the input of ``upconv_3``, after the transformer features are added);
fine = ``block_2_2_right`` (S/2), the second-to-last decoder block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.models.registry import ModelSpec, TapSpec, register_model

__all__ = ["HDenseFormer", "build_hdenseformer", "build_hdenseformer_light"]

PATCH = 16


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    """Linear → GELU → dropout → linear → dropout, on (B, N, C) tokens."""

    def __init__(self, dim: int, hidden: int, out: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention on (B, N, C) tokens, heads of ``dim // heads`` channels."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class DenseTransformerBlock(nn.Module):
    """Four densely connected transformer layers of width ``growth_rate`` on ``dim``-wide tokens."""

    def __init__(self, dim: int, growth_rate: int, heads: int, dropout: float, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    nn.Linear(dim + i * growth_rate, growth_rate),
                    PreNorm(growth_rate, SelfAttention(growth_rate, heads, dropout)),
                    PreNorm(growth_rate, FeedForward(growth_rate, 2 * growth_rate, growth_rate, dropout)),
                ]
            )
            for i in range(layers)
        )
        self.out_layer = FeedForward(dim + layers * growth_rate, 2 * growth_rate, dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for project, attention, feed_forward in self.layers:
            h = project(torch.cat(features, dim=2))
            h = attention(h) + h
            h = feed_forward(h) + h
            # the authors' published code passes the layer's output through the feed-forward once more
            # before concatenating it; kept so that their checkpoints give their outputs
            features.append(feed_forward(h))
        return self.out_layer(torch.cat(features, dim=2))


class ModalityPath(nn.Module):
    """One modality's transformer path: (B, 1, S, S, S) → (B, dim, S/16, S/16, S/16)."""

    def __init__(
        self, dim: int, img_size: Sequence[int], depth: int, growth_rate: int, heads: int, dropout: float
    ):
        super().__init__()
        self.grid = tuple(s // PATCH for s in img_size)
        self.patch_embeddings = nn.Conv3d(1, dim, kernel_size=PATCH, stride=PATCH)
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2], dim)
        )
        self.blocks = nn.ModuleList(
            nn.ModuleList([DenseTransformerBlock(dim, growth_rate, heads, dropout)]) for _ in range(depth)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embeddings(x).flatten(2).transpose(1, 2)
        tokens = self.dropout(tokens + self.position_embeddings)
        for (block,) in self.blocks:
            tokens = block(tokens)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)


class ConvNormReLU(nn.Module):
    """3×3×3 convolution (no bias) → instance norm (affine) → ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.InstanceNorm3d(out_channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)), inplace=True)


class UpConv(nn.Module):
    """3×3×3 convolution → instance norm → ReLU, then ×2 trilinear upsampling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.double_conv(x), scale_factor=2, mode="trilinear", align_corners=False)


class HDenseFormer(nn.Module):
    """(B, M, X, Y, Z) → (B, K, X, Y, Z) logits for M modalities; inputs must have exactly ``img_size``.

    Args:
        in_channels: modalities M (one transformer path each).
        out_channels: classes K.
        n_filters: base width (32 published, 16 for the smaller model).
        img_size: the fixed input size (multiples of 16); sets the position embeddings.
        transformer_depth: 4 × the number of dense transformer blocks per path (12 published).
        growth_rate: width of each dense transformer layer (32).
        heads: attention heads (8).
        dropout: dropout in the transformer paths.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_filters: int = 32,
        img_size: int | Sequence[int] = 144,
        transformer_depth: int = 12,
        growth_rate: int = 32,
        heads: int = 8,
        dropout: float = 0.5,
    ):
        super().__init__()
        size = (img_size,) * 3 if isinstance(img_size, int) else tuple(img_size)
        if any(s % PATCH for s in size):
            raise ValueError(f"img_size {size} must be a multiple of {PATCH}")
        f = n_filters
        self.attns = nn.ModuleList(
            ModalityPath(4 * f, size, transformer_depth // 4, growth_rate, heads, dropout)
            for _ in range(in_channels)
        )
        self.deep_conv = UpConv(4 * f * in_channels, 8 * f)
        self.up1, self.up2, self.up3 = UpConv(8 * f, 4 * f), UpConv(4 * f, 2 * f), UpConv(2 * f, f)
        self.block_1_1_left, self.block_1_2_left = ConvNormReLU(in_channels, f), ConvNormReLU(f, f)
        self.block_2_1_left, self.block_2_2_left = ConvNormReLU(f, 2 * f), ConvNormReLU(2 * f, 2 * f)
        self.block_3_1_left, self.block_3_2_left = ConvNormReLU(2 * f, 4 * f), ConvNormReLU(4 * f, 4 * f)
        self.block_4_1_left, self.block_4_2_left = ConvNormReLU(4 * f, 8 * f), ConvNormReLU(8 * f, 8 * f)
        self.pool = nn.MaxPool3d(2)
        up: dict[str, Any] = {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1}
        self.upconv_3 = nn.ConvTranspose3d(8 * f, 4 * f, **up)
        self.block_3_1_right, self.block_3_2_right = ConvNormReLU(8 * f, 4 * f), ConvNormReLU(4 * f, 4 * f)
        self.upconv_2 = nn.ConvTranspose3d(4 * f, 2 * f, **up)
        self.block_2_1_right, self.block_2_2_right = ConvNormReLU(4 * f, 2 * f), ConvNormReLU(2 * f, 2 * f)
        self.upconv_1 = nn.ConvTranspose3d(2 * f, f, **up)
        self.block_1_1_right, self.block_1_2_right = ConvNormReLU(2 * f, f), ConvNormReLU(f, f)
        self.conv1x1 = nn.Conv3d(f, out_channels, 1)
        self.conv1x1_d1 = nn.Conv3d(2 * f, out_channels, 1)  # deep-supervision heads (S/2, S/4, S/8)
        self.conv1x1_d2 = nn.Conv3d(4 * f, out_channels, 1)
        self.conv1x1_d3 = nn.Conv3d(8 * f, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.cat([path(x[:, i : i + 1]) for i, path in enumerate(self.attns)], dim=1)
        t8 = self.deep_conv(paths)  # S/8
        t4 = self.up1(t8)
        t2 = self.up2(t4)
        t1 = self.up3(t2)
        d0 = self.block_1_2_left(self.block_1_1_left(x)) + t1
        d1 = self.block_2_2_left(self.block_2_1_left(self.pool(d0))) + t2
        d2 = self.block_3_2_left(self.block_3_1_left(self.pool(d1))) + t4
        bottleneck = self.block_4_2_left(self.block_4_1_left(self.pool(d2))) + t8
        h = self.block_3_2_right(self.block_3_1_right(torch.cat([self.upconv_3(bottleneck), d2], dim=1)))
        h = self.block_2_2_right(self.block_2_1_right(torch.cat([self.upconv_2(h), d1], dim=1)))
        h = self.block_1_2_right(self.block_1_1_right(torch.cat([self.upconv_1(h), d0], dim=1)))
        return self.conv1x1(h)


def build_hdenseformer(
    in_channels: int,
    out_channels: int,
    n_filters: int = 32,
    img_size: int | Sequence[int] = 144,
    transformer_depth: int = 12,
    growth_rate: int = 32,
    heads: int = 8,
    dropout: float = 0.5,
) -> nn.Module:
    """H-DenseFormer as published (n_filters 32, transformer depth 12, growth rate 32, 8 heads, 144³)."""
    return HDenseFormer(
        in_channels, out_channels, n_filters, img_size, transformer_depth, growth_rate, heads, dropout
    )


def build_hdenseformer_light(
    in_channels: int,
    out_channels: int,
    n_filters: int = 8,
    img_size: int | Sequence[int] = 144,
    transformer_depth: int = 8,
    growth_rate: int = 16,
    heads: int = 4,
    dropout: float = 0.5,
) -> nn.Module:
    """H-DenseFormer Light (student): n_filters 8, two dense blocks of growth rate 16 per modality path."""
    return HDenseFormer(
        in_channels, out_channels, n_filters, img_size, transformer_depth, growth_rate, heads, dropout
    )


_COARSE = TapSpec("upconv_3", stride=8, capture="input", index=0)
_FINE = TapSpec("block_2_2_right", stride=2)
for _name, _build, _description in (
    (
        "hdenseformer",
        build_hdenseformer,
        "H-DenseFormer: per-modality dense transformer paths fused into a 3D conv U-Net",
    ),
    (
        "hdenseformer_light",
        build_hdenseformer_light,
        "H-DenseFormer Light (student): n_filters 8, lighter transformer paths",
    ),
):
    register_model(
        ModelSpec(
            name=_name,
            build=_build,
            coarse=_COARSE,
            fine=_FINE,
            size_divisor=16,
            fixed_input=True,
            description=_description,
        )
    )
