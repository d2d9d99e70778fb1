"""Checkpoints: saved atomically as plain dicts that record how to rebuild the network; loaded safely.

A TeachCache checkpoint is ``{"teachcache_checkpoint": 1, "arch", "in_channels", "out_channels", "args",
"state_dict", "meta"}`` — tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads it.
Foreign checkpoints are accepted too: a bare state dict, ``{"state_dict": ...}``, ``{"model": ...}``,
nnU-Net's ``{"network_weights": ...}``, a MONAI bundle's ``model.pt``, with or without DDP's ``module.`` prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import CheckpointError
from core.models.registry import create_model

__all__ = [
    "Checkpoint",
    "add_checkpoint_meta",
    "build_from_checkpoint",
    "file_sha256",
    "load_checkpoint",
    "save_checkpoint",
]

_FORMAT_KEY = "teachcache_checkpoint"
_WRAPPER_KEYS = ("state_dict", "model", "network_weights", "model_state_dict")


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``arch`` is ``None`` for foreign files that do not say what they hold."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    arch: str | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    args: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    arch: str,
    in_channels: int,
    out_channels: int,
    args: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        _FORMAT_KEY: 1,
        "arch": arch,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "args": _jsonable(args),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": _jsonable(meta or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def add_checkpoint_meta(path: str | Path, extra: dict[str, Any]) -> None:
    """Add ``extra`` to the ``meta`` of a checkpoint written by :func:`save_checkpoint`, atomically (what a run decides
    after it saved the weights, e.g. its postprocessing)."""
    path = Path(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["meta"] = {**payload.get("meta", {}), **_jsonable(extra)}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: no state dict found (expected a dict of tensors, possibly under one of "
            f"{', '.join(_WRAPPER_KEYS)})"
        )
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def _well_formed_but_unsafe(path: Path, message: str) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a well-formed file for the objects it holds.

    torch says "Unsupported global" for a zip checkpoint that names arbitrary classes, but only "Unsupported
    operand" for a legacy pickle — as it does for random bytes. So a legacy file counts as unsafe only when
    ``pickletools`` (which reads opcodes and executes nothing) parses it to its end.
    """
    if zipfile.is_zipfile(path):
        return "unsupported global" in message.lower()
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
    except Exception:
        return False
    return True


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint with ``torch.load(weights_only=True)``; never unpickles arbitrary objects.

    Raises:
        CheckpointError: the file is missing, needs arbitrary unpickling (refused), or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (train the demo teachers with `make teachers`, or point the "
            "teacher's checkpoint key at an existing file)"
        )
    unreadable = (
        f"{path}: not a readable PyTorch checkpoint — neither torch.save's zip format nor a pickle; the file may be "
        "truncated or something else. Point the checkpoint key at the .pth/.pt file torch.save wrote"
    )
    with open(path, "rb") as f:
        head = f.read(4)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # zip archive, or pickle protocol ≥ 2
        raise CheckpointError(unreadable)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _well_formed_but_unsafe(path, str(exc)):  # a damaged file, not an unsafe one
            raise CheckpointError(unreadable) from None
        raise CheckpointError(
            f"{path}: refused to load — it needs unpickling arbitrary Python objects, which can run code "
            f"({str(exc).splitlines()[0]}). Re-save it as a plain state dict: torch.save(model.state_dict(), ...)"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{unreadable} ({exc})") from None
    if isinstance(obj, dict) and obj.get(_FORMAT_KEY) == 1:
        return Checkpoint(
            path=path,
            state_dict=_extract_state_dict(obj["state_dict"], path),
            arch=obj["arch"],
            in_channels=obj["in_channels"],
            out_channels=obj["out_channels"],
            args=dict(obj.get("args", {})),
            meta=dict(obj.get("meta", {})),
        )
    return Checkpoint(path=path, state_dict=_extract_state_dict(obj, path))


def _mismatch_report(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    lines = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = "; ".join(items[:6]) + (f"; … {len(items) - 6} more" if len(items) > 6 else "")
            lines.append(f"  {title} ({len(items)}): {shown}")
    return "\n".join(lines)


def build_from_checkpoint(
    path: str | Path, arch: str, in_channels: int, out_channels: int, args: dict[str, Any]
) -> tuple[nn.Module, Checkpoint]:
    """Build ``arch`` with ``args`` and load the checkpoint's weights into it, checking that they fit.

    Args:
        path: the checkpoint file.
        arch: the registry name the config declares.
        in_channels: the dataset's number of modalities.
        out_channels: the dataset's number of classes.
        args: the constructor arguments the config declares.

    Returns:
        ``(model, checkpoint)`` with the model in eval mode on the CPU.

    Raises:
        CheckpointError: the checkpoint records another architecture, channel count, class count or arguments,
            or its weights do not fit (the message lists missing, unexpected and mis-shaped keys and the likely
            cause).
    """
    ckpt = load_checkpoint(path)
    if ckpt.arch is not None:
        if ckpt.arch != arch:
            raise CheckpointError(
                f"{path} holds a '{ckpt.arch}' network but the config declares '{arch}'; fix the teacher's arch "
                "or its checkpoint path"
            )
        if ckpt.in_channels != in_channels or ckpt.out_channels != out_channels:
            raise CheckpointError(
                f"{path} was trained for {ckpt.in_channels} input channel(s) and {ckpt.out_channels} class(es); "
                f"this dataset has {in_channels} modalities and {out_channels} classes"
            )
        if _jsonable(ckpt.args) != _jsonable(args):
            diff = sorted(set(ckpt.args) ^ set(args))
            changed = sorted(
                k for k in set(ckpt.args) & set(args) if _jsonable(ckpt.args[k]) != _jsonable(args[k])
            )
            raise CheckpointError(
                f"{path} was built with args {ckpt.args}, the config declares {args} "
                f"(differing: {', '.join(diff + changed)}); copy the checkpoint's args into the config"
            )
    model = create_model(arch, in_channels, out_channels, args)
    report = _mismatch_report(model, ckpt.state_dict)
    if report:
        raise CheckpointError(
            f"{path} does not fit '{arch}' with {in_channels} input channel(s), {out_channels} class(es) and args "
            f"{args}:\n{report}\nLikely cause: a checkpoint of another architecture, modality count, class count "
            "or width"
        )
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    return model, ckpt
