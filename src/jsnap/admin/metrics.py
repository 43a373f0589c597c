"""Metrics, the exposition half: the counters of `jsnap.core.stats`, summed and written out
when scraped (GET /metrics on the admin API).

A scrape (`render`) reads the connections' `ConnStats` lists from another thread without
locks: under the GIL each element read is atomic, so it sees every counter at some recent
value. When a connection ends, `NbdServer.forget` adds its `ConnStats` into the server's
`closed_stats` under the server lock, which a scrape also holds while it sums; so counters
never go backwards. Engine-side values come from `Engine.stats()` (one engine-lock hold) and
the destager's batch-duration `Histogram` (one writer: the destager thread).

The output is the Prometheus text exposition format (version 0.0.4), written by hand:
`# HELP` / `# TYPE` lines, counters ending in `_total`, histograms as cumulative
`_bucket{le=...}` lines plus `_sum` and `_count`, units in the names (seconds, bytes).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from jsnap.core.stats import NB, OP_NAMES, REQUEST_BOUNDS, ConnStats

if TYPE_CHECKING:
    from jsnap.core.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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

    `server` is a `jsnap.transport.server.NbdServer`, or anything with its `lock`,
    `clients`, `closed_stats` and `connections_total` (the tests pass a stand-in)."""
    st: dict[str, Any] = engine.stats()
    w = _Writer()
    w.metric("jsnap_pool_ok", "gauge", "1 while the pool accepts writes, 0 once it failed "
             "and went read-only", 0 if st["state"].startswith("read-only") else 1)
    w.metric("jsnap_destage_waiting_for_space", "gauge", "1 while the destager waits for "
             "space to go on (writes that need journal space get ENOSPC meanwhile).",
             1 if st["state"].startswith("waiting for space") else 0)
    w.metric("jsnap_destage_space_waits_total", "counter", "Times a destage batch was "
             "retried because it lacked space.", st["destage_space_waits"])
    w.metric("jsnap_destage_waiting_for_store", "gauge", "1 while the destager waits for a "
             "store it cannot reach (a volume's NBD backend).",
             1 if st["state"].startswith("waiting for store") else 0)
    w.metric("jsnap_destage_store_waits_total", "counter", "Times a destage batch was "
             "retried because a store could not be reached.", st["destage_store_waits"])
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
    dh = engine.backlog.destage_seconds
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
        ("fs_free", "Free space of the file systems holding the data files."),
        ("fs_reserve", "Of which data files never grow into (catalog and other files)."),
    ):
        w.metric(f"jsnap_pool_{key}_bytes", "gauge", help_text, st[f"pool_{key}"])
    for name, key, help_text in (
        ("jsnap_store_size_bytes", "size", "Size of each store (journal, data file, "
         "snapshot store): a device's size, a data file's capacity."),
        ("jsnap_store_used_bytes", "used", "Bytes of each store in use (journal records, "
         "data file extents allocated, snapshot slots held)."),
    ):
        w.family(name, "gauge", help_text)
        for s in st["stores"]:
            w.sample(name, s[key], {"role": s["role"], "path": s["path"], "kind": s["kind"]})
    # The serving process runs full collections itself (jsnap.cli.gcpolicy): generation 2's
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
