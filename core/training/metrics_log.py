"""A run's per-epoch log: ``metrics.csv`` (one row per epoch) and its picture, ``curves.png``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "write_metrics_csv"]


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write every epoch's row so far (columns: every row's keys, in the order they first appear; a row without one
    — an epoch without a gradient measurement, or one written by an older version before a resume — leaves it
    empty)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss per term and validation mean Dice per epoch, side by side; for a distilled run a third panel,
    each KD term's weighted gradient-norm ratio to L_SEG (the health check; 1 is the line it dominates above)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    ratios = list(dict.fromkeys(k for r in rows for k in r if k.startswith("grad_ratio_")))
    fig, axes = plt.subplots(1, 3 if ratios else 2, figsize=(15 if ratios else 10, 4))
    ax_loss, ax_dice = axes[0], axes[1]
    if ratios:
        ax_health = axes[2]
        for key in ratios:
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) not in ("", None)]
            ax_health.plot(*zip(*points, strict=True), marker=".", label=key.removeprefix("grad_ratio_"))
        ax_health.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax_health.set_yscale("log")
        ax_health.set_xlabel("epoch")
        ax_health.set_ylabel("weighted gradient norm / L_SEG's")
        ax_health.legend()
    for key in rows[0]:
        if key.startswith("loss_"):
            ax_loss.plot(epochs, [r[key] for r in rows], label=key.removeprefix("loss_"))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    val = [(r["epoch"], r["val_mean_dice"]) for r in rows if r.get("val_mean_dice") not in ("", None)]
    if val:
        ax_dice.plot(*zip(*val, strict=True), marker="o")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation mean Dice")
    ax_dice.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
