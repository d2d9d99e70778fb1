"""The one interface every kind of teacher implements, and the table of kinds (timm's registry, for teachers).

A kind (:class:`TeacherKind`) says how a teacher is loaded, how it runs on one case, how its sliding window is
checked before anything is written, and what it adds to an entry's key. Each kind module registers itself with
:func:`register_teacher_kind` when ``core.teachers`` is imported; everything else dispatches by
:attr:`core.config.TeacherConfig.kind` through :func:`load_teacher`, :func:`teacher_outputs`,
:func:`check_teacher_windows` and :func:`teacher_entry_fields`. This module imports no kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import Config, InferenceConfig, TeacherConfig
from core.errors import ConfigError
from core.inference import check_window, predict_volume
from core.models.registry import ModelSpec
from core.store.teacher_store import TeacherStore
from core.teachers.grid import to_store_grid

__all__ = [
    "EntryFields",
    "LoadedTeacher",
    "Loader",
    "Predictor",
    "ServedDataset",
    "TeacherKind",
    "TeacherRun",
    "WindowCheck",
    "check_teacher_windows",
    "list_teacher_kinds",
    "load_teacher",
    "register_teacher_kind",
    "teacher_entry_fields",
    "teacher_kind",
    "teacher_outputs",
]


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


@dataclass(frozen=True)
class TeacherRun:
    """A loaded teacher about to run over a store's cases, with the caching run's settings.

    Args:
        cfg: the experiment.
        teacher: the teacher (bound to its fold's checkpoint, if it has one per fold).
        loaded: its network, taps and feeding (:func:`load_teacher`).
        store: the store whose cases it runs on.
        device: where it runs.
        features: also return each tap's features (for sketches).
    """

    cfg: Config
    teacher: TeacherConfig
    loaded: LoadedTeacher
    store: TeacherStore
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    features: bool = False

    @property
    def inference(self) -> InferenceConfig:
        """The sliding window it runs with: a bundle's or nnU-Net's own, else the teacher's, else the experiment's."""
        return self.loaded.inference or self.cfg.inference_for(self.teacher)

    def check_window(self, shape: tuple[int, ...], case_id: str) -> None:
        """Refuse a window its network cannot use on a volume of spatial ``shape`` (:func:`core.inference.check_window`)."""
        check_window(
            self.loaded.spec,
            self.inference,
            shape,
            self.teacher.args,
            name=self.teacher.name,
            case_id=case_id,
        )

    def network_outputs(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The network over a whole image ``(C, X, Y, Z)``: :func:`core.inference.predict_volume`'s dict — logits
        ``(K, X, Y, Z)``, each tap's attention map (and features ``(C_tap, x, y, z)`` with ``features``)."""
        return predict_volume(
            self.loaded.model,
            image,
            self.inference,
            self.device,
            spec=self.loaded.spec,
            p=self.cfg.distillation.attention.p,
            amp=self.cfg.training.amp,
            features=self.features,
        )


@dataclass(frozen=True)
class ServedDataset:
    """What a teacher is loaded to serve: the dataset's channels and classes, and the fold.

    Attributes:
        channel_names: the dataset's input channels, in its order (a teacher naming its own is checked against
            them).
        num_classes: the dataset's classes, background included (the teacher must predict as many).
        fold_val: the validation cases of the fold a per-fold teacher serves (nnU-Net's splits must agree);
            ``None`` for a teacher serving every fold.
    """

    channel_names: list[str]
    num_classes: int
    fold_val: list[str] | None = None


Loader = Callable[[TeacherConfig, ServedDataset], LoadedTeacher]
Predictor = Callable[[TeacherRun, str], tuple[dict[str, np.ndarray], np.ndarray | None]]
WindowCheck = Callable[[TeacherRun, list[str]], None]
EntryFields = Callable[[TeacherConfig], dict[str, Any]]


@dataclass(frozen=True)
class TeacherKind:
    """One kind of teacher: an entry of the table.

    Attributes:
        name: what :attr:`core.config.TeacherConfig.kind` calls it.
        load: ``(teacher, dataset) -> LoadedTeacher``: its network with
            weights (eval mode, CPU) and taps; refuses channels, classes or a fold discipline that do not fit.
        predict: ``(run, case_id) -> (outputs, affine)``: one case's outputs (``predict_volume``'s dict) on the
            grid the teacher ran on, and that grid's voxel-to-world affine (``None``: the store's own grid).
        check_windows: ``(run, case_ids) -> None``: refuses window settings its network cannot use, while the
            caching run is planned (before anything is written).
        entry_fields: what it adds to an entry's key besides ``teacher_kind`` and ``channels``; ``None`` for a
            teacher fed the store's own volumes, which adds nothing.
    """

    name: str
    load: Loader
    predict: Predictor
    check_windows: WindowCheck
    entry_fields: EntryFields | None = None


_KINDS: dict[str, TeacherKind] = {}


def register_teacher_kind(
    name: str,
    *,
    load: Loader,
    predict: Predictor,
    check_windows: WindowCheck,
    entry_fields: EntryFields | None = None,
) -> TeacherKind:
    """Add a kind of teacher to the table; a second registration under the same name is an error."""
    if name in _KINDS:
        raise ValueError(f"teacher kind '{name}' is already registered")
    kind = TeacherKind(name, load, predict, check_windows, entry_fields)
    _KINDS[name] = kind
    return kind


def teacher_kind(name: str) -> TeacherKind:
    """The registered kind called ``name``; :class:`ConfigError` lists the known names otherwise."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown teacher kind '{name}'; registered: {', '.join(list_teacher_kinds())}"
        ) from None


def list_teacher_kinds() -> list[str]:
    """The registered kinds' names, sorted."""
    return sorted(_KINDS)


def load_teacher(teacher: TeacherConfig, dataset: ServedDataset) -> LoadedTeacher:
    """Build a teacher's network with its weights (eval mode, CPU) and its taps.

    Args:
        teacher: the teacher (bound to its fold's checkpoint, if it has one per fold).
        dataset: the channels and classes it serves, and the fold (:class:`ServedDataset`).
    """
    return teacher_kind(teacher.kind).load(teacher, dataset)


def teacher_outputs(run: TeacherRun, case_id: str) -> dict[str, np.ndarray]:
    """One case's outputs on the store's grid: logits ``(K, X, Y, Z)``, attention maps on the store's tap grids,
    and (with ``run.features``) tap features; a teacher that ran on its own grid is resampled
    (:func:`core.teachers.grid.to_store_grid`)."""
    out, affine = teacher_kind(run.teacher.kind).predict(run, case_id)
    if affine is None:
        return out
    store_affine = np.asarray(run.store.case_attrs(case_id)["affine"], dtype=np.float64)
    return to_store_grid(out, affine, store_affine, run.store.case_shape(case_id), run.loaded.store_strides())


def check_teacher_windows(run: TeacherRun, case_ids: list[str]) -> None:
    """Refuse window settings the teacher's network cannot use on these cases (planning, before any write)."""
    teacher_kind(run.teacher.kind).check_windows(run, case_ids)


def teacher_entry_fields(teacher: TeacherConfig) -> dict[str, Any]:
    """What a teacher not fed the store's own volumes adds to an entry's key (its kind, channels, and the kind's
    own fields: preprocessing, bundle config, nnU-Net folder)."""
    kind = teacher_kind(teacher.kind)
    if kind.entry_fields is None:
        return {}
    return {"teacher_kind": teacher.kind, "channels": teacher.channels, **kind.entry_fields(teacher)}
