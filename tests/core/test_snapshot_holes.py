"""A snapshot's allocation map (Engine.snapshot_extents, NBD base:allocation of `VOL@SNAP`).

The map must never call a range a hole where the snapshot has data (a backup that skips it
loses data), and must show as holes the chunks the snapshot never had data in. Each test
keeps a model of every snapshot's bytes and, per chunk, whether the snapshot must see a
hole there, and checks every snapshot's map against it while records sit in the journal,
after each destage step, after a reopen and while the destager runs in its thread.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from jsnap.core.engine import Engine
from jsnap.core.extents import _paint, snapshot_map
from jsnap.core.volumes import Snapshot
from jsnap.errors import NotFound

CHUNK = 4096
NCHUNKS = 48
SIZE = NCHUNKS * CHUNK
HOLE = 3


class Model:
    """A volume's bytes and, per chunk, whether it must read as a hole: never touched, or
    last made a whole-chunk hole by TRIM/WRITE_ZEROES (thin volumes unmap those)."""

    def __init__(self, thin: bool) -> None:
        self.thin = thin
        self.data = bytearray(SIZE)
        self.hole = [True] * NCHUNKS
        self.touched = [False] * NCHUNKS  # by any record, before or after any snapshot
        self.snaps: dict[str, tuple[bytes, list[bool]]] = {}

    def apply(self, e: Engine, op: str, off: int, n: int, rng: random.Random) -> None:
        v = e.volume("v")
        if op == "write":
            data = rng.randbytes(n) if rng.random() < 0.8 else bytes(n)  # zero data is data
            e.write(v, off, data)
            self.data[off : off + n] = data
        else:
            {"trim": e.trim, "zero": e.write_zeroes,
             "zero-alloc": lambda v, o, n: e.write_zeroes(v, o, n, no_hole=True)}[op](v, off, n)
            self.data[off : off + n] = bytes(n)
        for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1):
            self.touched[c] = True
            whole = off <= c * CHUNK and (c + 1) * CHUNK <= off + n
            self.hole[c] = op in ("trim", "zero") and whole

    def snapshot(self, e: Engine, name: str) -> None:
        e.snapshot_create(e.volume("v"), name)
        self.snaps[name] = (bytes(self.data), list(self.hole))

    def delete(self, e: Engine, name: str) -> None:
        e.snapshot_delete(e.volume("v"), name)
        del self.snaps[name]


def full_map(e: Engine, snap: Snapshot, size: int = SIZE, start: int = 0
             ) -> list[tuple[int, int, int]]:
    """(start, end, flags) of [start, size), asking again where a reply covers less."""
    out: list[tuple[int, int, int]] = []
    pos = start
    while pos < size:
        runs = e.snapshot_extents(snap, pos, size - pos)
        assert runs and all(n > 0 for n, _ in runs), runs
        for n, flags in runs:
            assert flags in (0, HOLE), runs
            out.append((pos, pos + n, flags))
            pos += n
    assert pos == size
    return out


def check(e: Engine, m: Model, when: str) -> None:
    """Every snapshot reads as modelled; its holes read as zeroes; the chunks it must see as
    holes are holes (raw volumes: only chunks no record ever touched, since a raw copy of
    a hole is data on most file systems)."""
    v = e.volume("v")
    for name, (img, hole) in m.snaps.items():
        snap = e.snapshot(v, name)
        assert bytes(e.read_snapshot(snap, 0, SIZE)) == img, f"{name} {when}: bytes"
        runs = full_map(e, snap)
        holes = bytearray(SIZE)  # 1 where the map says hole
        for s, end, flags in runs:
            if flags == HOLE:
                assert img[s:end].count(0) == end - s, f"{name} {when}: false hole {s}-{end}"
                holes[s:end] = b"\1" * (end - s)
        for c in range(NCHUNKS):
            must = hole[c] if m.thin else not m.touched[c]
            if must:
                assert holes[c * CHUNK : (c + 1) * CHUNK].count(1) == CHUNK, (
                    f"{name} {when}: chunk {c} should be a hole: {runs}")


@pytest.mark.parametrize("thin", [True, False], ids=["thin", "raw"])
def test_snapshot_map_through_every_destage_step_and_reopen(engine, reopen, thin):
    e, rng = engine, random.Random(4)
    m = Model(thin)
    e.volume_create("v", SIZE, thin=thin)
    # Before s1: data in chunks 1-2 and part of 8, a whole-chunk trim of written chunk 4,
    # a partial zero in 10, a NO_HOLE zero of 12, a 64 KiB aligned write (thin: REMAP) at
    # 16-31; chunks 0, 3, 5-7, 9, 11, 13-15 and 32-47 never written.
    m.apply(e, "write", CHUNK, 2 * CHUNK, rng)
    m.apply(e, "write", 8 * CHUNK + 100, 200, rng)
    m.apply(e, "write", 4 * CHUNK, CHUNK, rng)
    e.destage()  # some of it in production
    m.apply(e, "trim", 4 * CHUNK, CHUNK, rng)
    m.apply(e, "write", 10 * CHUNK, CHUNK, rng)
    m.apply(e, "zero", 10 * CHUNK + 512, 1024, rng)
    m.apply(e, "zero-alloc", 12 * CHUNK, CHUNK, rng)
    m.apply(e, "write", 16 * CHUNK, 16 * CHUNK, rng)
    m.snapshot(e, "s1")
    # After s1: overwrite, trim, write never-written chunks, trim what s1 has data in.
    m.apply(e, "write", CHUNK + 10, 10, rng)
    m.apply(e, "trim", 2 * CHUNK, CHUNK, rng)
    m.apply(e, "write", 0, 100, rng)
    m.apply(e, "write", 33 * CHUNK, 3 * CHUNK, rng)
    m.apply(e, "trim", 16 * CHUNK, 8 * CHUNK, rng)
    m.apply(e, "write", 24 * CHUNK, 16 * CHUNK, rng)  # REMAP over s1's REMAP data
    m.snapshot(e, "s2")
    m.apply(e, "zero", 0, SIZE, rng)  # one big piece over everything
    m.apply(e, "write", 40 * CHUNK, 100, rng)
    m.snapshot(e, "s3")
    m.apply(e, "write", 5 * CHUNK, CHUNK, rng)
    check(e, m, "all journaled")
    steps = 0
    while e.stats()["journal_records"]:
        e.destage(max_records=1)
        steps += 1
        check(e, m, f"after destage step {steps}")
    e = reopen(e)
    check(e, m, "after reopen")
    m.delete(e, "s2")
    e.destage()
    check(e, m, "after deleting s2")
    e = reopen(e)
    check(e, m, "after deleting s2 and reopening")


@pytest.mark.parametrize("thin", [True, False], ids=["thin", "raw"])
@pytest.mark.parametrize("seed", range(3))
def test_snapshot_map_random_ops_destage_and_reopen(engine, reopen, thin, seed):
    e, rng = engine, random.Random(seed)
    m = Model(thin)
    e.volume_create("v", SIZE, thin=thin)
    ops = ["write"] * 6 + ["trim", "zero", "zero-alloc"]
    for i in range(160):
        r = rng.random()
        if r < 0.08:
            m.snapshot(e, f"s{i}")
        elif r < 0.11 and len(m.snaps) > 1:
            m.delete(e, rng.choice(sorted(m.snaps)))
        elif r < 0.18:
            e.destage(max_records=rng.randint(1, 8))
        elif r < 0.19:
            e = reopen(e)
        else:
            op = rng.choice(ops)
            if rng.random() < 0.3:  # whole chunks (thin: trims unmap, big writes REMAP)
                c = rng.randrange(NCHUNKS - 1)
                off, n = c * CHUNK, rng.randint(1, min(20, NCHUNKS - c)) * CHUNK
            else:
                off = rng.randrange(SIZE - 1)
                n = rng.randint(1, min(3 * CHUNK, SIZE - off))
            m.apply(e, op, off, n, rng)
        if i % 10 == 9:
            check(e, m, f"op {i}")
    check(e, m, "end, journaled")
    e.destage()
    check(e, m, "end, destaged")
    e = reopen(e)
    check(e, m, "end, reopened")


def test_snapshot_map_stays_truthful_while_the_destager_runs(pool_path):
    """Writers overwrite and trim everything while the destager thread moves them to
    production: every map taken meanwhile must still be the snapshot's (snapshots.py I3)."""
    e = Engine.open(pool_path)
    try:
        rng = random.Random(9)
        m = Model(thin=True)
        e.volume_create("v", SIZE, thin=True)
        for c in range(0, NCHUNKS, 3):
            m.apply(e, "write", c * CHUNK + rng.randrange(CHUNK // 2), CHUNK // 2, rng)
        m.snapshot(e, "s")
        stop = threading.Event()
        errors: list[BaseException] = []

        def churn() -> None:
            r = random.Random(10)
            v = e.volume("v")
            try:
                while not stop.is_set():
                    c = r.randrange(NCHUNKS)
                    if r.random() < 0.5:
                        e.trim(v, c * CHUNK, CHUNK * r.randint(1, 3) if c < NCHUNKS - 3 else CHUNK)
                    else:
                        e.write(v, c * CHUNK + r.randrange(CHUNK // 2), b"\xee" * (CHUNK // 2))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=churn)
        t.start()
        try:
            deadline = time.monotonic() + 3
            i = 0
            while time.monotonic() < deadline:
                check(e, m, f"map {i} while destaging")
                i += 1
        finally:
            stop.set()
            t.join()
        assert not errors, errors
        assert e.stats()["destaged_records"] > 1000
    finally:
        e.close()


def test_snapshot_map_of_a_deleted_snapshot_is_not_found(engine):
    e = engine
    v = e.volume_create("v", SIZE, thin=True)
    snap = e.snapshot_create(v, "s")
    assert e.snapshot_extents(snap, 0, SIZE) == [(SIZE, HOLE)]
    e.snapshot_delete(v, "s")
    with pytest.raises(NotFound):
        e.snapshot_extents(snap, 0, SIZE)


def test_snapshot_map_limits_its_reply(engine):
    """At most max_extents runs, covering less than asked; asking on covers the rest."""
    e = engine
    v = e.volume_create("v", SIZE, thin=True)
    for c in range(0, NCHUNKS, 2):
        e.write(v, c * CHUNK, b"x")
    snap = e.snapshot_create(v, "s")
    assert e.snapshot_extents(snap, 0, 10) == [(1, 0), (9, HOLE)]  # journaled: to the byte
    e.destage()  # mapped: to the chunk
    runs = e.snapshot_extents(snap, 0, SIZE, max_extents=5)
    assert len(runs) == 5 and sum(n for n, _ in runs) < SIZE
    assert e.snapshot_extents(snap, 100, 10) == [(10, 0)]
    assert e.snapshot_extents(snap, CHUNK + 100, 10) == [(10, HOLE)]
    assert full_map(e, snap, start=CHUNK - 1)[:2] == [(CHUNK - 1, CHUNK, 0),
                                                       (CHUNK, 2 * CHUNK, HOLE)]


def test_paint_and_snapshot_map_lay_pieces_newest_last():
    bounds = [10, 20, 30, 40]
    _paint(bounds, 15, 35, True)
    assert bounds == [10, 40]
    _paint(bounds, 20, 30, False)
    assert bounds == [10, 20, 30, 40]
    _paint(bounds, 0, 10, True)  # touching holes merge
    assert bounds == [0, 20, 30, 40]
    _paint(bounds, 0, 50, False)
    assert bounds == []
    # Production hole [0, 100); a write at 10-20 then a zero at 15-30 then a write at 25-26;
    # a copied chunk [60, 80) that is data but for its hole [70, 75).
    runs = snapshot_map(0, 100, [(0, 100)], [(10, 20, False), (15, 30, True), (25, 26, False)],
                        [(60, 80)], [(70, 75)], 4096)
    assert runs == [(10, HOLE), (5, 0), (10, HOLE), (1, 0), (34, HOLE), (10, 0), (5, HOLE),
                    (5, 0), (20, HOLE)]
