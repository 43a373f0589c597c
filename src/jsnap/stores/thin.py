"""Thin volumes: logical chunks mapped to extents of a shared pool, allocated on first destage.

Model
-----
The pool's data lives in one or more data files (POOL/data-<n>.dat by default). Each file is
cut into extents of chunk_size bytes; extent id = (file number << 32) | index in the file.
A thin volume has a map chunk -> (extent, seq): `seq` is the journal seq of the record whose
destage allocated (or re-allocated) the extent. An unmapped chunk reads as zeroes without
I/O. Preserved copies of a thin volume's chunks for snapshots are pool extents too (the
preserved row's slot is an extent id, or ZERO_SLOT when the old content was zeroes).

Space (all counted in extents):
    capacity   what the pool may grow to (sum over files); over-provisioning is allowed
    backed     extents the data files have allocated from the filesystem (posix_fallocate)
    used       extents a map or a preserved row owns
    free       backed and not used: a free list (freed extents stay allocated in the file,
               so reusing them can never fail for lack of filesystem space)
    reserved   extents promised to journaled records that are not destaged yet
    fs reserve file-system space data files never grow into (fs_reserve: 1/32 of the file
               system, at least 16 MiB, at most 16 GiB, like ZFS's slop space): the
               catalog, its WAL and everything else on that file system keep room to
               commit, so a filling pool answers ENOSPC instead of failing a commit

Invariants
----------
T1  A write is admitted only if its worst-case allocation fits: reserved <= free + what the
    files can still grow to, and the growth is done (fallocate) before the write is
    acknowledged. So destaging an acknowledged write never needs space it cannot get.
    What the files can grow to is the least of their capacity and their file system's
    free space less its reserve; only a forced reservation (a record journaled already)
    may grow into the reserve.
T2  An extent is owned by at most one map entry, preserved row, or journaled REMAP record
    (a large aligned write takes its extents when it is written; `jsnap check` verifies).
T3  A map row is committed only after the extent it names holds the chunk's old content
    (copy), zeroes, or will be wholly overwritten by the batch's records; the data file is
    fsynced before the catalog commit, so a crash never exposes another volume's old bytes.
T4  An extent is freed only in memory after the catalog commit that dropped its last owner
    and after the changes table forgot the records that named it; at open the free list is
    rebuilt as backed minus owned (pending REMAP records' extents are claimed at replay).

Thread safety: ExtentPool has its own lock; ThinMap entries are read without a lock (array
item access is atomic under the GIL) and written only by the destager.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import threading
import time
from array import array
from collections.abc import Iterator, Sequence

from jsnap.errors import NoSpace
from jsnap.stores.files import PLAIN_CAPS, BlockFile, Buffer, StoreCaps, grow

ZERO_SLOT = -1  # a preserved row whose old content was an unmapped (all-zero) chunk
FILE_SHIFT = 32
_INDEX_MASK = (1 << FILE_SHIFT) - 1
PAGE_SHIFT = 12  # map pages of 4096 chunks: 256 MiB of a volume at 64K chunks
PAGE = 1 << PAGE_SHIFT
DENSE = 256  # a page with this many mapped chunks switches from a dict to arrays (64 KiB)
GROW_BYTES = 64 << 20  # data files grow in steps of this much
FS_RESERVE_MIN, FS_RESERVE_MAX, FS_RESERVE_SHARE = 16 << 20, 16 << 30, 32
FS_FRESH = 0.1  # seconds a file system's free space is trusted before statvfs again


def fs_reserve(fs_bytes: int) -> int:
    """Bytes of a file system of `fs_bytes` that data files never grow into (module doc)."""
    return min(max(FS_RESERVE_MIN, fs_bytes // FS_RESERVE_SHARE), FS_RESERVE_MAX)
_ZERO = memoryview(bytes(1 << 20))


def ext_id(file_no: int, index: int) -> int:
    return (file_no << FILE_SHIFT) | index


def whole_chunks(offset: int, length: int, shift: int) -> tuple[int, int]:
    """First and last chunk wholly inside [offset, offset+length); empty when first > last.

    A volume's short last chunk is never whole: its extent's bytes past the volume's end
    must stay zero (a resize may expose them), so it is zeroed or copied, never skipped."""
    return (offset + (1 << shift) - 1) >> shift, ((offset + length) >> shift) - 1


class ThinMap:
    """chunk -> (extent, seq), paged so that never-written regions cost no memory.

    A page starts sparse (a dict: ~150 bytes per mapped chunk, right for scattered writes
    over a huge volume) and becomes two arrays (16 bytes per chunk of the page) once it
    holds DENSE entries. Readers take no lock: a page is replaced by one dict assignment."""

    __slots__ = ("pages", "mapped")

    def __init__(self) -> None:
        self.pages: dict[int, dict[int, tuple[int, int]] | tuple[array[int], array[int]]] = {}
        self.mapped = 0

    def get(self, c: int) -> int:
        page = self.pages.get(c >> PAGE_SHIFT)
        if page is None:
            return -1
        if isinstance(page, dict):
            entry = page.get(c & (PAGE - 1))
            return -1 if entry is None else entry[0]
        return page[0][c & (PAGE - 1)]

    def seq_if_mapped(self, c: int) -> int | None:
        """The seq of chunk c's mapping, None when unmapped: get and seq in one lookup."""
        page = self.pages.get(c >> PAGE_SHIFT)
        if page is None:
            return None
        if isinstance(page, dict):
            entry = page.get(c & (PAGE - 1))
            return None if entry is None else entry[1]
        i = c & (PAGE - 1)
        return None if page[0][i] < 0 else page[1][i]

    def set(self, c: int, ext: int, seq: int) -> None:
        pno, i = c >> PAGE_SHIFT, c & (PAGE - 1)
        page = self.pages.get(pno)
        if page is None:
            page = self.pages[pno] = {}
        if isinstance(page, dict):
            if i not in page:
                self.mapped += 1
                if len(page) >= DENSE:
                    exts, seqs = array("q", [-1]) * PAGE, array("q", [0]) * PAGE
                    for j, (x, q) in page.items():
                        exts[j], seqs[j] = x, q
                    exts[i], seqs[i] = ext, seq
                    self.pages[pno] = (exts, seqs)
                    return
            page[i] = (ext, seq)
            return
        if page[0][i] < 0:
            self.mapped += 1
        page[0][i] = ext
        page[1][i] = seq

    def delete(self, c: int) -> None:
        pno, i = c >> PAGE_SHIFT, c & (PAGE - 1)
        page = self.pages.get(pno)
        if page is None:
            return
        if isinstance(page, dict):
            if page.pop(i, None) is not None:
                self.mapped -= 1
                if not page:
                    del self.pages[pno]
        elif page[0][i] >= 0:
            page[0][i] = -1
            page[1][i] = 0
            self.mapped -= 1

    def mapped_in(self, c0: int, c1: int) -> Iterator[tuple[int, int]]:
        """(chunk, extent) of the mapped chunks in [c0, c1], ascending, skipping absent pages."""
        for pno in sorted(p for p in self.pages if c0 >> PAGE_SHIFT <= p <= c1 >> PAGE_SHIFT):
            page = self.pages.get(pno)
            base = pno << PAGE_SHIFT
            lo, hi = max(c0 - base, 0), min(c1 - base, PAGE - 1)
            if page is None:
                continue
            if isinstance(page, dict):
                for i in sorted(page):
                    if lo <= i <= hi:
                        yield base + i, page[i][0]
                continue
            exts = page[0]
            for i in range(lo, hi + 1):
                if exts[i] >= 0:
                    yield base + i, exts[i]

    def items(self) -> Iterator[tuple[int, int]]:
        return self.mapped_in(0, (max(self.pages, default=0) + 1) << PAGE_SHIFT)


class PoolFile:
    __slots__ = ("no", "path", "file", "capacity", "backed")

    def __init__(self, no: int, path: str, file: BlockFile, capacity: int, backed: int) -> None:
        self.no, self.path, self.file = no, path, file
        self.capacity = capacity  # extents this file may grow to
        self.backed = backed  # extents allocated in the file


class ExtentPool:
    """The extents of the pool's data files: free list, reservations, growth (see module doc)."""

    def __init__(self, chunk_size: int, files: list[PoolFile], used: set[int]) -> None:
        self.cs = chunk_size
        self.files = {f.no: f for f in files}
        self.lock = threading.Lock()
        self.reserved = 0
        self.free: list[int] = []
        for f in files:
            top = max((e & ((1 << FILE_SHIFT) - 1) for e in used if e >> FILE_SHIFT == f.no),
                      default=-1)
            f.backed = max(f.backed, top + 1)
            base = ext_id(f.no, 0)  # the file's extent ids, filtered in C (a restart of a
            # pool that grew to millions of extents spends no Python per extent here)
            self.free.extend(itertools.filterfalse(used.__contains__,
                                                   range(base, base + f.backed)))
        heapq.heapify(self.free)  # low extents first: keeps data files compact
        self.used = len(used)
        # file number -> (checked at, file system id, free bytes, reserve bytes)
        self._fs: dict[int, tuple[float, int, int, int]] = {}

    # -- accounting ---------------------------------------------------------------------------

    def capacity(self) -> int:
        return sum(f.capacity for f in self.files.values())

    def backed(self) -> int:
        return sum(f.backed for f in self.files.values())

    def available(self) -> int:
        """Extents a new write may still reserve."""
        with self.lock:
            return self._growable() + len(self.free) - self.reserved

    def _fs_of(self, f: PoolFile, now: float) -> tuple[float, int, int, int]:
        st = self._fs.get(f.no)
        if st is None and not f.file.caps.resize:  # a device: its capacity alone bounds it
            st = self._fs[f.no] = (float("inf"), -1 - f.no, 1 << 62, 0)  # never stale
        if st is None or now - st[0] > FS_FRESH:
            try:
                v = os.statvfs(f.path)
                st = (now, v.f_fsid, v.f_bavail * v.f_frsize,
                      fs_reserve(v.f_blocks * v.f_frsize))
            except OSError:  # not a path of this machine's file systems: capacity bounds it
                st = (now, -1 - f.no, 1 << 62, 0)
            self._fs[f.no] = st
        return st

    def _rooms(self, force: bool = False) -> dict[int, int]:
        """Extents each file system may still give the data files: its free space less its
        reserve (all of it with `force`)."""
        now = time.monotonic()
        rooms: dict[int, int] = {}
        for f in self.files.values():
            _, fsid, free, resv = self._fs_of(f, now)
            rooms[fsid] = max(0, free - (0 if force else resv)) // self.cs
        return rooms

    def _growable(self) -> int:
        rooms = self._rooms()
        want: dict[int, int] = {}
        for f in self.files.values():
            fsid = self._fs[f.no][1]
            want[fsid] = want.get(fsid, 0) + max(0, f.capacity - f.backed)
        return sum(min(n, rooms[fsid]) for fsid, n in want.items())

    def fs_space(self) -> tuple[int, int]:
        """(free bytes, reserve bytes) summed over the data files' file systems."""
        with self.lock:
            now = time.monotonic()
            seen = {st[1]: st for st in (self._fs_of(f, now) for f in self.files.values())}
        real = [st for fsid, st in seen.items() if fsid >= 0]  # devices have no file system
        return sum(st[2] for st in real), sum(st[3] for st in real)

    # -- reservations (write path, engine lock held) ------------------------------------------

    def reserve(self, n: int, force: bool = False) -> None:
        """Promise n extents to records about to be journaled (T1). NoSpace if they do not fit;
        `force` (a record already journaled) never fails, it only tries to grow."""
        if n <= 0:
            return
        with self.lock:
            if not force and self._growable() + len(self.free) - self.reserved < n:
                raise NoSpace(
                    f"pool is full: {n} more extent(s) of {self.cs} bytes needed, "
                    f"{max(self._growable() + len(self.free) - self.reserved, 0)} left; "
                    "delete snapshots, trim, or grow the pool")
            self.reserved += n
            while len(self.free) < self.reserved:
                try:
                    if not self._grow(self.reserved - len(self.free), force):
                        break
                except OSError as e:
                    if force:
                        break
                    self.reserved -= n
                    raise NoSpace(f"cannot grow the pool's data file: {e.strerror}") from None

    def unreserve(self, n: int) -> None:
        if n:
            with self.lock:
                self.reserved = max(self.reserved - n, 0)

    def _grow(self, want: int, force: bool = False) -> bool:
        """Allocate more extents in some data file, up to a step of GROW_BYTES but never into
        its file system's reserve (unless `force`); False if none can grow."""
        step = max(want, GROW_BYTES // self.cs)
        rooms = self._rooms(force)
        for f in sorted(self.files.values(), key=lambda f: f.no):
            fs = self._fs[f.no]
            room = min(f.capacity - f.backed, rooms[fs[1]])
            if room <= 0:
                continue
            n = min(room, step)
            start = f.backed * self.cs
            grow(f.file, start, n * self.cs)
            self._fs[f.no] = (fs[0], fs[1], fs[2] - n * self.cs, fs[3])  # until the next statvfs
            for i in range(f.backed, f.backed + n):
                heapq.heappush(self.free, ext_id(f.no, i))
            f.backed += n
            return True
        return False

    # -- allocation (destager) ----------------------------------------------------------------

    def take(self) -> int:
        """An extent for a journaled record: consumes one of the reservations (T1)."""
        return self.take_many(1)[0]

    def claim(self, exts: Sequence[int]) -> None:
        """Replay: `exts` belong to journaled REMAP records, not to the free list."""
        with self.lock:
            mine = set(exts)
            for ext in mine:
                f = self.files[ext >> FILE_SHIFT]
                while f.backed <= ext & _INDEX_MASK:  # written past what the size shows
                    heapq.heappush(self.free, ext_id(f.no, f.backed))
                    f.backed += 1
            before = len(self.free)
            self.free = [e for e in self.free if e not in mine]
            heapq.heapify(self.free)
            self.used += before - len(self.free)

    def take_many(self, n: int) -> list[int]:
        """n extents at once, consuming n reservations (T1): all or none."""
        with self.lock:
            while len(self.free) < n:
                if not self._grow(n - len(self.free)):
                    raise NoSpace("pool has no free extent for a write (over-committed)")
            self.used += n
            self.reserved = max(self.reserved - n, 0)
            pop, free = heapq.heappop, self.free
            return [pop(free) for _ in range(n)]

    def give_back(self, exts: Sequence[int], reserved: bool = False) -> None:
        """Return extents to the free list (after the commit that dropped their owner, T4);
        `reserved`: they were taken for a batch that failed, restore its reservations."""
        with self.lock:
            for ext in exts:
                if ext >= 0:
                    heapq.heappush(self.free, ext)
                    self.used -= 1
                    self.reserved += reserved

    def release(self) -> int:
        """Give the file systems back the free extents at the end of each data file (what
        growth allocated ahead of need): the files are truncated after their last extent in
        use. Extents still reserved stay backed (T1). Returns the bytes released."""
        with self.lock:
            free = set(self.free)
            spare = len(self.free) - self.reserved
            released = 0
            for f in sorted(self.files.values(), key=lambda f: f.no, reverse=True):
                if not f.file.caps.resize:
                    continue  # a device holds its blocks whatever we do
                top = f.backed
                while top > 0 and spare > 0 and ext_id(f.no, top - 1) in free:
                    top -= 1
                    spare -= 1
                if top == f.backed:
                    continue
                f.file.truncate(top * self.cs)
                free.difference_update(range(ext_id(f.no, top), ext_id(f.no, f.backed)))
                released += (f.backed - top) * self.cs
                f.backed = top
            if released:
                self.free = list(free)
                heapq.heapify(self.free)
                self._fs.clear()  # statvfs again: the space is back
            return released

    def add_file(self, f: PoolFile) -> None:
        with self.lock:
            self.files[f.no] = f

    def set_capacity(self, no: int, capacity: int) -> None:
        with self.lock:
            self.files[no].capacity = capacity

    # -- I/O ----------------------------------------------------------------------------------

    def locate(self, ext: int) -> tuple[BlockFile, int]:
        return self.files[ext >> FILE_SHIFT].file, (ext & _INDEX_MASK) * self.cs

    def runs(self, exts: Sequence[int]) -> Iterator[tuple[BlockFile, int, int, int]]:
        """(file, byte offset, i, j) for each run exts[i:j] of adjacent extents of one file:
        one I/O per run instead of one per chunk."""
        i = 0
        while i < len(exts):
            j = i + 1
            while j < len(exts) and exts[j] == exts[j - 1] + 1 and exts[j] & _INDEX_MASK:
                j += 1
            f, off = self.locate(exts[i])
            yield f, off, i, j
            i = j

    def sync(self) -> None:
        for f in list(self.files.values()):
            f.file.sync()

    def close(self) -> None:
        for f in self.files.values():
            f.file.close()


class ThinFile:
    """A thin volume seen as a BlockFile: logical offsets go through the map.

    Reads of unmapped chunks are zeroes; writes to unmapped chunks are dropped, which is right
    only because the destager maps every chunk a batch leaves with data before phase B (a
    chunk it leaves unmapped was wholly zeroed later in the same batch)."""

    caps: StoreCaps = PLAIN_CAPS  # space comes from the pool's files, not from here

    def __init__(self, pool: ExtentPool, tmap: ThinMap, size: int) -> None:
        self.pool, self.map, self._size = pool, tmap, size
        self.path = f"<thin volume over {len(pool.files)} data file(s)>"
        self.shift = pool.cs.bit_length() - 1

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, BlockFile | None, int]]:
        """(logical pos, n, file or None if unmapped, file offset) covering [offset,
        offset+length), merging chunks whose extents are adjacent in one file."""
        shift, end = self.shift, offset + length
        pos = offset
        r_pos, r_n, r_f, r_off = offset, 0, None, 0  # the run being merged
        f: BlockFile | None
        while pos < end:
            c = pos >> shift
            stop = min(end, (c + 1) << shift)
            ext = self.map.get(c)
            if ext < 0:
                f, foff = None, 0
            else:
                f, base = self.pool.locate(ext)
                foff = base + pos - (c << shift)
            if r_n and f is r_f and (f is None or r_off + r_n == foff):
                r_n += stop - pos
            else:
                if r_n:
                    yield r_pos, r_n, r_f, r_off
                r_pos, r_n, r_f, r_off = pos, stop - pos, f, foff
            pos = stop
        if r_n:
            yield r_pos, r_n, r_f, r_off

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.preadinto(memoryview(buf), offset)
        return bytes(buf)

    def preadinto(self, buf: memoryview, offset: int) -> int:
        shift = self.shift
        c = offset >> shift
        if (offset + len(buf) - 1) >> shift == c:  # one chunk (most reads): no run merging
            ext = self.map.get(c)
            if ext < 0:
                _fill_zero(buf)
            else:
                file, base = self.pool.locate(ext)
                file.preadinto(buf, base + offset - (c << shift))
            return len(buf)
        for pos, n, f, foff in self._runs(offset, len(buf)):
            out = buf[pos - offset : pos - offset + n]
            if f is None:
                _fill_zero(out)
            else:
                f.preadinto(out, foff)
        return len(buf)

    def pwrite(self, data: Buffer, offset: int) -> None:
        self.pwritev([data], offset)

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> None:
        if len(bufs) == 1:  # one buffer within one chunk (a destaged 4 KiB write): no runs
            shift, data = self.shift, bufs[0]
            c, n = offset >> shift, len(data)  # byte-format buffers (OsFile.pwrite)
            if n and (offset + n - 1) >> shift == c:
                ext = self.map.get(c)
                if ext >= 0:
                    file, base = self.pool.locate(ext)
                    file.pwrite(data, base + offset - (c << shift))
                return
        views = [memoryview(b).cast("B") for b in bufs]
        total = sum(len(v) for v in views)
        bi, boff = 0, 0  # position in views
        for _pos, n, f, foff in self._runs(offset, total):
            parts: list[memoryview] = []
            need = n
            while need:
                v = views[bi]
                take = min(need, len(v) - boff)
                parts.append(v[boff : boff + take])
                need -= take
                boff += take
                if boff == len(v):
                    bi, boff = bi + 1, 0
            if f is not None:
                f.pwritev(parts, foff)

    def copy_from(self, src: BlockFile, src_offset: int, length: int, offset: int) -> None:
        for pos, n, f, foff in self._runs(offset, length):
            if f is not None:
                f.copy_from(src, src_offset + pos - offset, n, foff)

    def punch_hole(self, offset: int, length: int) -> None:
        # Whole chunks were unmapped by the destager when no snapshot needed them; what is
        # left mapped here must read as zeroes: write them.
        self.zero_range(offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        # Only mapped chunks hold bytes to clear; walking the map's pages (not every chunk)
        # keeps a zero or trim over a huge, sparse range cheap.
        for f, foff, n in self._mapped(offset, length):
            f.zero_range(foff, n)

    def zero_allocated(self, offset: int, length: int) -> None:
        self.zero_range(offset, length)  # mapped chunks keep their extents

    def allocate(self, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "a thin volume's space comes from the pool", self.path)

    def _mapped(self, offset: int, length: int) -> Iterator[tuple[BlockFile, int, int]]:
        """(pool file, offset, length) of each mapped piece of [offset, offset+length)."""
        if length <= 0:
            return
        end, shift = offset + length, self.shift
        for c, ext in self.map.mapped_in(offset >> shift, (end - 1) >> shift):
            s, e = max(offset, c << shift), min(end, (c + 1) << shift)
            f, base = self.pool.locate(ext)
            yield f, base + s - (c << shift), e - s

    def truncate(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def sync(self) -> None:
        self.pool.sync()

    def drop_cache(self, offset: int, length: int) -> bool:
        dropped = False
        for f, foff, n in self._mapped(offset, length):
            dropped = f.drop_cache(foff, n) or dropped
        return dropped

    def close(self) -> None:
        pass  # the pool owns the data files


def _fill_zero(out: memoryview) -> None:
    pos = 0
    while pos < len(out):
        n = min(len(_ZERO), len(out) - pos)
        out[pos : pos + n] = _ZERO[:n]
        pos += n
