"""One place that builds rich progress bars, so every long job looks the same."""

from __future__ import annotations

import os

from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)


def progress(transient: bool = False, disable: bool | None = None) -> Progress:
    """A rich Progress with bar, counts, elapsed time and ETA.

    Set ``LMSTACK_NO_PROGRESS=1`` to turn bars off (the test suite does)."""
    if disable is None:
        disable = bool(os.environ.get("LMSTACK_NO_PROGRESS"))
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        disable=disable,
    )
