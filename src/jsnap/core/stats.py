"""Metrics: plain counters where the work happens, summed and written out when scraped.

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

A scrape (`render`) reads those lists from another thread without locks: under the GIL
each element read is atomic, so it sees every counter at some recent value. When a
connection ends, `NbdServer.forget` adds its `ConnStats` into the server's `closed_stats`
under the server lock, which a scrape also holds while it sums; so counters never go
backwards. Engine-side values come from `Engine.stats()` (one engine-lock hold) and the
destager's batch-duration `Histogram` (one writer: the destager thread).

The output is the Prometheus text exposition format (version 0.0.4), written by hand:
`# HELP` / `# TYPE` lines, counters ending in `_total`, histograms as cumulative
`_bucket{le=...}` lines plus `_sum` and `_count`, units in the names (seconds, bytes).
"""

from __future__ import annotations

import bisect
import collections
import gc
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsnap.core.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


# -- exposition ---------------------------------------------------------------------------


def _num(v: float) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        if math.isnan(v):
            return "NaN"
        return repr(v)
    return str(v)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
           for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_num(value)}")

    def metric(self, name: str, kind: str, help_text: str, value: float,
               labels: dict[str, str] | None = None) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value, labels)

    def histogram(self, name: str, bounds: Sequence[float], counts: Sequence[int],
                  total: float, labels: dict[str, str] | None = None) -> None:
        """Samples of one histogram; `counts` per bucket (not cumulative), +Inf last."""
        labels = labels or {}
        acc = 0
        for bound, n in zip((*bounds, math.inf), counts, strict=True):
            acc += n
            self.sample(f"{name}_bucket", acc, {**labels, "le": _num(float(bound))})
        self.sample(f"{name}_sum", total, labels)
        self.sample(f"{name}_count", acc, labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _sum_stats(conns: Iterable[ConnStats], closed: ConnStats) -> ConnStats:
    total = ConnStats()
    total.add(closed)
    for c in conns:
        total.add(c)
    return total


def render(engine: Engine, server: Any | None = None) -> str:
    """The whole exposition: engine and pool state, and (when serving) the NBD server's.

    `server` is a `jsnap.server.NbdServer` (typed loosely: the server imports this module)."""
    st: dict[str, Any] = engine.stats()
    w = _Writer()
    w.metric("jsnap_pool_ok", "gauge", "1 while the pool accepts writes, 0 once it failed "
             "and went read-only", 1 if st["state"] == "ok" else 0)
    w.metric("jsnap_journal_size_bytes", "gauge", "Usable size of the journal.",
             st["journal_size"])
    w.metric("jsnap_journal_used_bytes", "gauge", "Journal bytes holding records not yet "
             "destaged (wrap padding included).", st["journal_used"])
    w.metric("jsnap_journal_fill_ratio", "gauge", "journal_used / usable journal capacity "
             "(writers wait for space at 1).", st["journal_fill"])
    w.metric("jsnap_journal_pending_records", "gauge", "Journal records not destaged yet.",
             st["journal_records"])
    w.metric("jsnap_journal_oldest_record_age_seconds", "gauge", "Age of the oldest record "
             "not destaged yet (0 when the journal is empty).", st["journal_oldest_age"])
    w.metric("jsnap_journal_waiting_writers", "gauge", "Writers waiting for journal space "
             "(backpressure).", st["journal_waiters"])
    w.metric("jsnap_remap_pending_bytes", "gauge", "Bytes of large aligned writes written "
             "to fresh pool extents whose mapping is not destaged yet.",
             st["remap_pending_bytes"])
    w.metric("jsnap_destaged_records_total", "counter", "Journal records destaged since the "
             "server started.", st["destaged_records"])
    w.metric("jsnap_destaged_bytes_total", "counter", "Written bytes destaged (journaled or "
             "remapped) since the server started.", st["destaged_bytes"])
    w.metric("jsnap_preserved_chunks_total", "counter", "Chunks copied for snapshots "
             "(copy-on-write) since the server started.", st["preserved_copies"])
    w.metric("jsnap_destage_cache_windows_dropped_total", "counter", "2 MiB page-cache "
             "windows the destager dropped because small writes into them were slow (big "
             "folios).", st["cache_windows_dropped"])
    dh = engine.destage_seconds
    w.family("jsnap_destage_batch_duration_seconds", "histogram",
             "Duration of destager batches, from start to checkpoint.")
    w.histogram("jsnap_destage_batch_duration_seconds", dh.bounds, list(dh.counts), dh.sum)
    w.metric("jsnap_volumes", "gauge", "Volumes in the pool.", st["volumes"])
    w.metric("jsnap_snapshots", "gauge", "Live snapshots in the pool.", st["snapshot_count"])
    for key, help_text in (
        ("capacity", "Most the pool's data files may grow to."),
        ("allocated", "Pool extents in use (volumes and snapshots)."),
        ("mapped", "Pool extents mapped by thin volumes."),
        ("preserved", "Pool extents held only for snapshots."),
        ("reserved", "Pool extents reserved by journaled writes not yet destaged."),
        ("available", "Pool space a new write may still reserve."),
    ):
        w.metric(f"jsnap_pool_{key}_bytes", "gauge", help_text, st[f"pool_{key}"])
    # The serving process runs full collections itself (jsnap.gcpolicy): generation 2's
    # count shows how often; a stall under load would show as a jump here.
    gen = gc.get_stats()
    for name, key, help_text in (
        ("python_gc_collections_total", "collections", "Garbage collections, by generation."),
        ("python_gc_objects_collected_total", "collected", "Objects the garbage collector "
         "found unreachable, by generation."),
    ):
        w.family(name, "counter", help_text)
        for i, g in enumerate(gen):
            w.sample(name, g[key], {"generation": str(i)})
    if server is not None:
        _render_server(w, server)
    return w.text()


def _render_server(w: _Writer, server: Any) -> None:
    with server.lock:
        conns = [c.stats for c in server.clients]
        total = _sum_stats(conns, server.closed_stats)
        nopen, accepted = len(conns), server.connections_total
    w.metric("jsnap_connections_open", "gauge", "NBD connections open (negotiating ones "
             "included).", nopen)
    w.metric("jsnap_connections_total", "counter", "NBD connections accepted since the "
             "server started.", accepted)
    ops = [i for i in sorted(OP_NAMES)]
    w.family("jsnap_requests_total", "counter", "NBD requests answered, by op.")
    for i in ops:
        n = sum(total.lat[i * NB:(i + 1) * NB]) + sum(total.dlat[i * NB:(i + 1) * NB])
        w.sample("jsnap_requests_total", n, {"op": OP_NAMES[i]})
    w.family("jsnap_request_errors_total", "counter", "NBD requests answered with an error, "
             "by op.")
    for i in ops:
        w.sample("jsnap_request_errors_total", total.errors[i], {"op": OP_NAMES[i]})
    w.metric("jsnap_read_bytes_total", "counter", "Bytes returned by READ requests.",
             total.read_bytes)
    w.metric("jsnap_written_bytes_total", "counter", "Bytes journaled by WRITE requests.",
             total.written_bytes)
    w.family("jsnap_request_duration_seconds", "histogram", "Server-side request latency, "
             "from the recv that completed the request to the send of its reply, by op.")
    for i in ops:
        counts = [a + b for a, b in zip(total.lat[i * NB:(i + 1) * NB],
                                        total.dlat[i * NB:(i + 1) * NB], strict=True)]
        w.histogram("jsnap_request_duration_seconds", REQUEST_BOUNDS, counts,
                    total.lat_sum[i] + total.dlat_sum[i], {"op": OP_NAMES[i]})
