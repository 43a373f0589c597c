"""Destage planning: what a batch does, decided from the batch, the maps and the index alone.

The destager (destager.py) is split in two: this module decides, and the destager applies
(copies, writes, syncs, catalog rows, in the order its invariants 1, 2 and 5 require).
Nothing here does I/O or takes a lock: every function is a function of its arguments (the
index and the extent allocator come in as callables), so each rule is tested on its own
(tests/core/test_plan.py) and the applier can later run in another process.

Steps, for one batch (records in seq order, at most one snapshot marker, at its end):

  sort_batch   which records write production, which chunks they touch, which volumes
               are thin, the marker, REMAP records of deleted volumes (orphans)
  raw_copies   raw volumes: which chunks to copy into the snapshot store first
  plan_thin    thin volumes: per chunk, where its new content goes (stores/thin.py T3), which old
               extents go to a snapshot (moved, not copied) or back to the pool
  absorb       records wholly overwritten later in the batch, dropped before phase B

Why "copy c iff some live snapshot S has max_hi(c) < S.seq < r.seq" is enough: see the
destager's module doc (the smallest hi > S.seq finds S's copy).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from jsnap.stores import changes
from jsnap.stores import journal as jn
from jsnap.stores.thin import ZERO_SLOT, ThinMap, whole_chunks

END = 1 << 62  # a seq above every record's
MaxHis = Callable[[list[int]], dict[int, int]]  # chunks -> max_hi of those that have one


class PlanVolume(Protocol):
    """What planning reads of a volume (engine.Volume)."""

    @property
    def thin(self) -> ThinMap | None: ...
    @property
    def snap_seqs(self) -> list[int]: ...


@dataclass
class Sorted:
    """A batch sorted for planning (sort_batch)."""

    writes: list[jn.Record] = field(default_factory=list)  # records that change production
    touched: dict[int, set[int]] = field(default_factory=dict)  # vol -> chunks (changes table)
    thin_recs: dict[int, list[jn.Record]] = field(default_factory=dict)  # thin vol -> writes
    # raw volumes: vol -> chunk -> (newest snapshot before, seq) of its first record
    raw_first: dict[int, dict[int, tuple[int, int]]] = field(default_factory=dict)
    marker: jn.Record | None = None
    orphans: list[int] = field(default_factory=list)  # extents of REMAP records of deleted vols
    remap_seq: int = -1  # the batch's last REMAP seq (the commit records it)


def sort_batch(batch: list[jn.Record], volumes: Mapping[int, PlanVolume],
               shift: int) -> Sorted:
    out = Sorted()
    touched, raw_first = out.touched, out.raw_first
    for r in batch:
        kind = r.kind
        if kind == jn.REMAP:
            if r.exts is None:
                continue  # committed before a crash, or its volume is gone
            if r.vol not in volumes:
                out.orphans.extend(r.exts)
                continue
            out.remap_seq = r.seq
        elif kind != jn.WRITE:
            if kind in (jn.SNAP_CREATE, jn.SNAP_DELETE):
                out.marker = r
                continue
            if kind == jn.WRAP:
                continue
        vol = volumes.get(r.vol)
        if vol is None or r.length == 0:
            continue  # the volume was deleted after this record was journaled
        c0, c1 = r.offset >> shift, (r.offset + r.length - 1) >> shift
        chunks = touched.get(r.vol)
        if chunks is None:
            chunks = touched[r.vol] = set()
        if c0 == c1:
            chunks.add(c0)
        elif c1 - c0 < changes.BIG_CHUNKS or kind == jn.REMAP:
            chunks.update(range(c0, c1 + 1))  # else one big piece, dropped by seq
        out.writes.append(r)
        if vol.thin is not None:
            out.thin_recs.setdefault(r.vol, []).append(r)
            continue
        seqs = vol.snap_seqs
        i = bisect.bisect_left(seqs, r.seq)
        if i == 0:
            continue  # no live snapshot older than r: nothing to preserve
        newest = seqs[i - 1]
        for c in range(c0, c1 + 1):
            # The first record of the batch to touch c decides (setdefault).
            raw_first.setdefault(r.vol, {}).setdefault(c, (newest, r.seq))
    return out


def raw_copies(firsts: dict[int, tuple[int, int]], his: dict[int, int]) -> list[tuple[int, int]]:
    """(chunk, hi) of a raw volume's chunks to preserve: the newest snapshot older than the
    batch's first write of the chunk has no copy yet (max_hi below it)."""
    out = []
    for c, (newest, seq) in firsts.items():
        hi = his.get(c)
        if hi is None or hi < newest:
            out.append((c, seq))
    return out


def needs(seqs: list[int], c: int, first: int, his: dict[int, int]) -> bool:
    """Does a live snapshot older than `first` still read chunk c from production?
    `his` holds max_hi of every chunk such a snapshot exists for."""
    i = bisect.bisect_left(seqs, first)
    if i == 0:
        return False
    hi = his.get(c)
    return hi is None or hi < seqs[i - 1]


class ThinPlan:
    """What a batch does to thin volumes' maps, built before phase A (plan_thin)."""

    def __init__(self) -> None:
        self.copies: list[tuple[int, int]] = []  # (old extent, new extent)
        self.zero: list[int] = []  # new extents the batch does not wholly overwrite
        self.taken: list[int] = []  # extents allocated for this batch
        self.freed: list[int] = []  # extents to free after the commit
        self.preserved: list[tuple[int, int, int, int]] = []  # (vol, chunk, hi, slot)
        self.map_set: list[tuple[int, int, int, int]] = []  # (vol, chunk, ext, seq)
        self.map_del: list[tuple[int, int]] = []  # (vol, chunk)

    def rows(self) -> bool:
        return bool(self.preserved or self.map_set or self.map_del)


def plan_thin(vid: int, recs: list[jn.Record], tmap: ThinMap, seqs: list[int], shift: int,
              max_his: MaxHis, take: Callable[[], int], plan: ThinPlan) -> None:
    """Decide, per chunk the batch touches, where its new content goes (stores/thin.py T3).

    Per chunk: `wz` = a whole-chunk zero/trim (hole kind) is in the batch; `data` = a
    write or allocated zero after the last such; `full` = one of those covers the chunk.
    The old extent E is preserved (moved, not copied, to the preserved index) when a
    snapshot needs it; the chunk then gets a new extent (`take`, which consumes one of the
    records' reservations), filled by a copy of E only when the batch overwrites it
    partially."""
    if not seqs and all(r.kind == jn.WRITE for r in recs):
        # The common case, plain writes and no snapshot: a write within mapped chunks
        # goes in place and needs no plan; only those touching a hole are planned.
        get, holes = tmap.get, []
        for r in recs:
            c0, c1 = r.offset >> shift, (r.offset + r.length - 1) >> shift
            if c0 == c1:
                if get(c0) < 0:
                    holes.append(r)
            elif any(get(c) < 0 for c in range(c0, c1 + 1)):
                holes.append(r)
        if not holes:
            return
        recs = holes
    state: dict[int, list[int]] = {}  # chunk -> [first seq, wz, data, full]
    remapped: dict[int, int] = {}  # chunk -> extent of the batch's last REMAP of it
    for r in recs:
        if r.kind == jn.REMAP:
            if r.exts is None:
                continue
            c0 = r.offset >> shift
            for i, ext in enumerate(r.exts):
                state.setdefault(c0 + i, [r.seq, 0, 1, 1])
                prev = remapped.get(c0 + i)
                if prev is not None:
                    plan.freed.append(prev)  # rewritten within the batch
                remapped[c0 + i] = ext
            continue
        s, end = r.offset, r.offset + r.length
        c0, c1 = s >> shift, (end - 1) >> shift
        hole = r.kind in (jn.TRIM, jn.ZEROES)
        if hole:
            w0, w1 = whole_chunks(s, r.length, shift)
            if w1 - w0 > changes.BIG_CHUNKS:  # only mapped chunks can matter
                inner = [c for c, _ in tmap.mapped_in(w0, w1)]
                chunks: list[int] | range = sorted({c0, c1, *inner})
            else:
                chunks = range(c0, c1 + 1)
        else:
            w0, w1 = 1, 0
            chunks = range(c0, c1 + 1)
        for c in chunks:
            st = state.get(c)
            if st is None:
                st = state[c] = [r.seq, 0, 0, 0]
            if hole:
                if w0 <= c <= w1:
                    st[1], st[2], st[3] = 1, 0, 0
                continue
            st[2] = 1
            if s <= c << shift and end >= (c + 1) << shift:  # never a short last chunk
                st[3] = 1
    # One batched index lookup for the chunks some live snapshot predates.
    oldest = seqs[0] if seqs else END
    his = max_his([c for c, st in state.items() if st[0] > oldest])
    for c, (first, wz, data, full) in state.items():
        old = tmap.get(c)
        rext = remapped.get(c)
        if rext is not None:
            if needs(seqs, c, first, his):
                plan.preserved.append((vid, c, first, old if old >= 0 else ZERO_SLOT))
            elif old >= 0:
                plan.freed.append(old)
            plan.map_set.append((vid, c, rext, first))
            continue
        if not data and (wz or old < 0):
            if old >= 0:  # wholly zeroed: unmap; preserve or free the old extent
                if needs(seqs, c, first, his):
                    plan.preserved.append((vid, c, first, old))
                else:
                    plan.freed.append(old)
                plan.map_del.append((vid, c))
            continue
        need = needs(seqs, c, first, his)
        if old >= 0 and not need:
            continue  # written in place
        if need:
            plan.preserved.append((vid, c, first, old if old >= 0 else ZERO_SLOT))
        new = take()
        plan.taken.append(new)
        if not full:
            if old >= 0 and not wz:
                plan.copies.append((old, new))
            else:
                plan.zero.append(new)
        plan.map_set.append((vid, c, new, first))


def absorb(writes: list[jn.Record], shift: int) -> list[jn.Record]:
    """Drop records wholly overwritten later in the batch (no marker lies inside a batch).

    Checked per chunk: a record within one chunk is dropped when one later record's piece
    of that chunk covers it. Records spanning chunks are always kept (cheap, and rare to
    be covered in a batch of random writes)."""
    if len(writes) < 2:
        return writes
    later: dict[tuple[int, int], list[tuple[int, int]]] = {}
    out: list[jn.Record] = []
    for r in reversed(writes):
        s, e = r.offset, r.offset + r.length
        c0, c1 = s >> shift, (e - 1) >> shift
        if c0 == c1:
            ivs = later.get((r.vol, c0))
            if ivs is not None:
                if any(a <= s and e <= b for a, b in ivs):
                    continue
                ivs.append((s, e))
            else:
                later[(r.vol, c0)] = [(s, e)]
        else:
            for c in range(c0, c1 + 1):
                piece = (max(s, c << shift), min(e, (c + 1) << shift))
                later.setdefault((r.vol, c), []).append(piece)
        out.append(r)
    out.reverse()
    return out
