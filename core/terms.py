"""The catalogue of distillation terms: each term's name and what it reads, declared once.

A recipe is a list of terms; what it needs from the teachers (softmax, attention maps, feature sketches, rebuilt
features) follows from its terms here and nowhere else: the store reader, the online target source, the trainer's
checks and the bench all ask :func:`targets_needed`. The config validates term names against :data:`TERM_SPECS`;
the implementations in :mod:`core.losses.distillation` register under these names (a name without a spec, or a
spec without an implementation, is an error caught by the tests). This module sits below both, so neither imports
the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "ATTENTION_KINDS",
    "ONLINE_KINDS",
    "TERM_SPECS",
    "DistillationTargets",
    "TargetsNeeded",
    "TermSpec",
    "builds_with_channels",
    "targets_needed",
]

# {"softmax": {teacher: (B, K, X, Y, Z) probabilities at T}, "coarse"/"fine": {teacher: (B, 1, x, y, z)},
#  "<tap>_sketch" / "<tap>_features": {teacher: (B, C, x, y, z)}, "classes": {"label": (B, 1, X, Y, Z)}}
DistillationTargets = dict[str, dict[str, torch.Tensor]]

ATTENTION_KINDS = ("coarse", "fine")
SKETCH_KINDS = frozenset({"coarse_sketch", "fine_sketch"})
FEATURE_KINDS = frozenset({"coarse_features", "fine_features"})
# what teachers running in memory produce (online distillation): no sketches, no rebuilt features
ONLINE_KINDS = frozenset({"softmax", *ATTENTION_KINDS})


@dataclass(frozen=True)
class TermSpec:
    """One distillation term as configs name it.

    Attributes:
        name: the name in ``distillation.terms[].name``.
        reads: the target kinds it reads: ``softmax``, ``coarse``/``fine`` (attention maps), ``<tap>_sketch``
            (cached feature sketches), ``<tap>_features`` (features rebuilt from sketches and basis).
        needs_channels: built with the student's and the teachers' tap widths (a learned projection).
    """

    name: str
    reads: frozenset[str]
    needs_channels: bool = False


TERM_SPECS: dict[str, TermSpec] = {
    spec.name: spec
    for spec in (
        TermSpec("pwd", frozenset({"softmax"})),
        TermSpec("dkd", frozenset({"softmax"})),
        TermSpec("cwd", frozenset({"softmax"})),
        TermSpec("dist", frozenset({"softmax"})),
        TermSpec("region", frozenset({"softmax"})),
        TermSpec("afs", frozenset(ATTENTION_KINDS)),
        TermSpec("affinity", frozenset({"softmax", *SKETCH_KINDS})),
        TermSpec("gram", frozenset(SKETCH_KINDS)),
        TermSpec("ffd", frozenset({"softmax", *FEATURE_KINDS}), needs_channels=True),
        TermSpec("rgd", frozenset({"softmax", *FEATURE_KINDS}), needs_channels=True),
    )
}


@dataclass(frozen=True)
class TargetsNeeded:
    """What a recipe reads from its teachers, derived from its terms (:func:`targets_needed`).

    Attributes:
        kinds: every target kind read by a term of non-zero weight.
        needs_channels: some term is built with tap widths.
    """

    kinds: frozenset[str] = frozenset()
    needs_channels: bool = False

    @property
    def any(self) -> bool:
        """The recipe reads teachers at all (``False``: the student trains on labels alone)."""
        return bool(self.kinds)

    @property
    def softmax(self) -> bool:
        return "softmax" in self.kinds

    @property
    def attention(self) -> bool:
        return bool(set(ATTENTION_KINDS) & self.kinds)

    @property
    def sketches(self) -> bool:
        return bool(SKETCH_KINDS & self.kinds)

    @property
    def features(self) -> bool:
        return bool(FEATURE_KINDS & self.kinds)

    @property
    def taps(self) -> tuple[str, ...]:
        """The taps (``coarse``, ``fine``) whose maps, sketches or features a term reads."""
        return tuple(t for t in ATTENTION_KINDS if {t, f"{t}_sketch", f"{t}_features"} & self.kinds)

    @property
    def student_taps(self) -> bool:
        """The student's tap features must be recorded during its forward pass."""
        return bool(self.taps)

    @property
    def offline_only(self) -> frozenset[str]:
        """The kinds only the store has (teachers in memory do not produce them)."""
        return self.kinds - ONLINE_KINDS


def targets_needed(terms: Iterable[tuple[str, float]]) -> TargetsNeeded:
    """What the terms ``(name, weight)`` read together; terms of weight 0 read nothing.

    Raises:
        KeyError: a name that is not in :data:`TERM_SPECS` (the config refuses those first).
    """
    used = [TERM_SPECS[name] for name, weight in terms if weight > 0]
    return TargetsNeeded(
        kinds=frozenset().union(*(s.reads for s in used)),
        needs_channels=any(s.needs_channels for s in used),
    )


def builds_with_channels(names: Iterable[str]) -> bool:
    """Some term among ``names`` is built with the tap widths, whatever its weight (a term of weight 0 is still built).

    Raises:
        KeyError: a name that is not in :data:`TERM_SPECS`.
    """
    return any(TERM_SPECS[name].needs_channels for name in names)
