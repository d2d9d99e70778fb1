"""The health check's verdict on a distilled run's gradient log: did a KD term dominate L_SEG, or oppose it?

Training (:mod:`core.training.health`) writes, per epoch, each KD term's mean weighted gradient-norm ratio to L_SEG
and the mean cosine between their gradients (``grad_ratio_<term>``, ``grad_cosine_<term>`` in ``metrics.csv``).
:func:`verdict` reads those columns — at the end of a run, and again in the CV report, so every run of a report is
judged by the same thresholds: a term **dominates** when its ratio exceeded :data:`DOMINANT_RATIO` in more than
:data:`MOST` of the epochs measured, and **opposes** L_SEG when its cosine was below :data:`OPPOSING_COSINE` in more
than that share. A cosine near 0 (an orthogonal term, as attention transfer is) is not opposition: the threshold is
clearly negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["DOMINANT_RATIO", "MOST", "OPPOSING_COSINE", "verdict"]

DOMINANT_RATIO = 1.0  # the term's weighted gradient norm above L_SEG's
OPPOSING_COSINE = -0.1  # the term's gradient clearly against L_SEG's
MOST = 0.5  # "for most of training": more than half of the epochs measured


def _values(rows: Sequence[dict[str, Any]], column: str) -> list[float]:
    return [float(r[column]) for r in rows if r.get(column) not in (None, "")]


def verdict(rows: Sequence[dict[str, Any]], terms: Sequence[str]) -> dict[str, Any]:
    """Per term, the median ratio and cosine and the share of epochs it dominated or opposed L_SEG, and the warnings.

    Args:
        rows: ``metrics.csv`` rows (dicts; values may be strings, as read back, or empty where not measured).
        terms: the run's KD terms.

    Returns:
        ``{"terms": {term: {"ratio_median", "cosine_median", "dominant_epochs", "opposing_epochs", "epochs"}},
        "warnings": [...], "thresholds": {...}}``; ``{}`` when nothing was measured.
    """
    found, warnings = {}, []
    for name in terms:
        ratios, cosines = _values(rows, f"grad_ratio_{name}"), _values(rows, f"grad_cosine_{name}")
        if not ratios:
            continue
        dominant = float(np.mean([x > DOMINANT_RATIO for x in ratios]))
        opposing = float(np.mean([x < OPPOSING_COSINE for x in cosines]))
        found[name] = {
            "ratio_median": float(np.median(ratios)),
            "cosine_median": float(np.median(cosines)),
            "dominant_epochs": dominant,
            "opposing_epochs": opposing,
            "epochs": len(ratios),
        }
        if dominant > MOST:
            warnings.append(
                f"KD term '{name}' dominates L_SEG: its weighted gradient norm was above {DOMINANT_RATIO:g}× "
                f"L_SEG's in {dominant:.0%} of the epochs (median ratio {np.median(ratios):.2f}); consider a "
                "lower weight, distillation.balance.grad_fraction, or a class-balanced term (docs/recipes.md)"
            )
        if opposing > MOST:
            warnings.append(
                f"KD term '{name}' opposes L_SEG: the cosine between their gradients was below "
                f"{OPPOSING_COSINE:g} in {opposing:.0%} of the epochs (median {np.median(cosines):+.2f}); it pulls "
                "the student away from the labels (docs/recipes.md)"
            )
    if not found:
        return {}
    return {
        "terms": found,
        "warnings": warnings,
        "thresholds": {"dominant_ratio": DOMINANT_RATIO, "opposing_cosine": OPPOSING_COSINE, "most": MOST},
    }
