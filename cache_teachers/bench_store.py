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

__all__ = ["STORE_PIPELINE", "EncodingResult", "bench_encodings", "bench_patch_read", "bench_softmax_codecs"]

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


# --- the softmax's lossless pipeline: what else any zarr v3 reader can decode ------------------------------------


STORE_PIPELINE = "the store's: delta(z) + blosc zstd 5 no shuffle"


def _codec_variants() -> dict[str, dict[str, object]]:
    """Lossless pipelines for the stored int8 margins (the KL is the encoding's, the same for all): the store's
    own first, then Blosc's shuffles and levels, plain zstd up to level 22, and the delta filter's placement (none,
    along z as stored, along x after a transpose)."""
    import warnings

    from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

    with warnings.catch_warnings():  # numcodecs flags its zarr3 wrappers as experimental
        warnings.simplefilter("ignore")
        from numcodecs.zarr3 import Delta

    def delta() -> list[object]:
        return [Delta(dtype="|i1")]

    def blosc(level: int, shuffle: str = "bitshuffle", cname: str = "zstd") -> list[object]:
        return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle)]

    along_x = [TransposeCodec(order=(0, 3, 2, 1))]
    own = compressor_for(np.dtype("int8"))[0]  # what the store writes now (before its CRC-32C)
    return {
        STORE_PIPELINE: {"filters": delta(), "compressors": [own]},
        "delta(z) + blosc zstd 5 bitshuffle (the store's before 2026-12-07)": {
            "filters": delta(),
            "compressors": blosc(5),
        },
        "no delta + blosc zstd 5 bitshuffle": {"filters": [], "compressors": blosc(5)},
        "delta(z) + blosc zstd 5 byte shuffle": {"filters": delta(), "compressors": blosc(5, "shuffle")},
        "delta(z) + blosc zstd 1 bitshuffle": {"filters": delta(), "compressors": blosc(1)},
        "delta(z) + blosc zstd 9 bitshuffle": {"filters": delta(), "compressors": blosc(9)},
        "delta(z) + blosc lz4hc 9 bitshuffle": {"filters": delta(), "compressors": blosc(9, cname="lz4hc")},
        "delta(z) + zstd 5": {"filters": delta(), "compressors": [ZstdCodec(level=5)]},
        "delta(z) + zstd 9": {"filters": delta(), "compressors": [ZstdCodec(level=9)]},
        "delta(z) + zstd 15": {"filters": delta(), "compressors": [ZstdCodec(level=15)]},
        "delta(z) + zstd 22": {"filters": delta(), "compressors": [ZstdCodec(level=22)]},
        "no delta + zstd 22": {"filters": [], "compressors": [ZstdCodec(level=22)]},
        "delta(x) + blosc zstd 5 bitshuffle": {"filters": along_x + delta(), "compressors": blosc(5)},
        "delta(x) + zstd 22": {"filters": along_x + delta(), "compressors": [ZstdCodec(level=22)]},
    }


def bench_softmax_codecs(cfg: Config, fold: int = 0) -> dict[str, object]:
    """Stored bytes per voxel of the cached softmax under each lossless pipeline of :func:`_codec_variants`.

    Reads the stored (encoded) margins of fold ``fold``'s teachers on every cached case and writes them again into
    an in-memory store with the store's chunks and one shard per array; each pipeline's round trip is checked to be
    exact (``None``: it did not give the margins back). The encoding, and so its KL, is the store's own.
    """
    from zarr.codecs import Crc32cCodec
    from zarr.storage import MemoryStore

    from core.store.format import shard_shape

    store = open_store_for(cfg)
    keys = [t.store_key(fold) for t in cfg.distilled_teachers()]
    root = zarr.open_group(store.location, mode="r", use_consolidated=False)
    arrays = []
    for key in keys:
        for case in store.case_ids():
            if store.has_entry(key, case):
                arrays.append(np.asarray(root[f"teachers/{key}/{case}/softmax"][...]))
    if not arrays:
        raise RuntimeError(
            f"no cached softmax of fold {fold}'s teachers in {store.location}: run `make cache` first"
        )
    voxels = sum(int(np.prod(a.shape[1:])) for a in arrays)
    found: dict[str, float | None] = {}
    for name, pipeline in _codec_variants().items():
        scratch = zarr.open_group(MemoryStore(), mode="w")
        stored = 0
        for i, data in enumerate(arrays):
            chunks = (
                data.shape[0],
                *(min(s, c) for s, c in zip(data.shape[1:], cfg.store.chunk_size, strict=True)),
            )
            arr = scratch.create_array(
                str(i),
                shape=data.shape,
                dtype=data.dtype,
                chunks=chunks,
                shards=shard_shape(data.shape, chunks),
                filters=pipeline["filters"],
                compressors=[*pipeline["compressors"], Crc32cCodec()],  # as the store's, checksummed
            )
            arr[...] = data
            if not np.array_equal(
                arr[...], data
            ):  # not lossless here: out of the running (the table says so)
                stored = None
                break
            stored += int(arr.nbytes_stored())
        # each array is one teacher's entry of one case: B / voxel / teacher
        found[name] = stored / voxels if stored is not None else None
    return {
        "encoding": store.entry_attrs(
            keys[0], next(c for c in store.case_ids() if store.has_entry(keys[0], c))
        )["softmax_encoding"],
        "entries": len(arrays),
        "voxels_per_entry": voxels / len(arrays),
        "bytes_per_voxel": found,
    }
