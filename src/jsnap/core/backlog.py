"""The backlog: what an engine has journaled and not destaged yet, seen from the destager.

Model
-----
Every record the engine appends to its journal joins the pending queue, in seq order,
after it is indexed in the changes table (Engine._admit). The destager takes batches from
the head of the queue and reports back through this object, which is all it sees of the
engine (core/destager.py DestageHost): the stores it reads and writes, where to take work
(wait_for_work, pending_after) and what it did (unindex, checkpoint, destaged,
release_preserved, fail, wait_for_space, space_returned). Making the destager a process of
its own (issue 24) means putting a pipe behind these calls, not reaching into the engine.

State it owns: the pending queue, the REMAP data it holds (bounded by remap_limit), the
destager thread and its wake-up condition, the failed/waiting-for-space state, and the
destage counters. It shares the engine's lock (the journal's condition) because a record
enters the journal and the queue in one step.

Invariants
----------
B1 The queue holds exactly the journal's records from the checkpoint to the head, in seq
   order: appended under the lock as they are journaled (or replayed), popped only by
   `destaged`, after the checkpoint that passes them is durable (DESIGN invariant 2).
B2 The changes table forgets a record only when production holds it (`unindex`, after
   phase B), and its journal space is released only after the checkpoint (`destaged`).
B3 `failed` is set once and never cleared: the engine refuses writes from then on, and
   the journal keeps everything acknowledged. `space_short` (`store_down`) is set while
   the destager waits for space (for a store it cannot reach) and cleared by the first
   batch that passes (destager.py "Space", "Outages").
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping

from jsnap.core.destager import HIGH_WATER, IDLE, Destager
from jsnap.core.reservations import Reservations
from jsnap.core.stats import BATCH_BOUNDS, Histogram, RateWindow
from jsnap.core.volumes import Volume
from jsnap.errors import NoSpace, PoolError
from jsnap.stores import journal as jn
from jsnap.stores.catalog import Catalog
from jsnap.stores.changes import ChangesTable
from jsnap.stores.files import BlockFile
from jsnap.stores.snapstore import SlotStore
from jsnap.stores.thin import ExtentPool
from jsnap.units import MiB

log = logging.getLogger("jsnap.engine")

AGE_RESOLUTION = 0.01  # seconds: precision of the oldest pending record's age
# Pending REMAP data is bounded by the journal's capacity and by this: replay reads it all
# back to check its CRC, so it adds to the restart time (about 0.5 s per 256 MiB, cold).
REMAP_MAX_PENDING = 256 * MiB
# A batch that lacked space is retried after 0.1 s, doubling up to 2 s, or at once when
# something frees space (wake): cheap polling of a rare state.
SPACE_RETRY_FIRST, SPACE_RETRY_MAX = 0.05, 2.0

CrashPoint = Callable[[str], None]


class Backlog:
    def __init__(self, lock: threading.Lock, cv: threading.Condition, journal: jn.Journal,
                 jfile: BlockFile, changes: ChangesTable, resv: Reservations,
                 catalog: Catalog, pool: ExtentPool, slots: SlotStore,
                 by_id: Mapping[int, Volume], *, drop_big_folios: bool) -> None:
        self.lock, self.cv = lock, cv  # the engine's: the journal's condition
        self.work = threading.Condition(lock)  # destager wake-up
        self.destage_mutex = threading.Lock()  # held by the destager for a whole batch
        self.journal, self.jfile, self.changes, self.resv = journal, jfile, changes, resv
        self.catalog, self.pool, self.slots, self.by_id = catalog, pool, slots, by_id
        self.chunk_size = pool.cs
        self.chunk_shift = self.chunk_size.bit_length() - 1
        self.drop_big_folios = drop_big_folios
        self.crashpoint: CrashPoint | None = None
        self.pending: collections.deque[jn.Record] = collections.deque()
        # REMAP records: bytes of pending records' data in pool extents (bounded by
        # remap_limit, so replay checks at most that much) and writers waiting for room.
        self.remap_bytes = 0
        self.remap_waiters = 0
        self.failed: BaseException | None = None  # B3
        # Why the destager waits for space (destager.py "Space"), None when it does not;
        # meanwhile writers that would wait for journal space get ENOSPC.
        self.space_short: str | None = None
        self.space_waits = 0  # retries of a batch that lacked space (metrics)
        self.store_down: str | None = None
        self.store_waits = 0  # retries of a batch whose store could not be reached
        self.stopping = False
        self.destager: Destager | None = None  # the thread's, once started
        self._thread: threading.Thread | None = None
        self.last_append = 0.0  # monotonic time of the newest record (destager idleness)
        self.drain_requested = 0  # waiters in wait_drained/wait_destaged_upto: destage now
        # Observability (jsnap.core.stats). append_marks: (first seq, monotonic time) of an
        # append, at most one per AGE_RESOLUTION, so the oldest pending record's age is
        # known to that resolution without a timestamp per record (see oldest_age).
        now = time.monotonic()
        self.append_marks: collections.deque[tuple[int, float]] = collections.deque()
        self.append_marks.append((0, now))  # replayed records: age >= this
        self.destaged_records = 0
        self.destaged_bytes = 0
        self.preserved_copies = 0  # written by the destager alone
        self.cache_windows_dropped = 0  # destager: page-cache windows of big folios dropped
        self.destage_window = RateWindow(now)
        self.destage_seconds = Histogram(BATCH_BOUNDS)

    # -- the engine's side --------------------------------------------------------------------

    @property
    def remap_limit(self) -> int:
        """Bytes of REMAP data that may wait for destage (writers wait beyond it)."""
        return min(self.journal.capacity, REMAP_MAX_PENDING)

    def admit(self, recs: list[jn.Record]) -> None:
        """Journaled and indexed records join the queue (B1; lock held). Wakes the destager
        when it has a reason to look: the journal was empty (it starts timing idleness) or
        is half full (it starts destaging at once)."""
        pending = self.pending
        was_empty = not pending
        pending.extend(recs)
        now = self.last_append = time.monotonic()
        marks = self.append_marks
        if now - marks[-1][1] >= AGE_RESOLUTION:
            marks.append((recs[0].seq if recs else self.journal.next_seq, now))
            if len(marks) > 4096:
                self.oldest_append()  # prunes
        j = self.journal
        if (was_empty or j.used >= j.capacity * HIGH_WATER or self.drain_requested
                or self.remap_bytes >= self.remap_limit * HIGH_WATER):
            self.work.notify()

    def start(self) -> None:
        self.destager = Destager(self)
        self._thread = threading.Thread(target=self.destager.run_forever,
                                        name="jsnap-destager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the destager after its current batch (lock not held)."""
        with self.lock:
            self.stopping = True
            self.work.notify_all()
            self.cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def wake(self) -> None:
        """Something freed space (pool grow, pool release): retry a waiting batch now."""
        with self.lock:
            self.work.notify_all()

    def destage(self, max_records: int | None = None) -> int:
        """Destage synchronously (tests, tools); returns records destaged. Not with the thread."""
        assert self._thread is None, "the destager thread owns destaging"
        d = Destager(self)
        done = 0
        while self.pending and (max_records is None or done < max_records):
            done += d.run_batch(None if max_records is None else max_records - done)
        return done

    def wait_drained(self, timeout: float) -> None:
        """Block until the queue is empty (the destager thread must be running)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.drain_requested += 1
            self.work.notify()
            try:
                while self.pending:
                    if self.failed is not None:
                        raise PoolError(f"destager failed: {self.failed}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        if self.space_short is not None:
                            raise NoSpace(f"journal did not drain: destage is waiting for "
                                          f"space: {self.space_short}")
                        raise TimeoutError("journal did not drain in time")
                    self.cv.wait(left)
            finally:
                self.drain_requested -= 1

    def wait_destaged_upto(self, seq: int, timeout: float) -> None:
        """Block until every record up to `seq` is destaged: by the destager thread, or
        here when it does not run (an offline command)."""
        if self._thread is None:
            d = Destager(self)
            while self.pending and self.pending[0].seq <= seq:
                d.run_batch(None)
            return
        deadline = time.monotonic() + timeout
        with self.lock:
            self.drain_requested += 1
            self.work.notify()
            try:
                while self.pending and self.pending[0].seq <= seq:
                    if self.failed is not None:
                        raise PoolError(f"destager failed: {self.failed}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"writes up to seq {seq} not destaged in time")
                    self.cv.wait(left)
            finally:
                self.drain_requested -= 1

    def oldest_append(self) -> float:
        """Monotonic time by which the oldest pending record was appended, to within
        AGE_RESOLUTION (lock held; drops the marks no pending record needs any more).

        A mark (s, t) is made at an append whose first record is s, if the previous mark is
        AGE_RESOLUTION old; so the newest mark with seq <= p dates record p exactly, or p
        came less than AGE_RESOLUTION after it."""
        marks = self.append_marks
        if not self.pending:
            while len(marks) > 1:
                marks.popleft()
            return time.monotonic()
        p = self.pending[0].seq
        while len(marks) > 1 and marks[1][0] <= p:
            marks.popleft()
        return marks[0][1]

    # -- the destager's side (destager.DestageHost) -------------------------------------------

    def hit(self, point: str) -> None:
        """A named crash point (tests set `crashpoint` to stop the engine there)."""
        if self.crashpoint is not None:
            self.crashpoint(point)

    def wait_for_work(self, writing: int, busy: bool) -> tuple[bool, bool]:
        """Block until the destager has a batch to take, beyond the `writing` records its
        written batches hold, or at once when `busy` (a written batch to complete). Lazy:
        a batch is ready when the journal (or REMAP data) is half full, someone waits for
        space or a drain, or writes paused for IDLE. Returns (ready, stopping)."""
        j = self.journal
        with self.lock:
            ready = False
            while not self.stopping:
                ready = len(self.pending) > writing and bool(
                    j.used >= j.capacity * HIGH_WATER
                    or self.remap_bytes >= self.remap_limit * HIGH_WATER
                    or j.waiters
                    or self.remap_waiters
                    or self.drain_requested
                    or time.monotonic() - self.last_append >= IDLE
                )
                if ready or busy:
                    break
                self.work.wait(IDLE if self.pending else None)
            return ready, self.stopping

    def pending_after(self, skip: int, limit: int) -> list[jn.Record]:
        """Up to `limit` pending records after the first `skip` (held by written batches)."""
        with self.lock:
            return list(itertools.islice(self.pending, skip, skip + limit))

    def unindex(self, touched: dict[int, set[int]], last_seq: int) -> None:
        """Production holds the records up to last_seq: the changes table forgets them
        (B2, stores/changes.py C3), chunk by chunk of each volume they touched."""
        with self.lock:
            for vid, chunks in touched.items():
                self.changes.remove_upto(vid, chunks, last_seq)

    def checkpoint(self, last: jn.Record) -> None:
        """Persist the checkpoint after `last` (production is synced up to it: invariant 2)."""
        next_pos = self.journal.start if last.kind == jn.WRAP else last.end
        self.catalog.set_many({"checkpoint_pos": next_pos, "checkpoint_seq": last.seq + 1,
                               "checkpoint_gen": last.gen})

    def destaged(self, batch: list[jn.Record], taken: int, now: float) -> None:
        """A checkpointed batch: its journal space, REMAP budget and reservations (less the
        `taken` extents it consumed) go back, in seq order (B1, B2)."""
        nbytes = sum(r.length for r in batch if r.kind in (jn.WRITE, jn.REMAP))  # metrics
        with self.lock:
            for r in batch:
                self.pending.popleft()
                if r.kind == jn.REMAP and r.exts is not None:
                    self.remap_bytes -= r.length  # its waiters are woken by release_upto
            self.journal.release_upto(batch[-1])
            self.destaged_records += len(batch)
            self.destaged_bytes += nbytes
            self.destage_window.add(now, len(batch), nbytes)
            self.resv.settle(batch, taken, self.by_id)

    def release_preserved(self, marker: jn.Record | None, freed: list[int]) -> None:
        """Copies a snapshot delete let go: pool extents (thin) or store slots (raw)."""
        vol = self.by_id.get(marker.vol) if marker is not None else None
        if vol is not None and vol.thin is not None:
            self.pool.give_back(freed)
        else:
            self.slots.free(freed)

    def fail(self, exc: BaseException) -> None:
        """The destager failed: the pool turns read-only (B3; the journal keeps everything)."""
        with self.lock:
            self.failed = exc
            self.cv.notify_all()

    def wait_for_space(self, reason: str, attempt: int) -> bool:
        """A batch lacked space and changed nothing: wait a little (longer each attempt, or
        until something frees space and wakes us), then the destager retries. False: give
        up, the engine stops (or no destager thread runs: a synchronous destage fails)."""
        with self.lock:
            if self.stopping or self._thread is None:
                return False
            if self.space_short is None:
                log.warning("destage waits for space: %s; writes that need journal space get "
                            "ENOSPC until there is room (free some space on the file system, "
                            "delete snapshots, or run 'jsnap pool release')", reason)
                self.space_short = self.journal.stalled = reason
                self.cv.notify_all()  # writers waiting for journal space: ENOSPC now
            self.space_waits += 1
            self.work.wait(min(SPACE_RETRY_MAX, SPACE_RETRY_FIRST * (1 << min(attempt, 10))))
            return not self.stopping

    def wait_for_store(self, reason: str, attempt: int) -> bool:
        """A store could not be reached (destager.py "Outages"): wait as for space, but
        writers are not refused: they land in the journal while it has room, then wait
        for it as for any full journal. False: give up (stopping, or no destager thread)."""
        with self.lock:
            if self.stopping or self._thread is None:
                return False
            if self.store_down is None:
                log.warning("destage waits for a store it cannot reach: %s; writes keep "
                            "landing in the journal while it has room", reason)
            self.store_down = reason
            self.store_waits += 1
            self.work.wait(min(SPACE_RETRY_MAX, SPACE_RETRY_FIRST * (1 << min(attempt, 10))))
            return not self.stopping

    def store_returned(self) -> None:
        with self.lock:
            if self.store_down is not None:
                log.warning("destage resumed: the store is back")
                self.store_down = None

    def space_returned(self) -> None:
        with self.lock:
            if self.space_short is not None:
                log.warning("destage resumed: space is back")
                self.space_short = self.journal.stalled = None
