"""The store under real use: verification, workers, kill-and-resume, URLs, provenance checks, failures."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from cache_teachers.cache import KILL_AFTER_ENTRIES_ENV, KILL_AT_ENV
from core.errors import StoreError
from core.models import create_model
from core.models.checkpoint import load_checkpoint, save_checkpoint
from core.store.teacher_store import TeacherStore
from teachcache.cli import app
from tests.conftest import derived_config
from train_student import distil

runner = CliRunner()


def _arrays(path: str) -> dict[str, np.ndarray]:
    root = zarr.open_group(path, mode="r")
    return {f"teachers/{name}": arr[...] for name, arr in root["teachers"].arrays()} | {
        f"teachers/{p}": a[...]
        for p, a in root["teachers"].members(max_depth=None)
        if isinstance(a, zarr.Array)
    }


def _cached(trained, name: str, **changes):
    root, data = trained
    cfg, path = derived_config(root, data, name, **changes)
    preprocess_dataset(cfg, progress=False)
    return cfg, path


def test_verify_reports_clean_store_and_each_problem(trained):
    cfg, _ = _cached(trained, "verify")
    cache_teachers(cfg, names=["dynunet"], progress=False)
    result = runner.invoke(app, ["verify", cfg.store.path, "--json"])
    assert result.exit_code == 0, result.output
    assert '"ok": true' in result.output

    store = TeacherStore.open(cfg.store.path)
    first, second = store.case_ids()[:2]
    root = zarr.open_group(cfg.store.path, mode="a")
    root[f"teachers/dynunet/all_folds/{first}"].attrs["complete"] = False
    coarse = root[f"teachers/dynunet/all_folds/{second}/coarse"]
    broken = coarse[...]
    broken.flat[0] = np.nan
    coarse[...] = broken
    result = runner.invoke(app, ["verify", cfg.store.path])
    assert result.exit_code == 1
    assert f"teacher dynunet/all_folds, case {first}: missing or incomplete" in result.output
    assert f"teacher dynunet/all_folds, case {second}: coarse map contains NaN" in result.output


def test_two_workers_write_the_same_bits_as_one(trained):
    one, _ = _cached(trained, "one_worker")
    two, _ = _cached(trained, "two_workers")
    cache_teachers(one, names=["dynunet", "unetr"], progress=False, workers=1)
    cache_teachers(two, names=["dynunet", "unetr"], progress=False, workers=2)
    a, b = _arrays(one.store.path), _arrays(two.store.path)
    assert len(a) == 2 * 6 * 3 and a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert TeacherStore.open(two.store.path).teacher_keys() == ["dynunet/all_folds", "unetr/all_folds"]


def _cache_cli(config, *extra, kill_after: int | None = None, kill_at: str | None = None):
    """``teachcache cache`` as a real process; with ``kill_after``, it SIGKILLs itself inside the next entry (after
    its softmax array, or at ``kill_at``: ``"chunk_digests"``, once every array is written)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop(KILL_AFTER_ENTRIES_ENV, None)
    env.pop(KILL_AT_ENV, None)
    if kill_after is not None:
        env[KILL_AFTER_ENTRIES_ENV] = str(kill_after)
    if kill_at is not None:
        env[KILL_AT_ENV] = kill_at
    cmd = [
        sys.executable,
        "-m",
        "teachcache",
        "cache",
        "-c",
        str(config),
        "-q",
        "-t",
        "dynunet",
        "-t",
        "unetr",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _entry_states(path: str) -> tuple[int, list[str]]:
    """(number of complete entries, entries whose group exists with ``complete`` false) of the store at ``path``."""
    root = zarr.open_group(path, mode="r", use_consolidated=False)  # a killed run consolidates nothing
    complete, partial = 0, []
    for teacher, copies in root["teachers"].groups():
        for slot, group in copies.groups():
            for case, entry in group.groups():
                if entry.attrs.get("complete") is True:
                    complete += 1
                else:
                    partial.append(f"{teacher}/{slot}/{case}")
    return complete, partial


def test_sigkill_and_resume_is_bit_identical(trained):
    sharded = {
        "store.chunk_size": [16, 16, 16]
    }  # every spatial array several chunks in one shard (format 2.3)
    reference, ref_path = _cached(trained, "reference", **sharded)
    assert _cache_cli(ref_path).wait() == 0
    killed, path = _cached(trained, "killed", **sharded)
    # 2 teachers x 6 cases. The hook counts the entries each process writes: the first run dies inside entry 3;
    # the second resumes (rewriting that partial entry) and dies inside entry 9, unetr's third
    for kill_after, complete in ((2, 2), (6, 8)):
        proc = _cache_cli(path, kill_after=kill_after)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
        done, partial = _entry_states(killed.store.path)
        assert done == complete and len(partial) == 1, (done, partial)
        entry = zarr.open_group(killed.store.path, mode="r", use_consolidated=False)[f"teachers/{partial[0]}"]
        arrays = sorted(entry.array_keys())
        assert arrays == ["softmax"], "the kill landed midway through an entry's arrays"
    proc = _cache_cli(path)
    assert proc.wait() == 0, proc.stderr.read().decode()
    a, b = _arrays(reference.store.path), _arrays(killed.store.path)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    store = TeacherStore.open(killed.store.path)
    assert all(
        store.has_entry(t, c) for t in ("dynunet/all_folds", "unetr/all_folds") for c in store.case_ids()
    )
    softmax = zarr.open_group(killed.store.path, mode="r")[
        f"teachers/unetr/all_folds/{store.case_ids()[0]}/softmax"
    ]
    assert softmax.shards is not None and softmax.nchunks > 1, "the kills landed in sharded writes"


def test_sigkill_while_recording_digests_resumes_bit_identical_and_verifies_clean(trained):
    sharded = {"store.chunk_size": [16, 16, 16]}
    reference, ref_path = _cached(trained, "digest_reference", **sharded)
    assert _cache_cli(ref_path).wait() == 0
    killed, path = _cached(trained, "digest_killed", **sharded)
    proc = _cache_cli(path, kill_after=3, kill_at="chunk_digests")
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    done, partial = _entry_states(killed.store.path)
    assert done == 3 and len(partial) == 1, (done, partial)
    entry = zarr.open_group(killed.store.path, mode="r", use_consolidated=False)[f"teachers/{partial[0]}"]
    assert sorted(entry.array_keys()) == ["coarse", "fine", "softmax"], "every array written"
    assert "chunk_digests" not in entry.attrs, "the kill landed before the digests were recorded"
    proc = _cache_cli(path)
    assert proc.wait() == 0, proc.stderr.read().decode()
    a, b = _arrays(reference.store.path), _arrays(killed.store.path)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    result = CliRunner().invoke(app, ["verify", killed.store.path])
    assert result.exit_code == 0, result.output


def test_file_url_store(trained):
    root, _ = trained
    cfg, _ = _cached(trained, "url", **{"store.path": f"file://{root}/url_store.zarr"})
    cache_teachers(cfg, names=["dynunet"], progress=False)
    store = TeacherStore.open(cfg.store.path)
    case = store.case_ids()[0]
    assert np.allclose(store.read_softmax("dynunet/all_folds", case).sum(0), 1.0, atol=1e-3)
    assert (root / "url_store.zarr" / "zarr.json").is_file()


def test_leakage_is_refused_unless_allowed_and_recorded(trained):
    cfg, _ = _cached(trained, "leak", **{"training.epochs": 1, "training.iterations_per_epoch": 1})
    cache_teachers(cfg, names=["dynunet"], progress=False)
    cfg = cfg.model_copy(
        update={"distillation": cfg.distillation.model_copy(update={"teachers": ["dynunet"]})}
    )
    with pytest.raises(
        StoreError, match=r"teacher 'dynunet/all_folds' was trained on \d+ validation case\(s\) of this fold"
    ):
        distil(cfg, fold=1, progress=False)  # the demo teachers were trained on fold 0
    result = distil(cfg, fold=1, progress=False, allow_leakage=True)
    meta = load_checkpoint(result.checkpoint).meta
    assert meta["allow_leakage"] is True and meta["leaked_val_cases"]["dynunet/all_folds"]
    distil(cfg, fold=0, progress=False)  # fold 0: no leakage


def test_changed_checkpoint_makes_the_cache_stale(trained, tmp_path):
    _, data = trained
    ckpt_path = tmp_path / "dyn.pth"
    original = load_checkpoint(data["teachers"][2]["checkpoint"])
    model = create_model("dynunet", 2, 2, original.args)
    model.load_state_dict(original.state_dict)
    save_checkpoint(ckpt_path, model, "dynunet", 2, 2, original.args, original.meta)
    cfg, _ = _cached(trained, "stale", **{"teachers.2.checkpoint": str(ckpt_path)})
    cache_teachers(cfg, names=["dynunet"], progress=False)
    cfg = cfg.model_copy(
        update={"distillation": cfg.distillation.model_copy(update={"teachers": ["dynunet"]})}
    )
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(ckpt_path, model, "dynunet", 2, 2, original.args, original.meta)
    with pytest.raises(StoreError, match="changed since it was cached"):
        distil(cfg, fold=0, progress=False)


@pytest.mark.parametrize(
    ("code", "text"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")]
)
def test_full_disk_keeps_complete_entries_and_says_how_to_resume(trained, monkeypatch, code, text):
    cfg, _ = _cached(trained, f"full_{code}")
    real_write = TeacherStore.write_entry
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(code, text)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(TeacherStore, "write_entry", failing)
    with pytest.raises(StoreError, match=rf"{text}.*re-run `make cache` to resume"):
        cache_teachers(cfg, names=["dynunet"], progress=False)
    store = TeacherStore.open(cfg.store.path)
    assert sum(store.has_entry("dynunet/all_folds", c) for c in store.case_ids()) == 2
    monkeypatch.setattr(TeacherStore, "write_entry", real_write)
    summary = cache_teachers(cfg, names=["dynunet"], progress=False)
    assert summary.written["dynunet/all_folds"] == 4 and summary.skipped["dynunet/all_folds"] == 2


def test_truncated_store_is_refused(trained):
    cfg, _ = _cached(trained, "truncated")
    os.remove(os.path.join(cfg.store.path, "zarr.json"))
    with pytest.raises(StoreError):
        TeacherStore.open(cfg.store.path)
    result = runner.invoke(app, ["inspect", cfg.store.path])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_feature_sketches_are_cached_and_keep_relations(trained):
    cfg, _ = _cached(trained, "sketch", **{"store.feature_sketch_channels": 4})
    cache_teachers(cfg, names=["dynunet"], progress=False)
    store = TeacherStore.open(cfg.store.path)
    case = store.case_ids()[0]
    shape = store.case_shape(case)
    # the fine tap (stride 2) is pooled to store.feature_sketch_stride (default 4); the coarse one (16) is kept
    for kind, stride in (("coarse", 16), ("fine", 4)):
        sketch, recorded = store.read_sketch("dynunet/all_folds", case, kind)
        assert sketch.shape == (4, *(s // stride for s in shape)) and recorded == (stride,) * 3
        assert store.sketch_grid("dynunet/all_folds", case, kind) == (sketch.shape[1:], (stride,) * 3)
        assert store._array(f"teachers/dynunet/all_folds/{case}/{kind}_sketch").dtype == np.int8
        meta = store.entry_attrs("dynunet/all_folds", case)["sketch"][kind]
        assert 0.0 < meta["energy"] <= 1.0 and meta["voxel_cosine"] >= 0.0
        # a box of the sketch's grid reads exactly that part of the whole
        part, _ = store.read_sketch("dynunet/all_folds", case, kind, (slice(1, 3), slice(0, 2), slice(1, 2)))
        assert np.array_equal(part, sketch[:, 1:3, 0:2, 1:2])
    assert runner.invoke(app, ["verify", cfg.store.path]).exit_code == 0
    summary = cache_teachers(
        cfg.model_copy(update={"store": cfg.store.model_copy(update={"feature_sketch_channels": 8})}),
        names=["dynunet"],
        progress=False,
    )
    assert summary.written["dynunet/all_folds"] == 6, "changing the sketch width recomputes the entries"


def test_lazy_dask_view_reads_nothing_until_computed(trained):
    cfg, _ = _cached(trained, "lazy")
    cache_teachers(cfg, names=["dynunet"], progress=False)
    store = TeacherStore.open(cfg.store.path)
    views = store.lazy_maps("dynunet/all_folds", "fine")
    assert sorted(views) == store.case_ids()
    case = store.case_ids()[0]
    amap, _ = store.read_attention("dynunet/all_folds", case, "fine")
    assert np.array_equal(views[case].compute().astype(np.float32), amap)
    total = sum(v.sum() for v in views.values()).compute()  # one dask graph over every case
    assert np.isfinite(total) and total > 0


def test_relation_terms_train_from_cached_sketches_and_need_them(trained):
    from core.config import TermConfig

    terms = [
        TermConfig(name="affinity"),
        TermConfig(name="gram", args={"kernel": "rbf"}),
        TermConfig(name="ffd"),
        TermConfig(name="rgd"),
    ]
    with_sketches, _ = _cached(
        trained, "relation", **{"store.feature_sketch_channels": 4, "training.epochs": 1}
    )
    cache_teachers(with_sketches, names=["dynunet"], progress=False)
    distillation = with_sketches.distillation.model_copy(
        update={"teachers": ["dynunet"], "terms": terms, "kind": "rel"}
    )
    result = distil(with_sketches.model_copy(update={"distillation": distillation}), fold=0, progress=False)
    header = Path(result.metrics_csv).read_text().splitlines()[0]
    assert all(f"loss_{t}_fine" in header for t in ("affinity", "gram", "ffd", "rgd"))

    without, _ = _cached(trained, "relation_plain", **{"training.epochs": 1})
    cache_teachers(without, names=["dynunet"], progress=False)
    with pytest.raises(StoreError, match=r"need feature sketches|cached without"):
        distil(without.model_copy(update={"distillation": distillation}), fold=0, progress=False)


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_sketch_is_stored_within_half_a_quantisation_step(trained, dtype):
    """int8 sketches keep every value within half its channel's step (max |value| / 127 / 2); float16 as float16."""
    cfg, _ = _cached(trained, f"quant-{dtype}")
    store = TeacherStore.open(cfg.store.path, mode="a")
    case = store.case_ids()[0]
    shape = store.case_shape(case)
    rng = np.random.default_rng(0)
    fine = (
        rng.standard_normal((3, *(s // 4 for s in shape))).astype(np.float32)
        * np.array([100, 1, 0.01])[:, None, None, None]
    )
    coarse = rng.standard_normal((3, *(s // 16 for s in shape))).astype(np.float32)
    basis = np.eye(5, 3, dtype=np.float32)
    store.write_entry(
        "probe/all_folds",
        case,
        rng.standard_normal((2, *shape)).astype(np.float32),
        np.ones([s // 16 for s in shape], np.float32),
        np.ones([s // 2 for s in shape], np.float32),
        {"fine": (fine, basis, {}), "coarse": (coarse, basis, {})},
        sketch_dtype=dtype,
    )
    read, stride = store.read_sketch("probe/all_folds", case, "fine")
    assert stride == (4.0, 4.0, 4.0), "a sketch records its own grid, not its tap's"
    if dtype == "int8":
        step = np.abs(fine).reshape(3, -1).max(axis=1) / 127
        assert np.all(np.abs(read - fine) <= step[:, None, None, None] / 2 * 1.0001)
    else:
        assert np.array_equal(read, fine.astype(np.float16).astype(np.float32))


def test_cache_writes_without_consolidated_metadata_and_consolidates_after(trained, monkeypatch):
    # zarr re-reads the root zarr.json for every array it creates: with the store's consolidated metadata in it, each
    # creation parsed megabytes of JSON (0.6 s per demo entry, growing with the store)
    import json

    cfg, _ = _cached(trained, "consolidated")
    root_json = Path(cfg.store.path) / "zarr.json"
    assert "consolidated_metadata" in json.loads(root_json.read_text())  # preprocess consolidated
    seen = []
    write_entry = TeacherStore.write_entry

    def spy(self, *args, **kwargs):
        seen.append(json.loads(root_json.read_text()).get("consolidated_metadata"))
        return write_entry(self, *args, **kwargs)

    monkeypatch.setattr(TeacherStore, "write_entry", spy)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    assert seen and all(meta is None for meta in seen)
    after = json.loads(root_json.read_text())
    assert after["attributes"]["teachcache"] == TeacherStore.open(cfg.store.path).metadata
    listed = after["consolidated_metadata"]["metadata"]
    first = TeacherStore.open(cfg.store.path).case_ids()[0]
    assert f"teachers/dynunet/all_folds/{first}/softmax" in listed
