"""Loss terms on tiny hand-computed tensors, their minima, invariances and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from core.config import DistillationConfig, TermConfig
from core.losses.attention import AttentionTransferLoss, normalise_map
from core.losses.distillation import build_objective
from core.losses.distribution import PixelwiseKDLoss
from core.losses.segmentation import SegmentationLoss


def test_pixelwise_kd_matches_hand_computed_value():
    # one voxel, two classes: teacher (0.8, 0.2); student logits (0, 0) -> uniform at any T
    teacher = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1, 1)
    student = torch.zeros(1, 2, 1, 1, 1)
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert PixelwiseKDLoss(1.0)(student, teacher).item() == pytest.approx(kl, rel=1e-5)
    assert PixelwiseKDLoss(2.0)(student, teacher).item() == pytest.approx(4 * kl, rel=1e-5), "T² scaling"


def test_pixelwise_kd_is_zero_iff_distributions_match():
    logits = torch.randn(2, 3, 4, 4, 4)
    for t in (1.0, 2.0, 4.0):
        teacher = torch.softmax(logits / t, 1)
        assert PixelwiseKDLoss(t)(logits, teacher).item() == pytest.approx(0.0, abs=1e-6)
        assert PixelwiseKDLoss(t)(logits + torch.randn_like(logits), teacher).item() > 1e-3
    with pytest.raises(ValueError, match="temperature"):
        PixelwiseKDLoss(0.0)


def test_attention_transfer_hand_value_and_minimum():
    at = AttentionTransferLoss(p=2.0, norm="l2")
    # student features with one channel: map = F²; teacher map equal to it -> 0
    feats = torch.rand(2, 1, 2, 2, 2) + 0.1
    assert at(feats, feats.pow(2)).item() == pytest.approx(0.0, abs=1e-7)
    # two orthogonal one-hot maps: ||a - b||² = 2
    s = torch.zeros(1, 1, 2, 1, 1)
    s[0, 0, 0] = 1.0
    t = torch.zeros(1, 1, 2, 1, 1)
    t[0, 0, 1] = 1.0
    assert at(s, t).item() == pytest.approx(2.0, rel=1e-6)


def test_attention_transfer_is_channel_and_scale_agnostic():
    at = AttentionTransferLoss()
    base = torch.rand(1, 1, 4, 4, 4)
    teacher = torch.rand(1, 1, 4, 4, 4)
    wide = base.expand(1, 16, 4, 4, 4)  # 16 identical channels: same channel mean
    assert at(base, teacher).item() == pytest.approx(at(wide, teacher).item(), rel=1e-5)
    assert at(base, teacher).item() == pytest.approx(at(base, 7.0 * teacher).item(), rel=1e-5)
    # a student map on a finer grid is pooled onto the teacher's grid
    fine = base.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert at(fine.sqrt(), base).item() == pytest.approx(0.0, abs=1e-6)


def test_l1_normalisation():
    v = normalise_map(torch.tensor([[1.0, 3.0]]), "l1")
    assert torch.allclose(v, torch.tensor([[0.25, 0.75]]))


def test_teachformer_terms_gradients_and_kind_none():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
    label = (torch.rand(2, 1, 8, 8, 8) > 0.8).long()
    taps = {
        "coarse": torch.randn(2, 5, 1, 1, 1, requires_grad=True),
        "fine": torch.randn(2, 3, 4, 4, 4, requires_grad=True),
    }
    targets = {
        "softmax": {
            "a": torch.softmax(torch.randn(2, 2, 8, 8, 8), 1),
            "b": torch.softmax(torch.randn(2, 2, 8, 8, 8), 1),
        },
        "coarse": {"a": torch.rand(2, 1, 1, 1, 1), "b": torch.rand(2, 1, 1, 1, 1)},
        "fine": {"a": torch.rand(2, 1, 4, 4, 4), "b": torch.rand(2, 1, 2, 2, 2)},
    }
    loss = build_objective(
        DistillationConfig(terms=[TermConfig(name="pwd", weight=0.5), TermConfig(name="afs", weight=2.0)])
    )
    terms = loss(logits, label, taps, targets)
    assert set(terms) == {"seg", "pwd", "afs", "afs_coarse", "afs_fine", "total"}
    expected = terms["seg"] + 0.5 * terms["pwd"] + 2.0 * 0.5 * (terms["afs_coarse"] + terms["afs_fine"])
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["total"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(taps["fine"].grad).all() and taps["fine"].grad.abs().sum() > 0
    plain = build_objective(DistillationConfig(kind="none"))(logits, label)
    assert (
        set(plain) == {"seg", "total"} and not build_objective(DistillationConfig(kind="none")).uses_teachers
    )


def test_segmentation_loss_is_low_for_a_perfect_prediction():
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., 2:5, 2:5, 2:5] = 1
    perfect = torch.cat([(label == 0).float(), (label == 1).float()], 1) * 20 - 10
    assert SegmentationLoss()(perfect, label).item() < 0.01
    assert SegmentationLoss()(-perfect, label).item() > 0.9


def test_segmentation_loss_depends_on_the_softmax_only():
    # the same constant added to every class's logit at a voxel leaves the softmax, hence L_SEG, unchanged
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6)
    label = torch.randint(0, 3, (2, 1, 6, 6, 6))
    shift = 25.0 * torch.randn(2, 1, 6, 6, 6)
    seg = SegmentationLoss()
    assert seg(logits + shift, label).item() == pytest.approx(seg(logits, label).item(), rel=1e-5)
    # and the background logit gets a gradient from the focal part, not only from Dice
    z = logits.clone().requires_grad_(True)
    seg.focal_part(z, label).backward()
    assert z.grad[:, 0].abs().sum() > 0


def test_focal_part_matches_hand_computed_two_class_value():
    # two voxels, two classes, gamma 2: FL = mean_x −(1 − p_y)² log p_y with p = softmax over both classes
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5]]).T.reshape(
        1, 2, 2, 1, 1
    )  # voxel 0: (2, 0), voxel 1: (0.5, 1.5)
    label = torch.tensor([0, 1]).reshape(1, 1, 2, 1, 1)
    p0 = 1 / (1 + math.exp(-2.0))  # p(class 0) at voxel 0
    p1 = 1 / (1 + math.exp(-1.0))  # p(class 1) at voxel 1
    expected = (-((1 - p0) ** 2) * math.log(p0) - ((1 - p1) ** 2) * math.log(p1)) / 2
    seg = SegmentationLoss(gamma=2.0)
    assert seg.focal_part(logits, label).item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01, "the focal part of a two-class problem must not vanish"
    # gamma 0 is cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0])
    assert SegmentationLoss(gamma=0.0).focal_part(logits, label).item() == pytest.approx(ce.item(), rel=1e-5)
