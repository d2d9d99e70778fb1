"""Progress bars with ETA for long work (rich), silent when disabled or when output is not a terminal log."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["ProgressBar", "track"]

T = TypeVar("T")


def track(
    items: Iterable[T], description: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Iterate over ``items`` showing a bar with count, elapsed time and ETA on stderr.

    Args:
        items: the work items.
        description: text shown before the bar.
        total: number of items when ``items`` has no ``len``.
        enabled: ``False`` iterates silently (tests, library use).
    """
    if not enabled:
        yield from items
        return
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


class ProgressBar:
    """A single bar with a status line, for loops that report as they go (training)."""

    def __init__(self, description: str, total: int, enabled: bool = True):
        self.enabled = enabled
        self._progress = (
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
            )
            if enabled
            else None
        )
        self._description, self._total = description, total
        self._task = None

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.__enter__()
            self._task = self._progress.add_task(self._description, total=self._total, status="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        if self._progress is not None:
            fields = {} if status is None else {"status": status}
            self._progress.update(self._task, advance=steps, **fields)
