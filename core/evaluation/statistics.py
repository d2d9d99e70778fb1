"""Fold-level comparison of two arms of a cross-validation: the fold is the unit of inference.

Cases validated by one fold's model are not independent replicates of a training recipe, and the seeds of a fold
share its teachers and its validation cases. So each arm is reduced, per fold, to the mean Dice over the fold's
validation cases and seeds, and the two arms are compared over folds:

- the mean of the per-fold differences (a − b) with a 95 % t-interval (``n − 1`` degrees of freedom): the
  interval the verdict is read from;
- beside it, a hierarchical bootstrap interval: folds resampled with replacement, then the cases within each
  chosen fold (each case's difference averaged over the fold's seeds first), percentile interval;
- the one-sample t p-value, and the Wilcoxon signed-rank p on the fold means as a description only (with ``n``
  folds the exact two-sided test cannot go below ``2 / 2ⁿ``: 0.0625 for 5 folds);
- Holm's step-down adjustment over a family of p-values, and an equivalence verdict by two one-sided tests (TOST)
  against a margin.

Dice and margins are in Dice units (0–1); the sentences give them in points (× 100). Pure numpy and scipy.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import TeachCacheError

__all__ = [
    "ComparisonError",
    "Equivalence",
    "FoldComparison",
    "RunScores",
    "compare_folds",
    "equivalence",
    "holm",
    "t_interval",
    "wilcoxon_min_p",
]

# one arm's scores: per (fold, seed) run, per validation case, its mean foreground Dice
RunScores = Mapping[tuple[int, Hashable], Mapping[str, float]]


class ComparisonError(TeachCacheError, ValueError):
    """Two arms cannot be compared as asked: fewer than two folds in common, or an equivalence margin ≤ 0."""


@dataclass(frozen=True)
class FoldComparison:
    """Arm a against arm b over folds (every difference is a − b, in Dice units).

    Attributes:
        folds: the folds both arms ran, in order; ``fold_differences`` per fold, the same order.
        fold_differences: per fold, the mean over its cases and seeds of a, minus the same of b.
        cases: per fold, the number of cases both arms scored.
        mean_difference: the mean of ``fold_differences``.
        t_interval: the 95 % t-interval of the mean over folds; the verdict uses it.
        t_p: two-sided one-sample t p-value of the fold differences (NaN when they do not vary and are all 0).
        bootstrap_interval: the 95 % percentile interval of the hierarchical bootstrap (folds, then cases).
        bootstrap_resamples, bootstrap_seed: how it was drawn (a ``numpy`` Generator seeded with the seed).
        wilcoxon_p: exact two-sided Wilcoxon signed-rank p on the fold differences; descriptive only.
        wilcoxon_min_p: the smallest p that test can reach with this many folds.
        verdict_interval: which interval the verdict is read from (``"t"``).
        verdict: the claim in words, e.g. ``"improves Dice by +2.1 points, 95 % CI [0.4, 3.8]"``.
    """

    folds: list[int]
    fold_differences: list[float]
    cases: list[int]
    mean_difference: float
    t_interval: tuple[float, float]
    t_p: float
    bootstrap_interval: tuple[float, float]
    bootstrap_resamples: int
    bootstrap_seed: int
    wilcoxon_p: float
    wilcoxon_min_p: float
    verdict_interval: str
    verdict: str

    @property
    def n_folds(self) -> int:
        """The number of folds compared: the sample size of every test."""
        return len(self.folds)


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided tests (TOST) of ``|a − b| < margin`` over folds.

    Attributes:
        margin: the equivalence margin m > 0, in Dice units.
        interval_90: the 90 % t-interval of the mean fold difference (the TOST at α = 0.05 each side).
        interval_95: the 95 % t-interval.
        p: the TOST p-value, the larger of the two one-sided p-values.
        verdict: ``"equivalent"`` (90 % interval inside (−m, m)), ``"not equivalent"`` (95 % interval wholly
            outside it) or ``"inconclusive"``.
        sentence: the verdict in words with the interval it rests on, in points.
    """

    margin: float
    interval_90: tuple[float, float]
    interval_95: tuple[float, float]
    p: float
    verdict: str
    sentence: str


def t_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The two-sided t-interval of the mean: ``mean ± t_{(1+confidence)/2, n−1} · sd / √n``.

    Args:
        differences: at least two values (the per-fold differences).
        confidence: the coverage, e.g. 0.95.

    Raises:
        ComparisonError: fewer than two values.
    """
    from scipy import stats

    d = np.asarray(differences, float)
    if len(d) < 2:
        raise ComparisonError(f"a confidence interval needs at least two folds, got {len(d)}")
    half = stats.t.ppf((1 + confidence) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def wilcoxon_min_p(n: int) -> float:
    """The smallest exact two-sided Wilcoxon signed-rank p-value with ``n`` non-zero differences: ``2 / 2ⁿ``."""
    return min(1.0, 2.0 ** (1 - n))


def _case_differences(a: RunScores, b: RunScores) -> dict[int, np.ndarray]:
    """Per fold, each case's difference a − b averaged over the seeds both arms ran on that fold.

    Returns:
        ``{fold: (cases,) differences}`` for every fold with at least one (fold, seed) run and case in common.
    """
    per_case: dict[int, dict[str, list[float]]] = {}
    for key in sorted(set(a) & set(b), key=lambda k: (k[0], str(k[1]))):
        for case in sorted(set(a[key]) & set(b[key])):
            per_case.setdefault(key[0], {}).setdefault(case, []).append(a[key][case] - b[key][case])
    return {
        fold: np.array([np.mean(v) for _, v in sorted(cases.items())])
        for fold, cases in sorted(per_case.items())
        if cases
    }


def _hierarchical_bootstrap(
    cases: list[np.ndarray], resamples: int, seed: int, confidence: float
) -> tuple[float, float]:
    """Percentile interval of the mean difference: folds drawn with replacement, then cases within each fold.

    Args:
        cases: per fold, its cases' differences ``(cases,)``.
        resamples: number of bootstrap resamples B.
        seed: the ``numpy.random.default_rng`` seed; the same seed gives the same interval.
        confidence: the coverage of the percentile interval.
    """
    rng = np.random.default_rng(seed)
    n = len(cases)
    chosen = rng.integers(0, n, size=(resamples, n))  # (B, folds)
    fold_means = np.empty((resamples, n))
    for f, diffs in enumerate(cases):
        where = chosen == f
        draws = rng.integers(0, len(diffs), size=(int(where.sum()), len(diffs)))
        fold_means[where] = diffs[draws].mean(axis=1)
    means = fold_means.mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def _t_p(d: np.ndarray) -> float:
    """Two-sided one-sample t p-value of ``d`` against 0; when ``d`` does not vary, 1 if every difference is 0 (the
    arms agree: a test that counts in a Holm family) and 0 otherwise."""
    from scipy import stats

    if np.ptp(d) == 0:
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def _wilcoxon_p(d: np.ndarray) -> float:
    """Exact two-sided Wilcoxon signed-rank p of ``d`` against 0 (zeros dropped); NaN when every ``d`` is 0."""
    from scipy import stats

    nonzero = d[d != 0]
    if len(nonzero) == 0:
        return math.nan
    return float(stats.wilcoxon(nonzero, method="exact").pvalue)


def _points(v: float) -> str:
    """A Dice difference in points, one decimal, with a true minus sign."""
    return f"{100 * v:.1f}".replace("-", "−")


def _verdict(mean: float, interval: tuple[float, float]) -> str:
    """The claim the interval supports: an improvement or a harm when it excludes zero, else "not shown"."""
    ci = f"95 % CI [{_points(interval[0])}, {_points(interval[1])}]"
    if interval[0] > 0:
        return f"improves Dice by +{_points(mean)} points, {ci}"
    if interval[1] < 0:
        return f"worsens Dice by {_points(-mean)} points, {ci}"
    return f"not shown ({ci} crosses zero)"


def compare_folds(
    a: RunScores, b: RunScores, resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> FoldComparison:
    """Compare arm ``a`` with arm ``b`` over the folds both ran, paired by (fold, seed) and case.

    Args:
        a, b: per ``(fold, seed)`` run, per case, the mean foreground Dice. Only the (fold, seed) runs and the
            cases both arms have are used; a case's difference is averaged over the fold's seeds, and a fold's
            difference is the mean over its cases.
        resamples: hierarchical bootstrap resamples.
        seed: the bootstrap's random seed (recorded in the result).
        confidence: coverage of both intervals.

    Returns:
        The :class:`FoldComparison`; its verdict reads the t-interval.

    Raises:
        ComparisonError: fewer than two folds with a (fold, seed) run and a case in common.
    """
    by_fold = _case_differences(a, b)
    if len(by_fold) < 2:
        folds_a, folds_b = sorted({k[0] for k in a}), sorted({k[0] for k in b})
        raise ComparisonError(
            f"a fold-level interval needs at least two folds run by both arms; one arm ran fold(s) "
            f"{folds_a or 'none'}, the other {folds_b or 'none'} ({len(by_fold)} in common)"
        )
    d = np.array([diffs.mean() for diffs in by_fold.values()])
    interval = t_interval(d, confidence)
    return FoldComparison(
        folds=list(by_fold),
        fold_differences=[float(v) for v in d],
        cases=[len(v) for v in by_fold.values()],
        mean_difference=float(d.mean()),
        t_interval=interval,
        t_p=_t_p(d),
        bootstrap_interval=_hierarchical_bootstrap(list(by_fold.values()), resamples, seed, confidence),
        bootstrap_resamples=resamples,
        bootstrap_seed=seed,
        wilcoxon_p=_wilcoxon_p(d),
        wilcoxon_min_p=wilcoxon_min_p(int(np.count_nonzero(d))),  # the test drops zero differences
        verdict_interval="t",
        verdict=_verdict(float(d.mean()), interval),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment, in the input's order: ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j))``.

    NaN p-values (no test) stay NaN and do not count in the family size m.
    """
    p = np.asarray(p_values, float)
    out = np.full(len(p), math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]


def equivalence(comparison: FoldComparison, margin: float) -> Equivalence:
    """TOST of the fold differences against ``(−margin, margin)``, read from t-intervals over folds.

    "equivalent" when the 90 % interval lies inside the margin (both one-sided tests reject at 0.05);
    "not equivalent" when the 95 % interval lies wholly outside it; "inconclusive" otherwise. A difference that
    is merely not significant is never called equivalent.

    Args:
        comparison: the two arms over folds (:func:`compare_folds`).
        margin: m > 0 in Dice units (0.02 = 2 points).

    Raises:
        ComparisonError: ``margin`` ≤ 0 (it is ``evaluation.equivalence_margin`` in the config).
    """
    from scipy import stats

    if not margin > 0:
        raise ComparisonError(
            f"evaluation.equivalence_margin must be > 0 (Dice units, 0.02 = 2 points), got {margin}"
        )
    d = np.asarray(comparison.fold_differences, float)
    n, mean = len(d), float(d.mean())
    inner, outer = t_interval(d, 0.90), t_interval(d, 0.95)
    se = d.std(ddof=1) / math.sqrt(n)
    if se > 0:
        p = max(stats.t.sf((mean + margin) / se, n - 1), stats.t.cdf((mean - margin) / se, n - 1))
    else:
        p = 0.0 if abs(mean) < margin else 1.0
    ci90 = f"90 % CI [{_points(inner[0])}, {_points(inner[1])}]"
    ci95 = f"95 % CI [{_points(outer[0])}, {_points(outer[1])}]"
    within = f"±{_points(margin)} points"
    if -margin < inner[0] and inner[1] < margin:
        verdict, sentence = "equivalent", f"equivalent within {within} ({ci90} inside the margin)"
    elif outer[0] >= margin or outer[1] <= -margin:
        verdict, sentence = (
            "not equivalent",
            f"not equivalent within {within} ({ci95} wholly outside the margin)",
        )
    else:
        verdict, sentence = "inconclusive", f"inconclusive within {within} ({ci90} not inside the margin)"
    return Equivalence(margin, inner, outer, float(p), verdict, sentence)
