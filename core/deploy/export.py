"""Export a trained student to run without this project: TorchScript (``.pt``) or ONNX (``.onnx``), with the inputs it
expects recorded beside it as a small JSON (``docs/deploy.md``).

The exported network maps a (B, C, X, Y, Z) float32 image, preprocessed as the JSON says, to (B, K, X, Y, Z)
logits; every spatial size must be a multiple of ``model.size_divisor`` (the sliding window's ``roi_size`` is).
Each export is checked before it is published: the written file is loaded back and run on a random window, and
its logits must match PyTorch's within ``tolerance``; the difference is recorded in the JSON.

ONNX needs the optional ``deploy`` extra (``pip install 'teachcache[deploy]'``: ``onnx`` to write, ``onnxruntime``
to check) and uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data.preprocessing import NormalizeModalitiesd
from core.deploy.student_runs import Student
from core.errors import TeachCacheError

__all__ = ["EXPORT_FORMAT", "RUNTIMES", "export_student", "exported_record", "record_path"]

EXPORT_FORMAT = "teachcache-student"
RUNTIMES = {".pt": "torchscript", ".ts": "torchscript", ".onnx": "onnx"}
TOLERANCE = 1e-4


def record_path(model_path: Path) -> Path:
    """The JSON beside an exported model: ``student.pt`` → ``student.pt.json`` (a TorchScript and an ONNX export of
    one name each keep their own)."""
    return model_path.with_name(f"{model_path.name}.json")


def exported_record(student: Student, model_file: str, runtime: str) -> dict[str, Any]:
    """What a deployment needs to feed the exported student as it was trained (the JSON beside the model)."""
    rec, pre = student.record, student.record.preprocessing
    norm = NormalizeModalitiesd(
        keys="image", channel_names=rec.channel_names, ct_window=pre.ct_window, overrides=pre.normalization
    )
    channels = []
    for index, name in enumerate(rec.channel_names):
        scheme = norm.scheme(name)
        entry: dict[str, Any] = {"index": index, "name": name, "normalisation": scheme}
        if scheme == "ct":
            entry["window"] = list(pre.ct_window)  # clip to the window, then scale to [0, 1]
        channels.append(entry)
    return {
        "format": EXPORT_FORMAT,
        "version": 1,
        "model": {
            "file": model_file,
            "runtime": runtime,
            "arch": student.spec.name,
            "args": student.args,
            "input": {"name": "image", "layout": "B, C, X, Y, Z", "dtype": "float32", "voxel_order": "RAS"},
            "output": {
                "name": "logits",
                "layout": "B, K, X, Y, Z",
                "dtype": "float32",
                "activation": "softmax",
            },
            "size_divisor": student.spec.size_divisor,
        },
        "channels": channels,
        "classes": list(rec.class_names),
        "preprocessing": {
            "orientation": "RAS",
            "spacing": list(pre.target_spacing),
            "resample": "trilinear; modalities on other grids resampled onto the reference channel's grid first",
            "reference_channel": pre.reference_channel,
            "ct_window": list(pre.ct_window),
            "foreground_crop": {
                "channel": pre.foreground_channel,
                "threshold": pre.foreground_threshold,
                "margin": pre.crop_margin,
            },
            "min_size": list(pre.min_size),
            "size_divisor": pre.size_divisor,
            "pad_mode": "replicate",
        },
        "window": {
            "roi_size": list(rec.inference.roi_size),
            "overlap": rec.inference.overlap,
            "mode": rec.inference.mode,
            "training_patch_size": list(rec.patch_size) if rec.patch_size else None,
        },
        "source": {"checkpoint": str(student.checkpoint), "sha256": student.sha256, "fold": student.fold},
    }


def _torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape checks: sizes are multiples of the divisor
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(path))


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x).numpy()


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise TeachCacheError(
            "ONNX export needs the onnx package, which is not installed: pip install 'teachcache[deploy]' (or "
            "export TorchScript: -o student.pt)"
        ) from None
    spatial = {0: "batch", 2: "x", 3: "y", 4: "z"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": spatial, "logits": spatial},
            opset_version=17,
        )


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError:
        raise TeachCacheError(
            "checking the ONNX export needs onnxruntime, which is not installed: pip install 'teachcache[deploy]'"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def _runtime(output: Path) -> str:
    """The format ``output``'s suffix names (``RUNTIMES``).

    Raises:
        TeachCacheError: another suffix, or a missing output folder.
    """
    runtime = RUNTIMES.get(output.suffix.lower())
    if runtime is None:
        raise TeachCacheError(
            f"{output}: the suffix says which format to write: .pt (TorchScript) or .onnx (ONNX)"
        )
    if not output.parent.is_dir():
        raise TeachCacheError(f"folder not found: {output.parent}; create it first")
    return runtime


def _export_and_run(runtime: str, model: torch.nn.Module, x: torch.Tensor, path: Path) -> np.ndarray:
    """Export ``model`` to ``path`` in ``runtime``'s format and run the export on ``x`` (B, C, X, Y, Z).

    Returns:
        (B, K, X, Y, Z) logits of the exported model.
    """
    if runtime == "torchscript":
        _torchscript(model, x, path)
        return _run_torchscript(path, x)
    _onnx(model, x, path)
    return _run_onnx(path, x)


def _publish(tmp: Path, output: Path, record: dict[str, Any]) -> None:
    """Write the record beside the model under a temporary name, then rename both into place."""
    json_path = record_path(output)
    json_tmp = json_path.with_name(f".{json_path.name}.tmp")
    json_tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, output)
    os.replace(json_tmp, json_path)


def export_student(
    student: Student, output: Path, tolerance: float = TOLERANCE, seed: int = 0
) -> dict[str, Any]:
    """Write ``student`` as TorchScript or ONNX (by ``output``'s suffix) and its inputs as ``record_path(output)``.

    Args:
        student: the loaded student (:func:`core.deploy.student_runs.load_student`).
        output: ``.pt`` / ``.ts`` (TorchScript) or ``.onnx``.
        tolerance: the largest absolute logit difference from PyTorch accepted on the check window.
        seed: of the random check window.

    Returns:
        The JSON written beside the model, with ``check``: the window's shape and the maximum absolute difference.

    Raises:
        TeachCacheError: another suffix, a missing output folder, ONNX without its packages, or an export whose
            logits differ from PyTorch's by more than ``tolerance`` (nothing is published then).
    """
    runtime = _runtime(output)
    model = student.model.to("cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    window = tuple(student.record.inference.roi_size)
    x = torch.randn(1, student.in_channels, *window, generator=generator)
    with torch.no_grad():
        expected = model(x).numpy()
    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")
    record = exported_record(student, output.name, runtime)
    try:
        difference = float(np.abs(_export_and_run(runtime, model, x, tmp) - expected).max())
        if not difference <= tolerance:
            raise TeachCacheError(
                f"the {runtime} export of {student.checkpoint} differs from PyTorch by {difference:.3g} on a random "
                f"window (tolerance {tolerance:g}); it was not written"
            )
        record["check"] = {
            "input_shape": list(x.shape),
            "max_abs_difference": difference,
            "tolerance": tolerance,
            "torch": torch.__version__,
        }
        _publish(tmp, output, record)
    finally:
        tmp.unlink(missing_ok=True)
        record_path(output).with_name(f".{record_path(output).name}.tmp").unlink(missing_ok=True)
    return record
