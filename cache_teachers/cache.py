"""Run each teacher once over every case and write its softmax and attention maps into the store.

The unit of work is one (teacher, case) entry, computed and written by :func:`compute_entry` from the
:class:`EntryJob` of its teacher copy: the store key, checkpoint hash and entry key, resolved once while planning. Entries run either
in this process (one teacher in memory at a time) or as tasks on a dask.distributed cluster — a LocalCluster of
``workers`` processes, or any scheduler address. Each entry owns its own arrays (its own chunk files), so
workers never write to the same object; metadata is consolidated once, after every task has finished.

Every entry records its entry key (:func:`core.experiment.entry_key`: checkpoint hash, architecture and arguments,
inference settings, attention power, sketch width, softmax encoding, preprocessing hash) and that key's hash; an
entry is skipped only when it is complete and its ``entry_hash`` is the one the current config and checkpoint give.

Testing hook: with ``TEACHCACHE_TEST_KILL_AFTER_ENTRIES=N`` in the environment, a process that has written N entries
SIGKILLs itself midway through the next one (after its ``softmax`` array, before ``complete``; with
``TEACHCACHE_TEST_KILL_AT=chunk_digests``, after its last array, as its chunk digests are being recorded), so the
kill-and-resume test interrupts the store at a known point. Each dask worker process counts its own entries.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.config import Config, TeacherConfig
from core.errors import CheckpointError, ConfigError, StoreError, TeachCacheError
from core.experiment import entry_key, open_store_for, store_splits
from core.inference import aligned_overlap, resolve_device
from core.models.checkpoint import file_sha256
from core.progress import track
from core.store.locking import read_only_store, store_write_lock
from core.store.provenance import entry_hash
from core.store.sketch import relation_errors, sketch_features
from core.store.teacher_store import TeacherStore
from core.teachers.base import (
    LoadedTeacher,
    ServedDataset,
    TeacherRun,
    check_teacher_windows,
    load_teacher,
    teacher_outputs,
)

__all__ = [
    "KILL_AFTER_ENTRIES_ENV",
    "KILL_AT_ENV",
    "CacheSummary",
    "EntryJob",
    "cache_teachers",
    "cache_units",
    "compute_entry",
]

KILL_AFTER_ENTRIES_ENV = "TEACHCACHE_TEST_KILL_AFTER_ENTRIES"
KILL_AT_ENV = "TEACHCACHE_TEST_KILL_AT"


@dataclass
class CacheSummary:
    """Per teacher: entries written, entries skipped (already complete), and seconds."""

    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _software() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("teachcache", "torch", "monai", "zarr", "numcodecs", "numpy")},
    }


# Per-process state of entry tasks: the open store and the one teacher currently in memory.
_PROCESS: dict[str, Any] = {}
# Entries this process has written, for the kill testing hook (kept apart from _PROCESS, which is cleared per teacher).
_ENTRIES_WRITTEN = [0]


def _kill_hook() -> Callable[[str], None] | None:
    """The testing hook (module docstring): a callback that SIGKILLs this process, when this entry is the one."""
    value = os.environ.get(KILL_AFTER_ENTRIES_ENV)
    if not value:
        return None
    try:
        after = int(value)
    except ValueError:
        raise ConfigError(f"{KILL_AFTER_ENTRIES_ENV}={value!r} must be a whole number of entries") from None
    if _ENTRIES_WRITTEN[0] != after:
        return None
    at = os.environ.get(KILL_AT_ENV) or "softmax"

    def kill(array: str) -> None:
        if array == at:  # some arrays written (or all, before their digests), and `complete` not yet set
            os.kill(os.getpid(), signal.SIGKILL)

    return kill


def _bound(cfg: Config, name: str, fold: int | None) -> TeacherConfig:
    """The configured teacher ``name``, with fold ``fold``'s checkpoint when it has one per fold."""
    teacher = cfg.teacher(name)
    return teacher.for_fold(fold) if fold is not None else teacher


def _load_teacher(
    teacher: TeacherConfig, dataset_meta: dict[str, Any], fold_val: list[str] | None = None
) -> LoadedTeacher:
    names = list(dataset_meta["channel_names"])
    return load_teacher(teacher, ServedDataset(names, len(dataset_meta["class_names"]), fold_val))


def _process_model(cfg: Config, teacher: TeacherConfig, sha: str, device: torch.device) -> LoadedTeacher:
    key = (teacher.name, sha)
    if _PROCESS.get("model_key") != key:
        _PROCESS.pop("model", None)  # free the previous teacher first
        loaded = _load_teacher(teacher, _process_store(cfg).metadata["dataset"])
        loaded.model = loaded.model.to(device)
        _PROCESS["model"], _PROCESS["model_key"] = loaded, key
    return _PROCESS["model"]


def _process_store(cfg: Config) -> TeacherStore:
    if _PROCESS.get("store_key") != cfg.store.path:
        _PROCESS["store"] = TeacherStore.open(cfg.store.path, mode="a", chunk_size=cfg.store.chunk_size)
        _PROCESS["store_key"] = cfg.store.path
    return _PROCESS["store"]


def release_process_state() -> None:
    """Drop this process's teacher and store handles."""
    _PROCESS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _entry_device(cfg: Config) -> torch.device:
    device = resolve_device(cfg.training.device)
    try:  # on a dask worker: one GPU per worker, one thread per worker
        from distributed import get_worker

        worker = get_worker()
        torch.set_num_threads(max(1, worker.state.nthreads))
        if device.type == "cuda":
            index = int(str(worker.name).rsplit("-", 1)[-1]) if str(worker.name)[-1:].isdigit() else 0
            device = torch.device("cuda", index % torch.cuda.device_count())
    except (ImportError, ValueError):
        pass
    return device


@dataclass(frozen=True)
class EntryJob:
    """What every entry of one teacher copy is computed from, resolved once while planning (and sent to workers).

    Attributes:
        teacher_name: the configured teacher.
        fold: the fold whose checkpoint is used (``None`` for a teacher with one checkpoint for every fold).
        store_key: the copy's key in the store, ``<name>/fold_<k>`` or ``<name>/all_folds``.
        sha: SHA-256 of the checkpoint file (checked when the run was planned).
        entry_key: :func:`core.experiment.entry_key` of the copy, the same for each of its cases.
    """

    teacher_name: str
    fold: int | None
    store_key: str
    sha: str
    entry_key: dict[str, Any]


def compute_entry(cfg: Config, job: EntryJob, case_id: str) -> str:
    """Compute one teacher's outputs for one case and write them as a complete store entry.

    Runs in the calling process or on a dask worker; either way it opens the store itself. (The in-process loop of
    :func:`cache_teachers` instead calls :func:`prepare_entry` and writes each entry on a writer thread while the
    teacher runs on the next case.)

    Returns:
        ``case_id``, for progress reporting.

    Raises:
        StoreError: the store cannot be written (full disk, read-only destination); entries already complete
            are untouched and this one stays incomplete, so re-running resumes.
    """
    prepare_entry(cfg, job, case_id)()
    return case_id


def prepare_entry(cfg: Config, job: EntryJob, case_id: str) -> Callable[[], None]:
    """Run the teacher on one case (inference, taps, sketches) and return the call that writes the entry."""
    teacher = _bound(cfg, job.teacher_name, job.fold)
    device = _entry_device(cfg)
    store = _process_store(cfg)
    loaded = _process_model(cfg, teacher, job.sha, device)
    k = cfg.store.feature_sketch_channels
    out = teacher_outputs(TeacherRun(cfg, teacher, loaded, store, device, features=k is not None), case_id)
    _check_finite_outputs(out, teacher.name, case_id)
    sketches = _sketches(out, k, cfg.store.feature_sketch_stride) if k is not None else None
    return functools.partial(_write_entry, cfg, store, job, case_id, out, sketches)


def _write_entry(
    cfg: Config,
    store: TeacherStore,
    job: EntryJob,
    case_id: str,
    out: dict[str, np.ndarray],
    sketches: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]] | None,
) -> None:
    try:
        store.write_entry(
            job.store_key,
            case_id,
            out["logits"],
            out["coarse"],
            out["fine"],
            sketches,
            on_array=_kill_hook(),
            sketch_dtype=cfg.store.feature_sketch_dtype,
            checkpoint_sha256=job.sha,
            feature_sketch_channels=cfg.store.feature_sketch_channels,
            entry_key=job.entry_key,
            entry_hash=entry_hash(job.entry_key),
        )
    except OSError as exc:
        refused = read_only_store(exc, cfg.store.path, "cache")
        if refused:
            raise refused from None
        raise StoreError(
            f"cannot write teacher '{job.store_key}', case '{case_id}' to {cfg.store.path}: "
            f"{exc.strerror or exc}. Free space or fix permissions, then re-run `make cache` to resume; "
            "complete entries are kept"
        ) from None
    _ENTRIES_WRITTEN[0] += 1


def _check_finite_outputs(out: dict[str, np.ndarray], teacher: str, case_id: str) -> None:
    """Refuse a teacher output holding NaN or Inf before anything of the entry is written."""
    bad = {name: int((~np.isfinite(a)).sum()) for name, a in out.items() if not np.isfinite(a).all()}
    if bad:
        listing = ", ".join(f"{name} ({n} of {out[name].size} values)" for name, n in bad.items())
        raise TeachCacheError(
            f"teacher '{teacher}' produced NaN or Inf on case '{case_id}': {listing}; nothing was written for this "
            "entry. Check the checkpoint (a diverged training), the case's image (`teachcache verify STORE`), or set "
            "training.amp: false (float16 overflow)"
        )


def _pool_to_stride(features: np.ndarray, case_shape: tuple[int, ...], min_stride: int) -> np.ndarray:
    """Average-pool (C, x, y, z) tap features whose stride is below ``min_stride`` by the integer factor that brings
    it there (a partial last cell averages the voxels it has)."""
    factors = [
        max(1, min_stride // max(1, s // m)) for s, m in zip(case_shape, features.shape[1:], strict=True)
    ]
    if all(f == 1 for f in factors):
        return features
    pooled = F.avg_pool3d(torch.from_numpy(np.ascontiguousarray(features))[None], factors, ceil_mode=True)
    return pooled[0].numpy()


def _sketches(
    out: dict[str, np.ndarray], k: int, min_stride: int = 1
) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """Sketch both taps' features (pooled to ``min_stride`` first); record kept energy and how well cosine
    relations survive."""
    predicted = out["logits"].argmax(axis=0)
    result = {}
    for kind in ("coarse", "fine"):
        features = _pool_to_stride(out[f"{kind}_features"], predicted.shape, min_stride)
        sketch, basis, attrs = sketch_features(features, k)
        stride = [s // m for s, m in zip(predicted.shape, features.shape[1:], strict=True)]
        # the teacher's predicted class at the centre of each tap voxel, for class prototypes
        centre = tuple(slice(st // 2, None, st) for st in stride)
        classes = predicted[centre][tuple(slice(0, m) for m in features.shape[1:])]
        errors = relation_errors(features, sketch, classes)
        result[kind] = (sketch, basis, {"method": "pca-uncentred-per-case", **attrs, **errors})
    return result


def _describe(teacher: TeacherConfig, loaded: LoadedTeacher, inference: Any) -> dict[str, Any]:
    """The parts of a loaded teacher its provenance records: network class, taps, window."""
    return {
        "arch": teacher.arch or type(loaded.model).__name__,
        "taps": {k: {"module": t.module, "stride": t.stride} for k, t in loaded.spec.taps.items()},
        "inference": inference.model_dump(mode="json"),
        "inference_overlap_used": list(aligned_overlap(loaded.spec, inference)),
    }


def _provenance(cfg: Config, plan: _CopyPlan, store: TeacherStore) -> dict[str, Any]:
    """The teacher copy's provenance, describing the last caching run; each entry records its own ``entry_key``.

    ``plan.described``: what planning found when it loaded the teacher (:func:`_describe`), so it is not loaded
    again.
    """
    meta = store.metadata
    teacher, fold, ckpt_meta, sha, described, key = (
        plan.teacher,
        plan.job.fold,
        plan.ckpt_meta,
        plan.job.sha,
        plan.described,
        plan.job.entry_key,
    )
    return {
        "name": teacher.name,
        "slot": plan.job.store_key.rsplit("/", 1)[1],
        "cached_for_fold": fold,
        "kind": teacher.kind,
        "bundle": str(teacher.bundle) if teacher.bundle is not None else None,
        "teacher_preprocessing": teacher.preprocessing.model_dump(mode="json")
        if teacher.preprocessing
        else None,
        "channels": teacher.channels,
        "arch": described["arch"],
        "args": teacher.args,
        "in_channels": len(meta["dataset"]["channel_names"]),
        "out_channels": len(meta["dataset"]["class_names"]),
        "class_names": meta["dataset"]["class_names"],
        "checkpoint_path": str(teacher.checkpoint),
        "checkpoint_sha256": sha,
        "fold": ckpt_meta.get("fold"),
        "train_cases": ckpt_meta.get("train_cases"),
        "splits_file": ckpt_meta.get("splits_file"),
        "val_cases": ckpt_meta.get("val_cases"),
        "val_mean_dice": ckpt_meta.get("val_mean_dice"),
        "holdout_mean_dice": ckpt_meta.get("holdout_mean_dice"),
        "holdout_dice_per_class": ckpt_meta.get("holdout_dice_per_class"),
        "holdout_cases": ckpt_meta.get("holdout_cases"),
        "taps": described["taps"],
        "attention_p": cfg.distillation.attention.p,
        "feature_sketch_channels": cfg.store.feature_sketch_channels,
        "inference": described["inference"],
        "inference_overlap_used": described["inference_overlap_used"],
        "preprocessing_hash": meta["preprocessing_hash"],
        "dataset_manifest_hash": meta["dataset"]["manifest_hash"],
        "entry_key": key,
        "entry_hash": entry_hash(key),
        "software": _software(),
    }


def _client(workers: int | None, scheduler: str | None):
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    return Client(cluster)


def cache_teachers(
    cfg: Config,
    overwrite: bool = False,
    names: list[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
    scheduler: str | None = None,
    folds: list[int] | None = None,
) -> CacheSummary:
    """Cache every configured teacher (or those in ``names``) over every case of the store.

    A teacher whose ``checkpoint`` holds ``{fold}`` has one checkpoint per fold and is cached once per fold, under
    ``<name>/fold_<k>``; a teacher with one checkpoint is cached once, under ``<name>/all_folds``. Every checkpoint
    is loaded and checked against its declared architecture (and, for a per-fold teacher, against the fold it
    records) before anything is written. An entry is skipped when it is complete and its ``entry_hash`` equals the
    one the current config and checkpoint bytes give (:func:`core.experiment.entry_key`), unless ``overwrite``;
    any other entry is rewritten whole.

    Args:
        cfg: the experiment.
        overwrite: recompute complete entries too.
        names: only these teachers.
        progress: show progress bars.
        workers: run entries on a LocalCluster of this many worker processes (``None``: in this process).
        scheduler: run entries on the dask.distributed cluster at this address instead.
        folds: the folds whose per-fold teachers to cache; ``None``: every fold for which the teacher's checkpoint
            exists (at least one must).

    Raises:
        StoreError: the store is missing, stale, cannot be written, or is being written by another process (its
            write lock, :func:`core.store.locking.store_write_lock`, is held for the whole run).
        CheckpointError: a checkpoint is missing, unsafe, made for another fold, or does not fit its declared
            architecture.
        ConfigError: no teachers configured, a fold the store's splits do not have, window settings a network
            cannot use, or an unreachable scheduler.
    """
    # the lock first: a second run is refused with the holder's name whatever state the first left the store in
    with store_write_lock(cfg.store.path, "cache"):
        store = open_store_for(cfg, mode="a")
        return _cache_locked(cfg, store, overwrite, names, progress, workers, scheduler, folds)


def cache_units(
    cfg: Config, store: TeacherStore, names: list[str] | None, folds: list[int] | None
) -> list[tuple[TeacherConfig, int | None]]:
    """The (teacher, fold) copies a caching run writes: per-fold teachers bound to each fold, others once (fold
    ``None``).

    Raises:
        ConfigError: no teachers, or a fold outside the store's splits.
        CheckpointError: ``folds`` is ``None`` and a per-fold teacher has a checkpoint for no fold.
    """
    teachers = [cfg.teacher(n) for n in names] if names else list(cfg.teachers)
    if not teachers:
        raise ConfigError("no teachers in the config: add entries under 'teachers'")
    num_folds = len(store_splits(cfg, store))
    for fold in folds or []:
        if not 0 <= fold < num_folds:
            raise ConfigError(
                f"fold {fold} does not exist: {store.location} was split into {num_folds} folds (0–{num_folds - 1})"
            )
    units: list[tuple[TeacherConfig, int | None]] = []
    for teacher in teachers:
        if not teacher.per_fold:
            units.append((teacher, None))
            continue
        wanted = (
            folds
            if folds is not None
            else [k for k in range(num_folds) if teacher.for_fold(k).checkpoint.is_file()]
        )
        if not wanted:
            raise CheckpointError(
                f"teacher '{teacher.name}': no checkpoint for any fold ({teacher.for_fold(0).checkpoint} … "
                f"{teacher.for_fold(num_folds - 1).checkpoint} are all missing); train it (`make teachers FOLD=0`) "
                "or point teachers[].checkpoint at your weights"
            )
        units += [(teacher.for_fold(k), k) for k in wanted]
    return units


def _check_fold(teacher: TeacherConfig, fold: int | None, ckpt_meta: dict[str, Any]) -> None:
    """A per-fold teacher's checkpoint must not say it was trained for another fold."""
    made_for = ckpt_meta.get("fold")
    if fold is not None and made_for is not None and made_for != fold:
        raise CheckpointError(
            f"teacher '{teacher.name}': {teacher.checkpoint} is the checkpoint for fold {fold}, but it records being "
            f"trained for fold {made_for}; its fold-{fold} student would learn from a teacher that saw its "
            f"validation cases. Train fold {fold}'s teacher (`make teachers FOLD={fold}`) or fix the path"
        )


@dataclass
class _CopyPlan:
    """One teacher copy's work, found while planning: what to compute, and what its provenance records."""

    teacher: TeacherConfig
    job: EntryJob  # store key, checkpoint hash and entry key, shared by every entry of the copy
    ckpt_meta: dict[str, Any]
    todo: list[str]  # the cases whose entries are (re)computed
    described: dict[str, Any]  # :func:`_describe`

    @property
    def key(self) -> str:
        """The copy's store key, ``<name>/fold_<k>`` or ``<name>/all_folds``."""
        return self.job.store_key


def _plan_copy(
    cfg: Config,
    store: TeacherStore,
    teacher: TeacherConfig,
    fold: int | None,
    case_ids: list[str],
    overwrite: bool,
) -> _CopyPlan:
    """Load and check one teacher copy (fold, window), and find the entries to compute; nothing is kept in memory."""
    splits = store.metadata.get("splits") or []
    fold_val = splits[fold]["val"] if fold is not None and fold < len(splits) else None
    loaded = _load_teacher(teacher, store.metadata["dataset"], fold_val)
    run = TeacherRun(cfg, teacher, loaded, store)
    _check_fold(teacher, fold, loaded.meta)
    check_teacher_windows(run, case_ids)
    sha = file_sha256(teacher.checkpoint)
    job = EntryJob(teacher.name, fold, teacher.store_key(fold or 0), sha, entry_key(cfg, teacher, sha, store))
    key, wanted = job.store_key, entry_hash(job.entry_key)
    todo = [c for c in case_ids if overwrite or _stale_entry(store, key, c, wanted)]
    return _CopyPlan(teacher, job, loaded.meta, todo, _describe(teacher, loaded, run.inference))


def _stale_entry(store: TeacherStore, key: str, case_id: str, wanted: str) -> bool:
    """An entry to (re)compute: absent, incomplete, computed from another entry key, with a lost chunk file, or with
    metadata that cannot be read (a truncated ``zarr.json``: rewritten whole, like a missing one)."""
    path = f"teachers/{key}/{case_id}"
    if store.group_state(path) != "complete":
        return True
    try:
        return store.entry_attrs(key, case_id).get("entry_hash") != wanted or bool(store.missing_chunks(path))
    except StoreError:  # an array's metadata is damaged
        return True


def _run_here(cfg: Config, plan: _CopyPlan, label: str, progress: bool) -> None:
    """Compute a copy's entries in this process.

    One writer thread: case i is encoded and written while the teacher runs on case i + 1 (at most one entry waits,
    so memory stays at two cases' outputs); a write error surfaces at the next case.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="teachcache-writer") as writer:
        pending: Future | None = None
        for case_id in track(plan.todo, label, enabled=progress):
            write = prepare_entry(cfg, plan.job, case_id)
            if pending is not None:
                pending.result()
            pending = writer.submit(write)
        if pending is not None:
            pending.result()
    release_process_state()


def _run_on_cluster(client: Any, cfg: Config, plan: _CopyPlan, label: str, progress: bool) -> None:
    """Compute a copy's entries as tasks on the dask cluster; a worker's error is raised here."""
    from distributed import as_completed

    n = len(plan.todo)
    futures = client.map(compute_entry, [cfg] * n, [plan.job] * n, plan.todo, pure=False)
    for future in track(as_completed(futures), label, total=n, enabled=progress):
        future.result()  # re-raises a worker's error here


def _cache_copy(cfg: Config, store: TeacherStore, plan: _CopyPlan, client: Any, progress: bool) -> float:
    """Write a copy's provenance, compute its entries, record the time taken; returns the seconds."""
    started = time.perf_counter()
    provenance = _provenance(cfg, plan, store)
    if not plan.todo and plan.key in store.teacher_keys():  # a no-op run keeps the last run's time
        previous = store.teacher_metadata(plan.key).get("cache_seconds")
        if previous is not None:
            provenance["cache_seconds"] = previous
    existed = plan.key in store.teacher_keys()
    store.write_teacher_metadata(plan.key, provenance)
    label = f"caching {plan.key}"
    try:
        if client is None:
            _run_here(cfg, plan, label, progress)
        else:
            _run_on_cluster(client, cfg, plan, label, progress)
    except BaseException:
        if not existed:  # a copy this run began and not one entry finished: nothing is left behind
            with contextlib.suppress(Exception):  # never hide the error that stopped the run
                store.remove_empty_teacher_copy(plan.key)
        raise
    seconds = round(time.perf_counter() - started, 2)
    if plan.todo:
        prov = store.teacher_metadata(plan.key)
        store.write_teacher_metadata(plan.key, {**prov, "cache_seconds": seconds})
    return seconds


def _close(client: Any) -> None:
    """Close a dask client and the cluster it started."""
    cluster = client.cluster
    client.close()
    if cluster is not None:
        cluster.close()


def _cache_locked(
    cfg: Config,
    store: TeacherStore,
    overwrite: bool,
    names: list[str] | None,
    progress: bool,
    workers: int | None,
    scheduler: str | None,
    folds: list[int] | None,
) -> CacheSummary:
    """The body of :func:`cache_teachers`, run under the store's write lock: plan every copy (each teacher checked
    before anything is written), then compute each copy's entries and consolidate the metadata."""
    case_ids = store.case_ids()
    units = cache_units(cfg, store, names, folds)
    plans = [_plan_copy(cfg, store, teacher, fold, case_ids, overwrite) for teacher, fold in units]
    store.drop_consolidated()  # rebuilt by store.consolidate() below
    summary = CacheSummary()
    client = _client(workers, scheduler) if (workers or scheduler) else None
    try:
        for plan in plans:
            seconds = _cache_copy(cfg, store, plan, client, progress)
            summary.written[plan.key] = len(plan.todo)
            summary.skipped[plan.key] = len(case_ids) - len(plan.todo)
            summary.seconds[plan.key] = seconds
    finally:
        if client is not None:
            _close(client)
    store.consolidate()
    return summary
