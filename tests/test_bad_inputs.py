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
    return "non-integer label values (0.4)"


def _negative_label(raw: Path) -> str:
    def fn(d, a):
        d = d.astype(np.int16)
        d[0, 0, 0] = -1
        return d, a

    _rewrite(raw / "labelsTr" / "SYNPETCT_001.nii.gz", fn)
    return "label value(s) -1"


def _four_d_image(raw: Path) -> str:
    _rewrite(raw / "imagesTr" / "SYNPETCT_002_0001.nii.gz", lambda d, a: (np.stack([d, d], axis=-1), a))
    return "every file must be one 3-D volume"


def _other_affine(raw: Path) -> str:
    def fn(d, a):
        a[:3, 3] += 7.5  # same shape, shifted origin: a PET not registered to its CT
        return d, a

    _rewrite(raw / "imagesTr" / "SYNPETCT_003_0001.nii.gz", fn)
    return "different affines"


def _truncated(raw: Path) -> str:
    path = raw / "imagesTr" / "SYNPETCT_004_0000.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return "SYNPETCT_004_0000.nii.gz"


def _not_gzip(raw: Path) -> str:
    path = raw / "imagesTr" / "SYNPETCT_005_0000.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti file at all"))
    return "SYNPETCT_005_0000.nii.gz"


BROKEN = {
    "fractional label": _fractional_label,
    "negative label": _negative_label,
    "4-D image": _four_d_image,
    "modalities on different grids": _other_affine,
    "truncated .nii.gz": _truncated,
    "not a NIfTI": _not_gzip,
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_bad_dataset_gets_one_clear_message(what, pristine, tmp_path):
    data = tiny_config_dict(tmp_path)
    raw = Path(data["dataset"]["raw_dir"])
    shutil.copytree(pristine, raw)
    fragment = BROKEN[what](raw)
    result = runner.invoke(app, ["preprocess", "-c", str(write_config(tmp_path, data)), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in result.output, result.output
    assert "case 'SYNPETCT_00" in result.output, "the message names the case"
