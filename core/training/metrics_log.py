"""A run's per-epoch log: ``metrics.csv`` (one row per epoch) and its picture, ``curves.png``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "write_metrics_csv"]


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write every epoch's row so far (columns: the first row's keys)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss per term and validation mean Dice per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
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
