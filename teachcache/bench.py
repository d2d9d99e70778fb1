"""``make bench``: what the cache buys, measured as ratios taken side by side in one run.

One run measures, for a preset (``cpu``: the demo's sizes; ``gpu``: the paper's; ``gpu-smoke``: the GPU preset's
code path at a reduced size, for the test suite):

1. **Training steps** of the same student, batch and patch (median over many steps after warm-up), each
   configuration in its own fresh process with PyTorch's threads fixed: (a) plain supervised, (b) distilled from
   the cache (TeachFormer's terms; also the relation and MSKD recipes), (c) distilled online with the fold's
   teachers in memory on the bare patch, and (c_context) online with the cache's own windows around each patch.
   Each step is :func:`core.training.loop.train_step`, the training loop's own; timed once with the batch already
   in memory (compute) and once including the wait for the loader, with each loader worker count of the preset
   (cpu: 0, 1, 2). The verdicts use the step with loading, each arm at its fastest worker count.
2. **Peak memory** of each: CUDA peak allocated on a GPU, peak RSS of the process on a CPU.
3. **The store**: stored bytes per case voxel per teacher of every array kind, files per case, the softmax
   encoding's KL at T = 1, 2, 4, and the whole store extrapolated to a HECKTOR-sized dataset.
4. **The cache stage**: ``cache_teachers`` into a scratch store against the same teachers' bare sliding-window
   inference over the same cases, with the writer's phases timed one by one (taps, sketches, encode + write).
5. **Amortisation**: "cache once + k students" against "k online students" for k = 1, 3, 10 — the cache stage
   and one whole cached and one whole online-patch student run measured, k = 3 and 10 from those per-run costs,
   the online-context run from its step time — and the break-even k.
6. **The patch loader at the paper's sizes**: a store of 144³ cases with three teachers' every array (written
   directly, no teacher run), patches of 128³ and 96³, batch 2, 0/2/4 workers: patches per second.
7. **Integrity**: the loader's patches per second on that store with its chunks' CRC-32C checked against a copy
   without the codec (interleaved rounds, 0 workers), and the digest check ``distil`` runs before training: its
   seconds on that store, on the demo's fold 0, and extrapolated to a HECKTOR-sized store.

Results go to ``bench/results-<preset>.json`` and ``bench/results-<preset>.md`` (the machine in the header), and a
chart ``bench/results-<preset>.png``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BENCH_PARTS",
    "HECKTOR",
    "PRESETS",
    "bench_amortise",
    "bench_cache_stage",
    "bench_integrity",
    "bench_loader",
    "bench_steps",
    "bench_store",
    "break_even",
    "machine",
    "run_bench",
    "write_paper_store",
]

# what one run measures, in order (``--part`` picks some; the others are carried from the last results)
BENCH_PARTS = ("steps", "store", "cache", "amortise", "loader", "integrity")

# A HECKTOR-sized dataset, for extrapolating the store's size: 224 training cases of 144³ after cropping, 3 teachers
HECKTOR = {"cases": 224, "shape": (144, 144, 144), "teachers": 3}

# the paper-size loader's sizes, the same in both presets (they differ in how many cases and batches)
PAPER_LOADER: dict[str, Any] = {"shape": (144, 144, 144), "patches": (128, 96), "workers": (0, 2, 4)}

# how many students "cache once + k students" is weighed against "k online students" for
AMORTISE_K = (1, 3, 10)

# the presets: the experiment whose student and teachers are timed, how long, the loader workers the steps are
# timed with (PyTorch's threads fixed at ``threads``, None: the machine's cores), and the paper-size loader's settings
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "config": "configs/demo.yaml",
        "recipes": {"relation": "configs/ablations/relation.yaml", "mskd": "configs/ablations/mskd.yaml"},
        "steps": 40,
        "warmup": 8,
        "step_workers": (0, 1, 2),
        "context_steps": 8,  # online-context runs up to 27 windows per teacher per patch: fewer steps, same median
        "threads": None,
        "loader": {"cases": 4, **PAPER_LOADER, "batches": 6},
    },
    "gpu": {
        "config": "configs/bench-gpu.yaml",
        "recipes": {},
        "steps": 60,
        "warmup": 10,
        "step_workers": (0, 2, 4),
        "context_steps": 10,
        "threads": None,
        "loader": {"cases": 6, **PAPER_LOADER, "batches": 10},
    },
    # the GPU preset's code path on a CPU in under a minute (tests/test_bench.py): the paper's architectures at a
    # reduced size (configs/bench-gpu-smoke.yaml), every part, a few steps; its numbers mean nothing
    "gpu-smoke": {
        "config": "configs/bench-gpu-smoke.yaml",
        "recipes": {},
        "steps": 2,
        "warmup": 1,
        "step_workers": (0,),  # a worker process costs seconds to start; the cpu preset times 0, 1 and 2
        "context_steps": 1,
        "threads": 1,
        "isolate": False,  # every arm in one spawned process: its peak memory is not its own
        "loader": {
            "cases": 1,
            "shape": (64, 64, 64),
            "patches": (32,),
            "workers": (0,),
            "batches": 1,
            "rounds": 1,
        },
    },
}

# presets whose teachers are randomly initialised when missing (speed does not depend on the weights)
RANDOM_TEACHER_PRESETS = ("gpu", "gpu-smoke")


def _cores() -> int:
    """The cores this process may run on (affinity and cpusets, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    """The machine and library versions, for the results' header."""
    import monai
    import torch
    import zarr

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": _cores(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }


# --- 1 and 2: training steps, each configuration in a fresh process ---------------------------------------------


def _time_steps(
    config: str,
    fold: int,
    kd: str | None,
    source: str,
    steps: int,
    warmup: int,
    workers: tuple[int, ...] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """In a fresh process: build the run as ``make distil`` does, then time ``warmup + steps`` training steps with
    each loader worker count of ``workers`` (``None``: the run's configured workers), PyTorch's threads fixed."""
    import torch

    from core.config import load_config
    from core.training.run import resolve_num_workers
    from train_student.distil import student_run

    torch.set_num_threads(threads or _cores())
    torch.manual_seed(0)
    cfg = load_config(config)
    rss_before = _rss_mb()
    with warnings.catch_warnings():  # the same warnings `make distil` prints; not the benchmark's business
        warnings.simplefilter("ignore")
        run = student_run(cfg, fold, kd=kd, source=source)
    counts = workers if workers is not None else (resolve_num_workers(run.cfg.num_workers, run.device),)
    compute_by: dict[int, list[float]] = {}
    with_loading: dict[int, float] = {}
    for count in counts:
        compute_by[count], total = _timed_steps(run, steps, warmup, count)
        with_loading[count] = statistics.median(total)
    # the step alone: with no loader worker beside it (workers share the cores with the step on a CPU)
    compute = compute_by[min(counts)]
    best = min(with_loading, key=with_loading.__getitem__)
    return {
        "kd": run.name.removeprefix("student "),
        "source": source,
        "config": config,
        "device": str(run.device),
        "torch_threads": torch.get_num_threads(),
        "workers": best,
        "batch_size": run.cfg.batch_size,
        "patch_size": list(run.cfg.patch_size),
        "steps": steps,
        "step_s": statistics.median(compute),
        "step_with_loading_s": with_loading[best],
        "step_with_loading_by_workers_s": {str(k): v for k, v in with_loading.items()},
        "step_by_workers_s": {str(k): statistics.median(v) for k, v in compute_by.items()},
        "step_s_iqr": [float(np.percentile(compute, 25)), float(np.percentile(compute, 75))],
        "peak_rss_mb": _rss_mb(),
        "rss_before_run_mb": rss_before,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if run.device.type == "cuda" else None,
    }


def _epoch_loader(dataset: Any, batch_size: int, workers: int, pin_memory: bool = False) -> Any:
    """A DataLoader over one epoch of a :class:`~core.data.patches.PatchDataset`, as the training loop draws it."""
    from torch.utils.data import DataLoader

    from core.data.patches import EpochSampler

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset)),
        num_workers=workers,
        multiprocessing_context="spawn" if workers > 0 else None,
        pin_memory=pin_memory,
    )


def _timed_steps(run: Any, steps: int, warmup: int, workers: int) -> tuple[list[float], list[float]]:
    """Run ``warmup + steps`` of ``run``'s training steps (:func:`train_step`, the loop's own), its batches from a
    loader with ``workers`` worker processes, on a fresh copy of the model and optimiser.

    Returns:
        ``(compute, total)``: the seconds of each step after warm-up with its batch in memory, and the same
        including the wait for the loader.
    """
    import copy

    import torch

    from core.models.taps import TapRecorder
    from core.training.loop import train_step
    from core.training.state import Optimisation

    device = run.device
    model = copy.deepcopy(run.model).to(device)
    model.train()
    opt = Optimisation.build(model, run.loss_fn, run.cfg, device)
    recorder = TapRecorder(model, run.spec.taps) if run.capture_taps else None
    run.dataset.length = (warmup + steps) * run.cfg.batch_size
    loader = _epoch_loader(run.dataset, run.cfg.batch_size, workers, pin_memory=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    compute, total = [], []
    batches = iter(loader)
    for i in range(warmup + steps):
        started = time.perf_counter()
        batch = next(batches)
        loaded = time.perf_counter()
        train_step(model, batch, run.loss_fn, opt, device, run.cfg.amp, run.target_source, recorder)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
        if i >= warmup:
            compute.append(done - loaded)
            total.append(done - started)
    del batches
    return compute, total


_SHARED_POOL: list[
    ProcessPoolExecutor
] = []  # the one spawned process of a preset that does not isolate its arms


def _in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any, isolate: bool = True) -> dict[str, Any]:
    """Run ``fn(*args)`` in a new spawned process, so its peak memory is its own; with ``isolate=False`` (the
    gpu-smoke preset, whose numbers mean nothing) in one spawned process kept for the whole bench run, which saves
    each arm the seconds of importing PyTorch."""
    if isolate:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    if not _SHARED_POOL:
        _SHARED_POOL.append(ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")))
    return _SHARED_POOL[0].submit(fn, *args).result()


def _close_shared_pool() -> None:
    while _SHARED_POOL:
        _SHARED_POOL.pop().shutdown()


def bench_steps(
    preset: dict[str, Any], fold: int = 0, progress: Callable[[str], None] = print, config: str | None = None
) -> dict[str, Any]:
    """(a) no KD, (b) cached TeachFormer (and the other recipes), (c) online TeachFormer on the bare patch and
    (c_context) with the cache's windows; ratios b/a and c/b, the verdicts with loading counted.

    Each arm is timed with every loader worker count of the preset; "with loading" is each arm at its fastest
    count (what a user tunes ``training.num_workers`` to), and every count is kept in the results.
    """
    config = config or preset["config"]
    steps, warmup = preset["steps"], preset["warmup"]
    context_steps = preset.get("context_steps") or steps
    plan = [
        ("a", config, "none", "cache", steps, warmup),
        ("b", config, None, "cache", steps, warmup),
        ("c", config, None, "online-patch", steps, warmup),
        ("c_context", config, None, "online-context", context_steps, min(warmup, 2)),
        *((f"b_{name}", path, None, "cache", steps, warmup) for name, path in preset["recipes"].items()),
    ]
    workers = tuple(preset.get("step_workers") or (0,))
    runs: dict[str, dict[str, Any]] = {}
    for label, path, kd, source, n, warm in plan:
        progress(f"steps ({label}): {path} kd={kd or 'configured'} source={source}, workers {workers}")
        runs[label] = _in_fresh_process(
            _time_steps,
            path,
            fold,
            kd,
            source,
            n,
            min(warm, n),
            workers,
            preset.get("threads"),
            isolate=preset.get("isolate", True),
        )
        progress(
            f"  {runs[label]['kd']}: {runs[label]['step_s'] * 1e3:.1f} ms/step, "
            f"{runs[label]['step_with_loading_s'] * 1e3:.1f} ms with loading ({runs[label]['workers']} workers)"
        )
    memory = "cuda_peak_mb" if runs["a"]["cuda_peak_mb"] is not None else "peak_rss_mb"

    measures = (("{}", "step_s"), ("{} with loading", "step_with_loading_s"), ("memory {}", memory))
    pairs = [("b", "a"), ("c", "b"), ("c_context", "b")]
    ratios = {
        name.format(f"{x}/{y}"): runs[x][key] / runs[y][key]
        for name, key in measures
        for x, y in pairs
        # online-context's teachers run in the loader: its step "in memory" leaves them out, only loading counts
        if not (x == "c_context" and key == "step_s")
    }
    ratios.update(
        {
            f"{label}/a with loading": runs[label]["step_with_loading_s"] / runs["a"]["step_with_loading_s"]
            for label in runs
            if label.startswith("b_")
        }
    )
    return {"runs": runs, "ratios": ratios, "memory": memory, "workers": list(workers)}


# --- 3: the store ------------------------------------------------------------------------------------------------


def bench_store(config: str, fold: int = 0) -> dict[str, Any]:
    """Bytes per voxel per teacher of every teacher array kind, files per case, KL of the encoding, extrapolation."""
    from cache_teachers.bench_store import bench_encodings
    from core.config import load_config
    from core.experiment import open_store_for
    from core.store.encoding import DEFAULT_ENCODING

    cfg = load_config(config)
    store = open_store_for(cfg)
    keys = [t.store_key(fold) for t in cfg.distilled_teachers()]
    cases = [c for c in store.case_ids() if all(store.has_entry(k, c) for k in keys)]
    voxels = sum(int(np.prod(store.case_shape(c))) for c in cases)
    per_kind: dict[str, int] = {}
    case_bytes: dict[str, int] = {}
    for info in store.array_infos():
        parts = info.path.split("/")
        if parts[0] == "teachers" and "/".join(parts[1:3]) in keys and parts[3] in cases:
            per_kind[parts[-1]] = per_kind.get(parts[-1], 0) + info.stored_bytes
        elif parts[0] == "cases" and parts[1] in cases:
            case_bytes[parts[-1]] = case_bytes.get(parts[-1], 0) + info.stored_bytes
    per_teacher = {k: v / voxels / len(keys) for k, v in sorted(per_kind.items())}
    entry = sum(per_teacher.values())
    root = Path(store.location)
    files = sum(1 for p in (root / "cases").rglob("*") if p.is_file()) if root.exists() else None
    teacher_files = 0
    if root.exists():
        for key in keys:
            teacher_files += sum(
                1 for c in cases for p in (root / "teachers" / key / c).rglob("*") if p.is_file()
            )
    encodings = {r.encoding: r for r in bench_encodings(cfg, num_cases=2)}
    default = encodings[DEFAULT_ENCODING]
    hecktor_voxels = HECKTOR["cases"] * int(np.prod(HECKTOR["shape"]))
    case_per_voxel = sum(case_bytes.values()) / voxels
    return {
        "cases": len(cases),
        "teachers": keys,
        "voxels": voxels,
        "bytes_per_voxel_per_teacher": per_teacher,
        "entry_bytes_per_voxel_per_teacher": entry,
        "case_bytes_per_voxel": {k: v / voxels for k, v in sorted(case_bytes.items())},
        "files_per_case": ((files or 0) / len(store.case_ids()) + teacher_files / len(cases))
        if files is not None
        else None,
        "teacher_files_per_case_per_teacher": teacher_files / len(cases) / len(keys),
        "softmax_encoding": DEFAULT_ENCODING,
        "softmax_kl": default.kl,
        "softmax_bytes_per_voxel_measured_alone": default.bytes_per_voxel,
        "hecktor": {
            **HECKTOR,
            "teacher_gb": entry * HECKTOR["teachers"] * hecktor_voxels / 1e9,
            "cases_gb": case_per_voxel * hecktor_voxels / 1e9,
            "note": "extrapolated from this store's measured bytes per voxel; the images' compression depends on "
            "the data",
        },
    }


# --- 4: the cache stage ------------------------------------------------------------------------------------------


def bench_cache_stage(config: str, fold: int = 0) -> dict[str, Any]:
    """``cache_teachers`` into a scratch store against bare sliding-window inference, with the writer's phases.

    Every case of the store is cached (a store's folds name them all); the scratch store is a copy of the cases.
    """
    from cache_teachers.cache import cache_teachers, release_process_state
    from core.config import load_config
    from core.experiment import open_store_for
    from core.inference import resolve_device

    cfg = load_config(config)
    store = open_store_for(cfg)
    cases = store.case_ids()
    device = resolve_device(cfg.training.device)
    teachers = [t.for_fold(fold) for t in cfg.distilled_teachers()]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = _scratch_store(store, Path(tmp) / "store.zarr")
        phases = _cache_phases(cfg, store, scratch, teachers, device)
        shutil.rmtree(scratch / "teachers" / "bench")
        scratch_cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(scratch)})})
        release_process_state()
        started = time.perf_counter()
        cache_teachers(scratch_cfg, progress=False, folds=[fold])
        cache_s = time.perf_counter() - started
        release_process_state()
    return {
        "cases": len(cases),
        "teachers": len(teachers),
        "cache_s": cache_s,
        **phases,
        "overhead": cache_s / phases["bare_inference_s"] - 1,
        "phase_sum_s": phases["inference_with_taps_s"] + phases["sketches_s"] + phases["encode_write_s"],
        "per_entry_s": cache_s / (len(cases) * len(teachers)),
    }


def _scratch_store(store: Any, scratch: Path) -> Path:
    """A copy of ``store``'s cases without its teachers, so `cache` runs into it exactly as into the user's."""
    shutil.copytree(store.location, scratch, ignore=shutil.ignore_patterns("teachers"))
    (scratch / "teachers").mkdir()
    shutil.copy(Path(store.location) / "teachers" / "zarr.json", scratch / "teachers" / "zarr.json")
    return scratch


@contextmanager
def _timed(phases: dict[str, float], phase: str) -> Iterator[None]:
    """Add the seconds the block takes to ``phases[phase]``."""
    started = time.perf_counter()
    yield
    phases[phase] += time.perf_counter() - started


def _cache_phases(cfg: Any, store: Any, scratch: Path, teachers: list[Any], device: Any) -> dict[str, float]:
    """Each teacher over every case of ``store``, as `cache` runs it, with its phases timed one by one.

    Bare sliding-window inference, inference with taps (and features for sketches), sketches, and encoding and
    writing into ``scratch`` under ``bench/<teacher>`` (removed afterwards by the caller).
    """
    from cache_teachers.cache import _sketches
    from core.inference import predict_volume
    from core.models.checkpoint import build_from_checkpoint
    from core.models.registry import get_spec
    from core.store.teacher_store import TeacherStore

    dataset, k = store.metadata["dataset"], cfg.store.feature_sketch_channels
    channels, classes = len(dataset["channel_names"]), len(dataset["class_names"])
    p, amp = cfg.distillation.attention.p, cfg.training.amp
    write_store = TeacherStore.open(scratch, mode="a", chunk_size=cfg.store.chunk_size)
    write_store.drop_consolidated()  # as `cache` does before it writes
    phases = dict.fromkeys(("bare_inference_s", "inference_with_taps_s", "sketches_s", "encode_write_s"), 0.0)
    for teacher in teachers:
        model, _ = build_from_checkpoint(teacher.checkpoint, teacher.arch, channels, classes, teacher.args)
        model.to(device).eval()
        inference, spec = cfg.inference_for(teacher), get_spec(teacher.arch)
        for case in store.case_ids():
            image = store.read_image(case)
            with _timed(phases, "bare_inference_s"):
                predict_volume(model, image, inference, device, amp=amp)
            with _timed(phases, "inference_with_taps_s"):
                out = predict_volume(model, image, inference, device, spec, p, amp, k is not None)
            with _timed(phases, "sketches_s"):
                sketches = _sketches(out, k, cfg.store.feature_sketch_stride) if k is not None else None
            with _timed(phases, "encode_write_s"):
                entry = (out["logits"], out["coarse"], out["fine"], sketches)
                write_store.write_entry(f"bench/{teacher.name}", case, *entry)
        del model
    return phases


# --- 4b: amortisation: "cache once + k students" against "k online students" ------------------------------------


def _whole_run(
    config: str, fold: int, kd: str | None, source: str, runs_dir: str, threads: int | None
) -> dict:
    """In a fresh process: one whole student run as ``make distil`` trains it (the digest check, every epoch and
    validation, the checkpoints), into a scratch ``runs_dir``; its wall time."""
    import torch

    from core.config import load_config
    from core.inference import resolve_device
    from core.training.run import resolve_num_workers
    from train_student.distil import distil

    torch.set_num_threads(threads or _cores())
    cfg = load_config(config)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"runs_dir": Path(runs_dir)})})
    workers = resolve_num_workers(cfg.training.num_workers, resolve_device(cfg.training.device))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = distil(cfg, fold, kd=kd, source=source, progress=False)
    return {
        "kd": result.name.removeprefix("student "),
        "source": source,
        "seconds": time.perf_counter() - started,
        "steps": cfg.training.epochs * cfg.training.iterations_per_epoch,
        "epochs": cfg.training.epochs,
        "workers": workers,
    }


def break_even(cache_s: float, cached_run_s: float, online_run_s: float) -> int | None:
    """The least number of students k with ``cache_s + k · cached_run_s ≤ k · online_run_s`` (None: never, an
    online run being no dearer than a cached one)."""
    saved = online_run_s - cached_run_s
    if saved <= 0:
        return None
    return max(1, math.ceil(cache_s / saved - 1e-9))


def bench_amortise(
    preset: dict[str, Any],
    results: dict[str, Any],
    fold: int = 0,
    progress: Callable[[str], None] = print,
    config: str | None = None,
) -> dict[str, Any]:
    """Wall time of "cache once + k students" against "k online students", k = 1, 3, 10, and the break-even k.

    k = 1 is measured: the cache stage (this run's ``cache`` part, every case with fold ``fold``'s teachers) and
    one whole cached and one whole online-patch student run, each in its own process. k = 3 and 10 follow from those
    per-run costs (k students of one fold — seeds, recipes — share one cache). The online-context run is not run
    whole (it is the dearest by design): its cost is the cached run's plus, per step, the difference of their
    with-loading step times from the ``steps`` part.
    """
    from core.errors import ConfigError

    config = config or preset["config"]
    cache = results.get("cache")
    steps = results.get("steps")
    if not cache or not steps:
        raise ConfigError(
            "the amortisation weighs the cache and steps parts of the same run: run `teachcache bench` with "
            "--part steps --part cache --part amortise (or all parts) for this preset and experiment"
        )
    threads = preset.get("threads")
    whole: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, source in (("cached", "cache"), ("online-patch", "online-patch")):
            progress(f"amortisation: one whole {label} student run (fold {fold})")
            whole[label] = _in_fresh_process(
                _whole_run, config, fold, None, source, tmp, threads, isolate=preset.get("isolate", True)
            )
            progress(f"  {whole[label]['seconds']:.1f} s")
    return amortisation(cache, steps, whole, fold)


def amortisation(
    cache: dict[str, Any], steps: dict[str, Any], whole: dict[str, dict[str, Any]], fold: int = 0
) -> dict[str, Any]:
    """The amortisation table from measured parts: the cache stage, the steps part, and the whole ``cached`` and
    ``online-patch`` runs (:func:`_whole_run`'s results). The online-context run is the cached run plus, per step,
    the difference of the two arms' with-loading steps at the worker count the whole runs trained with."""
    # the context arm's steps at the worker count the whole runs trained with (the config's), not its fastest
    workers = str(whole["cached"]["workers"])
    per_step = {
        k: (steps["runs"][k].get("step_with_loading_by_workers_s") or {}).get(workers)
        for k in ("b", "c_context")
        if k in steps["runs"]
    }
    cached_s = whole["cached"]["seconds"]
    runs = {"cached": cached_s, "online-patch": whole["online-patch"]["seconds"]}
    if per_step.get("c_context") is not None and per_step.get("b") is not None:
        runs["online-context"] = cached_s + whole["cached"]["steps"] * (per_step["c_context"] - per_step["b"])
    cache_s = cache["cache_s"]
    table = {
        str(k): {
            "cache_then_students_s": cache_s + k * cached_s,
            **{f"{mode}_s": k * runs[mode] for mode in runs if mode != "cached"},
        }
        for k in AMORTISE_K
    }
    return {
        "fold": fold,
        "cache_s": cache_s,
        "cache_cases": cache["cases"],
        "cache_teachers": cache["teachers"],
        "run_s": runs,
        "measured": {k: v for k, v in whole.items()},
        "extrapolated": ["online-context"] if "online-context" in runs else [],
        "extrapolated_at_workers": int(workers),
        "table": table,
        "break_even_k": {
            mode: break_even(cache_s, cached_s, runs[mode]) for mode in runs if mode != "cached"
        },
    }


# --- 5: the patch loader at the paper's sizes --------------------------------------------------------------------

# the paper's teachers (TeachFormer): their registry names, with the width of each tap's features
PAPER_TEACHERS = {"hdenseformer": 256, "swin_unetr": 384, "unetr": 768}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)


def write_paper_store(
    path: Path,
    cases: int,
    shape: tuple[int, int, int],
    sketch_channels: int = 16,
    sketch_stride: int = 4,
    seed: int = 0,
) -> list[str]:
    """A store of ``cases`` synthetic PET/CT cases of ``shape`` with the paper's three teachers' every array.

    Written directly (no teacher runs): smooth images, a few tumour blobs, teacher logits that agree with the label
    up to a smooth perturbation, unit-RMS attention maps and feature sketches of smooth noise on each teacher's tap
    grids (their registry strides). The arrays have the sizes, dtypes, chunks and encodings of a real cache; their
    content is only realistic enough for compression and decode times to be.
    """
    from core.models.registry import get_spec
    from core.store.teacher_store import TeacherStore

    rng = np.random.default_rng(seed)
    store = TeacherStore.create(
        path,
        dataset={
            "channel_names": ["CT", "PET"],
            "class_names": ["background", "tumour"],
            "manifest_hash": "bench",
        },
        preprocessing={},
        preprocessing_hash="bench",
        splits=[],
    )
    ids = []
    for i in range(cases):
        case_id = f"PAPER_{i:03d}"
        image, label, foreground = _paper_case(rng, shape)
        store.write_case(case_id, image, label, foreground, {"spacing": [1.0, 1.0, 1.0]})
        for name, channels in PAPER_TEACHERS.items():
            arrays = _paper_entry(rng, label, get_spec(name), channels, sketch_channels, sketch_stride)
            store.write_entry(f"{name}/all_folds", case_id, *arrays)
        ids.append(case_id)
    return ids


def _paper_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """A synthetic PET/CT case: ``(image (2, X, Y, Z), label (X, Y, Z) of three blobs, foreground (N, 4))``."""
    from scipy.ndimage import gaussian_filter

    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    label = np.zeros(shape, np.uint8)
    for _ in range(3):
        centre = rng.uniform(0.25, 0.75, 3) * np.array(shape)
        radius = rng.uniform(6, 14)
        label[np.sum((grid - centre[:, None, None, None]) ** 2, axis=0) < radius**2] = 1
    image = np.stack([_smooth_field(rng, shape, 2.0), gaussian_filter(label.astype(np.float32), 1.5)])
    fg = np.argwhere(label > 0)
    foreground = np.concatenate([np.ones((len(fg), 1), np.int64), fg], axis=1)[:: max(1, len(fg) // 2000)]
    return image, label, foreground


def _paper_entry(
    rng: np.random.Generator,
    label: np.ndarray,
    spec: Any,
    channels: int,
    sketch_channels: int,
    sketch_stride: int,
) -> tuple[Any, ...]:
    """One teacher's entry for a case: ``(logits, coarse, fine, sketches)`` as :meth:`write_entry` takes them.

    Logits (2, X, Y, Z) that agree with ``label`` up to a smooth perturbation; attention maps of smooth noise on
    the teacher's tap grids; per tap a sketch (k, x, y, z) on the grid the cache pools them to and an orthonormal
    basis (C, k) of the tap's ``channels``.
    """
    from scipy.ndimage import gaussian_filter

    shape = label.shape
    margin = 6.0 * (gaussian_filter(label.astype(np.float32), 2.0) - 0.5)
    logits = np.stack([np.zeros(shape, np.float32), margin + _smooth_field(rng, shape, 4.0)])
    maps, sketches = {}, {}
    for kind in ("coarse", "fine"):
        stride = spec.taps[kind].stride
        maps[kind] = np.abs(_smooth_field(rng, tuple(s // stride for s in shape), 1.0)) + 0.1
        # sketches on the grid the cache pools them to (store.feature_sketch_stride)
        pooled = tuple(s // max(stride, sketch_stride) for s in shape)
        sketch = _smooth_field(rng, (sketch_channels, *pooled), 1.0) * 10
        basis = np.linalg.qr(rng.standard_normal((channels, sketch_channels)))[0].astype(np.float32)
        sketches[kind] = (sketch, basis, {"channels_in": channels, "channels": sketch_channels})
    return logits, maps["coarse"], maps["fine"], sketches


def _loader_rate(
    path: str, cases: list[str], patch: int, workers: int, batches: int, batch_size: int
) -> float:
    """Patches per second of a DataLoader over the paper store with every array TeachFormer, relation, MSKD read."""
    from core.data.patches import PatchDataset, TargetRequest
    from core.terms import TERM_SPECS, targets_needed

    every_term = targets_needed((name, 1.0) for name in TERM_SPECS)
    request = TargetRequest.for_recipe([f"{name}/all_folds" for name in PAPER_TEACHERS], 2.0, every_term)
    dataset = PatchDataset(path, cases, (patch,) * 3, length=(batches + 1) * batch_size, targets=request)
    # 4 workers on a 2-core machine is the point of the measurement, not a mistake: no warning
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")
    it = iter(_epoch_loader(dataset, batch_size, workers))
    next(it)  # workers started, store opened: not counted
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - started)


def bench_loader(settings: dict[str, Any], progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Patches per second at the paper's sizes, for each patch size and number of workers."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "paper.zarr"
        started = time.perf_counter()
        cases = write_paper_store(path, settings["cases"], tuple(settings["shape"]))
        progress(
            f"paper-size store: {len(cases)} cases of {tuple(settings['shape'])} in {time.perf_counter() - started:.0f} s"
        )
        stored = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        files = sum(1 for p in path.rglob("*") if p.is_file())
        rates: dict[str, dict[str, float]] = {}
        for patch in settings["patches"]:
            rates[str(patch)] = {}
            for workers in settings["workers"]:
                rate = _loader_rate(str(path), cases, patch, workers, settings["batches"], 2)
                rates[str(patch)][str(workers)] = rate
                progress(f"  loader {patch}³, {workers} workers: {rate:.2f} patches/s")
        sharding = _sharding_ab(path, Path(tmp) / "per_chunk.zarr", cases, settings, progress)
    voxels = len(cases) * int(np.prod(settings["shape"]))
    return {
        "cases": len(cases),
        "shape": list(settings["shape"]),
        "teachers": list(PAPER_TEACHERS),
        "batch_size": 2,
        "patches_per_s": rates,
        "store_bytes_per_voxel": stored / voxels,
        "files": files,
        "sharding": sharding,
    }


def _sharding_ab(
    sharded: Path,
    per_chunk: Path,
    cases: list[str],
    settings: dict[str, Any],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The loader and the file count with one shard per array (format 2.3) against one file per chunk (2.2), on
    the same values: the largest patch, 0 workers, interleaved rounds."""
    from core.inspection.stats import entry_files

    shutil.copytree(sharded, per_chunk)
    _unshard(per_chunk)
    patch = settings["patches"][0]
    rates: dict[str, list[float]] = {"sharded": [], "per_chunk": []}
    for _ in range(settings.get("rounds", 2)):
        for name, path in (("sharded", sharded), ("per_chunk", per_chunk)):
            rates[name].append(_loader_rate(str(path), cases, patch, 0, settings["batches"], 2))
    found = {name: statistics.median(r) for name, r in rates.items()}
    progress(
        f"  loader {patch}³, 0 workers: {found['sharded']:.2f} patches/s sharded, {found['per_chunk']:.2f} per chunk"
    )
    return {
        "patch": patch,
        "patches_per_s": found,
        "rounds": rates,
        "files": {"sharded": entry_files(sharded), "per_chunk": entry_files(per_chunk)},
    }


# --- 6: integrity ------------------------------------------------------------------------------------------------


def _rewrite_arrays(path: Path, checksums: bool, shards: bool) -> None:
    """Rewrite every array of a store, values unchanged, with or without its CRC-32C codec and its shard (to measure
    what each costs against the same data)."""
    import zarr

    from core.store.format import NUMCODECS_WARNING

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NUMCODECS_WARNING)
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        arrays = [
            a for _, g in root.groups() for _, a in g.members(max_depth=None) if isinstance(a, zarr.Array)
        ]
        for arr in arrays:
            group = zarr.open_group(str(path / arr.path.rsplit("/", 1)[0]), mode="r+", use_consolidated=False)
            name = arr.path.rsplit("/", 1)[-1]
            data, attrs = arr[...], dict(arr.attrs)
            compressors = [c for c in arr.compressors if checksums or type(c).__name__ != "Crc32cCodec"]
            group.create_array(
                name,
                data=data,
                chunks=arr.chunks,
                shards=arr.shards if shards else None,
                filters=arr.filters,
                compressors=compressors,
                dimension_names=arr.metadata.dimension_names,
                overwrite=True,
                config={"write_empty_chunks": True},
            )
            group[name].attrs.update(attrs)


def _strip_checksums(path: Path) -> None:
    """Every array of a store without its CRC-32C codec (as format 2.1 stored them), shards kept."""
    _rewrite_arrays(path, checksums=False, shards=True)


def _unshard(path: Path) -> None:
    """Every array of a store as one file per chunk (as format 2.2 stored them), checksums kept."""
    _rewrite_arrays(path, checksums=True, shards=False)


def _check_seconds(store: Any, groups: list[str], rounds: int = 3) -> float:
    """Median seconds of the pre-training digest check over ``groups``."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        found = store.check_groups(groups)
        times.append(time.perf_counter() - started)
        bad = [f.path for f in found if not f.ok]
        if bad:
            raise RuntimeError(f"the bench's store failed its own digest check: {bad[:3]}")
    return statistics.median(times)


def _demo_check(config: str, fold: int = 0) -> dict[str, Any] | None:
    """The digest check of what the demo's fold-``fold`` student reads (its cases, its teachers' entries)."""
    from core.config import load_config
    from core.experiment import open_store_for
    from core.store.format import FORMAT_VERSION

    cfg = load_config(config)
    try:
        store = open_store_for(cfg)
    except Exception:  # no demo store yet: `make demo` first
        return None
    if store.metadata.get("format_version") != FORMAT_VERSION:
        return None  # an older store records no digests: `teachcache verify --rehash` first
    split = store.metadata["splits"][fold]
    keys = [t.store_key(fold) for t in cfg.distilled_teachers()]
    groups = [f"cases/{c}" for c in split["train"] + split["val"]]
    groups += [f"teachers/{k}/{c}" for k in keys for c in split["train"] if store.has_entry(k, c)]
    found = store.check_groups(groups)
    return {
        "groups": len(groups),
        "bytes": sum(f.nbytes for f in found),
        "seconds": _check_seconds(store, groups),
    }


def bench_integrity(
    settings: dict[str, Any], config: str | None = None, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """What integrity costs: CRC-32C on the loader's reads, and the digest check before training."""
    from core.store.teacher_store import TeacherStore

    patch = settings["patches"][-1]
    with tempfile.TemporaryDirectory() as tmp:
        checked = Path(tmp) / "crc.zarr"
        cases = write_paper_store(checked, settings["cases"], tuple(settings["shape"]))
        plain = Path(tmp) / "plain.zarr"
        shutil.copytree(checked, plain)
        _strip_checksums(plain)
        rates: dict[str, list[float]] = {"crc32c": [], "none": []}
        for _ in range(settings.get("rounds", 7)):  # interleaved, so drift in the machine hits both alike
            for name, path in (("crc32c", checked), ("none", plain)):
                rates[name].append(_loader_rate(str(path), cases, patch, 0, settings["batches"], 2))
        with_crc, without = statistics.median(rates["crc32c"]), statistics.median(rates["none"])
        progress(
            f"  loader {patch}³, 0 workers: {with_crc:.2f} patches/s with CRC-32C, {without:.2f} without"
        )
        store = TeacherStore.open(checked)
        groups = [f"cases/{c}" for c in cases]
        groups += [f"teachers/{t}/all_folds/{c}" for t in PAPER_TEACHERS for c in cases]
        found = store.check_groups(groups)
        seconds = _check_seconds(store, groups)
        nbytes = sum(f.nbytes for f in found)
    per_case = seconds / len(cases)
    progress(f"  digest check: {seconds:.2f} s for {len(cases)} cases × {len(PAPER_TEACHERS)} teachers")
    return {
        "patch": patch,
        "cases": len(cases),
        "shape": list(settings["shape"]),
        "patches_per_s": {"crc32c": with_crc, "none": without},
        "rounds": rates,
        # paired by round (each pair read back to back), so the machine's drift between rounds cancels
        "crc_cost": 1.0
        - statistics.median(c / n for c, n in zip(rates["crc32c"], rates["none"], strict=True)),
        "check": {
            "groups": len(groups),
            "bytes": nbytes,
            "seconds": seconds,
            "mb_per_s": nbytes / seconds / 1e6,
        },
        "hecktor": {**HECKTOR, "check_seconds": per_case * HECKTOR["cases"]},
        "demo": _demo_check(config) if config else None,
    }


# --- the run -----------------------------------------------------------------------------------------------------


def run_bench(
    preset_name: str,
    out_dir: Path = Path("bench"),
    parts: list[str] | None = None,
    progress: Callable[[str], None] = print,
    config: str | None = None,
    benchmarks: Path | None = Path("BENCHMARKS.md"),
) -> dict[str, Any]:
    """Measure every part of ``preset_name`` and write ``results-<preset>.json``, ``.md`` and ``.png`` to ``out_dir``
    and the preset's block of ``benchmarks`` (None: no BENCHMARKS.md); ``config`` replaces the preset's experiment."""
    try:
        return _run_bench(preset_name, out_dir, parts, progress, config, benchmarks)
    finally:
        _close_shared_pool()


def _run_bench(
    preset_name: str,
    out_dir: Path,
    parts: list[str] | None,
    progress: Callable[[str], None],
    config: str | None,
    benchmarks: Path | None,
) -> dict[str, Any]:
    preset = PRESETS[preset_name]
    config = config or preset["config"]
    parts = parts or list(BENCH_PARTS)
    started = time.perf_counter()
    results: dict[str, Any] = {"preset": preset_name, "machine": machine(), "config": config}
    if "steps" in parts:
        results["steps"] = bench_steps(preset, progress=progress, config=config)
    if "store" in parts:
        progress("store: bytes per voxel, files, encoding KL")
        results["store"] = bench_store(config)
    if "cache" in parts:
        progress("cache stage: cache against bare inference, every case")
        results["cache"] = bench_cache_stage(config)
    if "loader" in parts:
        results["loader"] = bench_loader(preset["loader"], progress=progress)
    if "integrity" in parts:
        progress("integrity: CRC-32C on the loader's reads, the digest check before training")
        results["integrity"] = bench_integrity(preset["loader"], config, progress=progress)
    _carry_over(results, out_dir / f"results-{preset_name}.json", parts)
    if (
        "amortise" in parts
    ):  # after the carry-over: it weighs this run's (or the carried) cache and step parts
        results["amortise"] = bench_amortise(preset, results, progress=progress, config=config)
    previous_gpu = out_dir / "results-gpu.json"
    if "loader" in results:
        results["loader"]["student_consumption"] = _consumption(results, previous_gpu)
    results["seconds"] = time.perf_counter() - started
    from teachcache.bench_report import write_results

    write_results(results, out_dir, benchmarks)
    return results


def _carry_over(results: dict[str, Any], previous: Path, parts: list[str]) -> None:
    """A run of some parts keeps the other parts of the preset's last results, with the date they were measured —
    only when those were measured on the same experiment and CPU; a kept amortisation is dropped when the steps or
    the cache stage it weighed are measured again."""
    if set(parts) == set(BENCH_PARTS) or not previous.exists():
        return
    old = json.loads(previous.read_text())
    if (
        old.get("config") != results["config"]
        or old.get("machine", {}).get("cpu") != results["machine"]["cpu"]
    ):
        return
    stale = {"amortise"} if {"steps", "cache"} & set(parts) else set()
    for part in BENCH_PARTS:
        if part not in parts and part not in stale and old.get(part):
            results[part] = old[part]
            results.setdefault("carried", {})[part] = (old.get("carried") or {}).get(part) or old.get(
                "date", "?"
            )


def _consumption(results: dict[str, Any], previous_gpu: Path) -> dict[str, Any]:
    """The student's patches per second at the paper's size: this run's on a GPU, else the GPU preset's last run."""
    steps = results.get("steps", {}).get("runs", {})
    if results["preset"] == "gpu" and "b" in steps:
        return _consumed(steps["b"], "this run (cached TeachFormer step)")
    if previous_gpu.exists():
        gpu = json.loads(previous_gpu.read_text())
        run = gpu.get("steps", {}).get("runs", {}).get("b")
        if run:
            return _consumed(run, f"the GPU preset's last run ({gpu['machine'].get('gpu')})")
    return {"patches_per_s": None, "from": "no GPU run yet (make bench BENCH=gpu on a machine with a GPU)"}


def _consumed(run: dict[str, Any], source: str) -> dict[str, Any]:
    """Patches per second a timed cached-TeachFormer step consumes, and where the number comes from."""
    return {"patches_per_s": run["batch_size"] / run["step_s"], "from": source}
