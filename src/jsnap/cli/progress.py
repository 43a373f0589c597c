"""A one-line progress display for long copies (export, import).

Model
-----
`Progress(total)` is told how many bytes are done (`update(done)` or `advance(n)`); it redraws
one line on its stream with a carriage return, at most every `interval` seconds (0.2 s: ~5
redraws a second, cheap however often it is told), showing bytes done / total, the percentage,
the average rate and the ETA. It draws only when the stream is a terminal: in scripts, pipes
and tests it is silent, so their output stays clean. `close()` erases the line; what happened
is then the caller's one-line summary (`summary()` helps), printed where the caller wants it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from jsnap.units import GiB, KiB, MiB, TiB

INTERVAL = 0.2


def human(n: float) -> str:
    """Bytes as a short human number: 1.5G, 320M, 4.0K, 512B."""
    for unit, size in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}B"


def duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None,
                 interval: float = INTERVAL, clock: Callable[[], float] | None = None
                 ) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock or time.monotonic
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            self.enabled = False
        self.done = 0
        self.start = self.clock()
        self.last_draw = float("-inf")
        self.width = 0  # of the last line drawn, to erase it

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = min(done, self.total) if self.total else done
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = self.total - self.done
        eta = duration(left / rate) if rate > 0 else "?"
        head = f"{self.label}: " if self.label else ""
        return (f"{head}{human(self.done)} / {human(self.total)} ({pct:.1f}%), "
                f"{human(rate)}/s, ETA {eta}")

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = max(self.width - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self.width = len(text)

    def close(self) -> None:
        """Erase the progress line (nothing was drawn when not on a terminal)."""
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def summary(self) -> str:
        """`64.0M in 0.4 s (160.0M/s)`: for the caller's final line."""
        t = self.elapsed()
        rate = f" ({human(self.done / t)}/s)" if t > 0 else ""
        return f"{human(self.done)} in {t:.1f} s{rate}"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def zeroing() -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` for making a journal (init, owner create): a line made at
    the first report, once the size is known, and erased at the end."""
    prog: Progress | None = None

    def zeroed(done: int, total: int) -> None:
        nonlocal prog
        if prog is None:
            prog = Progress(total, "zeroing the journal")
        prog.update(done)

    try:
        yield zeroed
    finally:
        if prog is not None:
            prog.close()
