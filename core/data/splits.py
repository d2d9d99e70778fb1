"""Patient-level k-fold splits in nnU-Net's ``splits_final.json`` format: ``[{"train": [...], "val": [...]}]``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.errors import ConfigError, DatasetError

__all__ = [
    "check_splits",
    "fold_cases",
    "holdout_split",
    "load_splits",
    "make_splits",
    "splits_difference",
    "write_splits",
]

Splits = list[dict[str, list[str]]]


def make_splits(
    case_ids: list[str], num_folds: int, seed: int, patients: dict[str, str] | None = None
) -> Splits:
    """Seeded k-fold split of ``case_ids``, every case in exactly one val fold.

    Args:
        patients: case → patient, where a patient has several cases (PI-CAI studies): patients are split, so no
            patient's cases sit on both sides of a fold. Default: each case is its own patient (then the folds are
            the same as before patients existed).
    """
    groups: dict[str, list[str]] = {}
    for c in sorted(case_ids):
        groups.setdefault((patients or {}).get(c, c), []).append(c)
    if len(groups) < num_folds:
        raise DatasetError(
            f"{len(groups)} patients cannot be split into {num_folds} folds; lower splits.num_folds"
        )
    order = sorted(groups)
    perm = np.random.default_rng(seed).permutation(len(order))
    folds = np.array_split(perm, num_folds)
    splits = []
    for k in range(num_folds):
        val = sorted(c for i in folds[k] for c in groups[order[i]])
        held = set(val)
        train = sorted(c for c in case_ids if c not in held)
        splits.append({"train": train, "val": val})
    return splits


def write_splits(splits: Splits, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(splits, indent=2) + "\n")
    tmp.replace(path)


def load_splits(
    path: Path, case_ids: list[str] | None = None, patients: dict[str, str] | None = None
) -> Splits:
    """Read and check a ``splits_final.json``; with ``case_ids``, every case named must exist; with ``patients``
    (case → patient), no patient may have cases on both sides of a fold."""
    if not path.is_file():
        raise DatasetError(f"splits file not found: {path} (run `teachcache preprocess` to create it)")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    try:
        check_splits(splits, case_ids)
    except ValueError as exc:
        hint = ""
        if "unknown case" in str(exc):
            hint = (
                "; the file was made for another set of cases (a case removed or renamed since?): restore the "
                "case, or delete the file so that `teachcache preprocess` makes new splits (and rebuild the store "
                "with --overwrite: its teachers were prepared for the old folds)"
            )
        raise DatasetError(f"{path}: {exc}{hint}") from None
    for k, fold in enumerate(splits):
        if patients:
            train_patients = {patients.get(c, c) for c in fold["train"]}
            shared = sorted({patients.get(c, c) for c in fold["val"]} & train_patients)
            if shared:
                raise DatasetError(
                    f"{path}: fold {k} puts studies of patient(s) {', '.join(shared[:5])} in both train and val; a "
                    "patient's studies must stay on one side (delete the file to make patient-level splits)"
                )
    return splits


def check_splits(splits: object, case_ids: list[str] | None = None) -> None:
    """Check that ``splits`` is a list of ``{"train": [...], "val": [...]}``; with ``case_ids``, of known cases.

    Raises:
        ValueError: the first problem found, in words (callers add the file or store it came from).
    """
    if (
        not isinstance(splits, list)
        or not splits
        or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits)
    ):
        raise ValueError('expected a list of {"train": [...], "val": [...]} (nnU-Net format)')
    if case_ids is not None:
        known = set(case_ids)
        for k, s in enumerate(splits):
            unknown = sorted((set(s["train"]) | set(s["val"])) - known)
            if unknown:
                raise ValueError(f"fold {k} names unknown case(s) {', '.join(unknown[:5])}")


def splits_difference(
    ours: Splits, theirs: Splits, names: tuple[str, str] = ("the first", "the second")
) -> str | None:
    """``None`` when both hold the same folds (order of cases within a fold ignored), else the first difference.

    Args:
        ours: one set of folds.
        theirs: the other.
        names: how the message calls ``ours`` and ``theirs``.

    Returns:
        e.g. ``"5 folds vs 3"`` or ``"fold 1: val has C07 only in the file, C02 only in the store"``.
    """
    if len(ours) != len(theirs):
        return f"{len(ours)} folds in {names[0]}, {len(theirs)} in {names[1]}"
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for part in ("train", "val"):
            first, second = set(a[part]), set(b[part])
            if first != second:
                only_first = ", ".join(sorted(first - second)[:3]) or "nothing"
                only_second = ", ".join(sorted(second - first)[:3]) or "nothing"
                return (
                    f"fold {k}: {part} has {only_first} only in {names[0]}, {only_second} only in {names[1]}"
                )
    return None


def fold_cases(splits: Splits, fold: int) -> tuple[list[str], list[str]]:
    """``(train, val)`` case ids of ``fold``."""
    if not 0 <= fold < len(splits):
        raise ConfigError(f"fold {fold} does not exist: the splits have folds 0..{len(splits) - 1}")
    train, val = list(splits[fold]["train"]), list(splits[fold]["val"])
    for part, cases in (("training", train), ("validation", val)):
        if not cases:
            raise ConfigError(
                f"fold {fold} has no {part} cases; use fewer folds (splits.num_folds) or a splits file whose every "
                "fold has both"
            )
    return train, val


def holdout_split(train: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Carve ``fraction`` of a fold's training cases out for model selection: ``(fit, holdout)``.

    The held-out cases are not trained on; they choose the checkpoint, stop training early and measure a teacher's
    Dice for ``teacher_weights: dice``, so nothing is chosen on the fold's validation cases. At least one case is
    held out when ``fraction > 0`` and at least one is left to train on. Deterministic for ``seed``; both lists keep
    ``train``'s order.

    Raises:
        ConfigError: ``fraction > 0`` with fewer than 2 training cases.
    """
    if fraction <= 0:
        return list(train), []
    if len(train) < 2:
        raise ConfigError(
            f"training.holdout {fraction} needs at least 2 training cases to hold one out; the fold has {len(train)}"
        )
    count = min(len(train) - 1, max(1, round(fraction * len(train))))
    chosen = set(np.random.default_rng(seed).choice(len(train), size=count, replace=False).tolist())
    return [c for i, c in enumerate(train) if i not in chosen], [
        c for i, c in enumerate(train) if i in chosen
    ]
