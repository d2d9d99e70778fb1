"""Shared fixtures: a tiny experiment (six 32³ PET/CT cases, three tiny teachers) written under tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _hash_cache_in_a_temporary_folder(tmp_path_factory):
    """Tests remember raw-file hashes under a temporary folder, not in the user's ~/.cache."""
    import os

    from core.user_cache import CACHE_DIR_ENV

    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("teachcache-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


TINY_TEACHER_TRAINING = {
    "epochs": 1,
    "iterations_per_epoch": 2,
    "batch_size": 2,
    "patch_size": [32, 32, 32],
    "lr": 0.01,
    "val_every": 1,
}


def tiny_config_dict(root: Path) -> dict[str, Any]:
    return {
        "experiment": "tiny",
        "dataset": {
            "raw_dir": str(root / "raw" / "Dataset900_Tiny"),
            "synthetic": {"kind": "petct", "num_cases": 6, "shape": [40, 40, 16], "spacing": [1.6, 1.6, 4.0]},
        },
        "preprocessing": {"foreground_threshold": -500.0, "min_size": [32, 32, 32], "size_divisor": 32},
        "splits": {"num_folds": 3},
        "store": {"path": str(root / "store.zarr"), "chunk_size": [32, 32, 32]},
        "inference": {"roi_size": [32, 32, 32], "overlap": 0.5, "sw_batch_size": 2},
        "teachers": [
            {
                "name": "unetr",
                "arch": "unetr",
                "args": {"img_size": 32, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
                "checkpoint": str(root / "teachers" / "unetr.pth"),
                "training": TINY_TEACHER_TRAINING,
            },
            {
                "name": "swin",
                "arch": "swin_unetr",
                "args": {
                    "feature_size": 12,
                    "depths": [1, 1, 1, 1],
                    "num_heads": [3, 6, 12, 24],
                    "norm_name": "batch",
                },
                "checkpoint": str(root / "teachers" / "swin.pth"),
                "training": TINY_TEACHER_TRAINING,
                "inference": {"roi_size": [32, 32, 32], "overlap": 0.0, "sw_batch_size": 1},
            },
            {
                "name": "dynunet",
                "arch": "dynunet",
                "args": {"filters": [4, 8, 16, 32, 48]},
                "checkpoint": str(root / "teachers" / "dynunet.pth"),
                "training": TINY_TEACHER_TRAINING,
            },
        ],
        "student": {"arch": "basic_unet", "args": {"features": [4, 4, 8, 16, 32, 4]}},
        "training": {**TINY_TEACHER_TRAINING, "epochs": 2},
        "distillation": {"kind": "teachformer", "temperature": 2.0},
        "output": {"runs_dir": str(root / "runs")},
    }


def write_config(root: Path, data: dict[str, Any]) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, tiny_config_dict(tmp_path))


@pytest.fixture(scope="session")
def preprocessed(tmp_path_factory: pytest.TempPathFactory):
    """A tiny experiment with the synthetic dataset written and preprocessed into the store (shared, read-only)."""
    from cache_teachers import preprocess_dataset
    from core.config import load_config
    from core.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("preprocessed")
    cfg = load_config(write_config(root, tiny_config_dict(root)))
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    preprocess_dataset(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny experiment with its demo teachers trained on fold 0 (checkpoints on disk), not yet cached.

    Returns ``(root, config_dict)``; tests derive configs with their own store paths from it.
    """
    from cache_teachers import preprocess_dataset, train_teachers
    from core.config import load_config
    from core.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("trained")
    data = tiny_config_dict(root)
    cfg = load_config(write_config(root, data))
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    preprocess_dataset(cfg, progress=False)
    train_teachers(cfg, 0, progress=False)
    return root, data


def derived_config(root: Path, data: dict[str, Any], name: str, **changes: Any):
    """A copy of ``data`` with its own store (``<root>/<name>.zarr``) and the given dotted-key changes."""
    import copy

    from core.config import load_config

    data = copy.deepcopy(data)
    data["store"]["path"] = str(root / f"{name}.zarr")
    data["output"]["runs_dir"] = str(root / f"runs_{name}")
    data["splits"]["file"] = str(root / "runs" / "splits_final.json")
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path), path


def cache_random_teachers(root: Path, data: dict[str, Any], seed: int) -> Path:
    """Write ``data`` as ``root/config.yaml``, its synthetic dataset and store, one seeded random checkpoint per
    teacher (seeds ``seed``, ``seed + 1``, …; recorded as trained on no case), all cached by the real cache stage.
    Returns the config's path."""
    import torch

    from cache_teachers import cache_teachers, preprocess_dataset
    from core.config import load_config
    from core.data.synthetic import write_synthetic_dataset
    from core.models import create_model
    from core.models.checkpoint import save_checkpoint

    path = write_config(root, data)
    cfg = load_config(path)
    write_synthetic_dataset(cfg.dataset.synthetic, cfg.dataset.raw_dir, progress=False)
    preprocess_dataset(cfg, progress=False)
    for i, teacher in enumerate(cfg.teachers):
        torch.manual_seed(seed + i)
        model = create_model(teacher.arch, 2, 2, teacher.args)
        save_checkpoint(teacher.checkpoint, model, teacher.arch, 2, 2, teacher.args, {"train_cases": []})
    cache_teachers(cfg, progress=False)
    return path
