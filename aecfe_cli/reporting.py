"""What stages tell the user while they work: messages and progress bars, on stderr only.

Stages receive a Reporter and never print; results go to stdout from ``cli.py``. Progress bars show only
on a terminal, so shell scripts and CI logs get the plain messages.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Optional


class ProgressTask:
    """One running bar; ``advance`` moves it and updates live fields such as the loss."""

    def __init__(self, progress=None, task_id=None, unit: str = "it"):
        self._progress = progress
        self._task_id = task_id
        self._unit = unit

    def advance(self, amount: float = 1, **fields) -> None:
        if self._progress is None:
            return
        speed = self._progress._tasks[self._task_id].speed
        self._progress.update(
            self._task_id,
            advance=amount,
            fields=_format(fields),
            speed=f"{speed:.1f} {self._unit}/s" if speed else "",
        )


def _format(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


class Reporter:
    def __init__(self, quiet: bool = False, show_progress: Optional[bool] = None):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)
        self._show_progress = show_progress

    @property
    def show_progress(self) -> bool:
        if self._show_progress is not None:
            return self._show_progress
        return not self.quiet and sys.stderr.isatty()

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        # One line whatever the terminal width, so that logs and scripts can grep it.
        self.console.print(f"warning: {message}", markup=False, style="yellow", soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: Optional[float], unit: str = "it") -> Iterator[ProgressTask]:
        if not self.show_progress:
            started = time.perf_counter()
            yield ProgressTask()
            self.info(f"{description}: done in {time.perf_counter() - started:.1f} s")
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[fields]}"),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total, fields="", speed="")
            yield ProgressTask(progress, task_id, unit)
