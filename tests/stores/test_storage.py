"""The store interface (jsnap.stores.files): what a store says it can do decides what the engine
does with it, never which class it is."""

from __future__ import annotations

import os

from crashfs import CrashFS

from jsnap.stores.files import FILE_CAPS, PLAIN_CAPS, OsFile, grow

MiB = 1 << 20


def test_grow_allocates_on_a_store_that_can(tmp_path):
    f = OsFile(str(tmp_path / "f"), create=True)
    try:
        assert f.caps is FILE_CAPS and f.caps.allocate
        grow(f, 0, 4 * MiB)
        assert f.size() == 4 * MiB
        assert os.fstat(f.fd).st_blocks * 512 >= 4 * MiB, "blocks exist before any write"
    finally:
        f.close()


def test_grow_resizes_a_store_that_cannot_allocate(tmp_path):
    fs = CrashFS()
    f = fs(str(tmp_path / "f"), create=True)
    try:
        assert f.caps is PLAIN_CAPS and not f.caps.allocate
        grow(f, 0, 4 * MiB)
        assert f.size() == 4 * MiB
        assert os.stat(f.path).st_blocks == 0, "sparse: growth by resize"
        grow(f, 0, MiB)
        assert f.size() == 4 * MiB, "growing never shrinks"
    finally:
        f.close()


def test_zero_allocated_keeps_blocks_and_reads_zeroes(tmp_path):
    f = OsFile(str(tmp_path / "f"), create=True)
    try:
        f.pwrite(b"x" * MiB, 0)
        f.zero_allocated(4096, 8192)
        assert f.pread(MiB, 0) == b"x" * 4096 + bytes(8192) + b"x" * (MiB - 12288)
        assert os.fstat(f.fd).st_blocks * 512 >= MiB
    finally:
        f.close()
