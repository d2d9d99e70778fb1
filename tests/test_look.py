"""`teachcache ls / inspect / show / export / view / stats / diff` through the CLI, on a store the test writes: three
classes, odd sizes, oriented affines, a teacher cached per fold and one for every fold."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from core.inspection.views import napari_layers, upsample_map
from core.store.teacher_store import TeacherStore
from teachcache.cli import app

runner = CliRunner()

SHAPES = {"CASE_A": (23, 17, 11), "CASE_B": (19, 21, 13), "CASE_C": (25, 15, 9), "CASE_D": (17, 17, 17)}
SPLITS = [{"train": ["CASE_C", "CASE_D"], "val": ["CASE_A", "CASE_B"]},
          {"train": ["CASE_A", "CASE_B"], "val": ["CASE_C", "CASE_D"]}]  # fmt: skip
CLASSES = ["background", "liver", "lesion"]


def _affine(i: int) -> np.ndarray:
    """An oblique, flipped voxel-to-world matrix with anisotropic spacing."""
    theta = 0.3 + 0.1 * i
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, -1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [10.0 * i, -5.0, 3.0]
    return affine


def _label(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    label = np.zeros(shape, np.uint8)
    for cls, radius in ((1, 0.35), (2, 0.15)):
        centre = rng.uniform(0.35, 0.65, 3) * np.array(shape)
        dist = np.sqrt(
            (((grid - centre[:, None, None, None]) / np.array(shape)[:, None, None, None]) ** 2).sum(0)
        )
        label[dist < radius] = cls
    return label


def _logits(label: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    onehot = np.eye(len(CLASSES), dtype=np.float32)[label].transpose(3, 0, 1, 2)
    return (4.0 * onehot + noise * rng.standard_normal(onehot.shape)).astype(np.float32)


def _entry(store: TeacherStore, key: str, case: str, rng: np.random.Generator, noise: float = 2.0) -> None:
    label = store.read_label(case)
    shape = label.shape
    coarse = rng.random(tuple(max(1, s // 8) for s in shape)).astype(np.float32) + 0.1
    fine = rng.random(tuple(max(1, s // 2) for s in shape)).astype(np.float32) + 0.1
    store.write_entry(key, case, _logits(label, rng, noise), coarse, fine)


def write_store(path: Path, seed: int = 0) -> TeacherStore:
    rng = np.random.default_rng(seed)
    store = TeacherStore.create(
        path,
        dataset={
            "name": "ThreeClass",
            "channel_names": ["T2", "ADC"],
            "class_names": CLASSES,
            "num_cases": len(SHAPES),
            "manifest_hash": "test",
        },
        preprocessing={},
        preprocessing_hash="test",
        splits=SPLITS,
        chunk_size=(16, 16, 16),
    )
    for i, (case, shape) in enumerate(SHAPES.items()):
        label = _label(shape, rng)
        image = np.stack([label * 100.0 + rng.standard_normal(shape), rng.standard_normal(shape)]).astype(
            np.float32
        )
        fg = np.argwhere(label > 0)
        foreground = np.concatenate([label[label > 0][:, None], fg], axis=1)
        affine = _affine(i)
        store.write_case(
            case,
            image,
            label,
            foreground,
            {
                "affine": affine.tolist(),
                "original_affine": affine.tolist(),
                "original_shape": list(shape),
                "spacing": [0.8, 1.1, 2.5],
                "source_files": [],
            },
        )
    for fold, split in enumerate(SPLITS):
        key = f"seg/fold_{fold}"
        store.write_teacher_metadata(key, {"arch": "unetr", "fold": fold, "checkpoint_sha256": "ab" * 32})
        for case in (
            SHAPES
        ):  # every case, as `make cache` writes them; the fold's validation cases are the honest ones
            _entry(store, key, case, rng, noise=1.0 if case in split["val"] else 0.1)
    store.write_teacher_metadata(
        "big/all_folds", {"arch": "swin_unetr", "fold": None, "checkpoint_sha256": "cd" * 32}
    )
    for case in SHAPES:
        _entry(store, "big/all_folds", case, rng)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TeacherStore:
    return write_store(tmp_path_factory.mktemp("look") / "store.zarr")


def _ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _refused(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


# --- ls / inspect ----------------------------------------------------------------------------------------------------


def test_ls_lists_teachers_and_cases_with_completeness(store):
    import zarr

    copy = Path(store.location).with_name("ls.zarr")
    shutil.copytree(store.location, copy)
    zarr.open_group(str(copy), mode="a")["teachers/big/all_folds/CASE_C"].attrs["complete"] = False
    text = _ok(["ls", str(copy)]).output
    assert "big/all_folds" in text and "3/4 cases  INCOMPLETE" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("case")] == sorted(SHAPES)
    data = json.loads(_ok(["ls", str(copy), "--json"]).output)
    assert {t["teacher"]: t["complete"] for t in data["teachers"]} == {
        "big/all_folds": 3,
        "seg/fold_0": 4,
        "seg/fold_1": 4,
    }
    assert {c["case"]: c["teachers"] for c in data["cases"]}["CASE_C"] == 2


def test_inspect_filters_by_teacher_and_case_with_provenance(store):
    data = json.loads(
        _ok(["inspect", store.location, "--teacher", "seg", "--case", "CASE_B", "--json"]).output
    )
    assert [t["name"] for t in data["teachers"]] == ["seg/fold_0", "seg/fold_1"]
    assert data["teachers"][0]["provenance"]["checkpoint_sha256"] == "ab" * 32
    paths = {a["path"] for a in data["arrays"]}
    assert "teachers/seg/fold_1/CASE_B/softmax" in paths and "cases/CASE_B/image" in paths
    assert not any("big" in p or "CASE_A" in p for p in paths)
    softmax = next(a for a in data["arrays"] if a["path"] == "teachers/seg/fold_1/CASE_B/softmax")
    # one shard holding the whole array: its 16³ chunk grid rounded up to whole chunks (format 2.3)
    assert softmax["shards"] == [2, 32, 32, 13] and softmax["chunks"] == [2, 16, 16, 13]
    assert softmax["raw_bytes"] == 2 * 19 * 21 * 13  # K−1 int8 margins
    assert softmax["codecs"] == "Delta, Blosc, Crc32c"  # the checksum last (format 2.2)
    text = _ok(["inspect", store.location, "--teacher", "big/all_folds"]).output
    assert "provenance of big/all_folds" in text and "swin_unetr" in text


# --- show ---------------------------------------------------------------------------------------------------------------


def test_show_writes_a_readable_png_of_the_expected_size(store, tmp_path):
    from matplotlib.image import imread

    from core.inspection.views import DPI, PANEL_INCHES, figure_grid

    out = tmp_path / "case.png"
    text = _ok(["show", store.location, "CASE_C", "-o", str(out)]).output
    # each teacher by the copy that did not train on the case: CASE_C is validated by fold 1
    assert "big/all_folds, seg/fold_1" in text
    label = store.read_label("CASE_C")
    assert f"slice z = {int((label > 0).sum(axis=(0, 1)).argmax())}" in text  # the slice with most foreground
    pixels = imread(out)
    rows, cols = figure_grid(channels=2, teachers=2)
    assert pixels.shape[:2] == (round(rows * PANEL_INCHES * DPI), round(cols * PANEL_INCHES * DPI))
    assert pixels[..., :3].std() > 0.1  # not blank
    _ok(["show", store.location, "CASE_C", "--axis", "x", "--slice", "0", "-t", "seg/fold_0", "-o", str(out)])
    rows, cols = figure_grid(channels=2, teachers=1)
    assert imread(out).shape[:2] == (round(rows * PANEL_INCHES * DPI), round(cols * PANEL_INCHES * DPI))


def test_show_and_export_refuse_bad_input_with_one_message(store, tmp_path):
    loc = store.location
    _refused(["show", str(tmp_path), "CASE_A"], "is not a TeachCache store")
    _refused(["show", loc, "CASE_Z"], "no case 'CASE_Z'", "CASE_A, CASE_B, CASE_C, CASE_D")
    _refused(
        ["show", loc, "CASE_A", "-t", "nope"], "no teacher 'nope'", "big/all_folds, seg/fold_0, seg/fold_1"
    )
    _refused(
        ["show", loc, "CASE_A", "--slice", "11", "-o", str(tmp_path / "a.png")],
        "slice 11 is out of range",
        "0–10",
    )
    _refused(["show", loc, "CASE_A", "--axis", "w"], "--axis must be x, y or z")
    _refused(["show", loc, "CASE_A", "-o", str(tmp_path / "missing" / "a.png")], "does not exist")
    _refused(
        ["export", loc, "CASE_A", "-t", "seg", "-w", "maps", "-o", str(tmp_path / "a.nii.gz")],
        "--what must be",
    )
    _refused(
        ["export", loc, "CASE_A", "-t", "seg", "-w", "probs", "-o", str(tmp_path / "a.png")],
        ".nii or .nii.gz",
    )
    _refused(["export", loc, "CASE_A", "-t", "seg", "-w", "probs", "--class", "bone", "-o", str(tmp_path / "a.nii")],
             "no class 'bone'", "2 lesion")  # fmt: skip
    _refused(["inspect", loc, "--teacher", "nope"], "no teacher 'nope'")
    assert not list(tmp_path.glob("*.nii*")) and not list(tmp_path.glob("*.png"))  # nothing half-written


# --- export -----------------------------------------------------------------------------------------------------------


def test_export_round_trips_with_the_case_affine(store, tmp_path):
    case = "CASE_A"  # validated by fold 0
    affine = np.asarray(store.case_attrs(case)["affine"])
    probs = store.read_softmax("seg/fold_0", case)

    out = tmp_path / "probs.nii.gz"
    assert (
        "seg/fold_0 probs"
        in _ok(["export", store.location, case, "-t", "seg", "-w", "probs", "-o", str(out)]).output
    )
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert img.shape == (*SHAPES[case], 3)  # three classes: every class, as the 4th axis
    np.testing.assert_allclose(np.asarray(img.dataobj), np.moveaxis(probs, 0, -1), atol=1e-6)

    _ok(["export", store.location, case, "-t", "seg", "-w", "probs", "--class", "lesion", "-o", str(out)])
    np.testing.assert_allclose(np.asarray(nib.load(out).dataobj), probs[2], atol=1e-6)

    out = tmp_path / "fine.nii"
    _ok(["export", store.location, case, "-t", "big", "-w", "fine", "-o", str(out)])
    amap, _ = store.read_attention("big/all_folds", case, "fine")
    img = nib.load(out)
    assert img.shape == SHAPES[case]
    np.testing.assert_allclose(np.asarray(img.dataobj), upsample_map(amap, SHAPES[case]), atol=1e-6)
    # the map's own voxels survive: its value at a map voxel's centre (stride 2 → between two case voxels)
    up = np.asarray(img.dataobj)
    np.testing.assert_allclose(up[1::2, 1::2, 1::2].mean(), amap.mean(), rtol=0.1)

    # --original: the raw grid (here the same grid and affine: resampling must give the map back)
    out = tmp_path / "orig.nii.gz"
    _ok(["export", store.location, case, "-t", "big", "-w", "coarse", "--original", "-o", str(out)])
    amap, _ = store.read_attention("big/all_folds", case, "coarse")
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj), upsample_map(amap, SHAPES[case]), atol=1e-4)


# --- view ---------------------------------------------------------------------------------------------------------------


def test_view_layers_are_lazy_and_at_true_scale(store):
    import dask.array as da

    layers = napari_layers(store, "CASE_D", ["seg/fold_1", "big/all_folds"])
    by_name = {kw["name"]: (data, kw, kind) for data, kw, kind in layers}
    assert list(by_name)[:3] == ["T2", "ADC", "label"] and by_name["label"][2] == "labels"
    assert all(isinstance(data, da.Array) for data, _, _ in layers)
    np.testing.assert_allclose(by_name["T2"][1]["scale"], [0.8, 1.1, 2.5])
    prob = by_name["seg/fold_1 p(foreground)"][0].compute()
    np.testing.assert_allclose(prob, 1.0 - store.read_softmax("seg/fold_1", "CASE_D")[0], atol=1e-6)
    data, kw, _ = by_name["big/all_folds coarse attention"]
    _, stride = store.read_attention("big/all_folds", "CASE_D", "coarse")
    np.testing.assert_allclose(kw["scale"], np.array([0.8, 1.1, 2.5]) * stride)
    np.testing.assert_allclose(kw["translate"], (np.array(kw["scale"]) - [0.8, 1.1, 2.5]) / 2)
    assert data.shape == store.read_attention("big/all_folds", "CASE_D", "coarse")[0].shape


def test_view_without_napari_says_how_to_install(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "napari", None)  # import napari raises ImportError
    _refused(["view", store.location, "CASE_A"], "pip install 'teachcache[viewer]'")


# --- stats --------------------------------------------------------------------------------------------------------------


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = []
    for k in range(1, len(CLASSES)):
        x, y = a == k, b == k
        total = x.sum() + y.sum()
        scores.append(1.0 if total == 0 else 2.0 * (x & y).sum() / total)
    return float(np.mean(scores))


def test_stats_match_a_direct_numpy_computation(store, tmp_path):
    data = json.loads(_ok(["stats", store.location, "--json", "-o", str(tmp_path / "s")]).output)
    assert (tmp_path / "s" / "stats.json").is_file() and (
        tmp_path / "s" / "stats.png"
    ).stat().st_size > 10_000

    honest = {c: f"seg/fold_{k}" for k, s in enumerate(SPLITS) for c in s["val"]}
    copies = {"seg": honest, "big": dict.fromkeys(SHAPES, "big/all_folds")}
    argmax = {
        (t, c): np.argmax(store.read_softmax(key, c), axis=0)
        for t, m in copies.items()
        for c, key in m.items()
    }
    for row in data["teachers"]:
        t = row["teacher"]
        probs = {c: store.read_softmax(k, c) for c, k in copies[t].items()}
        labels = {c: store.read_label(c) for c in SHAPES}
        dice = np.mean([_dice(argmax[(t, c)], labels[c]) for c in SHAPES])
        p = np.concatenate([probs[c].reshape(3, -1) for c in SHAPES], axis=1).astype(np.float64)
        entropy = float(np.mean(-(p * np.log(np.clip(p, 1e-300, None))).sum(0)))
        conf = p.max(0)
        correct = np.concatenate([(argmax[(t, c)] == labels[c]).ravel() for c in SHAPES])
        edges = np.linspace(0, 1, 16)
        ece = 0.0
        for lo, hi in itertools.pairwise(edges):
            inside = (conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi))
            if inside.any():
                ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
        other = "big" if t == "seg" else "seg"
        agreement = np.mean([_dice(argmax[(t, c)], argmax[(other, c)]) for c in SHAPES])
        assert row["cases"] == 4
        assert row["dice"] == pytest.approx(dice, abs=1e-6)
        assert row["entropy"] == pytest.approx(entropy, rel=1e-4)
        assert row["ece"] == pytest.approx(ece, abs=1e-5)
        assert row["agreement"] == pytest.approx(agreement, abs=1e-6)
    seg = next(r for r in data["teachers"] if r["teacher"] == "seg")
    assert seg["copies"] == ["seg/fold_0", "seg/fold_1"]
    # what an inode quota counts, per (teacher, case) entry: each array one data file beside its zarr.json
    entries = [p for p in Path(store.location).glob("teachers/*/*/*") if p.is_dir()]
    files = data["files"]
    assert files["entries"] == len(entries)
    assert files["files_per_entry"] == pytest.approx(
        sum(1 for e in entries for p in e.rglob("*") if p.is_file()) / len(entries)
    )
    assert files["data_files_per_array"] == 1.0

    one = json.loads(
        _ok(["stats", store.location, "--fold", "1", "--json", "-o", str(tmp_path / "s")]).output
    )
    assert one["cases"] == 2 and {r["teacher"]: r["copies"] for r in one["teachers"]}["seg"] == ["seg/fold_1"]
    _refused(["stats", store.location, "--fold", "2"], "no fold 2", "folds 0–1")


# --- diff ---------------------------------------------------------------------------------------------------------------


def test_diff_reports_what_changed_and_nothing_else(store, tmp_path):
    other = TeacherStore.open(shutil.copytree(store.location, tmp_path / "b.zarr"), mode="a")
    rng = np.random.default_rng(7)
    label = other.read_label("CASE_B")
    amap, _ = other.read_attention("seg/fold_0", "CASE_B", "coarse")
    fine, _ = other.read_attention("seg/fold_0", "CASE_B", "fine")
    other.write_entry("seg/fold_0", "CASE_B", _logits(label, rng, 3.0), amap, fine)
    other.write_teacher_metadata("extra/all_folds", {"arch": "unetr"})
    _entry(other, "extra/all_folds", "CASE_A", rng)

    data = json.loads(_ok(["diff", store.location, str(other.location), "--json"]).output)
    rows = {(t["teacher"], a["array"]): a for t in data["teachers"] for a in t["arrays"]}
    a = store.read_softmax("seg/fold_0", "CASE_B")
    b = other.read_softmax("seg/fold_0", "CASE_B")
    changed = rows[("seg/fold_0", "softmax")]
    assert changed["max"] == pytest.approx(float(np.abs(a - b).max()), rel=1e-6)
    n = sum(np.prod(s) for s in SHAPES.values())  # the mean is over every case of the teacher
    assert changed["kl"] == pytest.approx(float((a * (np.log(a) - np.log(b))).sum(0).sum() / n), rel=1e-4)
    assert rows[("seg/fold_0", "coarse")]["max"] < 1e-3  # rewritten as read: float16 rounding only
    assert all(r["max"] == 0 for (t, _), r in rows.items() if t != "seg/fold_0")
    assert data["only_in_b"] == ["extra/all_folds"] and data["only_in_a"] == []
    text = _ok(["diff", store.location, str(other.location)]).output
    assert "seg/fold_0" in text and "KL" in text and "teachers only in B: extra/all_folds" in text
