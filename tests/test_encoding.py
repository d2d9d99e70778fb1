"""Softmax encodings: every one decodes to distributions at any temperature; quantised margins stay close."""

from __future__ import annotations

import numpy as np
import pytest

from core.encoding import DEFAULT_ENCODING, ENCODINGS, get_encoding, kl_per_voxel, softmax


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
