"""Chunk checksums and digests (store format 2.2): how they are recorded, what distil records of its check, and
the upgrade of older stores — through the CLI. The damaged-store rows (a lost, random or moved chunk, a replaced
checkpoint) are in tests/test_bad_inputs.py."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.store.format import FORMAT_VERSION
from core.store.integrity import chunk_digest
from core.store.teacher_store import TeacherStore
from teachcache.cli import app
from tests.conftest import derived_config

runner = CliRunner()


@pytest.fixture(scope="module")
def cached(trained, tmp_path_factory):
    """One dynunet teacher cached for fold 0 (a pristine copy each test breaks its own copy of)."""
    root, data = trained
    cfg, path = derived_config(root, data, "digests", teachers=[data["teachers"][2]])
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    return cfg, path


@pytest.fixture
def copy(cached, tmp_path):
    """The cached store and a config pointing at a private copy of it: ``(config path, store path, case ids)``."""
    cfg, path = cached
    store = tmp_path / "store.zarr"
    shutil.copytree(cfg.store.path, store)
    text = Path(path).read_text().replace(str(cfg.store.path), str(store))
    text = text.replace(str(cfg.output.runs_dir), str(tmp_path / "runs"))
    config = tmp_path / "config.yaml"
    config.write_text(text)
    opened = TeacherStore.open(store)
    return config, store, opened.case_ids(), opened.metadata["splits"][0]


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def _softmax_chunk(store: Path, case: str) -> Path:
    return sorted(
        p for p in (store / f"teachers/dynunet/all_folds/{case}/softmax/c").rglob("*") if p.is_file()
    )[0]


def _distil(config: Path, *extra: str) -> tuple[int, str]:
    return _cli("distil", "-c", str(config), "--fold", "0", "-q", *extra)


def _no_run_folder(tmp_path: Path) -> bool:
    students = tmp_path / "runs" / "students"
    return not students.exists() or not any(p.is_file() for p in students.rglob("*"))


def test_every_array_carries_a_crc32c_codec_and_every_chunk_a_digest_bound_to_its_place(copy):
    _, store, cases, _ = copy
    group = zarr.open_group(str(store / "teachers/dynunet/all_folds" / cases[0]), mode="r")
    digests = group.attrs["chunk_digests"]
    for name in ("softmax", "coarse", "fine"):
        assert type(group[name].compressors[-1]).__name__ == "Crc32cCodec", name
        assert digests[name], name
    # the recorded digest is the documented formula: BLAKE2b-128 over "<group>/<array>/<chunk key>", 0x00, bytes
    chunk = _softmax_chunk(store, cases[0])
    key = chunk.relative_to(store).as_posix()
    expected = hashlib.blake2b(key.encode() + b"\0" + chunk.read_bytes(), digest_size=16).hexdigest()
    assert chunk_digest(key, chunk.read_bytes()) == expected
    assert (
        digests["softmax"][chunk.relative_to(store / key.rsplit("/softmax/", 1)[0] / "softmax").as_posix()]
        == expected
    )
    case_group = zarr.open_group(str(store / "cases" / cases[0]), mode="r")
    assert set(case_group.attrs["chunk_digests"]) == {"image", "label", "foreground"}


def test_each_array_of_an_entry_is_one_shard_file_and_reads_back_by_region(tmp_path):
    rng = np.random.default_rng(0)
    store = TeacherStore.create(
        tmp_path / "s.zarr",
        dataset={"channel_names": ["CT"], "class_names": ["bg", "a", "b"], "manifest_hash": "x"},
        preprocessing={},
        preprocessing_hash="x",
        splits=[],
        chunk_size=(16, 16, 16),
    )
    shape = (40, 33, 20)  # not a multiple of the chunks on any axis
    label = rng.integers(0, 3, shape).astype(np.uint8)
    store.write_case(
        "A", rng.standard_normal((1, *shape)).astype(np.float32), label, np.zeros((0, 4), np.int32), {}
    )
    logits = rng.standard_normal((3, *shape)).astype(np.float32)
    store.write_entry("t/all_folds", "A", logits, rng.random((5, 4, 2)), rng.random((20, 16, 10)))
    entry = tmp_path / "s.zarr" / "teachers" / "t" / "all_folds" / "A"
    group = zarr.open_group(str(entry), mode="r")
    files = sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file())
    assert len(files) == 2 * len(list(group.array_keys())) + 1, files  # per array: zarr.json + one data file
    softmax = group["softmax"]
    assert softmax.nchunks == 3 * 3 * 2 and softmax.shards is not None, "18 chunks held in one shard"
    box = (slice(3, 29), slice(10, 33), slice(5, 19))  # across chunk borders
    whole = store.read_softmax("t/all_folds", "A", temperature=2.0)
    np.testing.assert_array_equal(
        store.read_softmax("t/all_folds", "A", box, temperature=2.0), whole[(slice(None), *box)]
    )
    np.testing.assert_array_equal(store.read_label("A", box), label[box])
    assert all(f.ok for f in store.check_groups(["cases/A", "teachers/t/all_folds/A"]))
    shard = next((entry / "fine" / "c").rglob("*"), None)
    while shard is not None and shard.is_dir():
        shard = next(shard.iterdir())
    shard.unlink()
    found = store.check_digests("teachers/t/all_folds/A")
    assert found.missing == {"fine": ["c/0/0/0"]} and store.missing_chunks("teachers/t/all_folds/A") == {
        "fine": 1
    }


def test_a_case_chunk_swapped_between_cases_is_caught(copy):
    _, store, cases, _ = copy
    a = sorted((store / "cases" / cases[0] / "label" / "c").rglob("*"))[-1]
    b = store / "cases" / cases[1] / a.relative_to(store / "cases" / cases[0])
    shutil.copyfile(b, a)
    code, out = _cli("verify", str(store))
    assert (
        code == 1
        and f"case {cases[0]}: array 'label' has 1 chunk or metadata file(s) that are not the ones" in out
    ), out


def test_a_store_without_digests_is_refused_with_its_fix_and_the_skip_warns(copy, tmp_path):
    config, store, cases, _ = copy
    for case in cases:  # as a store written before format 2.2
        group = zarr.open_group(str(store / "teachers/dynunet/all_folds" / case), mode="r+")
        del group.attrs["chunk_digests"]
    code, out = _distil(config)
    assert code == 2, out
    assert "records no chunk digests (written before store format 2.2)" in out and "--rehash" in out, out
    code, out = _distil(config, "--skip-integrity-check")
    assert code == 0, out
    assert "chunks not checked before training" in out, out


@pytest.mark.skipif(os.name != "posix", reason="POSIX paths")
def test_the_check_is_recorded_with_what_it_read(copy, tmp_path):
    import json

    config, _, _, split = copy
    code, out = _distil(config)
    assert code == 0, out
    summary = json.loads(next((tmp_path / "runs" / "students").rglob("summary.json")).read_text())
    check = summary["store_check"]
    fold_cases = len(split["train"]) + len(split["val"])
    assert check["groups"] == fold_cases + len(split["train"]), (
        "every case, and the teacher's training entries"
    )
    assert check["chunks"] > check["groups"] and check["bytes"] > 0


def _as_format_2_1(store: Path) -> None:
    """Rewrite a store as format 2.1 wrote it: no CRC-32C codec, no digests, the root's version 2.1."""
    from zarr.codecs import BloscCodec

    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    groups = [f"cases/{c}" for c in root["cases"].group_keys()] + [
        f"teachers/dynunet/all_folds/{c}" for c in root["teachers/dynunet/all_folds"].group_keys()
    ]
    for path in groups:
        group = root[path]
        for name, arr in list(group.arrays()):
            data, attrs, chunks, filters = arr[...], dict(arr.attrs), arr.chunks, arr.filters
            dims = arr.metadata.dimension_names
            group.create_array(
                name,
                data=data,
                chunks=chunks,
                filters=filters,
                compressors=BloscCodec(cname="zstd", clevel=5),
                dimension_names=dims,
                overwrite=True,
                config={"write_empty_chunks": True},
            )
            group[name].attrs.update(attrs)
        del group.attrs["chunk_digests"]
        del group.attrs["attrs_digest"]
    root.attrs["teachcache"] = {**root.attrs["teachcache"], "format_version": "2.1"}


def test_rehash_brings_an_older_store_to_checksums_and_digests_without_changing_a_value(copy):
    _, store, cases, _ = copy
    before = TeacherStore.open(store).read_softmax("dynunet/all_folds", cases[0], temperature=2.0)
    _as_format_2_1(store)
    code, out = _cli("verify", str(store))
    assert code == 1 and "records no chunk digests (written before store format 2.2)" in out, out
    assert f"teachcache verify {store} --rehash" in out
    code, out = _cli("verify", str(store), "--rehash", "-q")
    assert code == 0, out
    assert (
        f"rehash: {len(cases) * 2} case(s)/entries given checksums and digests, 0 already had them" in out
    ), out
    opened = TeacherStore.open(store)
    assert opened.metadata["format_version"] == FORMAT_VERSION
    np.testing.assert_array_equal(opened.read_softmax("dynunet/all_folds", cases[0], temperature=2.0), before)
    group = zarr.open_group(str(store / "teachers/dynunet/all_folds" / cases[0]), mode="r")
    assert type(group["softmax"].compressors[-1]).__name__ == "Crc32cCodec"
    image = zarr.open_group(str(store / "cases" / cases[0]), mode="r")["image"]
    assert all(a.shards is not None or a.nchunks == 1 for a in (group["softmax"], image)), (
        "one file per array (2.3)"
    )
    code, out = _cli("verify", str(store), "--rehash", "-q")
    assert (
        code == 0
        and f"0 case(s)/entries given checksums and digests, {len(cases) * 2} already had them" in out
    )


def test_a_rehash_stopped_midway_loses_nothing_and_a_rerun_finishes_it(copy, monkeypatch):
    import core.store.rehash as rehash

    _, store, cases, _ = copy
    before = {c: TeacherStore.open(store).read_label(c) for c in cases}
    _as_format_2_1(store)
    calls, original = [], rehash._write

    def dies_in_the_swap(store_, group, name, array):
        if not name.endswith("__rehash"):  # step 2: the group's own arrays rewritten from memory
            calls.append(name)
            if len(calls) == 2:
                raise KeyboardInterrupt  # as a kill between two arrays of one group
        return original(store_, group, name, array)

    monkeypatch.setattr(rehash, "_write", dies_in_the_swap)
    with pytest.raises(KeyboardInterrupt):
        rehash.rehash_store(str(store))
    monkeypatch.setattr(rehash, "_write", original)
    code, out = _cli("verify", str(store), "--rehash", "-q")
    assert code == 0, out
    opened = TeacherStore.open(store)
    assert opened.case_ids() == cases, "the group being swapped is finished, not dropped"
    for case in cases:
        np.testing.assert_array_equal(opened.read_label(case), before[case])
    assert not any(p.name.endswith("__rehash") for p in store.rglob("*")), "no copy left behind"


def test_edited_array_metadata_or_group_attributes_are_caught(copy):
    import json

    _, store, cases, _ = copy
    entry = store / "teachers/dynunet/all_folds" / cases[0]
    meta = json.loads((entry / "coarse" / "zarr.json").read_text())
    meta["attributes"]["note"] = "edited"
    (entry / "coarse" / "zarr.json").write_text(json.dumps(meta))
    group = zarr.open_group(str(store / "teachers/dynunet/all_folds" / cases[1]), mode="r+")
    group.attrs["fine_stride"] = [4.0, 4.0, 4.0]
    code, out = _cli("verify", str(store))
    assert code == 1, out
    assert (
        f"case {cases[0]}: array 'coarse' has 1 chunk or metadata file(s)" in out
        and "coarse/zarr.json" in out
    )
    assert f"case {cases[1]}: its attributes are not the ones written with it" in out
