"""Feature sketches: exact for low-rank features, and the measured relation errors mean what they say."""

from __future__ import annotations

import numpy as np

from core.store.sketch import relation_errors, sketch_features


def test_sketch_is_exact_when_k_covers_the_rank():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(32, 3))
    features = (basis @ rng.normal(size=(3, 8 * 8 * 8))).reshape(32, 8, 8, 8)
    sketch, basis, attrs = sketch_features(features, 4)
    assert sketch.shape == (4, 8, 8, 8) and attrs["channels_in"] == 32 and attrs["energy"] > 0.999999
    assert basis.shape == (32, 4) and np.allclose(basis.T @ basis, np.eye(4), atol=1e-5)
    rebuilt = (basis @ sketch.reshape(4, -1)).reshape(features.shape)
    assert np.allclose(rebuilt, features, atol=1e-3 * np.abs(features).max()), (
        "basis @ sketch rebuilds features"
    )
    classes = (np.arange(512) % 3).reshape(8, 8, 8)
    errors = relation_errors(features, sketch, classes)
    assert errors["voxel_cosine"] < 1e-5 and errors["prototype_cosine"] < 1e-5


def test_sketch_of_full_rank_noise_loses_relations_and_says_so():
    features = np.random.default_rng(1).normal(size=(64, 8, 8, 8))
    sketch, _, attrs = sketch_features(features, 4)
    assert attrs["energy"] < 0.3
    assert relation_errors(features, sketch)["voxel_cosine"] > 0.3


def test_fewer_channels_than_k_keeps_them_all():
    features = np.random.default_rng(2).normal(size=(3, 4, 4, 4))
    sketch, _, attrs = sketch_features(features, 16)
    assert sketch.shape[0] == 3 and attrs["energy"] > 0.999999
    assert relation_errors(features, sketch)["voxel_cosine"] < 1e-6
