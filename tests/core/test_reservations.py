"""Thin reservations (jsnap.core.reservations) on their own: no engine, no journal file, no server.

A real ExtentPool over one small data file; records are journal.Record values built by hand.
Each test names the invariant of the module doc it checks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from jsnap.core.reservations import Reservations
from jsnap.errors import NoSpace
from jsnap.stores import journal as jn
from jsnap.stores.changes import BIG_CHUNKS
from jsnap.stores.files import OsFile
from jsnap.stores.thin import ExtentPool, PoolFile, ThinMap

CS = 4096
SHIFT = 12


@dataclass
class Vol:
    id: int
    thin: ThinMap | None = field(default_factory=ThinMap)
    snap_seqs: list[int] = field(default_factory=list)


@pytest.fixture
def pool(tmp_path):
    f = OsFile(str(tmp_path / "data-0.dat"), create=True)
    p = ExtentPool(CS, [PoolFile(0, f.path, f, capacity=16, backed=0)], set())
    yield p
    f.close()


_seq = itertools.count(100)


def rec(kind: int, vol: Vol, offset: int, length: int) -> jn.Record:
    return jn.Record(next(_seq), kind, vol.id, offset, length, 0, 0, 0)


def journal(r: Reservations, vol: Vol, kind: int, offset: int, length: int) -> jn.Record:
    """What the engine's write path does for one record: reserve, append, admit, release."""
    budget = [r.reserve(vol, [(kind, offset, length)])]
    x = rec(kind, vol, offset, length)
    r.admit(vol, x, budget)
    r.release(budget[0])
    return x


def test_a_write_reserves_each_chunk_once_until_a_snapshot(pool):  # R1, R2
    r, v = Reservations(pool, SHIFT), Vol(1)
    a = journal(r, v, jn.WRITE, 0, 2 * CS)  # chunks 0, 1
    assert r.by_seq == {a.seq: 2} and pool.reserved == 2
    journal(r, v, jn.WRITE, CS, 100)  # chunk 1 again: covered
    assert pool.reserved == 2
    v.snap_seqs = [next(_seq)]  # a snapshot: the reserved extents are older than it
    c = journal(r, v, jn.WRITE, 0, 100)
    assert r.by_seq[c.seq] == 1 and pool.reserved == 3


def test_mapped_chunks_after_the_newest_snapshot_are_written_in_place(pool):  # R2
    r, v = Reservations(pool, SHIFT), Vol(1)
    assert v.thin is not None
    v.thin.set(0, 5, 50)  # mapped by seq 50
    assert r.need(v, [(jn.WRITE, 0, CS)]) == 0
    v.snap_seqs = [60]
    assert r.need(v, [(jn.WRITE, 0, CS)]) == 1


def test_zeroes_need_only_their_partial_edge_chunks(pool):  # R1
    r, v = Reservations(pool, SHIFT), Vol(1)
    assert r.need(v, [(jn.TRIM, 100, 3 * CS)]) == 2  # chunks 0 and 3 partly; 1, 2 whole
    assert r.need(v, [(jn.ZEROES_ALLOC, 100, 3 * CS)]) == 4  # allocated zeroes: every chunk
    t = journal(r, v, jn.TRIM, CS, 2 * CS)
    assert r.cover[v.id] == {1: -t.seq, 2: -t.seq}
    assert r.need(v, [(jn.WRITE, CS, 10)]) == 1, "a chunk to be unmapped is not covered"


def test_a_big_trim_uncovers_what_it_unmaps(pool):  # R2
    r, v = Reservations(pool, SHIFT), Vol(1)
    journal(r, v, jn.WRITE, 10 * CS, CS)
    assert r.need(v, [(jn.WRITE, 10 * CS, 1)]) == 0
    big = journal(r, v, jn.TRIM, 0, (BIG_CHUNKS + 10) * CS)
    assert r.big[v.id] == [(big.seq, 0, BIG_CHUNKS + 9)]
    assert r.need(v, [(jn.WRITE, 10 * CS, 1)]) == 1


def test_no_space_changes_nothing(pool):  # R1
    r, v = Reservations(pool, SHIFT), Vol(1)
    journal(r, v, jn.WRITE, 0, 16 * CS)
    assert pool.reserved == 16
    with pytest.raises(NoSpace):
        r.reserve(v, [(jn.WRITE, 16 * CS, CS)])
    assert pool.reserved == 16 and v.id in r.cover and 16 not in r.cover[v.id]


def test_admit_takes_by_force_what_a_snapshot_added(pool):  # R1
    r, v = Reservations(pool, SHIFT), Vol(1)
    journal(r, v, jn.WRITE, 0, CS)
    budget = [r.reserve(v, [(jn.WRITE, 0, CS)])]
    assert budget == [0]
    v.snap_seqs = [next(_seq)]  # slipped in while the writer waited for journal space
    x = rec(jn.WRITE, v, 0, CS)
    r.admit(v, x, budget)
    assert r.by_seq[x.seq] == 1 and pool.reserved == 2


def test_settle_releases_what_the_batch_did_not_take_and_keeps_later_cover(pool):  # R3
    r, v = Reservations(pool, SHIFT), Vol(1)
    a = journal(r, v, jn.WRITE, 0, 2 * CS)
    b = journal(r, v, jn.WRITE, 2 * CS, CS)
    pool.take_many(1)  # the batch of `a` took one extent (the other chunk went elsewhere)
    r.settle([a], taken=1, volumes={v.id: v})
    assert a.seq not in r.by_seq and r.by_seq == {b.seq: 1}
    assert r.cover[v.id] == {2: b.seq}, "only a's entries are forgotten"
    assert pool.reserved == 1  # b's: of a's two, one was taken, the other released
    r.settle([b], taken=0, volumes={})  # its volume was deleted meanwhile
    assert r.by_seq == {} and pool.reserved == 0


def test_replay_reserves_the_same_as_the_write_path(pool, tmp_path):  # R1
    live, v1 = Reservations(pool, SHIFT), Vol(1)
    f = OsFile(str(tmp_path / "data-1.dat"), create=True)
    pool2 = ExtentPool(CS, [PoolFile(0, f.path, f, capacity=16, backed=0)], set())
    replayed, v2 = Reservations(pool2, SHIFT), Vol(1)
    recs = [journal(live, v1, jn.WRITE, 0, CS), journal(live, v1, jn.WRITE, 100, 10),
            journal(live, v1, jn.TRIM, 0, 3 * CS), journal(live, v1, jn.WRITE, 5 * CS, 2 * CS)]
    for x in recs:
        if x.kind == jn.WRITE and (x.offset + x.length - 1) >> SHIFT == x.offset >> SHIFT:
            replayed.replay_one_chunk(v2, x, x.offset >> SHIFT, 0)
        else:
            replayed.replay(v2, x)
    assert pool2.reserved == 0, "reserved once, at the end of replay"
    replayed.end_replay()
    assert (replayed.by_seq, replayed.cover, pool2.reserved) == \
        (live.by_seq, live.cover, pool.reserved)
    f.close()
