"""What the cross-validation report checks before it pools runs: that they are the same experiment.

Every finished student run records in ``summary.json`` what its key hashes (``run_fields``), the store entry keys of
the teachers it learnt from (``teacher_entry_keys``: the entries' own key, or for an online run the key the cache
would write for that teacher) and the code that made it (``code``: git commit and dirty flag). The report pools the
runs of one row (a run kind over its folds and seeds) and pairs the runs of two rows by (fold, seed); it refuses:

- a row whose runs differ in anything but their fold and seed (their cases, seeds, the fold's teacher checkpoints);
- a row whose runs learnt from teachers cached with other settings (entry keys that differ in more than the
  checkpoint, which is the fold's own);
- a pair of runs of one fold and seed that differ in more than their arm (recipe, targets, source), or, both
  distilled, learnt from different teacher entries.

``--allow-mixed`` pools them anyway and the report's header says so. Runs made by different commits, or from a dirty
tree, are a warning in the header (``make cv`` resumes finished runs across commits), as are runs too old to record
their provenance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import TeachCacheError

__all__ = ["MixedProvenanceError", "PoolingCheck", "RunRecord", "check_pooling", "dotted"]

# run_fields that legitimately differ between the folds and seeds of one row
_PER_RUN = (
    "cases",
    "dataset_seed",
    "val_cases",
    "holdout_cases",
    "training.seed",
    "meta.fold",
    "meta.train_cases",
    "meta.fit_cases",
    "meta.val_cases",
    "meta.teachers",
    "meta.leaked_val_cases",
    "meta.seed",
    "meta.training_seed",
)
_FOLD_KEY = re.compile(r"/fold_\d+")


class MixedProvenanceError(TeachCacheError):
    """Runs the report would pool (one row) or pair (two rows) are not the same experiment."""

    exit_code = 2


def dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict flattened to dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(dotted(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


@dataclass(frozen=True)
class RunRecord:
    """One finished run folder's provenance, as its ``summary.json`` records it."""

    row: str
    fold: int
    seed: int | None
    folder: Path
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{self.row.removeprefix('student ')} fold {self.fold}{seed}"

    def settings(self) -> dict[str, Any] | None:
        """Its ``run_fields`` without what differs by fold and seed (teacher keys' folds masked); ``None`` when the
        run records none."""
        fields = self.summary.get("run_fields")
        if not isinstance(fields, dict):
            return None
        flat = dotted(json.loads(_FOLD_KEY.sub("/fold_*", json.dumps(fields))))
        return {k: v for k, v in flat.items() if not any(k == p or k.startswith(f"{p}.") for p in _PER_RUN)}

    def entry_keys(self, mask_checkpoint: bool) -> dict[str, Any] | None:
        """Its teachers' entry keys by teacher name (``<name>/fold_k`` → ``<name>``), each flattened; with
        ``mask_checkpoint`` without the checkpoint hash (a fold's own teacher weights)."""
        keys = self.summary.get("teacher_entry_keys")
        if not isinstance(keys, dict):
            return None
        out = {}
        for teacher, key in keys.items():
            flat = dotted(key) if isinstance(key, dict) else {"": key}
            if mask_checkpoint and _FOLD_KEY.search(
                teacher
            ):  # a per-fold teacher: its weights are the fold's
                flat = {k: v for k, v in flat.items() if not _per_fold_entry_field(k)}
            out[_FOLD_KEY.sub("", teacher)] = flat
        return out


def _per_fold_entry_field(key: str) -> bool:
    """Entry-key fields a per-fold teacher has of its own in each fold: its weights' hashes (``checkpoint_sha256``,
    an nnU-Net folder's ``nnunet.checkpoints_sha256``) and the nnU-Net folds serving it (``nnunet.folds``)."""
    return key in ("checkpoint_sha256", "nnunet.checkpoints_sha256", "nnunet.folds")


# run_fields that define an arm (what two compared runs of one fold and seed differ in by design)
# (allow_leakage only acts on runs that read teachers; a leak itself is a warning of its own)
_ARM = (
    "name",
    "targets",
    "loss",
    "loss_weights",
    "align",
    "meta.distillation",
    "meta.source",
    "meta.allow_leakage",
)


@dataclass
class PoolingCheck:
    """What :func:`check_pooling` found: refusals (``mixed``, pooled only with ``allow_mixed``) and warnings."""

    allow_mixed: bool = False
    mixed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "allow_mixed": self.allow_mixed,
            "mixed": self.mixed,
            "warnings": self.warnings,
            "commits": self.commits,
        }


def _differences(a: dict[str, Any], b: dict[str, Any], limit: int = 4) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(keys[:limit]) + ("…" if len(keys) > limit else "")


def _row_problems(records: list[RunRecord]) -> list[str]:
    """Runs of one row that are not the same experiment as the row's first (settings, then teacher entries)."""
    problems = []
    for what, get in (
        ("settings", RunRecord.settings),
        ("teacher entries (besides each fold's checkpoint)", lambda r: r.entry_keys(True)),
    ):
        known = [(r, get(r)) for r in records if get(r) is not None]
        if not known:
            continue
        first, reference = known[0]
        for other, value in known[1:]:
            if value != reference:
                diff = (
                    _differences(reference, value)
                    if what == "settings"
                    else _entry_differences(reference, value)
                )
                problems.append(f"{first.label} and {other.label} differ in their {what}: {diff}")
    return problems


def _entry_differences(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> str:
    if set(a) != set(b):
        return f"teachers {sorted(a)} against {sorted(b)}"
    return "; ".join(f"{t}: {_differences(a[t], b[t])}" for t in sorted(a) if a[t] != b[t])


def _pair_problems(first: list[RunRecord], second: list[RunRecord]) -> list[str]:
    """Runs of two compared rows, same fold and seed, both distilled, that learnt from different teacher entries."""
    problems = []
    others = {(r.fold, r.seed): r for r in second}
    for run in first:
        other = others.get((run.fold, run.seed))
        if other is None:
            continue
        a, b = run.entry_keys(False), other.entry_keys(False)
        if a and b and a != b:
            problems.append(
                f"{run.label} and {other.label} are paired but learnt from different teacher entries "
                f"({_entry_differences(a, b)})"
            )
        sa, sb = _common_settings(run), _common_settings(other)
        if sa is not None and sb is not None and sa != sb:
            problems.append(
                f"{run.label} and {other.label} are paired but differ in more than their arm: "
                f"{_differences(sa, sb)}"
            )
    return problems


def _common_settings(run: RunRecord) -> dict[str, Any] | None:
    """A run's settings without what defines its arm (its recipe, targets, source, teachers)."""
    settings = run.settings()
    if settings is None:
        return None
    return {k: v for k, v in settings.items() if not any(k == a or k.startswith(f"{a}.") for a in _ARM)}


def check_pooling(
    rows: dict[str, list[RunRecord]], pairs: Iterable[tuple[str, str]], allow_mixed: bool = False
) -> PoolingCheck:
    """Check the runs the report pools (each row) and pairs (``pairs`` of row names) before anything is written.

    Raises:
        MixedProvenanceError: runs of mixed provenance, without ``allow_mixed``; the message names the runs and
            what differs, and how to pool them anyway.
    """
    check = PoolingCheck(allow_mixed=allow_mixed)
    for records in rows.values():
        check.mixed += _row_problems(records)
    for a, b in pairs:
        if a in rows and b in rows:
            check.mixed += _pair_problems(rows[a], rows[b])
    everything = [r for records in rows.values() for r in records]
    codes = [r.summary.get("code") for r in everything]
    check.commits = sorted({c["commit"] for c in codes if isinstance(c, dict) and c.get("commit")})
    if len(check.commits) > 1:
        check.warnings.append(
            f"runs made by {len(check.commits)} commits ({', '.join(c[:10] for c in check.commits)})"
        )
    dirty = [
        r.label for r, c in zip(everything, codes, strict=True) if isinstance(c, dict) and c.get("dirty")
    ]
    if dirty:
        check.warnings.append(
            f"{len(dirty)} run(s) made from a tree with uncommitted changes ({', '.join(dirty[:3])}"
            f"{'…' if len(dirty) > 3 else ''})"
        )
    leaked = [
        r.label
        for r in everything
        if any(
            (r.summary.get("leaked_val_cases") or {}).values()
        )  # teachers trained on the run's validation cases
    ]
    if leaked:
        check.warnings.append(
            f"{len(leaked)} run(s) learnt from teachers trained on their own validation cases (--allow-leakage: "
            f"{', '.join(leaked[:3])}{'…' if len(leaked) > 3 else ''}); their Dice is optimistic"
        )
    unrecorded = [
        r.label for r in everything if r.row.startswith("student") and "run_fields" not in r.summary
    ]
    if unrecorded:
        check.warnings.append(
            f"{len(unrecorded)} run(s) record no provenance (made by an older TeachCache), pooled unchecked "
            f"({', '.join(unrecorded[:3])}{'…' if len(unrecorded) > 3 else ''})"
        )
    if check.mixed and not allow_mixed:
        shown = "; ".join(check.mixed[:3]) + (
            f"; and {len(check.mixed) - 3} more" if len(check.mixed) > 3 else ""
        )
        raise MixedProvenanceError(
            f"the report would pool runs that are not the same experiment: {shown}. Re-run them with one config "
            "(`make cv` retrains a run whose settings changed), or pass --allow-mixed to pool them anyway (the "
            "report's header then says so); no report written"
        )
    return check
