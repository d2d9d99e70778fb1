"""Pretrained teachers end to end on the demo data (docs/teachers.md; needs nnunetv2: `make setup` installs it): an nnU-Net teacher (trained by nnU-Net itself, briefly), a MONAI bundle
(the demo's fold-0 DynUNet packaged as a bundle with its preprocessing) and a registered DynUNet with its own crop."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

MAIN = Path.cwd()  # run from the repository root after `make demo` (the demo data and fold-0 teachers)
W = (MAIN / (sys.argv[1] if len(sys.argv) > 1 else "runs/pretrained-teachers")).resolve()
W.mkdir(parents=True, exist_ok=True)
RAW = MAIN / "data/raw/Dataset001_SynthPETCT"
env = {
    **os.environ,
    "nnUNet_raw": str(W / "nnraw"),
    "nnUNet_preprocessed": str(W / "nnpre"),
    "nnUNet_results": str(W / "nnres"),
    "nnUNet_compile": "f",
}
(W / "nnraw").mkdir(exist_ok=True)
link = W / "nnraw" / "Dataset001_SynthPETCT"
if not link.exists():
    link.symlink_to(RAW)
results = W / "nnres/Dataset001_SynthPETCT/nnUNetTrainer__nnUNetPlans__3d_fullres"
if not (results / "fold_0/checkpoint_final.pth").is_file():
    subprocess.run(
        [
            sys.executable.replace("python", "nnUNetv2_plan_and_preprocess"),
            "-d",
            "1",
            "-c",
            "3d_fullres",
            "-np",
            "2",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    shutil.copy(
        MAIN / "runs/demo/splits_final.json", W / "nnpre/Dataset001_SynthPETCT/splits_final.json"
    )  # the project's folds
    train = (
        "import torch\nfrom nnunetv2.run.run_training import get_trainer_from_args\n"
        "t = get_trainer_from_args('1', '3d_fullres', 0, 'nnUNetTrainer', 'nnUNetPlans', device=torch.device('cpu'))\n"
        "t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch = 4, 25, 2\nt.run_training()\n"
    )
    subprocess.run([sys.executable, "-c", train], env={**env, "nnUNet_n_proc_DA": "0"}, check=True)
# the bundle
b = W / "bundle_dynunet"
if not b.exists():
    (b / "configs").mkdir(parents=True)
    (b / "models").mkdir()
    cfg = {
        "network_def": {
            "_target_": "DynUNet",
            "spatial_dims": 3,
            "in_channels": 2,
            "out_channels": 2,
            "kernel_size": [3] * 5,
            "strides": [1, 2, 2, 2, 2],
            "upsample_kernel_size": [2] * 4,
            "filters": [8, 16, 32, 64, 96],
            "norm_name": "instance",
            "res_block": False,
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
                {
                    "_target_": "core.data.preprocessing.NormalizeModalitiesd",
                    "keys": "image",
                    "channel_names": ["CT", "PET"],
                    "ct_window": [-200.0, 300.0],
                },
                {
                    "_target_": "SpatialPadd",
                    "keys": "image",
                    "spatial_size": [64, 64, 64],
                    "mode": "replicate",
                },
                {"_target_": "DivisiblePadd", "keys": "image", "k": 32, "mode": "replicate"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [32, 32, 32],
            "sw_batch_size": 4,
            "overlap": 0.5,
            "mode": "gaussian",
        },
    }
    (b / "configs/inference.json").write_text(json.dumps(cfg, indent=2))
    (b / "configs/metadata.json").write_text(
        json.dumps(
            {
                "version": "0.1.0",
                "network_data_format": {
                    "inputs": {"image": {"num_channels": 2, "channel_def": {"0": "CT", "1": "PET"}}},
                    "outputs": {"pred": {"num_channels": 2}},
                },
            },
            indent=2,
        )
    )

    from core.models.checkpoint import load_checkpoint

    torch.save(
        load_checkpoint(MAIN / "runs/demo/teachers/dynunet/fold_0/teacher.pth").state_dict,
        b / "models/model.pt",
    )
demo = yaml.safe_load((MAIN / "configs/demo.yaml").read_text())
demo["experiment"] = "pretrained-teachers"
demo["dataset"] = {"raw_dir": str(RAW)}
demo["splits"]["file"] = str(MAIN / "runs/demo/splits_final.json")
demo["store"]["path"] = str(W / "store.zarr")
demo["output"]["runs_dir"] = str(W / "runs")
dyn = next(t for t in demo["teachers"] if t["name"] == "dynunet")
dyn["checkpoint"] = str(MAIN / dyn["checkpoint"])
own = {**dyn, "name": "dynunet_own", "preprocessing": {**demo["preprocessing"], "crop_margin": 12}}
own.pop("training")
demo["teachers"] = [
    {
        "name": "nnunet",
        "nnunet": {
            "results": str(results),
            "splits": str(W / "nnpre/Dataset001_SynthPETCT/splits_final.json"),
        },
    },
    {"name": "zoo", "bundle": str(b)},
    own,
    {k: v for k, v in dyn.items() if k != "training"},
]
(W / "config.yaml").write_text(yaml.safe_dump(demo, sort_keys=False))
print(
    f"ready: teachcache preprocess -c {W}/config.yaml && teachcache cache -c {W}/config.yaml --fold 0 && "
    f"teachcache distil -c {W}/config.yaml --fold 0"
)
