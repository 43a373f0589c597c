"""The Journal: appends records at head, makes them durable, frees space behind the checkpoint.

Model
-----
The journal file is the NVRAM of the design. Writers append records (format.py) and are
answered without waiting for copy-on-write; the destager later moves each record to
production and frees its space by advancing the *checkpoint* (the position and seq of the
oldest record not yet destaged, kept in the pool catalog), which is the journal's `tail`.
`head` is where the next record goes, `used` the bytes from tail to head, wrap padding
included. At open, `replay` (replay.py) finds the records from the checkpoint on and sets
head, used and next_seq after the last one.

Invariants
----------
J3. Space between tail and head is never overwritten; the checkpoint (tail) advances only
    after the destager made the records durable in production (DESIGN invariant 2).
J4. A full journal makes appenders wait for space (DESIGN invariant 7); nothing fails,
    unless the destager itself waits for space (`stalled`): then they get NoSpace (ENOSPC)
    at once, and nothing of theirs past what was appended is journaled.
J5. `durable_seq` is the highest seq known to be on stable storage: concurrent writers share
    one fdatasync (group commit); a failed fdatasync is never retried-and-ignored: the journal
    is marked failed and every later append or sync raises.
Appends keep J1 (replay.py): seq goes up by one per record, each tagged with this life's gen.

Locking: every method except `replay` and `replay_batches` expects the caller to hold `cv`
(a Condition shared with the engine); waits release it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence

from crc32c import crc32c

from jsnap.errors import JsnapError, NoSpace
from jsnap.stores.files import BlockFile, Buffer
from jsnap.stores.journal.format import (
    ALIGN,
    CRC,
    HEAD,
    HEADER,
    REC_MAGIC,
    SNAP_CREATE,
    SNAP_DELETE,
    SUPERBLOCK_SIZE,
    VERSION,
    WRAP,
    Record,
    read_superblock,
)
from jsnap.stores.journal.replay import Scan, Verify

log = logging.getLogger("jsnap.journal")

# Bound here, not called as imported: CPython compiles `name.method()` on an imported name to
# a plain attribute load, a new bound method per call (3% more per append); _build packs
# with these two for every record.
_HEAD, _CRC = HEAD, CRC
_PAD = bytes(ALIGN)
_PAGE = 4096
_ZERO_PAGE = memoryview(bytes(_PAGE))
MARKER_RESERVE = 64 << 10  # journal space only snapshot markers may use (see append)...
_IOV_BATCH = 900  # buffers per pwritev, below Linux's IOV_MAX of 1024

# One append: kind, vol, offset, length, payload buffers, payload length, aux, name.
Entry = tuple[int, int, int, int, Sequence[Buffer], int, int, str]


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class JournalFailed(JsnapError):
    """A journal write or fdatasync failed; the pool must not acknowledge further writes."""


class Journal:
    def __init__(
        self,
        file: BlockFile,
        cv: threading.Condition,
        *,
        generation: int,
        checkpoint_pos: int,
        checkpoint_seq: int,
        checkpoint_gen: int = 0,
    ) -> None:
        self.file = file
        self.cv = cv
        self.gen = generation
        size, self.pool_uuid = read_superblock(file)
        self.start = SUPERBLOCK_SIZE
        self.end = size - size % ALIGN
        self.capacity = self.end - self.start
        # Largest single record payload: a quarter of the journal, so a writer never waits for
        # space that can only appear if the journal were emptier than empty.
        self.max_payload = min(32 << 20, (self.capacity // 4) & ~(ALIGN - 1))
        self.marker_reserve = min(MARKER_RESERVE, self.capacity // 64)  # ...at most 1/64
        self.tail = checkpoint_pos  # oldest live record (the checkpoint)
        # Generation of the last destaged record: the record at the checkpoint must not be
        # older, or it is stale tail from before a cut that the checkpoint has reached (J2).
        self.checkpoint_gen = checkpoint_gen
        self.head = checkpoint_pos  # next append position
        self.next_seq = checkpoint_seq
        self.used = 0  # bytes between tail and head, wrap padding included
        self.durable_seq = checkpoint_seq - 1
        self.written_seq = checkpoint_seq - 1
        self._syncing = False
        self.failed: BaseException | None = None
        self._bufs: list[Buffer] = []  # the run of records being built by append_many
        self._run_pos = checkpoint_pos
        self.waiters = 0  # writers waiting for space (visible in status)
        # Set (to why) while the destager cannot drain for lack of space: a writer that would
        # wait for journal space gets NoSpace instead of waiting for what may never come.
        self.stalled: str | None = None
        self.replay_end = ""  # where and why replay stopped (logged by the engine)
        # Run in a forked replay scanner before it scans: closes what the child must not
        # hold (the engine's pool lock, so a restart after a crash never finds it taken).
        self.after_fork: Callable[[], None] | None = None
        # Called before every fdatasync, lock released: makes REMAP records' data durable
        # before the records themselves count as durable. An exception fails the journal.
        self.pre_sync: Callable[[], None] | None = None

    # -- replay -------------------------------------------------------------------------------

    def replay(self, verify: Verify | None = None) -> Iterator[Record]:
        """replay_batches, one record at a time."""
        for batch in self.replay_batches(verify):
            yield from batch

    def replay_batches(self, verify: Verify | None = None) -> Iterator[list[Record]]:
        """Yield the valid records from the checkpoint on, in lists, and set head/next_seq
        after the last.

        Stops silently at the first record that fails a check (J1): that is the torn tail.
        `verify(rec)` is asked about each REMAP record (exts filled in): False ends the log
        there too (its data did not all reach the disk); it must not depend on what the
        caller did with the records before (they come in batches). Past FORK_SCAN_AFTER
        bytes of records, a forked child scans the rest (replay.py, J6).
        """
        scan = Scan(self.file, self.start, self.end, self.gen, self.max_payload,
                    self.after_fork, tail=self.tail, head=self.head, used=self.used,
                    next_seq=self.next_seq)
        try:
            yield from scan.batches(self.checkpoint_gen, verify)
        finally:  # the scan's head accounting is ours again, however it ended
            self.head, self.used, self.next_seq = scan.head, scan.used, scan.next_seq
            if scan.why:
                self.replay_end = scan.why
        self.durable_seq = self.written_seq = self.next_seq - 1

    # -- append -------------------------------------------------------------------------------

    def record_size(self, payload_len: int) -> int:
        return HEADER.size + _align(payload_len)

    def _need(self, size: int) -> int:
        """Bytes of free space an append of `size` at head consumes, wrap waste included."""
        if self.head + size <= self.end:
            return size
        return (self.end - self.head) + size

    def append(
        self,
        kind: int,
        vol: int,
        offset: int,
        length: int,
        payload: Sequence[Buffer] = (),
        payload_len: int = 0,
        aux: int = 0,
        name: str = "",
    ) -> Record:
        """Append one record, waiting for space if the journal is full (J4). Caller holds cv.

        Snapshot markers may use the space kept back from data records (MARKER_RESERVE), so
        a snapshot is taken at once even when writers are waiting for a full journal."""
        reserve = 0 if kind in (SNAP_CREATE, SNAP_DELETE) else self.marker_reserve
        entry = (kind, vol, offset, length, payload, payload_len, aux, name)
        return self.append_many([entry], reserve=reserve)[0]

    def append_many(self, items: Sequence[Entry],
                     admit: Callable[[list[Record]], None] | None = None,
                     reserve: int = -1) -> list[Record]:
        """Append records in order with as few pwritev calls as possible (one per contiguous
        run of up to IOV_MAX buffers). Caller holds cv; waits for space release it (J4).

        `admit` is called with the records appended so far before any wait and at the end:
        records must reach the destager before we sleep on space only it can free, and in
        seq order, since other writers may append while we sleep."""
        if self.failed is not None:
            raise JournalFailed(f"{self.file.path}: journal failed earlier: {self.failed}")
        if reserve < 0:
            reserve = self.marker_reserve
        recs: list[Record] = []
        admitted = 0
        self._bufs = []
        self._run_pos = self.head
        for kind, vol, offset, length, payload, payload_len, aux, name in items:
            size = HEADER.size + _align(payload_len)
            assert payload_len <= self.max_payload
            # Keep one ALIGN gap so head == tail always means "empty", never "full".
            if self._need(size) + ALIGN + reserve > self.capacity - self.used:
                self._flush_run()  # what we built must be in the file before we sleep
                if admit is not None and admitted < len(recs):
                    admit(recs[admitted:])
                    admitted = len(recs)
                while self._need(size) + ALIGN + reserve > self.capacity - self.used:
                    if self.stalled is not None:
                        raise NoSpace(f"the journal is full and destage is waiting for "
                                      f"space: {self.stalled}")
                    self.waiters += 1
                    try:
                        self.cv.wait()
                    finally:
                        self.waiters -= 1
                    if self.failed is not None:
                        raise JournalFailed(
                            f"{self.file.path}: journal failed earlier: {self.failed}")
                self._run_pos = self.head  # others appended while we slept
            if self.head + size > self.end:
                if self.head + HEADER.size <= self.end:
                    self._build(WRAP, 0, 0, 0, (), 0, 0, "")
                else:
                    self.used += self.end - self.head
                    self.head = self.start
                self._flush_run()
            recs.append(self._build(kind, vol, offset, length, payload, payload_len, aux, name))
            if len(self._bufs) > _IOV_BATCH:
                self._flush_run()
        self._flush_run()
        if admit is not None and admitted < len(recs):
            admit(recs[admitted:])
        return recs

    def _build(self, kind: int, vol: int, offset: int, length: int,
               payload: Sequence[Buffer], payload_len: int, aux: int, name: str) -> Record:
        """Lay out one record at head into the pending run (written by _flush_run)."""
        seq = self.next_seq
        pos = self.head
        head = _HEAD.pack(REC_MAGIC, VERSION, kind, 0, seq, self.gen, vol, offset, length, aux,
                          payload_len, 0, 0)
        crc = crc32c(head)
        for buf in payload:
            crc = crc32c(buf, crc)
        pad = (-payload_len) & (ALIGN - 1)
        bufs = self._bufs
        bufs.append(head + _CRC.pack(crc))
        bufs.extend(payload)
        if pad:
            bufs.append(_PAD[:pad])
        end = pos + HEADER.size + payload_len + pad
        rec = Record(seq, kind, vol, offset, length, aux, pos, end, name, self.gen)
        # Move head past it: the record sits at head (append_many wrapped before calling us)
        self.used += end - pos
        if kind == WRAP:
            self.used += self.end - end
            self.head = self.start
        else:
            self.head = end
        self.next_seq = seq + 1
        return rec

    def _pad_to_page(self) -> int:
        """Zero bytes that may follow the run: up to the next page boundary, never into live
        records (the tail) or past the end. A write that ends mid-page makes the kernel read
        the rest of that page first when it is not cached: measured 64 us per 4 KiB append
        on evicted journal pages, against 4 us when the run ends on a page boundary."""
        head = self.head
        stop = min((head + _PAGE - 1) & ~(_PAGE - 1), self.end)
        if self.used and self.tail > head:
            stop = min(stop, self.tail)
        return max(stop - head, 0)

    def _flush_run(self) -> None:
        """pwritev the pending run at its position; only then are its records 'written'."""
        bufs = self._bufs
        if bufs:
            pos = self._run_pos
            pad = self._pad_to_page()
            if pad:
                bufs.append(_ZERO_PAGE[:pad])
            try:
                self.file.pwritev(bufs, pos)
            except BaseException as e:
                self.failed = JournalFailed(f"{self.file.path}: write failed at byte {pos}: {e}")
                self.cv.notify_all()
                log.error("journal %s: write failed at byte %d (%s); the pool is read-only "
                          "until restarted", self.file.path, pos, e)
                raise self.failed from e
            bufs.clear()
        self.written_seq = self.next_seq - 1
        self._run_pos = self.head

    # -- durability ---------------------------------------------------------------------------

    def sync_upto(self, seq: int) -> None:
        """Return once every record up to `seq` is durable; concurrent callers share one sync."""
        while self.durable_seq < seq:
            if self.failed is not None:
                raise JournalFailed(f"{self.file.path}: journal failed earlier: {self.failed}")
            if self._syncing:
                self.cv.wait()
                continue
            self._syncing = True
            target = self.written_seq
            self.cv.release()
            try:
                if self.pre_sync is not None:
                    self.pre_sync()
                self.file.sync()
            except BaseException as e:
                self.cv.acquire()
                self._syncing = False
                # fsyncgate: never retry and pretend it worked
                self.failed = JournalFailed(f"{self.file.path}: fdatasync failed: {e}")
                self.cv.notify_all()
                log.error("journal %s: fdatasync failed (%s); writes not yet durable may be "
                          "lost; the pool is read-only until restarted", self.file.path, e)
                raise self.failed from e
            self.cv.acquire()
            self._syncing = False
            if target > self.durable_seq:
                self.durable_seq = target
            self.cv.notify_all()

    # -- reclaim ------------------------------------------------------------------------------

    def release_upto(self, rec: Record) -> None:
        """Free the space of every record up to and including `rec` (checkpoint moved, J3)."""
        new_tail = self.start if rec.kind == WRAP else rec.end
        if new_tail >= self.tail:
            freed = new_tail - self.tail
        else:
            freed = (self.end - self.tail) + (new_tail - self.start)
        self.used -= freed
        self.tail = new_tail
        assert self.used >= 0, (self.used, self.tail)
        assert (self.used == 0) == (self.tail == self.head), (self.used, self.tail, self.head)
        self.cv.notify_all()

    def fill(self) -> float:
        return self.used / self.capacity
