"""Stage 2: train a light student against the teacher store, with no teacher in memory.

Never imports ``cache_teachers``; shares only ``core``.
"""

from __future__ import annotations

from train_student.distil import distil

__all__ = ["distil"]
