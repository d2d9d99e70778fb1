"""Reading a dataset in the nnU-Net v2 raw layout.

``DATASET/dataset.json`` (``channel_names``, ``labels``, ``numTraining``, ``file_ending``),
``DATASET/imagesTr/CASE_0000<ending>``, ``CASE_0001<ending>``, … (one file per channel) and
``DATASET/labelsTr/CASE<ending>``. Every problem is reported with the file or case and the fix.

The dataset's manifest hash covers every file's content. Each file's SHA-256 is computed once and remembered in
the user's TeachCache cache folder (:mod:`core.user_cache`), never inside the raw dataset, which is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DatasetError
from core.user_cache import FileHashCache, default_hash_cache

__all__ = ["CaseFiles", "RawDataset", "read_raw_dataset"]

# a case id becomes a Zarr group name in the store (docs/store-format.md): no path tricks, no Zarr file names
_CASE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_RESERVED = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs"})


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: images in channel order, and its label.

    Attributes:
        label: the label file; ``None`` for a case to predict (:mod:`core.data.inputs`).
        patient: the patient the case belongs to, where a layout has several studies per patient (PI-CAI): splits
            keep a patient's studies on one side of every fold. ``None``: the case is its own patient.
        box: a region to crop before anything else, in RAS world mm ``(x0, x1, y0, y1, z0, z1)`` (HECKTOR's
            ``bbox.csv``); ``None``: the whole image.
        channels_in_file: ``images`` is one 4-D file holding every channel (Medical Segmentation Decathlon).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    patient: str | None = None
    box: tuple[float, float, float, float, float, float] | None = None
    channels_in_file: bool = False


@dataclass(frozen=True)
class RawDataset:
    """A validated raw dataset (nnU-Net v2 raw, or another layout read by :mod:`core.data.layouts`).

    Attributes:
        layout: ``nnunet``, ``msd``, ``hecktor`` or ``picai``.
        binarise_label: label values ≥ 1 are one foreground class (PI-CAI's lesion grades).
        allow_empty_labels: a case without foreground is valid (nnU-Net accepts them; PI-CAI: most cases are
            lesion-free); HECKTOR refuses them (every case has a tumour).
        skipped: cases the layout leaves out, with why (PI-CAI studies without a mask).
        description: what the manifest hash covers besides the files (``dataset.json``'s bytes by default).
    """

    root: Path
    name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    cases: tuple[CaseFiles, ...] = field(repr=False)
    layout: str = "nnunet"
    binarise_label: bool = False
    allow_empty_labels: bool = True
    skipped: tuple[str, ...] = field(default=(), repr=False)
    description: str | None = field(default=None, repr=False)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    @property
    def class_names(self) -> list[str]:
        by_value = {v: k for k, v in self.labels.items()}
        return [by_value.get(i, f"class_{i}") for i in range(self.num_classes)]

    def case(self, case_id: str) -> CaseFiles:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetError(f"{self.root}: no case '{case_id}' in imagesTr")

    def manifest_hash(self, hash_cache: Path | None = None) -> str:
        """SHA-256 over ``dataset.json``'s content and every case file's relative path, size and content SHA-256.

        Changes when a case is added, removed or edited (even to the same size), or when the dataset description
        changes. Each file is read once: its hash is remembered by (path, size, mtime) in ``hash_cache``.

        Args:
            hash_cache: the JSON file of remembered hashes (default :func:`default_hash_cache`).
        """
        cache = FileHashCache(hash_cache or default_hash_cache())
        described = self.description.encode() if self.description is not None else None
        h = hashlib.sha256(described if described is not None else (self.root / "dataset.json").read_bytes())
        for case in self.cases:
            for p in (*case.images, case.label):
                h.update(f"{os.path.relpath(p, self.root)}:{p.stat().st_size}:{cache.sha256(p)}\n".encode())
        cache.save()
        return h.hexdigest()


def _read_description(root: Path) -> tuple[Path, dict[str, Any]]:
    """``dataset.json`` of the folder ``root``, parsed, with the keys every dataset needs.

    Returns:
        Its path and its content.
    """
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder not found: {root} (set dataset.raw_dir, or add dataset.synthetic to generate it)"
        )
    desc_path = root / "dataset.json"
    if not desc_path.is_file():
        raise DatasetError(
            f"{root}: no dataset.json; an nnU-Net v2 raw dataset needs one with channel_names, labels, "
            "numTraining and file_ending (an interrupted `teachcache synth` also leaves it out: run it again)"
        )
    try:
        desc = json.loads(desc_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{desc_path}: not valid JSON ({exc})") from None
    if not isinstance(desc, dict):
        raise DatasetError(
            f"{desc_path}: the top level must be a JSON object with channel_names, labels, file_ending"
        )
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in desc]
    if missing:
        raise DatasetError(f"{desc_path}: missing key(s) {', '.join(missing)}")
    return desc_path, desc


def _channel_names(desc: dict[str, Any], desc_path: Path) -> tuple[str, ...]:
    """The modalities in channel order, from ``channel_names`` (``{"0": "CT", "1": "PET"}``)."""
    channels = desc["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(
            f"{desc_path}: channel_names must be an object mapping '0', '1', … to modality names, e.g. "
            f'{{"0": "CT", "1": "PET"}} (nnU-Net v2), got {json.dumps(channels)[:80]}'
        )
    try:
        return tuple(str(channels[str(i)]) for i in range(len(channels)))
    except KeyError:
        raise DatasetError(f"{desc_path}: channel_names keys must be '0', '1', ... in order") from None


def _labels(desc: dict[str, Any], desc_path: Path) -> dict[str, int]:
    """``labels`` as ``{class name: integer index}`` (the indices are checked later)."""
    if not isinstance(desc["labels"], dict):
        raise DatasetError(
            f"{desc_path}: labels must be an object mapping class names to integers, e.g. "
            f'{{"background": 0, "tumour": 1}} (nnU-Net v2), got {json.dumps(desc["labels"])[:80]}'
        )
    try:
        return {str(k): int(v) for k, v in desc["labels"].items()}
    except (TypeError, ValueError):
        raise DatasetError(
            f"{desc_path}: every label must map a name to one integer class index, got {json.dumps(desc['labels'])[:120]}"
        ) from None


def _images_by_case(images_dir: Path, ending: str) -> dict[str, dict[int, Path]]:
    """``{case id: {channel: file}}`` from the names ``CASE_0000<ending>``, … in ``imagesTr``."""
    by_case: dict[str, dict[int, Path]] = {}
    for p in sorted(images_dir.glob(f"*{ending}")):
        stem = p.name[: -len(ending)]
        case_id, sep, channel = stem.rpartition("_")
        if not sep or len(channel) != 4 or not channel.isdigit():
            raise DatasetError(
                f"{p}: image names must be CASE_0000{ending}, CASE_0001{ending}, … (a 4-digit channel number)"
            )
        if not _CASE_ID.fullmatch(case_id) or case_id.lower() in _RESERVED:
            raise DatasetError(
                f"{p}: case id '{case_id}' cannot name a case: ids are letters, digits, '_', '-' and '.', not "
                f"starting with '.', and not {', '.join(sorted(_RESERVED))} (they name files of the store); "
                "rename the case's files"
            )
        by_case.setdefault(case_id, {})[int(channel)] = p
    if not by_case:
        raise DatasetError(f"{images_dir}: no images ending in {ending}")
    return by_case


def _pair_labels(
    by_case: dict[str, dict[int, Path]], channel_names: tuple[str, ...], root: Path, ending: str
) -> list[CaseFiles]:
    """Every case with all its channel files and its label, in case order; no label left without images."""
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    cases = []
    for case_id, files in sorted(by_case.items()):
        absent = [i for i in range(len(channel_names)) if i not in files]
        if absent:
            names = ", ".join(f"{case_id}_{i:04d}{ending} ({channel_names[i]})" for i in absent)
            raise DatasetError(f"case '{case_id}' is missing modality file(s) {names} in {images_dir}")
        label = labels_dir / f"{case_id}{ending}"
        if not label.is_file():
            raise DatasetError(f"case '{case_id}' has no label: expected {label}")
        cases.append(CaseFiles(case_id, tuple(files[i] for i in range(len(channel_names))), label))
    orphans = sorted({p.name[: -len(ending)] for p in labels_dir.glob(f"*{ending}")} - set(by_case))
    if orphans:
        raise DatasetError(f"{labels_dir}: label(s) without images: {', '.join(orphans[:5])}")
    return cases


def read_raw_dataset(root: str | Path) -> RawDataset:
    """Validate and index an nnU-Net v2 raw dataset folder.

    Raises:
        DatasetError: the folder, ``dataset.json`` or a required key is missing; a case lacks a channel file or
            its label; a label has no image. The message names the path and the fix.
    """
    root = Path(root)
    desc_path, desc = _read_description(root)
    channel_names = _channel_names(desc, desc_path)
    labels = _labels(desc, desc_path)
    if not isinstance(desc["file_ending"], str) or not desc["file_ending"].startswith("."):
        raise DatasetError(
            f'{desc_path}: file_ending must be a string such as ".nii.gz", got {desc["file_ending"]!r}'
        )
    if sorted(labels.values()) != list(range(len(labels))) or labels.get("background", 0) != 0:
        raise DatasetError(f"{desc_path}: labels must map names to 0..N-1 with background = 0, got {labels}")
    ending = desc["file_ending"]
    for d in (root / "imagesTr", root / "labelsTr"):
        if not d.is_dir():
            raise DatasetError(f"{root}: missing folder {d.name}/")
    cases = _pair_labels(_images_by_case(root / "imagesTr", ending), channel_names, root, ending)
    return RawDataset(
        root=root,
        name=str(desc.get("name", root.name)),
        channel_names=channel_names,
        labels=labels,
        file_ending=ending,
        cases=tuple(cases),
    )
