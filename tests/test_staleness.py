"""The store never claims what its entries were not computed with, and travels alone.

Entry keys (what an entry was computed from) decide what ``cache`` recomputes and what ``distil`` and ``verify``
accept; a rewritten entry keeps nothing of the old one; the dataset manifest sees edited bytes; stage 2 reads its
folds from the store.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core import user_cache
from core.config import Config, load_config
from core.data.layout import read_raw_dataset
from core.errors import StoreError
from core.experiment import fold_split
from core.models import create_model
from core.models.checkpoint import load_checkpoint, save_checkpoint
from core.store.teacher_store import TeacherStore
from teachcache.cli import app
from tests.conftest import derived_config
from train_student import distil

runner = CliRunner()

ONLY_DYNUNET = {
    "distillation.teachers": ["dynunet"],
    "training.epochs": 1,
    "training.iterations_per_epoch": 1,
}


@pytest.fixture(scope="module")
def base(trained) -> Config:
    """A store with every case preprocessed and the dynunet teacher cached (attention p = 2); copied, never changed."""
    root, data = trained
    cfg, _ = derived_config(root, data, "staleness_base", **ONLY_DYNUNET)
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    return cfg


def _copy(trained, base: Config, name: str, **changes) -> Config:
    """A config of its own over a copy of the base store, with dotted-key ``changes``."""
    root, data = trained
    shutil.copytree(base.store.path, root / f"{name}.zarr")
    cfg, _ = derived_config(root, data, name, **{**ONLY_DYNUNET, **changes})
    return cfg


def _interrupt_after(monkeypatch, writes: int) -> None:
    """Make ``write_entry`` fail like a full disk after ``writes`` successful entries."""
    real = TeacherStore.write_entry
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > writes:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TeacherStore, "write_entry", failing)


def _changed_checkpoint(data: dict, path: Path) -> str:
    """Save the dynunet teacher with one parameter shifted at ``path`` (other bytes, same architecture)."""
    original = load_checkpoint(data["teachers"][2]["checkpoint"])
    model = create_model("dynunet", 2, 2, original.args)
    model.load_state_dict(original.state_dict)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(path, model, "dynunet", 2, 2, original.args, original.meta)
    return str(path)


@pytest.mark.parametrize(
    ("change", "value", "field"),
    [
        ("distillation.attention", {"p": 3.0}, "attention_p"),
        ("inference.mode", "constant", "inference"),
    ],
)
def test_changed_settings_recompute_every_entry_and_record_them(trained, base, change, value, field):
    cfg = _copy(trained, base, f"recompute_{field}", **{change: value})
    summary = cache_teachers(cfg, names=["dynunet"], progress=False)
    assert summary.written["dynunet/all_folds"] == 6 and summary.skipped["dynunet/all_folds"] == 0
    store = TeacherStore.open(cfg.store.path)
    old = TeacherStore.open(base.store.path).entry_attrs("dynunet/all_folds", store.case_ids()[0])[
        "entry_key"
    ]
    for case in store.case_ids():
        key = store.entry_attrs("dynunet/all_folds", case)["entry_key"]
        assert key[field] != old[field] and key["checkpoint_sha256"] == old["checkpoint_sha256"]
    assert (
        store.entry_attrs("dynunet/all_folds", store.case_ids()[0])["entry_key"]["attention_p"]
        == cfg.distillation.attention.p
    )
    again = cache_teachers(cfg, names=["dynunet"], progress=False)
    assert again.written["dynunet/all_folds"] == 0 and again.skipped["dynunet/all_folds"] == 6


@pytest.mark.parametrize("what", ["attention_p", "checkpoint_sha256"])
def test_distil_and_verify_refuse_a_store_mixing_old_and_new_entries(
    trained, base, monkeypatch, tmp_path, what
):
    _, data = trained
    if what == "attention_p":
        change = {"distillation.attention": {"p": 3.0}}
    else:  # the store was cached from the original bytes; the config now names other bytes
        change = {"teachers.2.checkpoint": _changed_checkpoint(data, tmp_path / "dynunet_v2.pth")}
    cfg = _copy(trained, base, f"mixed_{what}", **change)
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(StoreError, match="re-run `make cache` to resume"):
        cache_teachers(cfg, names=["dynunet"], progress=False)
    monkeypatch.undo()
    with pytest.raises(StoreError) as info:  # the provenance describes the new settings; 4 entries do not
        distil(cfg, fold=0, progress=False)

    store = TeacherStore.open(cfg.store.path)
    wanted = store.teacher_metadata("dynunet/all_folds")["entry_key"][what]
    assert (
        wanted != TeacherStore.open(base.store.path).teacher_metadata("dynunet/all_folds")["entry_key"][what]
    )
    train, _ = fold_split(cfg, store, 0)
    stale = [c for c in train if store.entry_attrs("dynunet/all_folds", c)["entry_key"][what] != wanted]
    assert stale, "some training cases still hold entries of the old settings"
    message = str(info.value)
    assert f"teacher 'dynunet/all_folds' has {len(stale)} of the {len(train)} training case(s)" in message
    assert stale[0] in message and what in message and "run `make cache` to recompute them" in message

    result = runner.invoke(app, ["verify", cfg.store.path])
    assert result.exit_code == 1
    assert re.search(rf"case {stale[0]}: computed with other settings .*differs in .*{what}", result.output)

    summary = cache_teachers(cfg, names=["dynunet"], progress=False)  # `make cache` finishes the job
    assert summary.written["dynunet/all_folds"] == 4 and summary.skipped["dynunet/all_folds"] == 2
    assert runner.invoke(app, ["verify", cfg.store.path]).exit_code == 0


def test_rewritten_entry_keeps_nothing_of_the_old_one(trained, base):
    cfg = _copy(trained, base, "rewrite")
    store = TeacherStore.open(cfg.store.path, mode="a")
    case = store.case_ids()[0]
    shape = store.case_shape(case)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, *shape)).astype(np.float32)
    coarse, fine = np.ones((2, 2, 2), np.float32), np.ones(tuple(s // 2 for s in shape), np.float32)
    sketch = (
        rng.normal(size=(3, 2, 2, 2)).astype(np.float32),
        np.eye(8, 3, dtype=np.float32),
        {"channels": 3},
    )
    store.write_entry("dynunet/all_folds", case, logits, coarse, fine, {"coarse": sketch}, old_only="yes")
    assert store.has_sketch("dynunet/all_folds", case, "coarse")

    store.write_entry("dynunet/all_folds", case, logits, coarse, fine, None, checkpoint_sha256="new")
    attrs = store.entry_attrs("dynunet/all_folds", case)
    assert "sketch" not in attrs and "old_only" not in attrs and attrs["checkpoint_sha256"] == "new"
    assert not (Path(cfg.store.path) / "teachers" / "dynunet" / case / "coarse_sketch").exists()
    assert not (Path(cfg.store.path) / "teachers" / "dynunet" / case / "coarse_sketch_basis").exists()
    assert np.allclose(store.read_softmax("dynunet/all_folds", case).sum(0), 1.0, atol=1e-3)

    class Killed(Exception):
        pass

    def die_midway(array: str) -> None:
        if array == "coarse":
            raise Killed

    with pytest.raises(Killed):
        store.write_entry("dynunet/all_folds", case, logits, coarse, fine, on_array=die_midway)
    assert not store.has_entry("dynunet/all_folds", case), (
        "an interrupted rewrite is incomplete, never old and new mixed"
    )


def test_manifest_sees_a_same_size_edit_and_remembers_hashes(trained, tmp_path, monkeypatch):
    _, data = trained
    raw = tmp_path / "Dataset900_Tiny"
    shutil.copytree(data["dataset"]["raw_dir"], raw)
    monkeypatch.setenv("TEACHCACHE_CACHE_DIR", str(tmp_path / "cache"))
    files = sorted(raw.rglob("*"))
    ds = read_raw_dataset(raw)
    before = ds.manifest_hash()

    image = ds.cases[0].images[0]
    content = bytearray(image.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, other bytes
    stat = image.stat()
    image.write_bytes(bytes(content))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert image.stat().st_size == stat.st_size

    hashed: list[Path] = []
    real = user_cache._file_sha256

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(user_cache, "_file_sha256", counting)
    after = ds.manifest_hash()
    assert after != before, "an edit that keeps the size changes the manifest"
    assert hashed == [image], "only the edited file is read again; the others come from the hash cache"
    hashed.clear()
    assert ds.manifest_hash() == after and hashed == [], "unchanged files are not re-hashed"
    assert (tmp_path / "cache" / "file_sha256.json").is_file()
    remembered = json.loads((tmp_path / "cache" / "file_sha256.json").read_text())
    assert str(image.resolve()) in remembered
    assert sorted(raw.rglob("*")) == files, "nothing is written into the raw dataset"


def _travelling_config(base: Config, tmp_path: Path, splits_file: Path | None) -> Config:
    """The base experiment on another machine: only the store was copied; no runs, raw data or checkpoints."""
    store = tmp_path / "elsewhere" / "store.zarr"
    if not store.exists():
        shutil.copytree(base.store.path, store)
    data = copy.deepcopy(base.model_dump(mode="json"))
    data["store"]["path"] = str(store)
    data["output"]["runs_dir"] = str(tmp_path / "gpu_runs")
    data["dataset"] = {"raw_dir": str(tmp_path / "no_raw_data_here")}
    data["splits"]["file"] = str(splits_file) if splits_file else None
    for teacher in data["teachers"]:
        teacher["checkpoint"] = str(tmp_path / "no_checkpoints_here" / f"{teacher['name']}.pth")
    path = tmp_path / f"gpu_{splits_file is not None}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


def test_a_store_copied_alone_trains_a_student_on_its_own_folds(base, tmp_path):
    store_splits = TeacherStore.open(base.store.path).metadata["splits"]
    other = [{"train": s["val"] + s["train"][:-1], "val": s["train"][-1:]} for s in store_splits]
    (tmp_path / "other_splits.json").write_text(json.dumps(other))
    with pytest.raises(
        StoreError, match=r"splits.file .*other_splits.json disagrees with the folds recorded in"
    ):
        distil(_travelling_config(base, tmp_path, tmp_path / "other_splits.json"), fold=0, progress=False)

    cfg = _travelling_config(base, tmp_path, None)
    result = distil(cfg, fold=0, progress=False)
    meta = load_checkpoint(result.checkpoint).meta
    assert meta["train_cases"] == store_splits[0]["train"] and meta["val_cases"] == store_splits[0]["val"]
    assert not (cfg.output.runs_dir / "splits_final.json").exists()


def test_preprocess_refuses_other_folds_than_the_store_records(trained, base, tmp_path):
    store_splits = TeacherStore.open(base.store.path).metadata["splits"]
    swapped = [store_splits[1], store_splits[0], *store_splits[2:]]
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    cfg = _copy(trained, base, "other_folds", **{"splits.file": str(tmp_path / "swapped.json")})
    with pytest.raises(StoreError, match=r"records other folds than .*swapped.json \(fold 0: "):
        preprocess_dataset(cfg, progress=False)


def test_distil_warns_and_records_when_the_raw_data_changed_since_preprocessing(trained, base):
    # policy: the student trains on the store's own copy (it may travel without raw data), so a changed raw
    # dataset is warned about and recorded, not refused
    root, data = trained
    raw = root / "raw_for_drift"
    shutil.copytree(data["dataset"]["raw_dir"], raw)
    cfg = _copy(trained, base, "raw_drift", **{"dataset.raw_dir": str(raw)})
    config = str(root / "raw_drift.yaml")
    result = runner.invoke(app, ["distil", "-c", config, "--fold", "0", "--kd", "none", "-q"])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    out = cfg.output.runs_dir / "students" / "kd-none" / "fold_0" / "summary.json"
    assert json.loads(out.read_text())["raw_dataset"] == "matches"

    label = next((raw / "labelsTr").iterdir())
    blob = bytearray(label.read_bytes())
    blob[-1] ^= 0xFF  # same size, other content
    label.write_bytes(bytes(blob))
    result = runner.invoke(app, ["distil", "-c", config, "--fold", "0", "--kd", "none", "-q"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "changed since" in result.output and "--overwrite" in result.output
    assert json.loads(out.read_text())["raw_dataset"] == "differs"

    shutil.rmtree(raw)
    assert runner.invoke(app, ["distil", "-c", config, "--fold", "0", "--kd", "none", "-q"]).exit_code == 0
    assert json.loads(out.read_text())["raw_dataset"] == "unavailable", "a store travels without its raw data"
