"""Patient-level k-fold splits in nnU-Net's ``splits_final.json`` format: ``[{"train": [...], "val": [...]}]``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.errors import ConfigError, DatasetError

__all__ = ["fold_cases", "load_splits", "make_splits", "write_splits"]


def make_splits(case_ids: list[str], num_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Seeded k-fold split of ``case_ids`` (each case is one patient), every case in exactly one val fold."""
    if len(case_ids) < num_folds:
        raise DatasetError(f"{len(case_ids)} cases cannot be split into {num_folds} folds; lower splits.num_folds")
    order = sorted(case_ids)
    perm = np.random.default_rng(seed).permutation(len(order))
    folds = np.array_split(perm, num_folds)
    splits = []
    for k in range(num_folds):
        val = sorted(order[i] for i in folds[k])
        train = sorted(c for c in order if c not in set(val))
        splits.append({"train": train, "val": val})
    return splits


def write_splits(splits: list[dict[str, list[str]]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(splits, indent=2) + "\n")
    tmp.replace(path)


def load_splits(path: Path, case_ids: list[str] | None = None) -> list[dict[str, list[str]]]:
    """Read and check a ``splits_final.json``; with ``case_ids``, every case named must exist."""
    if not path.is_file():
        raise DatasetError(f"splits file not found: {path} (run `teachcache preprocess` to create it)")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise DatasetError(f'{path}: expected a list of {{"train": [...], "val": [...]}} (nnU-Net format)')
    if case_ids is not None:
        known = set(case_ids)
        for k, s in enumerate(splits):
            unknown = sorted((set(s["train"]) | set(s["val"])) - known)
            if unknown:
                raise DatasetError(f"{path}: fold {k} names unknown case(s) {', '.join(unknown[:5])}")
    return splits


def fold_cases(splits: list[dict[str, list[str]]], fold: int) -> tuple[list[str], list[str]]:
    """``(train, val)`` case ids of ``fold``."""
    if not 0 <= fold < len(splits):
        raise ConfigError(f"fold {fold} does not exist: the splits have folds 0..{len(splits) - 1}")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
