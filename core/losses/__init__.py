"""The segmentation loss, the plain distillation losses, and the registered distillation terms."""
