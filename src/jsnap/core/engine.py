"""The engine: owns a set of volumes and everything that moves their writes.

Model
-----
An open pool is two parts (README "Design"): the owner's share of the pool (core/pool.py:
the catalog, its thin extent pool, its raw snapshot store, its lock) and an engine, which
owns that owner's volumes (layout.py, "Owners": every volume of the pool while it has one
owner) with their journal, changes table, thin reservations, backlog and destager, and
their snapshot markers. The engine is the request side; what it composes:

    stores/journal/        the journal (its NVRAM)        core/backlog.py    pending queue,
    stores/changes.py      which bytes are journaled      core/destager.py   destage
    core/reservations.py   thin extents promised          core/recovery.py   replay at open
    core/snapshots.py      snapshot images                core/access.py     access rules
    core/writes.py         the write path

Write path (core/writes.py): reserve the thin extents the write's destage may need, append
one journal record, index it in the changes table, hand it to the backlog, acknowledge
(after the record is durable in `sync` mode or with FUA); large chunk-aligned writes to
thin volumes go straight into fresh pool extents (REMAP). Read path: the newest journaled
bytes win, the rest comes from production. Snapshot create/delete are journal markers; the
destager turns them into catalog rows in journal order. Open: lock and open the shared
pool, bump the generation, load the volumes, replay the journal from the checkpoint
(core/recovery.py), start the destager.

Invariants
----------
E1 A write is acknowledged only after its record is journaled and indexed: a read after
   the acknowledgement sees it, and a crash after it replays it (DESIGN invariants 3, 6).
E2 A thin write is journaled only if the extents its destage may need are reserved first
   (thin.py T1): an acknowledged write never fails later for lack of space.
E3 A REMAP record is appended only after its data is in its fresh extents, and every
   journal sync syncs the pool first (WritePath.sync_remapped): a durable record never
   names data that did not reach the disk (replay checks its CRC too: recovery.py RP1).
E4 A snapshot create or delete is durable in the journal before it returns; its catalog
   row follows in journal order (the destager's batch ends with the marker).
E5 `self.lock` (the journal's condition) guards the journal, the changes table, the
   backlog's queue and the volume/snapshot registry; file I/O on production and the
   stores happens outside it. Admin changes are serialised by `admin_lock`.
E6 Once the backlog failed (an I/O error in destage), no write is taken: the pool is
   read-only until restarted, and the journal keeps everything acknowledged.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from jsnap.core.access import AccessRules
from jsnap.core.backlog import Backlog, CrashPoint
from jsnap.core.extents import allocation_map, file_holes, unmapped
from jsnap.core.pool import Pool
from jsnap.core.recovery import Replay
from jsnap.core.reservations import Reservations
from jsnap.core.snapshots import Images
from jsnap.core.status import engine_status
from jsnap.core.volumes import Snapshot, Volume, check_name, check_range, check_writable
from jsnap.core.writes import WritePath
from jsnap.errors import (
    AlreadyExists,
    InvalidRequest,
    JsnapError,
    NotFound,
    PoolError,
)
from jsnap.stores import journal as jn
from jsnap.stores.catalog import DEFAULT_OWNER, Catalog
from jsnap.stores.changes import POOL_BIT, ChangesTable, pool_location
from jsnap.stores.device import open_store
from jsnap.stores.files import BlockFile, FileOpener
from jsnap.stores.snapstore import SlotStore
from jsnap.stores.thin import ExtentPool
from jsnap.units import format_size

log = logging.getLogger("jsnap.engine")

SECTOR = 512
FLUSH_INTERVAL = 0.025  # writeback mode: the journal is synced at least this often


class Engine:
    """An open pool. Create with `Engine.open(path)`; close with `close()`."""

    # Set by open() / _recover():
    shared: Pool
    owner: str
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
    backlog: Backlog
    writes: WritePath
    replay_seconds: float
    replayed_records: int
    flush_interval: float
    drop_big_folios: bool

    def __init__(self) -> None:  # use Engine.open
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)  # journal space / sync waits
        self.admin_lock = threading.Lock()  # serialises volume create/delete and rollbacks
        self.volumes: dict[str, Volume] = {}
        self.by_id: dict[int, Volume] = {}
        self.closed = False
        self._flusher: threading.Thread | None = None

    # -- open / close -------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str, *, owner: str = DEFAULT_OWNER, start_destager: bool = True,
        opener: FileOpener = open_store, flush_interval: float = FLUSH_INTERVAL,
        drop_big_folios: bool = False,
    ) -> Engine:
        """Open (and recover) the volumes of `owner` in a pool (the default owner: every
        volume until the pool has others). `flush_interval`: in writeback mode, sync the journal
        at least this often (seconds) while it has unsynced records; 0 syncs only on FLUSH,
        FUA and snapshot operations (fastest, but a snapshot create then waits for the
        whole unsynced backlog). `drop_big_folios`: the destager's page-cache episodes
        (destager module doc; `jsnap serve` turns them on). `opener`: how the pool's files
        are opened, the one seam for wrapping them (tools/faults.py injects errors through
        it; `jsnap.cli.main(opener=...)` passes one down)."""
        shared = Pool.open(path, opener, owner)
        self = cls()
        self.owner = owner
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
        """Own the owner's volumes, and rebuild their state from its journal."""
        cat = self.catalog
        gen = cat.get_int("generation") + 1
        cat.set_many({"generation": gen})  # J2: durable before the first append of this life
        self.changes = ChangesTable(self.chunk_size)
        self.resv = Reservations(self.pool, self.chunk_shift)
        for vol in self.shared.load_volumes():
            self._register(vol)
        self.images = Images(self.catalog, self.slots, self.pool, self.chunk_shift, self)
        self.access = AccessRules(self.catalog, self.path, self.volume)
        self.jfile = self.opener(self.journal_path)
        self.journal = jn.Journal(
            self.jfile,
            self.cv,
            generation=gen,
            checkpoint_pos=cat.get_int("checkpoint_pos"),
            checkpoint_seq=cat.get_int("checkpoint_seq"),
            checkpoint_gen=cat.get_int("checkpoint_gen", 0),
        )
        self.journal.after_fork = self.shared.lock.forget
        self.backlog = bl = Backlog(self.lock, self.cv, self.journal, self.jfile, self.changes,
                                    self.resv, cat, self.pool, self.slots, self.by_id,
                                    drop_big_folios=self.drop_big_folios)
        self.writes = WritePath(self.lock, self.cv, self.journal, self.changes, self.resv, bl,
                                self.pool, self.chunk_size, self.sync_mode,
                                self._check_usable)
        self.journal.pre_sync = self.writes.sync_remapped
        t0 = time.monotonic()
        replay = Replay(self.by_id, self.changes, self.resv, self.pool, bl.pending,
                        remap_done=cat.get_int("remap_seq", -1))
        replay.run(self.journal)
        bl.remap_bytes = replay.remap_bytes
        self.replay_seconds = time.monotonic() - t0
        self.replayed_records = len(bl.pending)
        log.info("replayed %d journal records in %.3f s; %s", self.replayed_records,
                 self.replay_seconds, self.journal.replay_end)

    def _register(self, vol: Volume) -> None:
        self.volumes[vol.name] = vol
        self.by_id[vol.id] = vol

    def start_destager(self) -> None:
        self.backlog.start()
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
                if self.backlog.stopping or self.journal.failed is not None:
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
        self.backlog.stop()
        if self._flusher is not None:
            self._flusher.join()
        try:
            if self.backlog.failed is None and self.journal.failed is None:
                with self.lock:
                    self.journal.sync_upto(self.journal.written_seq)
        finally:
            self._close_files()

    def abandon(self) -> None:
        """Drop the pool as a crash would: no sync, no destage (tests simulate crashes with it)."""
        self.backlog.stop()
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

    @property
    def crashpoint(self) -> CrashPoint | None:
        """A hook called at each named crash point of the destage (tests raise there)."""
        return self.backlog.crashpoint

    @crashpoint.setter
    def crashpoint(self, hook: CrashPoint | None) -> None:
        self.backlog.crashpoint = hook

    @property
    def failed(self) -> BaseException | None:
        """Why the pool turned read-only (the destager failed), None while it is writable."""
        return self.backlog.failed

    def _check_usable(self) -> None:
        if self.closed:
            raise PoolError("pool is closed")
        if self.backlog.failed is not None:
            raise PoolError(f"pool failed and is read-only: {self.backlog.failed}")

    # -- volumes ------------------------------------------------------------------------------

    def volume(self, name: str) -> Volume:
        vol = self.volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume named {name!r}")
        return vol

    def owner_of(self, name: str) -> str | None:
        """Which owner of the pool holds volume `name` (None: no volume of that name)."""
        return self.catalog.volume_owner(name) if name else None

    def release_thread(self) -> None:
        """A thread that is done with the engine (a client's) closes its catalog connection."""
        self.catalog.release_thread()

    def volume_list(self) -> list[Volume]:
        return sorted(self.volumes.values(), key=lambda v: v.name)

    def volume_create(self, name: str, size: int | None, preallocate: bool = False,
                      thin: bool = False, device: str | None = None) -> Volume:
        """A raw volume is one file (sparse, or preallocated); a thin one maps its chunks to
        pool extents on first destage (stores/thin.py) and can be over-provisioned. With
        `device` (a block device, or an NBD export's URI), a raw volume whose production
        is that storage, with its data (size None: all of it)."""
        check_name("volume", name)
        if device is None and (size is None or size <= 0 or size % SECTOR):
            raise InvalidRequest(f"invalid volume size {size}: must be a positive multiple of 512")
        if thin and preallocate:
            raise InvalidRequest("a thin volume cannot be preallocated")
        with self.admin_lock:
            self._check_usable()
            if name in self.volumes:
                raise AlreadyExists(f"volume {name!r} already exists")
            if device is not None:
                vol = self.shared.adopt_volume(name, size, device)
            else:
                assert size is not None
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

    def pool_grow(self, size: int | None, path: str | None = None) -> None:
        """Raise the pool's capacity (Pool.grow): the last data file by `size` bytes, or a
        new data file or block device at `path`. Online: new extents are allocated from
        at once."""
        with self.admin_lock:
            self._check_usable()
            self.shared.grow(size, path)
        self.backlog.wake()

    def pool_release(self) -> int:
        """Truncate the data files' unused tails (ExtentPool.release): the file system gets
        back what growth preallocated. Works on a pool that waits for space or went
        read-only; the destager retries a waiting batch at once. Returns bytes released."""
        if self.closed:
            raise PoolError("pool is closed")
        with self.admin_lock:
            released = self.pool.release()
        self.backlog.wake()
        return released

    def volume_delete(self, name: str, timeout: float = 600.0) -> None:
        """Delete a volume, its snapshots and its storage. An adopted volume's device is
        left holding the volume's content: its writes are destaged first (pool.py P4),
        while new ones are refused."""
        vol = self.volume(name)
        if vol.adopted:
            with self.lock:
                vol.retiring = True
                last = self.journal.written_seq
            try:
                self.backlog.wait_destaged_upto(last, timeout)
            except BaseException:
                vol.retiring = False
                raise
        with self.admin_lock, self.backlog.destage_mutex:
            self._check_usable()
            destager = self.backlog.destager
            if destager is not None:
                destager.complete_held()  # no written batch of the volume left to settle
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

    # -- data path ----------------------------------------------------------------------------

    def read(self, vol: Volume, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.readinto(vol, offset, memoryview(buf))
        return buf

    def readinto(self, vol: Volume, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the volume's bytes at `offset`: journaled data over production."""
        length = len(buf)
        check_range(vol, offset, length, write=False)
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
        if overlays is None or not _covers(overlays, offset, offset + length):
            vol.file.preadinto(buf, offset)  # all journaled: production is not needed
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
        """Journal `data` at `offset`; return the seq of its (last) record (WritePath.write:
        with wait=False, call wait_durable before acknowledging)."""
        return self.writes.write(vol, offset, data, fua, wait)

    def write_zeroes(self, vol: Volume, offset: int, length: int, fua: bool = False,
                     wait: bool = True, no_hole: bool = False) -> int:
        return self.writes.write_zeroes(vol, offset, length, fua, wait, no_hole)

    def trim(self, vol: Volume, offset: int, length: int, fua: bool = False,
             wait: bool = True) -> int:
        return self.writes.trim(vol, offset, length, fua, wait)

    def wait_durable(self, seq: int, fua: bool = False) -> None:
        self.writes.wait_durable(seq, fua)

    def extents(self, vol: Volume, offset: int, length: int,
                max_extents: int = 4096) -> list[tuple[int, int]]:
        """Allocation map of [offset, offset+length) as (length, flags), flags being NBD's
        base:allocation bits (1 = hole, 2 = reads as zeroes). Journaled ranges are reported as
        data, which is always truthful; holes come from the sparse production file. May cover
        less than asked (at most `max_extents` extents), never zero bytes."""
        check_range(vol, offset, length, write=False)
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
            check_writable(vol)
            if name in vol.snaps:
                raise AlreadyExists(f"volume {vol.name!r} already has a snapshot named {name!r}")
            rec = self.journal.append(
                jn.SNAP_CREATE, vol.id, 0, 0, (raw,), len(raw), aux=int(ctime * 1e6), name=name
            )
            snap = Snapshot(rec.seq, vol.id, name, ctime)
            vol.add_snapshot(snap)
            self.writes.admit(vol, [rec])
            self.journal.sync_upto(rec.seq)
        return snap

    def snapshot_delete(self, vol: Volume, name: str) -> None:
        """Durable journal marker; the destager reclaims chunks no other snapshot needs."""
        with self.lock:
            self._check_usable()
            snap = self.snapshot(vol, name)
            rec = self.journal.append(jn.SNAP_DELETE, vol.id, 0, 0, aux=snap.seq)
            vol.remove_snapshot(snap)
            self.writes.admit(vol, [rec])
            self.journal.sync_upto(rec.seq)

    def read_snapshot(self, snap: Snapshot, offset: int, length: int) -> bytearray:
        vol = self.by_id.get(snap.vol)
        if vol is None or snap.deleted:
            raise NotFound(f"snapshot {snap.name!r} was deleted")
        check_range(vol, offset, length, write=False)
        buf = self.images.read(vol, snap.seq, offset, length)
        if snap.deleted:  # its copies may have been freed and reused while we read
            raise NotFound(f"snapshot {snap.name!r} was deleted")
        return buf

    def snapshot_extents(self, snap: Snapshot, offset: int, length: int,
                         max_extents: int = 4096) -> list[tuple[int, int]]:
        """extents() of a snapshot: a range is a hole (1 | 2) only where the snapshot reads
        zeroes that no data backs (snapshots.py I3); may cover less than asked."""
        vol = self.by_id.get(snap.vol)
        if vol is None or snap.deleted:
            raise NotFound(f"snapshot {snap.name!r} was deleted")
        check_range(vol, offset, length, write=False)
        runs = self.images.allocation(vol, snap.seq, offset, length, max_extents)
        if snap.deleted:  # its copies may have been freed and reused while we looked
            raise NotFound(f"snapshot {snap.name!r} was deleted")
        return runs

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

    def journaled(self, vol: int, offset: int, length: int, below_seq: int
                  ) -> list[tuple[int, int, bool]]:
        with self.lock:
            return [(s, e, d < 0) for _, s, e, d in
                    self.changes.pieces(vol, offset, length, below_seq=below_seq)]

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
        return self.backlog.destage(max_records)

    def wait_destaged(self, timeout: float = 30.0) -> None:
        """Block until the journal is empty (the destager thread must be running)."""
        self.backlog.wait_drained(timeout)

    def stats(self) -> dict[str, object]:
        """The engine's state for status, the admin API and /metrics (core/status.py)."""
        return engine_status(self)

    def pool_stats(self) -> dict[str, int]:
        """Pool space in bytes (thin volumes): capacity, backed by the data files, mapped by
        volumes, held for snapshots, free-listed, reserved by journaled records."""
        mapped = sum(v.thin.mapped for v in self.by_id.values() if v.thin is not None)
        return self.shared.space(mapped, self.backlog.remap_bytes // self.chunk_size)


def _covers(pieces: list[tuple[int, int, bytes | None]], start: int, end: int) -> bool:
    """Whether the (possibly overlapping) pieces cover [start, end) whole."""
    pos = start
    for s, e in sorted((s, e) for s, e, _ in pieces):
        if s > pos:
            return False
        pos = max(pos, e)
    return pos >= end


def errno_of(exc: BaseException) -> int:
    if isinstance(exc, JsnapError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
