"""Losses at three levels (torchdistill's): plain losses over tensors; one registered distillation term per class,
beside the plain loss it wraps; and the objective that sums them with the segmentation loss.

- :mod:`core.losses.segmentation` — L_SEG (focal + Dice);
- :mod:`core.losses.distillation` — the framework: ``register_term``, ``TERMS``, the base terms with teacher
  weighting and the one per-tap sum, ``DistillationObjective`` and ``build_objective``;
- the terms by family: :mod:`core.losses.distribution` (``pwd``, ``cwd``, ``dist``), :mod:`core.losses.attention`
  (``afs``), :mod:`core.losses.relation` (``affinity``, ``gram``), :mod:`core.losses.mskd` (``ffd``, ``rgd``).

Importing the package (any of its modules) imports the term modules below, so every term is registered in
``TERMS`` before ``build_objective`` can be called. ``docs/losses.md`` gives each formula.
"""

from __future__ import annotations

from core.losses import attention, distribution, mskd, relation

__all__ = ["attention", "distribution", "mskd", "relation"]
