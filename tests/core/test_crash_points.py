"""Deterministic crashes at the destager's and journal's dangerous points (DESIGN invariants 1-6).

Each test stops the engine at a named point (Engine.crashpoint raises), throws away what a power
cut would lose (CrashFS drops or tears unsynced writes), reopens the pool and checks that the
volume and its snapshot read exactly what was acknowledged, before and after destaging again.
"""

from __future__ import annotations

import concurrent.futures
import os

import pytest
from crashfs import CrashFS

from jsnap.core import destager as destager_mod
from jsnap.core import writes as writes_mod
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.core.volumes import Volume

pytestmark = pytest.mark.crash

CHUNK = 4096
SIZE = 16 * CHUNK
POINTS = [
    "preserve-copied",  # copies written, not synced (invariant 1: production untouched)
    "preserve-synced",  # copies durable, index not committed (invariant 1)
    "index-committed",  # index durable, production not yet written (invariant 1)
    "production-written",  # production written, not synced (invariant 2)
    "production-synced",  # production durable, checkpoint not moved (invariants 2 and 5)
    "checkpoint-saved",  # checkpoint durable, journal space not yet released in memory
]


class SimulatedCrash(Exception):
    pass


def crash_at(point: str):
    def hook(name: str) -> None:
        if name == point:
            raise SimulatedCrash(name)

    return hook


def pattern(tag: int, n: int) -> bytes:
    return bytes((tag * 37 + i * 7) % 251 + 1 for i in range(n))


@pytest.fixture
def crashpool(tmp_path):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CHUNK, durability="sync")
    return path


def reopen(path: str, fs: CrashFS, e: Engine, mode: str) -> Engine:
    e.abandon()
    fs.crash(mode)
    return Engine.open(path, start_destager=False, opener=fs)


def reopen_and_check(path: str, fs: CrashFS, e: Engine, mode: str, want: bytes,
                     old: bytes, copies: int | None = None) -> None:
    """After a crash: volume "v" and its snapshot "s" read what was acknowledged, before and
    after destaging again and after a clean reopen; `copies`: raw store slots in use."""
    e = reopen(path, fs, e, mode)
    v = e.volume("v")
    snap = e.snapshot(v, "s")
    assert e.read(v, 0, SIZE) == want, "acknowledged writes lost or torn"
    assert e.read_snapshot(snap, 0, SIZE) == old, "snapshot lost its old content"
    e.destage()
    assert e.read(v, 0, SIZE) == want
    assert e.read_snapshot(snap, 0, SIZE) == old, "replay preserved new data as old (inv. 5)"
    if copies is not None:
        got = e.stats()["store_slots"] - e.stats()["store_free_slots"]
        assert got == copies, f"each touched chunk preserved once: {copies} slots, got {got}"
    e.close()
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume("v")
    assert e.read(v, 0, SIZE) == want
    assert e.read_snapshot(e.snapshot(v, "s"), 0, SIZE) == old
    e.close()


@pytest.mark.parametrize("mode", ["drop", "tear"])
@pytest.mark.parametrize("point", POINTS)
def test_destage_crash_keeps_volume_and_snapshot(crashpool, point, mode):
    fs = CrashFS(seed=hash((point, mode)) & 0xFFFF)
    e = Engine.open(crashpool, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE)
    old = pattern(1, SIZE)
    e.write(v, 0, old)
    e.destage()  # `old` is now production's content
    e.snapshot_create(v, "s")
    assert e.destage(1) == 1  # the marker alone: the crash below hits the batch of writes
    new = bytearray(old)
    for off, n, tag in [(100, 5000, 2), (3 * CHUNK, CHUNK, 3), (10 * CHUNK - 7, 9000, 4)]:
        e.write(v, off, pattern(tag, n))
        new[off : off + n] = pattern(tag, n)
    e.crashpoint = crash_at(point)
    with pytest.raises(SimulatedCrash):
        e.destage()
    reopen_and_check(crashpool, fs, e, mode, bytes(new), old, copies=7)


def snapshotted(path: str, fs: CrashFS, thin: bool) -> tuple[Engine, Volume, bytes]:
    """Volume "v" holding `old` in production, and snapshot "s" of it (marker journaled)."""
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE, thin=thin)
    old = pattern(1, SIZE)
    e.write(v, 0, old)
    e.destage()
    e.snapshot_create(v, "s")
    return e, v, old


class LazySync(concurrent.futures.Future):
    """The destager's pipelined sync on the slowest disk: it runs only when its result is
    needed, so the batches written after it stay unsynced until then."""

    def __init__(self, fn, *args) -> None:
        super().__init__()
        self.call = (fn, args)

    def result(self, timeout=None):
        if self.call is not None:
            fn, args = self.call
            self.call = None
            try:
                self.set_result(fn(*args))
            except BaseException as exc:
                self.set_exception(exc)
        return super().result(timeout)


class LazyExecutor:
    def submit(self, fn, *args):
        return LazySync(fn, *args)


@pytest.mark.parametrize("mode", ["drop", "tear"])
@pytest.mark.parametrize("thin", [False, True])
def test_pipelined_batches_crash_before_their_sync(crashpool, mode, thin, monkeypatch):
    """The destager thread writes batch N+1 in place before batch N is synced (destager
    module doc): a crash then loses or tears both, and replay re-applies them in order."""
    monkeypatch.setattr(destager_mod, "MAX_WRITTEN", 2)
    monkeypatch.setattr(writes_mod, "REMAP_MIN", CHUNK)  # a whole chunk of a thin volume
    fs = CrashFS(seed=hash((mode, thin)) & 0xFFFF)
    e, v, old = snapshotted(crashpool, fs, thin)
    d = destager_mod.Destager(e.backlog)
    d._syncer = LazyExecutor()  # type: ignore[assignment]
    want = bytearray(old)
    synced = []
    for tag in range(2, 9):  # one batch each: chunks 0, 1, 3 and 9 rewritten every time
        for off, n in [(tag * 100, 5000), (3 * CHUNK + 1, CHUNK - 1), (9 * CHUNK + tag, 3000)]:
            e.write(v, off, pattern(tag, n))
            want[off : off + n] = pattern(tag, n)
        d.run_batch(pipeline=True)
        synced.append(e.catalog.get_int("checkpoint_seq"))
    # The marker and the first writes committed rows and so completed what came before;
    # the later batches wrote in place and waited for their syncs, at most MAX_WRITTEN + 1.
    assert 2 <= len(d._written) <= 3, "in-place batches are waiting for their sync"
    assert synced[-1] > synced[0], "the checkpoint moved as group syncs ended"
    assert synced[-1] <= e.journal.next_seq - 6, "the last batches are not checkpointed"
    # Thin: a REMAP of chunk 1 commits a map row, so the unsynced batches that wrote chunk 1
    # in place complete first; else replay would re-apply them into the new extent. (No
    # forced wait for the sync here: only that rule can complete them.)
    monkeypatch.setattr(destager_mod, "MAX_WRITTEN", 100)
    e.write(v, CHUNK, pattern(20, CHUNK))
    want[CHUNK : 2 * CHUNK] = pattern(20, CHUNK)
    d.run_batch(pipeline=True)
    # Raw: chunks 0, 1, 3 and 9 were preserved once each.
    reopen_and_check(crashpool, fs, e, mode, bytes(want), old, copies=None if thin else 4)


class StartedSync(concurrent.futures.Future):
    """A pipelined sync that covers what was written when it started, not what came after
    (a real fdatasync racing later writes): at submit it notes each file's unsynced writes;
    its result makes only those durable."""

    def __init__(self, fs: CrashFS) -> None:
        super().__init__()
        self.fs, self.covered = fs, {path: list(log.undo) for path, log in fs.logs.items()}

    def result(self, timeout=None):
        if not self.done():
            for path, entries in self.covered.items():
                ids = {id(u) for u in entries}  # a sync since may have taken some already
                log = self.fs.logs[path]
                log.undo = [u for u in log.undo if id(u) not in ids]
            self.set_result(None)
        return super().result(timeout)


class StartedSyncs:
    def __init__(self, fs: CrashFS) -> None:
        self.fs = fs

    def submit(self, fn, *args):
        return StartedSync(self.fs)


@pytest.mark.parametrize("mode", ["drop", "tear"])
@pytest.mark.parametrize("thin", [False, True])
@pytest.mark.parametrize("point", POINTS)
def test_copy_batch_completes_the_pipelined_batches_before_it(crashpool, point, thin, mode,
                                                              monkeypatch):
    """A batch with copies first completes the in-place batches written before it, whose
    sync is still running (destager module doc): a power cut at any of its points loses
    nothing acknowledged, and replay never writes an older batch over its new extents."""
    monkeypatch.setattr(destager_mod, "MAX_WRITTEN", 100)
    fs = CrashFS(seed=hash((point, thin, mode)) & 0xFFFF)
    e, v, old = snapshotted(crashpool, fs, thin)
    e.destage()  # the marker
    d = destager_mod.Destager(e.backlog)
    d._syncer = StartedSyncs(fs)  # type: ignore[assignment]
    want = bytearray(old)

    def write(off: int, n: int, tag: int) -> None:
        e.write(v, off, pattern(tag, n))
        want[off : off + n] = pattern(tag, n)

    write(100, 5000, 2)  # chunks 0 and 1, first writes since the snapshot: copies
    d.run_batch(pipeline=True)
    write(200, 5000, 3)  # the same chunks again: in place, left unsynced
    d.run_batch(pipeline=True)
    assert len(d._written) == 2, "both batches wait for their sync"
    write(3 * CHUNK + 1, CHUNK - 1, 4)  # chunks 3 and 9: copies again, completing the two
    write(9 * CHUNK + 5, 3000, 5)
    e.crashpoint = crash_at(point)
    with pytest.raises(SimulatedCrash):
        d.run_batch(pipeline=True)
    reopen_and_check(crashpool, fs, e, mode, bytes(want), old, copies=None if thin else 4)


@pytest.mark.parametrize("point", POINTS)
def test_snapshot_delete_crash_frees_space_exactly_once(crashpool, point):
    fs = CrashFS()
    e = Engine.open(crashpool, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE)
    e.write(v, 0, pattern(1, SIZE))
    e.destage()
    e.snapshot_create(v, "keep")
    e.write(v, 0, pattern(2, 4 * CHUNK))
    e.snapshot_create(v, "drop")
    e.write(v, 0, pattern(3, 8 * CHUNK))
    e.destage()
    # "keep" holds chunks 0-7 (4 of them copied before "drop" existed, shared after);
    # "drop" alone holds chunks 0-3 as of pattern 2.
    e.snapshot_delete(v, "drop")
    e.crashpoint = crash_at(point)
    try:
        e.destage()
    except SimulatedCrash:
        pass
    e = reopen(crashpool, fs, e, "drop")
    v = e.volume("v")
    assert [s.name for s in e.snapshot_list(v)] == ["keep"]
    e.destage()
    st = e.stats()
    assert st["store_slots"] - st["store_free_slots"] == 8
    want = pattern(1, SIZE)
    assert e.read_snapshot(e.snapshot(v, "keep"), 0, SIZE) == want
    e.close()


def test_acknowledged_sync_write_survives_power_loss(crashpool):
    """Invariant 3, sync mode: acknowledged means durable, before any destage."""
    fs = CrashFS()
    e = Engine.open(crashpool, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE)
    e.write(v, 123, pattern(5, 7000))
    e = reopen(crashpool, fs, e, "drop")
    assert e.read(e.volume("v"), 123, 7000) == pattern(5, 7000)
    e.close()


def test_writeback_flush_and_fua_are_the_durability_points(tmp_path):
    """Invariant 3, writeback mode: FLUSH covers what came before; FUA covers itself."""
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CHUNK, durability="writeback")
    fs = CrashFS()
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE)
    e.write(v, 0, pattern(1, CHUNK))
    e.flush()
    e.write(v, CHUNK, pattern(2, CHUNK))
    e.write(v, 2 * CHUNK, pattern(3, CHUNK), fua=True)  # makes the one before durable too
    e.write(v, 3 * CHUNK, pattern(4, CHUNK))  # never made durable
    e = reopen(path, fs, e, "drop")
    v = e.volume("v")
    assert e.read(v, 0, 3 * CHUNK) == pattern(1, CHUNK) + pattern(2, CHUNK) + pattern(3, CHUNK)
    assert e.read(v, 3 * CHUNK, CHUNK) == bytes(CHUNK)
    e.close()


@pytest.mark.parametrize("seed", range(8))
def test_torn_journal_tail_is_cut_at_a_record_boundary(tmp_path, seed):
    """Invariant 4: after a torn tail each record is wholly there or wholly absent, in order."""
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CHUNK, durability="writeback")
    fs = CrashFS(seed=seed)
    e = Engine.open(path, start_destager=False, opener=fs)
    v = e.volume_create("v", SIZE)
    e.flush()
    n = 12
    for i in range(n):
        e.write(v, i * CHUNK, pattern(10 + i, CHUNK))
    e = reopen(path, fs, e, "tear")
    v = e.volume("v")
    present = [e.read(v, i * CHUNK, CHUNK) == pattern(10 + i, CHUNK) for i in range(n)]
    absent = [e.read(v, i * CHUNK, CHUNK) == bytes(CHUNK) for i in range(n)]
    assert all(p or a for p, a in zip(present, absent, strict=True)), "a record came back torn"
    k = sum(present)
    assert present == [True] * k + [False] * (n - k), "a later record survived an earlier one"
    assert k == e.journal.written_seq, "replay kept a different number of records"
    e.close()


def test_corrupt_record_in_the_middle_ends_the_log_there(tmp_path):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CHUNK, durability="sync")
    e = Engine.open(path, start_destager=False)
    v = e.volume_create("v", SIZE)
    for i in range(6):
        e.write(v, i * CHUNK, pattern(20 + i, CHUNK))
    victim = e.backlog.pending[3]
    e.close()
    with open(os.path.join(path, "journal"), "r+b") as f:
        f.seek(victim.data_pos + 100)
        b = f.read(1)
        f.seek(victim.data_pos + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    e = Engine.open(path, start_destager=False)
    v = e.volume("v")
    for i in range(6):
        want = pattern(20 + i, CHUNK) if i < 3 else bytes(CHUNK)
        assert e.read(v, i * CHUNK, CHUNK) == want, f"block {i}"
    # New writes go on after the cut and survive another reopen.
    e.write(v, 5 * CHUNK, pattern(99, CHUNK))
    e.close()
    e = Engine.open(path, start_destager=False)
    assert e.read(e.volume("v"), 5 * CHUNK, CHUNK) == pattern(99, CHUNK)
    assert e.read(e.volume("v"), 4 * CHUNK, CHUNK) == bytes(CHUNK)
    e.close()


def test_stale_record_after_cut_is_not_resurrected(tmp_path):
    """J2: after a cut, a stale record of the previous life that carries the next expected seq
    at the next position must not be replayed (the generation check rejects it)."""
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CHUNK, durability="sync")
    e = Engine.open(path, start_destager=False)
    v = e.volume_create("v", SIZE)
    for i in range(3):
        e.write(v, i * CHUNK, pattern(30 + i, CHUNK))
    first = e.backlog.pending[1]
    e.close()
    # Corrupt record 2 of 3: replay keeps record 1 only; record 3 is now stale tail.
    with open(os.path.join(path, "journal"), "r+b") as f:
        f.seek(first.data_pos + 1)
        f.write(b"\xff\xfe")
    e = Engine.open(path, start_destager=False)
    v = e.volume("v")
    # Same size as the cut record: lands exactly where it was, so the stale record 3
    # follows with seq = next expected.
    e.write(v, 7 * CHUNK, pattern(40, CHUNK))
    e.close()
    e = Engine.open(path, start_destager=False)
    v = e.volume("v")
    assert e.read(v, 2 * CHUNK, CHUNK) == bytes(CHUNK), "stale record was resurrected"
    assert e.read(v, 7 * CHUNK, CHUNK) == pattern(40, CHUNK)
    e.close()


def test_changes_table_is_only_a_cache(crashpool):
    """Invariant 6: the table is rebuilt from the journal; reads are identical after reopen."""
    e = Engine.open(crashpool, start_destager=False)
    v = e.volume_create("v", SIZE)
    e.write(v, 0, pattern(1, SIZE))
    e.destage(1)
    e.snapshot_create(v, "s")
    e.write(v, 50, pattern(2, 3000))
    e.write_zeroes(v, 2000, 10000)
    e.write(v, 9000, pattern(3, 20000))
    e.trim(v, 30000, 100)
    before = (e.read(v, 0, SIZE), e.read_snapshot(e.snapshot(v, "s"), 0, SIZE))
    assert e.stats()["changes_pieces"] > 0
    e.close()
    e = Engine.open(crashpool, start_destager=False)
    v = e.volume("v")
    assert (e.read(v, 0, SIZE), e.read_snapshot(e.snapshot(v, "s"), 0, SIZE)) == before
    e.destage()
    assert e.stats()["changes_pieces"] == 0
    assert (e.read(v, 0, SIZE), e.read_snapshot(e.snapshot(v, "s"), 0, SIZE)) == before
    e.close()
