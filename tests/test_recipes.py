"""Issue 24's recipes, each against an independent float64 implementation (or the authors' code): class-balanced and
teacher-error-masked per-voxel KD, decoupled KD (mdistiller's ``dkd_loss``), region-level KD; the warm-up ramp, the
automatic balance and the gradient health check — in the objective, and through `teachcache distil` as users run it."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.config import BalanceConfig, DistillationConfig, TermConfig
from core.errors import ConfigError
from core.losses.distillation import build_objective
from core.losses.distribution import DecoupledKDLoss
from core.training.health import TermHealth
from teachcache.cli import app
from tests.conftest import derived_config

T = 2.0
runner = CliRunner()


def _objective(name: str, balance: BalanceConfig | None = None, weight: float = 1.0, **term: object):
    cfg = DistillationConfig(temperature=T, terms=[TermConfig(name=name, weight=weight, **term)])
    if balance is not None:
        cfg = cfg.model_copy(update={"balance": balance})
    return build_objective(cfg, teacher_dice={"a": 0.9, "b": 0.6})


def _case(seed: int = 0, k: int = 4, shape=(2, 5, 6, 7)):
    """Student logits, teacher logits (two teachers) and their T-tempered distributions, and a label."""
    g = torch.Generator().manual_seed(seed)
    b, *space = shape
    student = torch.randn(b, k, *space, generator=g, dtype=torch.float64)
    teachers = {t: torch.randn(b, k, *space, generator=g, dtype=torch.float64) * 2 for t in "ab"}
    label = torch.randint(0, k, (b, 1, *space), generator=g)
    label[0, 0, :2] = 0  # make background the largest class, as in a real patch
    return student, teachers, label


def _tempered(teachers):
    return {t: torch.softmax(z / T, 1).float() for t, z in teachers.items()}


def _kl64(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """T² KL(target ‖ softmax(student / T)) per voxel, (B, X, Y, Z), float64."""
    target = target.double()
    return (
        T
        * T
        * (target * (torch.log(target.clamp_min(1e-300)) - F.log_softmax(student.double() / T, 1))).sum(1)
    )


def _balanced64(per_voxel: torch.Tensor, regions: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean of ``per_voxel`` within each class region (weights ``keep``), then over the classes with any weight."""
    means = []
    for c in regions.unique().tolist():
        inside = (regions == c).double() * keep
        if inside.sum() > 0:
            means.append(float((per_voxel * inside).sum() / inside.sum()))
    return sum(means) / len(means) if means else 0.0


# --- class-balanced and masked pixel-wise KD -------------------------------------------------------------------------


@pytest.mark.parametrize("regions", ["label", "teacher"])
@pytest.mark.parametrize("error_weight", [None, 0.0, 0.25])
def test_class_balanced_pwd_is_the_mean_over_classes_of_the_mean_within_each(regions, error_weight):
    student, teachers, label = _case()
    probs = _tempered(teachers)
    args = {"balance": "class", "regions": regions}
    if error_weight is not None:
        args["error_weight"] = error_weight
    out = _objective("pwd", args=args)(student.float(), label, None, {"softmax": probs})
    mixed = (probs["a"].double() + probs["b"].double()) / 2
    argmax = mixed.argmax(1)
    keep = torch.ones_like(argmax, dtype=torch.float64)
    if error_weight is not None:
        keep = torch.where(argmax != label[:, 0], error_weight, 1.0).double()
        assert out["stat_pwd_masked"].item() == pytest.approx(float((argmax != label[:, 0]).double().mean()))
    else:
        assert "stat_pwd_masked" not in out
    expected = _balanced64(_kl64(student, mixed), label[:, 0] if regions == "label" else argmax, keep)
    assert out["pwd"].item() == pytest.approx(expected, rel=1e-5)


def test_masking_with_voxel_balance_is_the_weighted_mean_of_the_kept_voxels():
    student, teachers, label = _case(1)
    probs = _tempered(teachers)
    out = _objective("pwd", args={"error_weight": 0.0}, combine="sum")(
        student.float(), label, None, {"softmax": probs}
    )
    mixed = (probs["a"].double() + probs["b"].double()) / 2
    keep = (mixed.argmax(1) == label[:, 0]).double()
    expected = sum(0.5 * float((_kl64(student, probs[t]) * keep).sum() / keep.sum()) for t in "ab")
    assert out["pwd"].item() == pytest.approx(expected, rel=1e-5)


def test_the_papers_pwd_is_unchanged_by_the_new_options():
    student, teachers, label = _case(2)
    probs = _tempered(teachers)
    plain = _objective("pwd")(student.float(), label, None, {"softmax": probs})["pwd"]
    mixed = (probs["a"].double() + probs["b"].double()) / 2
    assert plain.item() == pytest.approx(float(_kl64(student, mixed).mean()), rel=1e-6)


def test_a_patch_without_foreground_falls_back_to_the_voxel_mean():
    student, teachers, _ = _case(3)
    probs = _tempered(teachers)
    background = torch.zeros(2, 1, 5, 6, 7, dtype=torch.long)
    balanced = _objective("pwd", args={"balance": "class"})(
        student.float(), background, None, {"softmax": probs}
    )
    plain = _objective("pwd")(student.float(), background, None, {"softmax": probs})
    assert balanced["pwd"].item() == pytest.approx(plain["pwd"].item(), rel=1e-5)


def test_a_class_no_teacher_predicts_is_left_out_of_teacher_regions():
    student, teachers, label = _case(4)
    teachers["a"][:, 3] -= 50  # class 3 absent from every teacher's argmax
    teachers["b"][:, 3] -= 50
    probs = _tempered(teachers)
    out = _objective("pwd", args={"balance": "class", "regions": "teacher"})(
        student.float(), label, None, {"softmax": probs}
    )
    mixed = (probs["a"].double() + probs["b"].double()) / 2
    assert 3 not in mixed.argmax(1).unique().tolist()
    expected = _balanced64(_kl64(student, mixed), mixed.argmax(1), torch.ones_like(mixed[:, 0]))
    assert out["pwd"].item() == pytest.approx(expected, rel=1e-5)


def test_teachers_wrong_everywhere_give_zero_and_a_finite_gradient():
    student, teachers, _ = _case(5)
    probs = _tempered(teachers)
    mixed = (probs["a"] + probs["b"]) / 2
    wrong = ((mixed.argmax(1, keepdim=True) + 1) % 4).long()
    logits = student.float().requires_grad_()
    out = _objective("pwd", args={"balance": "class", "error_weight": 0.0})(
        logits, wrong, None, {"softmax": probs}
    )
    assert out["pwd"].item() == 0.0 and out["stat_pwd_masked"].item() == 1.0
    out["total"].backward()
    assert torch.isfinite(logits.grad).all()


# --- decoupled KD -----------------------------------------------------------------------------------------------------


def _mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's ``dkd_loss`` (megvii-research/mdistiller, mdistiller/distillers/DKD.py), as published, on rows."""

    def _get_gt_mask(logits, target):
        target = target.reshape(-1)
        return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()

    def _get_other_mask(logits, target):
        target = target.reshape(-1)
        return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).reshape(-1, x.shape[1])


@pytest.mark.parametrize("alpha, beta", [(1.0, 8.0), (0.5, 1.0)])
def test_dkd_equals_the_authors_code_per_voxel(alpha, beta):
    student, teachers, label = _case(6)
    probs = _tempered(teachers)
    out = _objective("dkd", args={"alpha": alpha, "beta": beta}, teacher_weights="dice")(
        student.float(), label, None, {"softmax": probs}
    )
    # the teachers mixed by their Dice (0.9, 0.6); mdistiller takes logits: T·log of the mixed distribution
    mixed = (0.9 * probs["a"].double() + 0.6 * probs["b"].double()) / 1.5
    reference = _mdistiller_dkd(
        _rows(student), _rows(T * torch.log(mixed)), label.reshape(-1), alpha, beta, T
    )
    assert out["dkd"].item() == pytest.approx(float(reference), rel=1e-4)


def test_classical_kd_is_tckd_plus_nckd_weighted_by_the_teachers_non_target_mass():
    student, teachers, label = _case(7)
    pt = torch.softmax(teachers["a"] / T, 1)
    tckd = DecoupledKDLoss(T, 1.0, 0.0).per_voxel(student, pt, label)[:, 0]
    nckd = DecoupledKDLoss(T, 0.0, 1.0).per_voxel(student, pt, label)[:, 0]
    t_target = pt.gather(1, label)[:, 0]
    assert torch.allclose(_kl64(student, pt), tckd + (1 - t_target) * nckd, atol=1e-9)


def test_dkd_of_two_classes_is_its_target_term_alone():
    student, teachers, label = _case(8, k=2)
    pt = torch.softmax(teachers["a"] / T, 1)
    nckd = DecoupledKDLoss(T, 0.0, 1.0).per_voxel(student, pt, label)
    assert nckd.abs().max().item() < 1e-12
    tckd = DecoupledKDLoss(T, 1.0, 0.0)(student, pt, label)
    assert tckd.item() == pytest.approx(float(_kl64(student, pt).mean()), rel=1e-6)


def test_dkd_class_balanced_weighs_voxels_like_pwd():
    student, teachers, label = _case(9)
    probs = _tempered(teachers)
    out = _objective("dkd", args={"balance": "class", "beta": 2.0})(
        student.float(), label, None, {"softmax": probs}
    )
    mixed = (probs["a"].double() + probs["b"].double()) / 2
    per_voxel = DecoupledKDLoss(T, 1.0, 2.0).per_voxel(student, mixed, label)[:, 0]
    expected = _balanced64(per_voxel, label[:, 0], torch.ones_like(per_voxel))
    assert out["dkd"].item() == pytest.approx(expected, rel=1e-5)


# --- region-level KD --------------------------------------------------------------------------------------------------


def test_region_term_is_soft_dice_against_the_untempered_teachers():
    student, teachers, label = _case(10)
    out = _objective("region")(student.float(), label, None, {"softmax": _tempered(teachers)})
    q = (torch.softmax(teachers["a"], 1) + torch.softmax(teachers["b"], 1)) / 2  # T = 1
    p = torch.softmax(student, 1)
    dims = (0, 2, 3, 4)
    dice = (2 * (p * q).sum(dims) + 1e-5) / (p.sum(dims) + q.sum(dims) + 1e-5)
    assert out["region"].item() == pytest.approx(float(1 - dice[1:].mean()), rel=1e-5)


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, args, words",
    [
        ("pwd", {"error_weight": 1.0}, ["pwd", "error_weight", "[0, 1)"]),
        ("pwd", {"balance": "pixels"}, ["pwd", "balance", "voxel, class"]),
        ("dkd", {"regions": "atlas"}, ["dkd", "regions", "label, teacher"]),
        ("dkd", {"beta": -1}, ["dkd", "alpha and beta"]),
        ("cwd", {"balance": "class"}, ["cwd", "balance"]),
    ],
)
def test_bad_recipe_arguments_are_one_config_error_naming_the_term(name, args, words):
    with pytest.raises(ConfigError) as err:
        _objective(name, args=args)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_balance_settings_are_refused_by_the_config(tiny_config_path):
    from core.config import load_config

    with pytest.raises(ConfigError, match="grad_fraction"):
        load_config(tiny_config_path, {"distillation.balance.grad_fraction": 0})
    with pytest.raises(ConfigError, match=r"warmup_epochs \(5\) is longer than training.epochs \(2\)"):
        load_config(tiny_config_path, {"distillation.balance.warmup_epochs": 5})


# --- the warm-up ramp, the balance and the health check ---------------------------------------------------------------


def _tiny_student():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 4, 1))


def _step_values(model, objective, seed=11):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 2, 6, 6, 6, generator=g)
    label = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=g)
    probs = {"a": torch.softmax(torch.randn(2, 4, 6, 6, 6, generator=g) * 3, 1)}
    return objective(model(image), label, None, {"softmax": probs})


def test_the_health_check_measures_the_weighted_gradient_ratio_and_cosine():
    model = _tiny_student()
    objective = _objective("pwd", weight=3.0)
    health = TermHealth(objective, model, steps_per_epoch=4)
    values = _step_values(model, objective)
    health.measure(values)
    columns = health.epoch_columns()
    params = list(model.parameters())
    seg = torch.cat([g.flatten() for g in torch.autograd.grad(values["seg"], params, retain_graph=True)])
    pwd = torch.cat([g.flatten() for g in torch.autograd.grad(3.0 * values["pwd"], params)])
    assert columns["grad_ratio_pwd"] == pytest.approx(float(pwd.norm() / seg.norm()), rel=1e-5)
    assert columns["grad_cosine_pwd"] == pytest.approx(float(F.cosine_similarity(pwd, seg, dim=0)), abs=1e-5)


def test_the_warmup_ramps_the_kd_weights_over_its_steps():
    objective = _objective("pwd", BalanceConfig(warmup_epochs=2), weight=2.0)
    health = TermHealth(objective, _tiny_student(), steps_per_epoch=5)
    seen = []
    for step in (0, 4, 9, 30):
        health.before_step(step)
        seen.append(objective.effective_weight(0))
    assert seen == pytest.approx([0.2, 1.0, 2.0, 2.0])


def test_the_balance_holds_each_terms_gradient_at_its_fraction_of_l_seg():
    model = _tiny_student()
    objective = _objective("pwd", BalanceConfig(grad_fraction=0.3, every=1), weight=5.0)
    health = TermHealth(objective, model, steps_per_epoch=4)
    health.before_step(0)
    health.measure(_step_values(model, objective))  # measures at the configured weight, then re-scales
    assert health.epoch_columns()["balance_scale_pwd"] != 1.0
    health.before_step(1)
    health.measure(_step_values(model, objective))  # the same batch, measured at the balanced weight
    assert health.epoch_columns()["grad_ratio_pwd"] == pytest.approx(0.3, rel=1e-4)
    assert "balance_scales" in objective.state_dict(), "the scales are resumed with the run"


def test_the_verdict_warns_of_a_dominating_or_opposing_term_and_not_otherwise():
    objective = build_objective(
        DistillationConfig(terms=[TermConfig(name="pwd"), TermConfig(name="afs"), TermConfig(name="dkd")])
    )
    health = TermHealth(objective, _tiny_student(), steps_per_epoch=4)
    rows = [
        {
            "grad_ratio_pwd": r,
            "grad_cosine_pwd": 0.5,
            "grad_ratio_afs": 0.2,
            "grad_cosine_afs": c,
            "grad_ratio_dkd": 0.5,
            "grad_cosine_dkd": 0.1,
        }
        for r, c in [(3.0, -0.2), (2.0, -0.15), (0.5, 0.3), (1.5, -0.4)]
    ]
    verdict = health.verdict(rows)
    said = " | ".join(verdict["warnings"])
    assert len(verdict["warnings"]) == 2
    assert "'pwd' dominates L_SEG" in said and "75% of the epochs" in said
    assert "'afs' opposes L_SEG" in said and "'dkd'" not in said
    assert verdict["terms"]["pwd"]["ratio_median"] == pytest.approx(1.75)


def test_a_distilled_run_logs_its_terms_health_and_warns_once(trained):
    root, data = trained
    cfg, path = derived_config(
        root,
        data,
        "recipes_run",
        **{
            "distillation.teachers": ["dynunet"],
            "distillation.terms": [
                {"name": "pwd", "weight": 500.0, "args": {"balance": "class", "error_weight": 0.0}},
                {"name": "dkd", "args": {"beta": 2.0}},
            ],
            "distillation.balance": {"warmup_epochs": 1, "every": 1},
            "training.epochs": 2,
            "training.iterations_per_epoch": 2,
        },
    )
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    result = runner.invoke(app, ["distil", "-c", str(path), "--fold", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.count("KD term 'pwd' dominates L_SEG") == 1, result.output
    run = cfg.output.runs_dir / "students" / "kd-teachformer" / "fold_0"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for column in ("grad_ratio_pwd", "grad_cosine_dkd", "stat_pwd_masked", "loss_dkd"):
        assert all(r[column] not in ("", None) for r in rows), column
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kd_health"]["terms"]["pwd"]["dominant_epochs"] == 1.0
    assert summary["distillation"]["balance"]["warmup_epochs"] == 1, "a ramp is part of the run's key"


def test_the_health_check_alone_leaves_the_recipes_key_as_it_was():
    plain = DistillationConfig()
    monitored = plain.model_copy(update={"balance": BalanceConfig(every=5)})
    assert "balance" not in plain.key_fields() and plain.key_fields() == monitored.key_fields()
    ramped = plain.model_copy(update={"balance": BalanceConfig(warmup_epochs=2)})
    assert ramped.key_fields()["balance"]["warmup_epochs"] == 2


def test_the_cv_report_judges_every_run_from_its_metrics_by_the_same_thresholds(tmp_path):
    from core.evaluation.cv_report import _health, health_warnings
    from core.training.metrics_log import write_metrics_csv

    def run(name: str, ratios: list[float], cosine: float):
        folder = tmp_path / name
        folder.mkdir()
        rows = [
            {"epoch": i, "loss_seg": 1.0, "grad_ratio_pwd": r, "grad_cosine_pwd": cosine}
            for i, r in enumerate(ratios)
        ]
        write_metrics_csv(folder / "metrics.csv", rows)
        return folder

    folders = [run("a", [2, 3, 0.5], -0.05), run("b", [2, 2, 2], -0.3), run("c", [0.1, 0.2, 3], 0.4)]
    row = {"run": "kd-x", "kd_health": _health(folders)}
    assert row["kd_health"]["pwd"] == {
        "runs": 3,
        "dominates": 2,
        "opposes": 1,
        "ratio_median": 2.0,
        "cosine_median": -0.05,
    }, "a near-orthogonal term (cosine -0.05) does not oppose"
    assert health_warnings([row, {"run": "kd-none", "kd_health": {}}]) == [
        "kd-x: KD term 'pwd' dominates L_SEG in 2 of 3 runs (median ratio 2.00)"
    ]


# --- per-class teacher weights ----------------------------------------------------------------------------------------


def test_class_dice_weights_trust_each_teacher_on_the_classes_it_segments_well():
    student, teachers, label = _case(12)
    probs = _tempered(teachers)
    per_class = {"a": [0.9, 0.1, 0.5], "b": [0.3, 0.7, 0.0]}  # foreground classes 1..3
    objective = build_objective(
        DistillationConfig(temperature=T, terms=[TermConfig(name="pwd", teacher_weights="class_dice")]),
        class_dice=per_class,
    )
    out = objective(student.float(), label, None, {"softmax": probs})
    table = {t: torch.tensor([sum(d) / 3, *d], dtype=torch.float64) for t, d in per_class.items()}
    total = table["a"] + table["b"]
    w = {t: (table[t] / total)[label[:, 0]].unsqueeze(1) for t in "ab"}
    mixed = w["a"] * probs["a"].double() + w["b"] * probs["b"].double()
    assert out["pwd"].item() == pytest.approx(float(_kl64(student, mixed).mean()), rel=1e-5)


def test_class_dice_weights_without_per_class_holdout_dice_are_refused_before_training():
    from train_student.fold import TeacherDice, refuse_unknown_dice

    cfg = DistillationConfig(terms=[TermConfig(name="pwd", teacher_weights="class_dice")])
    dice = TeacherDice(mean={"a/fold_0": 0.8}, per_class={"a/fold_0": None})
    with pytest.raises(ConfigError, match=r"per-class Dice on cases held out.*training\.holdout > 0"):
        refuse_unknown_dice(cfg, _Keys(["a/fold_0"]), dice)
    with pytest.raises(
        ConfigError, match=r"afs.*per-voxel 'class_dice' weights apply to distribution terms only"
    ):
        build_objective(DistillationConfig(terms=[TermConfig(name="afs", teacher_weights="class_dice")]))


class _Keys:
    """Stands in for FoldTeachers where only its keys and fold are read."""

    def __init__(self, keys: list[str]):
        self.keys, self.fold = keys, 0


def test_confidence_weighted_pwd_is_bit_for_bit_the_formula_it_always_was():
    """Per-voxel teacher weights alone keep their old arithmetic exactly (weighted sum, then over the voxel count),
    on a patch whose voxel count is not a power of two (where reordering the division would change the bits)."""
    student, teachers, label = _case(13, k=3, shape=(2, 5, 6, 7))
    probs = _tempered(teachers)
    out = _objective("pwd", combine="sum", teacher_weights="confidence")(
        student.float(), label, None, {"softmax": probs}
    )
    scores = [torch.exp((p * torch.log(p.clamp_min(1e-12))).sum(1, keepdim=True)) for p in probs.values()]
    total = torch.stack(scores).sum(0)
    expected = torch.zeros(())
    for score, target in zip(scores, probs.values(), strict=True):
        log_ps = torch.log_softmax(student.float() / T, dim=1)
        kl = (target * (torch.log(target.clamp_min(1e-12)) - log_ps)).sum(1, keepdim=True)
        expected = expected + (T * T) * ((score / total) * kl).sum() / kl[:, 0].numel()
    assert torch.equal(out["pwd"], expected)


def test_a_measurement_is_scale_free_and_skips_what_is_not_finite():
    model = _tiny_student()
    objective = _objective("pwd", weight=3.0)
    health = TermHealth(objective, model, steps_per_epoch=4)
    values = _step_values(model, objective)
    health.measure(values)
    plain = health.epoch_columns()
    health.measure(values, lambda v: v * 65536.0)  # the fp16 gradient scaler's factor
    scaled = health.epoch_columns()
    assert scaled["grad_ratio_pwd"] == pytest.approx(plain["grad_ratio_pwd"], rel=1e-4)
    assert scaled["grad_cosine_pwd"] == pytest.approx(plain["grad_cosine_pwd"], abs=1e-5)
    health.measure(values, lambda v: v * float("inf"))
    assert health.epoch_columns() == {}, "a non-finite measurement is left out"
    assert not TermHealth(objective, model, 4, measure=False).measures(0), (
        "nothing is measured under torchrun"
    )


def test_a_ramp_alone_keys_its_runs_without_the_measurement_interval():
    plain = DistillationConfig()
    a = plain.model_copy(update={"balance": BalanceConfig(warmup_epochs=2, every=5)})
    b = plain.model_copy(update={"balance": BalanceConfig(warmup_epochs=2, every=25)})
    assert a.key_fields() == b.key_fields() and "every" not in a.key_fields()["balance"]
    c = plain.model_copy(update={"balance": BalanceConfig(grad_fraction=0.5, every=5)})
    d = plain.model_copy(update={"balance": BalanceConfig(grad_fraction=0.5, every=25)})
    assert c.key_fields() != d.key_fields(), "the balance is re-measured every `every` steps: part of the run"


def test_per_class_dice_of_another_task_is_refused():
    from train_student.fold import TeacherDice, refuse_unknown_dice

    cfg = DistillationConfig(terms=[TermConfig(name="pwd", teacher_weights="class_dice")])
    dice = TeacherDice(mean={"a/fold_0": 0.8}, per_class={"a/fold_0": [0.8, 0.7]})
    refuse_unknown_dice(cfg, _Keys(["a/fold_0"]), dice, num_classes=3)
    with pytest.raises(ConfigError, match=r"a/fold_0 recorded 2 classes where this dataset has 4 foreground"):
        refuse_unknown_dice(cfg, _Keys(["a/fold_0"]), dice, num_classes=5)


def test_metrics_keep_every_column_when_rows_differ_and_the_curves_show_the_health_check(tmp_path):
    """A run resumed from a partial run of an older version, or an epoch without a measurement, has rows with fewer
    columns: every column is kept, a missing value left empty."""
    from core.training.metrics_log import plot_curves, write_metrics_csv

    rows = [
        {"epoch": 0, "loss_seg": 1.0, "val_mean_dice": 0.1},
        {"epoch": 1, "loss_seg": 0.8, "val_mean_dice": 0.2, "grad_ratio_pwd": 2.0, "grad_cosine_pwd": 0.1},
        {"epoch": 2, "loss_seg": 0.7, "val_mean_dice": 0.3},
    ]
    write_metrics_csv(tmp_path / "metrics.csv", rows)
    with open(tmp_path / "metrics.csv") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["epoch", "loss_seg", "val_mean_dice", "grad_ratio_pwd", "grad_cosine_pwd"]
    assert [r["grad_ratio_pwd"] for r in read] == ["", "2.0", ""]
    plot_curves(rows, tmp_path / "curves.png", "run")
    assert (tmp_path / "curves.png").stat().st_size > 0
