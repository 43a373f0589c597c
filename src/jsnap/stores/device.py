"""A block device as a store (the journal on an NVMe partition, a pmem namespace, a
battery-backed device), and `open_store`, the opener that picks the store by what a path is.

Model
-----
`DeviceFile` is an `OsFile` on a block device: the same positional syscalls through the
device's page cache, the same `fdatasync` (which on a block device also flushes the
device's volatile write cache). What differs is what a device can do, and `caps` says it:

    size       the device's (BLKGETSIZE64), fixed: no truncate, no allocate (every block
               exists already; there is nothing to reserve and nothing to grow)
    zeroing    BLKZEROOUT (NOUNMAP: the blocks stay provisioned), which the kernel turns
               into the device's WRITE ZEROES when it has one (`zero_fast`, read from the
               queue's write_zeroes_max_bytes) and into written zero pages otherwise
    punch      fallocate(PUNCH_HOLE) on the device: zeroes that may also deallocate
               (thin LUNs, SSDs), else BLKZEROOUT. Never BLKDISCARD: a discarded range
               is not promised to read back as zeroes.

The kernel takes zeroing only in whole logical blocks (BLKSSZGET); the ragged edges of a
range are written as zeroes. Ordinary reads and writes need no alignment: they go through
the page cache. O_DIRECT measured 15-40 % faster for a lone journal append + fdatasync on
a loop device, no faster with group commit (bench/journal_device.py); it would need
records aligned to the device's blocks (the journal packs them at 64 bytes) and would make
the destager read back from the device what it now finds in the page cache.

Invariants
----------
D1 A device is claimed: a second descriptor opened O_EXCL, so the kernel refuses it while
   it is mounted or held by md, device-mapper or another exclusive opener (another jsnap
   serving it), and nobody can mount it while jsnap holds it. The claim belongs to the
   process that opened it: a forked child (the journal's replay scanner) closes its copy
   at once, so a restart after a crash never finds the device busy because a child of the
   dead server was still dying.
D2 Its size never changes through jsnap: truncate and allocate raise EOPNOTSUPP (and caps
   says resize=False, allocate=False, so the engine never asks).
D3 After zero_range, zero_allocated or punch_hole returns, the range reads as zeroes, in
   the page cache too (the kernel drops the range's cached pages).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import struct
import subprocess
import weakref

from jsnap.stores.files import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    BlockFile,
    OsFile,
    StoreCaps,
    libc_fallocate,
)
from jsnap.stores.remote import NbdStore, is_nbd_uri

# <linux/fs.h>
BLKSSZGET = 0x1268  # logical block size, int
BLKGETSIZE64 = 0x80081272  # size in bytes, u64
BLKZEROOUT = 0x127F  # u64[2] {start, length}, both multiples of the logical block size
_RANGE = struct.Struct("=QQ")
# Zeroing goes to the kernel in slices: a device without WRITE ZEROES has the kernel write
# every zero page, and one call over a whole big device would not return for minutes.
ZERO_SLICE = 1 << 30


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _queue_limit(rdev: int, name: str) -> int:
    """A number from the device's request queue in sysfs (a partition's is its disk's)."""
    base = os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    if os.path.exists(os.path.join(base, "partition")):
        base = os.path.dirname(base)
    try:
        with open(os.path.join(base, "queue", name)) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class DeviceFile(OsFile):
    """A block device accessed with positional syscalls; safe to share between threads."""

    kernel_copy = False  # copy_file_range takes regular files only

    def __init__(self, path: str, create: bool = False) -> None:
        # create is the opener's signature: a device exists or the open fails (ENOENT).
        self._claim = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_EXCL)  # D1
        try:
            st = os.fstat(self._claim)
            if not stat.S_ISBLK(st.st_mode):
                raise OSError(errno.ENOTBLK, os.strerror(errno.ENOTBLK), path)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(self._claim)
            raise
        try:
            self.block_size: int = struct.unpack(
                "i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
            self._size: int = struct.unpack(
                "Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        except BaseException:
            os.close(fd)
            os.close(self._claim)
            raise
        self._attach(path, fd)
        _claimed.add(self)
        self.caps = StoreCaps(
            allocate=False, resize=False, page_cache=True,
            zero_fast=_queue_limit(st.st_rdev, "write_zeroes_max_bytes") > 0,
        )

    def _zeroing_fd(self) -> int:
        """The claiming descriptor: the kernel drops a zeroed range's cached pages, dirty
        ones included, only for an exclusive opener; for others it tries to invalidate
        them and fails with EBUSY on a dirty one."""
        return self._claim if self._claim >= 0 else self.fd

    def _zero_edges(self, offset: int, length: int) -> tuple[int, int]:
        """Write zeroes over the parts of [offset, offset+length) outside whole logical
        blocks; return the whole-block middle (start, end), maybe empty."""
        end = offset + length
        if end > self._size:
            raise OSError(errno.ENOSPC, f"zeroing past the end of the device ({self._size} "
                          "bytes)", self.path)
        bs = self.block_size
        start, stop = -(-offset // bs) * bs, end // bs * bs
        if start >= stop:  # no whole block inside
            if end > offset:
                self.pwrite(bytes(end - offset), offset)
            return 0, 0
        if start > offset:
            self.pwrite(bytes(start - offset), offset)
        if end > stop:
            self.pwrite(bytes(end - stop), stop)
        return start, stop

    def zero_range(self, offset: int, length: int) -> None:
        """Zeroes that stay provisioned (BLKZEROOUT: WRITE ZEROES where the device has it,
        written zero pages where not); D3."""
        start, stop = self._zero_edges(offset, length)
        for pos in range(start, stop, ZERO_SLICE):
            n = min(ZERO_SLICE, stop - pos)
            fcntl.ioctl(self._zeroing_fd(), BLKZEROOUT, _RANGE.pack(pos, n))

    def zero_allocated(self, offset: int, length: int) -> None:
        self.zero_range(offset, length)  # a device's blocks are always allocated

    def punch_hole(self, offset: int, length: int) -> None:
        """Zeroes the device may deallocate (fallocate PUNCH_HOLE: the kernel's WRITE ZEROES
        with unmap, never a bare discard), else written zeroes; D3."""
        if length <= 0:
            return
        start, stop = self._zero_edges(offset, length)
        if start >= stop:
            return
        rc = libc_fallocate(self._zeroing_fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start,
                            stop - start)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), self.path)
        self.zero_range(start, stop - start)

    def allocate(self, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "a block device has no space to allocate", self.path)

    def truncate(self, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "a block device cannot be resized", self.path)

    def size(self) -> int:
        return self._size

    def drop_claim(self) -> None:
        claim, self._claim = self._claim, -1
        if claim >= 0:
            os.close(claim)

    def close(self) -> None:
        self.drop_claim()
        super().close()


_claimed: weakref.WeakSet[DeviceFile] = weakref.WeakSet()


def _drop_claims_in_child() -> None:
    for f in list(_claimed):
        f.drop_claim()


os.register_at_fork(after_in_child=_drop_claims_in_child)  # D1


def open_store(path: str, create: bool = False) -> BlockFile:
    """The store for `path` by what it is: an NbdStore for an NBD URI (stores/remote.py), a
    DeviceFile on a block device, an OsFile for a regular file (created if `create` and
    missing). The pool's default opener."""
    if is_nbd_uri(path):
        return NbdStore(path)
    if is_block_device(path):
        return DeviceFile(path)
    return OsFile(path, create)


# -- what a device already holds ----------------------------------------------------------------

# Used when blkid is missing: (offset, magic, what). ext2/3/4 share one magic.
_MAGICS = (
    (1080, b"\x53\xef", "an ext2/3/4 file system"),
    (0, b"XFSB", "an xfs file system"),
    (65600, b"_BHRfS_M", "a btrfs file system"),
    (512, b"EFI PART", "a gpt partition table"),
    (512, b"LABELONE", "an LVM physical volume"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (3, b"NTFS    ", "an ntfs file system"),
    (510, b"\x55\xaa", "a dos partition table or boot sector"),
)


def known_magic(f: BlockFile) -> str | None:
    """What well-known on-disk signature `f` starts with (a short table; blkid knows more)."""
    head = f.pread(65608, 0)
    for at, magic, what in _MAGICS:
        if head[at : at + len(magic)] == magic:
            return what
    return None


def foreign_content(path: str, f: BlockFile) -> str | None:
    """What a device holds that is not ours to overwrite (a file system, a partition table,
    a RAID or LVM member), as 'a TYPE file system (blkid)'; None when nothing is found.
    `blkid -p` probes the device itself (no cache); without blkid, a short magic table."""
    blkid = shutil.which("blkid") or next(
        (p for p in ("/usr/sbin/blkid", "/sbin/blkid") if os.path.exists(p)), None)
    if blkid is None:
        return known_magic(f)
    p = subprocess.run([blkid, "-p", "-o", "export", path], capture_output=True, text=True,
                       timeout=60)
    if p.returncode == 2:  # blkid: nothing found
        return None
    if p.returncode == 8:  # blkid: signatures of more than one kind
        return "more than one file system or RAID signature (blkid: ambivalent)"
    tags = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    if p.returncode != 0 or not tags:
        why = (p.stderr.strip() or f"exit code {p.returncode}").splitlines()[0]
        raise OSError(errno.EIO, f"cannot probe with blkid: {why}", path)
    if "PTTYPE" in tags and "TYPE" not in tags:
        return f"a {tags['PTTYPE']} partition table (blkid)"
    kind = tags.get("TYPE", "unknown")
    usage = tags.get("USAGE", "")
    what = "file system" if usage == "filesystem" else (usage or "signature")
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind} {what} (blkid)"
