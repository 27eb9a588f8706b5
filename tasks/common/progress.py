"""Progress for long loops: a Rich bar on a terminal, a plain line now and then in a log.

Why both: a user at a terminal wants a live bar; a scheduled run's log (a pipe) would get
thousands of redraw frames from a bar, so there it prints a short line every 30 s instead.
Lightning training follows the same rule (``tasks.common.lightning_console``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOG_EVERY_SECONDS = 30.0


def on_terminal() -> bool:
    """True when stdout is an interactive terminal (not a pipe, a file or a worker's log)."""
    return sys.stdout.isatty()


@contextmanager
def progress(description: str, total: int, unit: str = "items"
             ) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: call it as work completes; the bar or log lines follow.

    Args:
        description: what is being done ("ingest", "synthesize rank 0").
        total: how many units there are.
        unit: what a unit is, for the log lines.
    """
    if on_terminal():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                      transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    state = {"done": 0, "last": time.perf_counter()}

    def advance(n: int = 1) -> None:
        state["done"] += n
        now = time.perf_counter()
        if now - state["last"] >= LOG_EVERY_SECONDS or state["done"] >= total:
            print(f"{description}: {state['done']}/{total} {unit}", flush=True)
            state["last"] = now

    yield advance


def format_duration(seconds: float) -> str:
    """``42s``, ``7m05s`` or ``2h03m``: short enough for a log line, exact enough for an ETA."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
