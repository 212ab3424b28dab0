"""One progress-bar style for every long loop (rich; quiet when stdout is not a terminal)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(transient: bool = False) -> Progress:
    """A rich progress bar with count, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
    )


_console = None


def log_step(message: str) -> None:
    """One line saying which step of a long run starts (stderr, with the time), so a run
    never sits silent; nested loops keep their own progress bars."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    _console.log(message)
