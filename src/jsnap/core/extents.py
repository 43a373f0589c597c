"""Allocation maps (NBD base:allocation): which ranges of a volume are holes.

Pure functions over what the engine gathers under its lock (the journaled pieces) and
outside it (the production file's holes, a thin map's unmapped chunks). A journaled range
is always reported as data, which is truthful whatever it holds; a hole is reported only
where neither the journal nor production has data.
"""

from __future__ import annotations

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
