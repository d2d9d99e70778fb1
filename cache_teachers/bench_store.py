"""``make bench-store``: measure every softmax encoding on real teacher outputs, and the patch read time.

For each teacher and a few cases, the teacher's float32 logits are computed once; each encoding then writes them
into a scratch Zarr store with the store's chunking and compressor, reads them back, decodes them at T = 1, 2
and 4, and is compared with ``softmax(logits / T)``. Reported per encoding: stored bytes per voxel per teacher,
mean KL per voxel at each T, and write and read throughput in MB/s of float32 logits.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

from core.config import Config
from core.data.patches import PatchDataset, TargetRequest
from core.experiment import fold_split, open_store_for
from core.inference import predict_volume, resolve_device
from core.models.checkpoint import build_from_checkpoint
from core.store.encoding import ENCODINGS, kl_per_voxel, softmax
from core.store.format import compressor_for

__all__ = ["EncodingResult", "bench_encodings", "bench_patch_read"]

TEMPERATURES = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class EncodingResult:
    encoding: str
    bytes_per_voxel: float
    kl: dict[str, float]
    write_mb_s: float
    read_mb_s: float


def _teacher_logits(cfg: Config, cases: list[str]) -> list[np.ndarray]:
    store = open_store_for(cfg)
    meta = store.metadata["dataset"]
    device = resolve_device(cfg.training.device)
    out = []
    for teacher in (t.for_fold(0) for t in cfg.teachers):  # fold 0's checkpoints, the ones the demo trains
        model, _ = build_from_checkpoint(
            teacher.checkpoint,
            teacher.arch,
            len(meta["channel_names"]),
            len(meta["class_names"]),
            teacher.args,
        )
        model.to(device)
        inference = cfg.inference_for(teacher)
        for case_id in cases:
            out.append(
                predict_volume(model, store.read_image(case_id), inference, device, amp=cfg.training.amp)[
                    "logits"
                ]
            )
        del model
    return out


def bench_encodings(cfg: Config, num_cases: int = 4) -> list[EncodingResult]:
    """Measure every encoding in :data:`core.store.encoding.ENCODINGS` on the configured teachers' outputs."""
    store = open_store_for(cfg)
    _, val = fold_split(cfg, store, 0)
    logits = _teacher_logits(cfg, val[:num_cases])
    voxels = sum(int(np.prod(z.shape[1:])) for z in logits)
    megabytes = sum(z.nbytes for z in logits) / 1e6
    references = {t: [softmax(z / t) for z in logits] for t in TEMPERATURES}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, enc in ENCODINGS.items():
            root = zarr.open_group(str(Path(tmp) / f"{name}.zarr"), mode="w")
            started = time.perf_counter()
            for i, z in enumerate(logits):
                data = enc.encode(z)
                chunks = (
                    data.shape[0],
                    *(min(s, c) for s, c in zip(data.shape[1:], cfg.store.chunk_size, strict=True)),
                )
                root.create_array(
                    str(i),
                    data=data,
                    chunks=chunks,
                    filters=enc.zarr_filters(),
                    compressors=compressor_for(data.dtype),
                )
            write_s = time.perf_counter() - started
            stored = sum(int(root[str(i)].nbytes_stored()) for i in range(len(logits)))
            started = time.perf_counter()
            arrays = [root[str(i)][...] for i in range(len(logits))]
            decoded = [enc.decode(a) for a in arrays]
            read_s = time.perf_counter() - started
            kl = {}
            for t in TEMPERATURES:
                decoded_t = decoded if t == 1.0 else [enc.decode(a, t) for a in arrays]
                per_case = [
                    kl_per_voxel(r, d) * r[0].size for r, d in zip(references[t], decoded_t, strict=True)
                ]
                kl[f"T={t:g}"] = sum(per_case) / voxels
            results.append(EncodingResult(name, stored / voxels, kl, megabytes / write_s, megabytes / read_s))
    return results


def bench_patch_read(cfg: Config, repeats: int = 50) -> dict[str, float]:
    """Mean and 95th-percentile seconds to read one training patch with every teacher's cached maps."""
    store = open_store_for(cfg)
    train, _ = fold_split(cfg, store, 0)
    teachers = tuple(t.store_key(0) for t in cfg.distilled_teachers())  # fold 0: the one it reads
    ds = PatchDataset(
        store.location,
        train,
        cfg.training.patch_size,
        length=repeats,
        foreground_oversampling=cfg.training.foreground_oversampling,
        targets=TargetRequest(teachers, cfg.distillation.temperature),
        augment=False,
    )
    ds[0]  # open the store and warm the per-worker map cache the way training does
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        ds[i]
        times.append(time.perf_counter() - started)
    return {
        "mean_s": float(np.mean(times)),
        "p95_s": float(np.percentile(times, 95)),
        "teachers": len(teachers),
    }


def results_table(results: list[EncodingResult]) -> list[dict[str, object]]:
    return [asdict(r) for r in results]


def store_costs(cfg: Config) -> dict[str, float]:
    """Stored bytes per case voxel of each array kind (per teacher for teacher arrays), from the demo store."""
    store = open_store_for(cfg)
    voxels = sum(int(np.prod(store.case_shape(c))) for c in store.case_ids())
    teachers = max(1, len(store.teacher_keys()))
    totals: dict[str, int] = {}
    for info in store.array_infos():
        parts = info.path.split("/")
        kind = f"teacher {parts[-1]}" if parts[0] == "teachers" else f"case {parts[-1]}"
        totals[kind] = totals.get(kind, 0) + info.stored_bytes
    return {
        kind: total / voxels / (teachers if kind.startswith("teacher") else 1)
        for kind, total in sorted(totals.items())
    }


def sketch_fidelity(cfg: Config) -> list[dict[str, object]]:
    """Per teacher and tap: sketch width, kept energy, and relative errors of cosine similarities (mean, max)."""
    store = open_store_for(cfg)
    rows = []
    for teacher in store.teacher_keys():
        per_kind: dict[str, list[dict[str, float]]] = {}
        for case in store.case_ids():
            if store.has_entry(teacher, case):
                for kind, meta in store.entry_attrs(teacher, case).get("sketch", {}).items():
                    per_kind.setdefault(kind, []).append(meta)
        for kind, metas in sorted(per_kind.items()):
            row: dict[str, object] = {
                "teacher": teacher,
                "tap": kind,
                "channels_in": metas[0]["channels_in"],
                "channels": metas[0]["channels"],
                "energy_mean": float(np.mean([m["energy"] for m in metas])),
            }
            for key in ("voxel_cosine", "prototype_cosine"):
                values = [m[key] for m in metas if key in m]
                if values:
                    row[f"{key}_mean"], row[f"{key}_max"] = float(np.mean(values)), float(np.max(values))
            rows.append(row)
    return rows
