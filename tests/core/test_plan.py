"""Destage planning (jsnap.core.plan) without an engine: tables of (maps, snapshots, index, batch)
and the plan each must give, in the spirit of h11's SIMPLE_CASES."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from jsnap.core.plan import ThinPlan, absorb, needs, plan_thin, raw_copies, sort_batch
from jsnap.stores import journal as jn
from jsnap.stores.thin import ZERO_SLOT, ThinMap

SHIFT = 12
CS = 1 << SHIFT
W, TRIM, ZALLOC, REMAP = jn.WRITE, jn.TRIM, jn.ZEROES_ALLOC, jn.REMAP


def rec(seq: int, kind: int, offset: int, length: int, vol: int = 1,
        exts: list[int] | None = None) -> jn.Record:
    r = jn.Record(seq, kind, vol, offset, length, 0, 0, 0)
    if exts is not None:
        r.exts = exts
    return r


def plan_of(mapped: dict[int, tuple[int, int]], snaps: list[int], his: dict[int, int],
            recs: list[jn.Record]) -> ThinPlan:
    tmap = ThinMap()
    for c, (ext, seq) in mapped.items():
        tmap.set(c, ext, seq)
    fresh = itertools.count(100)
    plan = ThinPlan()
    asked: list[list[int]] = []

    def max_his(chunks: list[int]) -> dict[int, int]:
        asked.append(chunks)
        return {c: his[c] for c in chunks if c in his}

    plan_thin(1, recs, tmap, snaps, SHIFT, max_his, lambda: next(fresh), plan)
    return plan


def summary(p: ThinPlan) -> dict[str, list]:
    return {k: v for k, v in vars(p).items() if v}


# (id, map {chunk: (extent, seq)}, live snapshot seqs, index max_hi, batch, expected plan)
THIN_CASES = [
    ("in place: mapped, no snapshot", {0: (5, 10)}, [], {}, [rec(20, W, 0, CS)], {}),
    ("in place: mapped after the newest snapshot's copy", {0: (5, 10)}, [15], {0: 17},
     [rec(20, W, 0, 100)], {}),
    ("hole, partial write: a zeroed new extent", {}, [], {}, [rec(20, W, 0, 100)],
     {"taken": [100], "zero": [100], "map_set": [(1, 0, 100, 20)]}),
    ("hole, whole write: no zeroing", {}, [], {}, [rec(20, W, 0, CS)],
     {"taken": [100], "map_set": [(1, 0, 100, 20)]}),
    ("snapshot: old extent moves to it, partial write copies it", {0: (5, 10)}, [15], {},
     [rec(20, W, 0, 100)],
     {"preserved": [(1, 0, 20, 5)], "taken": [100], "copies": [(5, 100)],
      "map_set": [(1, 0, 100, 20)]}),
    ("snapshot: whole write, nothing copied", {0: (5, 10)}, [15], {}, [rec(20, W, 0, CS)],
     {"preserved": [(1, 0, 20, 5)], "taken": [100], "map_set": [(1, 0, 100, 20)]}),
    ("snapshot of a hole: a zero row", {}, [15], {}, [rec(20, W, 0, 100)],
     {"preserved": [(1, 0, 20, ZERO_SLOT)], "taken": [100], "zero": [100],
      "map_set": [(1, 0, 100, 20)]}),
    ("snapshot newer than the batch's first write of the chunk: in place", {0: (5, 10)},
     [25], {}, [rec(20, W, 0, 100), rec(24, W, 0, 100)], {}),
    ("whole-chunk trim, no snapshot: unmap, free", {0: (5, 10)}, [], {},
     [rec(20, TRIM, 0, CS)], {"freed": [5], "map_del": [(1, 0)]}),
    ("whole-chunk trim under a snapshot: unmap, preserve", {0: (5, 10)}, [15], {},
     [rec(20, TRIM, 0, CS)], {"preserved": [(1, 0, 20, 5)], "map_del": [(1, 0)]}),
    ("trim then partial write, old extent unneeded: in place (phase B zeroes it)",
     {0: (5, 10)}, [15], {0: 16}, [rec(20, TRIM, 0, CS), rec(21, W, 0, 100)], {}),
    ("trim then partial write under a snapshot: preserved, a zeroed new extent, no copy",
     {0: (5, 10)}, [15], {}, [rec(20, TRIM, 0, CS), rec(21, W, 0, 100)],
     {"preserved": [(1, 0, 20, 5)], "taken": [100], "zero": [100],
      "map_set": [(1, 0, 100, 20)]}),
    ("allocated zeroes are data", {}, [], {}, [rec(20, ZALLOC, 0, 100)],
     {"taken": [100], "zero": [100], "map_set": [(1, 0, 100, 20)]}),
    ("REMAP: the new extent replaces the old, freed", {0: (5, 10)}, [], {},
     [rec(20, REMAP, 0, CS, exts=[50])], {"freed": [5], "map_set": [(1, 0, 50, 20)]}),
    ("REMAP under a snapshot: the old extent is preserved", {0: (5, 10)}, [15], {},
     [rec(20, REMAP, 0, CS, exts=[50])],
     {"preserved": [(1, 0, 20, 5)], "map_set": [(1, 0, 50, 20)]}),
    ("REMAP twice: the first extent is freed", {}, [], {},
     [rec(20, REMAP, 0, CS, exts=[50]), rec(21, REMAP, 0, CS, exts=[51])],
     {"freed": [50], "map_set": [(1, 0, 51, 20)]}),
]


@pytest.mark.parametrize("mapped,snaps,his,recs,want",
                         [pytest.param(*c[1:], id=c[0]) for c in THIN_CASES])
def test_plan_thin(mapped, snaps, his, recs, want):
    got = summary(plan_of(mapped, snaps, his, recs))
    assert got == {k: v for k, v in want.items() if v}


def test_plan_thin_asks_the_index_once_for_chunks_a_snapshot_predates():
    tmap = ThinMap()
    asked: list[list[int]] = []
    plan_thin(1, [rec(20, W, 0, 3 * CS), rec(30, W, 5 * CS, CS)], tmap, [25], SHIFT,
              lambda cs: asked.append(sorted(cs)) or {}, itertools.count(100).__next__,
              ThinPlan())
    assert asked == [[5]], "chunks first written before the snapshot need no lookup"


@pytest.mark.parametrize("seqs,first,his,want", [
    pytest.param([], 20, {}, False, id="no snapshot"),
    pytest.param([25], 20, {}, False, id="snapshot newer than the write"),
    pytest.param([15], 20, {}, True, id="no copy yet"),
    pytest.param([15], 20, {0: 12}, True, id="copy older than the snapshot"),
    pytest.param([15], 20, {0: 17}, False, id="copy serves the snapshot"),
    pytest.param([5, 15], 20, {0: 10}, True, id="copy serves only the older snapshot"),
])
def test_needs(seqs, first, his, want):
    assert needs(seqs, 0, first, his) is want


def test_raw_copies_only_where_the_newest_older_snapshot_has_none():
    firsts = {0: (15, 20), 1: (15, 21), 2: (15, 22)}
    assert raw_copies(firsts, {0: 16, 1: 12}) == [(1, 21), (2, 22)]


@dataclass
class Vol:
    thin: ThinMap | None = None
    snap_seqs: list[int] = field(default_factory=list)


def test_sort_batch():
    vols = {1: Vol(snap_seqs=[5, 18]), 2: Vol(thin=ThinMap())}
    batch = [
        rec(10, W, 0, 100),  # raw, newest older snapshot 5
        rec(11, REMAP, 0, CS, vol=9, exts=[70, 71]),  # its volume is gone: orphans
        rec(12, REMAP, 0, CS, vol=2, exts=[72]),
        rec(19, W, 50, 10),  # chunk 0 again: the first record decided
        rec(20, W, CS, 10),  # chunk 1, newest older snapshot 18
        rec(21, W, 0, 10, vol=9),  # deleted volume
        rec(22, jn.SNAP_CREATE, 0, 0),
    ]
    s = sort_batch(batch, vols, SHIFT)
    assert [r.seq for r in s.writes] == [10, 12, 19, 20]
    assert s.touched == {1: {0, 1}, 2: {0}}
    assert [r.seq for r in s.thin_recs[2]] == [12]
    assert s.raw_first == {1: {0: (5, 10), 1: (18, 20)}}
    assert s.marker is batch[-1] and s.orphans == [70, 71] and s.remap_seq == 12


@pytest.mark.parametrize("recs,kept", [
    pytest.param([rec(1, W, 0, CS), rec(2, W, 0, CS)], [2], id="wholly overwritten"),
    pytest.param([rec(1, W, 0, 100), rec(2, W, 50, 100)], [1, 2], id="partly"),
    pytest.param([rec(1, W, 0, 100), rec(2, W, 0, 50), rec(3, W, 50, 50)], [1, 2, 3],
                 id="covered by two, not one"),
    pytest.param([rec(1, W, 0, 2 * CS), rec(2, W, 0, 2 * CS)], [1, 2],
                 id="across chunks: always kept"),
    pytest.param([rec(1, W, 0, 100), rec(2, W, 0, 2 * CS)], [2],
                 id="under a later record's piece"),
    pytest.param([rec(1, W, 0, 100), rec(2, W, 0, 100, vol=2)], [1, 2], id="other volume"),
])
def test_absorb(recs, kept):
    assert [r.seq for r in absorb(recs, SHIFT)] == kept
