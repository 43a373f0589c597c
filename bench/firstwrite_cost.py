"""Destage cost of a first write to a chunk after 0, 1, 10 and 100 snapshots, in process.

    python bench/firstwrite_cost.py [--dir DIR] [--profile N]

A thin 1 GiB volume (64K chunks) is filled and destaged; then, for each snapshot count, the
missing snapshots are taken, one 4 KiB write goes to each of the first 4000 chunks and one
destage is timed (wall and CPU per write). The same chunks are written in every round, each
time the first write since the newest snapshot: the work the snapcost workload of run.py
measures over NBD, without the network, fio or the page-cache effects of a long harness.
`--profile N` prints a cProfile of the destage after N snapshots.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import tempfile
import time

from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool

CHUNK = 64 << 10
WRITES = 4000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=".", help="where the pool goes (on the disk under test)")
    ap.add_argument("--profile", type=int, default=-1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        pool = os.path.join(d, "pool")
        init_pool(pool, journal_size=256 << 20, chunk_size=CHUNK)
        e = Engine.open(pool, start_destager=False)
        try:
            v = e.volume_create("v", 1 << 30, thin=True)
            big = memoryview(os.urandom(1 << 20))
            for off in range(0, 1 << 30, 1 << 20):
                e.write_many(v, [(off, big)])
                if off % (64 << 20) == 0:
                    e.destage()
            e.destage()
            small, rng, taken = big[:4096], random.Random(1), 0
            for n in (0, 1, 10, 100):
                while taken < n:
                    taken += 1
                    e.snapshot_create(v, f"s{taken}")
                e.destage()
                for c in range(WRITES):
                    e.write_many(v, [(c * CHUNK + rng.randrange(CHUNK // 4096) * 4096, small)])
                prof = cProfile.Profile() if n == a.profile else None
                t, cpu = time.perf_counter(), time.process_time()
                if prof:
                    prof.enable()
                e.destage()
                if prof:
                    prof.disable()
                wall = (time.perf_counter() - t) / WRITES * 1e6
                used = (time.process_time() - cpu) / WRITES * 1e6
                print(f"{n:3d} snapshots: destage per first write {wall:.0f} us wall, "
                      f"{used:.0f} us CPU")
                if prof:
                    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        finally:
            e.abandon()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
