"""MONAI bundles as teachers (kind ``bundle``): network, preprocessing and sliding-window inferer from the bundle's
config (``monai.bundle``), weights from ``models/model.pt``. The teacher prepares each case with the bundle's own
preprocessing and runs on that grid; its outputs are resampled onto the store's (docs/teachers.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import InferenceConfig, TeacherConfig
from core.errors import CheckpointError, ConfigError
from core.models.registry import ModelSpec, TapSpec, get_spec
from core.teachers.base import LoadedTeacher, ServedDataset, TeacherRun
from core.teachers.own_inputs import channel_order, raw_case, register_own_grid_kind

__all__ = ["bundle_fingerprint", "load_bundle"]

# MONAI networks whose tap module paths the registry already knows (the registry entry of the same network)
_KNOWN_NETWORKS = {"DynUNet": "dynunet", "SwinUNETR": "swin_unetr", "UNETR": "unetr"}


def _bundle_config(bundle: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        path = bundle / "configs" / name
        if path.is_file():
            return path
    raise ConfigError(
        f"{bundle}: no configs/inference.json (or .yaml): a MONAI bundle folder holds configs/ and models/ "
        "(https://docs.monai.io/en/latest/mb_specification.html)"
    )


def bundle_fingerprint(bundle: Path) -> str:
    """SHA-256 of a bundle's config files (its network, preprocessing and inferer): part of an entry's key."""
    h = hashlib.sha256()
    for path in sorted((bundle / "configs").glob("*")):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _bundle_channel_names(bundle: Path) -> list[str] | None:
    meta = bundle / "configs" / "metadata.json"
    if not meta.is_file():
        return None
    try:
        image = json.loads(meta.read_text())["network_data_format"]["inputs"]["image"]
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
    channels = image.get("channel_def")
    if isinstance(channels, dict) and channels:
        return [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
    return None


def _strides(
    model: nn.Module, taps: dict[str, TapSpec], in_channels: int, roi: tuple[int, ...]
) -> tuple[dict[str, int], int]:
    """Each tap's stride, measured — one forward pass of a zero window, window size ÷ captured feature size — and
    the number of output channels (classes)."""
    from core.models.taps import TapRecorder

    with torch.no_grad(), TapRecorder(model, taps) as recorder:
        classes = int(model(torch.zeros(1, in_channels, *roi)).shape[1])
        strides = {}
        for name, feats in recorder.features.items():
            ratios = {r // s for r, s in zip(roi, feats.shape[2:], strict=True)}
            if len(ratios) != 1 or any(r % s for r, s in zip(roi, feats.shape[2:], strict=True)):
                raise ConfigError(
                    f"tap '{name}' ({taps[name].module}) gives features {tuple(feats.shape[2:])} for a window "
                    f"{roi}: not one integer stride on every axis; declare another module"
                )
            strides[name] = ratios.pop()
    return strides, classes


def _parse_bundle(bundle: Path, who: str, wanted: list[str]) -> Any:
    """The bundle's config (a ``monai.bundle.ConfigParser``), its channels checked against ``wanted``."""
    from monai.bundle import ConfigParser

    if not bundle.is_dir():
        raise ConfigError(f"{who}: the bundle folder does not exist")
    parser = ConfigParser()
    parser.read_config(str(_bundle_config(bundle)))
    parser["bundle_root"] = str(bundle)
    names = _bundle_channel_names(bundle)
    if names is not None and [n.lower() for n in names] != [n.lower() for n in wanted]:
        raise ConfigError(
            f"{who} reads channels {names} (its metadata.json), the dataset gives {wanted}; set the teacher's "
            "channels to the dataset's names in the bundle's order, or use another bundle"
        )
    return parser


def _bundle_network(parser: Any, bundle: Path, who: str) -> tuple[nn.Module, Any]:
    """The bundle's ``network_def`` with ``models/model.pt``'s weights (eval mode), and that checkpoint."""
    from core.models.checkpoint import load_checkpoint

    try:
        model = parser.get_parsed_content("network_def")
    except Exception as exc:  # MONAI raises many types for a config it cannot instantiate
        raise ConfigError(f"{who}: its network_def cannot be built ({type(exc).__name__}: {exc})") from None
    weights = bundle / "models" / "model.pt"
    if not weights.is_file():
        raise CheckpointError(f"{who}: no weights at {weights} (a bundle keeps them in models/model.pt)")
    ckpt = load_checkpoint(weights)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{who}: models/model.pt does not fit its network_def ({str(exc)[:300]})"
        ) from None
    model.eval()
    return model, ckpt


def _bundle_inference(teacher: TeacherConfig, parser: Any, who: str) -> InferenceConfig:
    """The teacher's inference block, else the bundle's sliding-window inferer."""
    inference = teacher.inference
    if inference is None and "inferer" in parser:
        inferer = parser.get_parsed_content("inferer")
        roi = getattr(inferer, "roi_size", None)
        if roi is not None:
            inference = InferenceConfig(
                roi_size=tuple(int(r) for r in roi),
                overlap=float(np.atleast_1d(getattr(inferer, "overlap", 0.5))[0]),
                sw_batch_size=int(getattr(inferer, "sw_batch_size", 1)),
                mode=str(getattr(inferer, "mode", "gaussian")).split(".")[-1].lower(),
            )
    if inference is None:
        raise ConfigError(
            f"{who}: no sliding-window inferer in its config; give the teacher an inference block"
        )
    return inference


def _bundle_taps(teacher: TeacherConfig, model: nn.Module, who: str) -> dict[str, TapSpec]:
    """The taps declared for the teacher, else those of the registered network of the same class (stride unknown)."""
    if teacher.taps is not None:
        taps = {
            k: TapSpec(module=t.module, stride=1, capture=t.capture, index=t.index)
            for k, t in teacher.taps.items()
        }
        if set(taps) != {"coarse", "fine"}:
            raise ConfigError(f"{who}: declare both taps, coarse and fine")
        return taps
    if type(model).__name__ in _KNOWN_NETWORKS:
        return get_spec(_KNOWN_NETWORKS[type(model).__name__]).taps
    raise ConfigError(
        f"{who}: TeachCache does not know where the taps of a {type(model).__name__} are; declare them: "
        "taps: {coarse: {module: <deepest encoder module>}, fine: {module: <second-to-last decoder module>}}"
    )


def load_bundle(teacher: TeacherConfig, dataset: ServedDataset) -> LoadedTeacher:
    """A bundle's network with its weights (eval mode, CPU), its preprocessing, inferer and taps (strides measured).

    Args:
        teacher: the teacher (``bundle``; ``channels``, ``inference`` and ``taps`` override the bundle's).
        dataset: the dataset's channels (the bundle reads the teacher's channels, else these) and classes (the
            network must predict as many); its fold is unused.
    """
    bundle = Path(teacher.bundle)  # type: ignore[arg-type]
    who = f"teacher '{teacher.name}' (bundle {bundle})"
    wanted, num_classes = teacher.channels or dataset.channel_names, dataset.num_classes
    parser = _parse_bundle(bundle, who, wanted)
    model, ckpt = _bundle_network(parser, bundle, who)
    preprocessing = parser.get_parsed_content("preprocessing") if "preprocessing" in parser else None
    if preprocessing is None:
        raise ConfigError(
            f"{who}: its config has no `preprocessing` (the transforms its inputs went through)"
        )
    inference = _bundle_inference(teacher, parser, who)
    taps = _bundle_taps(teacher, model, who)
    try:
        strides, classes = _strides(model, taps, len(wanted), tuple(inference.roi_size))
    except KeyError as exc:
        raise ConfigError(f"{who}: {exc.args[0]}") from None
    if classes != num_classes:
        raise ConfigError(f"{who}: its network predicts {classes} classes, the dataset has {num_classes}")
    taps = {k: replace(t, stride=strides[k]) for k, t in taps.items()}
    spec = ModelSpec(
        name=f"bundle:{teacher.name}",
        build=lambda *a, **k: model,
        coarse=taps["coarse"],
        fine=taps["fine"],
        size_divisor=max(strides.values()),
    )
    return LoadedTeacher(model, spec, ckpt.meta, inference, preprocessing)


def _prepare_bundle_input(run: TeacherRun, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The case through the bundle's own MONAI preprocessing (given ``{"image": [files]}``, in the teacher's channel
    order): ``(image (C, x, y, z), affine (4, 4))`` on the teacher's grid."""
    ds, case = raw_case(run.cfg, run.teacher, case_id)
    order = channel_order(run.teacher, list(ds.channel_names))
    files = [str(case.images[i]) for i in order] if not case.channels_in_file else [str(case.images[0])]
    out = run.loaded.preprocessing({"image": files if len(files) > 1 else files[0]})
    image = out["image"]
    return np.asarray(image.detach().cpu().numpy(), dtype=np.float32), np.asarray(
        image.affine, dtype=np.float64
    )


def _bundle_entry_fields(teacher: TeacherConfig) -> dict[str, Any]:
    return {"bundle_config_sha256": bundle_fingerprint(Path(teacher.bundle))}  # type: ignore[arg-type]


register_own_grid_kind(
    "bundle", load=load_bundle, prepare=_prepare_bundle_input, entry_fields=_bundle_entry_fields
)
