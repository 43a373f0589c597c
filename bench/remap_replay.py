"""Restart cost of pending REMAP data: replay reads it back to check its CRC32C.

    python bench/remap_replay.py [--dir DIR] [--journal-size 1G] [--drop-caches]

Makes a pool whose journal holds as many 1 MiB REMAP records as the bound allows (pending
remapped data = Backlog.remap_limit: the journal's size, at most REMAP_MAX_PENDING), abandons
it as a crash would, and times Engine.open.
--drop-caches (root) evicts the page cache first, as after a power cut.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.units import parse_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="parent directory (on the disk, not tmpfs)")
    ap.add_argument("--journal-size", default="1G")
    ap.add_argument("--drop-caches", action="store_true")
    args = ap.parse_args()
    top = tempfile.mkdtemp(prefix="jsnap-remap-replay-", dir=args.dir)
    try:
        path = os.path.join(top, "pool")
        jsize = parse_size(args.journal_size)
        init_pool(path, journal_size=jsize)
        e = Engine.open(path, start_destager=False)
        v = e.volume_create("v", 2 * jsize, thin=True)
        buf = os.urandom(1 << 20)
        n = 0
        while e.backlog.remap_bytes + len(buf) <= e.backlog.remap_limit:
            e.write(v, n << 20, buf)
            n += 1
        e.flush()
        pending = e.backlog.remap_bytes
        e.abandon()
        os.sync()
        if args.drop_caches:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        t = time.monotonic()
        e = Engine.open(path, start_destager=False)
        took = time.monotonic() - t
        assert e.read(e.volume("v"), (n - 1) << 20, len(buf)) == buf
        e.close()
        print(f"pending remapped data {pending >> 20} MiB in {n} records: open took "
              f"{took:.2f} s (replay {e.replay_seconds:.2f} s)"
              + (", cold cache" if args.drop_caches else ""))
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
