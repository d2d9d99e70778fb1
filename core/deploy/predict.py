"""Segment new cases with trained students: the training preprocessing, sliding windows, folds averaged, and a
label map written as NIfTI in each input image's own geometry.

For each case: its image files are preprocessed by the pipeline training used (:func:`core.data.preprocessing.
build_preprocessing` without a label, with the settings the student's run recorded), each fold's student runs over
the whole volume with MONAI's sliding windows (:func:`core.inference.predict_volume`; mixed precision on CUDA), the
folds' softmax probabilities are averaged, and the argmax is mapped back onto the grid of the case's first channel
file (:func:`core.evaluation.geometry.to_original_geometry`, nearest neighbour): same shape, affine, qform and sform as that
file, whatever its orientation. Probabilities (``save_probabilities``) are resampled trilinearly.

Outputs (``docs/deploy.md``)::

    OUTPUT/<case>.nii.gz                     uint8 labels, in the geometry of <case>_0000
    OUTPUT/probabilities/<case>.nii.gz       (X, Y, Z, K) float32, with save_probabilities
    OUTPUT/prediction.json                   the students, the inputs they expect, per-case time

Every file is written under a temporary name and renamed, and every input is checked (channels, headers) before
the first file is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose

from core.data.inputs import read_cases, strip_suffix
from core.data.layout import CaseFiles
from core.data.preprocessing import build_preprocessing, check_image_headers, preprocess_image
from core.deploy.student_runs import InputRecord, Student
from core.errors import DatasetError
from core.evaluation.geometry import probabilities_to_original_geometry, to_original_geometry
from core.evaluation.postprocess import keep_largest_component
from core.evaluation.scoring import PREDICTION_SUMMARY
from core.inference import check_window, predict_volume
from core.progress import track

__all__ = [
    "SUMMARY_FILE",
    "postprocessing",
    "predict_cases",
    "predict_probabilities",
    "write_like",
]

SUMMARY_FILE = PREDICTION_SUMMARY  # what teachcache evaluate reads back
PROBABILITIES_DIR = "probabilities"


def predict_probabilities(
    students: list[Student], image: np.ndarray, device: torch.device, amp: bool = True
) -> np.ndarray:
    """The students' softmax probabilities on one preprocessed volume, averaged over the students.

    Args:
        students: one or more folds' students, already on ``device``, expecting the same inputs.
        image: (C, X, Y, Z) preprocessed volume.
        device: where the windows run.
        amp: mixed precision on CUDA.

    Returns:
        (K, X, Y, Z) float32 probabilities.
    """
    total = None
    for student in students:
        check_window(student.spec, student.record.inference, tuple(image.shape[1:]), student.args, taps=False)
        logits = predict_volume(student.model, image, student.record.inference, device, amp=amp)["logits"]
        probs = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
        total = probs if total is None else total + probs
    assert total is not None
    return (total / len(students)).astype(np.float32)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def write_like(data: np.ndarray, reference: Path, out: Path, description: str) -> None:
    """Write ``data`` as NIfTI on ``reference``'s grid, atomically (a temporary name in the same folder, renamed).

    A NIfTI reference lends its whole header: affine, qform and sform with their codes, units, dimension info; the
    data type and scaling are the data's own. A MetaImage reference lends its (RAS) affine.

    Args:
        data: (X, Y, Z) or (X, Y, Z, K) on the reference's grid.
        reference: the input file whose geometry the output takes.
        out: the ``.nii.gz`` file to write.
        description: a short note for the header's ``descrip`` field.
    """
    import nibabel as nib

    from core.data.readers import read_header

    if _is_nifti(reference):
        ref = nib.load(str(reference))
        header = ref.header.copy()
        image = nib.Nifti1Image(data, ref.affine, header=header)
        image.set_qform(ref.header.get_qform(), code=int(ref.header["qform_code"]))
        image.set_sform(ref.header.get_sform(), code=int(ref.header["sform_code"]))
    else:
        image = nib.Nifti1Image(data, read_header(reference)[1])
        image.header.set_xyzt_units("mm")
    image.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0.0, 0.0
    image.header["descrip"] = description.encode()[:79]
    tmp = out.with_name(f".{strip_suffix(out.name)}.tmp.nii.gz")
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _existing_predictions(output: Path) -> list[str]:
    if not output.is_dir():
        return []
    found = [p.name for p in sorted(output.iterdir()) if p.is_file() and strip_suffix(p.name) is not None]
    found += [name for name in (SUMMARY_FILE, PROBABILITIES_DIR) if (output / name).exists()]
    return found


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise DatasetError(f"output {output} is a file; pass a folder to write the predictions into")
    existing = _existing_predictions(output)
    if existing and not overwrite:
        raise DatasetError(
            f"{output} already holds predictions ({len(existing)} file(s): {', '.join(existing[:3])}"
            f"{'…' if len(existing) > 3 else ''}); pass --overwrite to replace them, or choose another folder"
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _read_inputs(record: InputRecord, inputs: list[Path], output: Path, overwrite: bool) -> list[CaseFiles]:
    """Every case under ``inputs``, checked against the channels ``record`` expects, and ``output`` checked free:
    nothing is written before all of it passes.

    Raises:
        DatasetError: as :func:`predict_cases` says.
    """
    cases: list[CaseFiles] = read_cases(inputs, record.channel_names)
    for case in cases:
        check_image_headers(case, len(record.channel_names))
    _check_output(output, overwrite)
    files = len(cases[0].images)
    if any(len(c.images) != files for c in cases):
        raise DatasetError(
            "inputs mix one 4-D file per case with one file per modality; predict them separately"
        )
    return cases


def postprocessing(students: list[Student]) -> tuple[int, ...]:
    """The classes whose largest component predict keeps: those every student's run chose (on its own held-out
    cases), so an average of folds is postprocessed only where all of them found it helps."""
    chosen = set(students[0].postprocess)
    for s in students[1:]:
        chosen &= set(s.postprocess)
    return tuple(sorted(chosen))


def _predict_case(
    students: list[Student],
    pipeline: Compose,
    case: CaseFiles,
    output: Path,
    device: torch.device,
    amp: bool,
    save_probabilities: bool,
    postprocess: bool = True,
) -> dict[str, Any]:
    """Preprocess one case, run the students over it, write its labels (and probabilities) in its own geometry.

    Returns:
        The case's row of the summary: inputs, output, shapes, seconds.
    """
    case_started = time.perf_counter()
    pc = preprocess_image(pipeline, case)
    window_started = time.perf_counter()
    probs = predict_probabilities(students, pc.image, device, amp)
    window_seconds = time.perf_counter() - window_started
    classes = postprocessing(students) if postprocess else ()
    prediction = keep_largest_component(probs.argmax(0), classes)
    label = to_original_geometry(prediction, pc.affine, pc.original_affine, pc.original_shape)
    target = output / f"{case.case_id}.nii.gz"
    write_like(label, case.images[0], target, "teachcache predict: labels")
    if save_probabilities:
        original = probabilities_to_original_geometry(probs, pc.affine, pc.original_affine, pc.original_shape)
        write_like(
            np.ascontiguousarray(np.moveaxis(original, 0, -1)),
            case.images[0],
            output / PROBABILITIES_DIR / f"{case.case_id}.nii.gz",
            "teachcache predict: probabilities",
        )
    return {
        "case": case.case_id,
        "inputs": [str(p) for p in case.images],
        "output": str(target),
        "shape": [int(s) for s in label.shape],
        "preprocessed_shape": [int(s) for s in pc.image.shape[1:]],
        "seconds": round(time.perf_counter() - case_started, 3),
        "window_seconds": round(window_seconds, 3),
    }


def _summary(
    students: list[Student],
    output: Path,
    device: torch.device,
    save_probabilities: bool,
    rows: list[dict[str, Any]],
    total: float,
    postprocess: bool = True,
) -> dict[str, Any]:
    """What ``prediction.json`` holds: the students, the inputs they expect, and each case's row."""
    record = students[0].record
    return {
        "output": str(output),
        "device": str(device),
        "students": [
            {"checkpoint": str(s.checkpoint), "fold": s.fold, "arch": s.spec.name, "sha256": s.sha256}
            for s in students
        ],
        "folds": [s.fold for s in students],
        # the classes whose largest connected component alone was kept (chosen by every student's run on its
        # held-out cases); [] when none, or with --no-postprocess
        "largest_component_classes": list(postprocessing(students)) if postprocess else [],
        "inputs_expected": record.to_dict(),
        "inputs_recorded_in": record.source,
        "probabilities": save_probabilities,
        "cases": rows,
        "seconds": round(total, 3),
        "seconds_per_case": round(total / len(rows), 3) if rows else None,
    }


def predict_cases(
    students: list[Student],
    inputs: list[Path],
    output: Path,
    device: torch.device,
    *,
    overwrite: bool = False,
    save_probabilities: bool = False,
    amp: bool = True,
    progress: bool = True,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    postprocess: bool = True,
) -> dict[str, Any]:
    """Predict every case under ``inputs`` into ``output`` (module docstring).

    Args:
        students: the folds to average (:func:`core.deploy.student_runs.load_students`).
        inputs: folders and files of cases (:func:`core.data.inputs.read_cases`).
        output: the folder to write into (created).
        device: where the sliding windows run.
        overwrite: replace predictions already in ``output``.
        save_probabilities: also write each case's class probabilities.
        amp: mixed precision on CUDA.
        progress: a bar over the cases.
        on_case: called with each case's summary once its files are written.
        postprocess: keep the largest connected component of the classes the students' runs chose
            (:func:`postprocessing`); ``False``: the argmax as it is.

    Returns:
        The summary written to ``prediction.json``: the students, the inputs they expect, and per case its files,
        shape, and seconds (all of it, and the sliding windows alone).

    Raises:
        DatasetError: an input that is missing, whose modalities do not match the students' channels (by count or
            name), or whose files cannot be read; an output folder that already holds predictions (without
            ``overwrite``). Nothing is written then.
    """
    record = students[0].record
    cases = _read_inputs(record, inputs, output, overwrite)
    pipeline = build_preprocessing(
        record.preprocessing, record.channel_names, len(cases[0].images), with_label=False
    )
    output.mkdir(parents=True, exist_ok=True)
    if save_probabilities:
        (output / PROBABILITIES_DIR).mkdir(exist_ok=True)
    for student in students:
        student.model.to(device).eval()
    rows = []
    started = time.perf_counter()
    for case in track(cases, "predicting", enabled=progress):
        row = _predict_case(students, pipeline, case, output, device, amp, save_probabilities, postprocess)
        rows.append(row)
        if on_case is not None:
            on_case(row)
    summary = _summary(
        students, output, device, save_probabilities, rows, time.perf_counter() - started, postprocess
    )
    _write_json(output / SUMMARY_FILE, summary)
    return summary
