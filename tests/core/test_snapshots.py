"""Snapshots through the engine API: many of them, O(1) preservation, reclaim, rollback, names.

Each test drives one pool with the destager stepped by the test (`destage()`), so the test
decides which records are still in the journal and which are in production when a snapshot
is taken, read, deleted or rolled back to. Every image is compared byte for byte with a model.
"""

from __future__ import annotations

import os
import random

import pytest

from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.errors import AlreadyExists, InvalidRequest, NotFound

CHUNK = 4096


def _pattern(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _first_diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), -1)


def _check_volume(e: Engine, name: str, want: bytes, when: str = "") -> None:
    got = bytes(e.read(e.volume(name), 0, len(want)))
    assert got == want, f"volume {name} {when}: first difference at byte {_first_diff(got, want)}"


def _check_snap(e: Engine, vol: str, snap: str, want: bytes, when: str = "") -> None:
    got = bytes(e.read_snapshot(e.snapshot(e.volume(vol), snap), 0, len(want)))
    assert got == want, (
        f"snapshot {vol}@{snap} {when}: first difference at byte {_first_diff(got, want)} "
        f"(chunk {_first_diff(got, want) // CHUNK})"
    )


class VolModel:
    """A volume's bytes plus its snapshots' images."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.snaps: dict[str, bytes] = {}

    def write(self, off: int, data: bytes) -> None:
        self.data[off : off + len(data)] = data


# -- 100+ snapshots on one volume -------------------------------------------------------------


def test_snapshots_120_on_one_volume_read_right_through_delete_destage_reopen(engine, reopen):
    rng = random.Random(120)
    size = 64 * CHUNK
    e = engine
    v = e.volume_create("v", size)
    m = VolModel(size)
    # Some content in production first, so preserved copies are not all zeroes.
    base = _pattern(rng, size)
    e.write(v, 0, base)
    m.write(0, base)
    e.destage()
    kept_in_journal = 0
    for i in range(120):
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            # Varied chunks: unaligned offsets, sub-chunk and multi-chunk lengths.
            # Half the writes go to 4 hot chunks, so journaled pieces of a chunk pile up
            # across snapshots and overwrite each other.
            off = rng.randrange(0, 4 * CHUNK if rng.random() < 0.5 else size - 1)
            length = min(rng.choice((1, 100, 512, CHUNK, CHUNK + 1, 3 * CHUNK - 7)), size - off)
            if r < 0.8:
                data = _pattern(rng, length)
                e.write(v, off, data)
                m.write(off, data)
            else:
                (e.trim if r < 0.9 else e.write_zeroes)(v, off, length)
                m.write(off, bytes(length))
        # The newest snapshot and a random older one, now that writes came after them.
        if m.snaps:
            newest = max(m.snaps)
            for old in {newest, rng.choice(sorted(m.snaps))}:
                _check_snap(e, "v", old, m.snaps[old], f"after the writes of step {i}")
        name = f"snap{i:03d}"
        e.snapshot_create(v, name)
        m.snaps[name] = bytes(m.data)
        # Read the new snapshot at once: it may be entirely in the journal.
        _check_snap(e, "v", name, m.snaps[name], "right after creation")
        # Destage between some snapshots, not all; sometimes only part of the journal.
        r = rng.random()
        if r < 0.3:
            e.destage()
        elif r < 0.5:
            e.destage(max_records=rng.randint(1, 6))
        if e.stats()["journal_fill"] > 0.5:
            e.destage()
        kept_in_journal = max(kept_in_journal, e.stats()["journal_records"])
    assert kept_in_journal > 10, "the test should leave snapshots and writes in the journal"
    assert len(e.snapshot_list(v)) == 120
    assert e.stats()["preserved_copies"] > 0

    def check_all(e: Engine, when: str) -> None:
        v = e.volume("v")
        _check_volume(e, "v", bytes(m.data), when)
        names = [s.name for s in e.snapshot_list(v)]
        assert names == sorted(m.snaps), f"{when}: live snapshots {names}"
        for name, img in m.snaps.items():
            _check_snap(e, "v", name, img, when)

    check_all(e, "after 120 creations")
    # Delete a random half, some while their markers and writes are still journaled.
    doomed = rng.sample(sorted(m.snaps), 60)
    deleted_objs = []
    for name in doomed:
        deleted_objs.append(e.snapshot(v, name))
        e.snapshot_delete(v, name)
        del m.snaps[name]
        if rng.random() < 0.2:
            e.destage(max_records=rng.randint(1, 10))
    for name in doomed[:5]:
        with pytest.raises(NotFound):
            e.snapshot(v, name)
    for snap in deleted_objs[:5]:
        with pytest.raises(NotFound):
            e.read_snapshot(snap, 0, CHUNK)
    check_all(e, "after deleting half")
    e = reopen(e)  # replay with create and delete markers in the journal
    check_all(e, "after deleting half and reopening")
    e.destage()
    assert e.stats()["journal_records"] == 0
    check_all(e, "after destaging everything")
    e = reopen(e)
    check_all(e, "after destaging everything and reopening")


def test_snapshots_journaled_piece_under_a_snapshot_survives_later_overwrites(engine, reopen):
    """A and the snapshot are in the journal; B and C overwrite the chunk after it: the
    snapshot still reads A (C must not absorb A, though it covers it, across the marker)."""
    e = engine
    v = e.volume_create("v", 4 * CHUNK)
    e.write(v, 0, b"A" * CHUNK)
    e.snapshot_create(v, "s")
    e.write(v, 100, b"B" * 100)
    e.write(v, 0, b"C" * CHUNK)
    e.write(v, CHUNK - 10, b"D" * 20)  # and one spanning two chunks
    want = bytearray(b"C" * CHUNK + bytes(3 * CHUNK))
    want[CHUNK - 10 : CHUNK + 10] = b"D" * 20
    snap_img = b"A" * CHUNK + bytes(3 * CHUNK)
    for when in ("in the journal", "after replay", "after destage"):
        if when == "after replay":
            e = reopen(e)
        elif when == "after destage":
            e.destage()
        _check_snap(e, "v", "s", snap_img, when)
        _check_volume(e, "v", bytes(want), when)


# -- O(1) preservation cost -------------------------------------------------------------------


def _copies_for_first_writes(tmp_path, nsnaps: int, nchunks: int) -> tuple[int, Engine]:
    """preserved_copies delta of destaging `nchunks` first writes after `nsnaps` snapshots."""
    path = str(tmp_path / f"pool-{nsnaps}")
    init_pool(path, journal_size=8 << 20, chunk_size=CHUNK)
    e = Engine.open(path, start_destager=False)
    v = e.volume_create("v", nchunks * CHUNK)
    e.write(v, 0, bytes([0xA5]) * (nchunks * CHUNK))
    e.destage()
    assert e.stats()["preserved_copies"] == 0  # no snapshot yet: nothing to preserve
    for i in range(nsnaps):
        e.snapshot_create(v, f"s{i}")
    e.destage()
    before = e.stats()["preserved_copies"]
    for c in range(nchunks):
        e.write(v, c * CHUNK + 17, bytes([c % 251]) * 100)  # partial: the old chunk matters
    e.destage()
    return e.stats()["preserved_copies"] - before, e


def test_snapshots_preservation_is_one_copy_per_first_write_whatever_the_snapshot_count(
    tmp_path,
):
    n = 512
    results = {}
    for nsnaps in (0, 1, 100):
        delta, e = _copies_for_first_writes(tmp_path, nsnaps, n)
        try:
            results[nsnaps] = delta
            v = e.volume("v")
            old = bytes([0xA5]) * CHUNK
            # Every snapshot still reads the old content (spot-check some chunks of each).
            snaps = e.snapshot_list(v)
            for s in snaps:
                for c in (0, 1, n // 2, n - 1):
                    assert bytes(e.read_snapshot(s, c * CHUNK, CHUNK)) == old, (nsnaps, s.name, c)
            if snaps:
                # The oldest and the newest in full.
                for s in (snaps[0], snaps[-1]):
                    assert bytes(e.read_snapshot(s, 0, n * CHUNK)) == old * n
                # Writes that are not the first to their chunk since the newest snapshot copy
                # nothing, whether destaged in a later batch or in the same one.
                before = e.stats()["preserved_copies"]
                for c in range(0, n, 3):
                    e.write(v, c * CHUNK, bytes([1]) * 512)
                e.destage()
                for c in range(0, n, 3):
                    e.write(v, c * CHUNK + 1024, bytes([2]) * 512)
                    e.write(v, c * CHUNK + 2048, bytes([3]) * 512)
                e.destage()
                assert e.stats()["preserved_copies"] == before
                for s in (snaps[0], snaps[-1]):
                    assert bytes(e.read_snapshot(s, 0, n * CHUNK)) == old * n
            slots = e.stats()["store_slots"]
            assert slots == delta, f"{nsnaps} snapshots: {slots} store slots for {delta} copies"
        finally:
            e.close()
    assert results[0] == 0, f"no snapshot, yet {results[0]} chunks were preserved"
    assert results[1] == n, f"1 snapshot: {results[1]} copies for {n} first writes"
    assert results[100] == n, (
        f"100 snapshots: {results[100]} copies for {n} first writes (1 snapshot: {results[1]})"
    )


def test_snapshots_first_writes_in_one_batch_copy_each_chunk_once(engine):
    e = engine
    v = e.volume_create("v", 16 * CHUNK)
    e.write(v, 0, b"\x11" * (16 * CHUNK))
    e.destage()
    e.snapshot_create(v, "s")
    before = e.stats()["preserved_copies"]
    # Eight chunks, each written three times before one destage; the last write spans two.
    for c in range(8):
        for k in range(3):
            e.write(v, c * CHUNK + k * 100, bytes([c + 1]) * 50)
    e.write(v, 7 * CHUNK + 4000, b"\x99" * 200)  # chunks 7 and 8
    e.destage()
    assert e.stats()["preserved_copies"] - before == 9
    assert bytes(e.read_snapshot(e.snapshot(v, "s"), 0, 16 * CHUNK)) == b"\x11" * (16 * CHUNK)


# -- delete reclaims --------------------------------------------------------------------------


def test_snapshots_delete_all_frees_every_store_slot_and_slots_are_reused(engine, reopen):
    rng = random.Random(7)
    e = engine
    size = 32 * CHUNK
    v = e.volume_create("v", size)
    m = VolModel(size)
    data = _pattern(rng, size)
    e.write(v, 0, data)
    m.write(0, data)
    e.destage()
    for i in range(5):
        e.snapshot_create(v, f"s{i}")
        m.snaps[f"s{i}"] = bytes(m.data)
        for c in rng.sample(range(32), 12):
            d = _pattern(rng, CHUNK)
            e.write(v, c * CHUNK, d)
            m.write(c * CHUNK, d)
        e.destage()
    st = e.stats()
    assert st["store_slots"] > 12 and st["store_free_slots"] == 0, st
    used_slots = st["store_slots"]
    store_path = os.path.join(e.snapshot_path, "snapstore.dat")
    blocks_before = os.stat(store_path).st_blocks
    for name in list(m.snaps):
        e.snapshot_delete(v, name)
        del m.snaps[name]
    e.destage()
    st = e.stats()
    assert st["store_free_slots"] == st["store_slots"] == used_slots, st
    if blocks_before:
        # Freed slots give their space back to the filesystem (hole punching).
        assert os.stat(store_path).st_blocks < blocks_before
    _check_volume(e, "v", bytes(m.data), "after deleting every snapshot")
    e = reopen(e)
    st = e.stats()
    assert st["store_free_slots"] == st["store_slots"], f"reopen forgot free slots: {st}"
    # A new snapshot and writes reuse the freed slots: the store does not grow.
    v = e.volume("v")
    e.snapshot_create(v, "again")
    m.snaps["again"] = bytes(m.data)
    for c in range(10):
        d = _pattern(rng, CHUNK)
        e.write(v, c * CHUNK, d)
        m.write(c * CHUNK, d)
    e.destage()
    st = e.stats()
    assert st["store_slots"] == used_slots, f"the store grew instead of reusing slots: {st}"
    assert st["store_free_slots"] == used_slots - 10, st
    _check_snap(e, "v", "again", m.snaps["again"], "in reused slots")
    _check_volume(e, "v", bytes(m.data))
    e = reopen(e)
    _check_snap(e, "v", "again", m.snaps["again"], "in reused slots, after reopening")


def test_snapshots_delete_keeps_copies_other_snapshots_need(engine):
    """Deleting the middle one of three keeps the copies serving the other two."""
    e = engine
    v = e.volume_create("v", 4 * CHUNK)
    imgs = {}
    for i, name in enumerate(("s1", "s2", "s3")):
        e.write(v, 0, bytes([i + 1]) * (4 * CHUNK))
        e.destage()
        e.snapshot_create(v, name)
        imgs[name] = bytes([i + 1]) * (4 * CHUNK)
    e.write(v, 0, b"\xff" * (4 * CHUNK))
    e.destage()
    e.snapshot_delete(v, "s2")
    e.destage()
    for name in ("s1", "s3"):
        _check_snap(e, "v", name, imgs[name], "after deleting s2")
    st = e.stats()
    # s1's and s3's copies of 4 chunks stay; s2's 4 are free.
    assert st["store_slots"] - st["store_free_slots"] == 8, st


# -- rollback ---------------------------------------------------------------------------------


def test_snapshots_rollback_to_older_keeps_newer_snapshots_and_survives_reopen(engine, reopen):
    rng = random.Random(3)
    e = engine
    size = 24 * CHUNK
    v = e.volume_create("v", size)
    m = VolModel(size)
    d = _pattern(rng, size)
    e.write(v, 0, d)
    m.write(0, d)
    e.destage()
    for i, name in enumerate(("old", "mid", "new")):
        e.snapshot_create(v, name)
        m.snaps[name] = bytes(m.data)
        for _ in range(8):
            off = rng.randrange(0, size - 3 * CHUNK)
            d = _pattern(rng, rng.randint(1, 3 * CHUNK))
            e.write(v, off, d)
            m.write(off, d)
        c = rng.randrange(0, 24)
        e.trim(v, c * CHUNK, CHUNK)  # a zeroed chunk must come back too
        m.write(c * CHUNK, bytes(CHUNK))
        if i < 2:
            e.destage()  # "new" and what follows stay in the journal
    assert e.stats()["journal_records"] > 0
    assert bytes(m.data) != m.snaps["old"]
    e.snapshot_rollback(v, "old")
    m.data[:] = m.snaps["old"]
    _check_volume(e, "v", bytes(m.data), "after rollback to old")
    for name, img in m.snaps.items():
        _check_snap(e, "v", name, img, "after rollback to old")
    assert [s.name for s in e.snapshot_list(v)] == ["old", "mid", "new"]
    # A snapshot of the rolled-back volume, then more writes.
    e.snapshot_create(v, "after")
    m.snaps["after"] = bytes(m.data)
    e.write(v, 5, b"post-rollback")
    m.write(5, b"post-rollback")
    e = reopen(e)
    _check_volume(e, "v", bytes(m.data), "after rollback and reopen")
    for name, img in m.snaps.items():
        _check_snap(e, "v", name, img, "after rollback and reopen")
    e.destage()
    e = reopen(e)
    _check_volume(e, "v", bytes(m.data), "after rollback, destage and reopen")
    for name, img in m.snaps.items():
        _check_snap(e, "v", name, img, "after rollback, destage and reopen")
    # Roll forward to the newest pre-rollback snapshot: also exact.
    v = e.volume("v")
    e.snapshot_rollback(v, "new")
    _check_volume(e, "v", m.snaps["new"], "after rollback to new")
    for name, img in m.snaps.items():
        _check_snap(e, "v", name, img, "after rollback to new")


def test_snapshots_rollback_of_fully_destaged_volume_restores_every_changed_chunk(engine):
    e = engine
    size = 16 * CHUNK
    v = e.volume_create("v", size)
    e.write(v, 0, b"\x01" * size)
    e.destage()
    e.snapshot_create(v, "s")
    e.write(v, 3 * CHUNK, b"\x02" * CHUNK)
    e.write_zeroes(v, 9 * CHUNK, 2 * CHUNK)
    e.destage()
    e.snapshot_create(v, "t")
    e.write(v, 3 * CHUNK, b"\x03" * CHUNK)  # changed again after a newer snapshot
    e.write(v, 12 * CHUNK + 5, b"\x04" * 10)
    e.destage()
    assert e.stats()["journal_records"] == 0
    n = e.snapshot_rollback(v, "s")
    assert n >= 4  # chunks 3, 9, 10, 12
    _check_volume(e, "v", b"\x01" * size, "after rollback")
    t_img = bytearray(b"\x01" * size)
    t_img[3 * CHUNK : 4 * CHUNK] = b"\x02" * CHUNK
    t_img[9 * CHUNK : 11 * CHUNK] = bytes(2 * CHUNK)
    _check_snap(e, "v", "t", bytes(t_img), "after rolling back past it")


# -- names ------------------------------------------------------------------------------------


def test_snapshots_duplicate_name_raises_already_exists_in_journal_and_catalog(engine, reopen):
    e = engine
    v = e.volume_create("v", 4 * CHUNK)
    e.snapshot_create(v, "dup")
    with pytest.raises(AlreadyExists):
        e.snapshot_create(v, "dup")  # marker still in the journal
    e.destage()
    with pytest.raises(AlreadyExists):
        e.snapshot_create(v, "dup")  # now a catalog row
    e = reopen(e)
    v = e.volume("v")
    with pytest.raises(AlreadyExists):
        e.snapshot_create(v, "dup")  # loaded from the catalog
    # The same name on another volume is fine.
    w = e.volume_create("w", 4 * CHUNK)
    e.snapshot_create(w, "dup")
    assert [s.name for s in e.snapshot_list(v)] == ["dup"]
    assert [s.name for s in e.snapshot_list(w)] == ["dup"]
    # After a delete the name is free again, and the new snapshot is a new image.
    e.write(v, 0, b"x" * CHUNK)
    e.snapshot_delete(v, "dup")
    e.snapshot_create(v, "dup")
    assert bytes(e.read_snapshot(e.snapshot(v, "dup"), 0, CHUNK)) == b"x" * CHUNK
    e = reopen(e)
    v = e.volume("v")
    assert [s.name for s in e.snapshot_list(v)] == ["dup"]
    assert bytes(e.read_snapshot(e.snapshot(v, "dup"), 0, CHUNK)) == b"x" * CHUNK


def test_snapshots_unknown_name_raises_not_found(engine):
    e = engine
    v = e.volume_create("v", 4 * CHUNK)
    e.snapshot_create(v, "there")
    with pytest.raises(NotFound):
        e.snapshot(v, "missing")
    with pytest.raises(NotFound):
        e.snapshot_delete(v, "missing")
    with pytest.raises(NotFound):
        e.snapshot_rollback(v, "missing")
    assert [s.name for s in e.snapshot_list(v)] == ["there"]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("a@b", id="at-sign"),
        pytest.param("a/b", id="slash"),
        pytest.param("@", id="only-at"),
        pytest.param("/", id="only-slash"),
        pytest.param("vol@snap", id="export-style"),
        pytest.param("", id="empty"),
        pytest.param("-lead", id="leading-dash"),
    ],
)
def test_snapshots_bad_name_raises_invalid_request(engine, name):
    e = engine
    v = e.volume_create("v", 4 * CHUNK)
    seq = e.journal.written_seq
    with pytest.raises(InvalidRequest):
        e.snapshot_create(v, name)
    assert e.snapshot_list(v) == []
    assert e.journal.written_seq == seq, "a refused snapshot must not reach the journal"


def test_batched_max_hi_matches_one_query_per_chunk(tmp_path):
    """The destager asks the index for max_hi of a whole batch's chunks at once, in groups
    of 500: across group boundaries it must agree with asking chunk by chunk."""
    from jsnap.stores.catalog import Catalog

    cat = Catalog(str(tmp_path / "pool.db"))
    rng = random.Random(7)
    rows = [(rng.choice((1, 2)), rng.randrange(2000), hi, hi) for hi in range(1, 6000)]
    with cat.transaction() as t:
        t.add_preserved(rows)
    asked = rng.sample(range(2500), 1700)  # some chunks have no row at all
    for vol in (1, 2, 3):
        want = {}
        for c in asked:
            (hi,) = cat.db.execute("SELECT max(hi) FROM preserved WHERE vol=? AND chunk=?",
                                   (vol, c)).fetchone()
            if hi is not None:
                want[c] = hi
        assert cat.max_his(vol, asked) == want
        assert cat.max_his(vol, []) == {}
    cat.close()
