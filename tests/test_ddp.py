"""Data-parallel training: `torchrun` with 2 CPU processes (gloo) trains one student whose replicas stay identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import derived_config


def test_two_gloo_processes_train_identical_replicas_and_one_run_folder(trained):
    from cache_teachers import cache_teachers, preprocess_dataset

    root, data = trained
    cfg, path = derived_config(
        root,
        data,
        "ddp",
        **{"training.epochs": 2, "training.iterations_per_epoch": 2, "distillation.teachers": ["dynunet"]},
    )
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "teachcache", "distil", "-c", str(path), "--fold", "0", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("student kd-teachformer: val Dice") == 1, "process 0 alone prints"
    run = cfg.output.runs_dir / "students" / "kd-teachformer" / "fold_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_identical"] is True
    assert summary["epochs_run"] == 2 and (run / "checkpoint_final.pth").is_file()
    assert "torchrun" in summary["kd_health"]["not_measured"], "a run without the health check says so"
    assert not list(run.parent.glob(".fold_0.*")), "one run folder, published once"
