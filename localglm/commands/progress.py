"""Progress of long commands (loading, quantize, export-gguf) on stderr, one implementation for all.

On a terminal: a transient rich bar per stage. Anywhere else (a log file, a pipe, CI): plain lines, no
escape codes, no carriage returns and no stray blank lines, at most one per stage every few seconds
plus the stage's last, so a redirected run still says how far it got without flooding its log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..model_info import human_bytes

# (done, total, stage) -> None; `stage` names a part of the work ("dense", "experts") or is "".
Update = Callable[[int, int, str], None]
LINE_EVERY_S = 5.0


@dataclass
class LineProgress:
    """Plain progress lines for a stream that is not a terminal."""

    label: str
    stream: TextIO
    in_bytes: bool
    every_s: float = LINE_EVERY_S
    start: float = field(default_factory=time.monotonic)
    last: dict[str, float] = field(default_factory=dict)  # stage -> when its last line was printed
    finished: set[str] = field(default_factory=set)

    def __call__(self, done: int, total: int, stage: str = "") -> None:
        now = time.monotonic()
        final = total > 0 and done >= total
        if stage in self.finished or not (final or now - self.last.get(stage, self.start) >= self.every_s):
            return
        self.last[stage] = now
        if final:
            self.finished.add(stage)
        amount = (f"{human_bytes(done)} of {human_bytes(total)}" if self.in_bytes else f"{done} of {total}") if total else str(done)
        pct = f"{100 * done / total:3.0f}% " if total else ""
        name = f"{self.label} {stage}".rstrip()
        elapsed = now - self.start
        eta = f", about {elapsed * (total - done) / done:.0f} s left" if total and 0 < done < total else ""  # at the rate so far
        print(f"{name}: {pct}({amount}, {elapsed:.1f} s{eta})", file=self.stream, flush=True)


def _rich_bar(label: str, in_bytes: bool) -> tuple[Update, Callable[[], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    amount = DownloadColumn() if in_bytes else MofNCompleteColumn()
    bar = Progress(
        TextColumn(f"{label} {{task.description:<8}}"), BarColumn(), amount, TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
    tasks: dict[str, Any] = {}
    bar.start()

    def update(done: int, total: int, stage: str = "") -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or None)
        bar.update(tasks[stage], completed=done, total=total or None)

    return update, bar.stop


@contextmanager
def progress(label: str, *, quiet: bool = False, in_bytes: bool = False) -> Iterator[Update | None]:
    """An `Update` callback for the duration of the block (None when `quiet`): a bar on a terminal, else lines."""
    if quiet:
        yield None
        return
    stream = sys.stderr
    if stream.isatty():
        update, close = _rich_bar(label, in_bytes)
        try:
            yield update
        finally:
            close()
    else:
        yield LineProgress(label, stream, in_bytes)
