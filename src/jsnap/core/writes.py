"""The write path of one engine: writes, zeroes and trims of its volumes, and how each
record is admitted (thin extents reserved, indexed for reads, handed to the backlog).

Model
-----
A write reserves the thin extents its destage may need (core/reservations.py), appends one
journal record (or several, for a payload larger than one record), indexes it in the
changes table so reads see it, and hands it to the backlog; the caller acknowledges after
`wait_durable` in `sync` mode or with FUA. Large chunk-aligned writes to thin volumes are
redirected (REMAP): the data goes straight into fresh pool extents and the record only
names them, so the bytes are written once rather than journal first, production later.
Snapshot markers are admitted the same way (`admit`), by the engine.

The engine owns the state this works on (its lock, journal, changes table, reservations,
backlog, extent pool) and gives it here at open; this part owns only how many REMAP
writes the pool has not synced yet. Engine's invariants E1-E3 and E5 hold here:
E1 a write is acknowledged only after its record is journaled and indexed; E2 a thin
write is journaled only once its extents are reserved; E3 a REMAP record is appended only
after its data is in its extents, and every journal sync syncs the pool first
(`sync_remapped`, the journal's pre_sync); E5 the journal, the changes table and the
backlog's queue change under the engine's lock, file I/O happens outside it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from crc32c import crc32c

from jsnap.core.backlog import Backlog
from jsnap.core.reservations import Reservations
from jsnap.core.volumes import Volume, check_range, check_writable
from jsnap.errors import NoSpace
from jsnap.stores import journal as jn
from jsnap.stores.changes import ChangesTable
from jsnap.stores.thin import ExtentPool

REMAP_MIN = 64 << 10  # chunk-aligned writes to thin volumes this large are redirected (run 8)


class WritePath:
    def __init__(self, lock: threading.Lock, cv: threading.Condition, journal: jn.Journal,
                 changes: ChangesTable, resv: Reservations, backlog: Backlog,
                 pool: ExtentPool, chunk_size: int, sync_mode: bool,
                 usable: Callable[[], None]) -> None:
        self.lock, self.cv = lock, cv
        self.journal, self.changes, self.resv = journal, changes, resv
        self.backlog, self.pool = backlog, pool
        self.chunk_size, self.chunk_shift = chunk_size, chunk_size.bit_length() - 1
        self.sync_mode = sync_mode
        self.usable = usable  # raises when the engine takes no writes (failed, closed)
        # REMAP data writes the pool has not synced yet: a count (E3).
        self._remap_dirty = 0
        self._remap_synced = 0

    def write(self, vol: Volume, offset: int, data: bytes | bytearray | memoryview,
              fua: bool = False, wait: bool = True) -> int:
        """Journal `data` at `offset`; return the seq of its (last) record.

        With wait=False the call does not wait for durability: the caller must call
        `wait_durable(seq, fua)` before acknowledging (lets a server batch many requests
        behind one fdatasync)."""
        view = memoryview(data).cast("B")
        check_range(vol, offset, len(view), write=True)
        seq = self._append(vol, [(offset, view)])
        if wait and (fua or self.sync_mode):
            self.wait_durable(seq, fua)
        return seq

    def write_many(self, vol: Volume, writes: list[tuple[int, memoryview]]) -> int:
        """Journal several writes to `vol` under one lock hold with one pwritev; return the
        last seq. Does not wait for durability: see wait_durable. Each must be in range."""
        for offset, view in writes:
            check_range(vol, offset, len(view), write=True)
        return self._append(vol, writes)

    def _append(self, vol: Volume, writes: list[tuple[int, memoryview]]) -> int:
        maxp = self.journal.max_payload
        items: list[jn.Entry] = []
        mask = self.chunk_size - 1
        last = -1
        for offset, view in writes:
            length = len(view)
            if length >= REMAP_MIN and vol.thin is not None and not (offset | length) & mask:
                # Requests of one batch are concurrent (NBD does not order them): the
                # redirected ones may take their seqs first.
                seq = self._remap(vol, offset, view)
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
            self.usable()
            check_writable(vol)
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
                    items, lambda recs: self.admit(vol, recs, budget, covered_at))[-1].seq
            finally:
                self.resv.release(budget[0])

    def _remap(self, vol: Volume, offset: int, view: memoryview) -> int | None:
        """Write whole chunks once, into fresh extents, and journal only where they are.

        Order (journal.REMAP): extents taken, data written, then the record appended; a sync
        of the journal syncs the pool first (sync_remapped), and replay checks the data's
        CRC, so a record never stands for data that did not reach the disk. The destager
        later maps the extents in place of the old ones, which go to a snapshot that needs
        them or back to the pool: no copy, whatever the snapshots. None, with nothing
        changed, when the pool cannot give fresh extents for all of it but the volume owns
        some of its chunks: the journaled path then needs fewer."""
        length = len(view)
        n = length >> self.chunk_shift
        bl = self.backlog
        with self.lock:
            while True:
                self.usable()
                check_writable(vol)
                if not bl.remap_bytes or bl.remap_bytes + length <= bl.remap_limit:
                    break
                if bl.space_short is not None:
                    raise NoSpace(f"destage is waiting for space: {bl.space_short}")
                bl.remap_waiters += 1
                bl.work.notify()
                try:
                    self.cv.wait()
                finally:
                    bl.remap_waiters -= 1
            try:
                self.pool.reserve(n)
            except NoSpace:
                # Journaled, it would need extents only for chunks the volume does not own:
                # worth it only if it owns some (nothing changed here either way).
                if self.resv.need(vol, [(jn.WRITE, offset, length)]) < n:
                    return None
                raise
            bl.remap_bytes += length
        exts: list[int] = []
        try:
            exts = self.pool.take_many(n)
            cs = self.chunk_size
            for f, off, i, j in self.pool.runs(exts):
                f.pwrite(view[i * cs : j * cs], off)
            crc = crc32c(view)
            with self.lock:
                self.usable()
                check_writable(vol)
                self._remap_dirty += 1  # before the append: a sync that covers it sees this

                def admit(recs: list[jn.Record]) -> None:
                    recs[0].exts = exts
                    self.admit(vol, recs)

                entry = (jn.REMAP, vol.id, offset, length,
                         (b"".join(jn.EXT.pack(e) for e in exts),), 8 * n, crc, "")
                return self.journal.append_many([entry], admit)[0].seq
        except BaseException:
            with self.lock:
                bl.remap_bytes -= length
                self.cv.notify_all()
            self.pool.give_back(exts)
            self.pool.unreserve(n - len(exts))
            raise

    def sync_remapped(self) -> None:
        """journal.pre_sync: REMAP data reaches the disk before the records naming it."""
        n = self._remap_dirty
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
        check_range(vol, offset, length, write=True)
        with self.lock:
            self.usable()
            check_writable(vol)
            seq = self.journal.written_seq
            if length:
                budget = [0]
                if vol.thin is not None:
                    budget[0] = self.resv.reserve(vol, [(kind, offset, length)])
                try:
                    rec = self.journal.append(kind, vol.id, offset, length)
                    self.admit(vol, [rec], budget)
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

    def admit(self, vol: Volume, recs: list[jn.Record], budget: list[int] | None = None,
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
                seqs = vol.snap_seqs  # vol.newest_snap without the property call
                self.changes.index(vol.id, rec, seqs[-1] if seqs else 0)
                if charge:
                    self.resv.admit(vol, rec, budget)
        self.backlog.admit(recs)
