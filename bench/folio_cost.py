"""Kernel cost of a 4 KiB buffered write, by how the file's pages came into the page cache.

On this machine (Linux 6.18, ext4) a 4 KiB `pwrite` into a page-cache folio that a large
write or a sequential read created walks every buffer head of that folio, on the write and
again at writeback. Every NBD server in bench/run.py pays it in its random-write runs (the
prefill writes 1 MiB at a time; the settle step reads each backing file with 4 MiB reads),
and jsnap's destager pays it until it drops such windows from the page cache (its module
doc). This script shows the effect on one file, without any server:

    python bench/folio_cost.py [--dir /tmp] [--size 1G] [--seconds 2]

For each cache state it prints the CPU time per 4 KiB write (system time mostly), with and
without an fdatasync every 1024 writes (the destager's batch). Dropping the page cache needs
root; without it that state is skipped.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

from jsnap.units import parse_size

MiB = 1 << 20


def fill(path: str, size: int) -> None:
    """Write the file with 1 MiB writes (as a sequential prefill does) and sync it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        buf = os.urandom(MiB)
        for off in range(0, size, MiB):
            os.pwrite(fd, buf, off)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def read_all(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MiB)
        while f.readinto(buf):
            pass


def drop_caches() -> bool:
    """Empty the page cache (root only); False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def random_writes(path: str, size: int, seconds: float, sync_every: int) -> tuple[int, float]:
    """4 KiB writes at random aligned offsets; returns (writes, CPU seconds per write)."""
    fd = os.open(path, os.O_RDWR)
    try:
        rng = random.Random(1)
        buf = os.urandom(4096)
        blocks = size // 4096
        n = 0
        c0, t0 = time.process_time(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            for _ in range(1024):
                os.pwrite(fd, buf, rng.randrange(blocks) * 4096)
            n += 1024
            if sync_every:
                os.fdatasync(fd)
        return n, (time.process_time() - c0) / n
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where the test file goes (on disk)")
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    fd, path = tempfile.mkstemp(prefix="jsnap-folio-", dir=a.dir)
    os.close(fd)
    try:
        for sync_every in (0, 1024):
            how = "fdatasync every 1024" if sync_every else "no sync"
            for state in ("after 1 MiB writes", "cold (drop_caches)", "after a 4 MiB-read pass"):
                if state.startswith("after 1 MiB"):
                    fill(path, a.size)
                elif not drop_caches():
                    print(f"{state:24s} skipped: dropping the page cache needs root")
                    continue
                if state.startswith("after a 4 MiB"):
                    read_all(path)
                n, cpu = random_writes(path, a.size, a.seconds, sync_every)
                print(f"{state:24s} {how:21s} {n:8d} writes  {cpu * 1e6:6.1f} us CPU/write")
        return 0
    finally:
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
