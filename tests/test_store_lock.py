"""Two writers on one store: one runs, the other is refused at once with a message; the store stays correct."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.store.locking import store_write_lock
from teachcache.cli import app
from tests.conftest import derived_config
from tests.test_store_ops import _arrays

runner = CliRunner()
TEACHCACHE = [sys.executable, "-m", "teachcache"]


def _preprocessed(trained, name: str):
    root, data = trained
    cfg, path = derived_config(root, data, name)
    preprocess_dataset(cfg, progress=False)
    return cfg, path


def test_a_second_writer_is_refused_naming_the_first(trained):
    cfg, path = _preprocessed(trained, "lock_held")
    with store_write_lock(cfg.store.path, "cache"):
        result = runner.invoke(app, ["cache", "-c", str(path), "-t", "dynunet", "-q"])
        assert result.exit_code == 2, result.output
        assert (
            "is being written by `teachcache cache`, pid" in result.output
            and "Traceback" not in result.output
        )
        result = runner.invoke(app, ["preprocess", "-c", str(path), "-q"])
        assert result.exit_code == 2 and "is being written by" in result.output
    assert runner.invoke(app, ["cache", "-c", str(path), "-t", "dynunet", "-q"]).exit_code == 0


def test_a_killed_holder_does_not_block_the_next_run(trained):
    cfg, path = _preprocessed(trained, "lock_killed")
    code = (
        "import sys, time\nfrom core.store.locking import store_write_lock\n"
        f"with store_write_lock({str(cfg.store.path)!r}, 'cache'):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert runner.invoke(app, ["cache", "-c", str(path), "-t", "dynunet", "-q"]).exit_code == 2
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert runner.invoke(app, ["cache", "-c", str(path), "-t", "dynunet", "-q"]).exit_code == 0


def test_two_cache_processes_racing_leave_a_correct_store(trained):
    reference, _ = _preprocessed(trained, "race_reference")
    cache_teachers(reference, names=["dynunet"], progress=False)
    expected = _arrays(reference.store.path)
    refused = 0
    for attempt in range(3):
        cfg, path = _preprocessed(trained, f"race_{attempt}")
        procs = [
            subprocess.Popen(
                [*TEACHCACHE, "cache", "-c", str(path), "-t", "dynunet", "-q"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=300) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes in ([0, 0], [0, 2]), outputs
        for (_, err), p in zip(outputs, procs, strict=True):
            assert "Traceback" not in err
            if p.returncode == 2:
                refused += 1
                assert "is being written by" in err
        assert runner.invoke(app, ["verify", cfg.store.path]).exit_code == 0
        got = _arrays(cfg.store.path)
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[k], expected[k]) for k in expected), (
            "bit-identical to a store cached alone"
        )
        time.sleep(0.1)
    assert refused >= 1, "the two processes overlapped at least once (else this test proves nothing)"
