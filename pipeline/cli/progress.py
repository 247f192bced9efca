"""Progress on the terminal: one line of what will run per input, then tiles, elapsed, ETA.

The CLI owns the terminal; the library reports progress through the calls below
(:class:`TerminalProgress` implements them):

``start_input(name, summary, total_tiles)``
    an input is about to run: ``summary`` is the one line saying what will run
    (:func:`summary_line`); ``total_tiles`` the lattice tiles it will run.
``advance(name, tiles)``
    ``tiles`` more tiles of that input are done.
``finish_input(name, state)``
    it ended ``done``, ``failed`` or ``skipped``.

Several inputs may be in flight at once; each has its own bar. The older callback
``progress(name, done_blocks, total_blocks)`` still works: an input that was not started
with ``start_input`` counts blocks instead of tiles.

On a terminal the bars are drawn with `rich <https://rich.readthedocs.io>`_ (log
messages are printed above them); elsewhere (a log file, a Slurm job) a plain line per
input is printed at most every ``interval`` seconds and when it finishes.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline.cli.text import fit
from pipeline.engine.plan import summary_line

__all__ = ["TerminalProgress", "format_seconds", "summary_line"]


def format_seconds(seconds: float | None) -> str:
    """``0:01:05`` style; ``-:--:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class _Input:
    total: int
    unit: str
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    last_line: float = -float("inf")
    task: Any = None


class TerminalProgress:
    """Bars (terminal) or periodic lines (files) for the inputs of a run.

    Parameters
    ----------
    stream
        Where to write (default: ``sys.stderr``).
    tty
        Draw bars; default: whether ``stream`` is a terminal.
    interval
        Seconds between plain progress lines of one input when not drawing bars.
    """

    def __init__(
        self, stream: IO[str] | None = None, *, tty: bool | None = None, interval: float = 10.0
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.inputs: dict[str, _Input] = {}
        self._bars = None
        self._handlers: list[tuple[logging.StreamHandler, IO[str]]] = []

    # --- the progress interface -------------------------------------------------------

    def start_input(self, name: str, summary: str, total_tiles: int) -> None:
        """Print ``summary`` and start counting ``total_tiles`` tiles for ``name``."""
        self._print(summary)
        self._start(name, total_tiles, "tiles")

    def advance(self, name: str, tiles: int) -> None:
        """``tiles`` more tiles of ``name`` are done."""
        state = self.inputs.get(name)
        if state is None:
            return
        state.done = min(state.total, state.done + int(tiles))
        self._show(name, state)

    def finish_input(self, name: str, state: str) -> None:
        """``name`` ended in ``state``; its bar stops (and shows the state)."""
        entry = self.inputs.pop(name, None)
        if entry is None:
            return
        if self._bars is not None and entry.task is not None:
            self._bars.update(
                entry.task, description=f"{fit(name, 32)} [{state}]", visible=state == "done"
            )
            self._bars.stop_task(entry.task)
        else:
            elapsed = time.monotonic() - entry.started
            self._print(
                f"{name}: {state}, {entry.done:,}/{entry.total:,} {entry.unit} "
                f"in {format_seconds(elapsed)}"
            )
        if not self.inputs:
            self._stop_bars()

    def __call__(self, name: str, done: int, total: int) -> None:
        """The older callback: ``done`` of ``total`` blocks of ``name``."""
        entry = self.inputs.get(name)
        if entry is None:
            if done >= total and total:
                return  # a finished input reported again: nothing to show
            entry = self._start(name, total, "blocks")
        if entry.unit != "blocks":
            return  # tiles are counted through advance()
        entry.done = min(entry.total, int(done))
        self._show(name, entry)
        if entry.done >= entry.total:
            self.finish_input(name, "done")

    def close(self) -> None:
        """Stop drawing (also on errors and Ctrl-C)."""
        self.inputs.clear()
        self._stop_bars()

    def __enter__(self) -> TerminalProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- drawing -------------------------------------------------------------------------

    def _start(self, name: str, total: int, unit: str) -> _Input:
        entry = self.inputs[name] = _Input(max(int(total), 0), unit)
        if self.tty:
            bars = self._start_bars()
            entry.task = bars.add_task(fit(name, 32), total=entry.total or None, unit=unit)
        return entry

    def _show(self, name: str, entry: _Input) -> None:
        if self._bars is not None and entry.task is not None:
            self._bars.update(entry.task, completed=entry.done)
            return
        now = time.monotonic()
        if entry.done == 0 or now - entry.last_line < self.interval:
            return  # nothing done yet says nothing the summary line did not
        entry.last_line = now
        elapsed = now - entry.started
        eta = elapsed * (entry.total - entry.done) / entry.done if entry.done else None
        percent = 100 * entry.done / entry.total if entry.total else 100.0
        self._print(
            f"{name}: {entry.done:,}/{entry.total:,} {entry.unit} ({percent:.0f}%), "
            f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}"
        )

    def _print(self, line: str) -> None:
        if self._bars is not None:
            self._bars.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _start_bars(self):
        if self._bars is not None:
            return self._bars
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(file=self.stream, force_terminal=True)
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            refresh_per_second=5,
        )
        self._bars.start()
        self._route_logging()
        return self._bars

    def _route_logging(self) -> None:
        """Log records go above the bars instead of through them: while drawing, rich
        replaces ``sys.stderr`` by a proxy that prints above the bars, but logging's
        handlers keep the stream they were made with."""
        proxy = sys.stderr
        if proxy is self.stream:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                self._handlers.append((handler, handler.stream))
                handler.setStream(proxy)

    def _stop_bars(self) -> None:
        if self._bars is None:
            return
        self._bars.stop()
        self._bars = None
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()
