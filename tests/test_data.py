"""The synthetic dataset, the nnU-Net layout reader, splits and the MONAI preprocessing pipeline."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from core.config import PreprocessingConfig, SyntheticConfig
from core.data.layout import read_raw_dataset
from core.data.preprocessing import build_preprocessing, foreground_locations, preprocess_case
from core.data.splits import fold_cases, load_splits, make_splits, write_splits
from core.data.synthetic import generate_case, write_synthetic_dataset
from core.errors import ConfigError, DatasetError

SMALL = SyntheticConfig(kind="petct", num_cases=3, shape=(40, 40, 16), spacing=(1.6, 1.6, 4.0))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "Dataset001"
    write_synthetic_dataset(SMALL, root, progress=False)
    return root


def test_synthetic_is_deterministic_for_a_seed():
    a, la, aff_a = generate_case(SMALL, 1)
    b, lb, aff_b = generate_case(SMALL, 1)
    c, _, _ = generate_case(SMALL.model_copy(update={"seed": 7}), 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) and np.array_equal(la, lb)
    assert np.array_equal(aff_a, aff_b)
    assert not np.array_equal(a[1], c[1])


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        for axis in range(3):
            grown |= np.roll(out, 1, axis) | np.roll(out, -1, axis)
        out = grown
    return out


def test_petct_needs_both_modalities():
    """PET is hot in tumours and in glands alike; only CT tells the glands (bright) from tumours (not)."""
    cfg = SyntheticConfig(kind="petct", num_cases=6, shape=(80, 80, 32))
    for i in range(6):
        (ct, pet), label, _ = generate_case(cfg, i)
        tumour = label == 1
        hot_outside = (pet > 3.0) & ~_dilate(tumour, 3)  # away from the tumours' PET blur
        assert tumour.sum() > 0 and hot_outside.sum() > 0, (
            "every case has a tumour and a physiological hot spot"
        )
        assert np.median(pet[tumour]) > 3.0
        assert np.median(ct[hot_outside]) > np.median(ct[tumour]) + 40, "glands are visibly brighter on CT"
        body = ct > -500
        assert abs(np.median(ct[tumour]) - np.median(ct[body & ~tumour & (pet < 2)])) < 25, (
            "tumours hide on CT"
        )


def test_mri_variant_has_three_channels_and_mimics():
    cfg = SyntheticConfig(kind="mri", num_cases=4, shape=(96, 96, 24), spacing=(1.0, 1.0, 3.0))
    for i in range(4):
        (t2, adc, hbv), label, _ = generate_case(cfg, i)
        lesion = label == 1
        assert lesion.any()
        assert np.median(t2[lesion]) < 300 and np.median(adc[lesion]) < 1000 and np.median(hbv[lesion]) > 100
        away = ~_dilate(lesion, 3)
        assert ((hbv > 120) & away).sum() > 20, "a DWI-bright mimic exists away from the lesions"
        assert ((t2 < 260) & (t2 > 0) & away & (adc > 1200)).sum() > 20, (
            "a T2-dark mimic with normal ADC exists"
        )


def test_thin_variant_has_thin_vessels_nodules_and_a_mimic_per_channel(tmp_path):
    from scipy import ndimage

    from core.data.synthetic import _Grid, _thin_signal

    cfg = SyntheticConfig(kind="thin", num_cases=4, shape=(96, 96, 40), spacing=(1.0, 1.0, 2.0))
    for i in range(4):
        _, label, _ = generate_case(cfg, i)
        (t1, t2), signal_label, _ = _thin_signal(
            np.random.default_rng([cfg.seed, i]), _Grid((96, 96, 40), (1.0, 1.0, 2.0))
        )
        assert np.array_equal(label, signal_label), "the noiseless signal is the case's"
        vessel, nodule = label == 1, label == 2
        assert vessel.sum() > 100 and nodule.sum() > 50, "every case holds both classes"
        in_plane = np.ones((3, 3, 1), bool)
        assert ndimage.binary_erosion(vessel, in_plane, iterations=2).sum() < 0.02 * vessel.sum(), (
            "vessels are at most ~4 mm across: two in-plane erosions leave (almost) nothing"
        )
        assert ndimage.binary_erosion(nodule, in_plane, iterations=2).sum() > 0, "nodules are blobs"
        away = ~_dilate(label > 0, 2)
        assert ((t1 > 550) & (t2 < 450) & away).sum() > 20, "T1-bright tubes that are not vessels (nerves)"
        assert np.median(t1[nodule]) < 350 and np.median(t2[nodule]) > 500
    write_synthetic_dataset(cfg.model_copy(update={"num_cases": 2}), tmp_path / "thin", progress=False)
    dataset = read_raw_dataset(tmp_path / "thin")
    assert dataset.class_names == ["background", "vessel", "nodule"] and len(dataset.cases) == 2
    assert [c.case_id for c in dataset.cases] == ["SYNTHIN_000", "SYNTHIN_001"]


def test_written_layout_and_affines(raw):
    desc = json.loads((raw / "dataset.json").read_text())
    assert desc["channel_names"] == {"0": "CT", "1": "PET"} and desc["file_ending"] == ".nii.gz"
    img = nib.load(raw / "imagesTr" / "SYNPETCT_000_0001.nii.gz")
    assert img.shape == (40, 40, 16)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), [1.6, 1.6, 4.0])
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    ds = read_raw_dataset(raw)
    assert [c.case_id for c in ds.cases] == ["SYNPETCT_000", "SYNPETCT_001", "SYNPETCT_002"]
    assert ds.num_classes == 2 and ds.class_names == ["background", "tumour"]


def test_layout_errors_name_the_problem(raw, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(raw, copy)
    (copy / "imagesTr" / "SYNPETCT_001_0001.nii.gz").unlink()
    with pytest.raises(
        DatasetError, match=r"case 'SYNPETCT_001' is missing modality file\(s\) SYNPETCT_001_0001"
    ):
        read_raw_dataset(copy)
    (copy / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"no dataset\.json"):
        read_raw_dataset(copy)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        read_raw_dataset(tmp_path / "absent")


def test_splits_are_patient_level_seeded_folds(tmp_path):
    ids = [f"C{i:02d}" for i in range(11)]
    splits = make_splits(ids, 5, seed=3)
    assert splits == make_splits(ids, 5, seed=3) != make_splits(ids, 5, seed=4)
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == ids
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and sorted(s["train"] + s["val"]) == ids
    write_splits(splits, tmp_path / "splits_final.json")
    assert load_splits(tmp_path / "splits_final.json", ids) == splits
    with pytest.raises(DatasetError, match="unknown case"):
        load_splits(tmp_path / "splits_final.json", ids[:-1])
    with pytest.raises(ConfigError, match="fold 5 does not exist"):
        fold_cases(splits, 5)
    with pytest.raises(ConfigError, match="fold 1 has no training cases"):
        fold_cases([splits[0], {"train": [], "val": ids}], 1)


def test_preprocessing_resamples_reorients_normalises_and_pads(raw):
    ds = read_raw_dataset(raw)
    cfg = PreprocessingConfig(foreground_threshold=-500.0, min_size=(32, 32, 32), size_divisor=32)
    pc = preprocess_case(build_preprocessing(cfg, ds.channel_names), ds.cases[0], ds.num_classes)
    assert pc.image.shape[0] == 2 and pc.image.shape[1:] == pc.label.shape
    assert all(s % 32 == 0 and s >= 32 for s in pc.label.shape)
    assert np.allclose(np.diag(pc.affine)[:3], [2.0, 2.0, 2.0]), "RAS orientation at the target spacing"
    ct, pet = pc.image
    assert ct.min() >= 0.0 and ct.max() <= 1.0, "CT clipped to the window and scaled"
    lesion = pc.label == 1
    assert lesion.any() and pet[lesion].mean() > pet[~lesion].mean() + 2.0, "label stays aligned with PET"
    # the world position of a tumour voxel is the same before and after preprocessing
    src = nib.load(ds.cases[0].label)
    centre_src = src.affine @ np.append(np.argwhere(np.asarray(src.dataobj) == 1).mean(0), 1.0)
    centre_out = pc.affine @ np.append(np.argwhere(lesion).mean(0), 1.0)
    assert np.linalg.norm(centre_src[:3] - centre_out[:3]) < 2.5


def test_foreground_locations_point_at_foreground():
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:4, 2:4, 2:4] = 1
    label[6, 6, 6] = 2
    rows = foreground_locations(label, max_per_class=5)
    assert rows.shape == (6, 4)
    assert all(label[x, y, z] == c for c, x, y, z in rows)


def test_building_the_preprocessing_prints_no_library_warning():
    """Users saw MONAI's FutureWarning about Orientationd's labels on every `teachcache preprocess`."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_preprocessing(PreprocessingConfig(), ("CT", "PET"))
    assert [str(w.message)[:80] for w in caught] == []


def test_organ_variant_has_four_nested_touching_classes_of_very_different_sizes(tmp_path):
    from scipy import ndimage

    cfg = SyntheticConfig(kind="organ", num_cases=4, shape=(96, 96, 40), spacing=(1.0, 1.0, 2.0))
    for i in range(4):
        (ct, t2), label, _ = generate_case(cfg, i)
        sizes = [int((label == c).sum()) for c in range(1, 5)]
        assert all(s > 0 for s in sizes), f"case {i}: every class present ({sizes})"
        organ, core, duct, lesion = sizes
        assert organ > 5 * core and core > 3 * min(duct, lesion), f"sizes span orders of magnitude ({sizes})"
        inside = ndimage.binary_dilation(label == 1, np.ones((3, 3, 3), bool))
        for c in (2, 3, 4):  # nested in the organ, touching it
            assert (inside & (label == c)).any(), f"class {c} touches the organ"
        assert (
            ndimage.binary_erosion(label == 3, np.ones((3, 3, 1), bool), iterations=2).sum() <= 0.02 * duct
        ), "ducts are thin"
        # the core differs from the organ on T2 only; lesions are hypodense on CT
        assert abs(np.median(ct[label == 2]) - np.median(ct[label == 1])) < 15
        assert np.median(t2[label == 2]) > np.median(t2[label == 1]) + 80
        assert np.median(ct[label == 4]) < np.median(ct[label == 1]) - 30
    write_synthetic_dataset(cfg.model_copy(update={"num_cases": 2}), tmp_path / "organ", progress=False)
    dataset = read_raw_dataset(tmp_path / "organ")
    assert dataset.class_names == ["background", "organ", "core", "duct", "lesion"]
