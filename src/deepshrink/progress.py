"""The one progress bar every long step shows: rich, on stderr, on a terminal only, never when asked to be quiet.

A bar draws nothing until its work has taken :data:`DELAY` seconds, so quick
calls (a small model's ``save``) print nothing even on a terminal. It is off

- when stderr is not a terminal (a pipe, a log file, a test run),
- when the caller passes ``progress=False`` (``show=False`` here),
- inside :func:`quiet` (the command line's ``--quiet``),
- inside another bar's step (a layer's evaluation within a sensitivity scan).

Examples:
    >>> with quiet():
    ...     sum(track(range(3), "adding"))
    3
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn

T = TypeVar("T")
DELAY = 1.0  # seconds of work before a bar appears
_quiet: ContextVar[bool] = ContextVar("deepshrink_quiet", default=False)
_open: ContextVar[bool] = ContextVar("deepshrink_bar_open", default=False)  # rich draws one live display at a time


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence every deepshrink progress bar inside the block (``enabled=False`` leaves them as they are)."""
    token = _quiet.set(enabled or _quiet.get())
    try:
        yield
    finally:
        _quiet.reset(token)


def _console() -> Console:
    """Where bars draw: stderr, so that stdout keeps only results (tables, JSON)."""
    return Console(stderr=True)


class _DelayedProgress(Progress):
    """A ``rich.progress.Progress`` that starts drawing at its first update after ``delay`` seconds."""

    def __init__(self, *columns: str | ProgressColumn, delay: float, **kwargs: object) -> None:
        super().__init__(*columns, **kwargs)
        self._appear_at = time.monotonic() + delay

    def __enter__(self) -> _DelayedProgress:
        self._token = _open.set(True)  # a step inside this one (a layer's evaluation in a scan) draws no bar
        return self  # not drawn yet: _maybe_start draws once the delay has passed

    def __exit__(self, *exc: object) -> None:
        _open.reset(self._token)
        if self.live.is_started:
            self.stop()

    def _maybe_start(self) -> None:
        if not self.disable and not self.live.is_started and time.monotonic() >= self._appear_at:
            self.start()

    def update(self, *args: object, **kwargs: object) -> None:
        super().update(*args, **kwargs)
        self._maybe_start()

    def advance(self, *args: object, **kwargs: object) -> None:
        super().advance(*args, **kwargs)
        self._maybe_start()


def progress_bar(*columns: str | ProgressColumn, show: bool = True) -> Progress:
    """A rich progress bar for one long step, silent unless ``show``, on a terminal and not :func:`quiet`.

    Use it as ``rich.progress.Progress``: ``with progress_bar() as bar: task = bar.add_task(...)``.

    Args:
        columns: rich columns; by default description, bar, ``done/total`` and time left.
        show: the caller's ``progress=`` argument.

    Returns:
        The (possibly disabled) progress bar.
    """
    console = _console()
    enabled = show and not _quiet.get() and not _open.get() and console.is_terminal
    columns = columns or (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return _DelayedProgress(*columns, delay=DELAY, console=console, disable=not enabled)


def track(items: Iterable[T], description: str, *, total: int | None = None, show: bool = True) -> Iterator[T]:
    """Yield ``items`` while a :func:`progress_bar` counts them.

    Args:
        items: what to iterate over.
        description: the bar's label.
        total: the number of items, when ``len(items)`` does not give it.
        show: the caller's ``progress=`` argument.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with progress_bar(show=show) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
