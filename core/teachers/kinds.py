"""Teachers as users have them: registered networks fed the store's volumes, registered networks fed their own
preprocessing, and MONAI bundles (network, preprocessing and inferer from the bundle's config).

A teacher that sees its own inputs runs on its own grid; its outputs are then resampled onto the store's grid (the
student's preprocessed grid) — docs/teachers.md:

- logits: trilinear (MONAI ``SpatialResample``, bilinear mode) from the teacher grid's affine onto the store grid's,
  borders replicated outside the teacher's field of view. Logits, not probabilities: the store keeps scores up to a
  per-voxel shift, and interpolating log-odds keeps a boundary sharp where averaging probabilities would blur it.
- attention maps: upsampled to the teacher's full grid (trilinear), resampled onto the store grid, then averaged
  over each store tap cell (area-weighted where the store's tap grid is coarser).
- tap features (for sketches): trilinear from the teacher's tap grid onto the store's tap grid (cell centres).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import Config, InferenceConfig, TeacherConfig
from core.errors import CheckpointError, ConfigError
from core.models.registry import ModelSpec, TapSpec, get_spec

__all__ = [
    "LoadedTeacher",
    "bundle_fingerprint",
    "load_teacher",
    "prepare_teacher_input",
    "teacher_entry_fields",
    "to_store_grid",
]

# MONAI networks whose tap module paths the registry already knows (the registry entry of the same network)
_KNOWN_NETWORKS = {"DynUNet": "dynunet", "SwinUNETR": "swin_unetr", "UNETR": "unetr"}


@dataclass
class LoadedTeacher:
    """A teacher ready to run: its network (eval mode, CPU), its taps, and how it is fed."""

    model: nn.Module
    spec: ModelSpec
    meta: dict[str, Any]
    inference: InferenceConfig | None = None  # a bundle's inferer (else the config's)
    preprocessing: Any = None  # a bundle's MONAI preprocessing Compose
    extra: dict[str, Any] = field(default_factory=dict)  # nnU-Net: its networks, plans, strides

    def store_strides(self) -> dict[str, int]:
        """The strides of the tap grids its maps are stored on (its own taps', or the registry's for nnU-Net)."""
        return self.extra.get("store_strides") or {k: t.stride for k, t in self.spec.taps.items()}


# --- MONAI bundles ---------------------------------------------------------------------------------------------------


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


def _load_bundle(
    teacher: TeacherConfig, in_channels: int, num_classes: int, channel_names: list[str]
) -> LoadedTeacher:
    from monai.bundle import ConfigParser

    from core.models.checkpoint import load_checkpoint

    bundle = Path(teacher.bundle)  # type: ignore[arg-type]
    who = f"teacher '{teacher.name}' (bundle {bundle})"
    if not bundle.is_dir():
        raise ConfigError(f"{who}: the bundle folder does not exist")
    parser = ConfigParser()
    parser.read_config(str(_bundle_config(bundle)))
    parser["bundle_root"] = str(bundle)
    names = _bundle_channel_names(bundle)
    wanted = teacher.channels or channel_names
    if names is not None and [n.lower() for n in names] != [n.lower() for n in wanted]:
        raise ConfigError(
            f"{who} reads channels {names} (its metadata.json), the dataset gives {wanted}; set the teacher's "
            "channels to the dataset's names in the bundle's order, or use another bundle"
        )
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
    preprocessing = parser.get_parsed_content("preprocessing") if "preprocessing" in parser else None
    if preprocessing is None:
        raise ConfigError(
            f"{who}: its config has no `preprocessing` (the transforms its inputs went through)"
        )
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
    # taps: declared, else those of the registered network of the same class
    if teacher.taps is not None:
        taps = {
            k: TapSpec(module=t.module, stride=1, capture=t.capture, index=t.index)
            for k, t in teacher.taps.items()
        }
        if set(taps) != {"coarse", "fine"}:
            raise ConfigError(f"{who}: declare both taps, coarse and fine")
    elif type(model).__name__ in _KNOWN_NETWORKS:
        taps = get_spec(_KNOWN_NETWORKS[type(model).__name__]).taps
    else:
        raise ConfigError(
            f"{who}: TeachCache does not know where the taps of a {type(model).__name__} are; declare them: "
            "taps: {coarse: {module: <deepest encoder module>}, fine: {module: <second-to-last decoder module>}}"
        )
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


def load_teacher(
    teacher: TeacherConfig,
    in_channels: int,
    num_classes: int,
    channel_names: list[str],
    fold_val: list[str] | None = None,
) -> LoadedTeacher:
    """Build a teacher's network with its weights (eval mode, CPU) and its taps.

    Args:
        fold_val: the validation cases of the fold a per-fold nnU-Net teacher serves (its splits must agree).
    """
    from core.models.checkpoint import build_from_checkpoint

    if teacher.nnunet is not None:
        from core.teachers.nnunet import load_nnunet

        if teacher.channels is not None:
            _channel_order(teacher, channel_names)
        return load_nnunet(teacher, num_classes, channel_names, fold_val)
    if teacher.bundle is not None:
        return _load_bundle(teacher, in_channels, num_classes, channel_names)
    if teacher.channels is not None:
        _channel_order(teacher, channel_names)  # names checked before anything runs
        in_channels = len(teacher.channels)
    model, ckpt = build_from_checkpoint(
        teacher.checkpoint, teacher.arch, in_channels, num_classes, teacher.args
    )
    return LoadedTeacher(model, get_spec(teacher.arch), ckpt.meta)


def _channel_order(teacher: TeacherConfig, channel_names: list[str]) -> list[int]:
    """Indices of the dataset channels a teacher reads, in its order."""
    if teacher.channels is None:
        return list(range(len(channel_names)))
    lower = [n.lower() for n in channel_names]
    missing = [c for c in teacher.channels if c.lower() not in lower]
    if missing:
        raise ConfigError(
            f"teacher '{teacher.name}' reads channel(s) {', '.join(missing)}, which the dataset does not have "
            f"(its channels: {', '.join(channel_names)}); fix the teacher's channels"
        )
    return [lower.index(c.lower()) for c in teacher.channels]


# --- the teacher's own inputs ----------------------------------------------------------------------------------------


def prepare_teacher_input(
    cfg: Config, teacher: TeacherConfig, loaded: LoadedTeacher, case_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """The case prepared the teacher's way from its raw files: ``(image (C, X, Y, Z), affine)`` on the teacher's grid.

    A bundle's own MONAI preprocessing (given ``{"image": [files]}``), or TeachCache's pipeline with the teacher's
    ``preprocessing``; then the teacher's channels, in its order.
    """
    from core.data.preprocessing import build_preprocessing, preprocess_case

    ds, case = _raw_case(cfg, teacher, case_id)
    order = _channel_order(teacher, list(ds.channel_names))
    if loaded.preprocessing is not None:
        files = [str(case.images[i]) for i in order] if not case.channels_in_file else [str(case.images[0])]
        out = loaded.preprocessing({"image": files if len(files) > 1 else files[0]})
        image = out["image"]
        return np.asarray(image.detach().cpu().numpy(), dtype=np.float32), np.asarray(
            image.affine, dtype=np.float64
        )
    prep = teacher.preprocessing or cfg.preprocessing
    pipeline = build_preprocessing(prep, ds.channel_names, len(case.images), ds.binarise_label)
    pc = preprocess_case(pipeline, case, ds.num_classes, ds.binarise_label, ds.allow_empty_labels)
    return np.ascontiguousarray(pc.image[order]), pc.affine


def teacher_case_files(cfg: Config, teacher: TeacherConfig, case_id: str) -> list[Path]:
    """A case's raw image files, in the teacher's channel order."""
    ds, case = _raw_case(cfg, teacher, case_id)
    return [case.images[i] for i in _channel_order(teacher, list(ds.channel_names))]


def _raw_case(cfg: Config, teacher: TeacherConfig, case_id: str) -> tuple[Any, Any]:
    """The raw dataset (read once per process) and one case of it, for a teacher that prepares its own inputs."""
    from core.errors import DatasetError

    ds = _dataset(cfg)
    try:
        return ds, ds.case(case_id)
    except DatasetError:
        raise ConfigError(
            f"teacher '{teacher.name}' prepares cases from the raw dataset, which has no case '{case_id}' at "
            f"{cfg.dataset.raw_dir}; point dataset.raw_dir at the dataset the store was made from"
        ) from None


_DATASETS: dict[str, Any] = {}


def _dataset(cfg: Config) -> Any:
    from core.data.layouts import read_dataset

    key = str(cfg.dataset.raw_dir)
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = read_dataset(cfg.dataset)
    return _DATASETS[key]


# --- onto the store's grid ---------------------------------------------------------------------------------------


def _resample(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape: tuple[int, ...],
              padding: str = "border") -> np.ndarray:  # fmt: skip
    """(C, …) float32 from one grid onto another, trilinear (MONAI SpatialResample)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)), affine=torch.as_tensor(src_affine)
    )
    out = SpatialResample(mode="bilinear", padding_mode=padding, dtype=torch.float64)(
        src, dst_affine=torch.as_tensor(dst_affine), spatial_size=tuple(int(s) for s in shape)
    )
    return np.asarray(out.numpy(), dtype=np.float32)


def _tap_affine(affine: np.ndarray, stride: Any) -> np.ndarray:
    """The affine of a tap grid whose voxel ``u`` covers image voxels ``[u·s, (u+1)·s)``: centred on them (``s`` one
    stride, or one per axis)."""
    s = np.broadcast_to(np.asarray(stride, dtype=np.float64), (3,))
    scale = np.eye(4)
    scale[:3, :3] = np.diag(s)
    scale[:3, 3] = (s - 1) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def to_store_grid(
    out: dict[str, np.ndarray],
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    store_strides: dict[str, int],
) -> dict[str, np.ndarray]:
    """A teacher's outputs on its own grid (``predict_volume``'s dict) resampled onto the store's grid, its maps
    onto tap grids of ``store_strides``."""
    result = {"logits": _resample(out["logits"], src_affine, dst_affine, dst_shape)}
    src_shape = out["logits"].shape[1:]
    for kind, stride in store_strides.items():
        cells = tuple(s // stride for s in dst_shape)
        src_stride = tuple(a / m for a, m in zip(src_shape, out[kind].shape, strict=True))
        full = F.interpolate(torch.from_numpy(out[kind])[None, None], size=tuple(src_shape), mode="trilinear",
                             align_corners=False)[0].numpy()  # fmt: skip
        on_store = torch.from_numpy(_resample(full, src_affine, dst_affine, dst_shape))[None]
        result[kind] = F.adaptive_avg_pool3d(on_store, cells)[0, 0].numpy()  # area-weighted onto the tap grid
        if f"{kind}_features" in out:
            result[f"{kind}_features"] = _resample(
                out[f"{kind}_features"],
                _tap_affine(src_affine, src_stride),
                _tap_affine(dst_affine, stride),
                cells,
            )
    return result


def teacher_entry_fields(teacher: TeacherConfig) -> dict[str, Any]:
    """What a non-registry teacher adds to an entry's key (its preprocessing, channels, bundle config)."""
    if teacher.kind == "registry":
        return {}
    fields: dict[str, Any] = {"teacher_kind": teacher.kind, "channels": teacher.channels}
    if teacher.nnunet is not None:
        from core.teachers.nnunet import nnunet_folds
        from core.user_cache import FileHashCache, default_hash_cache

        # every entry's key names them: hashed once, then remembered by (path, size, mtime)
        hashes = FileHashCache(default_hash_cache())
        file_sha256 = hashes.sha256
        results = Path(teacher.nnunet.results)
        fields["nnunet"] = {
            "configuration": teacher.nnunet.configuration or results.name.split("__")[-1],
            "folds": nnunet_folds(teacher),
            "mirror": teacher.nnunet.mirror,
            "plans_sha256": file_sha256(results / "plans.json")
            if (results / "plans.json").is_file()
            else None,
            "checkpoints_sha256": [
                file_sha256(p) if p.is_file() else None
                for p in (results / f"fold_{f}" / teacher.nnunet.checkpoint for f in nnunet_folds(teacher))
            ],
        }
        hashes.save()
    elif teacher.bundle is not None:
        fields["bundle_config_sha256"] = bundle_fingerprint(Path(teacher.bundle))
    else:
        fields["teacher_preprocessing"] = (
            teacher.preprocessing.model_dump(mode="json") if teacher.preprocessing is not None else None
        )
    return fields
