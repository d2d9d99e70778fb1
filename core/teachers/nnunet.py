"""nnU-Net v2 teachers (kind ``nnunet``): a trained model folder (``nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>``) run
with nnU-Net's own code — its network from ``plans.json``, its preprocessing (transpose, crop to non-zero,
normalisation, resampling to the configuration's spacing) — and TeachCache's sliding window with taps on the
result. The optional ``teachcache[nnunet]`` extra (``nnunetv2``) is needed; docs/teachers.md.

The preprocessed grid's voxel-to-world matrix is derived from what nnU-Net records for the case (transpose, crop
box, shapes before and after resampling; its resampling maps voxel centres, ``x_in = (x_out + ½)·in/out − ½``) and
the image file's affine, so the outputs are resampled onto the store's grid like any teacher fed its own way.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import Config, InferenceConfig, TeacherConfig
from core.errors import CheckpointError, ConfigError
from core.models.registry import ModelSpec, TapSpec
from core.teachers.base import LoadedTeacher, ServedDataset, TeacherRun, register_teacher_kind
from core.teachers.own_inputs import channel_order, teacher_case_files

__all__ = ["load_nnunet", "nnunet_folds", "predict_nnunet"]


def _nnunetv2() -> Any:
    try:
        import nnunetv2
    except ImportError:
        raise ConfigError(
            "nnU-Net teachers need nnunetv2, which is not installed: pip install 'teachcache[nnunet]'"
        ) from None
    return nnunetv2


def _safe_globals() -> list[Any]:
    """What nnU-Net's checkpoints hold besides tensors and plain containers (numpy scalars in its logs and EMA):
    allow-listed for ``torch.load(weights_only=True)``, nothing else."""
    from numpy import dtypes
    from numpy._core import multiarray

    return [multiarray.scalar, np.dtype, dtypes.Float32DType, dtypes.Float64DType]


def _load_weights(path: Path, who: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{who}: no checkpoint at {path} (nnUNetv2_train writes fold_<k>/checkpoint_final.pth)"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError naming the type it would need
        raise CheckpointError(
            f"{who}: {path} holds objects outside what nnU-Net checkpoints store (tensors, numbers, numpy scalars), "
            f"so it is not loaded (torch.load weights_only=True): {str(exc).splitlines()[-1][:200]}"
        ) from None


def _read_json(path: Path, who: str, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"{who}: {path.parent} has no {path.name}; nnunet.results must be a trained model folder "
            f"(nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres) holding {what}"
        )
    return json.loads(path.read_text())


def nnunet_folds(teacher: TeacherConfig) -> list[int]:
    """The nnU-Net folds a (fold-bound) teacher runs: its listed ones, or the project's fold it is bound to."""
    assert teacher.nnunet is not None
    if teacher.nnunet.folds is not None:
        return list(teacher.nnunet.folds)
    return [int(Path(teacher.checkpoint).parent.name.removeprefix("fold_"))]


def _configuration_name(teacher: TeacherConfig) -> str:
    """The nnU-Net configuration the teacher runs: named, else the one its results folder was trained with."""
    assert teacher.nnunet is not None
    return teacher.nnunet.configuration or Path(teacher.nnunet.results).name.split("__")[-1]


def _splits(teacher: TeacherConfig) -> list[dict[str, list[str]]] | None:
    import os

    assert teacher.nnunet is not None
    candidates = [teacher.nnunet.splits] if teacher.nnunet.splits is not None else []
    dataset = Path(teacher.nnunet.results).parent.name
    if os.environ.get("nnUNet_preprocessed"):  # noqa: SIM112 (nnU-Net's own name)
        candidates.append(Path(os.environ["nnUNet_preprocessed"]) / dataset / "splits_final.json")  # noqa: SIM112
    for path in candidates:
        if path is not None and Path(path).is_file():
            return json.loads(Path(path).read_text())
    return None


def _read_folder(
    teacher: TeacherConfig, num_classes: int, channel_names: list[str]
) -> tuple[Path, str, dict[str, Any], dict[str, Any], list[str]]:
    """``(results folder, who, plans, dataset.json, its channel names)``; its channels and classes checked against
    the dataset's."""
    assert teacher.nnunet is not None
    results = Path(teacher.nnunet.results)
    who = f"teacher '{teacher.name}' (nnU-Net {results})"
    if not results.is_dir():
        raise ConfigError(f"{who}: the folder does not exist")
    plans = _read_json(results / "plans.json", who, "plans.json, dataset.json and fold_<k>/ checkpoints")
    dataset_json = _read_json(
        results / "dataset.json", who, "plans.json, dataset.json and fold_<k>/ checkpoints"
    )
    names = [str(dataset_json["channel_names"][str(i)]) for i in range(len(dataset_json["channel_names"]))]
    wanted = teacher.channels or channel_names
    if [n.lower() for n in names] != [n.lower() for n in wanted]:
        raise ConfigError(
            f"{who} was trained on channels {names} (its dataset.json), the dataset gives {wanted}; set the "
            "teacher's channels to the dataset's names in nnU-Net's order"
        )
    classes = len(dataset_json["labels"])
    if classes != num_classes:
        raise ConfigError(
            f"{who} predicts {classes} classes (its dataset.json labels), the dataset has {num_classes}"
        )
    return results, who, plans, dataset_json, names


def _configuration(teacher: TeacherConfig, results: Path, who: str, plans: dict[str, Any]) -> tuple[Any, Any]:
    """``(plans manager, configuration manager)`` of the teacher's configuration (named, else the folder's)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = _configuration_name(teacher)
    manager = PlansManager(plans)
    try:
        return manager, manager.get_configuration(configuration)
    except Exception:
        raise ConfigError(
            f"{who}: its plans have no configuration '{configuration}' ({', '.join(plans.get('configurations', {}))})"
        ) from None


def _load_folds(
    teacher: TeacherConfig, who: str, managers: tuple[Any, Any], dataset_json: dict[str, Any], channels: int,
    splits: list[dict[str, list[str]]] | None,
) -> tuple[list[torch.nn.Module], Any, set[str]]:  # fmt: skip
    """Each fold's network with its weights (eval mode), the last checkpoint's mirror axes, and the cases nnU-Net's
    splits trained those folds on."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    assert teacher.nnunet is not None
    manager, config_manager = managers
    results = Path(teacher.nnunet.results)
    networks, mirror_axes, train_cases = [], None, set()
    for fold in nnunet_folds(teacher):
        ckpt = _load_weights(results / f"fold_{fold}" / teacher.nnunet.checkpoint, who)
        trainer = _trainer_class(ckpt.get("trainer_name"), nnUNetTrainer)
        network = trainer.build_network_architecture(
            manager,
            config_manager,
            channels,
            manager.get_label_manager(dataset_json).num_segmentation_heads,
            enable_deep_supervision=False,
        )
        try:
            network.load_state_dict(ckpt["network_weights"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"{who}: fold {fold}'s weights do not fit its plans ({str(exc)[:200]})"
            ) from None
        networks.append(network.eval())
        mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
        if splits is not None:
            if fold >= len(splits):
                raise ConfigError(f"{who}: nnU-Net's splits have no fold {fold}")
            train_cases |= set(splits[fold]["train"])
    return networks, mirror_axes, train_cases


def _fold_meta(
    teacher: TeacherConfig, who: str, splits: list[dict[str, list[str]]] | None, train_cases: set[str],
    fold_val: list[str] | None,
) -> dict[str, Any]:  # fmt: skip
    """The loaded teacher's ``meta`` (its fold, its training cases); a per-fold teacher whose nnU-Net fold trained
    on this project's validation cases of that fold (or whose splits are unknown) is refused."""
    assert teacher.nnunet is not None
    folds = nnunet_folds(teacher)
    meta: dict[str, Any] = {}
    if teacher.nnunet.folds is None:  # per fold: nnU-Net's fold k serves this project's fold k
        if splits is None:
            raise ConfigError(
                f"{who}: its fold {folds[0]} is used for this project's fold {folds[0]}, which is only sound when "
                "both splits agree, and nnU-Net's splits_final.json was not found; set nnunet.splits to it (in "
                "nnUNet_preprocessed/<Dataset>/), or list the folds to use for every fold (nnunet.folds)"
            )
        leaking = sorted(set(fold_val or []) & train_cases)
        if leaking:
            raise ConfigError(
                f"{who}: nnU-Net's fold {folds[0]} trained on {len(leaking)} of this project's fold-{folds[0]} "
                f"validation cases ({', '.join(leaking[:5])}); the two splits differ. Use nnU-Net's "
                "splits_final.json as splits.file, or list the folds to use (nnunet.folds) and accept the leakage "
                "check of stage 2"
            )
        meta["fold"] = folds[0]
    if splits is not None:
        meta["train_cases"] = sorted(train_cases)
    return meta


def _nnunet_spec(
    teacher: TeacherConfig, network: torch.nn.Module, channels: int, patch: tuple[int, ...]
) -> tuple[ModelSpec, dict[str, tuple[int, ...]]]:
    """The network's taps — the bottleneck (deepest encoder stage) and the second-to-last decoder stage — with
    their measured per-axis strides."""
    n_dec = len(network.decoder.stages)
    taps = {
        "coarse": TapSpec(f"encoder.stages.{len(network.encoder.stages) - 1}", stride=1),
        "fine": TapSpec(f"decoder.stages.{n_dec - 2}", stride=1),
    }
    axis_strides = _axis_strides(network, taps, channels, patch)
    taps = {k: TapSpec(t.module, stride=int(max(axis_strides[k]))) for k, t in taps.items()}
    spec = ModelSpec(
        name=f"nnunet:{teacher.name}",
        build=lambda *a, **k: network,
        coarse=taps["coarse"],
        fine=taps["fine"],
        size_divisor=int(max(axis_strides["coarse"])),
    )
    return spec, axis_strides


def load_nnunet(teacher: TeacherConfig, dataset: ServedDataset) -> LoadedTeacher:
    """Network(s), plans and taps of an nnU-Net teacher; checks channels, classes and fold discipline.

    Args:
        teacher: the teacher (``nnunet``; ``channels`` when the dataset's differ in names or order).
        dataset: the dataset's channels (nnU-Net's own come from its dataset.json, checked by name) and classes,
            and the project fold's validation cases (per-fold teachers: nnU-Net's fold must hold them all in its
            validation set).
    """
    if teacher.channels is not None:
        channel_order(teacher, dataset.channel_names)
    _nnunetv2()
    assert teacher.nnunet is not None
    results, who, plans, dataset_json, names = _read_folder(
        teacher, dataset.num_classes, dataset.channel_names
    )
    manager, config_manager = _configuration(teacher, results, who, plans)
    splits = _splits(teacher)
    networks, mirror_axes, train_cases = _load_folds(
        teacher, who, (manager, config_manager), dataset_json, len(names), splits
    )
    meta = _fold_meta(teacher, who, splits, train_cases, dataset.fold_val)
    patch = tuple(int(p) for p in config_manager.patch_size)
    spec, axis_strides = _nnunet_spec(teacher, networks[0], len(names), patch)
    inference = teacher.inference or InferenceConfig(
        roi_size=patch, overlap=0.5, sw_batch_size=1, mode="gaussian"
    )
    loaded = LoadedTeacher(networks[0], spec, meta, inference)
    loaded.extra = {
        "networks": networks,
        "plans_manager": manager,
        "configuration_manager": config_manager,
        "dataset_json": dataset_json,
        "axis_strides": axis_strides,
        "mirror_axes": tuple(mirror_axes or ()),
        "store_strides": {"coarse": 16, "fine": 2},
    }
    return loaded


def _trainer_class(name: str | None, default: Any) -> Any:
    """The nnU-Net trainer class a checkpoint names (custom trainers build other networks), else nnUNetTrainer."""
    if not name:
        return default
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(
        str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
        name,
        "nnunetv2.training.nnUNetTrainer",
    )
    if found is None:
        raise ConfigError(
            f"nnU-Net trainer '{name}' (named in the checkpoint) is not installed with nnunetv2"
        )
    return found


def _axis_strides(
    network: torch.nn.Module, taps: dict[str, TapSpec], channels: int, patch: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """Each tap's stride per axis, measured: one forward pass of a zero patch, patch size ÷ feature size."""
    from core.models.taps import TapRecorder

    with torch.no_grad(), TapRecorder(network, taps) as recorder:
        network(torch.zeros(1, channels, *patch))
        return {
            k: tuple(p // s for p, s in zip(patch, f.shape[2:], strict=True))
            for k, f in recorder.features.items()
        }


def _preprocessed_affine(properties: dict[str, Any], data_shape: tuple[int, ...], transpose: list[int],
                         file_affine: np.ndarray) -> np.ndarray:  # fmt: skip
    """Voxel-to-world (RAS) of nnU-Net's preprocessed array, from what its preprocessing recorded.

    Preprocessed voxel p (axes after ``transpose_forward``) → cropped array coordinate (p + ½)·crop/new − ½ → + crop
    start → original array axis ``transpose[i]`` (nnU-Net's reader gives (z, y, x): file voxel axis 2 − a) → world
    through the file's affine.
    """
    crop = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=np.float64)
    start = np.asarray([b[0] for b in properties["bbox_used_for_cropping"]], dtype=np.float64)
    scale = crop / np.asarray(data_shape, dtype=np.float64)
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for i, axis in enumerate(transpose):
        row = 2 - axis
        m[row, i] = scale[i]
        m[row, 3] = 0.5 * scale[i] - 0.5 + start[i]
    return np.asarray(file_affine, dtype=np.float64) @ m


def predict_nnunet(cfg: Config, teacher: TeacherConfig, loaded: LoadedTeacher, case_files: list[Path], device: torch.device,
                   p: float, features: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
    """Run an nnU-Net teacher on one case its own way: ``(outputs on its preprocessed grid, that grid's affine)``.

    Folds (and mirrored copies, with ``nnunet.mirror``) are averaged in probability space (logits = log of the
    mean probability) and their maps and features averaged.
    """
    import nibabel as nib

    from core.inference import predict_volume

    extra = loaded.extra
    pm, cm = extra["plans_manager"], extra["configuration_manager"]
    preprocessor = cm.preprocessor_class(verbose=False)
    data, _, props = preprocessor.run_case([str(f) for f in case_files], None, pm, cm, extra["dataset_json"])
    shape = tuple(int(s) for s in data.shape[1:])
    multiple = np.asarray(extra["axis_strides"]["coarse"])
    target = [
        max(int(np.ceil(s / m) * m), int(r))
        for s, m, r in zip(shape, multiple, loaded.inference.roi_size, strict=True)
    ]
    padded = np.pad(data, [(0, 0)] + [(0, t - s) for t, s in zip(target, shape, strict=True)], mode="edge")
    affine = _preprocessed_affine(
        props, shape, list(pm.transpose_forward), nib.load(str(case_files[0])).affine
    )
    flips = [()]
    if teacher.nnunet is not None and teacher.nnunet.mirror:
        axes = [a + 1 for a in extra["mirror_axes"]]
        flips = [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]
    total: dict[str, np.ndarray] = {}
    runs = 0
    for network in extra["networks"]:
        network.to(device)
        for flip in flips:
            image = np.flip(padded, axis=flip).copy() if flip else padded
            out = predict_volume(network, image, loaded.inference, device, spec=loaded.spec, p=p, amp=cfg.training.amp,
                                 features=features)  # fmt: skip
            out["probs"] = torch.softmax(torch.from_numpy(out.pop("logits")), dim=0).numpy()
            for key, value in out.items():
                if flip:
                    value = np.flip(value, axis=tuple(a - (0 if value.ndim == 4 else 1) for a in flip)).copy()
                total[key] = total.get(key, 0.0) + value
            runs += 1
        network.to("cpu")
    mean = {k: v / runs for k, v in total.items()}
    mean["logits"] = np.log(np.clip(mean.pop("probs"), 1e-8, None)).astype(np.float32)
    return mean, affine


def _predict_case(run: TeacherRun, case_id: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """nnU-Net's own preprocessing of the case's raw files, its folds (and mirrors) averaged."""
    files = teacher_case_files(run.cfg, run.teacher, case_id)
    return predict_nnunet(
        run.cfg, run.teacher, run.loaded, files, run.device, run.cfg.distillation.attention.p, run.features
    )


def _check_windows(run: TeacherRun, case_ids: list[str]) -> None:
    """Nothing to check: :func:`predict_nnunet` pads each case to a multiple of the coarse stride and the patch."""


def _entry_fields(teacher: TeacherConfig) -> dict[str, Any]:
    """The configuration, folds and mirroring, and the SHA-256 of the plans and of each fold's checkpoint."""
    from core.user_cache import FileHashCache, default_hash_cache

    assert teacher.nnunet is not None
    # every entry's key names them: hashed once, then remembered by (path, size, mtime)
    hashes = FileHashCache(default_hash_cache())
    file_sha256 = hashes.sha256
    results = Path(teacher.nnunet.results)
    fields = {
        "nnunet": {
            "configuration": _configuration_name(teacher),
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
    }
    hashes.save()
    return fields


register_teacher_kind(
    "nnunet",
    load=load_nnunet,
    predict=_predict_case,
    check_windows=_check_windows,
    entry_fields=_entry_fields,
)
