"""Measure the snapshot store index (SQLite, WAL, synchronous=FULL) as the destager uses it.

    python bench/snapindex.py [--rows 1000000] [--batch 256]

Prints the cost of a destage batch's commit, per preserved-row insert, and of the two
lookups on the hot paths (max_hi per destaged chunk, asked once per destage batch of 1024
chunks; find_preserved per snapshot read).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from jsnap.stores.catalog import Catalog


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        cat = Catalog(os.path.join(d, "pool.db"))
        chunks = args.rows // 4  # ~4 preserved generations per chunk
        hi = 0
        commits = []
        t_all = time.perf_counter()
        for start in range(0, args.rows, args.batch):
            rows = []
            for _ in range(min(args.batch, args.rows - start)):
                hi += 1
                rows.append((1, random.randrange(chunks), hi, hi))
            t = time.perf_counter()
            with cat.transaction() as txn:
                txn.add_preserved(rows)
            commits.append(time.perf_counter() - t)
        total = time.perf_counter() - t_all
        probes = [random.randrange(chunks) for _ in range(20000)]
        t = time.perf_counter()
        for i in range(0, len(probes), 1024):  # as the destager asks: once per batch
            cat.max_his(1, probes[i : i + 1024])
        max_hi_us = (time.perf_counter() - t) / len(probes) * 1e6
        t = time.perf_counter()
        for c in probes:
            cat.find_preserved(1, c, random.randrange(hi))
        find_us = (time.perf_counter() - t) / len(probes) * 1e6
        size = os.path.getsize(os.path.join(d, "pool.db"))
        cat.close()
    commits.sort()
    print(f"rows={args.rows} batch={args.batch}")
    print(f"batch commit: p50 {statistics.median(commits) * 1e3:.2f} ms, "
          f"p99 {commits[int(len(commits) * 0.99)] * 1e3:.2f} ms "
          f"({total / args.rows * 1e6:.1f} us per row incl. commit)")
    print(f"max_hi lookup (batched): {max_hi_us:.1f} us per chunk; "
          f"find_preserved lookup: {find_us:.1f} us")
    print(f"index size: {size / args.rows:.0f} bytes per row")


if __name__ == "__main__":
    main()
