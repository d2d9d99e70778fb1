"""Where an experiment's files live, and the checks both stages run before touching the store.

Layout under ``output.runs_dir``::

    splits_final.json                              (unless splits.file is set)
    teachers/<teacher>/fold_<k>/                   metrics.csv, curves.png, summary.json
    students/kd-<kind>/fold_<k>/                   checkpoint_best.pth, metrics.csv, curves.png, summary.json
    report_fold_<k>.json, report_fold_<k>.md
"""

from __future__ import annotations

from pathlib import Path

from core.config import Config
from core.data.splits import fold_cases, load_splits
from core.errors import StoreError
from core.store import TeacherStore

__all__ = [
    "fold_split",
    "open_store_for",
    "splits_path",
    "student_dir",
    "teacher_dir",
]


def splits_path(cfg: Config) -> Path:
    return cfg.splits.file or cfg.output.runs_dir / "splits_final.json"


def teacher_dir(cfg: Config, teacher: str, fold: int) -> Path:
    return cfg.output.runs_dir / "teachers" / teacher / f"fold_{fold}"


def student_dir(cfg: Config, kind: str, fold: int) -> Path:
    return cfg.output.runs_dir / "students" / f"kd-{kind}" / f"fold_{fold}"


def open_store_for(cfg: Config, mode: str = "r") -> TeacherStore:
    """Open the config's store and check it was preprocessed with this config's settings.

    Raises:
        StoreError: no store yet (run ``make cache``), no complete case, or a preprocessing hash that differs from
            the config's (the store is stale for this config).
    """
    store = TeacherStore.open(cfg.store.path, mode=mode, chunk_size=cfg.store.chunk_size)
    stored = store.metadata.get("preprocessing_hash")
    if stored != cfg.preprocessing_hash():
        raise StoreError(
            f"{cfg.store.path} was preprocessed with other settings than this config's preprocessing section "
            f"(hash {str(stored)[:12]} ≠ {cfg.preprocessing_hash()[:12]}); re-run `make cache` with "
            "--overwrite, or set store.path to a new location"
        )
    if not store.case_ids():
        raise StoreError(f"{cfg.store.path} holds no complete case; run `make cache` (teachcache preprocess)")
    return store


def fold_split(cfg: Config, store: TeacherStore, fold: int) -> tuple[list[str], list[str]]:
    """``(train, val)`` case ids of ``fold`` from the experiment's ``splits_final.json``."""
    splits = load_splits(splits_path(cfg), store.case_ids())
    return fold_cases(splits, fold)
