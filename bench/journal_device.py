"""Journal appends + fdatasync on a block device, buffered against O_DIRECT, and on a file:
the measurement behind DeviceFile using the page cache (stores/device.py).

    python bench/journal_device.py [--dir DIR] [--device /dev/X]   (root: losetup)

Without --device, a loop device is attached over a file in DIR (default: the current
directory; /dev/shm gives a loop device on tmpfs, the stand-in for NVRAM) and detached at
the end. --device writes over the start of a real device: everything on it is lost.

Each run appends records of one size at consecutive positions, as the journal does, and
calls fdatasync after every `batch` of them (1: `sync` mode at queue depth 1; 32: group
commit). Buffered appends start at 64-byte aligned positions, as journal records do;
O_DIRECT ones must be whole logical blocks from aligned memory, so each is rounded up to
4 KiB (the layout O_DIRECT would force on the journal: its best case here).
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import tempfile
import time

SIZE = 256 << 20
RECORDS = (4160, 65600)  # a 4 KiB and a 64 KiB write, each with its 64-byte header
BATCHES = (1, 32)


def run(path: str, direct: bool, rec: int, batch: int, seconds: float = 2.0) -> float:
    """Microseconds per record, appending for about `seconds`."""
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    step = -(-rec // 4096) * 4096 if direct else -(-rec // 64) * 64
    buf = mmap.mmap(-1, step)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(step))
    view = memoryview(buf)[: step if direct else rec]
    pos, n = 4096, 0
    t0 = time.perf_counter()
    try:
        while True:
            for _ in range(batch):
                if pos + step > SIZE:
                    pos = 4096
                os.pwrite(fd, view, pos)
                pos += step
                n += 1
            os.fdatasync(fd)
            if time.perf_counter() - t0 > seconds:
                break
    finally:
        view.release()
        buf.close()
        os.close(fd)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=".")
    ap.add_argument("--device")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        backing = os.path.join(d, "backing.img")
        with open(backing, "wb") as f:
            f.write(bytes(SIZE))  # written blocks: no unwritten extents in the way
        dev = a.device
        if dev is None:
            dev = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                                 capture_output=True, text=True).stdout.strip()
        try:
            plain = os.path.join(d, "journal.dat")
            with open(plain, "wb") as f:
                f.write(bytes(SIZE))
            for rec in RECORDS:
                for batch in BATCHES:
                    row = [f"{run(p, direct, rec, batch):7.1f}"
                           for p in (dev, plain) for direct in (False, True)]
                    print(f"{rec:6d}-byte records, fdatasync every {batch:2d}: "
                          f"device buffered {row[0]} us, O_DIRECT {row[1]} us; "
                          f"file buffered {row[2]} us, O_DIRECT {row[3]} us")
        finally:
            if a.device is None:
                subprocess.run(["losetup", "-d", dev], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
