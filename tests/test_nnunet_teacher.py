"""nnU-Net v2 teachers on a real results folder: nnU-Net plans, preprocesses and trains (a handful of iterations)
on the tiny synthetic dataset with its own command-line tools, and TeachCache caches it. The cached softmax is
compared with nnU-Net's own inference (its predictor, in the original image geometry) brought onto the store grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.errors import TeachCacheError
from core.store.teacher_store import TeacherStore
from core.teachers.base import ServedDataset, load_teacher
from core.teachers.nnunet import predict_nnunet
from teachcache.cli import app
from tests.conftest import derived_config

pytest.importorskip("nnunetv2")  # the nnunet extra: `make test` installs it with the dev extra
runner = CliRunner()

TRAIN = """
import random

import numpy as np
import torch
from nnunetv2.run.run_training import get_trainer_from_args

# seeded: an unseeded model differs on every run, and so does how far the two inference routes compared below
# drift apart (interpolating logits or probabilities: 0.013 to 0.027 mean measured on unseeded models)
random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
trainer = get_trainer_from_args("900", "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans", device=torch.device("cpu"))
trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 3, 1
trainer.run_training()
"""


@pytest.fixture(scope="module")
def nnunet_results(trained):
    """``nnUNet_results/Dataset900_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres`` made by nnU-Net itself."""
    root, data = trained
    base = root / "nnunet"
    env = {
        **os.environ,
        "nnUNet_raw": str(Path(data["dataset"]["raw_dir"]).parent),
        "nnUNet_preprocessed": str(base / "preprocessed"),
        "nnUNet_results": str(base / "results"),
        "nnUNet_compile": "f",
    }
    results = base / "results" / "Dataset900_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if not (results / "fold_0" / "checkpoint_final.pth").is_file():
        bindir = Path(sys.executable).parent
        for command in ([str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", "900", "-c", "3d_fullres", "-np", "1"],
                        [sys.executable, "-c", TRAIN]):  # fmt: skip
            # training: augmentation in the process (planning needs the default worker count)
            extra = {"nnUNet_n_proc_DA": "0"} if command[0] == sys.executable else {}
            done = subprocess.run(command, env={**env, **extra}, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return results, base / "preprocessed" / "Dataset900_Tiny" / "splits_final.json"


def _with_nnunet(root, data, name, nnunet: dict, channels: list[str] | None = None, **changes):
    _, path = derived_config(root, data, name, **changes)
    extra = f"  channels: {json.dumps(channels)}\n" if channels else ""
    text = path.read_text().replace(
        "teachers:\n", f"teachers:\n- name: nnunet\n{extra}  nnunet: {json.dumps(nnunet)}\n", 1
    )
    path.write_text(text)
    from core.config import load_config

    return load_config(path), path


def test_nnunet_teacher_matches_nnunets_own_inference_on_the_store_grid(trained, nnunet_results):
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    root, data = trained
    results, splits = nnunet_results
    cfg, path = _with_nnunet(
        root, data, "nnu", {"results": str(results), "folds": [0], "splits": str(splits)}
    )
    preprocess_dataset(cfg, progress=False)
    result = runner.invoke(app, ["cache", "-c", str(path), "-t", "nnunet", "-q"])
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(cfg.store.path)
    prov = store.teacher_metadata("nnunet/all_folds")
    assert prov["kind"] == "nnunet" and prov["taps"]["coarse"]["module"] == "encoder.stages.3"
    assert prov["train_cases"]  # nnU-Net's fold-0 training cases: stage 2's leakage guard reads them

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)  # fmt: skip
    predictor.initialize_from_trained_model_folder(
        str(results), use_folds=(0,), checkpoint_name="checkpoint_final.pth"
    )
    for case in store.case_ids()[:3]:
        files = [
            str(p) for p in sorted(Path(data["dataset"]["raw_dir"], "imagesTr").glob(f"{case}_*.nii.gz"))
        ]
        image, props = SimpleITKIO().read_images(files)
        _, probs = predictor.predict_single_npy_array(image, props, None, None, True)
        probs = np.transpose(probs, (0, 3, 2, 1))  # nnU-Net's (z, y, x) → the file's voxel order (x, y, z)
        import nibabel as nib

        affine = nib.load(files[0]).affine
        dst = MetaTensor(
            torch.zeros(1, *store.case_shape(case)), affine=torch.as_tensor(store.case_attrs(case)["affine"])
        )
        # the reference resampled in log-probability space, as the cache resamples logits (the two differ by a
        # per-voxel constant, which the softmax removes): comparing interpolated probabilities instead made the
        # bound depend on which model nnU-Net happened to train (0.013-0.026 over four training seeds: flaky)
        logprobs = np.log(np.clip(probs, 1e-8, None)).astype(np.float32)
        moved = ResampleToMatch(mode="bilinear", padding_mode="border")(
            MetaTensor(torch.from_numpy(logprobs), affine=torch.as_tensor(affine)), dst
        )
        encoding = store.entry_encoding("nnunet/all_folds", case)  # the same int8 margins as the cache
        logits = np.asarray(moved.numpy(), dtype=np.float32)
        expected = encoding.decode(encoding.encode(logits), 1.0)
        cached = store.read_softmax("nnunet/all_folds", case)
        # measured 0.0006-0.0009 mean and >= 99.8 % argmax agreement over four trained models; the same comparison
        # one voxel off gives 0.11 (83 %)
        assert np.abs(cached - expected).mean() < 5e-3, np.abs(cached - expected).mean()
        assert (cached.argmax(0) == expected.argmax(0)).mean() > 0.99

        # on nnU-Net's own grid (this dataset needs no resampling there): the same probabilities as its predictor
        loaded = load_teacher(cfg.teacher("nnunet"), ServedDataset(["CT", "PET"], 2))
        out, grid = predict_nnunet(cfg, cfg.teacher("nnunet"), loaded, [Path(f) for f in files],
                                   torch.device("cpu"), 2.0, False)  # fmt: skip
        ours = torch.softmax(torch.from_numpy(out["logits"]), 0).numpy()[:, : probs.shape[3], : probs.shape[2],
                                                                           : probs.shape[1]]  # fmt: skip
        assert np.abs(ours - np.transpose(probs, (0, 3, 2, 1))).mean() < 5e-3
        # nnU-Net's (z, y, x) grid: the file's axes in reverse order, same origin (no crop, no resampling here)
        np.testing.assert_allclose(grid[:3, [2, 1, 0]], affine[:3, :3], atol=1e-4)
        np.testing.assert_allclose(grid[:3, 3], affine[:3, 3], atol=1e-4)


def test_nnunet_fold_discipline(trained, nnunet_results):
    root, data = trained
    results, splits = nnunet_results
    # the project's 3 folds are not nnU-Net's 5: fold 0 of nnU-Net trained on project fold 0's validation cases
    cfg, _ = _with_nnunet(root, data, "nnu_leak", {"results": str(results), "splits": str(splits)})
    preprocess_dataset(cfg, progress=False)
    with pytest.raises(
        TeachCacheError, match=r"nnU-Net's fold 0 trained on .* of this project's fold-0 validation"
    ):
        cache_teachers(cfg, names=["nnunet"], folds=[0], progress=False)
    assert TeacherStore.open(cfg.store.path).teacher_keys() == []
    # with nnU-Net's own splits as the project's, fold 0 serves fold 0
    cfg, _ = _with_nnunet(root, data, "nnu_fold", {"results": str(results), "splits": str(splits)},
                          **{"splits.file": str(splits)})  # fmt: skip
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["nnunet"], folds=[0], progress=False)
    store = TeacherStore.open(cfg.store.path)
    assert store.teacher_keys() == ["nnunet/fold_0"]
    assert store.teacher_metadata("nnunet/fold_0")["fold"] == 0
    # without nnU-Net's splits the mapping cannot be checked: refused
    cfg, _ = _with_nnunet(
        root, data, "nnu_nosplit", {"results": str(results)}, **{"splits.file": str(splits)}
    )
    preprocess_dataset(cfg, progress=False)
    env = os.environ.pop("nnUNet_preprocessed", None)
    try:
        with pytest.raises(TeachCacheError, match=r"splits_final\.json was not found"):
            cache_teachers(cfg, names=["nnunet"], folds=[0], progress=False)
    finally:
        if env is not None:
            os.environ["nnUNet_preprocessed"] = env  # noqa: SIM112 (nnU-Net's name)


def test_nnunet_bad_folders_are_refused(trained, nnunet_results, tmp_path):
    root, data = trained
    results, _ = nnunet_results
    empty = tmp_path / "Dataset900_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    empty.mkdir(parents=True)
    cfg, _ = _with_nnunet(root, data, "nnu_bad", {"results": str(empty), "folds": [0]})
    preprocess_dataset(cfg, progress=False)
    with pytest.raises(TeachCacheError, match=r"has no plans\.json"):
        cache_teachers(cfg, names=["nnunet"], progress=False)
    cfg, _ = _with_nnunet(root, data, "nnu_chan", {"results": str(results), "folds": [0]},
                          channels=["PET", "CT"])  # fmt: skip
    preprocess_dataset(cfg, progress=False)
    with pytest.raises(TeachCacheError, match="trained on channels \\['CT', 'PET'\\]"):
        cache_teachers(cfg, names=["nnunet"], progress=False)
    bad = tmp_path / "bad_ckpt"
    (bad / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (bad / name).write_text((results / name).read_text())
    torch.save({"network_weights": {}, "sneaky": Path("x")}, bad / "fold_0" / "checkpoint_final.pth")
    cfg, _ = _with_nnunet(root, data, "nnu_pickle", {"results": str(bad), "folds": [0],
                                                     "configuration": "3d_fullres"})  # fmt: skip
    preprocess_dataset(cfg, progress=False)
    with pytest.raises(TeachCacheError, match=r"not loaded \(torch\.load weights_only=True\)"):
        cache_teachers(cfg, names=["nnunet"], progress=False)
    assert TeacherStore.open(cfg.store.path).teacher_keys() == []
