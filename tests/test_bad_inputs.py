"""Bad input, table-driven: each malformed dataset gets one message naming the case or file, exit 2, no traceback.

Add a row for every new kind of bad input: (what is broken, how to break it, a fragment the message must hold).
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from teachcache.cli import app
from tests.conftest import tiny_config_dict, write_config

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A valid tiny raw dataset, written once; each test breaks its own copy."""
    from core.config import load_config
    from core.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("pristine")
    cfg = load_config(write_config(root, tiny_config_dict(root)))
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    return cfg.dataset.raw_dir


def _rewrite(path: Path, fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    img = nib.load(str(path))
    data, affine = fn(np.asanyarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _fractional_label(raw: Path) -> str:
    _rewrite(raw / "labelsTr" / "SYNPETCT_001.nii.gz", lambda d, a: (d.astype(np.float32) * 0.4, a))
    return (
        "case 'SYNPETCT_001': "
        + str(raw / "labelsTr" / "SYNPETCT_001.nii.gz")
        + " holds non-integer label values (0.4)"
    )


def _negative_label(raw: Path) -> str:
    def fn(d, a):
        d = d.astype(np.int16)
        d[0, 0, 0] = -1
        return d, a

    _rewrite(raw / "labelsTr" / "SYNPETCT_001.nii.gz", fn)
    return "holds label value(s) -1, not in dataset.json labels (0..1)"


def _four_d_image(raw: Path) -> str:
    _rewrite(raw / "imagesTr" / "SYNPETCT_002_0001.nii.gz", lambda d, a: (np.stack([d, d], axis=-1), a))
    return "case 'SYNPETCT_002'"


def _other_affine(raw: Path) -> str:
    def fn(d, a):
        a[:3, 3] += 1000.0  # a PET a metre away from its CT: another scan (a grid that overlaps is resampled)
        return d, a

    _rewrite(raw / "imagesTr" / "SYNPETCT_003_0001.nii.gz", fn)
    return "case 'SYNPETCT_003': SYNPETCT_003_0001.nii.gz and SYNPETCT_003_0000.nii.gz cover different parts of the world"


def _truncated(raw: Path) -> str:
    path = raw / "imagesTr" / "SYNPETCT_004_0000.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return "case 'SYNPETCT_004'"


def _not_gzip(raw: Path) -> str:
    path = raw / "imagesTr" / "SYNPETCT_005_0000.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti file at all"))
    return "case 'SYNPETCT_005'"


def _edit_description(raw: Path, key: str, value) -> None:
    import json

    desc = json.loads((raw / "dataset.json").read_text())
    desc[key] = value
    (raw / "dataset.json").write_text(json.dumps(desc))


def _labels_as_list(raw: Path) -> str:
    _edit_description(raw, "labels", ["background", "tumour"])
    return "dataset.json: labels must be an object mapping class names to integers"


def _channels_as_list(raw: Path) -> str:
    _edit_description(raw, "channel_names", ["CT", "PET"])
    return "dataset.json: channel_names must be an object mapping '0', '1'"


def _rename_case(raw: Path, new: str) -> None:
    for p in [*raw.glob("imagesTr/SYNPETCT_000_*"), raw / "labelsTr" / "SYNPETCT_000.nii.gz"]:
        p.rename(p.with_name(p.name.replace("SYNPETCT_000", new)))


def _reserved_case_id(raw: Path) -> str:
    _rename_case(raw, "zarr.json")
    return "case id 'zarr.json' cannot name a case"


def _dot_dot_case_id(raw: Path) -> str:
    _rename_case(raw, "..")
    return "case id '..' cannot name a case"


def _empty_case_id(raw: Path) -> str:
    _rename_case(raw, "")
    return "case id '' cannot name a case"


BROKEN = {
    "labels as a list": _labels_as_list,
    "channel names as a list": _channels_as_list,
    "reserved case id": _reserved_case_id,
    "'..' as case id": _dot_dot_case_id,
    "empty case id": _empty_case_id,
    "fractional label": _fractional_label,
    "negative label": _negative_label,
    "4-D image": _four_d_image,
    "modalities not overlapping": _other_affine,
    "truncated .nii.gz": _truncated,
    "not a NIfTI": _not_gzip,
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_bad_dataset_gets_one_clear_message_naming_the_case_or_file(what, pristine, tmp_path):
    data = tiny_config_dict(tmp_path)
    raw = Path(data["dataset"]["raw_dir"])
    shutil.copytree(pristine, raw)
    fragment = BROKEN[what](raw)
    result = runner.invoke(app, ["preprocess", "-c", str(write_config(tmp_path, data)), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in " ".join(result.output.split()), result.output
    assert not (tmp_path / "store.zarr").exists(), "a failed first preprocess leaves no store behind"
    assert not (tmp_path / "runs" / "splits_final.json").exists(), "nor a splits file"


def test_full_disk_during_preprocess_says_so_and_leaves_nothing(pristine, tmp_path, monkeypatch):
    import errno

    from core.store.teacher_store import TeacherStore

    data = tiny_config_dict(tmp_path)
    shutil.copytree(pristine, Path(data["dataset"]["raw_dir"]))
    calls = []
    original = TeacherStore.write_case

    def write_case(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "store.zarr"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TeacherStore, "write_case", write_case)
    result = runner.invoke(app, ["preprocess", "-c", str(write_config(tmp_path, data)), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "No space left on device" in result.output and "Free space" in result.output
    assert not (tmp_path / "store.zarr").exists() and not (tmp_path / "runs" / "splits_final.json").exists()


def test_read_only_store_location_is_one_message(pristine, tmp_path):
    import os

    if os.geteuid() == 0:  # root writes through permission bits: use a path under a regular file instead
        (tmp_path / "not_a_folder").write_text("")
        store = tmp_path / "not_a_folder" / "store.zarr"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        store = tmp_path / "ro" / "store.zarr"
    data = tiny_config_dict(tmp_path)
    data["store"]["path"] = str(store)
    shutil.copytree(pristine, Path(data["dataset"]["raw_dir"]))
    result = runner.invoke(app, ["preprocess", "-c", str(write_config(tmp_path, data)), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and str(store) in result.output


def test_a_removed_case_gets_a_fix_not_just_a_complaint(pristine, tmp_path):
    data = tiny_config_dict(tmp_path)
    raw = Path(data["dataset"]["raw_dir"])
    shutil.copytree(pristine, raw)
    config = str(write_config(tmp_path, data))
    assert runner.invoke(app, ["preprocess", "-c", config, "-q"]).exit_code == 0
    for p in [*raw.glob("imagesTr/SYNPETCT_005_*"), raw / "labelsTr" / "SYNPETCT_005.nii.gz"]:
        p.unlink()
    result = runner.invoke(app, ["preprocess", "-c", config, "-q"])
    assert result.exit_code == 2, result.output
    assert "SYNPETCT_005" in result.output and "delete the file" in result.output
