"""A trained student as ``teachcache predict`` and ``export-model`` find it: a run folder or a checkpoint, checked
to be finished, with what its run recorded about the inputs it expects.

A run (``runs_dir/students/kd-<kind>/fold_<k>/``) is finished when its folder holds ``summary.json``: training
writes everything into ``.fold_<k>.partial/`` and renames it into place only at the end
(:func:`core.training.loop.fit`), so a staging folder, or a folder with ``checkpoint_latest.pth`` (the resume state) and
no summary, is an unfinished run. Its headline checkpoint is the one ``summary.json`` names.

The inputs a student expects — channel names and order, classes, the preprocessing (spacing, CT window,
normalisation, foreground crop, padding) and the sliding window — are recorded in its checkpoints by
:func:`train_student.distil.student_run`. A checkpoint written before runs recorded them is read through the store
it names (``meta["store"]``, whose preprocessing hash must still be the run's), with the default window.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from core.config import InferenceConfig, PreprocessingConfig
from core.errors import CheckpointError, StoreError
from core.models import ModelSpec, get_spec
from core.models.checkpoint import Checkpoint, build_from_checkpoint, file_sha256, load_checkpoint

__all__ = ["InputRecord", "Student", "find_checkpoints", "load_student", "load_students"]

_FOLD = re.compile(r"^fold_(\d+)$")
_STAGING = re.compile(r"^\.(fold_\d+)\.partial$")
_LATEST = "checkpoint_latest.pth"


@dataclass(frozen=True)
class InputRecord:
    """What a student expects and gives, as its run recorded it.

    Attributes:
        channel_names: the modalities, in the model's input channel order.
        class_names: the classes, index 0 background.
        preprocessing: the settings every case went through before training (``core.data.preprocessing``).
        inference: the sliding window the run validated with (window size, overlap, blending).
        patch_size: the training patch size, when recorded.
        source: where the record was read from (``"checkpoint"``, or ``"store <location>"`` for older runs).
    """

    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    preprocessing: PreprocessingConfig
    inference: InferenceConfig
    patch_size: tuple[int, int, int] | None = None
    source: str = "checkpoint"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (without ``source``); equal dicts mean the same inputs."""
        return {
            "channel_names": list(self.channel_names),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.model_dump(mode="json"),
            "inference": self.inference.model_dump(mode="json"),
            "patch_size": list(self.patch_size) if self.patch_size else None,
        }


@dataclass(frozen=True, eq=False)
class Student:
    """One fold's trained student, loaded and ready to predict.

    Attributes:
        checkpoint: the file its weights came from.
        fold: its cross-validation fold, when the run recorded one.
        model: the network in eval mode on the CPU, mapping (B, C, X, Y, Z) to (B, K, X, Y, Z) logits.
        spec: its registry entry.
        args: its constructor arguments.
        record: the inputs it expects.
        sha256: the checkpoint file's SHA-256.
        postprocess: the classes whose largest connected component alone its run chose to keep (on its held-out
            cases; ``meta["postprocessing"]``), empty when it chose none or had no held-out cases.
    """

    checkpoint: Path
    fold: int | None
    model: nn.Module
    spec: ModelSpec
    args: dict[str, Any]
    record: InputRecord
    sha256: str
    postprocess: tuple[int, ...] = ()

    @property
    def in_channels(self) -> int:
        return len(self.record.channel_names)

    @property
    def num_classes(self) -> int:
        return len(self.record.class_names)


def _unfinished(run_dir: Path) -> CheckpointError:
    """The message for a run that has not finished (killed, failed, or still training)."""
    if run_dir.name.startswith(".") and run_dir.name.endswith(".partial"):
        staging, final = run_dir, run_dir.parent / run_dir.name[1 : -len(".partial")]
    else:
        staging, final = run_dir.parent / f".{run_dir.name}.partial", run_dir
    epochs = ""
    metrics = (staging if staging.is_dir() else run_dir) / "metrics.csv"
    if metrics.is_file():
        done = max(len(metrics.read_text().splitlines()) - 1, 0)
        epochs = f" after {done} complete epoch(s)"
    return CheckpointError(
        f"{final}: the run is unfinished — killed or still training{epochs} ({staging.name} holds its progress; "
        "no finished run is published there); re-run the same `teachcache distil` command to finish it (it resumes "
        "where it stopped), then predict with the finished run"
    )


def _run_checkpoint(run_dir: Path) -> Path:
    """The headline checkpoint of a finished run folder.

    Raises:
        CheckpointError: the run is unfinished, or the folder is not a run folder.
    """
    staging = run_dir.parent / f".{run_dir.name}.partial"
    if _STAGING.match(run_dir.name) or (
        not (run_dir / "summary.json").is_file() and ((run_dir / _LATEST).is_file() or staging.is_dir())
    ):
        raise _unfinished(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a run folder (no summary.json); pass a student's run folder "
            "(runs_dir/students/kd-<kind>/fold_<k>), the kd-<kind> folder with --folds, or a checkpoint file"
        )
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{summary_path}: not readable JSON ({exc}); re-run the training") from None
    named = Path(str(summary.get("checkpoint") or "checkpoint_final.pth")).name
    for candidate in (run_dir / named, run_dir / "checkpoint_final.pth"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{run_dir}: the run's checkpoint {named} is missing; re-run the training")


def _checkpoint_file(path: Path, folds: list[int] | None) -> tuple[Path, int | None]:
    """A checkpoint file named directly, with the fold of its run folder when that says it.

    Raises:
        CheckpointError: ``folds`` given; the file belongs to an unfinished run.
    """
    if folds:
        raise CheckpointError(
            f"--folds picks fold folders of a run, but {path} is one checkpoint file; pass the run's "
            "kd-<kind> folder (or one fold folder) with --folds"
        )
    if path.name == _LATEST or _STAGING.match(path.parent.name):
        raise _unfinished(path.parent)
    if not (path.parent / "summary.json").is_file() and (path.parent / _LATEST).is_file():
        raise _unfinished(path.parent)
    match = _FOLD.match(path.parent.name)
    return path, int(match[1]) if match else None


def _present_folds(base: Path) -> list[int]:
    """Every fold with a run folder (finished or staging) under ``base``.

    Raises:
        CheckpointError: none.
    """
    present = {
        int(m[1].removeprefix("fold_"))
        for p in base.iterdir()
        if p.is_dir() and (m := _FOLD.match(p.name) or _STAGING.match(p.name))
    }
    if not present:
        raise CheckpointError(
            f"{base} holds no fold_<k> run folders; pass a student's run folder, its kd-<kind> folder, or a "
            "checkpoint file"
        )
    return sorted(present)


def _fold_checkpoint(base: Path, fold: int, implicit: bool) -> Path:
    """The headline checkpoint of ``base/fold_<fold>``; ``implicit``: the fold was not asked for by name.

    Raises:
        CheckpointError: no run for the fold, or an unfinished one.
    """
    run_dir = base / f"fold_{fold}"
    if not run_dir.is_dir() and not (base / f".fold_{fold}.partial").is_dir():
        have = sorted(p.name for p in base.iterdir() if _FOLD.match(p.name))
        raise CheckpointError(
            f"{base} has no run for fold {fold} (it has {', '.join(have) or 'none'}); train it with "
            f"`make distil FOLD={fold}`, or leave it out of --folds"
        )
    try:
        return _run_checkpoint(run_dir)
    except CheckpointError as exc:
        if not implicit:
            raise
        raise CheckpointError(f"{exc}; or pick the finished folds with --folds") from None


def find_checkpoints(path: Path, folds: list[int] | None = None) -> list[tuple[Path, int | None]]:
    """The checkpoints ``path`` and ``folds`` name, each with its fold (``None`` when not known from the path).

    Args:
        path: a checkpoint file; a run folder (``…/fold_<k>``: its headline checkpoint, or with ``folds`` its
            sibling folds); or a folder of fold runs (``…/kd-<kind>``: the given ``folds``, default every fold in it).
        folds: which folds to take.

    Raises:
        CheckpointError: nothing there; a fold missing; a run unfinished (killed, failed or still training);
            ``folds`` with a single checkpoint file.
    """
    if path.is_file():
        return [_checkpoint_file(path, folds)]
    fold_match = _FOLD.match(path.name) or _STAGING.match(path.name)
    if fold_match and not folds:
        return [(_run_checkpoint(path), int(fold_match[1].removeprefix("fold_")))]
    base = path.parent if fold_match else path
    if not base.is_dir():
        raise CheckpointError(
            f"not found: {path}; pass a student's run folder (runs_dir/students/kd-<kind>/fold_<k>), its kd-<kind> "
            "folder, or a checkpoint file"
        )
    implicit = folds is None
    chosen = _present_folds(base) if folds is None else folds
    return [(_fold_checkpoint(base, fold, implicit), fold) for fold in dict.fromkeys(chosen)]


def _record(ckpt: Checkpoint) -> InputRecord:
    """The inputs a checkpoint's run recorded, or for an older run, those of the store it names."""
    meta = ckpt.meta
    class_names = meta.get("class_names") or [f"class_{i}" for i in range(ckpt.out_channels or 0)]
    if "preprocessing" in meta and "channel_names" in meta:
        return InputRecord(
            channel_names=tuple(meta["channel_names"]),
            class_names=tuple(class_names),
            preprocessing=PreprocessingConfig.model_validate(meta["preprocessing"]),
            inference=InferenceConfig.model_validate(meta.get("inference") or {}),
            patch_size=tuple(meta["patch_size"]) if meta.get("patch_size") else None,  # type: ignore[arg-type]
        )
    location = meta.get("store")
    if not location:
        raise CheckpointError(
            f"{ckpt.path} records neither the preprocessing its network was trained with nor its store; predict "
            "needs a student trained by `teachcache distil`"
        )
    from core.store.teacher_store import TeacherStore

    try:
        store = TeacherStore.open(location)
    except StoreError as exc:
        raise CheckpointError(
            f"{ckpt.path} was written before runs recorded their preprocessing, and the store it was trained from "
            f"cannot be read for it ({exc}); make the store reachable at {location}, or re-train the student"
        ) from None
    if store.metadata.get("preprocessing_hash") != meta.get("preprocessing_hash"):
        raise CheckpointError(
            f"{ckpt.path}: the store {location} was rebuilt with other preprocessing since this student was trained, "
            "so its recorded settings are not the student's; re-train the student"
        )
    return InputRecord(
        channel_names=tuple(store.metadata["dataset"]["channel_names"]),
        class_names=tuple(class_names),
        preprocessing=PreprocessingConfig.model_validate(store.metadata["preprocessing"]),
        inference=InferenceConfig(),
        source=f"store {location}",
    )


def load_student(path: Path, fold: int | None = None) -> Student:
    """Load one checkpoint as a :class:`Student`.

    Raises:
        CheckpointError: missing, unsafe or foreign file (it must record its architecture and run), weights that do
            not fit, or no record of its inputs.
    """
    ckpt = load_checkpoint(path)
    if ckpt.arch is None or ckpt.in_channels is None or ckpt.out_channels is None:
        raise CheckpointError(
            f"{path} is not a TeachCache checkpoint (it does not record its architecture, channels and classes); "
            "pass a student's run folder or its checkpoint_final.pth"
        )
    record = _record(ckpt)
    if len(record.channel_names) != ckpt.in_channels or len(record.class_names) != ckpt.out_channels:
        raise CheckpointError(
            f"{path}: the network takes {ckpt.in_channels} channel(s) and gives {ckpt.out_channels} class(es), but "
            f"its run recorded {len(record.channel_names)} and {len(record.class_names)}; the file was altered"
        )
    model, _ = build_from_checkpoint(path, ckpt.arch, ckpt.in_channels, ckpt.out_channels, ckpt.args)
    if fold is None and isinstance(ckpt.meta.get("fold"), int):
        fold = ckpt.meta["fold"]
    chosen = (ckpt.meta.get("postprocessing") or {}).get("largest_component_classes") or []
    return Student(
        path, fold, model, get_spec(ckpt.arch), dict(ckpt.args), record, file_sha256(path), tuple(chosen)
    )


def load_students(path: Path, folds: list[int] | None = None) -> list[Student]:
    """Every checkpoint :func:`find_checkpoints` names, loaded; they must expect the same inputs.

    Raises:
        CheckpointError: see :func:`find_checkpoints` and :func:`load_student`; folds trained with other channels,
            classes, preprocessing or window (they cannot be averaged voxel for voxel).
    """
    students = [load_student(p, fold) for p, fold in find_checkpoints(path, folds)]
    first = students[0]
    for other in students[1:]:
        if other.record.to_dict() != first.record.to_dict():
            a, b = first.record.to_dict(), other.record.to_dict()
            differing = ", ".join(k for k in a if a[k] != b[k])
            raise CheckpointError(
                f"{other.checkpoint} and {first.checkpoint} were trained with other inputs (differing: {differing}); "
                "only folds of one experiment can be averaged"
            )
    return students
