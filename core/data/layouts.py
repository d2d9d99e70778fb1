"""Raw dataset layouts as users download them, each read into one :class:`~core.data.layout.RawDataset`.

- ``nnunet``: nnU-Net v2 raw (:func:`core.data.layout.read_raw_dataset`).
- ``msd``: Medical Segmentation Decathlon — ``dataset.json`` with ``modality`` (index → name), ``labels``
  (index → name) and a ``training`` list of ``{"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}``;
  each image one 4-D file (channels last) or 3-D for one modality.
- ``hecktor``: HECKTOR 2021 — ``<PID>_ct.nii.gz``, ``<PID>_pt.nii.gz`` (PET in SUV), ``<PID>_gtvt.nii.gz`` anywhere
  under the folder, and ``bbox.csv`` (``PatientID,x1,x2,y1,y2,z1,z2``: the 144 mm box in the images' ITK physical
  coordinates, LPS, as HECKTOR's own SimpleITK scripts use them; converted here to RAS by negating x and y).
- ``picai``: PI-CAI 2022 — ``<patient>/<patient>_<study>_{t2w,adc,hbv}.mha`` under ``raw_dir``, masks
  ``csPCa_lesion_delineations/human_expert/resampled/<patient>_<study>.nii.gz`` under ``labels_dir`` (values ≥ 1
  are lesion); studies without a mask are skipped and counted; a patient's studies share a ``patient``.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from core.config import DatasetConfig
from core.data.layout import _CASE_ID, _RESERVED, CaseFiles, RawDataset, read_raw_dataset
from core.errors import DatasetError

__all__ = ["LAYOUTS", "detect_layout", "read_dataset"]

LAYOUTS = ("nnunet", "msd", "hecktor", "picai")
PICAI_CHANNELS = ("t2w", "adc", "hbv")
HECKTOR_CHANNELS = ("ct", "pt")


def _check_case_id(case_id: str, where: Path) -> None:
    if not _CASE_ID.fullmatch(case_id) or case_id.lower() in _RESERVED:
        raise DatasetError(
            f"{where}: case id '{case_id}' cannot name a case: ids are letters, digits, '_', '-' and '.', not "
            f"starting with '.', and not {', '.join(sorted(_RESERVED))} (they name files of the store); rename the "
            "case's files"
        )


def detect_layout(root: Path) -> str:
    """Guess a folder's layout from what it holds (``dataset check`` without ``--layout``)."""
    desc = root / "dataset.json"
    if desc.is_file():
        try:
            data = json.loads(desc.read_text())
        except json.JSONDecodeError:
            return "nnunet"  # read_raw_dataset names the JSON error
        return (
            "msd"
            if isinstance(data, dict) and "training" in data and "channel_names" not in data
            else "nnunet"
        )
    if next(root.rglob("*_t2w.mha"), None) is not None:
        return "picai"
    if next(root.rglob("*_ct.nii.gz"), None) is not None:
        return "hecktor"
    raise DatasetError(
        f"{root}: cannot tell the dataset's layout (no dataset.json, no *_ct.nii.gz, no *_t2w.mha); set "
        f"dataset.layout (or --layout) to one of {', '.join(LAYOUTS)}"
    )


def read_dataset(cfg: DatasetConfig, layout: str | None = None) -> RawDataset:
    """The raw dataset ``cfg`` describes, in its layout (``layout`` overrides ``cfg.layout``)."""
    root = Path(cfg.raw_dir)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder not found: {root} (set dataset.raw_dir, or add dataset.synthetic to generate it)"
        )
    chosen = layout or cfg.layout
    if chosen == "nnunet":
        return read_raw_dataset(root)
    if chosen == "msd":
        return read_msd(root)
    if chosen == "hecktor":
        return read_hecktor(root, cfg.bbox_file)
    if chosen == "picai":
        return read_picai(root, cfg.labels_dir)
    raise DatasetError(f"unknown dataset layout '{chosen}'; one of {', '.join(LAYOUTS)}")


# --- Medical Segmentation Decathlon ---------------------------------------------------------------------------------


def _index_map(value: object, what: str, path: Path) -> dict[int, str]:
    if not isinstance(value, dict) or not value:
        raise DatasetError(f'{path}: {what} must map "0", "1", … to names (Decathlon format)')
    try:
        return {int(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise DatasetError(f'{path}: {what} keys must be "0", "1", …, got {list(value)[:5]}') from None


def read_msd(root: Path) -> RawDataset:
    """A Medical Segmentation Decathlon task folder (``TaskXX_Name``)."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(
            f"{root}: no dataset.json (a Decathlon task folder holds one with modality, labels, training)"
        )
    try:
        desc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("modality", "labels", "training") if k not in desc]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)} (Decathlon format)")
    modality = _index_map(desc["modality"], "modality", path)
    labels_by_index = _index_map(desc["labels"], "labels", path)
    if sorted(modality) != list(range(len(modality))) or sorted(labels_by_index) != list(
        range(len(labels_by_index))
    ):
        raise DatasetError(f"{path}: modality and labels keys must be 0..N-1")
    cases, seen = [], set()
    for item in desc["training"]:
        if not isinstance(item, dict) or not {"image", "label"} <= set(item):
            raise DatasetError(
                f'{path}: every training entry needs "image" and "label", got {json.dumps(item)[:80]}'
            )
        image, label = (root / item["image"]).resolve(), (root / item["label"]).resolve()
        case_id = image.name.split(".")[0]
        _check_case_id(case_id, image)
        if case_id in seen:
            raise DatasetError(f"{path}: case '{case_id}' is listed twice in training")
        seen.add(case_id)
        for p in (image, label):
            if not p.is_file():
                raise DatasetError(f"case '{case_id}': {p} listed in {path.name} does not exist")
        cases.append(CaseFiles(case_id, (image,), label, channels_in_file=True))
    if not cases:
        raise DatasetError(f"{path}: the training list is empty")
    labels = {("background" if i == 0 else name): i for i, name in sorted(labels_by_index.items())}
    return RawDataset(
        root=root,
        name=str(desc.get("name", root.name)),
        channel_names=tuple(modality[i] for i in range(len(modality))),
        labels=labels,
        file_ending=".nii.gz",
        cases=tuple(sorted(cases, key=lambda c: c.case_id)),
        layout="msd",
    )


# --- HECKTOR 2021 ----------------------------------------------------------------------------------------------------


def _read_bboxes(path: Path) -> dict[str, tuple[float, ...]]:
    """``PatientID → (x0, x1, y0, y1, z0, z1)`` in RAS mm from HECKTOR's ``bbox.csv`` (ITK/LPS coordinates)."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise DatasetError(f"cannot read the bounding boxes {path}: {exc.strerror or exc}") from None
    needed = {"PatientID", "x1", "x2", "y1", "y2", "z1", "z2"}
    if not rows or not needed <= set(rows[0]):
        raise DatasetError(f"{path}: expected columns {', '.join(sorted(needed))} (HECKTOR 2021 bbox.csv)")
    boxes = {}
    for n, row in enumerate(rows, start=2):
        try:
            x1, x2, y1, y2, z1, z2 = (float(row[k]) for k in ("x1", "x2", "y1", "y2", "z1", "z2"))
        except (TypeError, ValueError):
            raise DatasetError(f"{path}, line {n}: coordinates must be numbers, got {row}") from None
        # LPS → RAS: x and y change sign (and so swap ends)
        boxes[row["PatientID"].strip()] = (-max(x1, x2), -min(x1, x2), -max(y1, y2), -min(y1, y2), min(z1, z2),
                                           max(z1, z2))  # fmt: skip
    return boxes


def read_hecktor(root: Path, bbox_file: Path | None = None) -> RawDataset:
    """A HECKTOR 2021 training folder (``hecktor_nii/`` with ``bbox.csv`` beside or inside it)."""
    found: dict[str, dict[str, Path]] = {}
    pattern = re.compile(r"(?P<pid>.+)_(?P<kind>ct|pt|gtvt)\.nii\.gz")
    for p in sorted(root.rglob("*.nii.gz")):
        m = pattern.fullmatch(p.name)
        if m is None:
            continue
        pid, kind = m["pid"], m["kind"]
        if kind in found.get(pid, {}):
            raise DatasetError(f"patient '{pid}' has two {kind} files: {found[pid][kind]} and {p}; keep one")
        found.setdefault(pid, {})[kind] = p
    if not found:
        raise DatasetError(
            f"{root}: no <PatientID>_ct.nii.gz / _pt.nii.gz / _gtvt.nii.gz files (HECKTOR 2021)"
        )
    bbox = bbox_file or next((p for p in (root / "bbox.csv", root.parent / "bbox.csv") if p.is_file()), None)
    if bbox is None:
        candidates = sorted(root.rglob("*bbox*.csv"))
        bbox = candidates[0] if len(candidates) == 1 else None
    if bbox is None or not Path(bbox).is_file():
        raise DatasetError(f"{root}: no bbox.csv (HECKTOR's 144 mm boxes); set dataset.bbox_file to its path")
    boxes = _read_bboxes(Path(bbox))
    cases = []
    for pid, files in sorted(found.items()):
        _check_case_id(pid, files[next(iter(files))])
        missing = [k for k in (*HECKTOR_CHANNELS, "gtvt") if k not in files]
        if missing:
            where = files[next(iter(files))].parent
            names = ", ".join(f"{pid}_{k}.nii.gz" for k in missing)
            raise DatasetError(f"case '{pid}' is missing {names} in {where}")
        if pid not in boxes:
            raise DatasetError(f"case '{pid}' has no row in {bbox}: add its box, or remove the case's files")
        cases.append(CaseFiles(pid, (files["ct"], files["pt"]), files["gtvt"], box=boxes[pid]))  # type: ignore[arg-type]
    description = json.dumps({"layout": "hecktor", "bbox": Path(bbox).read_text()}, sort_keys=True)
    return RawDataset(
        root=root,
        name="HECKTOR2021",
        channel_names=("CT", "PT"),
        labels={"background": 0, "GTVt": 1},
        file_ending=".nii.gz",
        cases=tuple(cases),
        layout="hecktor",
        allow_empty_labels=False,
        description=description,
    )


# --- PI-CAI 2022 -----------------------------------------------------------------------------------------------------


def _picai_labels(labels_dir: Path | None, root: Path) -> Path:
    if labels_dir is None:
        raise DatasetError(
            f"{root}: PI-CAI masks live in the picai_labels repository; set dataset.labels_dir to it (the folder "
            "holding csPCa_lesion_delineations/human_expert/resampled)"
        )
    nested = Path(labels_dir) / "csPCa_lesion_delineations" / "human_expert" / "resampled"
    folder = nested if nested.is_dir() else Path(labels_dir)
    if not folder.is_dir():
        raise DatasetError(f"PI-CAI labels folder not found: {labels_dir}")
    return folder


def read_picai(root: Path, labels_dir: Path | None) -> RawDataset:
    """A PI-CAI 2022 image folder (``picai_public_images``, folds merged) with its expert masks."""
    masks = _picai_labels(labels_dir, root)
    pattern = re.compile(r"(?P<case>(?P<patient>[^_/]+)_(?P<study>[^_/]+))_(?P<kind>t2w|adc|hbv)\.mha")
    studies: dict[str, dict[str, Path]] = {}
    patients: dict[str, str] = {}
    for p in sorted(root.rglob("*.mha")):
        m = pattern.fullmatch(p.name)
        if m is None:
            continue  # sagittal and coronal T2W (_sag, _cor) are not used
        case, kind = m["case"], m["kind"]
        if kind in studies.get(case, {}):
            raise DatasetError(
                f"study '{case}' has two {kind} files: {studies[case][kind]} and {p}; keep one"
            )
        studies.setdefault(case, {})[kind] = p
        patients[case] = m["patient"]
    if not studies:
        raise DatasetError(f"{root}: no <patient>/<patient>_<study>_t2w.mha files (PI-CAI 2022)")
    cases, skipped = [], []
    for case, files in sorted(studies.items()):
        _check_case_id(case, files[next(iter(files))])
        missing = [k for k in PICAI_CHANNELS if k not in files]
        if missing:
            where = files[next(iter(files))].parent
            raise DatasetError(
                f"case '{case}' is missing {', '.join(f'{case}_{k}.mha' for k in missing)} in {where}"
            )
        label = masks / f"{case}.nii.gz"
        if not label.is_file():
            skipped.append(case)
            continue
        cases.append(CaseFiles(case, tuple(files[k] for k in PICAI_CHANNELS), label, patient=patients[case]))
    if not cases:
        raise DatasetError(f"no PI-CAI study under {root} has a mask in {masks}")
    description = json.dumps({"layout": "picai", "binarise_label": True}, sort_keys=True)
    return RawDataset(
        root=root,
        name="PI-CAI2022",
        channel_names=("T2W", "ADC", "HBV"),
        labels={"background": 0, "csPCa": 1},
        file_ending=".mha",
        cases=tuple(cases),
        layout="picai",
        binarise_label=True,
        allow_empty_labels=True,
        skipped=tuple(f"{c}: no mask in {masks}" for c in skipped),
        description=description,
    )
