"""What the journal's file layout costs the kernel: the two measurements behind writing the
journal's blocks at init and padding appends to a page boundary (BENCHMARKS.md, run 6).

    python bench/journal_io.py [--dir DIR]

1. `fdatasync` after a 64 KiB write, on a sparse, a fallocated (unwritten extents) and a
   written file: on the first two every sync also commits a filesystem metadata change.
2. A 4160-byte append (64-byte header + 4 KiB, as a journal record) at 64-byte aligned
   positions into a written file whose pages were evicted, with and without padding the
   write to the next page boundary: without, the kernel reads each partly written page.

DIR must be on the disk under test (default: the current directory), not tmpfs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

SIZE = 64 << 20


def _fresh(path: str, layout: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    if layout == "sparse":
        os.ftruncate(fd, SIZE)
    elif layout == "fallocated":
        os.posix_fallocate(fd, 0, SIZE)
    else:
        zeroes = bytes(8 << 20)
        for pos in range(0, SIZE, len(zeroes)):
            os.pwrite(fd, zeroes, pos)
    os.fsync(fd)
    return fd


def fdatasync_cost(path: str, layout: str, n: int = 500) -> tuple[float, float]:
    fd = _fresh(path, layout)
    data = os.urandom(64 << 10)
    times = []
    for i in range(n):
        os.pwrite(fd, data, i * len(data))
        t = time.perf_counter()
        os.fdatasync(fd)
        times.append(time.perf_counter() - t)
    os.close(fd)
    times.sort()
    return times[n // 2] * 1e6, times[n * 9 // 10] * 1e6


def append_cost(path: str, pad: bool, evicted: bool, n: int = 10000) -> float:
    fd = _fresh(path, "written")
    if evicted:
        os.posix_fadvise(fd, 0, SIZE, os.POSIX_FADV_DONTNEED)
    header, payload, zero_page = bytes(64), os.urandom(4096), bytes(4096)
    pos = 4096
    t = time.perf_counter()
    for _ in range(n):
        end = pos + len(header) + len(payload)
        bufs = [header, payload]
        if pad:
            bufs.append(zero_page[: (-end) & 4095])
        os.pwritev(fd, bufs, pos)
        pos = end
    dt = time.perf_counter() - t
    os.close(fd)
    return dt / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=".")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path = os.path.join(d, "journal-io.dat")
        for layout in ("sparse", "fallocated", "written"):
            p50, p90 = fdatasync_cost(path, layout)
            print(f"fdatasync after a 64 KiB write, {layout:10s} file: "
                  f"p50 {p50:.0f} us, p90 {p90:.0f} us")
        for evicted in (False, True):
            for pad in (False, True):
                us = append_cost(path, pad, evicted)
                print(f"4160-byte append, {'evicted' if evicted else 'cached'} pages, "
                      f"{'padded to the page end' if pad else 'not padded':22s}: {us:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
