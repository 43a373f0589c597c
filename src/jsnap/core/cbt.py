"""Changed-block tracking as users see it: `snapshot diff` extents and qemu dirty bitmaps.

Model
-----
The engine answers "which chunks may differ between snapshot FROM and snapshot TO (or the
live volume)" (`Engine.changed_chunks`: exact to the chunk, never missing a changed byte).
This module turns that chunk list into what clients consume:

* `changed_extents`: sorted, disjoint (offset, length) byte ranges, adjacent chunks merged,
  the last one clipped to the volume size. `jsnap snapshot diff` prints them.
* `DirtyBitmap`: the NBD metadata context `qemu:dirty-bitmap:FROM` on the export of `VOL@TO`
  (or of `VOL`), in qemu's terms (docs/interop/nbd.rst): bit 0 of an extent's flags set =
  dirty = changed since FROM. An export offers one such context per snapshot of its volume
  older than it; `select_contexts` implements NBD_OPT_LIST/SET_META_CONTEXT queries over
  them.

Cost: a snapshot-to-snapshot diff never changes (snapshots are immutable), so a bitmap is
computed once, at the first BLOCK_STATUS of a connection. Against the live volume the set is
recomputed only when the journal has taken a record since the last computation (every
change to a volume is a journal record, and destaging moves a record from the journal to the
catalog without changing the union `changed_chunks` reads), so a client walking the whole
map of a quiet volume pays for one computation, and a busy volume is always answered fresh.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from jsnap.core.engine import Engine
from jsnap.core.volumes import Snapshot, Volume
from jsnap.errors import NotFound

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP = "qemu:dirty-bitmap:"
DIRTY = 1  # qemu's NBD_STATE_DIRTY
MAX_EXTENTS = 4096  # per BLOCK_STATUS reply, as for base:allocation


def changed_extents(chunks: Iterable[int], chunk_size: int, size: int
                    ) -> list[tuple[int, int]]:
    """Sorted chunk numbers -> merged (offset, length) byte ranges within [0, size)."""
    out: list[tuple[int, int]] = []
    start = end = -1
    for c in chunks:
        off = c * chunk_size
        if off >= size:
            break
        if off == end:
            end = min(off + chunk_size, size)
            continue
        if end > start:
            out.append((start, end - start))
        start, end = off, min(off + chunk_size, size)
    if end > start:
        out.append((start, end - start))
    return out


def bitmap_names(e: Engine, vol: Volume, snap: Snapshot | None) -> list[str]:
    """The dirty-bitmap contexts the export of `vol` (or of its snapshot `snap`) offers: one
    per older snapshot, oldest first."""
    limit = snap.seq if snap is not None else None
    return [DIRTY_BITMAP + s.name for s in e.snapshot_list(vol)  # under the engine lock
            if limit is None or s.seq < limit]


def select_contexts(queries: Sequence[str], listing: bool, bitmaps: Sequence[str]
                    ) -> list[str]:
    """Contexts a LIST (`listing`) or SET_META_CONTEXT query list selects.

    No query: LIST gets everything, SET nothing. `base:` selects base:allocation (as
    before); like qemu, the leaf-less `qemu:` and `qemu:dirty-bitmap:` list every bitmap
    but select none in SET, where a bitmap must be named exactly."""
    offered = [BASE_ALLOCATION, *bitmaps]
    if not queries:
        return offered if listing else []
    chosen: set[str] = set()
    for q in queries:
        if q in ("base:", BASE_ALLOCATION):
            chosen.add(BASE_ALLOCATION)
        elif q in bitmaps:
            chosen.add(q)
        elif listing and q in ("qemu:", DIRTY_BITMAP):
            chosen.update(bitmaps)
    return [name for name in offered if name in chosen]


class DirtyBitmap:
    """`qemu:dirty-bitmap:FROM` on one connection's export (snapshot `until`, or the live
    volume when None). Not thread-safe: one per connection."""

    def __init__(self, engine: Engine, vol: Volume, since: str, until: Snapshot | None) -> None:
        self.engine = engine
        self.vol = vol
        self.since_name = since
        self.until = until
        self.starts: list[int] = []  # changed ranges, sorted: starts and ends
        self.ends: list[int] = []
        self.at_seq: int | None = None  # journal position the ranges were computed at

    def _refresh(self) -> None:
        e, vol = self.engine, self.vol
        since = vol.snaps.get(self.since_name)
        if since is None or since.deleted:
            raise NotFound(f"snapshot {self.since_name!r} of volume {vol.name!r} was deleted")
        if self.until is not None:
            if self.at_seq is not None:
                return  # snapshot to snapshot: immutable
            seq = 0
        else:
            seq = e.journal.written_seq  # read before computing: a later write recomputes
            if seq == self.at_seq:
                return
        ranges = changed_extents(e.changed_chunks(vol, since, self.until), e.chunk_size,
                                 vol.size)
        self.starts = [off for off, _ in ranges]
        self.ends = [off + n for off, n in ranges]
        self.at_seq = seq

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs from `offset`, alternating clean (0) and dirty (1), within
        the request, at most MAX_EXTENTS of them."""
        self._refresh()
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        i = bisect.bisect_right(self.ends, pos)  # first range ending after pos
        while pos < end and len(out) < MAX_EXTENTS:
            if i < len(self.starts) and self.starts[i] <= pos:
                stop = min(self.ends[i], end)
                out.append((stop - pos, DIRTY))
                i += 1
            else:
                stop = min(self.starts[i], end) if i < len(self.starts) else end
                out.append((stop - pos, 0))
            pos = stop
        return out


def allocation(e: Engine, vol: Volume, snap: Snapshot | None, offset: int, length: int
               ) -> list[tuple[int, int]]:
    """base:allocation-style (length, flags) runs from `offset` for the volume or for its
    snapshot `snap` (may cover less than asked, never nothing): what an export may skip."""
    if snap is None:
        return e.extents(vol, offset, length)
    return e.snapshot_extents(snap, offset, length)
