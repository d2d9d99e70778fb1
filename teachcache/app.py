"""The ``teachcache`` Typer app and what every command module shares: consoles, errors, options, progress, JSON.

The command modules (:mod:`teachcache.commands`) import this module and register their commands on :data:`app`;
:mod:`teachcache.cli` imports them all and runs the app. Every error a user can cause is printed as one message (no
traceback) with its exit code (2 unless the error says otherwise).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from core.errors import TeachCacheError

if TYPE_CHECKING:
    from core.config import Config

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigOption",
    "FoldOption",
    "JsonOption",
    "JsonSummaryOption",
    "JsonTableOption",
    "JsonTablesOption",
    "QuietBarOption",
    "QuietOption",
    "StoreArg",
    "app",
    "err",
    "load_experiment",
    "one_line_warnings",
    "out",
    "print_json",
    "progress_bar",
    "user_errors",
]

app = typer.Typer(
    name="teachcache",
    help="Multi-teacher distillation for 3D medical segmentation through a Zarr cache of teacher outputs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_CONFIG = Path("configs/demo.yaml")
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Experiment YAML (validated on load).", show_default=True)
]
FoldOption = Annotated[int, typer.Option("--fold", "-f", help="Cross-validation fold.", min=0)]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
"""For the stages, which may show several bars."""
QuietBarOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
"""For the commands that show one bar (dataset check, stats, diff, predict)."""
StoreArg = Annotated[str, typer.Argument(help="Store path or URL.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
JsonTableOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
JsonTablesOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
JsonSummaryOption = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


def user_errors(fn: F) -> F:
    """Turn a :class:`TeachCacheError` into one red line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TeachCacheError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def load_experiment(config: Path) -> Config:
    """The experiment file, validated (imported here so that ``--help`` stays fast)."""
    from core.config import load_config

    return load_config(config)


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout, without the console's markup or wrapping."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """TeachCache's own warnings as one line each, printed as they happen; others as Python prints them."""
    import warnings

    from cache_teachers.preprocess import EmptyLabelWarning
    from core.experiment import RawDataChangedWarning, SplitsCopyWarning
    from core.training.checkpoints import ResumeDiscardedWarning
    from core.training.health import KDHealthWarning
    from train_student.from_cache import TapGridWarning
    from train_student.integrity import IntegrityWarning

    ours = (
        RawDataChangedWarning,
        TapGridWarning,
        ResumeDiscardedWarning,
        KDHealthWarning,
        IntegrityWarning,
        SplitsCopyWarning,
        EmptyLabelWarning,
    )
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
        if issubclass(category, ours):
            err.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        for category in ours:
            warnings.simplefilter("always", category)
        warnings.showwarning = show
        yield


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(on_total, advance) callbacks driving a progress bar whose total is known only once the work is planned."""
    from core.progress import ProgressBar

    held: dict[str, ProgressBar] = {}

    def on_total(n: int) -> None:
        held["bar"] = ProgressBar(label, n, enabled).__enter__()

    def advance(k: int) -> None:
        if "bar" in held:
            held["bar"].advance(k)

    try:
        yield on_total, advance
    finally:
        if "bar" in held:
            held["bar"].__exit__(None, None, None)
