"""Metrics, the counting half: plain counters where the work happens.

Model
-----
The request path never takes a lock or calls into a metrics library per request. Each NBD
connection owns a `ConnStats` of plain ints and flat int lists, and each list has exactly
one writer thread, so `x[i] += n` (not atomic across threads) never races:

- the connection's reader thread: errors by op, bytes read and written, and the latency
  histogram of the replies it sends itself;
- its durable-reply sender thread: a second latency histogram, for the replies it sends
  once their fdatasync is done (FUA, FLUSH, sync mode).

Per request the reader only appends the request's op to a per-batch list (and adds READ
lengths to a local); the clock is read after each recv, and when the batch's replies are
sent it folds the list into the histogram with one more clock read and one bisect for the
whole batch (`observe_batch`). A request's latency is therefore "from the recv that
completed it to the send of its reply": server-side time, no network.
Request counts per op are the histograms' counts (every answered request is observed,
errors included), so they cost nothing extra.

A scrape reads them from another thread without locks and sums them: `jsnap.admin.metrics`
(the Prometheus exposition) says how.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable, Sequence

# Ops are indexed by NBD command number (READ=0, WRITE=1, FLUSH=3, TRIM=4, CACHE=5,
# WRITE_ZEROES=6, BLOCK_STATUS=7; 2 is DISC, which gets no reply), and OTHER collects
# commands the codec rejected as unknown.
OTHER = 8
NOPS = 9
OP_NAMES = {0: "read", 1: "write", 3: "flush", 4: "trim", 5: "cache", 6: "write_zeroes",
            7: "block_status", OTHER: "other"}

# Request latency (seconds): a cached read answers in tens of microseconds, a FUA write
# waits for an fdatasync (milliseconds), a write under journal backpressure may wait longer.
REQUEST_BOUNDS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                  0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NB = len(REQUEST_BOUNDS) + 1  # buckets per op, the last one is +Inf
# Destager batch duration (seconds): up to 256 records / 4 MiB plus an fsync or three.
BATCH_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def op_index(command: int) -> int:
    """The op slot of an NBD command number (unknown ones: OTHER)."""
    return command if command in OP_NAMES else OTHER


class ConnStats:
    """One connection's counters (see the module docstring for who writes what)."""

    __slots__ = ("lat", "lat_sum", "dlat", "dlat_sum", "errors", "read_bytes",
                 "written_bytes")

    def __init__(self) -> None:
        self.lat = [0] * (NOPS * NB)  # op * NB + bucket, not cumulative
        self.lat_sum = [0.0] * NOPS
        self.dlat = [0] * (NOPS * NB)  # the durable-reply sender's share
        self.dlat_sum = [0.0] * NOPS
        self.errors = [0] * NOPS
        self.read_bytes = 0
        self.written_bytes = 0

    def add(self, other: ConnStats) -> None:
        """Fold `other` in (a closed connection into the server's totals)."""
        for mine, theirs in ((self.lat, other.lat), (self.dlat, other.dlat),
                             (self.errors, other.errors)):
            for i, n in enumerate(theirs):
                mine[i] += n
        for fmine, ftheirs in ((self.lat_sum, other.lat_sum), (self.dlat_sum, other.dlat_sum)):
            for i, v in enumerate(ftheirs):
                fmine[i] += v
        self.read_bytes += other.read_bytes
        self.written_bytes += other.written_bytes


def observe_batch(lat: list[int], sums: list[float], ops: list[int], seconds: float,
                  _bisect: Callable[[Sequence[float], float], int] = bisect.bisect_left,
                  _bounds: tuple[float, ...] = REQUEST_BOUNDS) -> None:
    """Count every request of `ops` (op slots) in the latency bucket of `seconds`.
    (The defaults are bound once: this runs once per batch, at QD1 once per request.)"""
    b = _bisect(_bounds, seconds)  # first bound >= seconds: Prometheus' le semantics
    first = ops[0]
    n = len(ops)
    if n == 1 or ops.count(first) == n:  # the usual batch: one op (count() runs in C)
        lat[first * NB + b] += n
        sums[first] += seconds * n
        return
    for op in ops:
        lat[op * NB + b] += 1
        sums[op] += seconds


class Histogram:
    """A fixed-bucket histogram with one writer thread (the destager's batch durations)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class RateWindow:
    """Per-second totals of (records, bytes) over the last `window` seconds: the destage rate
    `status` shows. Written by the destager, read by status, both under the engine lock."""

    def __init__(self, start: float, window: int = 60) -> None:
        self.start = start
        self.window = window
        self.secs: collections.deque[list[int]] = collections.deque()  # [second, recs, bytes]

    def add(self, now: float, records: int, nbytes: int) -> None:
        sec = int(now)
        if self.secs and self.secs[-1][0] == sec:
            self.secs[-1][1] += records
            self.secs[-1][2] += nbytes
        else:
            self.secs.append([sec, records, nbytes])
        self._trim(sec)

    def _trim(self, sec: int) -> None:
        while self.secs and self.secs[0][0] <= sec - self.window:
            self.secs.popleft()

    def rate(self, now: float) -> tuple[float, float]:
        """(records/s, bytes/s) over the window (or the time since start, if shorter)."""
        self._trim(int(now))
        span = min(float(self.window), max(now - self.start, 1.0))
        return (sum(s[1] for s in self.secs) / span, sum(s[2] for s in self.secs) / span)
