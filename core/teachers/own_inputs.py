"""Teachers fed their own inputs: a case read from the raw dataset, its channels in the teacher's order, and the
shape every kind shares whose teacher prepares a case its own way and runs on that grid (own preprocessing, MONAI
bundles). Their outputs are resampled onto the store's grid by :func:`core.teachers.base.teacher_outputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config, TeacherConfig
from core.errors import ConfigError, DatasetError
from core.teachers.base import EntryFields, Loader, TeacherKind, TeacherRun, register_teacher_kind

__all__ = ["channel_order", "raw_case", "register_own_grid_kind", "teacher_case_files"]

# ``(run, case_id) -> (image (C, x, y, z), affine (4, 4))``: a case prepared the teacher's way, on its own grid
Preparer = Callable[[TeacherRun, str], tuple[np.ndarray, np.ndarray]]


def channel_order(teacher: TeacherConfig, channel_names: list[str]) -> list[int]:
    """Indices of the dataset channels a teacher reads, in its order.

    Raises:
        ConfigError: the teacher reads a channel the dataset does not have.
    """
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


def raw_case(cfg: Config, teacher: TeacherConfig, case_id: str) -> tuple[Any, Any]:
    """The raw dataset (read once per process) and one case of it, for a teacher that prepares its own inputs.

    Raises:
        ConfigError: the raw dataset has no such case.
    """
    ds = _dataset(cfg)
    try:
        return ds, ds.case(case_id)
    except DatasetError:
        raise ConfigError(
            f"teacher '{teacher.name}' prepares cases from the raw dataset, which has no case '{case_id}' at "
            f"{cfg.dataset.raw_dir}; point dataset.raw_dir at the dataset the store was made from"
        ) from None


def teacher_case_files(cfg: Config, teacher: TeacherConfig, case_id: str) -> list[Path]:
    """A case's raw image files, in the teacher's channel order."""
    ds, case = raw_case(cfg, teacher, case_id)
    return [case.images[i] for i in channel_order(teacher, list(ds.channel_names))]


_DATASETS: dict[str, Any] = {}


def _dataset(cfg: Config) -> Any:
    from core.data.layouts import read_dataset

    key = str(cfg.dataset.raw_dir)
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = read_dataset(cfg.dataset)
    return _DATASETS[key]


def register_own_grid_kind(
    name: str, *, load: Loader, prepare: Preparer, entry_fields: EntryFields
) -> TeacherKind:
    """Register a kind whose teacher prepares each case its own way (``prepare``) and runs on that grid.

    Its window is checked on the first case's prepared shape while the caching run is planned, and on each case's
    before the teacher runs on it.
    """

    def predict(run: TeacherRun, case_id: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        image, affine = prepare(run, case_id)
        run.check_window(image.shape[1:], case_id)
        return run.network_outputs(image), affine

    def check_windows(run: TeacherRun, case_ids: list[str]) -> None:
        if case_ids:  # its window on its own grid: the first case now, each at run time
            image, _ = prepare(run, case_ids[0])
            run.check_window(image.shape[1:], case_ids[0])

    return register_teacher_kind(
        name, load=load, predict=predict, check_windows=check_windows, entry_fields=entry_fields
    )
