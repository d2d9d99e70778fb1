"""A user's own nnU-Net raw dataset through the README's `make` commands: no `synthetic` block, four classes, two
MRI modalities, odd sizes and a rotated, anisotropic affine — none of the demo's conveniences.

The cases are resampled to 64 × 64 × 32 voxels, so every teacher's maps are stitched from several windows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from core.models import get_spec
from core.store.teacher_store import TeacherStore
from tests.conftest import TINY_TEACHER_TRAINING

REPO = Path(__file__).resolve().parents[1]
# The environment running this test, absolute; its stamp is assumed up to date (`make -o`), so a test never
# re-creates or re-installs a virtual environment, even when pyproject.toml is newer than the stamp.
VENV = Path(sys.executable).parent.parent
CLASSES = {"background": 0, "gland": 1, "lesion": 2, "vessel": 3}
SHAPE = (37, 45, 19)
SPACING = (1.2, 1.1, 3.3)


def _affine(seed: int) -> np.ndarray:
    """Voxel-to-world with a 10° in-plane rotation, anisotropic spacing and an arbitrary origin (LPS-like flips)."""
    angle = math.radians(10 + seed)
    rot = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(SPACING) @ np.diag([-1, -1, 1])
    affine[:3, 3] = (20.0 + seed, -35.0, -60.0 + 2 * seed)
    return affine


def write_raw_dataset(root: Path, cases: int = 6) -> Path:
    """An nnU-Net v2 raw dataset: imagesTr/CASE_000{0,1}.nii.gz (T2, ADC), labelsTr/CASE.nii.gz, dataset.json."""
    rng = np.random.default_rng(7)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(np.float32)
    for i in range(cases):
        centre = np.array(SHAPE) / 2 + rng.uniform(-3, 3, 3)
        d = (grid - centre) / np.array([12, 14, 5])
        gland = (d**2).sum(-1) < 1
        lesion = (((grid - centre - [3, 2, 0]) / [4, 4, 2]) ** 2).sum(-1) < 1
        vessel = (np.abs(grid[..., 0] - 6 - i % 3) < 2) & (np.abs(grid[..., 1] - 8) < 2)
        label = np.zeros(SHAPE, np.uint8)
        label[gland] = 1
        label[lesion & gland] = 2
        label[vessel] = 3
        t2 = 100 + 200 * gland - 150 * (label == 2) + 300 * vessel + rng.normal(0, 10, SHAPE)
        adc = 1200 + 200 * gland - 700 * (label == 2) - 400 * vessel + rng.normal(0, 30, SHAPE)
        case, affine = f"MYMRI_{i:03d}", _affine(i)
        for c, img in enumerate((t2, adc)):
            nib.save(
                nib.Nifti1Image(img.astype(np.float32), affine),
                str(root / "imagesTr" / f"{case}_{c:04d}.nii.gz"),
            )
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"{case}.nii.gz"))
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T2", "1": "ADC"},
                "labels": CLASSES,
                "numTraining": cases,
                "file_ending": ".nii.gz",
                "name": "Dataset901_MyMRI",
            }
        )
    )
    return root


def user_config(root: Path, raw: Path) -> Path:
    tiny = {**TINY_TEACHER_TRAINING, "foreground_oversampling": 0.9}
    config = {
        "experiment": "my_mri",
        "dataset": {"raw_dir": str(raw)},  # no `synthetic` block: the user's own data
        # 37 × 45 × 19 voxels of 1.2 × 1.1 × 3.3 mm → about 44 × 50 × 21 at this spacing → padded to 64 × 64 × 32
        "preprocessing": {"target_spacing": [1.0, 1.0, 3.0], "min_size": [32, 32, 32], "size_divisor": 32},
        "splits": {"num_folds": 3},
        "store": {"path": str(root / "store.zarr"), "chunk_size": [32, 32, 32]},
        "inference": {"roi_size": [32, 32, 32], "overlap": 0.5, "sw_batch_size": 2},
        "teachers": [
            {
                "name": "unetr",
                "arch": "unetr",
                "args": {"img_size": 32, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
                "checkpoint": str(root / "runs" / "teachers" / "unetr" / "fold_{fold}" / "teacher.pth"),
                "training": tiny,
            },
            {
                "name": "dynunet",
                "arch": "dynunet",
                "args": {"filters": [4, 8, 16, 32, 48]},
                "checkpoint": str(root / "runs" / "teachers" / "dynunet" / "fold_{fold}" / "teacher.pth"),
                "training": tiny,
            },
        ],
        "student": {"arch": "basic_unet", "args": {"features": [4, 4, 8, 16, 32, 4]}},
        "training": {**tiny, "epochs": 2},
        "distillation": {"kind": "teachformer", "temperature": 2.0},
        "output": {"runs_dir": str(root / "runs")},
    }
    path = root / "my.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``make -C <repo> ARGS`` with this test's environment as ``VENV``, never re-installed; tables not cut short."""
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), f"VENV={VENV}", "-o", f"{VENV}/.installed", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def make(*args: str) -> str:
    result = run_make(*args)
    assert result.returncode == 0, f"make {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    raw = write_raw_dataset(root / "raw" / "Dataset901_MyMRI")
    config = f"CONFIG={user_config(root, raw)}"
    outputs = {
        "teachers": make("teachers", "FOLD=0", config),
        "cache": make("cache", config),
        "distil": make("distil", "FOLD=0", config),
        "distil-none": make("distil", "FOLD=0", "KD=none", config),
        "report": make("report", "FOLD=0", config),
        "report-all": make("report", config),
    }
    return root, outputs


def test_every_make_target_runs_on_a_raw_dataset_without_a_synthetic_block(user_run):
    root, outputs = user_run
    assert "using the dataset at" in outputs["teachers"]
    store = TeacherStore.open(root / "store.zarr")
    assert len(store.case_ids()) == 6
    for case in store.case_ids():
        shape = store.case_shape(case)
        assert shape == (64, 64, 32), "odd sizes are resampled, then padded to the size divisor"
        assert store.teacher_keys() == ["dynunet/fold_0", "unetr/fold_0"], "per-fold teachers, fold 0 cached"
        for teacher in ("unetr/fold_0", "dynunet/fold_0"):
            probs = store.read_softmax(teacher, case, temperature=2.0)
            assert probs.shape == (4, *shape) and np.allclose(probs.sum(0), 1.0, atol=1e-3)
            for kind, tap in get_spec(
                teacher.split("/")[0]
            ).taps.items():  # stitched from 3 × 3 windows, none cut short
                amap, stride = store.read_attention(teacher, case, kind)
                assert stride == (tap.stride,) * 3
                assert amap.shape == tuple(s // tap.stride for s in shape)
                assert np.isfinite(amap).all() and (amap > 0).all()
    assert store.metadata["dataset"]["class_names"] == list(CLASSES)


def test_the_student_is_scored_per_class_and_reported(user_run):
    root, outputs = user_run
    for kind in ("teachformer", "none"):
        run = root / "runs" / "students" / f"kd-{kind}" / "fold_0"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["class_names"] == list(CLASSES)
        for key in ("final_dice_per_class", "best_dice_per_class", "final_hd95_per_class"):
            assert len(summary[key]) == 3, f"{key}: gland, lesion and vessel each scored"
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"val_dice_gland", "val_dice_lesion", "val_dice_vessel"} <= set(header)
    for report in (outputs["report"], outputs["report-all"]):
        for run in ("teacher unetr", "teacher dynunet", "student kd-none", "student kd-teachformer"):
            assert run in report


def test_a_config_without_synthetic_or_dataset_says_which_folder(tmp_path):
    config = user_config(tmp_path, tmp_path / "nowhere")
    result = run_make("cache", f"CONFIG={config}", timeout=300)
    assert result.returncode != 0
    assert "holds no dataset.json" in result.stderr and str(tmp_path / "nowhere") in result.stderr
    assert "Traceback" not in result.stderr


def test_make_flag_variables_read_0_as_off():
    """`make cv ONLINE=0` trains no online twins and `make report SCREEN=0` reports the experiment, not the
    screening: a flag variable is on for 1 (or any value but 0, no, false), off for 0 or empty (dry runs)."""

    def command(*args: str) -> str:
        result = run_make("-n", *args, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    assert "--online" in command("cv", "ONLINE=1") and "--online" not in command("cv", "ONLINE=0")
    assert "--online" not in command("cv")
    assert "--screen" in command("report", "SCREEN=1") and "--screen" not in command("report", "SCREEN=0")
