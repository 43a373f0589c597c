"""The destager: moves journaled records to production, preserving old chunks first.

Model
-----
Records are destaged in seq order, in batches. A batch never extends past a snapshot marker
(it ends with one), so inside a batch every chunk needs at most one preserved copy and that
copy is the chunk's content from before the batch. One batch is:

  plan      for each data record r and chunk c it touches: copy c iff some live snapshot S
            of the volume has  max_hi(c) < S.seq < r.seq, where max_hi(c) is the newest
            preserved copy of c. The copy is recorded as (c, hi=r.seq): it serves every
            snapshot between the previous destaged write of c and r — O(1) work per write,
            whatever the number of snapshots.
  phase A   copy production chunks into free store slots; fdatasync the store; commit the
            index rows (and the batch's snapshot create/delete rows) in one transaction.
  phase B   write the records to production (absorbing records wholly overwritten later in
            the batch); drop them from the changes table; fdatasync production.
  checkpoint  persist (pos, seq) after the batch, then release its journal space.

The destager thread pipelines the production fdatasync: one sync runs on a helper thread,
covering every batch written when it started, while later batches are planned and written
in place; when it ends, one checkpoint passes all the batches it covered and their journal
space is released, and the next sync covers what was written meanwhile (group commit: a
slow disk gets bigger, cheaper syncs). At most MAX_WRITTEN batches wait so. Only a batch
that writes in place overlaps the ones before it: a batch that commits catalog rows
(copies, map changes, markers, REMAP) first completes them all, so replay never re-destages
a batch over a later batch's catalog state. Re-applying in-place batches in seq order after
a crash gives the same bytes whatever part of each reached the disk (invariant 5).

Page cache (`serve` turns it on; `--no-drop-big-folios`): a small write into a page-cache
folio that a large write or a sequential read made walks every buffer head of that folio,
on the write and again at writeback: 3-7 times the kernel CPU of a write into a small folio
here (bench/folio_cost.py). The destager times its batches of small in-place writes (thread
CPU). When one costs more than SLOW_WRITE per write, an episode starts: every written batch
is completed, so the page cache of production is clean, the FOLIO_WINDOW-aligned windows the
slow batch wrote are offered for dropping, and from then on each window is offered before
the episode's first write into it; later small writes there get small folios. The first
batch that is fast again ends the episode. OsFile.drop_cache drops only windows that this
process wrote with large writes (their big folios are its own) and that served no read in
the last 10-20 s: page cache that was there before the server started (a warm pool after a
restart, where replay's small writes spread over the whole volume would otherwise drop it
all: issue 19) and windows reads use are kept, since dropping them sends reads to the disk
(BENCHMARKS.md runs 11 and 15). Advice only: no data or durability depends on it.

Boundary: the destager is built with the engine's Backlog (core/backlog.py) and sees it
only as DestageHost (below): the stores it reads and writes (journal payloads, production,
snapshot store, pool extents, catalog) and a few calls to take work (wait_for_work,
pending_after) and report it (unindex, checkpoint, destaged, release_preserved, fail,
wait_for_space, space_returned). What a batch does is decided by the pure functions of
jsnap.core.plan; this module applies it in the order of the invariants below.

REMAP records (journal.REMAP) carry no data: their chunks are already written to fresh
extents, which the plan maps in place of the old ones (preserved, or freed). A batch holds
either only REMAP records or none, so no phase-B write ever lands in a REMAP extent within
its own batch (replay trusts an uncommitted REMAP record's data by its CRC) and no earlier
record of the batch is written over a remapped chunk. The commit records the batch's last
REMAP seq ("remap_seq"): after a crash, records up to it are no-ops whose extents the
catalog already owns or freed.

Why "smallest hi > S.seq" finds snapshot S's copy of chunk c: at every destaged write w of c,
all live snapshots older than w get covered (by a copy with hi = w, or already by an older
one), so a live snapshot with no copy of hi > S.seq has seen no destaged write of c since it
was taken: production plus the journaled records below S.seq is its image.

Invariants (DESIGN.md numbering)
--------------------------------
1. Production's c is overwritten only in phase B, after the copy is fsynced and indexed.
2. The checkpoint moves only after production is fsynced.
5. Replay is idempotent: a record whose copy was already indexed finds max_hi(c) >= r.seq
   and does not copy again, so new data is never preserved as if it were old.
7. Snapshot store slots come from a free list or grow the store file; a full filesystem
   fails the batch (the journal keeps the records, writers wait), never a snapshot.

Space (issue 25): a batch that fails for lack of space (ENOSPC or EDQUOT from a write or a
file's growth, NoSpace from the catalog's commit: catalog K4) is waited out, not turned
into a read-only pool. Before its commit a batch changed nothing that matters (its slots
and extents go back), so it is planned again; after it (phase B, checkpoint) its writes
and the checkpoint are idempotent, so they are redone in place. Meanwhile the engine says
"waiting for space" and writers that would wait for journal space get ENOSPC
(DestageHost.wait_for_space); the first batch that passes ends it. A failed fdatasync is
never retried, whatever its errno (fsyncgate): SyncFailed, and the pool turns read-only.

Outages: a store that cannot be reached (StoreUnavailable: another server's NBD export
that went away, stores/remote.py) is waited out the same way, with the same backoff, and
the engine says "waiting for store" meanwhile; writers keep landing in the journal while
it has room, then wait for it. Such a failure puts in doubt only what was written to that
store since its last sync, so before going on the destager writes again what its written
batches wrote to raw volumes (`_rewrite`: journal to production, idempotent, in seq
order), and a sync that failed so is done again, not fatal. Thin volumes' data files are
local files, whose failures stay fatal as above.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import errno
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from jsnap.core.plan import END, ThinPlan, absorb, plan_thin, raw_copies, sort_batch
from jsnap.core.stats import Histogram
from jsnap.errors import JsnapError, NoSpace
from jsnap.stores import journal as jn
from jsnap.stores.catalog import Catalog, CatalogTxn
from jsnap.stores.files import WINDOW_SHIFT, BlockFile, StoreUnavailable
from jsnap.stores.snapstore import SlotStore
from jsnap.stores.thin import ExtentPool, ThinMap

log = logging.getLogger("jsnap.destager")

# A batch's production sync is what a snapshot create's journal sync can wait behind (a
# device flush takes whatever is in flight): 256 random 4 KiB records sync in ~11 ms on a
# slow disk, 1024 in ~46 ms, at the same cost per record (BENCHMARKS.md run 12).
MAX_BATCH_RECORDS = 256
COPY_IN_KERNEL = 256 << 10  # records this large go journal -> production by copy_file_range
HIGH_WATER = 0.5  # journal fill at which destaging starts while writes keep coming
IDLE = 0.5  # seconds without a new record after which the journal is drained anyway
MAX_BATCH_BYTES = 4 << 20
MAX_WRITTEN = 8  # batches written to production and waiting for their sync (module doc)
# Page cache (module doc): the largest folio (x86-64 PMD size); the CPU time per small
# production write that starts an episode (about 5 µs into small folios, 14-16 into big
# ones, Python included); how many small writes make a batch's time worth reading; how
# many dropped windows an episode remembers.
FOLIO_WINDOW = 1 << WINDOW_SHIFT  # 2 MiB, OsFile's unit of read memory too
SLOW_WRITE = 8e-6
MIN_TIMED = 64
MAX_DROPPED = 16384


class DestageVolume(Protocol):
    """What the destager reads of a volume (engine.Volume)."""

    @property
    def id(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def file(self) -> BlockFile: ...
    @property
    def thin(self) -> ThinMap | None: ...
    @property
    def snap_seqs(self) -> list[int]: ...
    @property
    def by_seq(self) -> Mapping[int, object]: ...


class DestageHost(Protocol):
    """Everything the destager sees of the engine (core/backlog.py's Backlog is it): the
    stores it reads and writes, and the few calls through which it takes work and reports
    what it destaged. The engine and its backlog own the journal, the pending queue, the
    changes table and the reservations; the destager never touches them directly, so it
    can later run beside the engine in another process."""

    chunk_size: int
    chunk_shift: int
    drop_big_folios: bool
    destage_mutex: threading.Lock  # held for a whole batch: volume delete waits on it
    preserved_copies: int  # metrics, written by the destager alone
    cache_windows_dropped: int

    # Stores: the journal's file (payloads only), production, the snapshot store, the index.
    @property
    def by_id(self) -> Mapping[int, DestageVolume]: ...
    @property
    def jfile(self) -> BlockFile: ...
    @property
    def pool(self) -> ExtentPool: ...
    @property
    def slots(self) -> SlotStore: ...
    @property
    def catalog(self) -> Catalog: ...
    @property
    def destage_seconds(self) -> Histogram: ...

    def wait_for_work(self, writing: int, busy: bool) -> tuple[bool, bool]: ...
    def pending_after(self, skip: int, limit: int) -> list[jn.Record]: ...
    def unindex(self, touched: dict[int, set[int]], last_seq: int) -> None: ...
    def checkpoint(self, last: jn.Record) -> None: ...
    def destaged(self, batch: list[jn.Record], taken: int, now: float) -> None: ...
    def release_preserved(self, marker: jn.Record | None, freed: list[int]) -> None: ...
    def hit(self, point: str) -> None: ...
    def fail(self, exc: BaseException) -> None: ...
    def wait_for_space(self, reason: str, attempt: int) -> bool: ...
    def space_returned(self) -> None: ...
    def wait_for_store(self, reason: str, attempt: int) -> bool: ...
    def store_returned(self) -> None: ...


class SyncFailed(JsnapError):
    """An fdatasync of a store failed: never retried (module doc, "Space")."""


def space_error(exc: BaseException) -> bool:
    """A failure that space coming back cures (module doc, "Space")."""
    if isinstance(exc, NoSpace):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def outage(exc: BaseException) -> bool:
    """A store that could not be reached: waited out and redone (module doc, "Outages")."""
    return isinstance(exc, StoreUnavailable) or (
        isinstance(exc, SyncFailed) and isinstance(exc.__cause__, StoreUnavailable))


def _durable(sync: Callable[[], None]) -> None:
    try:
        sync()
    except OSError as exc:
        raise SyncFailed(f"fdatasync failed: {exc}") from exc


class Written:
    """A batch written to production whose sync, checkpoint and release are still to come."""

    def __init__(self, batch: list[jn.Record], syncs: dict[int, Callable[[], None]], taken: int,
                 freed: list[int], marker: jn.Record | None, t0: float,
                 raw: list[jn.Record]) -> None:
        self.batch = batch
        self.raw = raw  # its production writes to raw volumes, redone after an outage
        self.syncs = syncs  # id(file) -> its fdatasync, due before the checkpoint passes
        self.taken = taken
        self.freed = freed  # store slots or extents a snapshot delete let go
        self.marker = marker
        self.t0 = t0


def _sync_all(syncs: list[Callable[[], None]]) -> None:
    for sync in syncs:
        _durable(sync)


class Destager:
    def __init__(self, engine: DestageHost) -> None:
        self.e = engine
        self._buf = memoryview(bytearray(0))  # journal payloads of the current batch
        self._written: list[Written] = []  # in seq order, completion pending
        self._syncer: concurrent.futures.ThreadPoolExecutor | None = None
        self._sync: concurrent.futures.Future[None] | None = None  # the group sync running
        self._sync_n = 0  # how many of _written it covers (a prefix)
        self._dropped: set[int] | None = None  # page-cache episode's windows (module doc)
        self._short = 0  # attempts since a batch last failed for lack of space or a store

    def run_forever(self) -> None:
        """Destage lazily: when the journal is half full, when writes pause, or on request.

        A burst that fits in half the journal is answered without any destage or
        copy-on-write work competing with it; the journal is the write cache."""
        e = self.e
        self._syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jsnap-sync")
        try:
            while True:
                # a batch to take, or (busy) the last written one to complete
                ready, stopping = e.wait_for_work(self.writing, bool(self._written))
                try:
                    if stopping:
                        self.complete()  # what was written is synced and checkpointed
                        return
                    if ready:
                        self.run_batch(pipeline=True)
                    else:
                        self.complete()
                except Exception as exc:
                    if not space_error(exc) and not outage(exc):
                        raise
                    if not stopping and self._wait_for_space(exc):
                        if outage(exc):
                            self._rewrite()  # what the written batches put in doubt
                        continue  # plan it again: nothing of it is committed (module doc)
                    log.warning("stopped while destage waits for %s (%s); the journal keeps "
                                "what was not destaged", "a store" if outage(exc) else "space",
                                exc)
                    return
                self._space_back()
        except Exception as exc:  # the pool goes read-only; the journal keeps everything
            log.exception("destage failed; the pool is now read-only")
            e.fail(exc)
        finally:
            self._syncer.shutdown(wait=True)
            self._syncer = None

    @property
    def writing(self) -> int:
        """Records at the head of the pending queue taken by batches not yet completed."""
        return sum(len(w.batch) for w in self._written)

    def _wait_for_space(self, exc: BaseException) -> bool:
        """Wait before a retry: for space, or for a store that could not be reached."""
        self._short += 1
        if outage(exc):
            return self.e.wait_for_store(str(exc), self._short)
        return self.e.wait_for_space(str(exc), self._short)

    def _space_back(self) -> None:
        if self._short:
            self._short = 0
            self.e.space_returned()
            self.e.store_returned()

    def _rewrite(self) -> None:
        """After an outage: write again, in seq order, what the written (not yet synced)
        batches wrote to raw volumes (module doc, "Outages"); an outage here is waited out
        too. Only raw volumes: their offsets are theirs alone, so a later batch's bytes are
        rewritten after an earlier one's and the result is the same."""
        for w in self._written:
            while w.raw:
                try:
                    self._write_production(w.batch, w.raw)
                    break
                except OSError as exc:
                    if not outage(exc) or not self._wait_for_space(exc):
                        raise

    def complete(self) -> None:
        """Sync, checkpoint and release every written batch (destage_mutex is taken: holding
        it after this call means the destager is quiescent)."""
        with self.e.destage_mutex:
            self.complete_held()

    def _take(self, max_records: int | None) -> list[jn.Record]:
        e = self.e
        limit = min(max_records or MAX_BATCH_RECORDS, MAX_BATCH_RECORDS)
        batch: list[jn.Record] = []
        nbytes = 0
        remap: bool | None = None
        for rec in e.pending_after(self.writing, limit):
            if rec.kind in jn.DATA_KINDS:
                if remap is None:
                    remap = rec.kind == jn.REMAP
                elif remap != (rec.kind == jn.REMAP):
                    break  # batches are all REMAP or none (module doc)
            batch.append(rec)
            nbytes += rec.length if rec.kind == jn.WRITE else 0
            # a REMAP record moves no data but costs a map row per chunk
            nbytes += rec.length >> 4 if rec.kind == jn.REMAP else 0
            if rec.kind in (jn.SNAP_CREATE, jn.SNAP_DELETE):
                break
            if len(batch) >= limit or nbytes >= MAX_BATCH_BYTES:
                break
        return batch

    def run_batch(self, max_records: int | None = None, *, pipeline: bool = False) -> int:
        """Destage one batch; returns its record count (0: nothing to take). With `pipeline`
        (the destager thread) the batch's sync overlaps the next batch (module doc) and its
        completion comes with that batch or with complete(); without, it is done on return."""
        e = self.e
        with e.destage_mutex:
            batch = self._take(max_records)
            if not batch:
                self.complete_held()
                return 0
            t0 = time.monotonic()
            cs, shift = e.chunk_size, e.chunk_shift
            cat = e.catalog
            sorted_ = sort_batch(batch, e.by_id, shift)
            touched, writes, marker = sorted_.touched, sorted_.writes, sorted_.marker
            orphans, remap_seq = sorted_.orphans, sorted_.remap_seq
            copies: dict[tuple[int, int], tuple[int, int]] = {}  # (vol, chunk) -> (slot, hi)
            for vid, firsts in sorted_.raw_first.items():
                for c, hi in raw_copies(firsts, cat.max_his(vid, list(firsts))):
                    copies[(vid, c)] = (e.slots.alloc(), hi)

            # Phase A: preserve, then index (invariant 1).
            freed: list[int] = []
            plan = ThinPlan()
            try:
                for vid, recs in sorted_.thin_recs.items():
                    tvol = e.by_id[vid]
                    assert tvol.thin is not None
                    plan_thin(vid, recs, tvol.thin, tvol.snap_seqs, shift,
                              functools.partial(cat.max_his, vid), e.pool.take, plan)
                if copies or marker is not None or plan.rows() or remap_seq >= 0 or orphans:
                    self.complete_held()  # catalog changes wait for earlier batches (module doc)
                for (vid, c), (slot, _hi) in copies.items():
                    rvol = e.by_id[vid]
                    off = c << shift
                    e.slots.file.copy_from(rvol.file, off, min(cs, rvol.size - off), slot * cs)
                for src, dst in plan.copies:
                    (sf, so), (df, do) = e.pool.locate(src), e.pool.locate(dst)
                    df.copy_from(sf, so, cs, do)
                for ext in plan.zero:
                    f, off = e.pool.locate(ext)
                    f.zero_allocated(off, cs)
                e.hit("preserve-copied")
                if copies:
                    _durable(e.slots.file.sync)
                if plan.taken or remap_seq >= 0:
                    _durable(e.pool.sync)  # T3: copies, zeroes, REMAP data, growth, then rows
                e.hit("preserve-synced")
                if copies or marker is not None or plan.rows():
                    with cat.transaction() as t:
                        t.add_preserved([(v, c, hi, slot) for (v, c), (slot, hi)
                                         in copies.items()] + plan.preserved)
                        t.map_chunks(plan.map_set)
                        t.unmap_chunks(plan.map_del)
                        if remap_seq >= 0:
                            t.set_meta({"remap_seq": remap_seq})
                        if marker is not None:
                            freed = self._apply_marker(t, marker)
            except BaseException:
                e.slots.give_back(slot for slot, _ in copies.values())  # never indexed (S1)
                e.pool.give_back(plan.taken, reserved=True)
                raise
            # Committed: readers see the new map; unowned extents go back to the pool (T4).
            for vid, c, ext, seq in plan.map_set:
                tmap = e.by_id[vid].thin
                assert tmap is not None
                tmap.set(c, ext, seq)
            for vid, c in plan.map_del:
                tmap = e.by_id[vid].thin
                assert tmap is not None
                tmap.delete(c)
            e.preserved_copies += len(copies) + len(plan.copies)
            e.hit("index-committed")

            # Phase B: production (invariant 2 orders the checkpoint after its fsync).
            slow = False
            if remap_seq < 0:  # a REMAP batch writes nothing to production
                writes = absorb(writes, shift)
                while True:  # committed: a lack of space is waited out here (module doc)
                    try:
                        slow = self._write_production(batch, writes)
                        break
                    except OSError as exc:
                        if not (space_error(exc) or outage(exc)) \
                                or not self._wait_for_space(exc):
                            raise
                        if outage(exc):
                            self._rewrite()  # earlier batches' writes are in doubt too
            e.hit("production-written")
            e.unindex(touched, batch[-1].seq)
            # Only now: a REMAP piece named a freed extent until remove_upto (readers hold the
            # lock), and writers take free extents at once.
            e.pool.give_back(plan.freed + orphans)
            syncs: dict[int, Callable[[], None]] = {}  # the pool once, raw volumes each
            for vid in touched:
                vol = e.by_id.get(vid)
                if vol is not None:
                    target = e.pool if vol.thin is not None else vol.file
                    syncs.setdefault(id(target), target.sync)
            raw = [r for r in writes if (v := e.by_id.get(r.vol)) is not None and v.thin is None]
            self._written.append(Written(batch, syncs, len(plan.taken), freed, marker, t0,
                                         raw))
            if slow:  # a page-cache episode starts (module doc)
                self.complete_held()
                self._dropped = set()
                for r in writes:
                    self._drop_first(r, self._dropped)
            elif pipeline and self._syncer is not None:
                self._advance(wait=len(self._written) > MAX_WRITTEN)
            else:
                self.complete_held()
            return len(batch)

    def _advance(self, wait: bool) -> None:
        """Pipelined completion: if the running group sync is over (or `wait`), complete the
        batches it covered; then start one for every batch written since."""
        if self._sync is not None:
            if not wait and not self._sync.done():
                return
            sync, self._sync = self._sync, None
            sync.result()  # a failed fdatasync raises here: the pool goes read-only
            self._checkpoint(self._sync_n)
        if self._written and self._syncer is not None:
            self._sync = self._syncer.submit(_sync_all, self._files())
            self._sync_n = len(self._written)

    def _files(self) -> list[Callable[[], None]]:
        """The fdatasync of every file the written batches wrote, each once."""
        syncs: dict[int, Callable[[], None]] = {}
        for w in self._written:
            syncs.update(w.syncs)
        return list(syncs.values())

    def complete_held(self) -> None:
        """Complete every written batch now (destage_mutex held)."""
        while self._sync is not None:
            self._advance(wait=True)  # may start one more sync, for batches written meanwhile
        if self._written:
            _sync_all(self._files())
            self._checkpoint(len(self._written))

    def _checkpoint(self, n: int) -> None:
        """Second half of the first n written batches, now synced: production is durable
        (invariant 2), so one checkpoint passes them all, then their journal space and
        reservations go back, in seq order."""
        done = self._written[:n]
        e = self.e
        e.hit("production-synced")
        e.checkpoint(done[-1].batch[-1])  # NoSpace here changed nothing: retried (module doc)
        del self._written[:n]
        e.hit("checkpoint-saved")
        now = time.monotonic()
        for w in done:
            e.destaged(w.batch, w.taken, now)
            if w.freed:
                e.release_preserved(w.marker, w.freed)
            e.destage_seconds.observe(now - w.t0)  # one writer: this thread

    def _write_production(self, batch: list[jn.Record], writes: list[jn.Record]) -> bool:
        """Write records to production: the batch's payloads are read from the journal in one
        pread per contiguous span (a batch has one, or two around a wrap) into a reused
        buffer, and runs of adjacent writes go out as one pwritev. Returns True when these
        writes were slow enough to start a page-cache episode (module doc)."""
        e = self.e
        timed = e.drop_big_folios  # and only small writes: the time is theirs
        cpu = time.thread_time() if timed else 0.0
        dropped = self._dropped
        drop_cpu = 0.0  # of which spent dropping windows
        data: dict[int, memoryview] = {}  # seq -> payload view
        span: list[jn.Record] = []
        used = 0
        for r in batch:
            if r.kind != jn.WRITE or r.length >= COPY_IN_KERNEL:
                continue
            if span and r.pos != span[-1].end:
                used = self._read_span(span, data, used)
                span = []
            span.append(r)
        if span:
            self._read_span(span, data, used)
        run: list[memoryview] = []
        run_vol: DestageVolume | None = None
        run_start = run_end = 0
        for r in writes:
            vol = e.by_id.get(r.vol)
            if vol is None or r.kind == jn.REMAP:  # a REMAP's data is in place already
                continue
            if r.kind != jn.WRITE:
                timed = False
                if run_vol is not None:
                    run_vol.file.pwritev(run, run_start)
                    run, run_vol = [], None
                if r.kind == jn.ZEROES_ALLOC:
                    vol.file.zero_range(r.offset, r.length)
                else:
                    vol.file.punch_hole(r.offset, r.length)
                continue
            if r.length >= COPY_IN_KERNEL:
                # Large records: copy_file_range, no trip through user space.
                timed = False
                if run_vol is not None:
                    run_vol.file.pwritev(run, run_start)
                    run, run_vol = [], None
                vol.file.copy_from(e.jfile, r.data_pos, r.length, r.offset)
                continue
            if dropped is not None:
                drop_cpu += self._drop_first(r, dropped)
            if run_vol is vol and r.offset == run_end and len(run) < 512:
                run.append(data[r.seq])
                run_end += r.length
                continue
            if run_vol is not None:
                run_vol.file.pwritev(run, run_start)
            run, run_vol, run_start, run_end = [data[r.seq]], vol, r.offset, r.offset + r.length
        if run_vol is not None:
            run_vol.file.pwritev(run, run_start)
        if not timed or len(writes) < MIN_TIMED:
            return False
        if time.thread_time() - cpu - drop_cpu <= len(writes) * SLOW_WRITE:
            self._dropped = None  # fast (again): no episode
            return False
        return dropped is None

    def _drop_first(self, r: jn.Record, dropped: set[int]) -> float:
        """In a page-cache episode, before the episode's first write into r's window: drop
        the window (module doc). Returns the thread CPU time that took."""
        e = self.e
        vol = e.by_id.get(r.vol)
        if vol is None:
            return 0.0
        f: BlockFile
        if vol.thin is None:
            f, off = vol.file, r.offset
        else:
            ext = vol.thin.get(r.offset >> e.chunk_shift)  # mapped: written in place
            if ext < 0:
                return 0.0
            f, base = e.pool.locate(ext)
            off = base + (r.offset & (e.chunk_size - 1))
        w = off // FOLIO_WINDOW
        key = id(f) << 32 | w
        if key in dropped:
            return 0.0
        if len(dropped) >= MAX_DROPPED:
            dropped.clear()
        dropped.add(key)
        t = time.thread_time()
        if f.drop_cache(w * FOLIO_WINDOW, FOLIO_WINDOW):  # not when it served reads lately
            e.cache_windows_dropped += 1
        return time.thread_time() - t

    def _read_span(self, span: list[jn.Record], data: dict[int, memoryview], used: int) -> int:
        """Read the journal bytes of `span` into the reused buffer at `used`; return new used."""
        start = span[0].data_pos
        n = span[-1].data_pos + span[-1].length - start
        if len(self._buf) < used + n:
            self._buf = memoryview(bytearray(max(used + n, 2 * len(self._buf))))
        view = self._buf[used : used + n]
        self.e.jfile.preadinto(view, start)
        for r in span:
            data[r.seq] = view[r.data_pos - start : r.data_pos - start + r.length]
        return used + n

    def _apply_marker(self, t: CatalogTxn, r: jn.Record) -> list[int]:
        """Catalog side of a snapshot marker, inside the batch transaction. Returns freed slots:
        the copies that only a deleted snapshot read (CatalogTxn.free_copies)."""
        vol = self.e.by_id.get(r.vol)
        if r.kind == jn.SNAP_CREATE:
            if vol is not None and r.seq in vol.by_seq:
                t.add_snapshot(r.seq, r.vol, r.name, r.aux / 1e6)
            return []
        t.delete_snapshot(r.aux)
        if vol is None:
            return []
        seqs = vol.snap_seqs
        i = bisect.bisect_left(seqs, r.aux)
        return t.free_copies(vol.id, r.aux, seqs[i - 1] if i > 0 else None,
                             seqs[i] if i < len(seqs) else END)

