"""Training patches: every cached teacher map follows the image and label through crop, flips and rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data.patches import EpochSampler, PatchDataset, TargetRequest, crop_map
from core.data.preprocessing import foreground_locations
from core.store.teacher_store import TeacherStore


def test_crop_map_is_exact_on_aligned_patches():
    amap = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    out = crop_map(amap, (8.0, 8.0, 8.0), start=(8, 0, 16), size=(16, 16, 16))
    assert out.shape == (1, 2, 2, 2)
    assert np.allclose(out[0].numpy(), amap[1:3, 0:2, 2:4], atol=1e-4)
    half = crop_map(amap, (8.0, 8.0, 8.0), start=(4, 0, 0), size=(16, 16, 16))
    assert half[0, 0, 0, 0].item() == pytest.approx((amap[0, 0, 0] + amap[1, 0, 0]) / 2)


@pytest.fixture
def labelled_store(tmp_path):
    """A store whose teacher 'oracle' has softmax = one-hot(label) and maps = label pooled to its grid."""
    rng = np.random.default_rng(0)
    shape = (64, 64, 64)
    label = np.zeros(shape, np.uint8)
    label[10:30, 20:50, 5:25] = 1
    label[40:60, 8:20, 30:60] = 1
    image = np.stack([label + rng.normal(0, 0.1, shape), rng.normal(0, 1, shape)]).astype(np.float32)
    store = TeacherStore.create(
        tmp_path / "s.zarr",
        dataset={"name": "t", "channel_names": ["A", "B"], "class_names": ["bg", "fg"], "manifest_hash": "m"},
        preprocessing={},
        preprocessing_hash="h",
        splits=[],
        chunk_size=(32, 32, 32),
    )
    store.write_case("c", image, label, foreground_locations(label), {})
    logits = np.stack([(label == 0), (label == 1)]).astype(np.float32) * 30 - 15
    pooled = label.reshape(4, 16, 4, 16, 4, 16).mean(axis=(1, 3, 5)).astype(np.float32)
    fine = label.reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5)).astype(np.float32)
    store.write_entry("oracle", "c", logits, pooled, fine)
    return tmp_path / "s.zarr"


def test_maps_follow_image_and_label_through_augmentation(labelled_store):
    ds = PatchDataset(
        labelled_store,
        ["c"],
        (32, 32, 32),
        length=24,
        foreground_oversampling=0.5,
        seed=1,
        targets=TargetRequest(("oracle",), temperature=2.0),
    )
    for i in range(len(ds)):
        s = ds[i]
        label = s["label"][0]
        assert torch.equal(s["softmax/oracle"].argmax(0), label), "softmax cropped and flipped with the label"
        assert torch.allclose(
            s["softmax/oracle"].sum(0), torch.ones_like(label, dtype=torch.float32), atol=1e-4
        )
        assert torch.equal((s["image"][0] > 0.5).long(), label), "image stays aligned with the label"
        fine = s["fine/oracle"][0]
        pooled = label.float().reshape(16, 2, 16, 2, 16, 2).mean(dim=(1, 3, 5))
        assert fine.shape == (16, 16, 16)
        if pooled.max() > 0:  # maps are stored at unit RMS: compare shapes, not scales
            error = (fine / fine.max() - pooled / pooled.max()).abs().max()
            assert error < 0.51, "fine map matches the label on its grid (≤ half a voxel off)"
        assert s["coarse/oracle"].shape == (1, 2, 2, 2)


def test_patches_depend_only_on_seed_epoch_and_index(labelled_store):
    a = PatchDataset(labelled_store, ["c"], (32, 32, 32), length=4, seed=5)
    b = PatchDataset(labelled_store, ["c"], (32, 32, 32), length=4, seed=5)
    assert torch.equal(a[2]["image"], b[2]["image"])
    b.set_epoch(1)
    assert not torch.equal(a[2]["image"], b[2]["image"])


def test_persistent_workers_draw_each_epochs_own_patches(labelled_store):
    """One DataLoader for the whole run, its worker kept alive: epoch e's batches are exactly set_epoch(e)'s."""
    from torch.utils.data import DataLoader

    ds = PatchDataset(labelled_store, ["c"], (32, 32, 32), length=4, seed=5)
    sampler = EpochSampler(len(ds))
    loader = DataLoader(
        ds,
        batch_size=2,
        sampler=sampler,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context="spawn",
    )
    reference = PatchDataset(labelled_store, ["c"], (32, 32, 32), length=4, seed=5)
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)  # the worker's copy of the dataset never sees set_epoch
        got = torch.cat([batch["image"] for batch in loader])
        reference.set_epoch(epoch)
        expected = torch.stack([reference[i]["image"] for i in range(4)])
        assert torch.equal(got, expected), f"epoch {epoch}"


def _aligned_sample():
    """A 32³ patch whose label, teacher softmax (one-hot, smoothed) and coarse map all come from one ball."""
    import torch.nn.functional as F

    g = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    ball = ((g - torch.tensor([12.0, 18.0, 15.0]).view(3, 1, 1, 1)) ** 2).sum(0) < 64
    label = ball[None].long()
    probs = torch.stack([~ball, ball]).float() * 0.9 + 0.05
    coarse = F.avg_pool3d(ball[None, None].float(), 4)[0]
    image = torch.cat([ball[None].float() * 2 - 1, torch.rand(1, 32, 32, 32)])
    return {"image": image, "label": label, "softmax/t": probs, "coarse/t": coarse}


def test_rotation_and_scaling_move_image_label_and_every_map_together():
    import torch.nn.functional as F

    from core.config import AugmentationConfig
    from core.data.patches import build_augmentation

    cfg = AugmentationConfig(flip=False, rotate90=False, rotate_degrees=30, scale=0.2, spatial_prob=1.0)
    augment = build_augmentation(["softmax/t", "coarse/t"], cfg, (32, 32, 32))
    augment.set_random_state(seed=3)
    before = _aligned_sample()
    out = augment(before)
    label = out["label"].as_tensor()[0]
    assert not torch.equal(label, before["label"][0]), "the patch was transformed"
    probs = out["softmax/t"].as_tensor()
    assert torch.allclose(probs.sum(0), torch.ones(32, 32, 32), atol=1e-5), "still distributions"
    assert (probs.argmax(0) == label).float().mean() > 0.98, "teacher softmax follows the label"
    assert ((out["image"].as_tensor()[0] > 0) == (label == 1)).float().mean() > 0.98, "image follows too"
    pooled = F.avg_pool3d(label[None, None].float(), 4)[0, 0]
    coarse = out["coarse/t"].as_tensor()[0]
    assert coarse.shape == (8, 8, 8)
    assert torch.corrcoef(torch.stack([pooled.flatten(), coarse.flatten()]))[0, 1] > 0.9, "coarse map follows"


def test_intensity_augmentation_touches_the_image_only():
    from core.config import AugmentationConfig
    from core.data.patches import build_augmentation

    cfg = AugmentationConfig(
        flip=False, rotate90=False, noise_std=0.5, gamma=(0.5, 2.0), shift=0.3, intensity_prob=1.0
    )
    augment = build_augmentation(["softmax/t", "coarse/t"], cfg, (32, 32, 32))
    augment.set_random_state(seed=4)
    before = _aligned_sample()
    out = augment({k: v.clone() for k, v in before.items()})
    assert not torch.allclose(torch.as_tensor(out["image"]), before["image"])
    for key in ("label", "softmax/t", "coarse/t"):
        assert torch.equal(torch.as_tensor(out[key]), before[key]), f"{key} untouched"


@pytest.mark.parametrize("stride", [2.0, 4.0, 16.0])
def test_a_map_cut_from_the_chunks_under_a_patch_equals_one_cut_from_the_whole(stride):
    """The loader reads only the part of a sketch's grid under the patch (one cell of margin) and cuts it; that is
    the whole-grid cut, at aligned and unaligned starts and at the case's borders."""
    from core.data.patches import _sketch_region

    rng = np.random.default_rng(0)
    grid = (int(96 // stride),) * 3
    amap = rng.standard_normal((5, *grid)).astype(np.float32)
    size = (32, 32, 32)
    for start in [(0, 0, 0), (64, 64, 64), (3, 17, 40), (8, 12, 63), (4, 0, 60)]:
        region, offset = _sketch_region((stride,) * 3, grid, start, size)
        whole = crop_map(amap, (stride,) * 3, start, size)
        part = crop_map(amap[(slice(None), *region)], (stride,) * 3, offset, size)
        assert torch.allclose(whole, part, atol=1e-4), (start, stride)


def test_teacher_features_are_rebuilt_from_sketch_and_basis_on_the_device():
    """targets_from_batch gives basis @ sketch per voxel: what the loader used to compute in its workers."""
    from core.data.patches import TargetRequest, targets_from_batch

    rng = np.random.default_rng(1)
    basis = torch.from_numpy(rng.standard_normal((2, 40, 4)).astype(np.float32))
    sketch = torch.from_numpy(rng.standard_normal((2, 4, 3, 5, 6)).astype(np.float32))
    batch = {
        "fine_sketch/t": sketch,
        "fine_basis/t": basis,
        "coarse_sketch/t": sketch,
        "coarse_basis/t": basis,
    }
    request = TargetRequest(teachers=("t",), softmax=False, attention=False, features=True)
    targets = targets_from_batch(batch, request, torch.device("cpu"))
    for b in range(2):
        expected = (basis[b] @ sketch[b].reshape(4, -1)).reshape(40, 3, 5, 6)
        assert torch.allclose(targets["fine_features"]["t"][b], expected, atol=1e-5)


@pytest.mark.parametrize(
    "terms,kinds",
    [
        ([("pwd", 1.0), ("afs", 1.0)], ["softmax", "coarse", "fine"]),
        ([("pwd", 1.0), ("affinity", 1.0), ("gram", 1.0)], ["softmax", "coarse_sketch", "fine_sketch"]),
        ([("ffd", 1.0), ("rgd", 1.0)], ["softmax", "coarse_features", "fine_features"]),
        ([("afs", 1.0), ("pwd", 0.0)], ["coarse", "fine"]),
        ([("pwd", 0.0)], []),
    ],
)
def test_a_recipes_request_carries_exactly_what_its_terms_read(terms, kinds):
    """TargetRequest.for_recipe follows core.terms.targets_needed: terms of weight 0 read nothing."""
    from core.terms import targets_needed

    request = TargetRequest.for_recipe(["a/fold_0", "b/all_folds"], 2.0, targets_needed(terms))
    assert request.kinds() == kinds
    assert request.teachers == ("a/fold_0", "b/all_folds") and request.temperature == 2.0
