"""Thin volumes: allocation on first destage, remap instead of copy, reclaim, ENOSPC, growth.

tests/core/test_model.py runs the model (with crashes) on thin volumes; these tests pin the
space behaviour that a model of bytes cannot see.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from jsnap.core.check import check_pool
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.errors import NoSpace

CS = 4096


@pytest.fixture
def pool(tmp_path):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CS, pool_size=64 * CS)
    return path


def _open(path, **kw):
    return Engine.open(path, start_destager=False, **kw)


def test_unwritten_reads_zero_and_map_reports_holes(pool):
    with _open(pool) as e:
        v = e.volume_create("t", 1 << 20, thin=True)
        e.write(v, 3 * CS + 100, b"a" * 200)
        # journaled: exactly the written bytes are data
        assert e.extents(v, 0, 8 * CS) == [(3 * CS + 100, 3), (200, 0), (5 * CS - 300, 3)]
        e.destage()
        assert e.pool.used == 1
        assert e.extents(v, 0, 8 * CS) == [(3 * CS, 3), (CS, 0), (4 * CS, 3)]
        assert bytes(e.read(v, 0, 3 * CS)) == bytes(3 * CS)
        got = bytes(e.read(v, 3 * CS, CS))
        assert got == bytes(100) + b"a" * 200 + bytes(CS - 300)


def test_full_chunk_overwrite_after_snapshot_remaps_without_copy(pool):
    with _open(pool) as e:
        v = e.volume_create("t", 16 * CS, thin=True)
        e.write(v, 0, b"1" * 8 * CS)
        e.destage()
        e.snapshot_create(v, "s")
        e.write(v, 0, b"2" * 4 * CS)  # whole chunks: the old extents move to the snapshot
        e.write(v, 4 * CS + 10, b"3")  # partial: the one copy
        e.destage()
        assert e.backlog.preserved_copies == 1
        assert e.pool.used == 8 + 5
        s = e.snapshot(v, "s")
        assert bytes(e.read_snapshot(s, 0, 8 * CS)) == b"1" * 8 * CS
        assert bytes(e.read(v, 0, 4 * CS)) == b"2" * 4 * CS
        assert bytes(e.read(v, 4 * CS, CS)) == b"1" * 10 + b"3" + b"1" * (CS - 11)
        assert check_pool(e) == ([], [])


def test_trim_and_zero_reclaim_whole_chunks(pool):
    with _open(pool) as e:
        v = e.volume_create("t", 16 * CS, thin=True)
        e.write(v, 0, b"x" * 16 * CS)
        e.destage()
        assert e.pool.used == 16
        e.trim(v, CS // 2, 4 * CS)  # chunks 1-3 whole; 0 and 4 partial
        e.write_zeroes(v, 8 * CS, 2 * CS)  # hole zeroes: reclaimed too
        e.write_zeroes(v, 12 * CS, 2 * CS, no_hole=True)  # NO_HOLE: stays allocated
        e.destage()
        assert e.pool.used == 16 - 3 - 2
        want = bytearray(b"x" * 16 * CS)
        want[CS // 2 : CS // 2 + 4 * CS] = bytes(4 * CS)
        want[8 * CS : 10 * CS] = bytes(2 * CS)
        want[12 * CS : 14 * CS] = bytes(2 * CS)
        assert bytes(e.read(v, 0, 16 * CS)) == bytes(want)
        # With a snapshot, a trim hands the extents to it instead (no copy, no free).
        e.snapshot_create(v, "s")
        copies = e.backlog.preserved_copies
        e.trim(v, 0, 16 * CS)
        e.destage()
        assert e.backlog.preserved_copies == copies
        assert e.volume("t").thin.mapped == 0  # type: ignore[union-attr]
        assert bytes(e.read_snapshot(e.snapshot(v, "s"), 0, 16 * CS)) == bytes(want)
        e.snapshot_delete(v, "s")
        e.destage()
        assert e.pool.used == 0
        assert check_pool(e) == ([], [])


def test_enospc_then_reclaim_then_write_again(pool):
    """Fill a 64-extent pool through snapshots until ENOSPC; nothing acknowledged is lost;
    deleting the snapshot and trimming make room again."""
    e = Engine.open(pool)  # destager thread on: writes wait for it, as when serving
    try:
        v = e.volume_create("t", 1 << 20, thin=True)
        data = {}
        rng = random.Random(1)
        e.write(v, 0, b"a" * 32 * CS)
        for c in range(32):
            data[c] = b"a" * CS
        e.snapshot_create(v, "s")
        with pytest.raises(NoSpace):
            for c in rng.sample(range(256), 256):
                buf = rng.randbytes(CS)
                e.write(v, c * CS, buf)
                data[c] = buf
        e.wait_destaged()
        assert e.failed is None
        for c, buf in data.items():
            assert bytes(e.read(v, c * CS, CS)) == buf, f"chunk {c} lost"
        assert check_pool(e) == ([], [])
        e.snapshot_delete(v, "s")
        e.trim(v, 0, 1 << 20)
        e.wait_destaged()
        assert e.pool.used == 0
        e.write(v, 0, b"b" * 64 * CS)  # the whole pool again
        e.wait_destaged()
        assert bytes(e.read(v, 63 * CS, CS)) == b"b" * CS
    finally:
        e.close()


@pytest.mark.parametrize("size,offset", [
    pytest.param(16 * CS, 0, id="64K aligned"),
    pytest.param(64 * CS, 0, id="the whole pool, aligned"),
    pytest.param(16 * CS, 5 * CS + 512, id="64K unaligned"),
    pytest.param(CS, 7 * CS, id="4K"),
    pytest.param(100, 3 * CS + 5, id="100 bytes"),
])
def test_a_full_pool_takes_overwrites_of_chunks_the_volume_owns(pool, size, offset):
    """Issue 25: large aligned writes take fresh extents (REMAP); on a full pool they fall
    back to the journaled path, which needs no extent for a chunk the volume alone owns. A
    write that does need one (a hole, a chunk a snapshot shares) still gets ENOSPC."""
    e = Engine.open(pool)
    try:
        v = e.volume_create("t", 1 << 20, thin=True)
        model = bytearray(os.urandom(64 * CS))
        for off in range(0, 64 * CS, 16 * CS):  # 64 KiB aligned: every extent, by REMAP
            e.write(v, off, model[off : off + 16 * CS])
        e.wait_destaged()
        assert e.pool.available() == 0
        with pytest.raises(NoSpace):
            e.write(v, 64 * CS, bytes(16 * CS))  # a hole: needs extents
        data = os.urandom(size)
        e.write(v, offset, data)
        model[offset : offset + size] = data
        e.wait_destaged()
        assert e.failed is None
        assert bytes(e.read(v, 0, 64 * CS)) == model
        e.snapshot_create(v, "s")  # now the chunks are shared: an overwrite needs new ones
        with pytest.raises(NoSpace):
            e.write(v, 0, bytes(16 * CS))
        e.wait_destaged()
        assert bytes(e.read(v, 0, 64 * CS)) == model
        assert check_pool(e) == ([], [])
    finally:
        e.close()


def test_reservations_hold_under_concurrent_writes_and_snapshots(pool):
    """Writers race snapshot creates on a nearly full pool; the destager never runs out of
    extents (T1), and every acknowledged write reads back."""
    e = Engine.open(pool)
    try:
        v = e.volume_create("t", 256 * CS, thin=True)
        acked: dict[int, bytes] = {}
        lock = threading.Lock()

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                c = rng.randrange(256)
                buf = rng.randbytes(CS)
                try:
                    e.write(v, c * CS, buf)
                except NoSpace:
                    continue
                with lock:
                    acked[c] = buf  # last acknowledged writer of c wins in order of acks
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for i in range(20):
            try:
                e.snapshot_create(v, f"s{i}")
            except NoSpace:
                pass
            if i % 4 == 3:
                e.snapshot_delete(v, f"s{i - 2}")
        for t in threads:
            t.join()
        e.wait_destaged()
        assert e.failed is None, e.failed
        assert check_pool(e) == ([], [])
        assert e.pool.reserved == 0
    finally:
        e.close()


def test_write_that_waited_for_space_behind_a_snapshot_reserves_its_extent(pool):
    """A write to a chunk it may overwrite in place finds no extent to reserve; if it then
    waits for journal space and a snapshot slips in first, its record lands after the
    snapshot and must reserve the extent its destage will take (T1)."""
    with _open(pool) as e:
        v = e.volume_create("t", 16 * CS, thin=True)
        filler = e.volume_create("f", 16 * CS)  # raw: fills the journal, reserves nothing
        e.write(v, 0, b"a" * CS)
        e.destage()  # chunk 0 is mapped: later writes to it go in place
        j = e.journal
        rec = 64 + CS
        while j.capacity - j.used - j.marker_reserve - 64 > 2 * rec:
            e.write(filler, 0, b"f" * CS)
        e.write(filler, 0, b"f" * CS)  # now a 4 KiB record no longer fits
        writer = threading.Thread(target=e.write, args=(v, 0, b"b" * CS))
        writer.start()
        deadline = time.monotonic() + 10
        while e.stats()["journal_waiters"] == 0:
            assert time.monotonic() < deadline, "the writer never waited for journal space"
            time.sleep(0.002)
        e.snapshot_create(v, "s")
        e.destage(len(e.backlog.pending))  # frees the space the writer waits for, and no more
        writer.join(10)
        assert not writer.is_alive()
        assert e.pool.reserved == 1, "the write after the snapshot reserved no extent"
        e.destage()
        assert bytes(e.read(v, 0, CS)) == b"b" * CS
        assert bytes(e.read_snapshot(e.snapshot(v, "s"), 0, CS)) == b"a" * CS
        assert e.pool.reserved == 0
        assert check_pool(e) == ([], [])


def test_resize_grows_and_persists(pool):
    with _open(pool) as e:
        v = e.volume_create("t", 4 * CS, thin=True)
        r = e.volume_create("r", 4 * CS)
        e.write(v, 0, b"v" * CS)
        e.volume_resize("t", 8 * CS)
        e.volume_resize("r", 8 * CS)
        e.write(v, 7 * CS, b"w" * CS)
        e.write(r, 7 * CS, b"w" * CS)
    with _open(pool) as e:
        v, r = e.volume("t"), e.volume("r")
        assert v.size == r.size == 8 * CS
        assert bytes(e.read(v, 6 * CS, 2 * CS)) == bytes(CS) + b"w" * CS
        assert bytes(e.read(r, 6 * CS, 2 * CS)) == bytes(CS) + b"w" * CS


def test_pool_grow_online_by_capacity_and_by_new_file(pool, tmp_path):
    e = Engine.open(pool)
    try:
        v = e.volume_create("t", 1 << 20, thin=True)
        e.write(v, 0, b"a" * 64 * CS)
        with pytest.raises(NoSpace):
            e.write(v, 64 * CS, b"b" * CS)
        e.pool_grow(16 * CS)
        e.write(v, 64 * CS, b"b" * 16 * CS)
        with pytest.raises(NoSpace):
            e.write(v, 80 * CS, b"c" * CS)
        extra = str(tmp_path / "extra.dat")
        e.pool_grow(32 * CS, extra)
        e.write(v, 80 * CS, b"c" * 32 * CS)
        e.wait_destaged()
        assert os.path.getsize(extra) >= 32 * CS
        assert check_pool(e) == ([], [])
    finally:
        e.close()
    with _open(pool) as e:
        v = e.volume("t")
        assert bytes(e.read(v, 80 * CS, 32 * CS)) == b"c" * 32 * CS
        assert e.pool.capacity() == 64 + 16 + 32


def test_check_reports_double_owner_and_leak(pool):
    with _open(pool) as e:
        v = e.volume_create("t", 8 * CS, thin=True)
        e.write(v, 0, b"a" * 2 * CS)
        e.destage()
        ext = e.volume("t").thin.get(0)  # type: ignore[union-attr]
        db = e.catalog.db
        db.execute("INSERT INTO thin_map (vol, chunk, ext, seq) VALUES (?, 5, ?, 1)",
                   (v.id, ext))
        db.execute("DELETE FROM thin_map WHERE vol=? AND chunk=1", (v.id,))
    with _open(pool) as e:
        problems, _ = check_pool(e)
        assert any("owned 2 times" in p for p in problems), problems
        e.pool.take()  # an extent nobody owns: what a lost map update would leave
        assert any("leaked" in p for p in check_pool(e)[0]), check_pool(e)


@pytest.mark.parametrize("span", [64 * 4096, 3 * 4096 * 16])  # sparse pages / dense pages
def test_thin_map_matches_a_dict(span):
    from jsnap.stores.thin import ThinMap

    m, ref = ThinMap(), {}
    rng = random.Random(span)
    for _ in range(20000):
        c = rng.randrange(span)
        if rng.random() < 0.3:
            m.delete(c)
            ref.pop(c, None)
        else:
            ext, seq = rng.randrange(1 << 40), rng.randrange(1 << 40)
            m.set(c, ext, seq)
            ref[c] = (ext, seq)
    assert m.mapped == len(ref)
    assert dict(m.items()) == {c: v[0] for c, v in ref.items()}
    for c in range(0, span, 7):
        assert (m.get(c), m.seq_if_mapped(c)) == ref.get(c, (-1, None))
    lo, hi = span // 5, span // 2
    assert list(m.mapped_in(lo, hi)) == sorted((c, v[0]) for c, v in ref.items() if lo <= c <= hi)


def test_check_repair_deletes_rows_of_deleted_volumes_only(pool):
    import subprocess
    import sys

    with _open(pool) as e:
        v = e.volume_create("t", 8 * CS, thin=True)
        e.write(v, 0, b"a" * 2 * CS)
        e.snapshot_create(v, "s")
        e.write(v, 0, b"b" * CS)
        e.destage()
        db = e.catalog.db  # what a crash inside an old, buggy delete could have left
        db.execute("INSERT INTO thin_map (vol, chunk, ext, seq) VALUES (99, 0, 1000, 1)")
        db.execute("INSERT INTO preserved (vol, chunk, hi, slot) VALUES (99, 0, 5, 7)")

    def jsnap(*args):
        return subprocess.run([sys.executable, "-m", "jsnap", "-p", pool, "check", *args],
                              capture_output=True, text=True)

    p = jsnap()
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 preserved copies belong to no volume" in p.stdout
    assert "1 thin map entries belong to no volume" in p.stdout
    p = jsnap("--repair")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "repaired: deleted 1 thin map entries of deleted volumes" in p.stdout
    assert "pool is consistent" in p.stdout
    with _open(pool) as e:
        v = e.volume("t")
        assert bytes(e.read(v, 0, 2 * CS)) == b"b" * CS + b"a" * CS
        assert bytes(e.read_snapshot(e.snapshot(v, "s"), 0, 2 * CS)) == b"a" * 2 * CS


def test_short_last_chunk_tail_reads_zero_after_resize(pool):
    """A write that reaches the end of a volume whose size is not a chunk multiple does not
    cover the chunk's extent: the part past the end must be zeroed, or a later resize would
    expose another volume's old bytes from a reused extent."""
    with _open(pool) as e:
        a = e.volume_create("a", 4 * CS, thin=True)
        e.write(a, 0, b"\xff" * 4 * CS)
        e.destage()
        e.trim(a, 0, 4 * CS)
        e.destage()  # four extents full of 0xff back on the free list
        b = e.volume_create("b", CS + CS // 2, thin=True)
        e.write(b, CS, b"b" * (CS // 2))  # up to the end of b: its whole visible chunk
        e.destage()
        e.volume_resize("b", 2 * CS)
        assert bytes(e.read(b, CS, CS)) == b"b" * (CS // 2) + bytes(CS // 2)
        e.trim(b, 0, 2 * CS)  # the old size is gone: now chunk 1 is whole and unmapped
        e.destage()
        assert e.volume("b").thin.mapped == 0  # type: ignore[union-attr]


def test_pool_release_truncates_the_unused_tail_and_keeps_reserved_extents(tmp_path):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CS, pool_size=1024 * CS)
    with _open(path) as e:
        v = e.volume_create("t", 1 << 20, thin=True)
        e.write(v, 0, b"a" * 10 * CS)
        e.destage()
        data = e.pool.files[0].path
        assert os.path.getsize(data) == 1024 * CS  # grown one step ahead of need
        e.trim(v, 3 * CS, 3 * CS)  # three free extents in the middle
        e.destage()
        e.write(v, 40 * CS, b"r" * 3 * CS)  # journaled: 3 extents reserved, none taken
        assert e.pool_release() == (1024 - 10) * CS  # the middle ones cover the reservation
        assert os.path.getsize(data) == 10 * CS
        assert e.pool_release() == 0
        e.write(v, 50 * CS, b"g" * CS)  # the file grows again when it must
        e.destage()
        assert check_pool(e) == ([], [])
    with _open(path) as e:
        v = e.volume("t")
        assert bytes(e.read(v, 0, 3 * CS)) == b"a" * 3 * CS
        assert bytes(e.read(v, 3 * CS, 3 * CS)) == bytes(3 * CS)
        assert bytes(e.read(v, 40 * CS, 3 * CS)) == b"r" * 3 * CS
        assert bytes(e.read(v, 50 * CS, CS)) == b"g" * CS
        assert check_pool(e) == ([], [])
