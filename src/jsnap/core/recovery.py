"""Recovery: rebuild what an engine keeps in memory for its volumes from their journal.

Model
-----
The catalog holds everything destaged; the journal, from the checkpoint to its valid end,
holds the rest. Replay reads those records in order (stores/journal/writer.py J3) and, for each:
puts it in the pending queue (the destager's work), indexes its data in the changes table,
re-reserves the thin extents its destage may take (core/reservations.py), and applies its
snapshot create/delete marker to the volume. Nothing is written: replay only rebuilds
memory, so it may run any number of times (DESIGN invariant 6).

Invariants
----------
RP1 A REMAP record counts only if all its data reached the disk (its CRC, checked here
   unless a committed batch already destaged it: seq <= remap_done); otherwise the
   journal's valid end is before it.
RP2 A REMAP record at or below remap_done, or of a deleted volume, is a no-op: its extents
   belong to the catalog's owners (or were freed), so they are neither claimed nor read.
RP3 The extents of every other pending REMAP record are claimed from the free list before
   any write is admitted, so no new write can take them (stores/thin.py T2).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from crc32c import crc32c

from jsnap.core.reservations import Reservations
from jsnap.core.volumes import Snapshot, Volume
from jsnap.stores import journal as jn
from jsnap.stores.changes import ChangesTable
from jsnap.stores.thin import ExtentPool


class Replay:
    def __init__(self, by_id: Mapping[int, Volume], changes: ChangesTable, resv: Reservations,
                 pool: ExtentPool, pending: collections.deque[jn.Record], *,
                 remap_done: int) -> None:
        self.by_id, self.changes, self.resv, self.pool = by_id, changes, resv, pool
        self.pending = pending  # the engine's queue, filled in seq order
        self.shift = changes.shift
        self.remap_done = remap_done  # REMAP records up to here were destaged (RP2)
        self.claims: list[int] = []  # extents of pending REMAP records (RP3)
        self.remap_bytes = 0  # their data, which counts against the engine's REMAP bound

    def run(self, journal: jn.Journal) -> None:
        for recs in journal.replay_batches(self.verify_remap):
            self.batch(recs)
        self.pool.claim(self.claims)
        self.resv.end_replay()

    def verify_remap(self, rec: jn.Record) -> bool:
        """Replay: did all of a REMAP record's data reach the disk? (journal.REMAP)"""
        if rec.seq <= self.remap_done or rec.vol not in self.by_id:
            return True  # its destage was committed, or it is a no-op: the data is not read
        assert rec.exts is not None
        crc = 0
        cs = self.pool.cs
        try:
            for f, off, i, j in self.pool.runs(rec.exts):
                crc = crc32c(f.pread((j - i) * cs, off), crc)
        except (KeyError, OSError):
            return False
        return crc == rec.aux

    def batch(self, recs: list[jn.Record]) -> None:
        """Index replayed records and re-reserve their thin extents: one(), with the common
        case inlined (a WRITE within one chunk that has no journaled piece yet; the bulk of a
        full journal, and restart time is Python time per record)."""
        self.pending.extend(recs)
        by_id, changes, shift = self.by_id, self.changes, self.shift
        insert_one, replay_one = changes.insert_one_chunk, self.resv.replay_one_chunk
        for rec in recs:
            vol = by_id.get(rec.vol)
            if rec.kind != jn.WRITE or vol is None:
                self.one(rec)
                continue
            seq, offset, length = rec.seq, rec.offset, rec.length
            c = offset >> shift
            if not length or (offset + length - 1) >> shift != c:
                self.one(rec)
                continue
            seqs = vol.snap_seqs
            newest = seqs[-1] if seqs else 0
            insert_one(vol.id, seq, offset, length, rec.data_pos, newest, c)
            if vol.thin is not None:
                replay_one(vol, rec, c, newest)

    def one(self, rec: jn.Record) -> None:
        vol = self.by_id.get(rec.vol)
        kind = rec.kind
        if kind == jn.REMAP:
            if vol is None or rec.seq <= self.remap_done:
                rec.exts = None  # not the record's extents any more: destaged as a no-op
                return
            assert rec.exts is not None
            self.claims.extend(rec.exts)
            self.remap_bytes += rec.length
        if vol is None or kind == jn.WRAP:
            return  # records of a deleted volume are destaged as no-ops
        if kind in jn.DATA_KINDS:
            self.changes.index(vol.id, rec, vol.newest_snap)
            if vol.thin is not None:  # re-reserve what the destage of this record may take
                self.resv.replay(vol, rec)
        elif rec.kind == jn.SNAP_CREATE:
            if rec.seq not in vol.by_seq and rec.name not in vol.snaps:
                vol.add_snapshot(Snapshot(rec.seq, vol.id, rec.name, rec.aux / 1e6))
        elif rec.kind == jn.SNAP_DELETE:
            snap = vol.by_seq.get(rec.aux)
            if snap is not None:
                vol.remove_snapshot(snap)
