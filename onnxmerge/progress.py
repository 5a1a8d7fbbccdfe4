"""Progress of long work: a bar on a terminal, periodic one-line reports when output goes to a file.

One reporter per command; each phase (``"latency table"``, ``"importance table"``...) says how many units it
has, and every finished unit is one ``advance``. On a terminal a rich bar shows the phase, units done and an
ETA; otherwise (CI logs, ``2> file``) a plain line is printed when a phase starts, at most every
``interval_s`` seconds and at every further 10% of it, and when it ends, each with done/total, elapsed and
ETA. A disabled reporter prints nothing and costs nothing. Interrupting (Ctrl-C) is not caught here: the
command's own ``KeyboardInterrupt`` handling applies, and the bar is closed on the way out.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Reporter:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None, interval_s: float = INTERVAL_S,
                 interactive: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.interactive = (self.stream.isatty() if hasattr(self.stream, "isatty") else False) \
            if interactive is None else interactive
        self.clock = clock

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """``with reporter.phase("importance table", total=n) as advance: ... advance()`` (``advance(k)`` for k
        units; ``advance(note="...")`` updates a short status shown after the count)."""
        if not self.enabled:
            yield lambda count=1, note=None: None
            return
        if self.interactive:
            with self._bar(name, total) as advance:
                yield advance
            return
        state = {"done": 0, "note": None, "last": self.clock(), "decile": 0}
        started = state["last"]
        self._line(name, 0, total, 0.0, None, "started")

        def advance(count: int = 1, note: str | None = None) -> None:
            state["done"] += count
            if note is not None:
                state["note"] = note
            now = self.clock()
            decile = int(10 * state["done"] / total) if total else 0
            if now - state["last"] >= self.interval_s or decile > state["decile"]:
                state["last"], state["decile"] = now, decile
                self._line(name, state["done"], total, now - started, state["note"])

        try:
            yield advance
        finally:
            self._line(name, state["done"], total, self.clock() - started, state["note"], "done")

    def _line(self, name: str, done: int, total: int | None, elapsed: float, note: str | None,
              status: str | None = None) -> None:
        count = f"{done}/{total}" if total else f"{done}"
        parts = [f"[{name}]", count, f"elapsed {_duration(elapsed)}"]
        if status is None and total and done:
            parts.append(f"eta {_duration(elapsed / done * (total - done))}")
        if note:
            parts.append(note)
        if status:
            parts.append(status)
        print(" ".join(parts), file=self.stream, flush=True)

    @contextmanager
    def _bar(self, name: str, total: int | None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        columns = (TextColumn(f"{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn(), TextColumn("{task.fields[note]}"))
        with Progress(*columns, console=Console(file=self.stream), transient=False) as bar:
            task = bar.add_task(name, total=total, note="")

            def advance(count: int = 1, note: str | None = None) -> None:
                bar.update(task, advance=count, **({"note": note} if note is not None else {}))

            yield advance


DISABLED = Reporter(enabled=False)
