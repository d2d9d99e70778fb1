"""TeachCache core: configuration, data, models, the teacher store, losses and metrics.

Both stages (``cache_teachers`` and ``train_student``) depend on this package and on nothing else of ours.
"""

from __future__ import annotations

__version__ = "0.1.0"
