"""Bad input, table-driven: each malformed dataset gets one message naming the case or file, exit 2, no traceback.

Add a row for every new kind of bad input: (what is broken, how to break it, a fragment the message must hold).
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
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


# ------------------------------------------------------------------ a cached store, damaged or misused
# Each row of the integrity issue's table (a store, checkpoint or split changed under a student; a teacher that
# fails; an all-background dataset; a read-only store or checkpoint folder; a damaged zarr.json): one command the
# way a user types it, its exit code, what the message must say, and what must (not) be left behind.


@dataclass
class Cached:
    """A private copy of a store with the dynunet teacher cached, its config and checkpoint."""

    root: Path
    config: Path
    store: Path
    checkpoint: Path
    data: dict
    train: list[str]
    val: list[str]

    def entry(self, case: str) -> Path:
        return self.store / "teachers" / "dynunet" / "all_folds" / case

    def chunk(self, case: str, array: str = "softmax") -> Path:
        return sorted(p for p in (self.entry(case) / array / "c").rglob("*") if p.is_file())[0]

    def rewrite_config(self, **changes) -> None:
        import yaml

        for dotted, value in changes.items():
            node = self.data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            node[leaf] = value
        self.config.write_text(yaml.safe_dump(self.data, sort_keys=False))

    def no_run_written(self) -> bool:
        students = self.root / "runs" / "students"
        return not students.exists() or not any(p.is_file() for p in students.rglob("*"))


@pytest.fixture(scope="module")
def cached_pristine(trained):
    """The dynunet teacher (all folds) cached into a store, once for this module."""
    from cache_teachers import cache_teachers, preprocess_dataset
    from tests.conftest import derived_config

    root, data = trained
    cfg, path = derived_config(root, data, "bad_inputs", teachers=[data["teachers"][2]])
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    return cfg, path


@pytest.fixture
def cached(cached_pristine, tmp_path) -> Cached:
    import copy as copying

    import yaml

    from core.store.teacher_store import TeacherStore

    cfg, path = cached_pristine
    store = tmp_path / "store.zarr"
    shutil.copytree(cfg.store.path, store)
    checkpoint = tmp_path / "dynunet.pth"
    shutil.copyfile(cfg.teachers[0].checkpoint, checkpoint)
    data = copying.deepcopy(yaml.safe_load(Path(path).read_text()))
    data["store"]["path"] = str(store)
    data["output"]["runs_dir"] = str(tmp_path / "runs")
    data["teachers"][0]["checkpoint"] = str(checkpoint)
    data["splits"].pop("file", None)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    split = TeacherStore.open(store).metadata["splits"][0]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "splits_final.json").write_text(
        json.dumps(TeacherStore.open(store).metadata["splits"])
    )
    return Cached(tmp_path, config, store, checkpoint, data, split["train"], split["val"])


def _deleted_chunk(c: Cached):
    case = c.train[0]
    c.chunk(case).unlink()
    yield ["distil", "-c", str(c.config), "--fold", "0", "-q"], 2
    yield f"teacher dynunet/all_folds, case {case}: array 'softmax' has lost chunk(s)", "make cache"
    assert c.no_run_written(), "nothing of the run is written"


def _random_bytes(c: Cached):
    case = c.train[1]
    chunk = c.chunk(case)
    chunk.write_bytes(
        np.random.default_rng(0).integers(0, 256, chunk.stat().st_size, dtype=np.uint8).tobytes()
    )
    yield ["distil", "-c", str(c.config), "--fold", "0", "-q"], 2
    yield (
        f"teacher dynunet/all_folds, case {case}: array 'softmax' chunk(s) {chunk.relative_to(c.entry(case) / 'softmax').as_posix()}",
        str(chunk.relative_to(c.root).as_posix()),
    )
    assert c.no_run_written()


def _chunk_from_another_case(c: Cached):
    target, source = c.train[0], c.train[1]
    dst = c.chunk(target)
    shutil.copyfile(c.entry(source) / dst.relative_to(c.entry(target)), dst)  # valid bytes, wrong place
    yield ["verify", str(c.store)], 1
    yield (
        f"teacher dynunet/all_folds, case {target}: array 'softmax' has 1 chunk or metadata file(s) that are not the ones",
    )
    result = runner.invoke(app, ["distil", "-c", str(c.config), "--fold", "0", "-q"])
    assert result.exit_code == 2 and f"case {target}: array 'softmax' chunk(s)" in " ".join(
        result.output.split()
    )
    assert c.no_run_written()


def _checkpoint_replaced(c: Cached):
    import torch

    state = torch.load(c.checkpoint, weights_only=True)
    state["note"] = "retrained after caching"
    torch.save(state, c.checkpoint)
    yield ["verify", str(c.store), "-c", str(c.config)], 1
    yield (f"teacher dynunet/all_folds: {c.checkpoint} changed since it was cached",)


def _splits_copy_edited(c: Cached):
    copy = c.root / "runs" / "splits_final.json"
    folds = json.loads(copy.read_text())
    moved = folds[0]["val"][0]
    folds[0]["val"].remove(moved)
    folds[0]["train"].append(moved)
    copy.write_text(json.dumps(folds))
    yield ["distil", "-c", str(c.config), "--fold", "0", "--kd", "none", "-q"], 0
    yield (f"{copy} differs from the folds recorded in {c.store}", moved, "is not used")


def _nan_teacher(c: Cached):
    import copy as copying

    from core.models import create_model
    from core.models.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(c.checkpoint)
    model = create_model(ckpt.arch, ckpt.in_channels, ckpt.out_channels, ckpt.args)
    model.load_state_dict(
        {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    )
    diverged = c.root / "diverged.pth"
    save_checkpoint(diverged, model, ckpt.arch, ckpt.in_channels, ckpt.out_channels, ckpt.args, ckpt.meta)
    teacher = {**copying.deepcopy(c.data["teachers"][0]), "name": "diverged", "checkpoint": str(diverged)}
    c.rewrite_config(teachers=[*c.data["teachers"], teacher])
    yield ["cache", "-c", str(c.config), "-t", "diverged", "-q"], 2
    yield ("teacher 'diverged' produced NaN or Inf on case",)
    assert not (c.store / "teachers" / "diverged").exists(), "no empty teacher group is left behind"


def _read_only_store(c: Cached, monkeypatch):
    _refuse_writes_inside(monkeypatch, c.store)
    yield ["cache", "-c", str(c.config), "-t", "dynunet", "-q"], 2
    yield (f"{c.store} is read-only", "`teachcache cache` writes into the store")


def _truncated_entry_metadata(c: Cached):
    case = c.train[0]
    meta = c.entry(case) / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    for command in (["ls", str(c.store)], ["inspect", str(c.store)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and str(meta) in " ".join(result.output.split()), (
            command,
            result.output,
        )
        assert "Traceback" not in result.output
    yield ["verify", str(c.store)], 1
    yield (str(meta), "is damaged", "make cache")
    result = runner.invoke(app, ["cache", "-c", str(c.config), "-t", "dynunet", "-q"])
    assert result.exit_code == 0 and "1 written" in result.output, result.output
    assert runner.invoke(app, ["verify", str(c.store)]).exit_code == 0, "cache rewrote the damaged entry"


def _unwritable_checkpoint_folder(c: Cached):
    import os

    if (
        os.geteuid() == 0
    ):  # root writes through permission bits: a folder under a regular file refuses everyone
        (c.root / "not_a_folder").write_text("")
        folder = c.root / "not_a_folder" / "teachers"
    else:
        folder = c.root / "ro"
        folder.mkdir(mode=0o555)
    c.rewrite_config(**{"teachers.0.checkpoint": str(folder / "dynunet_{fold}.pth")})
    yield ["teachers", "-c", str(c.config), "--fold", "0", "-q"], 2
    yield (f"{folder} is not writable", "the checkpoint of teacher 'dynunet'", "nothing was done")
    assert not (c.root / "runs" / "teachers" / "dynunet" / "fold_0").exists(), (
        "no run folder made or replaced"
    )


def _refuse_writes_inside(monkeypatch, store: Path) -> None:
    """Make every zarr write or delete under ``store`` fail as on a read-only file system (root ignores chmod)."""
    import errno as errnos
    import os

    from zarr.storage import LocalStore

    def refuse(path) -> None:
        if Path(path).resolve().is_relative_to(store.resolve()):
            raise OSError(errnos.EROFS, os.strerror(errnos.EROFS), str(path))

    original_set, original_delete = LocalStore._set, LocalStore.delete

    async def _set(self, key, value, exclusive=False):
        refuse(self.root / key)
        return await original_set(self, key, value, exclusive)

    async def delete(self, key):
        refuse(self.root / key)
        return await original_delete(self, key)

    monkeypatch.setattr(LocalStore, "_set", _set)
    monkeypatch.setattr(LocalStore, "delete", delete)


STORE_ROWS = {
    "softmax chunk deleted, then distil": _deleted_chunk,
    "random bytes over a chunk, then distil": _random_bytes,
    "a valid chunk copied from another case": _chunk_from_another_case,
    "checkpoint replaced after caching, then verify -c": _checkpoint_replaced,
    "splits_final.json edited after preprocessing": _splits_copy_edited,
    "cache of a teacher that emits NaN": _nan_teacher,
    "cache on a read-only store": _read_only_store,
    "an entry's zarr.json truncated": _truncated_entry_metadata,
    "teacher checkpoint folder not writable, then teachers": _unwritable_checkpoint_folder,
}


@pytest.mark.parametrize("what", list(STORE_ROWS))
def test_a_damaged_or_misused_store_gets_one_clear_message(what, cached, monkeypatch):
    import inspect

    row = STORE_ROWS[what]
    steps = row(cached, monkeypatch) if "monkeypatch" in inspect.signature(row).parameters else row(cached)
    command, code = next(steps)
    result = runner.invoke(app, command)
    output = " ".join(result.output.split())
    assert result.exit_code == code, output
    assert "Traceback" not in result.output, result.output
    for fragment in next(steps):
        assert fragment in output, (fragment, output)
    next(steps, None)  # what must (not) be left behind


def test_an_all_background_dataset_is_refused_and_an_empty_case_warned(pristine, tmp_path):
    data = tiny_config_dict(tmp_path)
    raw = Path(data["dataset"]["raw_dir"])
    shutil.copytree(pristine, raw)
    _rewrite(raw / "labelsTr" / "SYNPETCT_002.nii.gz", lambda d, a: (np.zeros_like(d), a))
    config = str(write_config(tmp_path, data))
    result = runner.invoke(app, ["preprocess", "-c", config, "-q"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "case 'SYNPETCT_002':" in output and "holds no foreground" in output
    assert output.count("holds no foreground") == 1, "one warning per empty case"
    for label in (raw / "labelsTr").glob("*.nii.gz"):
        _rewrite(label, lambda d, a: (np.zeros_like(d), a))
    shutil.rmtree(tmp_path / "store.zarr")
    (tmp_path / "runs" / "splits_final.json").unlink()
    result = runner.invoke(app, ["preprocess", "-c", config, "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "labels is background only" in " ".join(result.output.split())
    assert not (tmp_path / "store.zarr").exists(), "nothing half-written"


def test_read_commands_never_write_to_the_store(cached, monkeypatch, tmp_path):
    """ls, inspect, show, export, verify, stats (-o elsewhere) and distil on a store that refuses every write."""
    _refuse_writes_inside(monkeypatch, cached.store)
    case = cached.val[0]
    commands = [
        ["ls", str(cached.store)],
        ["inspect", str(cached.store)],
        ["show", str(cached.store), case, "-o", str(tmp_path / "show.png")],
        ["export", str(cached.store), case, "-t", "dynunet", "-w", "probs", "-o", str(tmp_path / "p.nii.gz")],
        ["verify", str(cached.store), "-c", str(cached.config)],
        ["stats", str(cached.store), "-o", str(tmp_path / "stats"), "-q"],
        ["distil", "-c", str(cached.config), "--fold", "0", "-q"],
    ]
    for command in commands:
        result = runner.invoke(app, command)
        assert result.exit_code == 0 and "Traceback" not in result.output, (command, result.output)


@pytest.mark.skipif(
    __import__("os").geteuid() == 0, reason="root writes through permission bits (chmod variant)"
)
def test_stats_into_a_read_only_folder_is_refused_before_the_work(cached, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    result = runner.invoke(app, ["stats", str(cached.store), "-o", str(folder / "stats"), "-q"])
    assert result.exit_code == 2 and "choose another folder with -o" in " ".join(result.output.split())


def test_only_a_refusal_by_the_bucket_itself_is_called_a_read_only_bucket():
    """s3fs raises S3's AccessDenied as a PermissionError naming no file: that is the bucket. A PermissionError on a
    local file during a run on a remote store (the splits file, a raw image) is not, and keeps its own message."""
    from core.errors import StoreError
    from core.store.locking import read_only_store

    bucket = read_only_store(PermissionError("Access Denied"), "s3://bucket/store.zarr", "cache")
    assert isinstance(bucket, StoreError) and "cannot be written with these credentials" in str(bucket)
    local = PermissionError(13, "Permission denied", "/data/raw/labelsTr/case_000.nii.gz")
    assert read_only_store(local, "s3://bucket/store.zarr", "cache") is None
    inside = PermissionError(13, "Permission denied", "s3://bucket/store.zarr/teachers/zarr.json")
    assert isinstance(read_only_store(inside, "s3://bucket/store.zarr", "cache"), StoreError)
