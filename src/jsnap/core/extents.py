"""Allocation maps (NBD base:allocation): which ranges of a volume or snapshot are holes.

Pure functions over what the engine gathers under its lock (the journaled pieces) and
outside it (the production file's holes, a thin map's unmapped chunks, a snapshot's
preserved copies). For a live volume a journaled range is always reported as data, which
is truthful whatever it holds; a hole is reported only where neither the journal nor
production has data. A snapshot's map (`snapshot_map`) follows its read path
(core/snapshots.py) chunk by chunk, so a range is a hole only where the snapshot reads
zeroes from a hole, an unmapped chunk or a journaled zero/trim.
"""

from __future__ import annotations

import bisect
import errno
import os

from jsnap.stores.files import BlockFile
from jsnap.stores.thin import ThinMap

HOLE_ZERO = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO


def allocation_map(start: int, end: int, holes: list[tuple[int, int]],
                   journaled: list[tuple[int, int]], max_extents: int) -> list[tuple[int, int]]:
    """[start, end) as (length, flags) runs: `holes` (sorted, disjoint) less the
    `journaled` ranges are HOLE_ZERO, the rest data (0). At most `max_extents` runs, so it
    may cover less than asked, never zero bytes."""
    if holes and journaled:
        holes = _subtract(holes, sorted(journaled))
    out: list[tuple[int, int]] = []
    pos = start
    for hs, he in holes:
        if hs > pos:
            out.append((hs - pos, 0))
        out.append((he - hs, HOLE_ZERO))
        pos = he
        if len(out) >= max_extents:
            return out[:max_extents]
    if pos < end:
        out.append((end - pos, 0))
    return out


def snapshot_map(start: int, end: int, holes: list[tuple[int, int]],
                 pieces: list[tuple[int, int, bool]], copied: list[tuple[int, int]],
                 copy_holes: list[tuple[int, int]], max_extents: int
                 ) -> list[tuple[int, int]]:
    """A snapshot's [start, end) as allocation_map runs. `holes`: production's (sorted,
    disjoint); `pieces`: the journaled (start, end, zeroes) below the snapshot, in an order
    safe to lay; `copied`: the chunk ranges read from a preserved copy, which replace both;
    `copy_holes`: the parts of those copies that are holes."""
    bounds = [b for hole in holes for b in hole]
    for s, e, zeroes in pieces:  # the newest piece decides, byte by byte
        _paint(bounds, s, e, zeroes)
    for s, e in copied:
        _paint(bounds, s, e, False)
    for s, e in copy_holes:
        _paint(bounds, s, e, True)
    return allocation_map(start, end, list(zip(bounds[::2], bounds[1::2], strict=True)), [],
                          max_extents)


def _paint(bounds: list[int], s: int, e: int, hole: bool) -> None:
    """Make [s, e) a hole or not in `bounds`, the flat sorted starts and ends of disjoint
    holes [b0, b1), [b2, b3) ...; touching holes merge."""
    i = bisect.bisect_left(bounds, s)  # i odd: s-1 is in a hole
    j = bisect.bisect_right(bounds, e)  # j odd: e is in a hole
    mid = []
    if (i & 1) != hole:
        mid.append(s)
    if (j & 1) != hole:
        mid.append(e)
    bounds[i:j] = mid


def file_holes(f: BlockFile, start: int, end: int) -> list[tuple[int, int]]:
    """Holes of a sparse file within [start, end), from SEEK_DATA/SEEK_HOLE."""
    fd = getattr(f, "fd", None)
    if fd is None:
        return []
    holes: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                return []  # no SEEK_DATA here: report everything as data
            data = end
        if data > pos:
            holes.append((pos, min(data, end)))
            pos = data
            continue
        pos = os.lseek(fd, pos, os.SEEK_HOLE)
    return holes


def unmapped(tmap: ThinMap, start: int, end: int, shift: int) -> list[tuple[int, int]]:
    """Byte ranges of unmapped chunks within [start, end)."""
    out: list[tuple[int, int]] = []
    pos = start
    for c, _ext in tmap.mapped_in(start >> shift, (end - 1) >> shift):
        cstart = max(c << shift, start)
        if cstart > pos:
            out.append((pos, cstart))
        pos = min((c + 1) << shift, end)
    if pos < end:
        out.append((pos, end))
    return out


def _subtract(holes: list[tuple[int, int]], cover: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of the sorted, disjoint `holes` not covered by any (sorted by start) `cover`."""
    out: list[tuple[int, int]] = []
    i = 0
    for hs, he in holes:
        while i < len(cover) and cover[i][1] <= hs:
            i += 1
        pos = hs
        j = i
        while j < len(cover) and cover[j][0] < he:
            cs, ce = cover[j]
            if cs > pos:
                out.append((pos, cs))
            pos = max(pos, ce)
            j += 1
        if pos < he:
            out.append((pos, he))
    return out
