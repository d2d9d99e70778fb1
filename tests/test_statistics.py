"""Fold-level statistics (core/evaluation/statistics.py): t-interval, hierarchical bootstrap, Holm, TOST, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from core.errors import TeachCacheError
from core.evaluation.cv_report import paired_tests
from core.evaluation.statistics import (
    ComparisonError,
    compare_folds,
    equivalence,
    holm,
    t_interval,
    wilcoxon_min_p,
)


def _arms(fold_effects, cases=4, seeds=(None,), noise=0.0, base=0.7, rng_seed=0):
    """Two arms on the same (fold, seed) runs and cases: b at ``base`` (+ noise), a = b + the fold's effect (+ noise
    on the difference)."""
    rng = np.random.default_rng(rng_seed)
    a, b = {}, {}
    for fold, effect in enumerate(fold_effects):
        for seed in seeds:
            b[(fold, seed)] = {f"f{fold}c{i}": base + rng.normal(0, 0.05) for i in range(cases)}
            a[(fold, seed)] = {c: v + effect + rng.normal(0, noise) for c, v in b[(fold, seed)].items()}
    return a, b


def test_the_t_interval_is_the_hand_computed_one():
    # differences 1, 2, 3, 4: mean 2.5, sd 1.2910, se 0.6455, t(0.975, 3) = 3.1824 → 2.5 ± 2.0543
    lo, hi = t_interval([1.0, 2.0, 3.0, 4.0])
    assert lo == pytest.approx(0.4457, abs=1e-4) and hi == pytest.approx(4.5543, abs=1e-4)
    d = np.array([0.012, -0.004, 0.031, 0.008, 0.019])
    expected = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert t_interval(d) == pytest.approx(expected)
    assert t_interval(d, 0.90) == pytest.approx(stats.t.interval(0.90, 4, loc=d.mean(), scale=stats.sem(d)))


def test_the_fold_is_the_unit_cases_and_seeds_are_averaged_within_it():
    a = {
        (0, None): {"x": 0.8, "y": 0.6},
        (0, 1): {"x": 0.9, "y": 0.7},
        (1, None): {"z": 0.5, "w": 0.5},
        (2, None): {"v": 0.9},  # arm b never ran fold 2: left out
    }
    b = {
        (0, None): {"x": 0.7, "y": 0.6},
        (0, 1): {"x": 0.7, "y": 0.7},
        (1, None): {"z": 0.4, "w": 0.6, "only_b": 0.1},  # a case only one arm scored: left out
        (1, 1): {"z": 0.1},  # a seed only one arm ran: left out
    }
    c = compare_folds(a, b, resamples=200)
    # fold 0: x differs by 0.1 and 0.2 over the seeds (0.15), y by 0 → 0.075; fold 1: z +0.1, w −0.1 → 0
    assert c.folds == [0, 1] and c.n_folds == 2 and c.cases == [2, 2]
    assert c.fold_differences == pytest.approx([0.075, 0.0])
    assert c.mean_difference == pytest.approx(0.0375)
    assert c.t_interval == pytest.approx(t_interval([0.075, 0.0]))
    assert c.t_p == pytest.approx(stats.ttest_1samp([0.075, 0.0], 0).pvalue)
    assert c.verdict_interval == "t"


def test_the_hierarchical_bootstrap_is_reproducible_with_its_seed_and_contains_the_mean():
    a, b = _arms([0.02, 0.01, 0.03, 0.00, 0.02], cases=6, noise=0.02)
    first, again = compare_folds(a, b, seed=7), compare_folds(a, b, seed=7)
    assert first.bootstrap_interval == again.bootstrap_interval
    assert (first.bootstrap_seed, first.bootstrap_resamples) == (7, 10_000)
    assert compare_folds(a, b, seed=8).bootstrap_interval != first.bootstrap_interval
    lo, hi = first.bootstrap_interval
    assert lo < first.mean_difference < hi
    # resampling cases within folds as well as folds: not narrower than nothing, not absurdly wide
    assert 0 < hi - lo < 0.1


def _loop_bootstrap(cases: list[np.ndarray], resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """The hierarchical bootstrap written plainly in float64: draw n folds with replacement; within each drawn fold,
    draw its cases with replacement; the resample's statistic is the mean over drawn folds of their case means."""
    means = []
    for _ in range(resamples):
        folds = [cases[rng.integers(len(cases))] for _ in range(len(cases))]
        means.append(np.mean([f[rng.integers(len(f), size=len(f))].mean() for f in folds]))
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def test_the_hierarchical_bootstrap_agrees_with_a_plain_loop_and_widens_with_the_spread_within_folds():
    a, b = _arms([0.03, -0.01, 0.02, 0.00, 0.04], cases=5, noise=0.03, rng_seed=4)
    c = compare_folds(a, b, resamples=20_000, seed=1)
    keys = sorted(a)
    cases = [np.array([a[k][x] - b[k][x] for x in sorted(a[k])]) for k in keys]
    lo, hi = _loop_bootstrap(cases, 20_000, np.random.default_rng(2))
    width = hi - lo
    assert c.bootstrap_interval[0] == pytest.approx(lo, abs=0.05 * width)
    assert c.bootstrap_interval[1] == pytest.approx(hi, abs=0.05 * width)
    # the same fold means, the cases spread around them 5× further: the folds' t-interval cannot tell, the
    # bootstrap's second level must
    spread = {
        k: {x: b[k][x] + 5 * (a[k][x] - b[k][x]) - 4 * np.mean(cases[i]) for x in a[k]}
        for i, k in enumerate(keys)
    }
    wide = compare_folds(spread, b, resamples=20_000, seed=1)
    assert wide.fold_differences == pytest.approx(c.fold_differences)
    assert wide.t_interval == pytest.approx(c.t_interval)
    assert wide.bootstrap_interval[1] - wide.bootstrap_interval[0] > 1.5 * (
        c.bootstrap_interval[1] - c.bootstrap_interval[0]
    )


def test_identical_arms_test_at_p_one_and_count_in_the_holm_family():
    a, _ = _arms([0.0] * 5, cases=3)
    c = compare_folds(a, a, resamples=200)
    assert c.mean_difference == 0 and c.t_p == 1.0 and c.wilcoxon_min_p == 1.0
    assert holm([c.t_p, 0.02]) == pytest.approx([1.0, 0.04]), "m = 2: the tie at zero is a test"
    # two folds without a difference: Wilcoxon drops them, and so does its floor
    half = compare_folds(*_arms([0.05, 0.04, 0.0, 0.0, 0.06]), resamples=200)
    assert half.wilcoxon_min_p == wilcoxon_min_p(3) == 0.25


def test_a_per_case_effect_the_folds_do_not_support_is_not_shown():
    # fold effects of both signs, mean +1 point; 20 near-identical cases per fold make the per-case test confident
    a, b = _arms([0.05, -0.03, 0.04, -0.02, 0.01], cases=20, noise=0.002)
    keys = sorted(a)
    per_case = paired_tests(
        [a[k][c] for k in keys for c in sorted(a[k])], [b[k][c] for k in keys for c in sorted(b[k])]
    )
    assert per_case["t_test_p"] < 0.05 and per_case["wilcoxon_p"] < 0.05, "significant per case"
    c = compare_folds(a, b)
    assert c.t_p > 0.05 and c.t_interval[0] < 0 < c.t_interval[1]
    assert c.verdict.startswith("not shown (95 % CI [") and c.verdict.endswith("] crosses zero)")


def test_the_verdict_in_words_with_effect_and_interval():
    better = compare_folds(*_arms([0.021, 0.018, 0.025, 0.02, 0.022]), resamples=200)
    lo, hi = better.t_interval
    assert better.verdict == (
        f"improves Dice by +{100 * better.mean_difference:.1f} points, 95 % CI [{100 * lo:.1f}, {100 * hi:.1f}]"
    )
    worse = compare_folds(*_arms([-0.021, -0.018, -0.025, -0.02, -0.022]), resamples=200)
    lo, hi = worse.t_interval
    assert worse.verdict == (
        f"worsens Dice by {-100 * worse.mean_difference:.1f} points, "
        f"95 % CI [−{-100 * lo:.1f}, −{-100 * hi:.1f}]"
    )


def test_wilcoxon_on_fold_means_is_descriptive_and_cannot_go_below_its_minimum():
    assert wilcoxon_min_p(5) == 0.0625 and wilcoxon_min_p(4) == 0.125 and wilcoxon_min_p(1) == 1.0
    c = compare_folds(*_arms([0.05, 0.04, 0.06, 0.05, 0.045]), resamples=200)
    assert c.wilcoxon_p == pytest.approx(0.0625) and c.wilcoxon_min_p == 0.0625
    assert c.t_p < 0.001, "the t-test on the same five folds is far below Wilcoxon's floor"


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005 × 4 = 0.02; 0.01 × 3 = 0.03; 0.03 × 2 = 0.06; 0.04 × 1 = 0.04 → kept monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]), "capped at 1"
    out = holm([0.02, math.nan, 0.01])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02), (
        "a missing test is not in the family"
    )
    assert holm([]) == []


def test_holm_t_interval_and_tost_match_statsmodels():
    """statsmodels is the reference: Holm (multipletests), the t-interval of a mean (DescrStatsW) and the TOST
    p-value of paired samples (ttost_paired), on the same numbers."""
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.weightstats import DescrStatsW, ttost_paired

    p = np.random.default_rng(3).uniform(0, 0.2, size=9)
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1])
    d = np.array([0.012, -0.004, 0.021, 0.007, 0.015])
    assert t_interval(d) == pytest.approx(DescrStatsW(d).tconfint_mean(alpha=0.05))
    assert t_interval(d, 0.90) == pytest.approx(DescrStatsW(d).tconfint_mean(alpha=0.10))
    c = compare_folds(*_arms(list(d)), resamples=200)
    assert c.fold_differences == pytest.approx(d)
    for margin in (0.01, 0.02, 0.05):
        reference_p = ttost_paired(np.asarray(c.fold_differences), np.zeros(len(d)), -margin, margin)[0]
        assert equivalence(c, margin).p == pytest.approx(reference_p)


@pytest.mark.parametrize(
    ("fold_effects", "verdict"),
    [
        ([0.002, -0.001, 0.003, 0.0, 0.001], "equivalent"),  # 90 % CI well inside ±2 points
        ([0.05, 0.052, 0.048, 0.051, 0.049], "not equivalent"),  # 95 % CI wholly above +2 points
        ([0.03, -0.01, 0.04, -0.02, 0.01], "inconclusive"),  # straddles the margin
        ([0.0, 0.0, 0.0, 0.03, -0.03], "inconclusive"),  # not significant, yet not shown equivalent either
    ],
)
def test_tost_verdicts(fold_effects, verdict):
    c = compare_folds(*_arms(fold_effects), resamples=200)
    tost = equivalence(c, 0.02)
    assert tost.verdict == verdict and tost.sentence.startswith(f"{verdict} within ±2.0 points (")
    assert (tost.p < 0.05) == (verdict == "equivalent"), (
        "the 90 % CI inside the margin is the TOST at α = 0.05"
    )
    assert tost.interval_90 == pytest.approx(t_interval(c.fold_differences, 0.90))
    assert tost.interval_95 == pytest.approx(c.t_interval)


def test_bad_inputs_are_refused_with_a_clear_message():
    a, b = _arms([0.01, 0.02])
    one_fold = ({k: v for k, v in a.items() if k[0] == 0}, b)
    with pytest.raises(ComparisonError, match=r"at least two folds run by both arms.*\[0\].*\[0, 1\]") as err:
        compare_folds(*one_fold)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TeachCacheError)
    assert err.value.exit_code == 2
    with pytest.raises(ComparisonError, match="at least two folds"):
        t_interval([0.1])
    c = compare_folds(a, b, resamples=200)
    for margin in (0.0, -0.02):
        with pytest.raises(ComparisonError, match=r"evaluation.equivalence_margin must be > 0"):
            equivalence(c, margin)
