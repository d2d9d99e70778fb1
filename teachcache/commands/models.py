"""``teachcache models``: every registered architecture with its size and cost at one input size."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from core.errors import TeachCacheError
from teachcache.app import JsonOption, err, out, print_json, user_errors

__all__ = ["commands", "models"]

commands = typer.Typer()
"""This module\'s commands; :mod:`teachcache.cli` adds them to the app."""


@commands.command()
@user_errors
def models(
    input_size: Annotated[int, typer.Option(help="Cubic input size S (voxels).", min=16)] = 96,
    in_channels: Annotated[int, typer.Option(help="Input modalities.", min=1)] = 1,
    out_channels: Annotated[int, typer.Option(help="Classes, background included.", min=2)] = 14,
    as_json: JsonOption = False,
) -> None:
    """List every registered model with its parameters and GFLOPs (PyTorch's FLOP counter) at one size."""
    from core.models import list_models
    from core.models.profile import profile_model

    rows, skipped = [], {}
    for name in list_models():
        try:
            rows.append(profile_model(name, input_size, in_channels, out_channels).to_dict())
        except TeachCacheError as exc:
            skipped[name] = str(exc)
    if as_json:
        print_json(rows)
        for reason in skipped.values():  # stdout stays the JSON list; what was left out is said on stderr
            err.print(f"[bold yellow]skipped:[/] {escape(reason)}", highlight=False, soft_wrap=True)
        return
    t = Table(
        title=f"models at {input_size}³, {in_channels} → {out_channels} (GFLOPs: a multiply-add = 2 FLOPs)"
    )
    for col in ("model", "params (M)", "GFLOPs", "taps (strides)", "description"):
        t.add_column(col, justify="right" if col in ("params (M)", "GFLOPs") else "left", overflow="fold")
    for r in rows:
        t.add_row(
            r["name"],
            f"{r['parameters'] / 1e6:.2f}",
            f"{r['gflops']:.1f}",
            f"{r['coarse_stride']} / {r['fine_stride']}",
            r["description"],
        )
    for name, reason in skipped.items():
        t.add_row(name, "—", "—", "—", reason)
    out.print(t)
