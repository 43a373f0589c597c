"""Snapshot images: reading a volume as of a snapshot, its holes, and the chunks changed
since one.

Model
-----
Snapshot S of a volume (seq = its create marker) reads chunk c from, in order of trust:

  1. the preserved copy with the smallest hi > S.seq (catalog `preserved`; a slot of the
     raw snapshot store, a pool extent, or ZERO_SLOT), if any: the chunk was overwritten
     in production after S, and this is its content from before (core/destager.py);
  2. otherwise production, with the journaled pieces below S.seq laid over it.

The journal side comes through JournalView (the engine, under its lock), the rest from the
catalog and the stores: this part owns no state.

Invariants
----------
I1 Case 2 is read optimistically: production first, then the preserved index again. The
   destager commits a copy before it overwrites production (DESIGN invariant 1), so if no
   copy appeared meanwhile, what was read is still S's image; if one did, it is read instead.
I2 Changed chunks are read journal first, catalog second: a record destaged in between
   left its preserved row before it left the changes table, so it is seen in one place or
   both, never in neither.
I3 The allocation map decides each chunk as a read does (case 1 or 2) and is read in the
   order that keeps it exact: the journal pieces below S.seq, then production's holes, then
   the preserved index. A piece destaged in between is seen in the journal, production or
   both (as for a live volume); a chunk with no copy in the last step had no write after S
   reach production before it (DESIGN invariant 1), so production's holes were still S's.
   A copy is data unless it is a hole: ZERO_SLOT (thin), or a hole in the raw store's file.
"""

from __future__ import annotations

from typing import Protocol

from jsnap.core.extents import file_holes, snapshot_map, unmapped
from jsnap.core.volumes import Volume
from jsnap.stores.catalog import Catalog
from jsnap.stores.snapstore import SlotStore
from jsnap.stores.thin import ZERO_SLOT, ExtentPool


class JournalView(Protocol):
    """The journaled side of a volume, as an engine owning it shows it."""

    def overlays(self, vol: int, offset: int, length: int, below_seq: int
                 ) -> list[tuple[int, int, bytes | None]]: ...
    def chunks_after(self, vol: int, since: int, below: int | None = None) -> set[int]: ...
    def journaled(self, vol: int, offset: int, length: int, below_seq: int
                  ) -> list[tuple[int, int, bool]]: ...


MAP_CHUNKS = 1 << 16  # chunks one allocation map covers at most (a reply may cover less)


class Images:
    def __init__(self, catalog: Catalog, slots: SlotStore, extents: ExtentPool,
                 chunk_shift: int, journal: JournalView) -> None:
        self.catalog, self.slots, self.extents = catalog, slots, extents
        self.shift = chunk_shift
        self.journal = journal

    def read(self, vol: Volume, snap_seq: int, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        end = offset + length
        cs = 1 << self.shift
        pos = offset
        while pos < end:
            c = pos >> self.shift
            stop = min(end, (c + 1) * cs)
            self._read_chunk(vol, snap_seq, c, pos, view[pos - offset : stop - offset])
            pos = stop
        return buf

    def _read_chunk(self, vol: Volume, snap_seq: int, chunk: int, offset: int,
                    out: memoryview) -> None:
        in_chunk = offset - (chunk << self.shift)
        slot = self.catalog.find_preserved(vol.id, chunk, snap_seq)
        if slot is None:
            overlays = self.journal.overlays(vol.id, offset, len(out), snap_seq)
            vol.file.preadinto(out, offset)
            slot = self.catalog.find_preserved(vol.id, chunk, snap_seq)  # I1
            if slot is None:
                for s, e, data in overlays:
                    out[s - offset : e - offset] = data if data is not None else bytes(e - s)
                return
        if vol.thin is None:
            self.slots.preadinto(out, slot, in_chunk)
        elif slot == ZERO_SLOT:
            out[:] = bytes(len(out))
        else:
            f, base = self.extents.locate(slot)
            f.preadinto(out, base + in_chunk)

    def allocation(self, vol: Volume, snap_seq: int, offset: int, length: int,
                   max_extents: int) -> list[tuple[int, int]]:
        """Allocation map (core/extents.py) of the snapshot with seq `snap_seq` from
        `offset`, never zero bytes when length > 0, possibly less than asked (I3)."""
        shift = self.shift
        c0 = offset >> shift
        end = min(offset + length, (c0 + MAP_CHUNKS) << shift)
        if end <= offset:
            return []
        c1 = (end - 1) >> shift
        pieces = self.journal.journaled(vol.id, offset, end - offset, snap_seq)
        if vol.thin is not None:
            holes = unmapped(vol.thin, offset, end, shift)
        else:
            holes = file_holes(vol.file, offset, end)
        copied: list[tuple[int, int]] = []
        copy_holes: list[tuple[int, int]] = []
        for c, slot in sorted(self.catalog.preserved_in(vol.id, c0, c1, snap_seq).items()):
            s, e = max(c << shift, offset), min((c + 1) << shift, end)
            copied.append((s, e))
            if vol.thin is not None:
                if slot == ZERO_SLOT:
                    copy_holes.append((s, e))
            else:
                base = (slot << shift) - (c << shift)  # volume offset -> store offset
                copy_holes += [(hs - base, he - base) for hs, he in
                               file_holes(self.slots.file, s + base, e + base)]
        return snapshot_map(offset, end, holes, pieces, copied, copy_holes, max_extents)

    def changed_chunks(self, vol: Volume, since: int, below: int | None) -> list[int]:
        """Chunks a write, zero or trim reached between seq `since` and `below` (None: up to
        the live volume), sorted (I2)."""
        journaled = self.journal.chunks_after(vol.id, since, below)
        destaged = self.catalog.chunks_changed_since(vol.id, since, below)
        top = (vol.size - 1) >> self.shift
        return sorted(c for c in journaled.union(destaged) if c <= top)
