"""Thin reservations: the pool extents that journaled records may take when destaged.

Model
-----
A record journaled for a thin volume may need a fresh pool extent, at destage, for each chunk
it writes that the volume does not already own in the current snapshot epoch (an extent
mapped, or reserved by a pending record, after the volume's newest snapshot may be written in
place; one older than it belongs to a snapshot too and is preserved, so the chunk gets a new
one). This class counts those extents, for the write path (before a record is appended), for
replay (the same records, after a crash) and for the destager (when a batch is done), so the
three agree by construction. All state is guarded by the engine lock:

    cover[vol][c]   seq of a pending record that reserved c's extent in this snapshot
                    epoch, or -seq of a pending whole-chunk zero or trim that will unmap c
    big[vol]        (seq, first chunk, last chunk) of pending zeroes and trims over more than
                    BIG_CHUNKS whole chunks: too many for per-chunk cover entries
    by_seq[seq]     extents reserved for pending record seq; their sum is held in
                    ExtentPool.reserved (with the write path's budgets in flight)

Invariants
----------
R1 (stores/thin.py T1) A thin record is journaled only with the extents its destage may take
   reserved: the writer reserves `need()` first (NoSpace changes nothing), and `admit()` takes
   by force what a snapshot that slipped in meanwhile added (the record is journaled already).
   Replay reserves the same counts by force, once, at `end_replay()`.
R2 A chunk is covered (`covered()`) iff an in-place write to it needs no new extent: its
   cover entry or map entry has a seq above the newest snapshot, and no later pending big
   trim unmaps it.
R3 `settle()` of a destaged batch releases what its records reserved minus the extents the
   batch took, and forgets the cover entries the catalog map now stands for: an entry is
   removed only by the record that set it, so a later pending record's entry survives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from jsnap.stores import journal as jn
from jsnap.stores.changes import BIG_CHUNKS
from jsnap.stores.thin import ExtentPool, ThinMap, whole_chunks


class ThinVolume(Protocol):
    """What reservations read of a volume (engine.Volume)."""

    id: int
    thin: ThinMap | None
    snap_seqs: list[int]


class Reservations:
    def __init__(self, pool: ExtentPool, chunk_shift: int) -> None:
        self.pool = pool
        self.shift = chunk_shift
        self.cover: dict[int, dict[int, int]] = {}
        self.big: dict[int, list[tuple[int, int, int]]] = {}
        self.by_seq: dict[int, int] = {}
        self._replayed = 0  # reserved at end_replay, all at once

    def drop_volume(self, vid: int) -> None:
        self.cover.pop(vid, None)
        self.big.pop(vid, None)

    # -- the write path -----------------------------------------------------------------------

    def covered(self, vol: ThinVolume, c: int, newest: int) -> bool:
        """Does chunk c already own (or have reserved) an extent it may write in place? (R2)"""
        assert vol.thin is not None
        cover = self.cover.get(vol.id)
        s = cover.get(c) if cover is not None else None  # no dict made per write
        if s is None:
            s = vol.thin.seq_if_mapped(c)
            if s is None:
                return False
        if s <= newest:  # unreserved since the newest snapshot, or to be unmapped (s < 0)
            return False
        big = self.big.get(vol.id)
        return not big or not any(ts > s and a <= c <= b for ts, a, b in big)

    def _chunks_to_place(self, kind: int, offset: int, length: int) -> range | list[int]:
        """Chunks a record of `kind` may need an extent for: all of a write's; only the
        partial edge chunks of a zero/trim (whole chunks get unmapped)."""
        sh = self.shift
        c0, c1 = offset >> sh, (offset + length - 1) >> sh
        if kind in (jn.WRITE, jn.ZEROES_ALLOC):
            return range(c0, c1 + 1)
        w0, w1 = whole_chunks(offset, length, sh)
        return [c for c in {c0, c1} if not w0 <= c <= w1]

    def need(self, vol: ThinVolume, ranges: list[tuple[int, int, int]]) -> int:
        """Extents records (kind, offset, length) about to be journaled may take (R1)."""
        newest = vol.snap_seqs[-1] if vol.snap_seqs else 0
        seen: set[int] = set()
        for kind, offset, length in ranges:
            if length:
                for c in self._chunks_to_place(kind, offset, length):
                    if c not in seen and not self.covered(vol, c, newest):
                        seen.add(c)
        return len(seen)

    def reserve(self, vol: ThinVolume, ranges: list[tuple[int, int, int]]) -> int:
        """need(), reserved in the pool (NoSpace if it does not fit): the writer's budget,
        handed to admit() and given back with release() once the records are admitted."""
        n = self.need(vol, ranges)
        self.pool.reserve(n)
        return n

    def release(self, n: int) -> None:
        self.pool.unreserve(n)

    def charge(self, vol: ThinVolume, rec: jn.Record) -> int:
        """Mark what `rec` reserves or unmaps in the cover; return the extents it needs."""
        if not rec.length:
            return 0
        sh = self.shift
        cover = self.cover.get(vol.id)
        if cover is None:
            cover = self.cover[vol.id] = {}
        if rec.kind == jn.REMAP:  # brings its own extents: later writes go in place
            for c in range(rec.offset >> sh, (rec.offset + rec.length) >> sh):
                cover[c] = rec.seq
            return 0
        if rec.kind in (jn.TRIM, jn.ZEROES):
            w0, w1 = whole_chunks(rec.offset, rec.length, sh)
            if w1 - w0 + 1 > BIG_CHUNKS:
                self.big.setdefault(vol.id, []).append((rec.seq, w0, w1))
            else:
                for c in range(w0, w1 + 1):
                    cover[c] = -rec.seq
        newest = vol.snap_seqs[-1] if vol.snap_seqs else 0
        c = rec.offset >> sh
        if rec.kind == jn.WRITE and (rec.offset + rec.length - 1) >> sh == c:
            if self.covered(vol, c, newest):  # one chunk, the common case: no list built
                return 0
            cover[c] = rec.seq
            return 1
        n = 0
        for c in self._chunks_to_place(rec.kind, rec.offset, rec.length):
            if not self.covered(vol, c, newest):
                n += 1
                cover[c] = rec.seq
        return n

    def admit(self, vol: ThinVolume, rec: jn.Record, budget: list[int] | None) -> None:
        """A record was journaled: charge it, from `budget` (what the writer reserved), by
        force beyond it (R1)."""
        n = self.charge(vol, rec)
        if n:
            self.by_seq[rec.seq] = n
            left = budget[0] if budget else 0
            if n > left:
                self.pool.reserve(n - left, force=True)
            if budget:
                budget[0] = max(left - n, 0)

    # -- replay -------------------------------------------------------------------------------

    def replay(self, vol: ThinVolume, rec: jn.Record) -> None:
        """Re-reserve what the destage of a replayed record may take (at end_replay)."""
        n = self.charge(vol, rec)
        if n:
            self.by_seq[rec.seq] = n
            self._replayed += n

    def replay_one_chunk(self, vol: ThinVolume, rec: jn.Record, c: int, newest: int) -> None:
        """replay() of a WRITE within chunk c, inlined: the bulk of a full journal, and the
        restart time is Python time per record."""
        if vol.id in self.big:
            self.replay(vol, rec)
            return
        cover = self.cover.get(vol.id)
        if cover is None:
            cover = self.cover[vol.id] = {}
        s = cover.get(c)
        if s is None:
            assert vol.thin is not None
            s = vol.thin.seq_if_mapped(c)
        if s is not None and s > newest:
            return
        cover[c] = rec.seq
        self.by_seq[rec.seq] = 1
        self._replayed += 1

    def end_replay(self) -> None:
        self.pool.reserve(self._replayed, force=True)
        self._replayed = 0

    # -- the destager -------------------------------------------------------------------------

    def settle(self, batch: list[jn.Record], taken: int,
               volumes: Mapping[int, ThinVolume]) -> None:
        """After a destaged batch (R3): release what its records reserved and its `taken`
        extents did not consume; forget the cover entries the catalog map now stands for.
        `volumes`: the volumes that still exist, by id."""
        released = 0
        by_seq, shift = self.by_seq, self.shift
        for r in batch:
            n = by_seq.pop(r.seq, 0)
            if not n and r.kind == jn.WRITE:
                continue  # it went in place: it reserved nothing and marked no chunk (charge)
            released += n
            vol = volumes.get(r.vol)
            if vol is None or vol.thin is None or r.kind not in jn.DATA_KINDS or not r.length:
                continue
            cover = self.cover.get(r.vol)
            if not cover:
                continue
            c0, c1 = r.offset >> shift, (r.offset + r.length - 1) >> shift
            if c1 - c0 > BIG_CHUNKS and r.kind in (jn.TRIM, jn.ZEROES):
                chunks: range | tuple[int, int] = (c0, c1)
            else:
                chunks = range(c0, c1 + 1)
            for c in chunks:
                if cover.get(c) in (r.seq, -r.seq):
                    del cover[c]
        last = batch[-1].seq
        for vid, big in list(self.big.items()):  # destaged big zeroes and trims: in the map now
            if big[0][0] <= last:
                rest = [t for t in big if t[0] > last]
                if rest:
                    self.big[vid] = rest
                else:
                    del self.big[vid]
        self.pool.unreserve(max(released - taken, 0))
