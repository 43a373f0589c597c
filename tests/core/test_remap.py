"""Redirect-on-write of large chunk-aligned writes to thin volumes (journal.REMAP).

The data goes to fresh pool extents before a small journal record names them; the destager
maps them in place of the old extents, which serve snapshots without a copy. These tests check
reads against a byte model (volume and every snapshot, before and after destage and reopen),
the extent accounting (`check_thin`), and the crash cases: data that never reached the disk
behind a durable record, a crash after the batch commit, a volume deleted with REMAP records
pending.
"""

from __future__ import annotations

import random

import pytest
from crashfs import CrashFS

from jsnap.core import backlog as backlog_mod
from jsnap.core.check import check_thin
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.core.writes import REMAP_MIN
from jsnap.stores import journal as jn

CS = 16 * 1024
SIZE = 64 * CS  # 1 MiB
BIG = 16 * CS  # 256 KiB: redirected
assert BIG >= REMAP_MIN


class SimulatedCrash(Exception):
    pass


def pattern(tag: int, n: int) -> bytes:
    return bytes((tag * 37 + i * 7) % 251 + 1 for i in range(n))


def make_pool(tmp_path, durability: str = "sync") -> str:
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=4 << 20, chunk_size=CS, durability=durability)
    return path


def kinds(e: Engine) -> list[int]:
    return [r.kind for r in e.backlog.pending]


def test_large_aligned_write_is_remapped_and_snapshots_need_no_copy(tmp_path):
    path = make_pool(tmp_path)
    e = Engine.open(path, start_destager=False)
    v = e.volume_create("v", SIZE, thin=True)
    old = pattern(1, SIZE)
    e.write(v, 0, old)
    assert kinds(e) == [jn.REMAP]
    assert e.read(v, 0, SIZE) == old  # from the extents, through the changes table
    e.destage()
    assert e.read(v, 0, SIZE) == old
    e.snapshot_create(v, "s")
    new = bytearray(old)
    new[0:BIG] = pattern(2, BIG)
    e.write(v, 0, pattern(2, BIG))
    e.write(v, 5000, pattern(3, 100))  # a small write over the remapped chunk
    new[5000:5100] = pattern(3, 100)
    snap = e.snapshot(v, "s")
    assert e.read(v, 0, SIZE) == new
    assert e.read_snapshot(snap, 0, SIZE) == old
    e.destage()
    assert e.read(v, 0, SIZE) == new
    assert e.read_snapshot(snap, 0, SIZE) == old
    assert e.backlog.preserved_copies == 0, "a whole-chunk rewrite moves old chunks, no copy"
    assert check_thin(e) == []
    e.close()
    e = Engine.open(path, start_destager=False)
    v = e.volume("v")
    assert e.read(v, 0, SIZE) == new
    assert e.read_snapshot(e.snapshot(v, "s"), 0, SIZE) == old
    assert check_thin(e) == []
    e.snapshot_delete(v, "s")
    e.destage()
    assert check_thin(e) == []
    assert e.pool_stats()["pool_preserved"] == 0
    e.close()


def test_a_remap_of_many_chunks_leaves_no_piece_behind(tmp_path):
    """A REMAP record is indexed one piece per chunk, however many chunks it spans: the
    destage must forget every one (a stale piece would name an extent freed later)."""
    path = make_pool(tmp_path)
    e = Engine.open(path, start_destager=False)
    size = 2 << 20
    v = e.volume_create("v", size, thin=True)
    e.write(v, 0, pattern(1, size))  # 128 chunks in one record
    assert kinds(e) == [jn.REMAP]
    e.destage()
    assert e.changes.npieces == 0 and not e.changes.volumes
    e.write(v, 0, pattern(2, size))
    e.destage()  # frees the first extents ...
    e.write(v, 0, pattern(3, BIG))  # ... which this one may take
    e.destage()
    assert e.changes.npieces == 0
    assert e.read(v, 0, size) == pattern(3, BIG) + pattern(2, size)[BIG:]
    assert check_thin(e) == []
    e.close()


def test_unaligned_or_small_writes_and_raw_volumes_stay_in_the_journal(tmp_path):
    path = make_pool(tmp_path)
    e = Engine.open(path, start_destager=False)
    v = e.volume_create("v", SIZE, thin=True)
    r = e.volume_create("r", SIZE)
    e.write(v, 512, pattern(1, BIG))  # not chunk aligned
    e.write(v, 0, pattern(2, REMAP_MIN - CS))  # aligned, below REMAP_MIN
    e.write(r, 0, pattern(3, BIG))  # raw volume
    assert jn.REMAP not in kinds(e)
    e.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_mix_matches_the_model_across_destage_and_reopen(tmp_path, seed):
    rng = random.Random(seed)
    path = make_pool(tmp_path)
    fs = CrashFS(seed)
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE, thin=True)
    model = bytearray(SIZE)
    snaps: dict[str, bytes] = {}
    tag = 0

    def verify() -> None:
        vol = e.volume("v")
        assert e.read(vol, 0, SIZE) == model
        for name, image in snaps.items():
            assert e.read_snapshot(e.snapshot(vol, name), 0, SIZE) == image, name

    for step in range(60):
        op = rng.random()
        v = e.volume("v")
        if e.backlog.remap_bytes > 2 << 20:  # no destager thread: a writer would wait for ever
            e.destage()
        tag += 1
        if op < 0.35:
            n = rng.randrange(16, 65) * CS
            off = rng.randrange(0, SIZE - n + 1) // CS * CS
            e.write(v, off, pattern(tag, n))
            model[off : off + n] = pattern(tag, n)
        elif op < 0.55:
            n = rng.randrange(1, 3 * CS)
            off = rng.randrange(0, SIZE - n)
            e.write(v, off, pattern(tag, n))
            model[off : off + n] = pattern(tag, n)
        elif op < 0.62:
            n = rng.randrange(1, 20) * CS
            off = rng.randrange(0, SIZE - n + 1) // CS * CS
            e.trim(v, off, n)
            model[off : off + n] = bytes(n)
        elif op < 0.72:
            name = f"s{step}"
            e.snapshot_create(v, name)
            snaps[name] = bytes(model)
        elif op < 0.77 and snaps:
            name = rng.choice(sorted(snaps))
            e.snapshot_delete(v, name)
            del snaps[name]
        elif op < 0.90:
            e.destage(rng.randrange(1, 6))
            assert check_thin(e) == [] or e.backlog.pending
        elif op < 0.95:  # power cut: sync mode acknowledged everything durably
            e.abandon()
            fs.crash(rng.choice(["drop", "tear"]))
            e = Engine.open(path, start_destager=False, opener=fs)
        else:
            e.close()
            e = Engine.open(path, start_destager=False, opener=fs)
        verify()
    e.destage()
    verify()
    assert check_thin(e) == []
    e.close()


POINTS = ["preserve-copied", "preserve-synced", "index-committed", "production-written",
          "production-synced", "checkpoint-saved"]


@pytest.mark.parametrize("mode", ["drop", "tear"])
@pytest.mark.parametrize("point", POINTS)
def test_crash_in_a_remap_batch_keeps_volume_snapshot_and_extents(tmp_path, point, mode):
    path = make_pool(tmp_path)
    fs = CrashFS(seed=hash((point, mode)) & 0xFFFF)
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE, thin=True)
    old = pattern(1, SIZE)
    e.write(v, 0, old)
    e.destage()
    e.snapshot_create(v, "s")
    assert e.destage(1) == 1  # the marker alone
    new = bytearray(old)
    for off, n, tag in [(0, BIG, 2), (0, 2 * BIG, 3), (3 * BIG, BIG, 4)]:
        e.write(v, off, pattern(tag, n))  # the same chunks twice within one batch
        new[off : off + n] = pattern(tag, n)
    later = pattern(5, BIG)

    def hook(name: str) -> None:
        if name == point:
            # A writer takes the extents the batch just freed (if any) and overwrites them:
            # replay must not then judge the committed records by their old extents' bytes.
            e.write(e.volume("v"), 2 * BIG, later)
            raise SimulatedCrash(name)

    e.crashpoint = hook
    with pytest.raises(SimulatedCrash):
        e.destage()
    new[2 * BIG : 3 * BIG] = later
    e.abandon()
    fs.crash(mode)
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume("v")
    snap = e.snapshot(v, "s")
    assert e.read(v, 0, SIZE) == new, "acknowledged writes lost or torn"
    assert e.read_snapshot(snap, 0, SIZE) == old
    assert check_thin(e) == []
    e.destage()
    assert e.read(v, 0, SIZE) == new
    assert e.read_snapshot(snap, 0, SIZE) == old
    assert check_thin(e) == []
    e.close()
    e = Engine.open(path, start_destager=False, opener=fs)
    assert e.read(e.volume("v"), 0, SIZE) == new
    assert check_thin(e) == []
    e.close()


@pytest.mark.parametrize("torn", [1, 20])  # 20: more than replay checks ahead
def test_record_durable_before_its_data_is_a_torn_tail(tmp_path, torn):
    """Writeback mode: the journal page of a REMAP record may reach the disk before the data
    (kernel writeback); replay checks the data's CRC and ends the log there."""
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=8 << 20, chunk_size=CS, durability="writeback")
    fs = CrashFS()
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE, thin=True)
    e.write(v, 0, pattern(1, BIG))
    e.flush()
    for i in range(torn):
        e.write(v, BIG, pattern(2 + i, BIG))  # data never synced ...
    e.write(v, 0, pattern(3, 100))  # ... and a small write after it
    e.jfile.sync()  # ... but both records are on disk
    e.abandon()
    fs.crash("drop")
    e = Engine.open(path, start_destager=False, opener=fs)
    assert "remapped data" in e.journal.replay_end
    assert len(e.backlog.pending) == 1, "the log must end at the first record whose data is torn"
    v = e.volume("v")
    assert e.read(v, 0, 2 * BIG) == pattern(1, BIG) + bytes(BIG)
    assert check_thin(e) == []
    e.write(v, BIG, pattern(4, BIG))  # the journal goes on from the cut
    e.destage()
    assert e.read(v, 0, 2 * BIG) == pattern(1, BIG) + pattern(4, BIG)
    assert check_thin(e) == []
    e.close()


def test_flush_makes_remapped_data_durable(tmp_path):
    path = make_pool(tmp_path, durability="writeback")
    fs = CrashFS()
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE, thin=True)
    e.write(v, 0, pattern(1, BIG))
    e.write(v, BIG, pattern(2, BIG), fua=True)
    e.abandon()
    fs.crash("drop")
    e = Engine.open(path, start_destager=False, opener=fs)
    assert e.read(e.volume("v"), 0, 2 * BIG) == pattern(1, BIG) + pattern(2, BIG)
    e.close()


@pytest.mark.parametrize("crash", [False, True])
def test_deleting_a_volume_with_remap_records_pending_frees_their_extents(tmp_path, crash):
    path = make_pool(tmp_path)
    fs = CrashFS()
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE, thin=True)
    e.write(v, 0, pattern(1, SIZE))
    e.volume_delete("v")
    if crash:
        e.abandon()
        fs.crash("drop")
        e = Engine.open(path, start_destager=False, opener=fs)
    e.destage()
    assert check_thin(e) == []
    assert e.pool_stats()["pool_allocated"] == 0
    e.close()


@pytest.mark.parametrize("journal_size, cap", [(1 << 20, None), (4 << 20, 1 << 20)])
def test_pending_remapped_bytes_are_bounded(tmp_path, monkeypatch, journal_size, cap):
    """Replay reads a pending REMAP record's data to check it: a writer waits (like on a
    full journal) rather than leave more than the journal's size, or REMAP_MAX_PENDING if
    smaller, pending."""
    if cap is not None:
        monkeypatch.setattr(backlog_mod, "REMAP_MAX_PENDING", cap)
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=journal_size, chunk_size=CS, durability="writeback")
    e = Engine.open(path)  # with the destager thread
    v = e.volume_create("v", 64 << 20, thin=True)
    assert e.backlog.remap_limit == min(e.journal.capacity, cap or e.journal.capacity)
    seen = 0
    for i in range(64 << 20 >> 18):
        e.write(v, i << 18, pattern(i, BIG))
        seen = max(seen, e.backlog.remap_bytes)
    assert BIG <= seen <= e.backlog.remap_limit
    e.wait_destaged()
    assert e.backlog.remap_bytes == 0
    assert e.read(v, 5 << 18, BIG) == pattern(5, BIG)
    e.close()
