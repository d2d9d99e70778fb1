"""Registered networks (``core.models``) as teachers, two kinds:

- ``registry``: fed the store's own preprocessed volumes; its outputs are on the store's grid already.
- ``own_preprocessing``: fed its own preprocessing (``teachers[].preprocessing``: spacing, normalisation, …) and
  channels (``teachers[].channels``: a selection or another order) from the raw dataset; it runs on its own grid
  and its outputs are resampled onto the store's (docs/teachers.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.config import TeacherConfig
from core.models.registry import get_spec
from core.teachers.base import LoadedTeacher, ServedDataset, TeacherRun, register_teacher_kind
from core.teachers.own_inputs import channel_order, raw_case, register_own_grid_kind

__all__ = ["load_network"]


def load_network(teacher: TeacherConfig, dataset: ServedDataset) -> LoadedTeacher:
    """A registered network with its checkpoint's weights (eval mode, CPU) and the registry's taps.

    Args:
        teacher: the teacher (``arch``, ``args``, ``checkpoint``; ``channels`` when it reads its own).
        dataset: the dataset's channels (the teacher's own names are checked against them before anything runs)
            and classes; its fold is unused (a registered network's fold is checked against its checkpoint by the
            cache stage).
    """
    from core.models.checkpoint import build_from_checkpoint

    in_channels = len(dataset.channel_names)
    if teacher.channels is not None:
        channel_order(teacher, dataset.channel_names)  # names checked before anything runs
        in_channels = len(teacher.channels)
    model, ckpt = build_from_checkpoint(
        teacher.checkpoint, teacher.arch, in_channels, dataset.num_classes, teacher.args
    )
    return LoadedTeacher(model, get_spec(teacher.arch), ckpt.meta)


def _predict_on_store_grid(run: TeacherRun, case_id: str) -> tuple[dict[str, np.ndarray], None]:
    return run.network_outputs(run.store.read_image(case_id)), None


def _check_store_windows(run: TeacherRun, case_ids: list[str]) -> None:
    for case_id in case_ids:
        run.check_window(run.store.case_shape(case_id), case_id)


def _prepare_own_input(run: TeacherRun, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The case through TeachCache's pipeline with the teacher's ``preprocessing``, then the teacher's channels in
    its order: ``(image (C, x, y, z), affine (4, 4))`` on the teacher's grid."""
    from core.data.preprocessing import build_preprocessing, preprocess_case

    cfg, teacher = run.cfg, run.teacher
    ds, case = raw_case(cfg, teacher, case_id)
    order = channel_order(teacher, list(ds.channel_names))
    prep = teacher.preprocessing or cfg.preprocessing
    pipeline = build_preprocessing(prep, ds.channel_names, len(case.images), ds.binarise_label)
    pc = preprocess_case(pipeline, case, ds.num_classes, ds.binarise_label, ds.allow_empty_labels)
    return np.ascontiguousarray(pc.image[order]), pc.affine


def _own_entry_fields(teacher: TeacherConfig) -> dict[str, Any]:
    return {
        "teacher_preprocessing": teacher.preprocessing.model_dump(mode="json")
        if teacher.preprocessing is not None
        else None
    }


register_teacher_kind(
    "registry", load=load_network, predict=_predict_on_store_grid, check_windows=_check_store_windows
)
register_own_grid_kind(
    "own_preprocessing", load=load_network, prepare=_prepare_own_input, entry_fields=_own_entry_fields
)
