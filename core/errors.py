"""User-facing errors.

Every error a user can cause (bad config, missing file, wrong checkpoint, stage run out of order) is raised as a
:class:`TeachCacheError` whose message names the file, case or key and says how to fix it. The CLI prints the
message without a traceback and exits with :attr:`TeachCacheError.exit_code`.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "StoreError",
    "TeachCacheError",
    "TrainingError",
]


class TeachCacheError(Exception):
    """An error caused by the user's input; its message is shown as is."""

    exit_code: int = 2


class ConfigError(TeachCacheError):
    """The experiment configuration is invalid (unknown key, wrong type, missing file)."""


class DatasetError(TeachCacheError):
    """The raw dataset folder does not follow the expected layout."""


class CheckpointError(TeachCacheError):
    """A checkpoint is missing, unsafe, or does not fit the declared architecture."""


class StoreError(TeachCacheError):
    """The teacher store is missing, incomplete, foreign or from another format version."""


class TrainingError(TeachCacheError):
    """Training cannot go on (a loss term became NaN or infinite); nothing of the run is published."""
