"""Preprocess every case of the raw dataset once and write it into the store, with the fold splits."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from core.config import Config
from core.data.layout import RawDataset
from core.data.layouts import read_dataset
from core.data.preprocessing import build_preprocessing, foreground_locations, preprocess_case
from core.data.splits import load_splits, make_splits, splits_difference, write_splits
from core.errors import DatasetError, StoreError, TeachCacheError
from core.experiment import splits_path
from core.progress import track
from core.store.locking import read_only_store, store_write_lock
from core.store.teacher_store import TeacherStore, unreachable_store

__all__ = ["PreprocessSummary", "preprocess_dataset"]


@dataclass(frozen=True)
class PreprocessSummary:
    cases: int
    written: int
    skipped: int
    seconds: float
    splits_file: str


def preprocess_dataset(cfg: Config, overwrite: bool = False, progress: bool = True) -> PreprocessSummary:
    """Write every case of ``cfg.dataset.raw_dir`` into the store, preprocessed; skip cases already there.

    The raw dataset is only read. Splits come from ``splits.file`` when set, else from an existing
    ``splits_final.json`` in the runs folder, else are made (seeded). The store records them (its ``splits``
    attribute, which stage 2 reads); ``splits_final.json`` in the runs folder is written as a copy when absent.

    Raises:
        DatasetError: the raw dataset is malformed (the message names the file or case).
        StoreError: the store path holds another store or something else (see ``--overwrite``), or an existing
            store records other folds than the config's splits.
    """
    started = time.perf_counter()
    ds = read_dataset(cfg.dataset)
    case_ids = [c.case_id for c in ds.cases]
    patients = {c.case_id: c.patient or c.case_id for c in ds.cases}
    split_file = splits_path(cfg)
    # an nnU-Net dataset that ships its own folds (splits_final.json in raw_dir): used as they are, copied to runs
    shipped = Path(cfg.dataset.raw_dir) / "splits_final.json"
    source_file = split_file
    if (
        cfg.dataset.layout == "nnunet"
        and cfg.splits.file is None
        and not split_file.is_file()
        and shipped.is_file()
    ):
        source_file = shipped
    if cfg.splits.file is not None or source_file.is_file():
        splits, source = load_splits(source_file, case_ids, patients), str(source_file)
    else:
        splits = make_splits(case_ids, cfg.splits.num_folds, cfg.splits.seed, patients)
        source = f"splits.num_folds={cfg.splits.num_folds}, splits.seed={cfg.splits.seed}"

    store_path = cfg.store.path
    with store_write_lock(store_path, "preprocess"):
        written = _preprocess_locked(cfg, ds, splits, source, split_file, overwrite, progress)
    seconds = round(time.perf_counter() - started, 2)
    return PreprocessSummary(len(case_ids), written, len(case_ids) - written, seconds, str(split_file))


def _preprocess_locked(
    cfg: Config,
    ds: RawDataset,
    splits: list[dict[str, list[str]]],
    source: str,
    split_file: Path,
    overwrite: bool,
    progress: bool,
) -> int:
    """The part of :func:`preprocess_dataset` that writes, under the store's write lock; returns cases written."""
    store_path = cfg.store.path
    if overwrite and TeacherStore.exists(store_path):
        TeacherStore.delete(store_path)
    created = not _exists(store_path)  # nothing at all there: only then may a failure remove what was written
    try:
        written = _write_store(cfg, ds, splits, source, split_file, progress)
    except (TeachCacheError, OSError) as exc:
        # a store this run created holds nothing anyone can use: remove it, so a fixed dataset starts clean
        # (an existing store keeps its complete cases: re-running resumes)
        if created and _exists(store_path):
            _remove(store_path)
        if isinstance(exc, OSError) and read_only_store(exc, store_path, "preprocess"):
            raise  # the write lock names the read-only store or bucket
        if isinstance(exc, OSError):
            raise StoreError(
                f"cannot write the store at {store_path}: {exc.strerror or exc}"
                f"{f' ({exc.filename})' if getattr(exc, 'filename', None) else ''}. Free space or fix permissions "
                "(or set store.path to a writable location), then re-run `teachcache preprocess`"
                + ("; the partly written store was removed" if created else "; complete cases are kept")
            ) from None
        raise
    return written


def _exists(location: str) -> bool:
    """Anything at ``location``; an object store that cannot be reached is one message, not a client traceback."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(location)
        return bool(fs.exists(root))
    except Exception as exc:  # an object store's client errors (credentials, endpoint) come in many types
        if "://" in location and not location.startswith("file://"):
            raise unreachable_store(location, exc) from None
        raise


def _remove(location: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(location)
    fs.rm(root, recursive=True)


def _write_store(
    cfg: Config,
    ds: RawDataset,
    splits: list[dict[str, list[str]]],
    source: str,
    split_file: Path,
    progress: bool,
) -> int:
    """Create or reopen the store, write every missing case, then the nnU-Net splits copy; returns cases written."""
    started = time.perf_counter()
    store = _open_store(cfg, ds, splits, source)
    store.drop_consolidated()  # rebuilt by store.consolidate() below
    written = _write_cases(cfg, ds, store, progress)
    if written:
        store.update_metadata(preprocess_seconds=round(time.perf_counter() - started, 2))
    store.consolidate()
    missing = sorted({c.case_id for c in ds.cases} - set(store.case_ids()))
    if missing:
        raise StoreError(f"{cfg.store.path}: cases not written: {', '.join(missing[:5])}")
    if not split_file.is_file():  # only once every case is in: a failed run leaves no splits file behind
        write_splits(splits, split_file)  # the nnU-Net copy, for tools that read it
    return written


def _open_store(cfg: Config, ds: RawDataset, splits: list[dict[str, list[str]]], source: str) -> TeacherStore:
    """Create the store (or reopen it when it was made from the same dataset, settings and folds)."""
    dataset_meta = {
        "name": ds.name,
        "raw_dir": str(ds.root),
        "channel_names": list(ds.channel_names),
        "class_names": ds.class_names,
        "num_cases": len(ds.cases),
        "manifest_hash": ds.manifest_hash(),
        "binarise_label": ds.binarise_label,  # raw labels scored in the original geometry are binarised too
    }
    store = TeacherStore.create(
        cfg.store.path,
        dataset=dataset_meta,
        preprocessing=cfg.preprocessing.model_dump(mode="json"),
        preprocessing_hash=cfg.preprocessing_hash(),
        splits=splits,
        chunk_size=cfg.store.chunk_size,
    )
    difference = splits_difference(splits, store.metadata["splits"], ("the config's splits", "the store"))
    if difference:
        raise StoreError(
            f"{cfg.store.path} records other folds than {source} ({difference}); its teachers were prepared for "
            "the store's folds: point splits.file at the splits the store was made with, or rebuild the store "
            "with --overwrite"
        )
    return store


def _write_cases(cfg: Config, ds: RawDataset, store: TeacherStore, progress: bool) -> int:
    """Preprocess and write every case the store lacks (or holds with a lost chunk); returns how many."""
    files = len(ds.cases[0].images) if ds.cases else len(ds.channel_names)
    pipeline = build_preprocessing(cfg.preprocessing, ds.channel_names, files, ds.binarise_label)
    written = 0
    empty: list[str] = []
    for index, case in enumerate(track(ds.cases, "preprocessing", enabled=progress)):
        if _whole_case(store, case.case_id):
            continue
        pc = preprocess_case(pipeline, case, ds.num_classes, ds.binarise_label, ds.allow_empty_labels)
        if not pc.label.any():
            empty.append(case.case_id)
        if not pc.label.any() and len(empty) <= _EMPTY_NAMED:
            warnings.warn(
                EmptyLabelWarning(
                    f"case '{case.case_id}': {case.label} holds no foreground (every voxel is background); the "
                    "student sees only background there. Fine for a negative case; otherwise fix the label file"
                ),
                stacklevel=2,
            )
        store.write_case(
            case.case_id,
            pc.image,
            pc.label,
            foreground_locations(pc.label, seed=cfg.seed + index),
            {
                "affine": pc.affine.tolist(),
                "original_affine": pc.original_affine.tolist(),
                "original_shape": list(pc.original_shape),
                "spacing": list(cfg.preprocessing.target_spacing),
                "source_files": [str(p) for p in (*case.images, case.label)],
            },
        )
        written += 1
    if len(empty) > _EMPTY_NAMED:  # a lesion-free cohort (PI-CAI) would otherwise print hundreds of lines
        warnings.warn(
            EmptyLabelWarning(
                f"{len(empty)} cases written in all hold no foreground (the first {_EMPTY_NAMED} named above; the "
                f"others: {', '.join(empty[_EMPTY_NAMED : _EMPTY_NAMED + 5])}…)"
            ),
            stacklevel=2,
        )
    _refuse_all_empty(store, ds)
    return written


def _whole_case(store: TeacherStore, case_id: str) -> bool:
    """A case already written whole: complete, no chunk file lost, its metadata readable (else it is rewritten)."""
    if store.group_state(f"cases/{case_id}") != "complete":
        return False
    try:
        return not store.missing_chunks(f"cases/{case_id}")
    except StoreError:  # an array's metadata is damaged
        return False


def _refuse_all_empty(store: TeacherStore, ds: RawDataset) -> None:
    """A dataset whose every label is background has nothing to segment: refuse it (the store this run created is
    removed by the caller)."""
    cases = store.case_ids()
    if cases and all(store.read_foreground(c).shape[0] == 0 for c in cases):
        example = next((c.label for c in ds.cases), None)
        raise DatasetError(
            f"every one of the {len(cases)} cases' labels is background only (e.g. {example}): there is nothing to "
            f"segment. Check the label files and the class labels the dataset under {ds.root} declares"
        )


_EMPTY_NAMED = 10  # empty cases warned about one by one; the rest in one line


class EmptyLabelWarning(UserWarning):
    """A case's label holds no foreground voxel."""
