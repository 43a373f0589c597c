"""The journal through the engine: splitting, wraparound, backpressure, corruption, locking.

Record layout facts used here come from stores/journal/format.py: records sit at 64-byte
aligned positions after a 4096-byte superblock; `Record.pos` is the header's file offset and
`Record.data_pos` its payload's; the superblock starts with the magic b"JSNAPJNL".
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.errors import IntegrityError, PoolBusy
from jsnap.stores import journal as jn
from jsnap.stores.journal import replay as jreplay

CHUNK = 4096


@pytest.fixture
def opened():
    """A list to append every Engine a test opens; all are closed at teardown."""
    engines: list[Engine] = []
    yield engines
    for e in engines:
        if not e.closed:
            e.close()


def _open(path: str, opened: list[Engine], **kw) -> Engine:
    e = Engine.open(path, **kw)
    opened.append(e)
    return e


def _small_pool(tmp_path, name: str = "pool", journal_size: int = 1 << 20,
                durability: str = "writeback") -> str:
    path = str(tmp_path / name)
    init_pool(path, journal_size=journal_size, chunk_size=CHUNK, durability=durability)
    return path


def _first_diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), -1)


def _assert_reads(e: Engine, vol: str, want: bytes | bytearray, when: str = "") -> None:
    got = bytes(e.read(e.volume(vol), 0, len(want)))
    assert got == bytes(want), f"{vol} {when}: first difference at byte {_first_diff(got, want)}"


# -- writes larger than one record ------------------------------------------------------------


def test_journal_write_larger_than_max_payload_is_split_and_reads_back(tmp_path, opened):
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    maxp = e.journal.max_payload
    size = 1 << 20
    v = e.volume_create("v", size)
    rng = random.Random(1)
    length = 3 * maxp + 1000
    off = 513  # unaligned: the pieces straddle chunk boundaries at odd places
    data = rng.randbytes(length)
    first = e.journal.written_seq + 1
    seq = e.write(v, off, data)
    recs = list(e.backlog.pending)
    assert [r.kind for r in recs] == [jn.WRITE] * 4, recs
    assert seq == recs[-1].seq and recs[0].seq == first
    assert all(r.length <= maxp for r in recs)
    assert [r.offset for r in recs] == [off, off + maxp, off + 2 * maxp, off + 3 * maxp]
    assert sum(r.length for r in recs) == length
    want = bytearray(size)
    want[off : off + length] = data
    _assert_reads(e, "v", want, "from the journal")
    e.close()
    e = _open(path, opened, start_destager=False)
    assert len(e.backlog.pending) == 4
    _assert_reads(e, "v", want, "after replay")
    e.destage()
    _assert_reads(e, "v", want, "from production")


def test_journal_write_larger_than_the_journal_completes_with_the_destager_running(
    tmp_path, opened
):
    # In sync mode, a 3 MiB write through a 1 MiB journal: the writer waits for the destager
    # to free the space its own first parts took; nothing fails.
    path = _small_pool(tmp_path, durability="sync")
    e = _open(path, opened, start_destager=True)
    size = 4 << 20
    v = e.volume_create("v", size)
    data = random.Random(2).randbytes(3 << 20)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            e.write(v, 4096 + 7, data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=writer, name="big-writer", daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        st = e.stats()
        pytest.fail(
            f"a {len(data)}-byte write through a {e.journal.end}-byte journal is stuck "
            f"(journal_fill={st['journal_fill']:.2f}, journal_waiters={st['journal_waiters']}, "
            f"records the destager can see: {st['journal_records']})"
        )
    assert not errors, errors
    want = bytearray(size)
    want[4096 + 7 : 4096 + 7 + len(data)] = data
    _assert_reads(e, "v", want, "right after the write")
    e.wait_destaged()
    _assert_reads(e, "v", want, "after destaging")
    e.close()
    e = _open(path, opened, start_destager=False)
    _assert_reads(e, "v", want, "after reopening")


# -- wraparound -------------------------------------------------------------------------------


def test_journal_wraps_many_times_and_replays_across_the_wrap(tmp_path, opened):
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    size = 512 * 1024
    v = e.volume_create("v", size)
    model = bytearray(size)
    rng = random.Random(3)
    wraps = reopens = 0
    last_head = e.journal.head
    replayed_across_wrap = 0
    for i in range(700):
        off = rng.randrange(0, size - 1)
        length = min(rng.randint(1, 48 * 1024), size - off)
        r = rng.random()
        if r < 0.9:
            data = rng.randbytes(length)
            e.write(v, off, data)
            model[off : off + length] = data
        else:
            e.write_zeroes(v, off, length)
            model[off : off + length] = bytes(length)
        if e.journal.head < last_head:
            wraps += 1
        last_head = e.journal.head
        # Keep the journal between half and three quarters full, destaging a few records at
        # a time, so the live region sits across the wrap point in ever different places.
        if e.stats()["journal_fill"] > 0.6:
            e.destage(max_records=rng.randint(1, 8))
        if i % 50 == 49:
            straddles = e.journal.head < e.journal.tail
            e.close()
            e = _open(path, opened, start_destager=False)
            reopens += 1
            replayed_across_wrap += straddles
            v = e.volume("v")
            last_head = e.journal.head
            _assert_reads(e, "v", model, f"after reopen {reopens} (wraps so far: {wraps})")
        elif i % 25 == 0:
            _assert_reads(e, "v", model, f"at step {i}")
    assert wraps >= 10, f"the journal wrapped only {wraps} times"
    assert replayed_across_wrap >= 1, "no reopen happened with live records across the wrap"
    _assert_reads(e, "v", model, "at the end")
    e.destage()
    _assert_reads(e, "v", model, "after destaging all")
    e.close()
    e = _open(path, opened, start_destager=False)
    _assert_reads(e, "v", model, "after the final reopen")


@pytest.mark.parametrize(
    "gap",
    [pytest.param(0, id="implicit-wrap"), pytest.param(64, id="wrap-record-fills-gap"),
     pytest.param(192, id="wrap-record-then-gap")],
)
def test_journal_record_ending_near_the_file_end_wraps_and_replays(tmp_path, opened, gap):
    """A record leaving exactly `gap` bytes before the end: 0 forces the implicit wrap (no room
    for even a WRAP header), 64 and 192 an explicit WRAP record before the (320-byte) next one."""
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    size = 1 << 20
    v = e.volume_create("v", size)
    model = bytearray(size)
    rng = random.Random(gap)
    j = e.journal
    # Move the head to a third of the file, then destage so the tail follows it.
    filler = rng.randbytes(j.capacity // 3)
    e.write(v, 0, filler)
    model[: len(filler)] = filler
    e.destage()
    # One record whose end is exactly `gap` bytes before the file end.
    payload = j.end - j.head - gap - jn.HEADER.size
    while payload > j.max_payload:  # too big for one record: put a spacer first
        step = min(j.max_payload, payload - jn.HEADER.size - 64)
        d = rng.randbytes(step)
        e.write(v, 100_000, d)
        model[100_000 : 100_000 + step] = d
        payload = j.end - j.head - gap - jn.HEADER.size
    d = rng.randbytes(payload)
    e.write(v, 300_000, d)
    model[300_000 : 300_000 + payload] = d
    assert j.end - j.head == gap
    # The next record goes to the start of the record area.
    after = b"after the wrap" * 15  # 210 bytes: a 320-byte record, too big for any gap
    e.write(v, 7, after)
    model[7 : 7 + len(after)] = after
    assert e.backlog.pending[-1].pos == jn.SUPERBLOCK_SIZE
    _assert_reads(e, "v", model, "before reopening")
    e.close()
    e = _open(path, opened, start_destager=False)
    assert e.backlog.pending[-1].pos == jn.SUPERBLOCK_SIZE
    _assert_reads(e, "v", model, "after replaying across the wrap")
    # Destage all but the record after the wrap: the checkpoint lands at the file end (or at
    # the WRAP record's successor); replay from there must find the record at the start.
    e.destage(max_records=len(e.backlog.pending) - 1)
    assert len(e.backlog.pending) == 1
    e.close()
    e = _open(path, opened, start_destager=False)
    assert len(e.backlog.pending) == 1 and e.backlog.pending[0].pos == jn.SUPERBLOCK_SIZE
    _assert_reads(e, "v", model, "after a checkpoint at the wrap")
    e.write(e.volume("v"), 20, b"more")
    model[20:24] = b"more"
    e.destage()
    e.close()
    e = _open(path, opened, start_destager=False)
    _assert_reads(e, "v", model, "at the end")


# -- backpressure -----------------------------------------------------------------------------


def test_journal_full_blocks_writer_until_destage_then_it_finishes(tmp_path, opened):
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    size = 2 << 20
    v = e.volume_create("v", size)
    rec_payload = 64 * 1024
    per_record = jn.HEADER.size + rec_payload
    # More records than the journal can hold: the writer must wait for space.
    nrecords = e.journal.capacity // per_record + 6
    rng = random.Random(4)
    blobs = [rng.randbytes(rec_payload) for _ in range(nrecords)]
    done = threading.Event()
    errors: list[BaseException] = []
    progress = [0]

    def writer() -> None:
        try:
            for i, blob in enumerate(blobs):
                e.write(v, (i * rec_payload) % size, blob)
                progress[0] = i + 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=writer, name="journal-writer", daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while e.stats()["journal_waiters"] == 0:
        assert not done.is_set(), f"the writer finished without waiting: {errors}"
        assert time.monotonic() < deadline, "the writer never waited for journal space"
        time.sleep(0.005)
    # It stays blocked: nothing fails, nothing is dropped, it just waits.
    time.sleep(0.3)
    assert not done.is_set(), f"the writer did not stay blocked: {errors}"
    blocked_at = progress[0]
    assert 0 < blocked_at < nrecords
    assert e.stats()["journal_waiters"] == 1
    assert e.stats()["journal_fill"] > 0.9
    # Destaging in this thread frees space; the writer resumes and finishes.
    while not done.wait(0.01):
        e.destage()
    t.join(10)
    assert not errors, errors
    assert progress[0] == nrecords
    model = bytearray(size)
    for i, blob in enumerate(blobs):
        off = (i * rec_payload) % size
        model[off : off + rec_payload] = blob
    _assert_reads(e, "v", model, "after the blocked writer finished")
    e.close()
    e = _open(path, opened, start_destager=False)
    _assert_reads(e, "v", model, "after reopening")


def test_journal_backpressure_with_two_writers_keeps_seq_order_and_loses_nothing(
    tmp_path, opened
):
    """Writer A's 2-record write gets its first record in and waits for space for the second;
    writer B's small write fits meanwhile. Records must reach the destager in seq order, and
    both writes must survive a close and reopen whole."""
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    v = e.volume_create("v", 4 << 20)
    rng = random.Random(5)
    model = bytearray(4 << 20)
    for i in range(9):  # 9 pending 64 KiB records: ~56% of the journal
        d = rng.randbytes(65536)
        e.write(v, i * 65536, d)
        model[i * 65536 : (i + 1) * 65536] = d
    big = rng.randbytes(2 * e.journal.max_payload)  # record 1 fits, record 2 must wait
    small = rng.randbytes(CHUNK)
    errors: list[BaseException] = []

    def run(off: int, data: bytes) -> None:
        try:
            e.write(v, off, data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ta = threading.Thread(target=run, args=(1 << 20, big), daemon=True)
    ta.start()
    deadline = time.monotonic() + 10
    while e.stats()["journal_waiters"] == 0:
        assert ta.is_alive() and time.monotonic() < deadline, "writer A never waited"
        time.sleep(0.005)
    tb = threading.Thread(target=run, args=(3 << 20, small), daemon=True)
    tb.start()
    tb.join(0.5)
    with e.lock:
        seqs = [r.seq for r in e.backlog.pending]
    assert seqs == sorted(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs))), (
        f"records reach the destager out of seq order or with gaps: {seqs}"
    )
    deadline = time.monotonic() + 10
    while ta.is_alive() or tb.is_alive():
        assert time.monotonic() < deadline, "writers still blocked after destaging"
        e.destage()
        time.sleep(0.01)
    assert not errors, errors
    model[1 << 20 : (1 << 20) + len(big)] = big
    model[3 << 20 : (3 << 20) + CHUNK] = small
    _assert_reads(e, "v", model, "after both writes returned")
    e.close()
    e = _open(path, opened, start_destager=False)
    _assert_reads(e, "v", model, "after close and reopen")
    e.destage()
    _assert_reads(e, "v", model, "after destaging")


# -- corruption -------------------------------------------------------------------------------


def _nine_records(e: Engine) -> tuple[list[jn.Record], list[bytes]]:
    v = e.volume_create("v", 16 * CHUNK)
    blobs = [bytes([0x10 + i]) * CHUNK for i in range(9)]
    for i, blob in enumerate(blobs):
        e.write(v, i * CHUNK, blob)
    recs = list(e.backlog.pending)
    assert len(recs) == 9
    return recs, blobs


def _corrupt_byte(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("where", ["payload", "header"])
def test_journal_corrupt_middle_record_cuts_replay_there(tmp_path, opened, where):
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    recs, blobs = _nine_records(e)
    jpath = e.journal_path
    e.close()
    mid = recs[4]
    # One byte in the middle of the payload, or in the header's volume offset field.
    _corrupt_byte(jpath, mid.data_pos + CHUNK // 2 if where == "payload" else mid.pos + 24)
    e = _open(path, opened, start_destager=False)
    assert [r.seq for r in e.backlog.pending] == [r.seq for r in recs[:4]], (
        "replay must stop at the corrupt record and drop everything after it"
    )
    assert e.journal.written_seq == recs[3].seq
    v = e.volume("v")
    for i in range(9):
        got = bytes(e.read(v, i * CHUNK, CHUNK))
        want = blobs[i] if i < 4 else bytes(CHUNK)
        assert got == want, f"block {i} after replay cut at record {mid.seq}"
    # New records go where the corrupt one was, with a newer generation. The old, valid
    # records behind them carry the next seqs but an older generation: never resurrected.
    e.write(v, 4 * CHUNK, b"\x77" * CHUNK)
    assert e.backlog.pending[-1].pos == mid.pos and e.backlog.pending[-1].seq == mid.seq
    e.close()
    e = _open(path, opened, start_destager=False)
    assert len(e.backlog.pending) == 5
    v = e.volume("v")
    for i in range(9):
        want = blobs[i] if i < 4 else b"\x77" * CHUNK if i == 4 else bytes(CHUNK)
        assert bytes(e.read(v, i * CHUNK, CHUNK)) == want, f"block {i} after rewrite"


def test_journal_stale_records_after_a_cut_stay_dead_once_the_checkpoint_reaches_them(
    tmp_path, opened
):
    """J2 across a checkpoint: records behind a cut that were valid in an older generation
    must not come back when the checkpoint moves up to them (the replay's generation floor
    must not restart at 0 from the checkpoint)."""
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    recs, blobs = _nine_records(e)
    jpath = e.journal_path
    e.close()
    mid = recs[4]
    _corrupt_byte(jpath, mid.data_pos + 100)  # as a crash tearing record 5 of 9 would
    e = _open(path, opened, start_destager=False)
    v = e.volume("v")
    assert bytes(e.read(v, 5 * CHUNK, CHUNK)) == bytes(CHUNK)  # cut: records 5..9 gone
    e.write(v, 4 * CHUNK, b"\x77" * CHUNK)  # same size: lands exactly where record 5 was
    e.destage()  # checkpoint: right after it, i.e. at the stale record 6 (next seq, old gen)
    e.close()
    e = _open(path, opened, start_destager=False)
    assert list(e.backlog.pending) == [], f"stale records replayed: {list(e.backlog.pending)}"
    v = e.volume("v")
    for i in range(9):
        want = blobs[i] if i < 4 else b"\x77" * CHUNK if i == 4 else bytes(CHUNK)
        assert bytes(e.read(v, i * CHUNK, CHUNK)) == want, (
            f"block {i}: a record the replay had cut came back after the checkpoint moved"
        )


def test_journal_torn_last_record_is_cut(tmp_path, opened):
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    recs, blobs = _nine_records(e)
    jpath = e.journal_path
    e.close()
    last = recs[-1]
    with open(jpath, "r+b") as f:  # the tail half of the payload never reached the disk
        f.seek(last.data_pos + CHUNK // 2)
        f.write(bytes(CHUNK // 2))
    e = _open(path, opened, start_destager=False)
    assert len(e.backlog.pending) == 8
    v = e.volume("v")
    assert bytes(e.read(v, 8 * CHUNK, CHUNK)) == bytes(CHUNK)
    assert bytes(e.read(v, 7 * CHUNK, CHUNK)) == blobs[7]


def test_journal_bad_superblock_magic_raises_integrity_error_naming_the_journal(
    tmp_path, opened
):
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=False)
    v = e.volume_create("v", 4 * CHUNK)
    e.write(v, 0, b"keep" * 1024)
    jpath = e.journal_path
    e.close()
    with open(jpath, "r+b") as f:
        good = f.read(8)
        assert good == jn.SUPER_MAGIC
        f.seek(0)
        f.write(b"XXXXXXXX")
    with pytest.raises(IntegrityError) as info:
        _open(path, opened, start_destager=False)
    assert jpath in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    # The failed open released the pool: with the magic back, the pool opens and its data
    # (still in the journal) is intact.
    with open(jpath, "r+b") as f:
        f.write(good)
    e = _open(path, opened, start_destager=False)
    assert bytes(e.read(e.volume("v"), 0, 4096)) == b"keep" * 1024


def test_journal_second_open_raises_pool_busy_naming_this_pid(tmp_path, opened):
    path = _small_pool(tmp_path)
    e = _open(path, opened, start_destager=True)
    v = e.volume_create("v", 4 * CHUNK)
    for _ in range(2):  # a failed open must not disturb the lock or its PID for the next one
        with pytest.raises(PoolBusy) as info:
            _open(path, opened, start_destager=False)
        assert str(os.getpid()) in str(info.value), str(info.value)
        assert path in str(info.value)
    # The owner is unaffected by the refused opens.
    e.write(v, 0, b"still mine")
    e.wait_destaged()
    assert bytes(e.read(v, 0, 10)) == b"still mine"
    e.close()
    e = _open(path, opened, start_destager=False)
    assert bytes(e.read(e.volume("v"), 0, 10)) == b"still mine"


def test_journal_snapshot_marker_uses_reserve_while_writers_wait(tmp_path):
    """A snapshot is taken at once even when data writers wait for a full journal: markers
    may use the space kept back from data records (snapshot create under load)."""
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=4096)
    e = Engine.open(path, start_destager=False)
    v = e.volume_create("v", 4 << 20)
    blob = bytes(64 * 1024)
    done = threading.Event()

    def writer() -> None:
        for i in range(40):  # more than the journal holds
            e.write(v, i * len(blob), blob)
        done.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while e.stats()["journal_waiters"] == 0:
        assert time.monotonic() < deadline, "the writer never waited for journal space"
        time.sleep(0.005)
    t0 = time.monotonic()
    snap = e.snapshot_create(v, "under-pressure")
    assert time.monotonic() - t0 < 1.0, "the snapshot waited for journal space"
    assert not done.is_set()
    while not done.wait(0.01):
        e.destage()
    t.join(10)
    assert e.read_snapshot(snap, 0, 4096) == bytes(4096)
    e.close()


def test_journal_page_padding_never_touches_live_records_when_nearly_full(tmp_path):
    """Appends pad their run with zeroes to the next page boundary (so the kernel never reads
    a cold page to merge a partial write). With the journal nearly full the tail sits just
    ahead of the head, often in the same page: every live record must survive the padding."""
    from jsnap.stores.files import OsFile

    path = str(tmp_path / "journal")
    f = OsFile(path, create=True)
    jn.format_journal(f, 4096 + 32 * 1024, b"u" * 16)
    cv = threading.Condition()
    j = jn.Journal(f, cv, generation=1, checkpoint_pos=4096, checkpoint_seq=0)
    rng = random.Random(7)
    live: list[tuple[jn.Record, bytes]] = []
    tail_in_head_page = 0
    with cv:
        for _ in range(3000):
            payload = rng.randbytes(rng.choice([1, 63, 64, 100, 700, 1500]))
            size = j.record_size(len(payload))
            # Free just enough of the oldest records for this append (no waiting here).
            while j._need(size) + jn.ALIGN + j.marker_reserve > j.capacity - j.used:
                rec, _ = live.pop(0)
                j.release_upto(rec)
            if j.used and j.tail > j.head and j.tail // 4096 == j.head // 4096:
                tail_in_head_page += 1
            rec = j.append(jn.WRITE, 1, 0, len(payload), [payload], len(payload))
            live.append((rec, payload))
            for old, data in live:  # every live record is intact on disk
                got = f.pread(len(data), old.data_pos)
                assert got == data, f"record seq {old.seq} at {old.pos} was overwritten"
    assert tail_in_head_page > 50, tail_in_head_page
    # And replay from the tail finds exactly the live records.
    first = live[0][0]
    j2 = jn.Journal(f, threading.Condition(), generation=2, checkpoint_pos=first.pos,
                    checkpoint_seq=first.seq, checkpoint_gen=1)
    got = [r.seq for r in j2.replay() if r.kind != jn.WRAP]
    assert got == [r.seq for r, _ in live], (len(got), len(live), j2.replay_end)
    f.close()


@pytest.mark.parametrize("window", [4096, 4160, 5000, 65536])
def test_replay_reads_records_across_window_seams(tmp_path, monkeypatch, window):
    """Replay reads the journal in windows (8 MiB, here much smaller) with a read-ahead:
    records that straddle two windows, are longer than one, or follow a wrap all come back
    whole, with their payloads' CRCs checked."""
    from jsnap.stores.files import OsFile

    monkeypatch.setattr(jreplay, "_REPLAY_WINDOW", window)
    path = str(tmp_path / "journal")
    f = OsFile(path, create=True)
    jn.format_journal(f, 4096 + 128 * 1024, b"u" * 16)
    j = jn.Journal(f, threading.Condition(), generation=1, checkpoint_pos=4096,
                   checkpoint_seq=0)
    rng = random.Random(window)
    live: list[tuple[jn.Record, bytes]] = []
    with j.cv:
        for i in range(600):  # wraps the 128 KiB journal many times
            payload = rng.randbytes(rng.choice([0, 1, 63, 64, 65, 4096, 4097, 9000, 20000]))
            size = j.record_size(len(payload))
            while j._need(size) + jn.ALIGN + j.marker_reserve > j.capacity - j.used:
                rec, _ = live.pop(0)
                j.release_upto(rec)
            rec = j.append(jn.WRITE, 1, i, len(payload), [payload], len(payload))
            live.append((rec, payload))
    first = live[0][0]
    j2 = jn.Journal(f, threading.Condition(), generation=2, checkpoint_pos=first.pos,
                    checkpoint_seq=first.seq, checkpoint_gen=1)
    got = [r for r in j2.replay() if r.kind != jn.WRAP]
    assert [(r.seq, r.offset, r.pos) for r in got] == \
        [(r.seq, r.offset, r.pos) for r, _ in live], j2.replay_end
    for r, data in live:
        assert f.pread(len(data), r.data_pos) == data
    assert (j2.head, j2.used, j2.next_seq) == (j.head, j.used, j.next_seq)
    f.close()


# -- replay scanned by a forked child (journal/replay.py FORK_SCAN_AFTER) --------------------------


def _mixed_journal(path: str, seed: int) -> tuple[object, jn.Journal, list[jn.Record]]:
    """A 256 KiB journal wrapped many times, its live records of every kind: writes of odd
    sizes, zeroes, trims, snapshot markers with non-ASCII names, REMAP records with extent
    ids (WRAP records come by themselves)."""
    from jsnap.stores.files import OsFile

    f = OsFile(path, create=True)
    jn.format_journal(f, 4096 + 256 * 1024, b"u" * 16)
    j = jn.Journal(f, threading.Condition(), generation=3, checkpoint_pos=4096,
                   checkpoint_seq=0)
    rng = random.Random(seed)
    live: list[jn.Record] = []
    with j.cv:
        for i in range(1500):
            kind = rng.choice([jn.WRITE] * 6 + [jn.ZEROES, jn.TRIM, jn.SNAP_CREATE,
                                                jn.SNAP_DELETE, jn.REMAP])
            payload, name, aux = b"", "", rng.randrange(1 << 63)
            if kind == jn.WRITE:
                payload = rng.randbytes(rng.choice([1, 63, 64, 4096, 4097, 9000]))
            elif kind == jn.SNAP_CREATE:
                name = f"snap-{i}-é✓"
                payload = name.encode()
            elif kind == jn.REMAP:
                payload = b"".join(jn.EXT.pack(rng.randrange(1 << 40))
                                   for _ in range(rng.randint(1, 40)))
            size = j.record_size(len(payload))
            while j._need(size) + jn.ALIGN + j.marker_reserve > j.capacity - j.used:
                j.release_upto(live.pop(0))
            live.append(j.append(kind, rng.randrange(5), rng.randrange(1 << 40), len(payload),
                                 [payload] if payload else [], len(payload), aux, name))
    return f, j, live


def _replayed(f, j: jn.Journal, first: jn.Record, verify=None):
    j2 = jn.Journal(f, threading.Condition(), generation=4, checkpoint_pos=first.pos,
                    checkpoint_seq=first.seq, checkpoint_gen=3)
    recs = list(j2.replay(verify))
    return j2, recs


def _same_records(got: list[jn.Record], want: list[jn.Record]) -> None:
    assert [tuple(r) for r in got] == [tuple(r) for r in want]
    assert [r.name for r in got] == [r.name for r in want]
    assert [r.exts for r in got] == [r.exts for r in want]


@pytest.mark.parametrize("fork_after", [0, 1, 50_000])
def test_forked_replay_gives_the_records_a_scan_in_process_gives(tmp_path, monkeypatch,
                                                                 fork_after):
    """Past FORK_SCAN_AFTER bytes a child scans and streams the records: every field, name
    and extent list, the end of the log and the head accounting must be what a scan in
    this process finds (at once, after one record, mid-journal; small messages)."""
    f, j, live = _mixed_journal(str(tmp_path / "journal"), fork_after)
    first = next(r for r in live if r.kind != jn.WRAP)
    monkeypatch.setattr(jreplay, "FORK_SCAN_AFTER", 1 << 40)
    here, recs_here = _replayed(f, j, first)
    monkeypatch.setattr(jreplay, "FORK_SCAN_AFTER", fork_after)
    monkeypatch.setattr(jreplay, "_BATCH", 7)
    forked, recs = _replayed(f, j, first)
    _same_records(recs, recs_here)
    assert [r.seq for r in recs if r.kind != jn.WRAP] == \
        [r.seq for r in live if r.kind != jn.WRAP and r.seq >= first.seq]
    assert any(r.kind == jn.SNAP_CREATE for r in recs) and any(r.kind == jn.REMAP for r in recs)
    assert (forked.head, forked.used, forked.next_seq, forked.durable_seq) == \
        (here.head, here.used, here.next_seq, here.durable_seq) == \
        (j.head, j.used, j.next_seq, j.next_seq - 1)
    assert forked.replay_end == here.replay_end != ""
    f.close()


def test_forked_replay_stops_where_verify_says_a_remap_is_torn(tmp_path, monkeypatch):
    """verify() runs in the child for the records it scans: a REMAP it rejects ends the log
    there, as in process."""
    f, j, live = _mixed_journal(str(tmp_path / "journal"), 7)
    first = next(r for r in live if r.kind != jn.WRAP)
    remaps = [r for r in live if r.kind == jn.REMAP and r.seq > first.seq]
    torn = remaps[len(remaps) // 2]

    def verify(rec: jn.Record) -> bool:
        return rec.seq != torn.seq

    monkeypatch.setattr(jreplay, "FORK_SCAN_AFTER", 1 << 40)
    here, recs_here = _replayed(f, j, first, verify)
    monkeypatch.setattr(jreplay, "FORK_SCAN_AFTER", 0)
    forked, recs = _replayed(f, j, first, verify)
    _same_records(recs, recs_here)
    assert recs[-1].seq == torn.seq - 1
    assert "remapped data does not match" in forked.replay_end
    assert (forked.head, forked.used, forked.next_seq) == (here.head, here.used, here.next_seq)
    f.close()


def test_forked_replay_goes_on_in_process_when_the_child_dies(tmp_path, monkeypatch, caplog):
    """A scanner child that dies mid-stream (here after two messages) loses nothing: the
    scan goes on in this process from the last record received, with a warning."""
    f, j, live = _mixed_journal(str(tmp_path / "journal"), 11)
    first = next(r for r in live if r.kind != jn.WRAP)
    monkeypatch.setattr(jreplay, "FORK_SCAN_AFTER", 1 << 40)
    here, recs_here = _replayed(f, j, first)
    sent = []
    real_send = jreplay._send_all

    def dying_send(fd, parts):  # runs in the child only
        if len(sent) == 2:
            os._exit(9)
        sent.append(1)
        real_send(fd, parts)

    monkeypatch.setattr(jreplay, "_send_all", dying_send)
    monkeypatch.setattr(jreplay, "FORK_SCAN_AFTER", 0)
    monkeypatch.setattr(jreplay, "_BATCH", 5)
    with caplog.at_level("WARNING", logger="jsnap.journal"):
        forked, recs = _replayed(f, j, first)
    _same_records(recs, recs_here)
    assert (forked.head, forked.used, forked.next_seq) == (here.head, here.used, here.next_seq)
    assert forked.replay_end == here.replay_end
    assert "scanner stopped early" in caplog.text
    assert not sent, "the child's messages must not count in this process"
    f.close()
