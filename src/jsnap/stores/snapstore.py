"""The raw volumes' snapshot store: one file of chunk-sized slots holding preserved chunks.

Model
-----
Slot s is bytes [s * chunk_size, (s + 1) * chunk_size) of the store file. The catalog's
`preserved` rows name the slots in use (stores/catalog.py); every other slot below `count`
is on the free list, lowest first, so the file stays compact. Thin volumes keep their
preserved chunks as pool extents instead (stores/thin.py).

Invariants
----------
S1 A slot is owned by at most one preserved row. The destager takes one with `alloc`
   before it copies into it, and hands it back with `give_back` if its batch fails before
   the commit that would index it (nothing names it yet).
S2 A slot whose last row is gone (`free`) has its blocks punched out before it is reused,
   so the file system gets the space back and a reused slot never shows stale bytes.
S3 At open, the free list is every slot below the file's end that no row names: the
   catalog is the truth, a crash can only leave a slot unused, never doubly used. On a
   block device (which cannot grow) "the end" is the highest slot in use, and slots past
   it are handed out up to the device's size, then alloc raises ENOSPC (the destager
   waits for space: never a snapshot silently broken).

Thread safety: the free list has its own lock; the file is read and written without it.
"""

from __future__ import annotations

import errno
import heapq
import threading
from collections.abc import Iterable

from jsnap.stores.files import BlockFile


class SlotStore:
    def __init__(self, file: BlockFile, chunk_size: int, used: Iterable[int]) -> None:
        self.file = file
        self.cs = chunk_size
        in_use = set(used)
        grows = file.caps.resize
        end = -(-file.size() // chunk_size) if grows else 0
        self.limit = None if grows else file.size() // chunk_size  # a device's slots
        self.count = max(end, max(in_use, default=-1) + 1)
        self._free = [s for s in range(self.count) if s not in in_use]  # heap (S3)
        heapq.heapify(self._free)
        self._lock = threading.Lock()

    def alloc(self) -> int:
        """A free slot, growing the store by one when none is free (S1)."""
        with self._lock:
            if self._free:
                return heapq.heappop(self._free)
            if self.limit is not None and self.count >= self.limit:
                raise OSError(errno.ENOSPC, f"snapshot store {self.file.path} is full "
                              f"({self.limit} slots)")
            self.count += 1
            return self.count - 1

    def give_back(self, slots: Iterable[int]) -> None:
        """Slots taken by a batch that failed before indexing them (S1)."""
        with self._lock:
            for slot in slots:
                heapq.heappush(self._free, slot)

    def free(self, slots: Iterable[int]) -> None:
        """Slots no row names any more: punched, then free (S2)."""
        slots = list(slots)
        for slot in slots:
            self.file.punch_hole(slot * self.cs, self.cs)
        self.give_back(slots)

    def free_slots(self) -> list[int]:
        with self._lock:
            return list(self._free)

    @property
    def free_count(self) -> int:
        return len(self._free)  # status and metrics: no copy of a list of every free slot

    def preadinto(self, out: memoryview, slot: int, offset: int = 0) -> None:
        self.file.preadinto(out, slot * self.cs + offset)

    def close(self) -> None:
        self.file.close()
