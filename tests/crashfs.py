"""A power-loss simulator for the engine's files (after SQLite's test6.c crash VFS).

Every mutation of a file (pwrite, copy, hole punch, truncate) first saves the bytes it
replaces in that file's undo log; `sync()` of the file empties its log (those writes are now
durable). `CrashFS.crash()` then plays the page cache's loss: in "drop" mode every unsynced
write is undone; in "tear" mode a random prefix of each file's unsynced writes survives and
the next one survives only in part (whole 512-byte sectors, in any order), the rest undone.

The files are real files: only what a crash would lose is rewritten, so the engine runs its
real I/O paths. The SQLite catalog is not routed through here: SQLite's own commit protocol
covers it, and a committed transaction is durable.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Sequence

from jsnap.stores.files import PLAIN_CAPS, BlockFile, Buffer, OsFile, StoreCaps

SECTOR = 512


class _Log:
    """Unsynced mutations of one path, oldest first: (offset, old bytes, old file size)."""

    def __init__(self) -> None:
        self.undo: list[tuple[int, bytes, int]] = []


class CrashFile:
    # No allocate(): a crash could not undo it, and growth by truncate() is undone.
    caps: StoreCaps = PLAIN_CAPS

    def __init__(self, fs: CrashFS, path: str, create: bool) -> None:
        self.fs = fs
        self.path = path
        self.f = OsFile(path, create=create)
        self.log = fs.logs.setdefault(path, _Log())

    def _save(self, offset: int, length: int) -> None:
        size = self.f.size()
        old = self.f.pread(length, offset) if offset < size else b""
        old = old[: max(0, min(length, size - offset))]
        self.log.undo.append((offset, old, size))

    def pread(self, length: int, offset: int) -> bytes:
        return self.f.pread(length, offset)

    def preadinto(self, buf: memoryview, offset: int) -> int:
        return self.f.preadinto(buf, offset)

    def pwrite(self, data: Buffer, offset: int) -> None:
        self.fs.check_io(self.path, "write")
        self._save(offset, len(memoryview(data).cast("B")))
        self.f.pwrite(data, offset)

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> None:
        self.pwrite(b"".join(bytes(b) for b in bufs), offset)

    def copy_from(self, src: BlockFile, src_offset: int, length: int, offset: int) -> None:
        self.pwrite(src.pread(length, src_offset), offset)

    def punch_hole(self, offset: int, length: int) -> None:
        self.fs.check_io(self.path, "write")
        self._save(offset, length)
        self.f.punch_hole(offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        self.fs.check_io(self.path, "write")
        self._save(offset, length)
        self.f.zero_range(offset, length)

    def zero_allocated(self, offset: int, length: int) -> None:
        self.zero_range(offset, length)

    def allocate(self, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "crash-simulated files do not preallocate", self.path)

    def truncate(self, size: int) -> None:
        old_size = self.f.size()
        if size < old_size:
            self._save(size, old_size - size)
        else:
            self.log.undo.append((old_size, b"", old_size))
        self.f.truncate(size)

    def size(self) -> int:
        return self.f.size()

    def sync(self) -> None:
        self.fs.check_io(self.path, "sync")
        self.f.sync()
        self.log.undo.clear()

    def drop_cache(self, offset: int, length: int) -> bool:
        return self.f.drop_cache(offset, length)  # the page cache is not what a crash loses

    def close(self) -> None:
        self.f.close()


class CrashFS:
    """Opener for Engine.open(opener=...) whose files can lose unsynced writes on crash()."""

    def __init__(self, seed: int = 0) -> None:
        self.logs: dict[str, _Log] = {}
        self.rng = random.Random(seed)
        self.fail_on: tuple[str, str] | None = None  # (path suffix, "write"|"sync") -> EIO

    def __call__(self, path: str, create: bool = False) -> CrashFile:
        return CrashFile(self, path, create)

    def check_io(self, path: str, op: str) -> None:
        if self.fail_on is not None and path.endswith(self.fail_on[0]) and op == self.fail_on[1]:
            raise OSError(5, "Input/output error (injected)", path)

    def crash(self, mode: str = "drop") -> None:
        """Lose unsynced writes as a power cut would. Call after the engine was abandoned."""
        for path, log in self.logs.items():
            undo = log.undo
            keep = 0
            if mode == "tear" and undo:
                keep = self.rng.randrange(len(undo) + 1)
            f = OsFile(path)
            try:
                # Undo newest first so each restore sees the state its write found.
                for i in range(len(undo) - 1, keep - 1, -1):
                    offset, old, old_size = undo[i]
                    if mode == "tear" and i == keep:
                        self._restore_some_sectors(f, offset, old)
                    else:
                        if old:
                            f.pwrite(old, offset)
                        if f.size() != old_size:
                            f.truncate(old_size)
                f.sync()
            finally:
                f.close()
            undo.clear()

    def _restore_some_sectors(self, f: OsFile, offset: int, old: bytes) -> None:
        """The write at `offset` reached the disk only partly: restore a random subset of its
        sectors to their old content (a torn write)."""
        for s in range(0, len(old), SECTOR):
            if self.rng.random() < 0.5:
                f.pwrite(old[s : s + SECTOR], offset + s)
