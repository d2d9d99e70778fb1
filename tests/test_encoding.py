"""Softmax encodings: every one decodes to distributions at any temperature; quantised margins stay close."""

from __future__ import annotations

import numpy as np
import pytest

from core.store.encoding import DEFAULT_ENCODING, ENCODINGS, get_encoding, kl_per_voxel, softmax


def _teacher_like_logits(num_classes: int, seed: int = 0) -> np.ndarray:
    """Mostly confident background with a few uncertain and confident foreground voxels, like a segmentation."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, (num_classes, 16, 16, 16)).astype(np.float32)
    z[0] += 12.0
    blob = (slice(None), slice(4, 9), slice(4, 9), slice(4, 9))
    z[1:][blob[1:]] += rng.normal(14.0, 4.0, z[1:][blob[1:]].shape)
    return z


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@pytest.mark.parametrize("num_classes", [2, 3])
def test_every_encoding_decodes_to_distributions(name, num_classes):
    enc = ENCODINGS[name]
    z = _teacher_like_logits(num_classes)
    stored = enc.encode(z)
    assert stored.dtype == np.dtype(enc.dtype) and stored.shape[0] == enc.channels(num_classes)
    for t in (1.0, 2.0, 4.0):
        p = enc.decode(stored, t)
        assert p.shape == z.shape and np.allclose(p.sum(0), 1.0, atol=1e-5)
        assert (p.argmax(0) == softmax(z / t).argmax(0)).mean() > 0.99


@pytest.mark.parametrize(
    "name", ["logprob-float16", "margin-float16", "margin-int16-c20", "margin-uint8-c16"]
)
def test_retempering_from_the_cache_matches_float32_logits(name):
    enc = ENCODINGS[name]
    z = _teacher_like_logits(2)
    stored = enc.encode(z)
    for t in (1.0, 2.0, 4.0):
        assert kl_per_voxel(softmax(z / t), enc.decode(stored, t)) < 1e-4, (name, t)


def test_margin_quantisation_error_is_half_a_step():
    enc = ENCODINGS["margin-uint8-c16"]
    z = np.zeros((2, 1000), np.float32)
    z[1] = np.random.default_rng(1).uniform(-15.9, 15.9, 1000)  # margins inside the ±16 clip
    scores = enc.log_scores(enc.encode(z))
    error = np.abs((scores[1] - scores[0]) - (z[1] - z[0]))
    assert error.max() <= 0.5 / enc.scale + 1e-5


def test_uint8_probabilities_saturate_where_margins_do_not():
    """The lesson from earlier systems: quantised probabilities lose the tail that KD at T > 1 relies on."""
    z = _teacher_like_logits(2)
    p4 = softmax(z / 4.0)
    prob = ENCODINGS["prob-uint8"]
    margin = ENCODINGS["margin-uint8-c16"]
    kl_prob = kl_per_voxel(p4, prob.decode(prob.encode(z), 4.0))
    kl_margin = kl_per_voxel(p4, margin.decode(margin.encode(z), 4.0))
    assert kl_prob > 10 * kl_margin


def test_default_and_unknown():
    assert get_encoding(DEFAULT_ENCODING).name == DEFAULT_ENCODING
    with pytest.raises(ValueError, match="unknown softmax encoding"):
        get_encoding("jpeg")


MARGIN_ENCODINGS = sorted(n for n, e in ENCODINGS.items() if e.kind.startswith("margin"))


@pytest.mark.parametrize("name", MARGIN_ENCODINGS)
@pytest.mark.parametrize(
    "logits",
    [(-30.0, 30.0, 0.0), (-20.0, 15.0, 5.0), (-40.0, 10.0, 9.0, -5.0), (3.0, -30.0, 2.5)],
)
def test_margins_keep_the_order_of_foreground_classes_far_above_background(name, logits):
    # a multi-organ teacher: background far below two competing organs; clipping each margin against
    # background one by one decoded (-30, 30, 0) as 50/50 between the two organs (KL 0.69 at every T)
    enc = ENCODINGS[name]
    z = np.array(logits, np.float32).reshape(-1, 1, 1, 1)
    stored = enc.encode(z)
    # the documented clip: classes more than `clip` nats below the top count as exactly `clip` below
    floored = np.maximum(z, z.max(0, keepdims=True) - enc.clip)
    for t in (1.0, 2.0, 4.0):
        p, q = softmax(floored / t), enc.decode(stored, t)
        assert q.argmax(0) == p.argmax(0)
        # worst single voxel: half a quantisation step (0.11 nats for asinh near 0) between two close classes
        # costs up to p(1 − p)/2 · 0.11² ≈ 1.5e-3
        assert kl_per_voxel(p, q) < 2e-3, (name, logits, t, kl_per_voxel(p, q))
        if name == DEFAULT_ENCODING:
            assert kl_per_voxel(softmax(z / t), q) < 2e-3
    scores = enc.log_scores(stored)[:, 0, 0, 0]
    top = int(np.argmax(z))
    near = [k for k in range(len(logits)) if z.ravel()[top] - z.ravel()[k] < 12]  # classes that matter
    order = sorted(near, key=lambda k: -z.ravel()[k])
    assert sorted(near, key=lambda k: -scores[k]) == order, "every class near the top keeps its order"


def _organ_logits(num_classes: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """A 14-class-like teacher: confident background outside, organs in overlapping slabs where two compete."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, (num_classes, n, n, n)).astype(np.float32)
    z[0] += 12.0
    for k in range(1, num_classes):
        slab = slice((k - 1) * n // num_classes, (k + 1) * n // num_classes)
        z[k][slab] += rng.normal(25.0, 5.0, z[k][slab].shape)
        z[0][slab] -= 10.0
    return z


def test_default_encoding_serves_a_14_class_teacher():
    enc = get_encoding(DEFAULT_ENCODING)
    z = _organ_logits(14)
    stored = enc.encode(z)
    assert stored.shape[0] == 13
    legacy = get_encoding(DEFAULT_ENCODING, reference="background")
    for t in (1.0, 2.0, 4.0):
        p = softmax(z / t)
        kl = kl_per_voxel(p, enc.decode(stored, t))
        assert kl < 1e-3, (t, kl)
        assert (enc.decode(stored, t).argmax(0) == p.argmax(0)).mean() > 0.99
        # what format 1.2 lost on the same teacher
        assert kl_per_voxel(p, legacy.decode(legacy.encode(z), t)) > 50 * kl


@pytest.mark.parametrize("name", MARGIN_ENCODINGS)
def test_two_class_margins_are_unchanged_by_the_reference(name):
    # binary stores keep their bytes: against the top class or against background is the same margin for K = 2
    z = _teacher_like_logits(2)
    assert np.array_equal(ENCODINGS[name].encode(z), get_encoding(name, "background").encode(z))


def test_stores_of_format_1_2_decode_with_the_background_reference(tmp_path):
    import zarr

    from core.store.teacher_store import TeacherStore

    z = _organ_logits(4, n=8)
    legacy = get_encoding(DEFAULT_ENCODING, reference="background")
    store = TeacherStore.create(
        tmp_path / "s.zarr",
        dataset={"manifest_hash": "x", "channel_names": ["CT"], "class_names": list("abcd")},
        preprocessing={},
        preprocessing_hash="h",
        splits=[],
    )
    store.write_case(
        "c", np.zeros((1, 8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8), np.zeros((0, 4), np.int32), {}
    )
    store.write_entry("t", "c", z, np.ones((1, 1, 1), np.float32), np.ones((4, 4, 4), np.float32))
    assert kl_per_voxel(softmax(z), TeacherStore.open(tmp_path / "s.zarr").read_softmax("t", "c")) < 1e-3
    # rewrite the entry as a 1.2 writer did: background-referenced margins, no margin_reference attribute
    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="a")["teachers/t/c/softmax"]
    arr[...] = legacy.encode(z)
    attrs = dict(arr.attrs)
    attrs.pop("margin_reference")
    arr.attrs.clear()
    arr.attrs.update(attrs)
    assert np.allclose(
        TeacherStore.open(tmp_path / "s.zarr").read_softmax("t", "c"),
        legacy.decode(legacy.encode(z)),
        atol=1e-6,
    )


def test_the_store_format_documents_a_decoder_that_works(tmp_path):
    """docs/store-format.md's plain-zarr decoding snippet gives the store's own probabilities."""
    import re
    from pathlib import Path

    from core.store.teacher_store import TeacherStore

    doc = (Path(__file__).parents[1] / "docs" / "store-format.md").read_text()
    snippet = re.search(r"Decoding the default encoding.*?```python\n(.*?)```", doc, re.S).group(1)
    z = _organ_logits(4, n=8)
    store = TeacherStore.create(
        tmp_path / "s.zarr",
        dataset={"manifest_hash": "x", "channel_names": ["CT"], "class_names": list("abcd")},
        preprocessing={},
        preprocessing_hash="h",
        splits=[],
    )
    store.write_case(
        "SYNPETCT_000",
        np.zeros((1, 8, 8, 8), np.float32),
        np.zeros((8, 8, 8), np.uint8),
        np.zeros((0, 4), np.int32),
        {},
    )
    store.write_entry(
        "unetr/fold_0", "SYNPETCT_000", z, np.ones((1, 1, 1), np.float32), np.ones((4, 4, 4), np.float32)
    )
    scope: dict = {}
    exec(snippet.replace("runs/demo/store.zarr", str(tmp_path / "s.zarr")), scope)
    expected = TeacherStore.open(tmp_path / "s.zarr").read_softmax(
        "unetr/fold_0", "SYNPETCT_000", temperature=2.0
    )
    assert np.allclose(scope["p"], expected, atol=1e-5)
