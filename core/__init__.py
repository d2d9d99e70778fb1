"""TeachCache core, one package per concern (docs/architecture.md): the term catalogue and the config, models, the
teacher store, data, inference, losses, teachers, the experiment's layout, evaluation, inspection, training, deploy.

Both stages (``cache_teachers`` and ``train_student``) depend on this package and on nothing else of ours.
"""

from __future__ import annotations

__version__ = "0.1.0"
