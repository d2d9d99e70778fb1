"""The segmentation loss L_SEG: softmax focal loss + soft Dice (``docs/losses.md``, "L_SEG")."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, FocalLoss
from torch import nn

__all__ = ["SegmentationLoss"]


class SegmentationLoss(nn.Module):
    """L_SEG = softmax focal loss + soft Dice, both on the softmax over all K classes.

    - Focal (Lin et al., 2017, multi-class form): ``FL = mean_x Σ_c −y_c(x) (1 − p_c(x))^γ log p_c(x)`` with
      ``p = softmax(z)`` over every class, background included (MONAI ``FocalLoss(use_softmax=True)`` per
      element, summed over classes, averaged over voxels) — so every logit, background's too, gets a gradient.
    - Dice: MONAI ``DiceLoss`` on the same softmax, foreground classes only, computed over the whole batch
      (nnU-Net's "batch Dice"), so a patch without foreground does not push the prediction towards empty.

    Both parts depend on the logits only through their softmax, so the loss is unchanged when the same constant is
    added to every class's logit at a voxel, like every distillation term. (MONAI's ``DiceFocalLoss`` is not: its
    focal part is a sigmoid focal loss per foreground logit; and ``FocalLoss(use_softmax=True,
    include_background=False)`` drops the background logit *before* its softmax, which is exactly 0 for two
    classes.)

    Args:
        gamma: focal-loss focusing parameter γ (0 gives cross-entropy).
    """

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.focal = FocalLoss(
            include_background=True, to_onehot_y=True, use_softmax=True, gamma=gamma, reduction="none"
        )
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def focal_part(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The focal part alone. Args: logits (B, K, X, Y, Z); label (B, 1, X, Y, Z) integer classes."""
        return self.focal(logits.float(), label).sum(dim=1).mean()

    def dice_part(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The soft Dice part alone (1 − batch Dice over the foreground classes)."""
        return self.dice(logits.float(), label)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Args: logits (B, K, X, Y, Z); label (B, 1, X, Y, Z) integer classes. Returns a scalar."""
        return self.focal_part(logits, label) + self.dice_part(logits, label)
