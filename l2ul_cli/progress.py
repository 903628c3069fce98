"""Rich progress bars for the long phases, drawn on stderr so stdout stays clean for results
(``--json | jq``). Silent with ``--quiet`` or when stderr is not a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn


class RichProgress:
    def __init__(self, console: Console, enabled: bool = True):
        self.enabled = enabled and console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            console=console, transient=False,
        ) if self.enabled else None
        self._task = None
        self._unit = ""

    def start(self, phase: str, total: int, unit: str = "images") -> None:
        if not self._progress:
            return
        if self._task is None:
            self._progress.start()
        self._unit = unit
        self._task = self._progress.add_task(phase, total=total, rate="")

    def advance(self, n: int = 1) -> None:
        if self._progress and self._task is not None:
            self._progress.advance(self._task, n)
            task = self._progress.tasks[-1]
            if task.elapsed:
                self._progress.update(self._task, rate=f"{task.completed / task.elapsed:,.1f} {self._unit}/s")

    def finish(self) -> None:
        if self._progress and self._task is not None:
            task = self._progress.tasks[-1]
            # The loop may stop early (goal met): show where it stopped, not an unfinished bar.
            self._progress.update(self._task, total=task.completed)

    def close(self) -> None:
        if self._progress and self._task is not None:
            self._progress.stop()
