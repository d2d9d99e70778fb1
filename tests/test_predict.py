"""Using the distilled student: teachcache predict / evaluate / export-model through the CLI, on a tiny experiment."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from core.config import OutputConfig
from core.deploy.student_runs import load_student
from core.evaluation.geometry import to_original_geometry
from core.evaluation.metrics import dice_per_class, hd95_per_class
from core.inference import predict_volume
from core.store.teacher_store import TeacherStore
from teachcache.cli import app

runner = CliRunner()


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def refused(*args: object) -> str:
    """Exit code 2 and one line of message."""
    output = run(*args, code=2)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    return lines[0]


@pytest.fixture(scope="module")
def students(preprocessed, tmp_path_factory):
    """Two folds' no-KD students of the tiny experiment (trained from the shared store), and cases to predict.

    Returns ``(cfg, kd_dir, images_ts, labels_ts)``: ``kd_dir`` holds ``fold_0`` and ``fold_1``; ``imagesTs/`` holds
    fold 0's two validation cases in nnU-Net naming, ``labelsTs/`` their labels.
    """
    from core.experiment import fold_split
    from train_student.distil import distil

    root = tmp_path_factory.mktemp("predict")
    cfg = preprocessed.model_copy(update={"output": OutputConfig(runs_dir=root / "runs")})
    for fold in (0, 1):
        distil(cfg, fold, kd="none", progress=False)
    store = TeacherStore.open(cfg.store.path)
    _, val = fold_split(cfg, store, 0)
    images, labels = root / "Dataset900_Tiny" / "imagesTs", root / "Dataset900_Tiny" / "labelsTs"
    images.mkdir(parents=True)
    labels.mkdir()
    raw = cfg.dataset.raw_dir
    for case in val:
        for channel in (0, 1):
            shutil.copy(raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz", images)
        shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", labels)
    shutil.copy(raw / "dataset.json", images.parent)
    return cfg, root / "runs" / "students" / "kd-none", images, labels


def _direct_prediction(cfg, run_dir: Path, case: str) -> np.ndarray:
    """The route validation takes: the store's preprocessed image, sliding windows, back to the original grid."""
    store = TeacherStore.open(cfg.store.path)
    student = load_student(run_dir / "checkpoint_final.pth")
    logits = predict_volume(student.model, store.read_image(case), cfg.inference, torch.device("cpu"))[
        "logits"
    ]
    attrs = store.case_attrs(case)
    return to_original_geometry(
        logits.argmax(0), attrs["affine"], attrs["original_affine"], attrs["original_shape"]
    )


def test_predict_writes_labels_in_the_input_geometry_equal_to_the_validation_route(students, tmp_path):
    cfg, kd_dir, images, _ = students
    summary = json.loads(
        run("predict", "--checkpoint", kd_dir / "fold_0", "-i", images, "-o", tmp_path, "--json")
    )
    cases = sorted({p.name.rsplit("_", 1)[0] for p in images.iterdir()})
    assert [r["case"] for r in summary["cases"]] == cases and summary["folds"] == [0]
    assert all(r["seconds"] > 0 for r in summary["cases"]) and summary["inputs_recorded_in"] == "checkpoint"
    for case in cases:
        source, written = nib.load(images / f"{case}_0000.nii.gz"), nib.load(tmp_path / f"{case}.nii.gz")
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        predicted = np.asarray(written.dataobj)
        assert np.array_equal(predicted, _direct_prediction(cfg, kd_dir / "fold_0", case))
        assert predicted.any(), "a case with a tumour gets some foreground"
    assert json.loads((tmp_path / "prediction.json").read_text())["cases"] == summary["cases"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left"


def _reoriented(source: Path, out: Path, transform: np.ndarray, flip_x: bool) -> None:
    img = nib.load(source)
    data, affine = np.asarray(img.dataobj), img.affine.copy()
    if flip_x:  # the same voxels stored right-to-left: an LPS-like x axis, the same world
        data = data[::-1]
        affine = affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    affine = transform @ affine
    flipped = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    flipped.set_qform(affine, code=1)
    flipped.set_sform(affine, code=1)
    nib.save(flipped, out)


def test_flipped_and_oblique_inputs_come_out_in_their_own_geometry(students, tmp_path):
    cfg, kd_dir, images, _ = students
    case = sorted(p.name.rsplit("_", 1)[0] for p in images.iterdir())[0]
    angle = np.deg2rad(20)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    flipped, oblique = tmp_path / "flipped", tmp_path / "oblique"
    for folder, transform, flip in ((flipped, np.eye(4), True), (oblique, rotation, False)):
        folder.mkdir()
        for channel in (0, 1):
            name = f"{case}_{channel:04d}.nii.gz"
            _reoriented(images / name, folder / name, transform, flip)
        run("predict", "-m", kd_dir / "fold_0", "-i", folder, "-o", tmp_path / f"out_{folder.name}", "-q")
        source = nib.load(folder / f"{case}_0000.nii.gz")
        written = nib.load(tmp_path / f"out_{folder.name}" / f"{case}.nii.gz")
        original = nib.aff2axcodes(nib.load(images / f"{case}_0000.nii.gz").affine)
        assert original == ("L", "P", "S") and nib.aff2axcodes(source.affine)[0] == ("R" if flip else "L")
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert np.allclose(written.header.get_qform(), source.header.get_qform())
    expected = _direct_prediction(cfg, kd_dir / "fold_0", case)
    got = np.asarray(nib.load(tmp_path / "out_flipped" / f"{case}.nii.gz").dataobj)
    assert np.array_equal(got, expected[::-1]), (
        "the same world in another voxel order: the same labels, flipped"
    )
    assert np.asarray(nib.load(tmp_path / "out_oblique" / f"{case}.nii.gz").dataobj).any()


def _probabilities(folder: Path, case: str) -> np.ndarray:
    return np.asarray(nib.load(folder / "probabilities" / f"{case}.nii.gz").dataobj)


def test_folds_are_averaged_in_probability_space(students, tmp_path):
    _, kd_dir, images, _ = students
    case = sorted(p.name.rsplit("_", 1)[0] for p in images.iterdir())[0]
    files = [images / f"{case}_0000.nii.gz", images / f"{case}_0001.nii.gz"]  # a single case's files
    inputs = [arg for f in files for arg in ("-i", f)]
    out = run(
        "predict", "-m", kd_dir, *inputs, "-o", tmp_path / "both", "--folds", "0", "1", "--save-probabilities"
    )
    assert "fold 0, 1" in out and "per case" in out
    for fold in (0, 1):
        run(
            "predict",
            "-m",
            kd_dir / f"fold_{fold}",
            *inputs,
            "-o",
            tmp_path / f"f{fold}",
            "--save-probabilities",
        )
    p0, p1, both = (_probabilities(tmp_path / name, case) for name in ("f0", "f1", "both"))
    shape = nib.load(files[0]).shape
    assert both.shape == (*shape, 2) and np.allclose(both.sum(-1), 1.0, atol=1e-5)
    assert np.abs(p0 - p1).max() > 1e-3, "two folds' students differ"
    assert np.allclose(both, (p0 + p1) / 2, atol=1e-5)
    summary = json.loads((tmp_path / "both" / "prediction.json").read_text())
    assert summary["folds"] == [0, 1] and len({s["sha256"] for s in summary["students"]}) == 2


def test_a_checkpoint_from_before_runs_recorded_their_inputs_reads_its_store(students, tmp_path):
    _, kd_dir, images, _ = students
    case = sorted(p.name.rsplit("_", 1)[0] for p in images.iterdir())[0]
    payload = torch.load(kd_dir / "fold_0" / "checkpoint_final.pth", weights_only=True)
    for key in ("channel_names", "preprocessing", "inference", "patch_size"):
        del payload["meta"][key]
    old = tmp_path / "old.pth"
    torch.save(payload, old)
    inputs = ["-i", images / f"{case}_0000.nii.gz", "-i", images / f"{case}_0001.nii.gz"]
    summary = json.loads(run("predict", "-m", old, *inputs, "-o", tmp_path / "old", "--json"))
    assert summary["inputs_recorded_in"].startswith("store ")
    run("predict", "-m", kd_dir / "fold_0", *inputs, "-o", tmp_path / "new", "-q")
    old_labels, new_labels = (
        np.asarray(nib.load(tmp_path / n / f"{case}.nii.gz").dataobj) for n in ("old", "new")
    )
    assert np.array_equal(old_labels, new_labels)


def _label_file(path: Path, data: np.ndarray, spacing: tuple[float, float, float]) -> None:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*spacing, 1.0])), path)


def test_evaluate_scores_with_the_validation_metrics_at_the_label_spacing(tmp_path):
    preds, labels = tmp_path / "pred", tmp_path / "labels"
    preds.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    spacing = (0.8, 1.0, 3.0)
    expected = {}
    for i in range(2):
        label = np.zeros((20, 18, 12), np.uint8)
        label[4:12, 5:13, 3:8] = 1
        label[14:18, 2:6, 2:4] = 2
        pred = label.copy()
        pred[rng.random(label.shape) < 0.05] = 1
        pred[14:18, 2:6, 2:4] = 0 if i == 0 else 2  # case 0 misses class 2 entirely
        _label_file(labels / f"case{i}.nii.gz", label, spacing)
        _label_file(preds / f"case{i}.nii.gz", pred, spacing)
        expected[f"case{i}"] = (dice_per_class(pred, label, 3), hd95_per_class(pred, label, 3, spacing))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "lesion": 2}}))
    scores = json.loads(run("evaluate", preds, labels, "--json"))
    assert scores["class_names"] == ["background", "liver", "lesion"]
    for row in scores["cases"]:
        dice, hd95 = expected[row["case"]]
        assert np.allclose(row["dice"], dice) and np.allclose(row["hd95"], hd95)
    assert scores["cases"][0]["dice"][1] == 0.0 and scores["cases"][1]["dice"][1] == 1.0
    isotropic = hd95_per_class(
        *(np.asarray(nib.load(d / "case0.nii.gz").dataobj) for d in (preds, labels)), 3, (1, 1, 1)
    )
    assert not np.isclose(isotropic[0], expected["case0"][1][0]), "the label's spacing matters"
    assert np.isclose(scores["mean_dice"], np.mean([expected[c][0] for c in expected]))
    table = run("evaluate", preds, labels)
    assert "case0" in table and "Dice lesion" in table and "mean Dice" in table


def test_evaluate_scores_predict_output_and_refuses_another_grid(students, tmp_path):
    _, kd_dir, images, labels = students
    run("predict", "-m", kd_dir / "fold_0", "-i", images, "-o", tmp_path / "pred", "-q")
    scores = json.loads(run("evaluate", tmp_path / "pred", labels, "--json"))
    assert len(scores["cases"]) == 2 and 0.0 <= scores["mean_dice"] <= 1.0
    case = scores["cases"][0]["case"]
    _label_file(tmp_path / "pred" / f"{case}.nii.gz", np.zeros((8, 8, 8), np.uint8), (1.0, 1.0, 1.0))
    assert "not on the grid of its label" in refused("evaluate", tmp_path / "pred", labels)


def test_export_round_trip_matches_pytorch(students, tmp_path):
    _, kd_dir, _, _ = students
    student = load_student(kd_dir / "fold_0" / "checkpoint_final.pth")
    x = torch.randn(1, 2, 32, 48, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = student.model(x).numpy()
    record = json.loads(run("export-model", kd_dir / "fold_0", "-o", tmp_path / "student.pt", "--json"))
    assert record["check"]["max_abs_difference"] <= 1e-4
    spec = json.loads((tmp_path / "student.pt.json").read_text())
    assert [c["name"] for c in spec["channels"]] == ["CT", "PET"] and spec["classes"] == [
        "background",
        "tumour",
    ]
    assert spec["channels"][0]["normalisation"] == "ct" and spec["channels"][0]["window"] == [-200.0, 300.0]
    assert spec["preprocessing"]["spacing"] == [2.0, 2.0, 2.0] and spec["window"]["roi_size"] == [32, 32, 32]
    scripted = torch.jit.load(str(tmp_path / "student.pt"))
    with torch.no_grad():
        assert np.abs(scripted(x).numpy() - expected).max() < 1e-4
    pytest.importorskip("onnxruntime")
    import onnxruntime

    run(
        "export-model", kd_dir / "fold_0", "-o", tmp_path / "student.onnx"
    )  # its own JSON: no clash with .pt's
    assert json.loads((tmp_path / "student.onnx.json").read_text())["model"]["runtime"] == "onnx"
    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() < 1e-4
    assert "exists" in refused("export-model", kd_dir / "fold_0", "-o", tmp_path / "student.pt")
    assert "--fold" in refused("export-model", kd_dir, "-o", tmp_path / "x.pt")


def test_the_deploy_snippet_runs_outside_the_project(students, tmp_path):
    """docs/deploy.md's Python snippet, run as written on an exported student: labels in the input's geometry."""
    _, kd_dir, images, _ = students
    run("export-model", kd_dir / "fold_0", "-o", tmp_path / "student.pt")
    case = sorted(p.name.rsplit("_", 1)[0] for p in images.iterdir())[0]
    for channel in (0, 1):
        shutil.copy(images / f"{case}_{channel:04d}.nii.gz", tmp_path / f"case_{channel:04d}.nii.gz")
    doc = (Path(__file__).parents[1] / "docs" / "deploy.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S)[1]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        exec(compile(snippet, "docs/deploy.md", "exec"), {})
    finally:
        os.chdir(cwd)
    source, written = nib.load(tmp_path / "case_0000.nii.gz"), nib.load(tmp_path / "case.nii.gz")
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    inputs = ["-i", tmp_path / "case_0000.nii.gz", "-i", tmp_path / "case_0001.nii.gz"]
    run("predict", "-m", kd_dir / "fold_0", *inputs, "-o", tmp_path / "cli", "-q")
    reference = np.asarray(nib.load(tmp_path / "cli" / "case.nii.gz").dataobj)
    # the same steps, written out (scipy's grid rounding, whole volume instead of windows): close, not identical
    assert dice_per_class(np.asarray(written.dataobj), reference, 2)[0] > 0.6  # 0.83 on this tiny student


def test_bad_inputs_are_refused_with_one_message_and_nothing_written(students, tmp_path):
    _, kd_dir, images, _ = students
    out = tmp_path / "out"
    # modalities: one file where the student was trained on two
    one = tmp_path / "one"
    one.mkdir()
    first = sorted(images.glob("*_0000.nii.gz"))[0]
    shutil.copy(first, one)
    message = refused("predict", "-m", kd_dir / "fold_0", "-i", one, "-o", out)
    assert "1 modality file" in message and "2 channel(s)" in message and not out.exists()
    # modalities by name: a dataset.json beside imagesTs naming other channels
    other = tmp_path / "Other" / "imagesTs"
    shutil.copytree(images, other)
    (other.parent / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2W", "1": "ADC"}}))
    message = refused("predict", "-m", kd_dir / "fold_0", "-i", other.parent, "-o", out)
    assert "T2W, ADC" in message and "CT, PET" in message and not out.exists()
    # modalities by file name: CASE_ct / CASE_mr for a CT + PET student
    named = tmp_path / "named"
    named.mkdir()
    shutil.copy(first, named / "a_ct.nii.gz")
    shutil.copy(first, named / "a_mr.nii.gz")
    assert "a_mr.nii.gz" in refused("predict", "-m", kd_dir / "fold_0", "-i", named, "-o", out)
    # a run that has not finished: only its staging folder, with the resume state
    unfinished = tmp_path / "kd-none"
    shutil.copytree(kd_dir / "fold_0", unfinished / ".fold_0.partial")
    (unfinished / ".fold_0.partial" / "summary.json").unlink()
    shutil.copy(
        kd_dir / "fold_0" / "checkpoint_final.pth", unfinished / ".fold_0.partial" / "checkpoint_latest.pth"
    )
    for target in (
        unfinished,
        unfinished / "fold_0",
        unfinished / ".fold_0.partial" / "checkpoint_latest.pth",
    ):
        message = refused("predict", "-m", target, "-i", images, "-o", out)
        assert "unfinished" in message and "teachcache distil" in message and not out.exists()
    assert "no run for fold 3" in refused(
        "predict", "-m", kd_dir, "--folds", "0", "3", "-i", images, "-o", out
    )
    assert not out.exists()
    # an output folder that already holds predictions
    run("predict", "-m", kd_dir / "fold_0", "-i", one.parent / "named", "-o", out, code=2)
    written = tmp_path / "written"
    inputs = ["-i", images / first.name, "-i", images / first.name.replace("_0000", "_0001")]
    run("predict", "-m", kd_dir / "fold_0", *inputs, "-o", written, "-q")
    before = {p.name: p.stat().st_mtime_ns for p in written.iterdir()}
    message = refused("predict", "-m", kd_dir / "fold_0", *inputs, "-o", written)
    assert "already holds predictions" in message and "--overwrite" in message
    assert {p.name: p.stat().st_mtime_ns for p in written.iterdir()} == before, "nothing touched"
    run("predict", "-m", kd_dir / "fold_0", *inputs, "-o", written, "--overwrite", "-q")
    assert "--device must be" in refused(
        "predict", "-m", kd_dir / "fold_0", "-i", images, "-o", out, "--device", "tpu"
    )
    assert "unexpected argument" in refused("predict", "-m", kd_dir / "fold_0", "-i", images, "-o", out, "7")
