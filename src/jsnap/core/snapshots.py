"""Snapshot images: reading a volume as of a snapshot, and the chunks changed since one.

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
"""

from __future__ import annotations

from typing import Protocol

from jsnap.core.volumes import Volume
from jsnap.stores.catalog import Catalog
from jsnap.stores.snapstore import SlotStore
from jsnap.stores.thin import ZERO_SLOT, ExtentPool


class JournalView(Protocol):
    """The journaled side of a volume, as an engine owning it shows it."""

    def overlays(self, vol: int, offset: int, length: int, below_seq: int
                 ) -> list[tuple[int, int, bytes | None]]: ...
    def chunks_after(self, vol: int, since: int, below: int | None = None) -> set[int]: ...


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

    def changed_chunks(self, vol: Volume, since: int, below: int | None) -> list[int]:
        """Chunks a write, zero or trim reached between seq `since` and `below` (None: up to
        the live volume), sorted (I2)."""
        journaled = self.journal.chunks_after(vol.id, since, below)
        destaged = self.catalog.chunks_changed_since(vol.id, since, below)
        top = (vol.size - 1) >> self.shift
        return sorted(c for c in journaled.union(destaged) if c <= top)
