"""Where a per-voxel distillation term looks: class balancing and teacher-error masking as weights over voxels.

A per-voxel term (``pwd``, ``dkd``) is a weighted sum ``Σ_x W(x) · ℓ(x)`` of its per-voxel loss ℓ over the batch's
voxels, with weights W that sum to 1. The paper's term averages over voxels (``W = 1/N``): on a patch that is 98 %
background, background decides the term. :class:`VoxelWeighting` builds other W from the label and the teachers'
mixed distribution (``docs/losses.md``, "Where a per-voxel term looks"):

- ``balance: class`` — the mean within each class region, then over the classes present in the batch:
  ``W(x) = m(x) / (|C| · Σ_{y ∈ R_c(x)} m(y))``; a 2-voxel vessel weighs as much as the background, as soft Dice
  does for L_SEG. Regions ``R_c`` from the label (default) or the teachers' argmax (``regions: teacher``).
- ``error_weight: w`` — teacher-error masking: ``m(x) = w`` where the teachers' mixed argmax disagrees with the label
  (0 drops those voxels), 1 elsewhere. Without it ``m ≡ 1``.
- ``balance: voxel`` with masking — ``W(x) = m(x) / Σ_y m(y)``.

Fallbacks, by design: a batch without foreground is balanced over the classes it holds (background alone: the
plain voxel mean); a class absent from the batch (or from the teachers' argmax, with ``regions: teacher``) is not
among C; when every voxel is dropped (``error_weight: 0`` and the teachers wrong everywhere) W is 0 and the term is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VoxelWeighting"]

BALANCES = ("voxel", "class")
REGIONS = ("label", "teacher")


@dataclass(frozen=True)
class VoxelWeighting:
    """How a per-voxel term weighs the batch's voxels.

    Attributes:
        balance: ``"voxel"`` (the mean over voxels, the papers') or ``"class"`` (the mean within each class region,
            then over the classes present).
        regions: where the class regions come from: ``"label"`` or ``"teacher"`` (the argmax of the teachers' mixed
            distribution).
        error_weight: ``None`` (no masking), or the weight in [0, 1) of a voxel whose teachers' mixed argmax
            disagrees with the label (0 drops it).
    """

    balance: str = "voxel"
    regions: str = "label"
    error_weight: float | None = None

    def __post_init__(self) -> None:
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}; got {self.balance!r}")
        if self.regions not in REGIONS:
            raise ValueError(f"regions must be one of {', '.join(REGIONS)}; got {self.regions!r}")
        if self.error_weight is not None and not 0 <= self.error_weight < 1:
            raise ValueError(
                f"error_weight must be in [0, 1) (0 drops the voxels where the teachers' argmax disagrees with the "
                f"label; leave it out to mask nothing); got {self.error_weight}"
            )

    @property
    def plain(self) -> bool:
        """The papers' voxel mean (W = 1/N): the term needs neither the label nor the teachers' argmax."""
        return self.balance == "voxel" and self.error_weight is None

    @property
    def needs_label(self) -> bool:
        return self.error_weight is not None or (self.balance == "class" and self.regions == "label")

    def weights(
        self, mixed: torch.Tensor, label: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The voxel weights W (B, 1, X, Y, Z), summing to 1 (or all 0), and the fraction of voxels masked.

        Args:
            mixed: the teachers' mixed distribution (B, K, X, Y, Z) (its argmax: teacher regions and errors).
            label: (B, 1, X, Y, Z) integer classes; needed for label regions and masking.

        Returns:
            ``(W, masked)``: ``masked`` is the fraction of voxels where the teachers' argmax disagrees with the label
            (a 0-d tensor), ``None`` without masking.

        Raises:
            ValueError: the label is needed and missing.
        """
        if label is None and self.needs_label:
            raise ValueError(
                "class balancing over label regions and teacher-error masking need the batch's label"
            )
        mask = torch.ones_like(mixed[:, :1], dtype=torch.float32)
        masked = None
        argmax = mixed.argmax(dim=1, keepdim=True) if not self.plain else None
        if self.error_weight is not None:
            assert label is not None and argmax is not None
            wrong = argmax != label
            masked = wrong.float().mean()
            mask = torch.where(wrong, torch.full_like(mask, self.error_weight), mask)
        if self.balance == "voxel":
            total = mask.sum()
            return (mask / total if total > 0 else torch.zeros_like(mask)), masked
        regions = label if self.regions == "label" else argmax
        assert regions is not None
        regions = regions.long()
        k = int(mixed.shape[1])
        per_class = torch.zeros(k, dtype=mask.dtype, device=mask.device).index_add_(
            0, regions.reshape(-1), mask.reshape(-1)
        )
        present = int((per_class > 0).sum())
        if present == 0:
            return torch.zeros_like(mask), masked
        denominator = per_class[regions].clamp_min(torch.finfo(mask.dtype).tiny) * present
        return mask / denominator, masked
