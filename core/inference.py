"""Sliding-window inference (MONAI, gaussian blending) that returns logits and both tap attention maps in one pass."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from core.config import InferenceConfig
from core.errors import ConfigError
from core.models.registry import ModelSpec
from core.models.taps import TapRecorder, attention_map

__all__ = ["aligned_overlap", "autocast", "check_window", "predict_volume", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is visible; use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True) -> Any:
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU."""
    if not enabled or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _tap_stride(spec: ModelSpec) -> int:
    """The least common multiple of the taps' strides: windows starting on it start on every tap's grid."""
    return math.lcm(*(t.stride for t in spec.taps.values()))


def _who(spec: ModelSpec, name: str | None, case_id: str | None = None) -> str:
    """How a message names the network: ``'swin' (swin_unetr), case 'X'``, or just ``'swin_unetr'``."""
    who = f"'{name}' ({spec.name})" if name and name != spec.name else f"'{spec.name}'"
    return f"{who}, case '{case_id}'" if case_id else who


def aligned_overlap(spec: ModelSpec, cfg: InferenceConfig, name: str | None = None) -> tuple[float, ...]:
    """Per-axis overlap that makes MONAI's windows start on every tap's grid, never overlapping less than asked.

    MONAI steps windows by ``int(roi · (1 − overlap))`` and clamps the last one to the volume's end. With the
    volume and the window multiples of the taps' stride s, the taps stitch exactly when the step is a multiple of
    s too; so the step is rounded *down* to a multiple of s (more overlap, never less). SwinUNETR's published 96³
    window with overlap 0.5 (step 48) steps by 32 (overlap 2/3); a 64³ window at 0.5 is unchanged.

    Args:
        spec: the network's registry entry (its taps' strides).
        cfg: the sliding-window settings.
        name: the teacher's configured name, for messages.

    Returns:
        One overlap per axis, to pass to MONAI's ``sliding_window_inference`` (recorded as
        ``inference_overlap_used``).

    Raises:
        ConfigError: the window is too small to step by one stride while overlapping as asked.
    """
    stride = _tap_stride(spec)
    out = []
    for roi in cfg.roi_size:
        step = int(roi * (1 - cfg.overlap))
        aligned = (step // stride) * stride
        if aligned == 0:
            raise ConfigError(
                f"{_who(spec, name)}: windows of {tuple(cfg.roi_size)} with overlap {cfg.overlap} move {step} "
                f"voxels, less than its tap stride {stride} (coarse and fine maps must stitch on their grids); use "
                f"roi_size {2 * stride} or larger multiples with overlap 0.5, or a smaller overlap"
            )
        # the + 0.5 keeps int(roi · (1 − overlap)) from landing one below `aligned` through rounding
        out.append(cfg.overlap if aligned == step else 1.0 - (aligned + 0.5) / roi)
    return tuple(out)


def _check_window_size(
    spec: ModelSpec,
    roi: tuple[int, ...],
    volume_shape: tuple[int, ...],
    args: dict[str, Any],
    name: str | None,
    case_id: str | None,
) -> None:
    """The window must be a size the network accepts and fit inside the case (X, Y, Z)."""
    who = _who(spec, name)
    img = spec.input_size(args)
    if img is not None and tuple(roi) != img:
        raise ConfigError(
            f"{who} only accepts windows of its img_size {img}; set its inference.roi_size to it"
        )
    if any(r % spec.size_divisor for r in roi):
        raise ConfigError(
            f"{who} needs inference.roi_size divisible by {spec.size_divisor}, got {tuple(roi)}"
        )
    if any(v < r for v, r in zip(volume_shape, roi, strict=True)):
        raise ConfigError(
            f"{_who(spec, name, case_id)}: volume {tuple(volume_shape)} is smaller than inference.roi_size "
            f"{tuple(roi)}; raise preprocessing.min_size to at least the window and rebuild the store "
            "(`teachcache preprocess --overwrite`)"
        )


def _check_tap_grids(
    spec: ModelSpec,
    roi: tuple[int, ...],
    volume_shape: tuple[int, ...],
    name: str | None,
    case_id: str | None,
) -> None:
    """The case grid (X, Y, Z) and the window must be multiples of every tap's stride."""
    lcm = _tap_stride(spec)
    for kind, tap in spec.taps.items():
        if any(v % tap.stride for v in volume_shape):
            raise ConfigError(
                f"{_who(spec, name, case_id)}: its {kind} tap has stride {tap.stride}, but the case grid "
                f"{tuple(volume_shape)} is not a multiple of it, so its {kind} map would be cut short; set "
                f"preprocessing.size_divisor to a multiple of {lcm} (e.g. {lcm}) and rebuild the store "
                "(`teachcache preprocess --overwrite`)"
            )
        if any(r % tap.stride for r in roi):
            raise ConfigError(
                f"{_who(spec, name)}: its {kind} tap has stride {tap.stride}, but the window {tuple(roi)} is not a "
                f"multiple of it, so its {kind} map would be cut short; set its inference.roi_size to a multiple "
                f"of {lcm}"
            )


def check_window(
    spec: ModelSpec,
    cfg: InferenceConfig,
    volume_shape: tuple[int, ...],
    args: dict[str, Any],
    taps: bool = True,
    *,
    name: str | None = None,
    case_id: str | None = None,
) -> None:
    """Refuse window settings that would put a tap's map off its grid or feed a network a size it rejects.

    Called for every case before anything is written (caching) or trained (validation windows), so a bad setting
    stops a run at its start, never after hours.

    Args:
        spec: the network's registry entry.
        cfg: the sliding-window settings.
        volume_shape: (X, Y, Z) of the case.
        args: the network's constructor arguments.
        taps: whether the coarse and fine maps are stitched too (caching); then the case grid and the window must
            be multiples of every tap's stride, or a map would be cut short (an 80-voxel axis, fine for
            size_divisor 16, holds 2.5 cells of a stride-32 tap: its map would keep 2, read back as stride 40).
        name: the teacher's (or student's) configured name, for messages.
        case_id: the case whose grid is checked, for messages.

    Raises:
        ConfigError: naming the network, the case, the setting and a value that works.
    """
    _check_window_size(spec, cfg.roi_size, volume_shape, args, name, case_id)
    if not taps:
        return
    _check_tap_grids(spec, cfg.roi_size, volume_shape, name, case_id)
    aligned_overlap(spec, cfg, name)


class _TappedPredictor(nn.Module):
    """Returns a tuple ordered from the finest grid to the coarsest.

    ``(logits, fine map, coarse map)``, or with ``features``: ``(logits, fine map, fine features, coarse map,
    coarse features)``. MONAI's sliding window resizes its blending weights in place for each lower-resolution
    output and keeps the resized weights for the outputs after it (and visits dict outputs in sorted key order),
    so outputs must come finest first.
    """

    def __init__(self, model: nn.Module, recorder: TapRecorder, p: float, features: bool):
        super().__init__()
        self.model, self.recorder, self.p, self.features = model, recorder, p, features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(x)
        fine, coarse = self.recorder.features["fine"], self.recorder.features["coarse"]
        if not self.features:
            return logits.float(), attention_map(fine, self.p), attention_map(coarse, self.p)
        return (
            logits.float(),
            attention_map(fine, self.p),
            fine.float(),
            attention_map(coarse, self.p),
            coarse.float(),
        )


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    cfg: InferenceConfig,
    device: torch.device,
    spec: ModelSpec | None = None,
    p: float = 2.0,
    amp: bool = True,
    features: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``model`` over a whole volume with overlapping windows.

    Args:
        model: network mapping (B, C, X, Y, Z) to (B, K, X, Y, Z) logits, already on ``device``.
        image: (C, X, Y, Z) preprocessed volume.
        cfg: window size, overlap, batch and blending mode.
        device: where windows are evaluated; stitching happens on the CPU.
        spec: when given, the coarse and fine taps are captured too and returned as attention maps.
        p: attention-map power.
        amp: mixed precision on CUDA.
        features: with ``spec``, also return the stitched tap features themselves.

    Returns:
        ``{"logits": (K, X, Y, Z)}`` float32, plus ``"coarse"`` and ``"fine"``: (x, y, z) float32 unnormalised
        attention maps on each tap's grid (volume / stride), when ``spec`` is given, and with ``features``
        ``"coarse_features"`` and ``"fine_features"``: (C, x, y, z) float32.
    """
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None]
    model.eval()
    kwargs = dict(
        roi_size=cfg.roi_size,
        sw_batch_size=cfg.sw_batch_size,
        overlap=cfg.overlap,
        mode=cfg.mode,
        sw_device=device,
        device=torch.device("cpu"),
    )
    with autocast(device, amp):
        if spec is None:
            logits = sliding_window_inference(x, predictor=model, **kwargs)
            return {"logits": logits[0].float().numpy()}
        kwargs["overlap"] = aligned_overlap(spec, cfg)  # windows start on every tap's grid
        with TapRecorder(model, spec.taps) as recorder:
            predictor = _TappedPredictor(model, recorder, p, features)
            outputs = sliding_window_inference(x, predictor=predictor, **kwargs)
    result = {"logits": outputs[0][0].float().numpy(), "fine": outputs[1][0, 0].float().numpy()}
    if features:
        result["fine_features"] = outputs[2][0].float().numpy()
        result["coarse"] = outputs[3][0, 0].float().numpy()
        result["coarse_features"] = outputs[4][0].float().numpy()
    else:
        result["coarse"] = outputs[2][0, 0].float().numpy()
    return result
