"""The stores the engine keeps data in, behind one small interface.

Every byte the engine writes to the journal, to production or to the snapshot store goes
through a `BlockFile`: read into, write, copy, punch, zero, allocate, resize, size, sync,
close, and `caps`, what the store can do (StoreCaps). The engine asks `caps`, never which
kind of store it has (nbdkit's `can_*` per layer), so a block device or another server's
NBD export can stand beside `OsFile`, thin `os.pread`/`os.pwrite`/`os.fdatasync` on a
regular file: `DeviceFile` (stores/device.py) is the block-device one, and
`device.open_store` picks between them by what the path is. Tests substitute a layer that keeps
unsynced writes apart and drops or tears them on a simulated power loss (tests/crashfs.py),
the way SQLite's test6.c crash VFS does; tools/faults.py injects errors.

Durability contract (borg's SyncFile): everything written before `sync()` returns is durable;
nothing is promised about writes that were not followed by a completed `sync()`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# fallocate(2) and its flags from <linux/falloc.h>: Python's os module has no hole punching
# (stores/device.py uses them too).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_BLOCK = memoryview(bytes(1 << 20))
# OsFile remembers which 2 MiB windows served reads (one bit each), for READ_MEMORY to
# 2 * READ_MEMORY seconds, and which windows it wrote with writes of LARGE_WRITE bytes or
# more: drop_cache drops only the latter, and never the former (jsnap.core.destager, "Page cache").
WINDOW_SHIFT = 21
READ_MEMORY = 10.0
LARGE_WRITE = 64 << 10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc_fallocate = _libc.fallocate
libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc_fallocate.restype = ctypes.c_int

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class StoreCaps:
    """What a store can do beyond the calls every store has."""

    allocate: bool = False  # allocate() reserves blocks ahead of writes (ENOSPC at once)
    zero_fast: bool = False  # zero_allocated() is a metadata operation, not written zeroes
    resize: bool = True  # truncate() changes its size (a file does; a block device does not)
    page_cache: bool = False  # drop_cache() can release page cache


class StoreUnavailable(OSError):
    """The store cannot be reached now (a remote store's connection broke or cannot be
    made): a call failed without an answer, and what was written to the store since its
    last sync is in doubt; nothing else is. Waited out and redone by the destager
    (core/destager.py, "Outages"), unlike other I/O errors. errno EIO."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


FILE_CAPS = StoreCaps(allocate=True, zero_fast=True, resize=True, page_cache=True)
PLAIN_CAPS = StoreCaps()  # only the calls every store has (test and fault layers)


class BlockFile(Protocol):
    path: str

    @property
    def caps(self) -> StoreCaps: ...

    def pread(self, length: int, offset: int) -> bytes: ...
    def preadinto(self, buf: memoryview, offset: int) -> int: ...
    def pwrite(self, data: Buffer, offset: int) -> None: ...
    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> None: ...
    def copy_from(self, src: BlockFile, src_offset: int, length: int, offset: int) -> None: ...
    def punch_hole(self, offset: int, length: int) -> None: ...
    def zero_range(self, offset: int, length: int) -> None: ...
    def zero_allocated(self, offset: int, length: int) -> None: ...
    def allocate(self, offset: int, length: int) -> None: ...
    def truncate(self, size: int) -> None: ...
    def size(self) -> int: ...
    def sync(self) -> None: ...
    def drop_cache(self, offset: int, length: int) -> bool: ...
    def close(self) -> None: ...


class OsFile:
    """A regular file accessed with positional syscalls; safe to share between threads."""

    caps = FILE_CAPS
    kernel_copy = True  # copy_file_range works between two of these (regular files only)

    def __init__(self, path: str, create: bool = False) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        self._attach(path, os.open(path, flags, 0o600))

    def _attach(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self._read_now = bytearray()  # windows read in this period, one bit each
        self._read_before = bytearray()  # ... and in the one before
        self._period_end = 0.0
        self._written_large = bytearray()  # windows this process wrote large, not dropped since

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # past EOF of a sparse/short file reads as zeroes
            data += bytes(length - len(data))
        return data

    def preadinto(self, buf: memoryview, offset: int) -> int:
        want = len(buf)
        w = offset >> WINDOW_SHIFT
        seen = self._read_now  # (racing readers may lose a bit: it is advice)
        if len(seen) > w >> 3 and (offset + want - 1) >> WINDOW_SHIFT == w:
            seen[w >> 3] |= 1 << (w & 7)
        else:
            self._note_read(offset, want)
        got = os.preadv(self.fd, [buf], offset)
        while got < want:
            n = os.preadv(self.fd, [buf[got:]], offset + got)
            if n == 0:
                buf[got:] = bytes(want - got)
                break
            got += n
        return want

    def _note_read(self, offset: int, length: int, seen: bytearray | None = None) -> None:
        """Mark the windows of [offset, offset+length) read (see drop_cache), or in `seen`."""
        w, last = offset >> WINDOW_SHIFT, (offset + max(length, 1) - 1) >> WINDOW_SHIFT
        if seen is None:
            seen = self._read_now
        if len(seen) <= last >> 3:
            seen.extend(bytes((last >> 3) + 1 - len(seen)))
        while w <= last:
            seen[w >> 3] |= 1 << (w & 7)
            w += 1

    def pwrite(self, data: Buffer, offset: int) -> None:
        # Callers pass bytes, bytearrays and byte-format memoryviews: len() is bytes.
        n = os.pwrite(self.fd, data, offset)
        if n >= LARGE_WRITE:
            self._note_read(offset, n, self._written_large)
        if n < len(data):  # rare short write: finish the rest
            view = memoryview(data).cast("B")[n:]
            while view:
                offset += n
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> None:
        # Callers pass bytes, bytearrays and byte-format memoryviews: len() is bytes.
        n = os.pwritev(self.fd, bufs, offset)
        if n >= LARGE_WRITE:
            self._note_read(offset, n, self._written_large)
        total = sum(map(len, bufs))
        if n < total:  # rare short write: finish the rest piecewise
            joined = b"".join(bytes(b) for b in bufs)
            self.pwrite(memoryview(joined)[n:], offset + n)

    def copy_from(self, src: BlockFile, src_offset: int, length: int, offset: int) -> None:
        # copy_file_range keeps the bytes in the kernel; fall back to read+write across
        # filesystems or for wrapped (test) files.
        if length >= LARGE_WRITE:
            self._note_read(offset, length, self._written_large)
        if isinstance(src, OsFile) and src.kernel_copy and self.kernel_copy:
            done = 0
            try:
                while done < length:
                    n = os.copy_file_range(
                        src.fd, self.fd, length - done, src_offset + done, offset + done
                    )
                    if n == 0:  # source shorter than asked: the rest is a hole
                        break
                    done += n
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
            if done == length:
                return
            src_offset, offset, length = src_offset + done, offset + done, length - done
        self.pwrite(src.pread(length, src_offset), offset)

    def punch_hole(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        rc = libc_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if rc != 0:
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, os.strerror(err), self.path)
            self.pwrite(bytes(length), offset)  # filesystem without holes: write zeroes

    def zero_range(self, offset: int, length: int) -> None:
        """Write zeroes that stay allocated (NBD WRITE_ZEROES with NO_HOLE). Real zero blocks,
        not FALLOC_FL_ZERO_RANGE: ext4 reports unwritten extents as holes to SEEK_DATA, and
        the client asked for a range that is provisioned and reported as data."""
        zero = _ZERO_BLOCK
        for pos in range(offset, offset + length, len(zero)):
            self.pwrite(zero[: min(len(zero), offset + length - pos)], pos)

    def zero_allocated(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeroes and keep its blocks allocated: one
        FALLOC_FL_ZERO_RANGE (metadata only) where the filesystem has it, real zeroes
        elsewhere."""
        rc = libc_fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), self.path)
        self.zero_range(offset, length)

    def allocate(self, offset: int, length: int) -> None:
        """posix_fallocate: the blocks exist before any write needs them (OSError ENOSPC
        now, not at a later write); the file grows to cover the range."""
        os.posix_fallocate(self.fd, offset, length)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def drop_cache(self, offset: int, length: int) -> bool:
        """Advice only: let the kernel drop the range's clean page-cache folios (dirty ones
        are left, their writeback started). Only if every 2 MiB window of the range was
        written by this OsFile with a large write (its big folios are ours: page cache
        that was there before, from reads or an earlier process, is never dropped), and
        none served a read (preadinto) in the last READ_MEMORY seconds or so (reads would
        then go to the disk). Returns whether it dropped. Data is unaffected."""
        now = time.monotonic()
        if now >= self._period_end:
            self._read_before, self._read_now = self._read_now, bytearray()
            self._period_end = now + READ_MEMORY
        recent, before, large = self._read_now, self._read_before, self._written_large
        first, last = offset >> WINDOW_SHIFT, (offset + length - 1) >> WINDOW_SHIFT
        for w in range(first, last + 1):
            i, bit = w >> 3, 1 << (w & 7)
            if (len(recent) > i and recent[i] & bit) or (len(before) > i and before[i] & bit):
                return False
            if len(large) <= i or not large[i] & bit:
                return False
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        for w in range(first, last + 1):
            large[w >> 3] &= ~(1 << (w & 7)) & 0xFF  # small folios from here on
        return True

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def grow(f: BlockFile, offset: int, length: int) -> None:
    """Make f cover [offset, offset+length): allocated where the store can (ENOSPC now),
    else by resizing (a sparse file)."""
    if f.caps.allocate:
        try:
            f.allocate(offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    if f.size() < offset + length:
        f.truncate(offset + length)


class FileOpener(Protocol):
    def __call__(self, path: str, create: bool = False) -> BlockFile: ...


def sync_dir(path: str) -> None:
    """fsync a directory so a create/rename/unlink in it is durable (only EINVAL is ignored)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
