"""Registered distillation terms and the ways several teachers are combined and weighted."""

from __future__ import annotations

import pytest
import torch

from core.config import DistillationConfig, TermConfig
from core.errors import ConfigError
from core.losses.distillation import TERMS, build_objective
from core.losses.distribution import DISTLoss

T = 2.0


def _targets(student: torch.Tensor, other: torch.Tensor) -> dict:
    """Teacher 'same' agrees with the student exactly (at T); teacher 'other' does not."""
    same = torch.softmax(student / T, 1)
    return {
        "softmax": {"same": same, "other": torch.softmax(other / T, 1)},
        "coarse": {"same": torch.rand(2, 1, 2, 2, 2), "other": torch.rand(2, 1, 1, 1, 1)},
        "fine": {"same": torch.rand(2, 1, 4, 4, 4), "other": torch.rand(2, 1, 4, 4, 4)},
    }


def _objective(name: str, **term: object):
    return build_objective(
        DistillationConfig(temperature=T, terms=[TermConfig(name=name, **term)]),
        teacher_dice={"same": 0.9, "other": 0.3},
    )


@pytest.mark.parametrize("name", ["pwd", "dkd", "cwd", "dist"])
def test_distribution_terms_vanish_on_agreement_and_pull_otherwise(name):
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    targets = _targets(student.detach(), torch.randn(2, 3, 4, 4, 4) * 3)
    agree = {"softmax": {"same": targets["softmax"]["same"]}}
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    objective = _objective(name)
    assert objective(student, label, None, agree)[name].item() == pytest.approx(0.0, abs=1e-5)
    value = objective(student, label, None, targets)[name]
    assert value.item() > 1e-4
    value.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_every_registered_term_is_covered():
    assert sorted(TERMS) == ["affinity", "afs", "cwd", "dist", "dkd", "ffd", "gram", "pwd", "region", "rgd"]


def test_dice_weights_follow_the_better_teacher():
    torch.manual_seed(1)
    student = torch.randn(2, 2, 4, 4, 4)
    targets = _targets(student, torch.randn(2, 2, 4, 4, 4) * 3)
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    uniform = _objective("pwd", combine="sum")(student, label, None, targets)["pwd"]
    dice = _objective("pwd", combine="sum", teacher_weights="dice")(student, label, None, targets)["pwd"]
    # 'same' (Dice 0.9) contributes 0: dice weighting leaves 0.3/1.2 of the 'other' loss instead of 1/2
    assert dice.item() == pytest.approx(uniform.item() * (0.3 / 1.2) / 0.5, rel=1e-5)


def test_confidence_weights_prefer_the_confident_teacher_per_voxel():
    student = torch.zeros(1, 2, 2, 2, 2)
    student[:, 0] = 8.0  # confident background
    confident = torch.softmax(student / T, 1)
    unsure = torch.full_like(confident, 0.5)
    targets = {"softmax": {"confident": confident, "unsure": unsure}}
    label = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    uniform = _objective("pwd", combine="sum")(student, label, None, targets)["pwd"]
    weighted = _objective("pwd", combine="sum", teacher_weights="confidence")(student, label, None, targets)[
        "pwd"
    ]
    assert 0 < weighted.item() < uniform.item()


def test_average_and_sum_agree_for_identical_teachers_and_differ_otherwise():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 4, 4, 4)
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    p = torch.softmax(torch.randn(2, 3, 4, 4, 4), 1)
    twins = {"softmax": {"a": p, "b": p}}
    avg = _objective("pwd", combine="average")(student, label, None, twins)["pwd"]
    tot = _objective("pwd", combine="sum")(student, label, None, twins)["pwd"]
    assert avg.item() == pytest.approx(tot.item(), rel=1e-5)
    pair = {"softmax": {"a": p, "b": torch.softmax(torch.randn(2, 3, 4, 4, 4) * 3, 1)}}
    avg = _objective("pwd", combine="average")(student, label, None, pair)["pwd"]
    tot = _objective("pwd", combine="sum")(student, label, None, pair)["pwd"]
    assert avg.item() < tot.item(), "KL is convex: the mixture's KL is at most the mean of the KLs"


def test_dist_hand_values():
    loss = DISTLoss(temperature=1.0, beta=1.0, gamma=0.0)
    pt = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1, 1)
    same_side = torch.log(torch.tensor([0.6, 0.4])).view(1, 2, 1, 1, 1)
    other_side = torch.log(torch.tensor([0.3, 0.7])).view(1, 2, 1, 1, 1)
    # over two classes a Pearson correlation is ±1: inter-class distance 0 or 2
    assert loss(same_side, pt).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(other_side, pt).item() == pytest.approx(2.0, abs=1e-6)


def test_invalid_term_settings_are_config_errors():
    with pytest.raises(
        ConfigError, match="distillation term 'afs': combine 'average' needs a distribution term"
    ):
        _objective("afs", combine="average")
    with pytest.raises(ConfigError, match=r"distillation term 'cwd'.*'uniform' or 'dice'"):
        _objective("cwd", teacher_weights="confidence")
    with pytest.raises(ConfigError, match=r"distillation term 'afs': p=3\.0 differs"):
        _objective("afs", args={"p": 3.0})
    with pytest.raises(ValueError, match="unknown distillation term 'hinton'"):
        TermConfig(name="hinton")


def _relation_targets(sketch: torch.Tensor, classes: torch.Tensor) -> dict:
    probs = torch.stack([(classes == 0).float(), (classes == 1).float()], 1) * 0.98 + 0.01
    return {"softmax": {"t": probs}, "fine_sketch": {"t": sketch}, "coarse_sketch": {"t": sketch}}


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("affinity", {}),
        ("gram", {"kernel": "linear"}),
        ("gram", {"kernel": "polynomial"}),
        ("gram", {"kernel": "rbf"}),
    ],
)
def test_relation_terms_ignore_channel_rotation_and_width(name, args):
    torch.manual_seed(3)
    sketch = torch.randn(2, 6, 4, 4, 4)
    classes = (torch.rand(2, 4, 4, 4) > 0.7).long()
    targets = _relation_targets(sketch, classes)
    objective = _objective(name, args={"taps": ["fine"], **args})
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    logits = torch.zeros(2, 2, 4, 4, 4)

    def value(student_features):
        return objective(logits, label, {"fine": student_features}, targets)[name].item()

    assert value(sketch) == pytest.approx(0.0, abs=1e-6), "zero when the student has the teacher's features"
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    rotated = torch.einsum("kc,bcxyz->bkxyz", rotation, sketch)
    assert value(rotated) == pytest.approx(0.0, abs=1e-5), "a rotated channel basis is the same relations"
    assert value(torch.cat([sketch, sketch], 1)) == pytest.approx(0.0, abs=1e-5), (
        "student width does not matter"
    )
    student = torch.randn(2, 9, 8, 8, 8, requires_grad=True)  # another width, on a finer grid (pooled)
    loss = objective(logits, label, {"fine": student}, targets)[name]
    assert loss.item() > 1e-3
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_affinity_weighs_within_and_between_class_pairs_equally():
    from core.losses.distillation import TermSettings
    from core.losses.relation import AffinityDistillation

    term = AffinityDistillation(TermSettings(temperature=1.0))
    student = torch.randn(1, 10, 4)
    teacher = torch.randn(1, 10, 3)
    classes = torch.tensor([[1] + [0] * 9])  # one foreground voxel: 18 of 100 pairs cross classes
    diff = (
        torch.nn.functional.normalize(student, dim=-1) @ torch.nn.functional.normalize(student, dim=-1).mT
        - torch.nn.functional.normalize(teacher, dim=-1) @ torch.nn.functional.normalize(teacher, dim=-1).mT
    ) ** 2
    same = (classes[:, :, None] == classes[:, None, :]).float()
    expected = 0.5 * ((diff * same).sum() / same.sum() + (diff * (1 - same)).sum() / (1 - same).sum())
    assert term.relation_loss(student, teacher, classes).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match="distillation term 'gram': kernel must be"):
        _objective("gram", args={"kernel": "sigmoid"})


def _feature_objective(name: str, student_width: int = 5, teacher_width: int = 7):
    channels = {
        "student": {"fine": student_width, "coarse": student_width},
        "teachers": {"t": {"fine": teacher_width, "coarse": teacher_width}},
    }
    return build_objective(
        DistillationConfig(temperature=T, terms=[TermConfig(name=name, args={"taps": ["fine"]})]),
        channels=channels,
    )


@pytest.mark.parametrize("name", ["ffd", "rgd"])
def test_mskd_terms_vanish_when_projected_student_matches_and_train_the_projection(name):
    torch.manual_seed(4)
    objective = _feature_objective(name, student_width=7, teacher_width=7)
    projection = objective.terms[0].projections["t__fine"]
    with torch.no_grad():  # make the learnable projection the identity
        projection.weight.copy_(torch.eye(7).view(7, 7, 1, 1, 1))
        projection.bias.zero_()
    teacher = torch.randn(2, 7, 4, 4, 4)
    classes = (torch.rand(2, 4, 4, 4) > 0.6).long()
    probs = torch.stack([(classes == 0).float(), (classes == 1).float()], 1) * 0.9 + 0.05
    targets = {"softmax": {"t": probs}, "fine_features": {"t": teacher}}
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    logits = torch.zeros(2, 2, 4, 4, 4)
    assert objective(logits, label, {"fine": teacher}, targets)[name].item() == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(2, 7, 4, 4, 4, requires_grad=True)
    loss = objective(logits, label, {"fine": student}, targets)[name]
    assert loss.item() > 1e-3
    loss.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0, "projection learns"
    assert torch.isfinite(student.grad).all()


def test_feature_filtering_ignores_the_background():
    objective = _feature_objective("ffd", 7, 7)
    projection = objective.terms[0].projections["t__fine"]
    with torch.no_grad():
        projection.weight.copy_(torch.eye(7).view(7, 7, 1, 1, 1))
        projection.bias.zero_()
    teacher = torch.randn(1, 7, 4, 4, 4)
    probs = torch.zeros(1, 2, 4, 4, 4)
    probs[:, 0] = 1.0
    probs[:, :, :2] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)  # foreground = first two slices
    student = teacher.clone()
    student[:, :, 2:] = torch.randn(1, 7, 2, 4, 4)  # differ only in the background
    targets = {"softmax": {"t": probs}, "fine_features": {"t": teacher}}
    args = (torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long))
    assert objective(*args, {"fine": student}, targets)["ffd"].item() == pytest.approx(0.0, abs=1e-6)
    student[:, :, :2] = torch.randn(1, 7, 2, 4, 4)
    assert objective(*args, {"fine": student}, targets)["ffd"].item() > 1e-3


def test_feature_terms_need_the_tap_widths():
    with pytest.raises(
        ConfigError, match="distillation term 'ffd': needs the student's and teachers' tap channels"
    ):
        build_objective(DistillationConfig(terms=[TermConfig(name="ffd")]))


def _background_only_targets(teacher: torch.Tensor) -> dict:
    # a confident background teacher (logits 6–10 vs 0) as the store serves it at T = 2: p_fg ≈ 0.007–0.05 per
    # voxel, about 1.3 voxels' worth of "foreground" mass over a 4³ patch — yet it predicts no foreground at all
    logits = torch.zeros(1, 2, 4, 4, 4)
    logits[:, 0] = 6.0 + 4.0 * torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return {"softmax": {"t": torch.softmax(logits / T, dim=1)}, "fine_features": {"t": teacher}}


def _identity_projection(objective) -> None:
    projection = objective.terms[0].projections["t__fine"]
    with torch.no_grad():
        projection.weight.copy_(torch.eye(7).view(7, 7, 1, 1, 1))
        projection.bias.zero_()


def test_feature_filtering_is_zero_on_a_patch_without_predicted_foreground():
    torch.manual_seed(5)
    objective = _feature_objective("ffd", 7, 7)
    _identity_projection(objective)
    teacher = torch.randn(1, 7, 4, 4, 4)
    student = torch.randn(1, 7, 4, 4, 4)  # differs everywhere
    targets = _background_only_targets(teacher)
    args = (torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long))
    assert objective(*args, {"fine": student}, targets)["ffd"].item() == 0.0
    # one predicted foreground voxel in a cell of 8 (fine grid 2³ over the 4³ patch) counts as 1/8 of a cell
    targets["softmax"]["t"][0, :, 0, 0, 0] = torch.tensor([0.2, 0.8])
    coarse_teacher = torch.randn(1, 7, 2, 2, 2)
    coarse_student = torch.randn(1, 7, 2, 2, 2)
    targets["fine_features"]["t"] = coarse_teacher
    d = (
        (
            torch.nn.functional.normalize(coarse_student, dim=1)
            - torch.nn.functional.normalize(coarse_teacher, dim=1)
        )
        .pow(2)
        .sum(1)
    )
    expected = (1 / 8) * d[0, 0, 0, 0] / 1.0  # mask mass 1/8 < 1 → normalised by 1
    assert objective(*args, {"fine": coarse_student}, targets)["ffd"].item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_region_graph_has_no_foreground_node_without_predicted_foreground():
    torch.manual_seed(6)
    objective = _feature_objective("rgd", 7, 7)
    _identity_projection(objective)
    teacher = torch.randn(1, 7, 4, 4, 4)
    student = torch.randn(1, 7, 4, 4, 4)
    targets = _background_only_targets(teacher)
    args = (torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long))
    # background is the only node: L = ‖P̂_s,bg − P̂_t,bg‖², no edge
    proto_s = torch.nn.functional.normalize(student.flatten(2).mean(2), dim=1)
    proto_t = torch.nn.functional.normalize(teacher.flatten(2).mean(2), dim=1)
    expected = (proto_s - proto_t).pow(2).sum()
    assert objective(*args, {"fine": student}, targets)["rgd"].item() == pytest.approx(
        expected.item(), rel=1e-5
    )
