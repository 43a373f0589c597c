"""Write sequential 4 KiB blocks, each stamped with its index, one request at a time.

Run by Debian's /usr/bin/python3: `stamp_writer.py URI FIRST COUNT [FLUSH_EVERY]`.
For each block i in FIRST..FIRST+COUNT-1 it prints, once the write is acknowledged:

    w I T_ISSUE T_ACK

(times from CLOCK_MONOTONIC, comparable with time.monotonic() of any process on the host).
Every FLUSH_EVERY blocks (0 = never) it flushes and prints `f I T_ACK` with the last block
index the flush covers. It stops early when a line arrives on stdin, and prints
`e MESSAGE` and exits 0 when a request fails (the server went away).
"""

import os
import select
import struct
import sys
import time

import nbd

BLOCK = 4096
MAGIC = 0x4A534E4150535450  # "JSNAPSTP"


def stamp(i):
    return struct.pack("<QQ", MAGIC, i) * (BLOCK // 16)


def main():
    uri, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    flush_every = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    h = nbd.NBD()
    h.connect_uri(uri)
    print("ready", flush=True)
    out = sys.stdout
    poll = select.poll()
    poll.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
    try:
        for i in range(first, first + count):
            if poll.poll(0):
                break
            t0 = time.monotonic()
            h.pwrite(stamp(i), i * BLOCK)
            t1 = time.monotonic()
            out.write(f"w {i} {t0:.6f} {t1:.6f}\n")
            if flush_every and (i - first + 1) % flush_every == 0:
                h.flush()
                out.write(f"f {i} {time.monotonic():.6f}\n")
            out.flush()
    except nbd.Error as e:
        out.write(f"e {e}\n")
        out.flush()
        os._exit(0)
    out.write("done\n")
    out.flush()
    h.shutdown()


if __name__ == "__main__":
    main()
