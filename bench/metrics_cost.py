"""Per-request cost of the request-path metrics (jsnap.core.stats) in the batch loop, A/B.

Mirrors _serve_requests: per-connection setup hoisted out of the batch loop; per batch a
clock read, per request an op append and a byte count, per batch the fold into the
histogram after the (here: absent) send. Both variants do the same non-metrics work.
At QD1 every batch holds one request, so the per-batch work is per-request there.

    python bench/metrics_cost.py
"""

from __future__ import annotations

import time

from jsnap.core.stats import ConnStats, observe_batch


class Conn:
    def __init__(self):
        self.requests = 0
        self.stats = ConnStats()
        self.batch_ops = []


def plain(conn, batches, qd):
    for _ in range(batches):
        out = []
        for i in range(qd):
            conn.requests += 1
            out.append(i)


def instrumented(conn, batches, qd):
    stats = conn.stats
    lat, lat_sum = stats.lat, stats.lat_sum
    done = conn.batch_ops
    t0 = time.monotonic()
    for _ in range(batches):
        rbytes = 0
        out = []
        for i in range(qd):
            conn.requests += 1
            out.append(i)
            rbytes += 4096
            done.append(0)
        if done:
            observe_batch(lat, lat_sum, done, time.monotonic() - t0)
            done.clear()
        if rbytes:
            stats.read_bytes += rbytes
        t0 = time.monotonic()  # after the recv


def main() -> None:
    for qd in (1, 8, 32):
        batches = 400000 // qd
        best = {}
        for f in (plain, instrumented):
            runs = []
            for _ in range(7):
                c = Conn()
                t = time.perf_counter()
                f(c, batches, qd)
                runs.append((time.perf_counter() - t) / (batches * qd))
            best[f.__name__] = min(runs)
        d = best["instrumented"] - best["plain"]
        print(f"batch of {qd:2d}: plain {best['plain']*1e9:4.0f} ns/req, instrumented "
              f"{best['instrumented']*1e9:4.0f} ns/req, metrics cost {d*1e9:4.0f} ns/req")


if __name__ == "__main__":
    main()
