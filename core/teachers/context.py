"""Online distillation in context: each training patch's targets from exactly the cache's sliding windows.

The baseline that asks whether the cache delivers the *same* targets as running the teachers would
(``distillation.source: online-context``). For a patch at ``start`` of a case, each teacher runs the windows the
cache ran over that case (same positions — MONAI's, with :func:`core.inference.aligned_overlap` — same roi and
overlap, same Gaussian weights, the teacher's own inference settings) that intersect the patch, and only those:
MONAI's sliding window over their bounding box (the *context box*) visits exactly them, so every voxel of the patch
is the same weighted mean of the same window outputs as in the cache. The stitched logits and tap maps are cropped
to the patch (maps with :func:`core.data.patches.crop_map`, as cached maps are cut) before the batch's joint
augmentation, which :class:`~core.data.patches.PatchDataset` then applies to them as to cached maps.

Nothing is reused across patches: every patch runs its windows afresh (on the demo, up to 27 per teacher), so the
measured teacher time is what the cache saves. What remains different from the cache is only the cache's encoding
(quantised probabilities, float16 maps) and the maps' scale (unit root-mean-square over the patch here, over the
volume in the store; the attention losses normalise each map).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval
from torch import nn

from core.config import InferenceConfig
from core.data.patches import TargetRequest, crop_map
from core.inference import aligned_overlap, predict_volume
from core.models.registry import ModelSpec
from core.store.format import Box
from core.store.teacher_store import TeacherStore
from core.teachers.online import unit_rms
from core.terms import ATTENTION_KINDS, ONLINE_KINDS

__all__ = ["ContextTargets", "ContextTeacher", "window_starts"]


@dataclass(frozen=True)
class ContextTeacher:
    """One teacher as context mode runs it: its store key, network, taps and sliding window (the cache's)."""

    key: str
    model: nn.Module
    spec: ModelSpec
    inference: InferenceConfig


def window_starts(shape: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> list[list[int]]:
    """Per axis, the starts of MONAI's sliding windows over a volume of ``shape`` (its ``dense_patch_slices``)."""
    scan = _get_scan_interval(tuple(shape), tuple(roi), len(shape), tuple(overlap))
    slices = dense_patch_slices(tuple(shape), tuple(roi), scan)
    return [sorted({int(s[axis].start) for s in slices}) for axis in range(len(shape))]


class ContextTargets:
    """Teachers in memory computing a patch's targets from the cache's windows around it (module docstring).

    Called by :class:`~core.data.patches.PatchDataset` for each patch, before augmentation, with the store the
    patch's image is read from; returns the keys a cached patch carries (``softmax/<key>`` (K, P, P, P) at
    ``request.temperature``, ``coarse/<key>`` and ``fine/<key>`` (1, n, n, n)).

    Args:
        teachers: the fold's teachers, each with the sliding window it was cached with.
        request: what the recipe reads (softmax, attention maps); kinds only the cache has are refused.
        p: the attention maps' power (the cache's).
        device: where the teachers run (the patch dataset then runs in the training process).
        amp: mixed precision on CUDA.

    Attributes:
        seconds: time spent in teacher forward passes and stitching so far.
        windows: sliding windows run so far, over every teacher.
    """

    def __init__(
        self,
        teachers: list[ContextTeacher],
        request: TargetRequest,
        p: float,
        device: torch.device,
        amp: bool = True,
    ) -> None:
        if set(request.kinds()) - ONLINE_KINDS:
            raise ValueError("context targets provide softmax and attention maps, not feature sketches")
        for teacher in teachers:
            teacher.model.to(device).eval().requires_grad_(False)
        self.teachers, self.request, self.p, self.device, self.amp = teachers, request, p, device, amp
        self.seconds = 0.0
        self.windows = 0

    def context_box(
        self, teacher: ContextTeacher, shape: Sequence[int], start: Sequence[int], size: Sequence[int]
    ) -> tuple[Box, int]:
        """The bounding box of the cache's windows over a case of ``shape`` that intersect the patch, and how many.

        Raises:
            RuntimeError: MONAI would not visit exactly those windows over the box (a change of its window rule).
        """
        roi = teacher.inference.roi_size
        overlap = aligned_overlap(teacher.spec, teacher.inference, teacher.key)
        lo, hi, count = [], [], 1
        for axis, starts in enumerate(window_starts(shape, roi, overlap)):
            need_lo, need_hi = self._sampled(teacher, shape[axis], start[axis], size[axis])
            hit = [s for s in starts if s < need_hi and s + roi[axis] > need_lo]
            lo.append(hit[0])
            hi.append(hit[-1] + roi[axis])
            count *= len(hit)
            inside = [lo[-1] + s for s in window_starts([hi[-1] - lo[-1]], [roi[axis]], [overlap[axis]])[0]]
            if inside != hit:
                raise RuntimeError(
                    f"{teacher.key}: MONAI's windows over the context box {lo[-1]}–{hi[-1]} (axis {axis}) are "
                    f"{inside}, not the cache's {hit}; context targets would differ from the cache's"
                )
        return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), count  # type: ignore[return-value]

    @staticmethod
    def _sampled(teacher: ContextTeacher, extent: int, start: int, size: int) -> tuple[int, int]:
        """The part of one axis the patch's targets read: the patch, widened by a tap's stride each side where its
        map is interpolated rather than cut (:func:`~core.data.patches.crop_map` then samples neighbouring cells,
        which must be stitched from the same windows as in the cache)."""
        lo, hi = start, start + size
        for tap in teacher.spec.taps.values():
            s = tap.stride
            if start % s or max(1, round(size / s)) * s != size:
                lo, hi = max(0, min(lo, start - s)), min(extent, max(hi, start + size + s))
        return lo, hi

    def __call__(
        self, store: TeacherStore, case_id: str, start: Sequence[int], size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """The targets of the patch of ``size`` at ``start`` of ``case_id``, before augmentation."""
        shape = store.case_shape(case_id)
        sample: dict[str, torch.Tensor] = {}
        for teacher in self.teachers:
            box, count = self.context_box(teacher, shape, start, size)
            image = store.read_image(case_id, box)
            began = time.perf_counter()
            out = predict_volume(
                teacher.model,
                image,
                teacher.inference,
                self.device,
                spec=teacher.spec,
                p=self.p,
                amp=self.amp,
            )
            self.seconds += (
                time.perf_counter() - began
            )  # predict_volume returns host arrays: the device is done
            self.windows += count
            offset = [o - b.start for o, b in zip(start, box, strict=True)]
            extent = [b.stop - b.start for b in box]
            if self.request.softmax:
                logits = out["logits"][
                    (slice(None), *(slice(o, o + p) for o, p in zip(offset, size, strict=True)))
                ]
                scaled = torch.from_numpy(np.ascontiguousarray(logits)) / self.request.temperature
                sample[f"softmax/{teacher.key}"] = torch.softmax(scaled, dim=0)
            if self.request.attention:
                for kind in ATTENTION_KINDS:
                    amap = out[kind]
                    stride = [e / m for e, m in zip(extent, amap.shape, strict=True)]
                    sample[f"{kind}/{teacher.key}"] = unit_rms(crop_map(amap, stride, offset, size)[None])[0]
        return sample
