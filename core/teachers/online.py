"""Online distillation: the fold's teachers in memory compute the targets on every training batch.

``distillation.source: online-patch``, TeachFormer's own regime: does the cache do at least as well as what a user
would otherwise run? (:mod:`core.teachers.context` is the other online baseline.) :class:`OnlineTargets` is a *target source* like the
store's (``core.training.loop``): it turns a batch into :data:`~core.terms.DistillationTargets` with the same keys, shapes
and conventions, so every softmax and attention term trains unchanged from either source. Differences from the
cache, by design: the teachers see the batch as augmented (the cache holds the un-augmented whole volume, cropped),
each patch alone (the cache stitches overlapping windows), and exact float32 probabilities (the cache stores an
encoding).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from core.data.patches import TargetRequest
from core.inference import autocast
from core.models.registry import ModelSpec
from core.models.taps import TapRecorder, attention_map
from core.terms import ATTENTION_KINDS, ONLINE_KINDS, DistillationTargets

__all__ = ["OnlineTargets", "unit_rms"]


def unit_rms(amap: torch.Tensor) -> torch.Tensor:
    """Each sample's map scaled to unit root-mean-square, as the store keeps maps (the losses normalise anyway).

    Computed in float64, as the store's writer does (:func:`core.store.writing._unit_rms`): a deep tap's attention
    map can be as small as 1e-37 (the demo's DynUNet and SwinUNETR bottlenecks at p = 2), whose squares vanish in
    float32 — a floor on the norm then returned zeros where the cache holds the map (an all-zero map is left zero).
    """
    flat = amap.flatten(1).double()
    norm = flat.norm(dim=1)
    scale = torch.where(norm > 0, flat.shape[1] ** 0.5 / norm, torch.ones_like(norm))
    return (flat * scale[:, None]).view(amap.shape).to(amap.dtype)


class OnlineTargets:
    """Distillation targets computed by teachers held in memory, on each (augmented) batch.

    Args:
        teachers: ``(key, model, spec)`` per teacher; ``key`` names it in the targets as the store would
            (``<name>/fold_<k>``); the model is moved to ``device`` and set to evaluation mode.
        request: what to compute: softmax at ``request.temperature`` and attention maps, as the recipe reads them
            (:meth:`~core.data.patches.TargetRequest.for_recipe`); kinds only the cache has are refused.
        p: the attention maps' power.
        device: where the teachers run.
        amp: mixed precision on CUDA.
    """

    def __init__(
        self,
        teachers: list[tuple[str, nn.Module, ModelSpec]],
        request: TargetRequest,
        p: float,
        device: torch.device,
        amp: bool = True,
    ) -> None:
        if set(request.kinds()) - ONLINE_KINDS:  # feature sketches are a property of the cache (PCA per case)
            raise ValueError("online targets provide softmax and attention maps, not feature sketches")
        self.teachers = [(key, model.to(device).eval(), spec) for key, model, spec in teachers]
        for _, model, _ in self.teachers:
            model.requires_grad_(False)
        self.request, self.p, self.device, self.amp = request, p, device, amp
        self.seconds = 0.0  # time spent in teacher forward passes so far

    def __call__(self, batch: dict[str, torch.Tensor]) -> DistillationTargets:
        """The targets of one batch: ``{"softmax": {key: (B, K, X, Y, Z)}, "coarse"/"fine": {key: (B, 1, x, y, z)}}``."""
        image = batch["image"].to(self.device, non_blocking=True)
        targets: DistillationTargets = {kind: {} for kind in self.request.kinds()}
        began = time.perf_counter()
        with torch.no_grad(), autocast(self.device, self.amp):
            for key, model, spec in self.teachers:
                with TapRecorder(model, spec.taps) as recorder:
                    logits = model(image).float()
                if self.request.softmax:
                    targets["softmax"][key] = torch.softmax(logits / self.request.temperature, dim=1)
                if self.request.attention:
                    for kind in ATTENTION_KINDS:
                        targets[kind][key] = unit_rms(attention_map(recorder.features[kind], self.p))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - began
        return targets
