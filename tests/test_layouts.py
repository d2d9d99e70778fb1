"""Real dataset layouts on small trees written in their exact real layouts: Medical Segmentation Decathlon (4-D
NIfTI), HECKTOR 2021 (CT, PET on its own coarser grid, GTVt, bbox.csv in ITK/LPS mm) and PI-CAI 2022 (.mha per
modality, ADC/HBV on their own grids, expert masks in a separate tree, several studies per patient) — through
`teachcache dataset check` and `teachcache preprocess`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from core.config import DatasetConfig, load_config
from core.data.layouts import read_dataset
from core.data.readers import SimpleITKReader, read_header
from core.data.splits import load_splits, make_splits
from core.errors import DatasetError
from core.store.teacher_store import TeacherStore
from teachcache.cli import app

sitk = pytest.importorskip("SimpleITK")  # in the dev extra: `make test` installs it
runner = CliRunner()


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _mha(path: Path, data: np.ndarray, spacing, origin_lps, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T))  # ITK arrays are (z, y, x)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin_lps])
    image.SetDirection([float(d) for d in direction])
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return (((grid - np.asarray(centre, float)[:, None, None, None]) ** 2).sum(0) < radius**2).astype(
        np.uint8
    )


def _config(tmp: Path, dataset: dict, **preprocessing) -> Path:
    data = {
        "experiment": "layout",
        "dataset": dataset,
        "preprocessing": {
            "target_spacing": [2.0, 2.0, 2.0],
            "foreground_threshold": -1e9,
            "min_size": [16, 16, 16],
            "size_divisor": 16,
            **preprocessing,
        },
        "splits": {"num_folds": 2},
        "store": {"path": str(tmp / "store.zarr"), "chunk_size": [16, 16, 16]},
        "teachers": [
            {"name": "unetr", "arch": "unetr", "args": {"img_size": 16}, "checkpoint": str(tmp / "t.pth")}
        ],
        "student": {"arch": "basic_unet"},
        "output": {"runs_dir": str(tmp / "runs")},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(args: list[str], code: int = 0) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


# --- readers ------------------------------------------------------------------------------------------------------------


def test_mha_reader_matches_nibabel_on_an_oblique_image(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((7, 6, 5)).astype(np.float32)
    theta = 0.4
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    ) @ np.diag([0.7, 1.3, 3.0])
    affine[:3, 3] = [-12.0, 30.5, 7.25]
    nii = _nifti(tmp_path / "a.nii.gz", data, affine)
    mha = tmp_path / "a.mha"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(mha))  # ITK converts RAS to its LPS itself: the reference
    shape, read_affine = read_header(mha)
    assert shape == (7, 6, 5)
    np.testing.assert_allclose(read_affine, affine, atol=1e-5)
    array, meta = SimpleITKReader().get_data(SimpleITKReader().read(mha))
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-5)


# --- Medical Segmentation Decathlon -----------------------------------------------------------------------------------


def _msd(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(1)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    training = []
    for i in range(n):
        label = _ball((21, 19, 11), (10, 9, 5), 4) + _ball((21, 19, 11), (10, 9, 5), 2)  # classes 1 and 2
        image = np.stack(
            [label * 50.0 + rng.standard_normal(label.shape), rng.standard_normal(label.shape)], axis=-1
        )
        _nifti(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", image.astype(np.float32), affine)
        _nifti(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", label.astype(np.uint8), affine)
        training.append(
            {"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"}
        )
    (root / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "enhancing tumour"}, "numTraining": n,
        "training": training, "test": []}))  # fmt: skip
    return root


def test_msd_4d_images_preprocess_into_channels(tmp_path):
    root = _msd(tmp_path / "Task01_BrainTumour")
    report = json.loads(_run(["dataset", "check", str(root), "--json"]))
    assert report["layout"] == "msd" and report["ok"] and report["cases"] == 4
    assert report["channels"] == ["FLAIR", "T1w"] and report["label_values"] == [0, 1, 2]
    config = _config(tmp_path, {"raw_dir": str(root), "layout": "msd"})
    _run(["preprocess", "-c", str(config), "-q"])
    store = TeacherStore.open(tmp_path / "store.zarr")
    assert store.case_ids() == [f"BRATS_{i:03d}" for i in range(4)]
    image, label = store.read_image("BRATS_000"), store.read_label("BRATS_000")
    assert image.shape[0] == 2 and set(np.unique(label)) == {0, 1, 2}
    assert store.metadata["dataset"]["class_names"] == ["background", "edema", "enhancing tumour"]
    # FLAIR carries the label; T1w is noise: the channels kept their order through the 4-D file
    assert np.corrcoef(image[0].ravel(), (label > 0).ravel())[0, 1] > 0.9
    assert abs(np.corrcoef(image[1].ravel(), (label > 0).ravel())[0, 1]) < 0.3


# --- HECKTOR 2021 -----------------------------------------------------------------------------------------------------


def _hecktor(root: Path, pids=("CHGJ007", "CHMR001", "CHUM013", "CHUS004")) -> Path:
    """``hecktor_nii/<PID>_{ct,pt,gtvt}.nii.gz`` with real-looking geometry: CT 0.98×0.98×3 mm in the LPS-flipped
    NIfTI convention of DICOM conversions; PET on its own 4 mm grid and origin, in SUV; bbox.csv in LPS mm."""
    rng = np.random.default_rng(2)
    rows = ["PatientID,x1,x2,y1,y2,z1,z2"]
    for i, pid in enumerate(pids):
        ct_shape = (96, 96, 30)
        ct_affine = np.array([[-0.98, 0, 0, 47.0 + i], [0, -0.98, 0, 60.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])
        centre_vox = np.array([48, 50, 15])
        gtv = _ball(ct_shape, centre_vox, 6)
        ct = (rng.normal(40, 10, ct_shape) + 0 * gtv).astype(np.float32)
        _nifti(root / "hecktor_nii" / f"{pid}_ct.nii.gz", ct, ct_affine)
        _nifti(root / "hecktor_nii" / f"{pid}_gtvt.nii.gz", gtv, ct_affine)
        pt_affine = np.array([[-4.0, 0, 0, 50.0 + i], [0, -4.0, 0, 62.0], [0, 0, 4.0, -42.0], [0, 0, 0, 1]])
        centre_world = ct_affine @ np.append(centre_vox, 1.0)
        centre_pt = (np.linalg.inv(pt_affine) @ centre_world)[:3]
        pet = 1.0 + 9.0 * _ball((26, 26, 24), centre_pt, 3).astype(
            np.float32
        )  # SUV 10 in the tumour, 1 around
        _nifti(root / "hecktor_nii" / f"{pid}_pt.nii.gz", pet, pt_affine)
        # a 40 mm box around the tumour, in ITK (LPS) coordinates: x_lps = −x_ras, y_lps = −y_ras
        x, y, z = centre_world[:3]
        rows.append(
            f"{pid},{-x - 20:.2f},{-x + 20:.2f},{-y - 20:.2f},{-y + 20:.2f},{z - 20:.2f},{z + 20:.2f}"
        )
    (root / "bbox.csv").write_text("\n".join(rows) + "\n")
    return root


def test_hecktor_crops_the_world_box_keeps_suv_and_resamples_pet_onto_ct(tmp_path):
    root = _hecktor(tmp_path / "hecktor2021_train")
    report = json.loads(_run(["dataset", "check", str(root), "--json"]))
    assert report["layout"] == "hecktor" and report["ok"], report["problems"]
    assert report["spacing"]["PT"]["median"] == [4.0, 4.0, 4.0] and report["spacing"]["CT"]["median"] == [
        0.98,
        0.98,
        3.0,
    ]
    config = _config(
        tmp_path,
        {"raw_dir": str(root), "layout": "hecktor"},
        normalization={"PT": "none"},
        min_size=[16, 16, 16],
        size_divisor=4,
    )
    _run(["preprocess", "-c", str(config), "-q"])
    store = TeacherStore.open(tmp_path / "store.zarr")
    assert len(store.case_ids()) == 4
    case = "CHGJ007"
    attrs = store.case_attrs(case)
    image, label = store.read_image(case), store.read_label(case)
    # cropped to the 40 mm box at 2 mm, not the 94 mm field of view
    affine = np.asarray(attrs["affine"])
    assert np.allclose(np.abs(np.diag(affine)[:3]), 2.0)
    ct_affine = nib.load(root / "hecktor_nii" / f"{case}_ct.nii.gz").affine
    centre = ct_affine @ np.array([48, 50, 15, 1.0])
    lab_world = affine @ np.append(np.argwhere(label > 0).mean(0), 1.0)
    np.testing.assert_allclose(
        lab_world[:3], centre[:3], atol=2.5
    )  # the tumour stays where it was in the world
    # exactly the box: 40 mm at 2 mm is 20 voxels per axis (half-open on the resampled grid), whatever the CT's offset
    assert image.shape[1:] == (20, 20, 20) and label.sum() > 0
    # PET kept in SUV (not z-scored): ~10 in the tumour, ~1 around it; it came from its own 4 mm grid
    pet = image[1]
    assert 6.0 < pet[label > 0].mean() <= 10.0 and abs(np.median(pet[label == 0]) - 1.0) < 0.2
    # predictions go back to the original CT geometry: the recorded original grid is the CT's
    np.testing.assert_allclose(attrs["original_affine"], ct_affine, atol=1e-5)
    assert attrs["original_shape"] == [96, 96, 30]


def test_hecktor_bad_cases_are_reported_per_case_with_their_files(tmp_path):
    root = _hecktor(tmp_path / "h", pids=("CHGJ007", "CHMR001", "CHUM013"))
    nii = root / "hecktor_nii"
    # a box 2 m away from the scan
    text = (root / "bbox.csv").read_text().replace("CHMR001,", "CHMR001,2000,")
    lines = [
        line if not line.startswith("CHMR001") else "CHMR001,2000,2040,0,40,0,40"
        for line in text.splitlines()
    ]
    (root / "bbox.csv").write_text("\n".join(lines) + "\n")
    # NaN voxels in a PET
    img = nib.load(nii / "CHUM013_pt.nii.gz")
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = np.nan
    _nifti(nii / "CHUM013_pt.nii.gz", data, img.affine)
    # a label value outside the classes
    img = nib.load(nii / "CHGJ007_gtvt.nii.gz")
    _nifti(nii / "CHGJ007_gtvt.nii.gz", (np.asarray(img.dataobj) * 3).astype(np.uint8), img.affine)
    result = runner.invoke(app, ["dataset", "check", str(root)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert "CHMR001" in out and "lies outside the image" in out
    assert "CHUM013" in out and "NaN or Inf" in out and "CHUM013_pt.nii.gz" in out
    assert "CHGJ007" in out and "label value(s) 3" in out
    config = _config(tmp_path, {"raw_dir": str(root), "layout": "hecktor"})
    refused = _run(["preprocess", "-c", str(config), "-q"], code=2)
    assert "CHGJ007" in refused and "label value(s) 3" in refused

    # a missing modality and an unsafe case id: the dataset cannot be read at all
    (nii / "CHUM013_pt.nii.gz").unlink()
    out = " ".join(_run(["dataset", "check", str(root)], code=1).split())
    assert "case 'CHUM013' is missing CHUM013_pt.nii.gz" in out


def test_modalities_that_do_not_overlap_are_refused(tmp_path):
    root = _hecktor(tmp_path / "h", pids=("CHGJ007", "CHMR001"))
    img = nib.load(root / "hecktor_nii" / "CHMR001_pt.nii.gz")
    moved = img.affine.copy()
    moved[:3, 3] += 1000.0
    _nifti(root / "hecktor_nii" / "CHMR001_pt.nii.gz", np.asarray(img.dataobj), moved)
    out = " ".join(_run(["dataset", "check", str(root)], code=1).split())
    assert "CHMR001" in out and "cover different parts of the world" in out


# --- PI-CAI 2022 ------------------------------------------------------------------------------------------------------


def _picai(root: Path, patients: int = 5) -> tuple[Path, Path]:
    """``images/<patient>/<patient>_<study>_{t2w,adc,hbv,sag}.mha``; masks in
    ``picai_labels/csPCa_lesion_delineations/human_expert/resampled``; patient 10000 has two studies, one study has
    no mask, two are lesion-free; ADC and HBV on a 2 mm grid, T2W on 0.5×0.5×3 mm."""
    rng = np.random.default_rng(3)
    images, labels = root / "picai_public_images", root / "picai_labels"
    masks = labels / "csPCa_lesion_delineations" / "human_expert" / "resampled"
    studies = [(f"{10000 + p}", f"{1000000 + p}") for p in range(patients)] + [("10000", "1000099")]
    for n, (patient, study) in enumerate(studies):
        case = f"{patient}_{study}"
        t2_shape, t2_spacing, origin = (64, 64, 12), (0.5, 0.5, 3.0), (-16.0, -16.0, -18.0)
        lesion = _ball(t2_shape, (32, 30, 6), 8) * (2 if n % 2 else 1)  # ISUP-style grades: binarised
        if n in (1, 3):
            lesion[:] = 0  # lesion-free
        t2 = (rng.normal(100, 5, t2_shape) + 50 * (lesion > 0)).astype(np.float32)
        _mha(images / patient / f"{case}_t2w.mha", t2, t2_spacing, origin)
        _mha(images / patient / f"{case}_sag.mha", t2, t2_spacing, origin)  # not used
        dw_shape, dw_spacing = (16, 16, 18), (2.0, 2.0, 2.0)
        for kind in ("adc", "hbv"):
            _mha(images / patient / f"{case}_{kind}.mha", rng.normal(1.0, 0.1, dw_shape).astype(np.float32),
                 dw_spacing, (origin[0] - 0.5, origin[1] + 0.5, origin[2] + 1.0))  # fmt: skip
        if study != "1000004":  # a study without a mask: skipped, counted
            affine = np.diag([-0.5, -0.5, 3.0, 1.0])  # the same grid as the T2W, in NIfTI's RAS convention
            affine[:3, 3] = [16.0, 16.0, -18.0]
            _nifti(masks / f"{case}.nii.gz", lesion.astype(np.uint8), affine)
    return images, labels


def test_picai_reads_mha_skips_studies_without_masks_and_keeps_patients_together(tmp_path):
    images, labels = _picai(tmp_path)
    report = json.loads(_run(["dataset", "check", str(images), "--labels-dir", str(labels), "--json"]))
    assert report["layout"] == "picai" and report["ok"], report["problems"]
    assert report["cases"] == 5 and report["patients"] == 4 and len(report["skipped"]) == 1
    assert "10004_1000004" in report["skipped"][0]
    assert report["label_values"] == [0, 1] and report["lesion_free"] == 2
    assert report["channels"] == ["T2W", "ADC", "HBV"]

    ds = read_dataset(DatasetConfig(raw_dir=images, layout="picai", labels_dir=labels))
    patients = {c.case_id: c.patient for c in ds.cases}
    assert patients["10000_1000000"] == patients["10000_1000099"] == "10000"
    for fold in make_splits([c.case_id for c in ds.cases], 2, seed=0, patients=patients):
        assert not {patients[c] for c in fold["train"]} & {patients[c] for c in fold["val"]}
    split_file = tmp_path / "official.json"
    split_file.write_text(
        json.dumps([{"train": ["10000_1000000"], "val": ["10000_1000099", "10001_1000001"]}])
    )
    with pytest.raises(DatasetError, match="patient\\(s\\) 10000 in both train and val"):
        load_splits(split_file, [c.case_id for c in ds.cases], patients)

    config = _config(tmp_path, {"raw_dir": str(images), "layout": "picai", "labels_dir": str(labels)},
                     target_spacing=[0.5, 0.5, 3.0], min_size=[32, 32, 16])  # fmt: skip
    _run(["preprocess", "-c", str(config), "-q"])
    store = TeacherStore.open(tmp_path / "store.zarr")
    assert len(store.case_ids()) == 5
    image, label = store.read_image("10000_1000000"), store.read_label("10000_1000000")
    assert image.shape[0] == 3 and set(np.unique(label)) <= {0, 1} and label.sum() > 0
    assert store.read_label("10001_1000001").sum() == 0  # lesion-free cases are kept
    from core.evaluation.geometry import original_label

    assert set(np.unique(original_label(store, "10000_1000099"))) == {0, 1}  # raw grade 2 scored as csPCa

    # the reference channel's grid is the one recorded as the original geometry (ADC here, on its 2 mm grid)
    from core.data.preprocessing import build_preprocessing, preprocess_case

    adc_ref = load_config(config).preprocessing.model_copy(update={"reference_channel": 1})
    case = next(c for c in ds.cases if c.case_id == "10000_1000000")
    pc = preprocess_case(build_preprocessing(adc_ref, ds.channel_names, 3, True), case, 2, True, True)
    np.testing.assert_allclose(pc.original_affine, read_header(case.images[1])[1], atol=1e-6)
    assert pc.original_shape == (16, 16, 18)
    assert np.isfinite(image).all()
    grid = np.abs(np.diag(np.asarray(store.case_attrs("10000_1000000")["affine"]))[:3])
    np.testing.assert_allclose(grid, [0.5, 0.5, 3.0])  # ADC and HBV were brought onto the T2W grid
    splits = json.loads((tmp_path / "runs" / "splits_final.json").read_text())
    for fold in splits:  # the splits `preprocess` made keep a patient's studies together
        assert not {c.split("_")[0] for c in fold["train"]} & {c.split("_")[0] for c in fold["val"]}


def test_picai_without_simpleitk_says_how_to_install(tmp_path, monkeypatch):
    import sys

    images, labels = _picai(tmp_path, patients=2)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    out = " ".join(_run(["dataset", "check", str(images), "--labels-dir", str(labels)], code=1).split())
    assert "pip install 'teachcache[mha]'" in out


def test_dataset_check_refuses_a_folder_of_unknown_layout(tmp_path):
    (tmp_path / "x").mkdir()
    out = " ".join(_run(["dataset", "check", str(tmp_path / "x")], code=1).split())
    assert "cannot tell the dataset's layout" in out
    _run(["dataset", "check", str(tmp_path / "x"), "--layout", "nope"], code=2)


def test_paper_configs_load():
    for name in ("hecktor21", "picai22"):
        cfg = load_config(Path("configs") / f"{name}.yaml")
        assert cfg.dataset.layout == name[:-2]
        assert cfg.preprocessing_hash()  # every key valid
