"""Cases to predict: image files without labels, grouped into cases and checked against the channels a model was
trained on.

What ``teachcache predict -i`` accepts (one or more paths, each a folder or a file):

- nnU-Net naming, ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, … (``imagesTs/``): files grouped by case id, the 4-digit
  number is the channel. A folder holding ``imagesTs/`` (a raw dataset) is read through it; the ``dataset.json``
  beside ``imagesTs/`` or ``imagesTr/`` (or inside the folder given), when there is one, must name the same channels
  in the same order as the model's.
- modality naming, ``CASE_<channel>.nii.gz`` with a channel name of the model (``_ct`` / ``_pt`` as HECKTOR ships,
  ``_t2w`` / ``_adc`` / ``_hbv`` as PI-CAI, any case): files grouped by case id, channels put in the model's order.
- one file per case: a 4-D file holding every channel last (Medical Segmentation Decathlon), or, for a one-channel
  model, any 3-D file.

Files end in ``.nii.gz``, ``.nii``, ``.mha`` or ``.mhd``. A file given directly is read by the same rules, so a single
case's files can be passed one by one (``-i scan_0000.nii.gz -i scan_0001.nii.gz``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from core.data.layout import _CASE_ID, CaseFiles
from core.data.readers import read_header
from core.errors import DatasetError

__all__ = ["IMAGE_SUFFIXES", "read_cases", "strip_suffix"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd")
_NUMBERED = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def strip_suffix(name: str) -> str | None:
    """A file name without its image suffix, or ``None`` when it is not an image file."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _image_files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every image file the paths name (a folder: the image files directly in it, or in its ``imagesTs/``), and
    the ``dataset.json`` files that describe them."""
    files: list[Path] = []
    descriptions: list[Path] = []
    for path in paths:
        if not path.exists():
            raise DatasetError(
                f"input not found: {path} (pass a folder of cases, e.g. imagesTs/, or image files)"
            )
        if path.is_file():
            if strip_suffix(path.name) is None:
                raise DatasetError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            files.append(path)
            continue
        folder = path / "imagesTs" if (path / "imagesTs").is_dir() else path
        found = sorted(p for p in folder.iterdir() if p.is_file() and strip_suffix(p.name) is not None)
        if not found:
            raise DatasetError(
                f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}); pass the folder that holds the cases "
                "(e.g. imagesTs/) or the files themselves"
            )
        files.extend(found)
        for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
            if candidate.is_file() and (
                candidate.parent == folder or folder.name in ("imagesTs", "imagesTr")
            ):
                descriptions.append(candidate)
                break
    return files, descriptions


def _check_described_channels(description: Path, channel_names: tuple[str, ...]) -> None:
    """A ``dataset.json`` beside the inputs must name the model's channels, in the model's order."""
    try:
        data = json.loads(description.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{description}: not readable JSON ({exc})") from None
    names = data.get("channel_names", data.get("modality")) if isinstance(data, dict) else None
    if not isinstance(names, dict):
        return  # says nothing about channels
    described = tuple(str(names[k]) for k in sorted(names, key=lambda k: int(k) if str(k).isdigit() else 0))
    if tuple(n.lower() for n in described) != tuple(n.lower() for n in channel_names):
        order = ", ".join(f"CASE_{i:04d} = {n}" for i, n in enumerate(channel_names))
        raise DatasetError(
            f"{description} names the channels {', '.join(described)}, but the model was trained on "
            f"{', '.join(channel_names)}; give it cases with those modalities, in that order ({order})"
        )


def _check_id(case_id: str, where: Path) -> None:
    if not _CASE_ID.fullmatch(case_id):
        raise DatasetError(
            f"{where}: case id '{case_id}' is not usable as a file name (letters, digits, '_', '-', '.'); rename it"
        )


def _numbered(files: list[Path], channel_names: tuple[str, ...]) -> list[CaseFiles]:
    by_case: dict[str, dict[int, Path]] = {}
    for path in files:
        match = _NUMBERED.match(strip_suffix(path.name) or "")
        assert match is not None
        case_id, channel = match["case"], int(match["channel"])
        _check_id(case_id, path)
        if channel in by_case.setdefault(case_id, {}):
            raise DatasetError(
                f"case '{case_id}' has two files for channel {channel:04d}: {by_case[case_id][channel]} and {path}"
            )
        by_case[case_id][channel] = path
    expected = set(range(len(channel_names)))
    cases = []
    for case_id, channels in sorted(by_case.items()):
        if set(channels) != expected:
            given = ", ".join(p.name for _, p in sorted(channels.items()))
            wanted = ", ".join(f"{case_id}_{i:04d} ({n})" for i, n in enumerate(channel_names))
            raise DatasetError(
                f"case '{case_id}' has {len(channels)} modality file(s) ({given}), but the model was trained on "
                f"{len(channel_names)} channel(s): it needs {wanted}"
            )
        cases.append(CaseFiles(case_id, tuple(channels[i] for i in range(len(channel_names))), None))
    return cases


def _by_modality(files: list[Path], channel_names: tuple[str, ...]) -> list[CaseFiles]:
    lower = [n.lower() for n in channel_names]
    by_case: dict[str, dict[int, Path]] = {}
    for path in files:
        stem = strip_suffix(path.name) or ""
        case_id, _, modality = stem.rpartition("_")
        _check_id(case_id, path)
        by_case.setdefault(case_id, {})[lower.index(modality.lower())] = path
    cases = []
    for case_id, channels in sorted(by_case.items()):
        missing = [channel_names[i] for i in range(len(channel_names)) if i not in channels]
        if missing:
            raise DatasetError(
                f"case '{case_id}' lacks the modality file(s) {', '.join(f'{case_id}_{m.lower()}' for m in missing)}: "
                f"the model was trained on {', '.join(channel_names)}"
            )
        cases.append(CaseFiles(case_id, tuple(channels[i] for i in range(len(channel_names))), None))
    return cases


def _one_file_each(files: list[Path], channel_names: tuple[str, ...]) -> list[CaseFiles]:
    cases = []
    for path in files:
        case_id = strip_suffix(path.name) or path.name
        _check_id(case_id, path)
        shape = read_header(path)[0]
        channels = shape[3] if len(shape) == 4 else 1
        if channels != len(channel_names):
            names = ", ".join(channel_names)
            raise DatasetError(
                f"{path} holds {channels} channel(s), but the model was trained on {len(channel_names)} ({names}); "
                f"give one file per modality named {case_id}_0000, {case_id}_0001, … in that order, or one 4-D file "
                "with every channel last"
            )
        cases.append(CaseFiles(case_id, (path,), None, channels_in_file=len(shape) == 4))
    return cases


def read_cases(paths: list[Path], channel_names: tuple[str, ...]) -> list[CaseFiles]:
    """Group the image files under ``paths`` into cases with the model's channels, in its channel order.

    Args:
        paths: folders (their image files, or their ``imagesTs/``) and image files.
        channel_names: the model's channels, in order (as its run recorded them).

    Returns:
        One :class:`~core.data.layout.CaseFiles` per case, sorted by case id, with ``label=None``.

    Raises:
        DatasetError: a path is missing or not an image; a case has more, fewer or other modalities than the
            model's channels (by count, by ``dataset.json``'s names, or by its files' modality names); names mix
            conventions; two cases share an id.
    """
    files, descriptions = _image_files(paths)
    for description in descriptions:
        _check_described_channels(description, channel_names)
    stems = [strip_suffix(p.name) or "" for p in files]
    lower = {n.lower() for n in channel_names}
    if all(_NUMBERED.match(s) for s in stems):
        cases = _numbered(files, channel_names)
    elif all(s.rpartition("_")[2].lower() in lower and s.rpartition("_")[0] for s in stems):
        cases = _by_modality(files, channel_names)
    elif any(s.rpartition("_")[2].lower() in lower for s in stems):
        odd = [p.name for p, s in zip(files, stems, strict=True) if s.rpartition("_")[2].lower() not in lower]
        raise DatasetError(
            f"{', '.join(odd[:3])}{'…' if len(odd) > 3 else ''}: not a modality the model was trained on "
            f"({', '.join(channel_names)}); name each case's files CASE_{'/'.join(n.lower() for n in channel_names)} "
            "(or CASE_0000, CASE_0001, … in that order)"
        )
    elif not any(_NUMBERED.match(s) for s in stems):
        cases = _one_file_each(files, channel_names)
    else:
        odd = [p.name for p, s in zip(files, stems, strict=True) if not _NUMBERED.match(s)]
        raise DatasetError(
            f"input files mix nnU-Net naming (CASE_0000, CASE_0001, …) with other names ({', '.join(odd[:3])}"
            f"{'…' if len(odd) > 3 else ''}); name every file CASE_XXXX with its 4-digit channel, or give the "
            "cases separately"
        )
    ids = [c.case_id for c in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DatasetError(f"two inputs are named as case {', '.join(repeated)}; give each case its own name")
    return cases
