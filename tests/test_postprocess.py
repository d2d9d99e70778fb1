"""Postprocessing: the largest connected component of a class, kept where the held-out cases say it helps, recorded
with the model, applied by `teachcache predict`, and reported with and without."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from core.config import OutputConfig
from core.evaluation.postprocess import choose_largest_component, keep_largest_component
from core.models.checkpoint import add_checkpoint_meta, load_checkpoint
from teachcache.cli import app

runner = CliRunner()


def _scene() -> np.ndarray:
    """Class 1: a 27-voxel cube, a 2-voxel island touching nothing, and a voxel touching the cube by a corner only;
    class 2: two separate blobs."""
    x = np.zeros((12, 12, 12), dtype=np.uint8)
    x[1:4, 1:4, 1:4] = 1
    x[4, 4, 4] = 1  # corner-connected to the cube: the same component at 26-connectivity
    x[8, 8, 8:10] = 1
    x[8:10, 1, 1] = 2
    x[1, 9, 9] = 2
    return x


def test_the_largest_component_is_scipys_largest_26_connected_label():
    scene = _scene()
    kept = keep_largest_component(scene, [1])
    labels, n = ndimage.label(scene == 1, structure=np.ones((3, 3, 3)))
    sizes = ndimage.sum(np.ones_like(labels), labels, range(1, n + 1))
    expected = labels == (1 + int(np.argmax(sizes)))
    assert np.array_equal(kept == 1, expected) and int(expected.sum()) == 28
    assert np.array_equal(kept == 2, scene == 2), "a class not asked for is untouched"
    assert set(np.unique(kept[(scene == 1) & ~expected])) == {0}, "removed islands become background"
    assert np.array_equal(keep_largest_component(scene, []), scene)


def test_a_class_is_kept_for_only_where_it_raises_its_held_out_dice():
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    truth[1:4, 1:4, 1:4] = 1  # class 1: one structure
    truth[8:10, 1, 1] = 2  # class 2: two real structures
    truth[1, 9, 9] = 2
    prediction = truth.copy()
    prediction[8, 8, 8:10] = 1  # a false-positive island of class 1
    choice = choose_largest_component([prediction, prediction], [truth, truth], 3)
    assert choice["largest_component_classes"] == [1], (
        "the island goes, the second real blob of class 2 stays"
    )
    assert choice["dice_per_class_largest_component"][0] == 1.0 > choice["dice_per_class"][0]
    assert choice["dice_per_class_largest_component"][1] < choice["dice_per_class"][1] == 1.0
    assert choice["cases"] == 2


@pytest.fixture(scope="module")
def held_out_student(preprocessed, tmp_path_factory):
    """A no-KD student of the tiny experiment trained with held-out cases (its postprocessing chosen on them)."""
    from train_student.distil import distil

    root = tmp_path_factory.mktemp("postprocess")
    training = preprocessed.training.model_copy(update={"holdout": 0.3})
    cfg = preprocessed.model_copy(
        update={"output": OutputConfig(runs_dir=root / "runs"), "training": training}
    )
    result = distil(cfg, 0, kd="none", progress=False)
    return cfg, root, result


def test_a_run_with_held_out_cases_records_its_choice_and_reports_with_and_without(held_out_student):
    cfg, _, _ = held_out_student
    run = cfg.output.runs_dir / "students" / "kd-none" / "fold_0"
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["postprocessing"]
    assert chosen["cases"] == len(summary["holdout_cases"]) > 0
    assert set(chosen) >= {
        "largest_component_classes",
        "dice_per_class",
        "headline_mean_dice",
        "per_case_csv",
    }
    headline = load_checkpoint(run / "checkpoint_selected.pth").meta
    assert headline["postprocessing"]["largest_component_classes"] == chosen["largest_component_classes"]
    with open(run / "validation_per_case_postprocessed.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == summary["val_cases"]
    with_pp = np.mean([float(r["mean_dice"]) for r in rows])
    assert with_pp == pytest.approx(chosen["headline_mean_dice"], abs=1e-6)
    if not chosen["largest_component_classes"]:
        assert chosen["headline_mean_dice"] == pytest.approx(summary["headline_mean_dice"])


def test_validation_with_postprocessing_scores_the_largest_component_of_the_prediction(held_out_student):
    """evaluate(postprocess=[1]) against an independent route: the same prediction, scipy's largest 26-connected
    component of class 1, MONAI-free Dice."""
    import torch

    from core.evaluation.metrics import dice_per_class
    from core.inference import predict_volume
    from core.store.teacher_store import TeacherStore
    from core.training.validation import evaluate

    cfg, _, result = held_out_student
    store = TeacherStore.open(cfg.store.path)
    model = load_checkpoint(result.checkpoint).state_dict
    from core.models import create_model

    net = create_model(cfg.student.arch, 2, 2, cfg.student.args)
    net.load_state_dict(model)
    cases = json.loads((cfg.output.runs_dir / "students/kd-none/fold_0/summary.json").read_text())[
        "val_cases"
    ]
    dice, _ = evaluate(net, store, cases, cfg.inference, 2, torch.device("cpu"), postprocess=[1])
    for row, case in zip(dice, cases, strict=True):
        prediction = predict_volume(net, store.read_image(case), cfg.inference, torch.device("cpu"))[
            "logits"
        ].argmax(0)
        labels, n = ndimage.label(prediction == 1, structure=np.ones((3, 3, 3)))
        if n:
            sizes = ndimage.sum(np.ones_like(labels), labels, range(1, n + 1))
            prediction = np.where((prediction == 1) & (labels != 1 + int(np.argmax(sizes))), 0, prediction)
        assert row.tolist() == dice_per_class(prediction, store.read_label(case), 2)


def test_predict_applies_the_recorded_choice_and_can_be_told_not_to(held_out_student, tmp_path, monkeypatch):
    import core.deploy.predict as predict_module

    cfg, _, _ = held_out_student
    run = cfg.output.runs_dir / "students" / "kd-none" / "fold_0"
    model = tmp_path / "student.pth"
    shutil.copy(run / "checkpoint_selected.pth", model)
    add_checkpoint_meta(model, {"postprocessing": {"largest_component_classes": [1]}})
    images = tmp_path / "imagesTs"
    images.mkdir()
    case = json.loads((run / "summary.json").read_text())["val_cases"][0]
    for channel in (0, 1):
        shutil.copy(cfg.dataset.raw_dir / "imagesTr" / f"{case}_{channel:04d}.nii.gz", images)
    shutil.copy(cfg.dataset.raw_dir / "dataset.json", tmp_path)

    def two_blobs(students, image, device, amp):  # a structure and a far, smaller island of class 1
        probs = np.zeros((2, *image.shape[1:]), dtype=np.float32)
        probs[0] = 1.0
        probs[:, 4:12, 4:12, 4:12] = [[[[0.0]]], [[[1.0]]]]
        probs[:, -8:-4, -8:-4, -8:-4] = [[[[0.0]]], [[[1.0]]]]
        return probs

    monkeypatch.setattr(predict_module, "predict_probabilities", two_blobs)
    out = {}
    for flag in ("--postprocess", "--no-postprocess"):
        target = tmp_path / flag.strip("-")
        result = runner.invoke(
            app, ["predict", "-m", str(model), "-i", str(images), "-o", str(target), flag, "-q"]
        )
        assert result.exit_code == 0, result.output
        summary = json.loads((target / "prediction.json").read_text())
        assert summary["largest_component_classes"] == ([1] if flag == "--postprocess" else [])
        out[flag] = np.asarray(nib.load(target / f"{case}.nii.gz").dataobj) == 1
    kept, raw = out["--postprocess"], out["--no-postprocess"]
    assert ndimage.label(raw, structure=np.ones((3, 3, 3)))[1] == 2, (
        "the island reaches the written label map"
    )
    assert ndimage.label(kept, structure=np.ones((3, 3, 3)))[1] == 1, "predict removed it"
    assert not (kept & ~raw).any() and 0 < kept.sum() < raw.sum()


def test_the_cv_report_shows_each_row_with_and_without_its_postprocessing():
    from core.evaluation.cv_report import _postprocessing
    from core.evaluation.cv_report_markdown import postprocessing_markdown

    summaries = [
        {
            "headline_mean_dice": 0.6,
            "postprocessing": {"largest_component_classes": [1], "headline_mean_dice": 0.7},
        },
        {
            "headline_mean_dice": 0.5,
            "postprocessing": {"largest_component_classes": [], "headline_mean_dice": 0.5},
        },
    ]
    row = _postprocessing(summaries)
    assert row == {"runs": 2, "dice_without": 0.55, "dice_with": 0.6, "classes_chosen": {"1": 1}}
    assert _postprocessing([{"headline_mean_dice": 0.5}]) is None
    lines = postprocessing_markdown(
        [{"run": "kd-none", "postprocessing": row}, {"run": "kd-x", "postprocessing": None}]
    )
    assert "| kd-none | 2 | 0.5500 | 0.6000 | 1 (1) |" in lines and not any("kd-x" in line for line in lines)
    assert postprocessing_markdown([{"run": "kd-x", "postprocessing": None}]) == []
