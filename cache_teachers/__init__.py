"""Stage 1: preprocess the dataset into the store, (for the demo) train teachers, and cache every teacher's outputs.

Never imports ``train_student``; shares only ``core``.
"""

from __future__ import annotations

from cache_teachers.cache import CacheSummary, cache_teachers
from cache_teachers.preprocess import PreprocessSummary, preprocess_dataset
from cache_teachers.train_teachers import train_teachers

__all__ = ["CacheSummary", "PreprocessSummary", "cache_teachers", "preprocess_dataset", "train_teachers"]
