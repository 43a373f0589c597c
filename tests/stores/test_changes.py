"""The changes table keeps a whole-device discard as one piece, not one per chunk."""

from __future__ import annotations

import time

from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.units import GiB


def test_changes_whole_volume_trim_is_one_piece_and_destages(tmp_path):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=4 << 20, chunk_size=64 * 1024)
    e = Engine.open(path, start_destager=False)
    v = e.volume_create("big", 64 * GiB)  # sparse: nothing is allocated
    e.write(v, 10 * GiB, b"x" * 8192)
    t0 = time.monotonic()
    e.trim(v, 0, v.size)  # what mkfs or blkdiscard sends first
    assert time.monotonic() - t0 < 1.0
    assert e.stats()["changes_pieces"] <= 2  # the write's piece (maybe absorbed) + one
    e.write(v, 10 * GiB + 4096, b"y" * 4096)  # newer than the trim: must win over it
    assert e.read(v, 10 * GiB, 8192) == bytes(4096) + b"y" * 4096
    e.destage()
    assert e.stats()["changes_pieces"] == 0
    assert e.read(v, 10 * GiB, 8192) == bytes(4096) + b"y" * 4096
    e.close()
