"""The store: layout, completion markers, decoding, and refusal of foreign or future stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from core.data.preprocessing import foreground_locations
from core.errors import StoreError
from core.store.encoding import kl_per_voxel
from core.store.format import FORMAT_VERSION
from core.store.teacher_store import TeacherStore


def _new_store(path, shape=(32, 32, 32)):
    store = TeacherStore.create(
        path,
        dataset={
            "name": "t",
            "channel_names": ["CT", "PET"],
            "class_names": ["bg", "fg"],
            "manifest_hash": "m",
        },
        preprocessing={"x": 1},
        preprocessing_hash="h" * 64,
        splits=[{"train": ["a"], "val": ["b"]}],
        chunk_size=(16, 16, 16),
    )
    rng = np.random.default_rng(0)
    label = (rng.random(shape) > 0.9).astype(np.uint8)
    store.write_case(
        "a", rng.random((2, *shape), dtype=np.float32), label, foreground_locations(label), {"k": 1}
    )
    return store


def test_case_roundtrip_and_patch_reads(tmp_path):
    store = _new_store(tmp_path / "s.zarr")
    assert store.case_ids() == ["a"] and store.case_shape("a") == (32, 32, 32)
    box = (slice(4, 20), slice(0, 16), slice(8, 24))
    full = store.read_image("a")
    assert np.array_equal(store.read_image("a", box), full[(slice(None), *box)])
    assert store.case_attrs("a")["k"] == 1


def test_entry_softmax_retempering_and_maps(tmp_path):
    store = _new_store(tmp_path / "s.zarr")
    logits = np.random.default_rng(1).normal(0, 3, (2, 32, 32, 32)).astype(np.float32)
    store.write_entry(
        "t1",
        "a",
        logits,
        np.ones((2, 2, 2), np.float32),
        np.ones((16, 16, 16), np.float32),
        checkpoint_sha256="c",
    )
    assert store.has_entry("t1", "a") and store.entry_attrs("t1", "a")["checkpoint_sha256"] == "c"
    enc = store.encoding
    for temperature in (1.0, 2.0, 4.0):
        probs = store.read_softmax("t1", "a", temperature=temperature)
        assert np.allclose(probs.sum(0), 1.0, atol=1e-5)
        assert np.array_equal(probs, enc.decode(enc.encode(logits), temperature)), (
            "stored bits decode as encoded"
        )
        exact = torch.softmax(torch.from_numpy(logits) / temperature, 0).numpy()
        assert kl_per_voxel(exact, probs) < 1e-3
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert root["teachers/t1/a/softmax"].attrs["softmax_encoding"] == enc.name, (
        "plain zarr readers see the encoding"
    )
    amap, stride = store.read_attention("t1", "a", "coarse")
    assert amap.shape == (2, 2, 2) and stride == (16.0, 16.0, 16.0)
    assert store.read_attention("t1", "a", "fine")[1] == (2.0, 2.0, 2.0)


def test_incomplete_entry_is_invisible(tmp_path):
    store = _new_store(tmp_path / "s.zarr")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="a").require_group("teachers/t1/a")
    group.attrs["complete"] = False
    assert not store.has_entry("t1", "a")
    with pytest.raises(StoreError, match="no complete cache entry"):
        store._require_entry("t1", "a")


def test_opens_with_plain_zarr(tmp_path):
    _new_store(tmp_path / "s.zarr")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert root.attrs["teachcache"]["format_version"] == FORMAT_VERSION
    assert root["cases/a/image"].shape == (2, 32, 32, 32)
    assert root["cases/a/image"].metadata.dimension_names == ("channel", "x", "y", "z")


def test_refuses_missing_foreign_and_future_stores(tmp_path):
    with pytest.raises(StoreError, match="run `make cache`"):
        TeacherStore.open(tmp_path / "nothing.zarr")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs["other"] = 1
    with pytest.raises(StoreError, match="not a TeachCache store"):
        TeacherStore.open(tmp_path / "foreign.zarr")
    _new_store(tmp_path / "future.zarr")
    root = zarr.open_group(str(tmp_path / "future.zarr"), mode="a")
    root.attrs["teachcache"] = {**root.attrs["teachcache"], "format_version": "99.0"}
    with pytest.raises(StoreError, match=r"format 99\.0"):
        TeacherStore.open(tmp_path / "future.zarr")
    root.attrs["teachcache"] = {**root.attrs["teachcache"], "format_version": "1.3"}
    with pytest.raises(
        StoreError, match=r"format 1\.3, which keeps one copy of each teacher for every fold"
    ) as err:
        TeacherStore.open(tmp_path / "future.zarr")
    assert "--overwrite" in str(err.value), "the message says how to rebuild"


def test_create_refuses_other_preprocessing(tmp_path):
    _new_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="preprocessed with other settings"):
        TeacherStore.create(
            tmp_path / "s.zarr",
            dataset={"manifest_hash": "m"},
            preprocessing={},
            preprocessing_hash="x" * 64,
            splits=[],
        )
