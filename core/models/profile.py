"""Parameter and FLOP counts of registered models, measured with PyTorch's own FLOP counter."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.errors import ConfigError
from core.models.registry import create_model, get_spec

__all__ = ["ModelProfile", "profile_model"]


@dataclass(frozen=True)
class ModelProfile:
    """One model at one input size. ``gflops`` counts a multiply-add as 2 FLOPs (PyTorch's convention)."""

    name: str
    parameters: int
    gflops: float
    input_size: int
    in_channels: int
    out_channels: int
    coarse_stride: int
    fine_stride: int
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_model(
    name: str,
    input_size: int = 96,
    in_channels: int = 1,
    out_channels: int = 14,
    args: dict[str, Any] | None = None,
) -> ModelProfile:
    """Count parameters and forward FLOPs of ``name`` on a (1, in_channels, S, S, S) input.

    The network is built on the CPU and moved to the ``meta`` device, so counting allocates no activations.
    A fixed-input network's ``img_size`` defaults to ``input_size``.

    Raises:
        ConfigError: ``input_size`` is not a multiple of the network's ``size_divisor``, or the network cannot run
            on it (a normalisation over a one-voxel feature map).
    """
    spec = get_spec(name)
    if input_size % spec.size_divisor:
        raise ConfigError(f"'{name}' needs input sizes divisible by {spec.size_divisor}, got {input_size}")
    args = dict(args or {})
    if spec.fixed_input:
        args.setdefault("img_size", input_size)
    model = create_model(name, in_channels, out_channels, args).to("meta").eval()
    x = torch.empty(1, in_channels, input_size, input_size, input_size, device="meta")
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(x)
    except (ValueError, RuntimeError) as exc:  # e.g. instance norm over a one-voxel bottleneck
        raise ConfigError(
            f"'{name}' cannot run on a {input_size}³ input ({exc}); use a larger input size"
        ) from None
    return ModelProfile(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        gflops=counter.get_total_flops() / 1e9,
        input_size=input_size,
        in_channels=in_channels,
        out_channels=out_channels,
        coarse_stride=spec.coarse.stride,
        fine_stride=spec.fine.stride,
        description=spec.description,
    )
