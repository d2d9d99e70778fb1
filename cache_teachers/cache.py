"""Run each teacher once over every case and write its softmax and attention maps into the store."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import version

import torch
from torch import nn

from core.config import Config, InferenceConfig, TeacherConfig
from core.errors import ConfigError
from core.experiment import open_store_for
from core.inference import check_window, predict_volume, resolve_device
from core.models import ModelSpec, get_spec
from core.models.checkpoint import Checkpoint, build_from_checkpoint, file_sha256
from core.progress import track

__all__ = ["CacheSummary", "cache_teachers"]


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


def cache_teachers(
    cfg: Config, overwrite: bool = False, names: list[str] | None = None, progress: bool = True
) -> CacheSummary:
    """Cache every configured teacher (or those in ``names``) over every case of the store.

    Every checkpoint is loaded and checked against its declared architecture before anything is written. An
    entry is skipped when it is complete and was computed from the same checkpoint bytes (sha256), unless
    ``overwrite``.

    Raises:
        StoreError: the store is missing or stale (run ``teachcache preprocess``).
        CheckpointError: a checkpoint is missing, unsafe, or does not fit its declared architecture.
        ConfigError: no teachers configured, or window settings a network cannot use.
    """
    store = open_store_for(cfg, mode="a")
    case_ids = store.case_ids()
    meta = store.metadata["dataset"]
    in_channels, class_names = len(meta["channel_names"]), meta["class_names"]
    teachers = [cfg.teacher(n) for n in names] if names else list(cfg.teachers)
    if not teachers:
        raise ConfigError(f"no teachers in the config: add entries under 'teachers' (see {cfg.experiment})")

    def load(teacher: TeacherConfig) -> tuple[ModelSpec, nn.Module, Checkpoint, InferenceConfig]:
        spec = get_spec(teacher.arch)
        model, ckpt = build_from_checkpoint(
            teacher.checkpoint, teacher.arch, in_channels, len(class_names), teacher.args
        )
        inference = cfg.inference_for(teacher)
        for case_id in case_ids:
            check_window(spec, inference, store.case_shape(case_id), teacher.args)
        return spec, model, ckpt, inference

    for teacher in teachers:  # check every teacher before writing anything; keep none in memory
        load(teacher)

    device = resolve_device(cfg.training.device)
    p = cfg.distillation.attention.p
    summary = CacheSummary()
    for teacher in teachers:  # one teacher in memory at a time
        started = time.perf_counter()
        spec, model, ckpt, inference = load(teacher)
        sha = file_sha256(teacher.checkpoint)
        store.write_teacher_metadata(
            teacher.name,
            {
                "arch": teacher.arch,
                "args": teacher.args,
                "in_channels": in_channels,
                "out_channels": len(class_names),
                "class_names": class_names,
                "checkpoint_path": str(teacher.checkpoint),
                "checkpoint_sha256": sha,
                "fold": ckpt.meta.get("fold"),
                "train_cases": ckpt.meta.get("train_cases"),
                "val_mean_dice": ckpt.meta.get("val_mean_dice"),
                "taps": {k: {"module": t.module, "stride": t.stride} for k, t in spec.taps.items()},
                "attention_p": p,
                "inference": inference.model_dump(mode="json"),
                "preprocessing_hash": store.metadata["preprocessing_hash"],
                "dataset_manifest_hash": meta["manifest_hash"],
                "software": _software(),
            },
        )
        model.to(device)
        written = skipped = 0
        for case_id in track(case_ids, f"caching {teacher.name}", enabled=progress):
            if (
                not overwrite
                and store.has_entry(teacher.name, case_id)
                and store.entry_attrs(teacher.name, case_id).get("checkpoint_sha256") == sha
            ):
                skipped += 1
                continue
            out = predict_volume(
                model, store.read_image(case_id), inference, device, spec=spec, p=p, amp=cfg.training.amp
            )
            store.write_entry(
                teacher.name, case_id, out["logits"], out["coarse"], out["fine"], checkpoint_sha256=sha
            )
            written += 1
        model.to("cpu")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        seconds = round(time.perf_counter() - started, 2)
        summary.written[teacher.name], summary.skipped[teacher.name] = written, skipped
        summary.seconds[teacher.name] = seconds
        if written:
            prov = store.teacher_metadata(teacher.name)
            store.write_teacher_metadata(teacher.name, {**prov, "cache_seconds": seconds})
    store.consolidate()
    return summary
