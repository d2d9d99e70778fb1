"""Where an experiment's files live, and the checks both stages run before touching the store.

Layout under ``output.runs_dir``::

    splits_final.json                              a copy of the store's folds (unless splits.file is set)
    teachers/<teacher>/fold_<k>/                   metrics.csv, curves.png, summary.json
    students/kd-<kind>/fold_<k>/                   checkpoint_final.pth, metrics.csv, curves.png, summary.json
    students/kd-<kind>/seed_<s>/fold_<k>/          the same run repeated with training seed s (make cv SEEDS=…)
    report_fold_<k>.json, report_fold_<k>.md
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from core.config import Config, TeacherConfig
from core.data.layouts import read_dataset
from core.data.splits import check_splits, fold_cases, load_splits, splits_difference
from core.errors import DatasetError, StoreError, TeachCacheError
from core.store.teacher_store import TeacherStore
from core.teachers.base import teacher_entry_fields

__all__ = [
    "RawDataChangedWarning",
    "SplitsCopyWarning",
    "entry_key",
    "fold_split",
    "open_store_for",
    "raw_dataset_status",
    "splits_path",
    "store_splits",
    "student_dir",
    "teacher_dir",
]


def splits_path(cfg: Config) -> Path:
    """The nnU-Net ``splits_final.json``: ``splits.file`` when set, else the copy in the runs folder.

    Stage 2 reads folds from the store (:func:`store_splits`); this file is what preprocessing starts from and the
    copy other tools read.
    """
    return cfg.splits.file or cfg.output.runs_dir / "splits_final.json"


def teacher_dir(cfg: Config, teacher: str, fold: int) -> Path:
    return cfg.output.runs_dir / "teachers" / teacher / f"fold_{fold}"


def student_dir(cfg: Config, kind: str, fold: int, seed: int | None = None) -> Path:
    """``students/kd-<kind>/fold_<k>``; a repeat with another training seed: ``students/kd-<kind>/seed_<s>/fold_<k>``."""
    base = cfg.output.runs_dir / "students" / f"kd-{kind}"
    return (base if seed is None else base / f"seed_{seed}") / f"fold_{fold}"


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


def store_splits(cfg: Config, store: TeacherStore) -> list[dict[str, list[str]]]:
    """The folds recorded in the store (its root ``splits`` attribute): the store travels without its runs folder.

    ``splits_final.json`` in the runs folder is only a copy for tools that read nnU-Net's file. When ``splits.file``
    is set and present, it must hold the same folds as the store.

    Raises:
        StoreError: the store records no valid splits, its splits name cases it does not hold (preprocessing was
            interrupted), or ``splits.file`` disagrees with them.
    """
    splits = store.metadata.get("splits")
    try:
        check_splits(splits, store.case_ids())
    except ValueError as exc:
        raise StoreError(
            f"{store.location}: the store's splits are unusable ({exc}); run `make cache` (teachcache preprocess) "
            "to finish the store, or rebuild it with --overwrite"
        ) from None
    configured = cfg.splits.file
    if configured is None:
        _warn_edited_copy(cfg.output.runs_dir / "splits_final.json", splits, store.location)
    if configured is not None and configured.is_file():
        difference = splits_difference(load_splits(configured), splits, ("the file", "the store"))
        if difference:
            raise StoreError(
                f"splits.file {configured} disagrees with the folds recorded in {store.location} ({difference}); "
                "the store's folds are the ones its cases and teachers were prepared for: point splits.file at "
                "the file the store was made with, remove splits.file to use the store's folds, or rebuild the "
                "store from this file with `make cache ARGS=--overwrite`"
            )
    return splits


class SplitsCopyWarning(UserWarning):
    """The runs folder's ``splits_final.json`` holds other folds than the store it is a copy of."""


_WARNED_COPIES: set[tuple[str, str]] = set()


def _warn_edited_copy(copy: Path, splits: list[dict[str, list[str]]], location: str) -> None:
    """Warn, once per process and difference, when the runs folder's nnU-Net copy of the folds was edited."""
    if not copy.is_file():
        return
    try:
        difference = splits_difference(load_splits(copy), splits, ("the copy", "the store"))
    except (ValueError, TeachCacheError) as exc:
        difference = f"it cannot be read: {exc}"
    if not difference or (str(copy), difference) in _WARNED_COPIES:
        return
    _WARNED_COPIES.add((str(copy), difference))
    warnings.warn(
        SplitsCopyWarning(
            f"{copy} differs from the folds recorded in {location} ({difference}); it is only a copy for tools "
            "that read nnU-Net's file and is not used: every stage trains on the store's folds. To train on the "
            "edited folds, set splits.file to it and rebuild the store (`make cache ARGS=--overwrite`); otherwise "
            "delete it and `teachcache preprocess` writes the store's folds there again"
        ),
        stacklevel=3,
    )


def fold_split(cfg: Config, store: TeacherStore, fold: int) -> tuple[list[str], list[str]]:
    """``(train, val)`` case ids of ``fold``, from the store's own splits (see :func:`store_splits`).

    Raises:
        StoreError: see :func:`store_splits`.
        ConfigError: ``fold`` does not exist.
    """
    return fold_cases(store_splits(cfg, store), fold)


def entry_key(
    cfg: Config, teacher: TeacherConfig, checkpoint_sha256: str, store: TeacherStore
) -> dict[str, Any]:
    """Everything a (teacher, case) entry is computed from, as a canonical JSON-able dict.

    ``teachcache cache`` writes it (and its :func:`core.store.provenance.entry_hash`) into every entry and recomputes an entry
    whose hash differs from the wanted one; stage 2 and ``teachcache verify`` compare entries with it. The case's
    own content is fixed by the store (its preprocessing hash and dataset manifest).

    Args:
        cfg: the experiment.
        teacher: the teacher the entry is (to be) computed with.
        checkpoint_sha256: SHA-256 of the teacher's checkpoint file.
        store: the store the entry lives in (its preprocessing hash and softmax encoding).

    Returns:
        ``{"checkpoint_sha256", "arch", "args", "inference", "attention_p", "feature_sketch_channels",
        "feature_sketch_stride", "feature_sketch_dtype", "softmax_encoding", "margin_reference",
        "preprocessing_hash"}``.
    """
    encoding = store.encoding
    key = {
        "checkpoint_sha256": checkpoint_sha256,
        "arch": teacher.arch,
        "args": teacher.args,
        # sw_batch_size only batches windows: it changes no output, so it does not make an entry stale
        "inference": cfg.inference_for(teacher).model_dump(mode="json", exclude={"sw_batch_size"}),
        "attention_p": float(cfg.distillation.attention.p),
        "feature_sketch_channels": cfg.store.feature_sketch_channels,
        "feature_sketch_stride": cfg.store.feature_sketch_stride
        if cfg.store.feature_sketch_channels
        else None,
        "feature_sketch_dtype": cfg.store.feature_sketch_dtype if cfg.store.feature_sketch_channels else None,
        "softmax_encoding": encoding.name,
        "margin_reference": encoding.reference if encoding.kind.startswith("margin") else None,
        "preprocessing_hash": store.metadata["preprocessing_hash"],
        **teacher_entry_fields(
            teacher
        ),  # a teacher fed its own way: its preprocessing, channels, bundle config
    }
    return json.loads(json.dumps(key))  # as it reads back from the store's JSON (tuples become lists)


class RawDataChangedWarning(UserWarning):
    """The raw dataset at ``dataset.raw_dir`` is not the one the store was preprocessed from."""


def raw_dataset_status(cfg: Config, store: TeacherStore) -> str:
    """Compare the raw dataset, when it is at hand, with the one the store was preprocessed from.

    Policy (docs/store-format.md): stage 2 trains on the store's own preprocessed copy, which is self-consistent
    and may travel without the raw data, so a changed or missing raw dataset does not stop training. A change is
    warned about (:class:`RawDataChangedWarning`) and recorded in the run's ``summary.json`` and checkpoint.

    Returns:
        ``"matches"``, ``"differs"`` (warned), or ``"unavailable"`` (no readable dataset at ``dataset.raw_dir``).
    """

    try:
        current = read_dataset(cfg.dataset).manifest_hash()
    except (DatasetError, OSError):
        return "unavailable"
    if current == store.metadata["dataset"]["manifest_hash"]:
        return "matches"
    warnings.warn(
        RawDataChangedWarning(
            f"the raw dataset at {cfg.dataset.raw_dir} changed since {store.location} was preprocessed (a file "
            "added, removed or edited); the student trains on the store's copy, as preprocessed then. To train on "
            "the current data, rebuild the store: `make cache ARGS=--overwrite` (after `teachcache preprocess "
            "--overwrite`). Recorded in the run as raw_dataset: differs"
        ),
        stacklevel=2,
    )
    return "differs"
