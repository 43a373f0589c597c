"""The engine: one pool, its volumes, snapshots, journal, changes table and destager.

Model
-----
A pool is a directory (the three stores may live elsewhere, see `init_pool`):

    POOL/pool.db         catalog (SQLite, WAL): config, volumes, snapshots, preserved index
    POOL/lock            exclusive flock, holds the owner's PID
    POOL/journal         the circular journal (stores/journal.py)
    POOL/vol-<id>.img    production store of each raw volume (a plain file)
    POOL/snapstore.dat   raw volumes' preserved chunks, one slot of chunk_size each
    POOL/data-<n>.dat    the pool's extents: thin volumes' data and their preserved copies
                         (stores/thin.py)

Write path: append one journal record, insert it in the changes table, acknowledge (after
the record is durable in `sync` mode or with FUA). Large chunk-aligned writes to thin volumes
are redirected instead (REMAP): the data goes straight into fresh pool extents and the record
only names them, so the bytes are written once rather than journal first, production later.
Read path: the newest journaled bytes win, the rest comes from production. Snapshot
create/delete are journal markers, durable before they return; the destager turns them into
catalog rows in journal order. Recovery: take the lock, bump the generation, load the
catalog, replay the journal from the checkpoint into the changes table (never trusted from
disk, DESIGN invariant 6), start the destager.

Thread safety: every public method may be called from any thread. `self.lock` guards the
journal, the changes table, the pending-record queue and the volume/snapshot registry; file
I/O on production and the snapshot store happens outside it.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import threading
import time
from collections.abc import Callable

from crc32c import crc32c

from jsnap.core.destager import HIGH_WATER, IDLE, Destager
from jsnap.core.extents import allocation_map, file_holes, unmapped
from jsnap.core.pool import Pool
from jsnap.core.recovery import Replay
from jsnap.core.reservations import Reservations
from jsnap.core.snapshots import Images
from jsnap.core.stats import BATCH_BOUNDS, Histogram, RateWindow
from jsnap.core.volumes import Snapshot, Volume, check_name
from jsnap.errors import (
    AlreadyExists,
    InvalidRequest,
    JsnapError,
    NoSpace,
    NotFound,
    PoolError,
)
from jsnap.stores import journal as jn
from jsnap.stores.catalog import Catalog
from jsnap.stores.changes import POOL_BIT, ChangesTable, pool_location
from jsnap.stores.files import BlockFile, FileOpener, OsFile
from jsnap.stores.snapstore import SlotStore
from jsnap.stores.thin import ExtentPool
from jsnap.units import MiB, format_size

log = logging.getLogger("jsnap.engine")

SECTOR = 512
FLUSH_INTERVAL = 0.025  # writeback mode: the journal is synced at least this often
AGE_RESOLUTION = 0.01  # seconds: precision of the oldest pending record's age
REMAP_MIN = 64 << 10  # chunk-aligned writes to thin volumes this large are redirected (run 8)
# Pending REMAP data is bounded by the journal's capacity and by this: replay reads it all
# back to check its CRC, so it adds to the restart time (about 0.5 s per 256 MiB, cold).
REMAP_MAX_PENDING = 256 * MiB
# A batch that lacked space is retried after 0.1 s, doubling up to 2 s, or at once when
# something frees space (wake_destaged): cheap polling of a rare state.
SPACE_RETRY_FIRST, SPACE_RETRY_MAX = 0.05, 2.0

CrashPoint = Callable[[str], None]


class Engine:
    """An open pool. Create with `Engine.open(path)`; close with `close()`."""

    # Set by open() / _recover():
    shared: Pool
    path: str
    opener: FileOpener
    catalog: Catalog
    pool: ExtentPool
    slots: SlotStore
    chunk_size: int
    chunk_shift: int
    durability: str
    sync_mode: bool
    journal_path: str
    data_path: str
    snapshot_path: str
    changes: ChangesTable
    jfile: BlockFile
    journal: jn.Journal
    replay_seconds: float
    replayed_records: int
    flush_interval: float
    drop_big_folios: bool

    def __init__(self) -> None:  # use Engine.open
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)  # journal space / sync waits
        self.work = threading.Condition(self.lock)  # destager wake-up
        self.admin_lock = threading.Lock()  # serialises volume create/delete and rollbacks
        self.destage_mutex = threading.Lock()  # held by the destager for a whole batch
        self.pending: collections.deque[jn.Record] = collections.deque()
        self.volumes: dict[str, Volume] = {}
        self.by_id: dict[int, Volume] = {}
        # REMAP records: bytes of pending records' data in pool extents (bounded by
        # remap_limit, so replay checks at most that much), writers
        # waiting for that bound, and a count of data writes the pool has not synced yet.
        self.remap_bytes = 0
        self.remap_waiters = 0
        self.remap_dirty = 0
        self._remap_synced = 0
        self.crashpoint: CrashPoint | None = None
        self.failed: BaseException | None = None
        # Why the destager waits for space (destager.py "Space"), None when it does not;
        # meanwhile writers that would wait for journal space get ENOSPC.
        self.space_short: str | None = None
        self.space_waits = 0  # retries of a batch that lacked space (metrics)
        self.closed = False
        self._destager: threading.Thread | None = None
        self.destager: Destager | None = None  # the thread's, once started
        self._flusher: threading.Thread | None = None
        self._stopping = False
        self.destaged_records = 0
        self.preserved_copies = 0
        self.cache_windows_dropped = 0  # destager: page-cache windows of big folios dropped
        self.last_append = 0.0  # monotonic time of the newest record (destager idleness)
        self.drain_requested = False  # wait_destaged wants the journal empty now
        # Observability (jsnap.core.stats). append_marks: (first seq, monotonic time) of an
        # append, at most one per AGE_RESOLUTION, so the oldest pending record's age is
        # known to that resolution without a timestamp per record (see journal_oldest_age).
        self.opened = time.monotonic()
        self.append_marks: collections.deque[tuple[int, float]] = collections.deque()
        self.destaged_bytes = 0
        self.destage_window = RateWindow(self.opened)
        self.destage_seconds = Histogram(BATCH_BOUNDS)

    # -- open / close -------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str, *, start_destager: bool = True, opener: FileOpener = OsFile,
        flush_interval: float = FLUSH_INTERVAL, drop_big_folios: bool = False,
    ) -> Engine:
        """Open (and recover) a pool. `flush_interval`: in writeback mode, sync the journal
        at least this often (seconds) while it has unsynced records; 0 syncs only on FLUSH,
        FUA and snapshot operations (fastest, but a snapshot create then waits for the
        whole unsynced backlog). `drop_big_folios`: the destager's page-cache episodes
        (destager module doc; `jsnap serve` turns them on). `opener`: how the pool's files
        are opened, the one seam for wrapping them (tools/faults.py injects errors through
        it; `jsnap.cli.main(opener=...)` passes one down)."""
        shared = Pool.open(path, opener)
        self = cls()
        self.flush_interval = flush_interval
        self.drop_big_folios = drop_big_folios
        # The shared parts (core/pool.py), named here for the hot paths and the destager.
        self.shared, self.path, self.opener = shared, shared.path, opener
        self.catalog, self.pool, self.slots = shared.catalog, shared.extents, shared.slots
        self.chunk_size, self.chunk_shift = shared.chunk_size, shared.chunk_shift
        self.durability = shared.durability
        self.sync_mode = self.durability == "sync"
        self.journal_path = shared.journal_path
        self.data_path, self.snapshot_path = shared.data_path, shared.snapshot_path
        try:
            self._recover()
        except BaseException:
            self._close_partial()
            raise
        if start_destager:
            self.start_destager()
        return self

    def _recover(self) -> None:
        """Own every volume of the pool, and rebuild their state from the journal."""
        cat = self.catalog
        gen = cat.get_int("generation") + 1
        cat.set_many({"generation": gen})  # J2: durable before the first append of this life
        self.changes = ChangesTable(self.chunk_size)
        self.resv = Reservations(self.pool, self.chunk_shift)
        for vol in self.shared.load_volumes():
            self._register(vol)
        self.images = Images(self.catalog, self.slots, self.pool, self.chunk_shift, self)
        self.jfile = self.opener(self.journal_path)
        self.journal = jn.Journal(
            self.jfile,
            self.cv,
            generation=gen,
            checkpoint_pos=cat.get_int("checkpoint_pos"),
            checkpoint_seq=cat.get_int("checkpoint_seq"),
            checkpoint_gen=cat.get_int("checkpoint_gen", 0),
        )
        self.journal.pre_sync = self._sync_remapped
        self.journal.after_fork = self.shared.lock.forget
        t0 = time.monotonic()
        replay = Replay(self.by_id, self.changes, self.resv, self.pool, self.pending,
                        remap_done=cat.get_int("remap_seq", -1))
        replay.run(self.journal)
        self.remap_bytes = replay.remap_bytes
        self.replay_seconds = time.monotonic() - t0
        self.replayed_records = len(self.pending)
        self.append_marks.append((0, time.monotonic()))  # replayed records: age >= this
        log.info("replayed %d journal records in %.3f s; %s", self.replayed_records,
                 self.replay_seconds, self.journal.replay_end)

    def _register(self, vol: Volume) -> None:
        self.volumes[vol.name] = vol
        self.by_id[vol.id] = vol

    def _index(self, vol: Volume, rec: jn.Record) -> None:
        seqs = vol.snap_seqs  # vol.newest_snap without the property call: once per record
        self.changes.index(vol.id, rec, seqs[-1] if seqs else 0)

    def start_destager(self) -> None:
        self.destager = Destager(self)
        self._destager = threading.Thread(
            target=self.destager.run_forever, name="jsnap-destager", daemon=True
        )
        self._destager.start()
        if not self.sync_mode and self.flush_interval > 0:
            self._flusher = threading.Thread(target=self._flush_forever, name="jsnap-flusher",
                                             daemon=True)
            self._flusher.start()

    def _flush_forever(self) -> None:
        """Writeback mode: make the journal durable every flush_interval when it has news.

        Keeps the unsynced backlog small, so a snapshot create (which must sync the journal)
        or a client FLUSH never waits behind hundreds of megabytes of dirty journal pages,
        and bounds what a power cut can take to the last flush_interval of writes."""
        while True:
            time.sleep(self.flush_interval)  # not cv.wait: every sync and release notifies cv
            with self.lock:
                if self._stopping or self.journal.failed is not None:
                    return
                if self.journal.written_seq > self.journal.durable_seq:
                    try:
                        self.journal.sync_upto(self.journal.written_seq)
                    except JsnapError:
                        return  # the journal is failed: writers get the error

    def close(self) -> None:
        """Stop the destager after its current batch, make the journal durable, release."""
        if self.closed:
            return
        with self.lock:
            self._stopping = True
            self.work.notify_all()
            self.cv.notify_all()
        if self._destager is not None:
            self._destager.join()
        if self._flusher is not None:
            self._flusher.join()
        try:
            if self.failed is None and self.journal.failed is None:
                with self.lock:
                    self.journal.sync_upto(self.journal.written_seq)
        finally:
            self._close_files()

    def abandon(self) -> None:
        """Drop the pool as a crash would: no sync, no destage (tests simulate crashes with it)."""
        with self.lock:
            self._stopping = True
            self.work.notify_all()
            self.cv.notify_all()
        if self._destager is not None:
            self._destager.join()
        if self._flusher is not None:
            self._flusher.join()
        self._close_files()

    def _close_partial(self) -> None:
        """Close whatever a failed open got as far as opening."""
        for vol in self.by_id.values():
            vol.file.close()
        jfile = getattr(self, "jfile", None)
        if jfile is not None:
            jfile.close()
        self.shared.close()

    def _close_files(self) -> None:
        self.closed = True
        for vol in self.by_id.values():
            vol.file.close()
        self.jfile.close()
        self.shared.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hit(self, point: str) -> None:
        """A named crash point (tests set `crashpoint` to stop the engine there)."""
        if self.crashpoint is not None:
            self.crashpoint(point)

    def _check_usable(self) -> None:
        if self.closed:
            raise PoolError("pool is closed")
        if self.failed is not None:
            raise PoolError(f"pool failed and is read-only: {self.failed}")

    # -- volumes ------------------------------------------------------------------------------

    def volume(self, name: str) -> Volume:
        vol = self.volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume named {name!r}")
        return vol

    def volume_list(self) -> list[Volume]:
        return sorted(self.volumes.values(), key=lambda v: v.name)

    def volume_create(self, name: str, size: int, preallocate: bool = False,
                      thin: bool = False) -> Volume:
        """A raw volume is one file (sparse, or preallocated); a thin one maps its chunks to
        pool extents on first destage (stores/thin.py) and can be over-provisioned."""
        check_name("volume", name)
        if size <= 0 or size % SECTOR:
            raise InvalidRequest(f"invalid volume size {size}: must be a positive multiple of 512")
        if thin and preallocate:
            raise InvalidRequest("a thin volume cannot be preallocated")
        with self.admin_lock:
            self._check_usable()
            if name in self.volumes:
                raise AlreadyExists(f"volume {name!r} already exists")
            vol = self.shared.create_volume(name, size, preallocate, thin)
            with self.lock:
                self._register(vol)
            return vol

    def allocated(self, vol: Volume) -> int:
        return self.shared.allocated(vol)

    def volume_resize(self, name: str, size: int) -> Volume:
        """Grow a volume. NBD connections opened afterwards see the new size."""
        if size <= 0 or size % SECTOR:
            raise InvalidRequest(f"invalid volume size {size}: must be a positive multiple of 512")
        with self.admin_lock:
            self._check_usable()
            vol = self.volume(name)
            if size < vol.size:
                raise InvalidRequest(
                    f"cannot shrink volume {name!r} from {format_size(vol.size)} to "
                    f"{format_size(size)}: only growing is supported")
            if size == vol.size:
                return vol
            self.shared.resize_volume(vol, size)
            with self.lock:
                vol.size = size
            return vol

    def pool_grow(self, size: int, path: str | None = None) -> None:
        """Raise the pool's capacity: `path` None grows the last data file to hold `size`
        more bytes; a new path adds a data file of `size` bytes. Online: new extents are
        allocated from at once."""
        with self.admin_lock:
            self._check_usable()
            self.shared.grow(size, path)
        self.wake_destager()

    def pool_release(self) -> int:
        """Truncate the data files' unused tails (ExtentPool.release): the file system gets
        back what growth preallocated. Works on a pool that waits for space or went
        read-only; the destager retries a waiting batch at once. Returns bytes released."""
        if self.closed:
            raise PoolError("pool is closed")
        with self.admin_lock:
            released = self.pool.release()
        self.wake_destager()
        return released

    def volume_delete(self, name: str) -> None:
        with self.admin_lock, self.destage_mutex:
            self._check_usable()
            if self.destager is not None:
                self.destager.complete_held()  # no written batch of the volume left to settle
            vol = self.volume(name)
            held = self.shared.delete_volume_rows(vol)
            with self.lock:
                del self.volumes[vol.name]
                del self.by_id[vol.id]
                vol.deleted = True
                for snap in list(vol.snaps.values()):
                    vol.remove_snapshot(snap)
                self.changes.drop_volume(vol.id)
                self.resv.drop_volume(vol.id)
            self.shared.release_volume(vol, held)

    # -- the destager's side (destager.DestageHost) -------------------------------------------

    def wait_for_work(self, writing: int, busy: bool) -> tuple[bool, bool]:
        """Block until the destager has a batch to take, beyond the `writing` records its
        written batches hold, or at once when `busy` (a written batch to complete). Lazy:
        a batch is ready when the journal (or REMAP data) is half full, someone waits for
        space or a drain, or writes paused for IDLE. Returns (ready, stopping)."""
        j = self.journal
        with self.lock:
            ready = False
            while not self._stopping:
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
            return ready, self._stopping

    def pending_after(self, skip: int, limit: int) -> list[jn.Record]:
        """Up to `limit` pending records after the first `skip` (held by written batches)."""
        with self.lock:
            return list(itertools.islice(self.pending, skip, skip + limit))

    def unindex(self, touched: dict[int, set[int]], last_seq: int) -> None:
        """Production holds the records up to last_seq: the changes table forgets them
        (stores/changes.py C3), chunk by chunk of each volume they touched."""
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
        `taken` extents it consumed) go back, in seq order."""
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
        """The destager failed: the pool turns read-only (the journal keeps everything)."""
        with self.lock:
            self.failed = exc
            self.cv.notify_all()

    def wait_for_space(self, reason: str, attempt: int) -> bool:
        """A batch lacked space and changed nothing: wait a little (longer each attempt, or
        until something frees space and wakes us), then the destager retries. False: give
        up, the engine stops (or no destager thread runs: a synchronous destage fails)."""
        with self.lock:
            if self._stopping or self._destager is None:
                return False
            if self.space_short is None:
                log.warning("destage waits for space: %s; writes that need journal space get "
                            "ENOSPC until there is room (free some space on the file system, "
                            "delete snapshots, or run 'jsnap pool release')", reason)
                self.space_short = self.journal.stalled = reason
                self.cv.notify_all()  # writers waiting for journal space: ENOSPC now
            self.space_waits += 1
            self.work.wait(min(SPACE_RETRY_MAX, SPACE_RETRY_FIRST * (1 << min(attempt, 10))))
            return not self._stopping

    def space_returned(self) -> None:
        with self.lock:
            if self.space_short is not None:
                log.warning("destage resumed: space is back")
                self.space_short = self.journal.stalled = None

    def wake_destager(self) -> None:
        """Something freed space (pool grow, pool release): retry a waiting batch now."""
        with self.lock:
            self.work.notify_all()

    # -- data path ----------------------------------------------------------------------------

    def _check_range(self, vol: Volume, offset: int, length: int, write: bool) -> None:
        if vol.deleted:
            raise NotFound(f"volume {vol.name!r} was deleted")
        if offset < 0 or length < 0 or offset + length > vol.size:
            cls = NoSpace if write else InvalidRequest
            raise cls(
                f"range {offset}+{length} is beyond the end of volume {vol.name!r} "
                f"({vol.size} bytes)"
            )

    def read(self, vol: Volume, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.readinto(vol, offset, memoryview(buf))
        return buf

    def readinto(self, vol: Volume, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the volume's bytes at `offset`: journaled data over production."""
        length = len(buf)
        self._check_range(vol, offset, length, write=False)
        if length == 0:
            return
        overlays = None
        with self.lock:
            if vol.id in self.changes.volumes:
                pieces = self.changes.pieces(vol.id, offset, length)
                if pieces:
                    # Journal bytes are read under the lock: their space cannot be reused
                    # until the destager takes the lock to release it.
                    overlays = [(s, e, self._pread_piece(e - s, d)) for _, s, e, d in pieces]
        vol.file.preadinto(buf, offset)
        if overlays:
            for s, e, data in overlays:
                buf[s - offset : e - offset] = data if data is not None else bytes(e - s)

    def _pread_piece(self, n: int, data_pos: int) -> bytes | None:
        """The bytes of a changes-table piece (lock held: its space is not reused meanwhile);
        None for zeroes."""
        if data_pos < 0:
            return None
        if data_pos & POOL_BIT:
            f_no, off = pool_location(data_pos)
            return self.pool.files[f_no].file.pread(n, off)
        return self.jfile.pread(n, data_pos)

    def write(self, vol: Volume, offset: int, data: bytes | bytearray | memoryview,
              fua: bool = False, wait: bool = True) -> int:
        """Journal `data` at `offset`; return the seq of its (last) record.

        With wait=False the call does not wait for durability: the caller must call
        `wait_durable(seq, fua)` before acknowledging (lets a server batch many requests
        behind one fdatasync)."""
        view = memoryview(data).cast("B")
        self._check_range(vol, offset, len(view), write=True)
        seq = self._append_writes(vol, [(offset, view)])
        if wait and (fua or self.sync_mode):
            self.wait_durable(seq, fua)
        return seq

    def write_many(self, vol: Volume, writes: list[tuple[int, memoryview]]) -> int:
        """Journal several writes to `vol` under one lock hold with one pwritev; return the
        last seq. Does not wait for durability: see wait_durable. Each must be in range."""
        for offset, view in writes:
            self._check_range(vol, offset, len(view), write=True)
        return self._append_writes(vol, writes)

    def _append_writes(self, vol: Volume, writes: list[tuple[int, memoryview]]) -> int:
        maxp = self.journal.max_payload
        items: list[jn.Entry] = []
        mask = self.chunk_size - 1
        last = -1
        for offset, view in writes:
            length = len(view)
            if length >= REMAP_MIN and vol.thin is not None and not (offset | length) & mask:
                # Requests of one batch are concurrent (NBD does not order them): the
                # redirected ones may take their seqs first.
                seq = self._remap_write(vol, offset, view)
                if seq is not None:
                    last = max(last, seq)
                    continue
                # No fresh extents: journaled, it needs extents only for chunks the volume
                # does not own (a full pool still takes overwrites: issue 25).
            pos = 0
            while pos < length:  # split what exceeds one record's payload
                part = min(maxp, length - pos)
                items.append((jn.WRITE, vol.id, offset + pos, part, (view[pos : pos + part],),
                              part, 0, ""))
                pos += part
        with self.lock:
            self._check_usable()
            if vol.deleted:
                raise NotFound(f"volume {vol.name!r} was deleted")
            if not items:
                return max(last, self.journal.written_seq)
            budget = [0]
            covered_at = -1
            if vol.thin is not None:  # T1: no write is journaled that its destage cannot place
                budget[0] = self.resv.reserve(vol, [(jn.WRITE, o, len(v)) for o, v in writes])
                if not budget[0]:  # every chunk is covered: see _admit
                    covered_at = self.journal.next_seq
            try:
                return self.journal.append_many(
                    items, lambda recs: self._admit(vol, recs, budget, covered_at))[-1].seq
            finally:
                self.resv.release(budget[0])

    def _remap_write(self, vol: Volume, offset: int, view: memoryview) -> int | None:
        """Write whole chunks once, into fresh extents, and journal only where they are.

        Order (journal.REMAP): extents taken, data written, then the record appended; a sync
        of the journal syncs the pool first (_sync_remapped), and replay checks the data's
        CRC, so a record never stands for data that did not reach the disk. The destager
        later maps the extents in place of the old ones, which go to a snapshot that needs
        them or back to the pool: no copy, whatever the snapshots. None, with nothing
        changed, when the pool cannot give fresh extents for all of it but the volume owns
        some of its chunks: the journaled path then needs fewer."""
        length = len(view)
        n = length >> self.chunk_shift
        with self.lock:
            while True:
                self._check_usable()
                if vol.deleted:
                    raise NotFound(f"volume {vol.name!r} was deleted")
                if not self.remap_bytes or self.remap_bytes + length <= self.remap_limit:
                    break
                if self.space_short is not None:
                    raise NoSpace(f"destage is waiting for space: {self.space_short}")
                self.remap_waiters += 1
                self.work.notify()
                try:
                    self.cv.wait()
                finally:
                    self.remap_waiters -= 1
            try:
                self.pool.reserve(n)
            except NoSpace:
                # Journaled, it would need extents only for chunks the volume does not own:
                # worth it only if it owns some (nothing changed here either way).
                if self.resv.need(vol, [(jn.WRITE, offset, length)]) < n:
                    return None
                raise
            self.remap_bytes += length
        exts: list[int] = []
        try:
            exts = self.pool.take_many(n)
            cs = self.chunk_size
            for f, off, i, j in self.pool.runs(exts):
                f.pwrite(view[i * cs : j * cs], off)
            crc = crc32c(view)
            with self.lock:
                self._check_usable()
                if vol.deleted:
                    raise NotFound(f"volume {vol.name!r} was deleted")
                self.remap_dirty += 1  # before the append: a sync that covers it sees this

                def admit(recs: list[jn.Record]) -> None:
                    recs[0].exts = exts
                    self._admit(vol, recs)

                entry = (jn.REMAP, vol.id, offset, length,
                         (b"".join(jn.EXT.pack(e) for e in exts),), 8 * n, crc, "")
                return self.journal.append_many([entry], admit)[0].seq
        except BaseException:
            with self.lock:
                self.remap_bytes -= length
                self.cv.notify_all()
            self.pool.give_back(exts)
            self.pool.unreserve(n - len(exts))
            raise

    @property
    def remap_limit(self) -> int:
        """Bytes of REMAP data that may wait for destage (writers wait beyond it)."""
        return min(self.journal.capacity, REMAP_MAX_PENDING)

    def _sync_remapped(self) -> None:
        """journal.pre_sync: REMAP data reaches the disk before the records naming it."""
        n = self.remap_dirty
        if n != self._remap_synced:
            self.pool.sync()
            self._remap_synced = n

    def write_zeroes(self, vol: Volume, offset: int, length: int, fua: bool = False,
                     wait: bool = True, no_hole: bool = False) -> int:
        """Zero a range; production gets a hole unless `no_hole` (NBD's NO_HOLE flag)."""
        kind = jn.ZEROES_ALLOC if no_hole else jn.ZEROES
        return self._zero(kind, vol, offset, length, fua, wait)

    def trim(self, vol: Volume, offset: int, length: int, fua: bool = False,
             wait: bool = True) -> int:
        """Discard a range. jsnap guarantees trimmed ranges read back as zeroes."""
        return self._zero(jn.TRIM, vol, offset, length, fua, wait)

    def _zero(self, kind: int, vol: Volume, offset: int, length: int, fua: bool,
              wait: bool) -> int:
        self._check_range(vol, offset, length, write=True)
        with self.lock:
            self._check_usable()
            if vol.deleted:
                raise NotFound(f"volume {vol.name!r} was deleted")
            seq = self.journal.written_seq
            if length:
                budget = [0]
                if vol.thin is not None:
                    budget[0] = self.resv.reserve(vol, [(kind, offset, length)])
                try:
                    rec = self.journal.append(kind, vol.id, offset, length)
                    self._admit(vol, [rec], budget)
                finally:
                    self.resv.release(budget[0])
                seq = rec.seq
            if wait and (fua or self.sync_mode):
                self.journal.sync_upto(seq)
        return seq

    def wait_durable(self, seq: int, fua: bool = False) -> None:
        """What write(..., wait=True) would have waited for: durability in sync mode or FUA."""
        if fua or self.sync_mode:
            with self.lock:
                self.journal.sync_upto(seq)

    def _admit(self, vol: Volume, recs: list[jn.Record], budget: list[int] | None = None,
               covered_at: int = -1) -> None:
        """Records were appended: make them visible to reads and to the destager (lock held).

        A thin volume's records are charged their extents from `budget` (reserved before the
        append); a snapshot that slipped in while the writer waited for journal space can
        make them need more, taken by force (they are journaled already). `covered_at`: the
        journal's next seq when every chunk of these writes was found covered; if the first
        record took it, no record slipped in between, so charging would find nothing."""
        charge = vol.thin is not None and not (recs and recs[0].seq == covered_at)
        for rec in recs:
            if rec.kind in jn.DATA_KINDS:
                self._index(vol, rec)
                if charge:
                    self.resv.admit(vol, rec, budget)
        was_empty = not self.pending
        self.pending.extend(recs)
        self._nudge(was_empty, recs[0].seq if recs else self.journal.next_seq)

    def _nudge(self, was_empty: bool, first_seq: int) -> None:
        """Wake the destager when it has a reason to look: the journal was empty (it starts
        timing idleness) or is half full (it starts destaging at once)."""
        now = self.last_append = time.monotonic()
        marks = self.append_marks
        if now - marks[-1][1] >= AGE_RESOLUTION:
            marks.append((first_seq, now))
            if len(marks) > 4096:
                self._oldest_append()  # prunes
        j = self.journal
        if (was_empty or j.used >= j.capacity * HIGH_WATER or self.drain_requested
                or self.remap_bytes >= self.remap_limit * HIGH_WATER):
            self.work.notify()

    def extents(self, vol: Volume, offset: int, length: int,
                max_extents: int = 4096) -> list[tuple[int, int]]:
        """Allocation map of [offset, offset+length) as (length, flags), flags being NBD's
        base:allocation bits (1 = hole, 2 = reads as zeroes). Journaled ranges are reported as
        data, which is always truthful; holes come from the sparse production file. May cover
        less than asked (at most `max_extents` extents), never zero bytes."""
        self._check_range(vol, offset, length, write=False)
        # Journal first, production second: a record the destager moves in between is then
        # seen in one place or both, never in neither (which would report data as a hole).
        with self.lock:
            pieces = self.changes.pieces(vol.id, offset, length)
        if vol.thin is not None:
            holes = unmapped(vol.thin, offset, offset + length, self.chunk_shift)
        else:
            holes = file_holes(vol.file, offset, offset + length)
        return allocation_map(offset, offset + length, holes,
                              [(s, e) for _, s, e, _ in pieces], max_extents)

    def flush(self) -> None:
        """Return once every write acknowledged before the call is durable."""
        with self.lock:
            self._check_usable()
            self.journal.sync_upto(self.journal.written_seq)

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot(self, vol: Volume, name: str) -> Snapshot:
        snap = vol.snaps.get(name)
        if snap is None:
            raise NotFound(f"volume {vol.name!r} has no snapshot named {name!r}")
        return snap

    def snapshot_list(self, vol: Volume | None = None) -> list[Snapshot]:
        vols = [vol] if vol is not None else self.volume_list()
        with self.lock:
            return [s for v in vols for s in sorted(v.snaps.values(), key=lambda s: s.seq)]

    def snapshot_create(self, vol: Volume, name: str) -> Snapshot:
        """O(1): a durable journal marker. No drain, no pause of other writers."""
        check_name("snapshot", name)
        ctime = time.time()
        raw = name.encode()
        with self.lock:
            self._check_usable()
            if vol.deleted:
                raise NotFound(f"volume {vol.name!r} was deleted")
            if name in vol.snaps:
                raise AlreadyExists(f"volume {vol.name!r} already has a snapshot named {name!r}")
            rec = self.journal.append(
                jn.SNAP_CREATE, vol.id, 0, 0, (raw,), len(raw), aux=int(ctime * 1e6), name=name
            )
            snap = Snapshot(rec.seq, vol.id, name, ctime)
            vol.add_snapshot(snap)
            self._admit(vol, [rec])
            self.journal.sync_upto(rec.seq)
        return snap

    def snapshot_delete(self, vol: Volume, name: str) -> None:
        """Durable journal marker; the destager reclaims chunks no other snapshot needs."""
        with self.lock:
            self._check_usable()
            snap = self.snapshot(vol, name)
            rec = self.journal.append(jn.SNAP_DELETE, vol.id, 0, 0, aux=snap.seq)
            vol.remove_snapshot(snap)
            self._admit(vol, [rec])
            self.journal.sync_upto(rec.seq)

    def read_snapshot(self, snap: Snapshot, offset: int, length: int) -> bytearray:
        vol = self.by_id.get(snap.vol)
        if vol is None or snap.deleted:
            raise NotFound(f"snapshot {snap.name!r} was deleted")
        self._check_range(vol, offset, length, write=False)
        buf = self.images.read(vol, snap.seq, offset, length)
        if snap.deleted:  # its copies may have been freed and reused while we read
            raise NotFound(f"snapshot {snap.name!r} was deleted")
        return buf

    def changed_chunks(self, vol: Volume, since: Snapshot, until: Snapshot | None = None
                       ) -> list[int]:
        """Chunks whose content may differ between snapshot `since` and snapshot `until` (or
        the live volume): changed-block tracking for incremental backups. Exact to the
        chunk: a chunk is listed iff a write, zero or trim reached it in between (even one
        that rewrote the same bytes)."""
        if until is not None and until.seq < since.seq:
            raise InvalidRequest(f"snapshot {until.name!r} is older than {since.name!r}")
        return self.images.changed_chunks(vol, since.seq, None if until is None else until.seq)

    # -- the journal as snapshot reads see it (snapshots.JournalView) ----------------------------

    def overlays(self, vol: int, offset: int, length: int, below_seq: int
                 ) -> list[tuple[int, int, bytes | None]]:
        with self.lock:  # journal bytes are read under the lock: their space is not reused
            return [(s, e, self._pread_piece(e - s, d))
                    for _, s, e, d in self.changes.pieces(vol, offset, length,
                                                          below_seq=below_seq)]

    def chunks_after(self, vol: int, since: int, below: int | None = None) -> set[int]:
        with self.lock:
            return self.changes.chunks_after(vol, since, below)

    def snapshot_rollback(self, vol: Volume, name: str) -> int:
        """Make the volume's content equal to the snapshot's, through the journaled write path.

        Returns the number of chunks rewritten. Newer snapshots stay valid (their chunks are
        preserved as for any write). Not atomic across a crash: rerun it to complete it.
        """
        with self.admin_lock:
            snap = self.snapshot(vol, name)
            chunks = self.images.changed_chunks(vol, snap.seq, None)
            cs = self.chunk_size
            for c in chunks:
                off = c * cs
                n = min(cs, vol.size - off)
                data = self.read_snapshot(snap, off, n)
                if data.count(0) == n:
                    self.write_zeroes(vol, off, n)
                else:
                    self.write(vol, off, data)
            self.flush()
            return len(chunks)

    # -- destage control ----------------------------------------------------------------------

    def destage(self, max_records: int | None = None) -> int:
        """Destage synchronously (tests, tools); returns records destaged. Not with the thread."""
        assert self._destager is None, "the destager thread owns destaging"
        d = Destager(self)
        done = 0
        while self.pending and (max_records is None or done < max_records):
            done += d.run_batch(None if max_records is None else max_records - done)
        return done

    def wait_destaged(self, timeout: float = 30.0) -> None:
        """Block until the journal is empty (the destager thread must be running)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.drain_requested = True
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
                self.drain_requested = False

    def _oldest_append(self) -> float:
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

    def stats(self) -> dict[str, object]:
        with self.lock:
            j = self.journal
            failed = self.failed or j.failed
            now = time.monotonic()
            oldest = self._oldest_append()
            rate_records, rate_bytes = self.destage_window.rate(now)
            return {
                "state": (f"read-only: {failed}" if failed else
                          f"waiting for space: {self.space_short}" if self.space_short
                          else "ok"),
                "destage_space_waits": self.space_waits,
                "durability": self.durability,
                "chunk_size": self.chunk_size,
                "journal_size": j.end,
                "journal_used": j.used,
                "journal_fill": j.fill(),
                "journal_records": len(self.pending),
                "journal_waiters": j.waiters + self.remap_waiters,
                "remap_pending_bytes": self.remap_bytes,
                "durable_seq": j.durable_seq,
                "written_seq": j.written_seq,
                "changes_pieces": self.changes.npieces,
                "destaged_records": self.destaged_records,
                "preserved_copies": self.preserved_copies,
                "cache_windows_dropped": self.cache_windows_dropped,
                "journal_oldest_age": max(now - oldest, 0.0) if self.pending else 0.0,
                "destaged_bytes": self.destaged_bytes,
                "destage_rate_records": rate_records,
                "destage_rate_bytes": rate_bytes,
                "snapshot_count": sum(len(v.snaps) for v in self.volumes.values()),
                "store_slots": self.slots.count,
                "store_free_slots": len(self.slots.free_slots()),
                "volumes": len(self.volumes),
                **self.pool_stats(),
            }

    def pool_stats(self) -> dict[str, int]:
        """Pool space in bytes (thin volumes): capacity, backed by the data files, mapped by
        volumes, held for snapshots, free-listed, reserved by journaled records."""
        mapped = sum(v.thin.mapped for v in self.by_id.values() if v.thin is not None)
        return self.shared.space(mapped, self.remap_bytes // self.chunk_size)


def errno_of(exc: BaseException) -> int:
    if isinstance(exc, JsnapError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
