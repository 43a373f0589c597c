"""The destager's page-cache episodes (jsnap.core.destager module doc, "Page cache"; opt-in).

The trigger is a CPU time, so these tests set SLOW_WRITE to 0 (every timed batch is slow)
or to 1 s (none is) and check what follows from it: every window a slow batch wrote is
dropped only after production was synced, each later write of the episode lands in a window
already dropped, a fast batch ends the episode, and no byte read changes.
"""

from __future__ import annotations

import os
import random
import types

import pytest

from jsnap.core import destager
from jsnap.core.destager import FOLIO_WINDOW, MIN_TIMED, Destager
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.stores import files
from jsnap.stores.files import Buffer, OsFile

MiB = 1 << 20


class LoggedFile(OsFile):
    """An OsFile that logs production writes, syncs and page-cache drops, in order."""

    events: list[tuple[str, str, int]]

    def pwrite(self, data: Buffer, offset: int) -> None:
        self.events.append(("write", self.path, offset // FOLIO_WINDOW))
        super().pwrite(data, offset)

    def pwritev(self, bufs, offset: int) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("write", self.path, offset // FOLIO_WINDOW))
        super().pwritev(bufs, offset)

    def sync(self) -> None:
        self.events.append(("sync", self.path, -1))
        super().sync()

    def drop_cache(self, offset: int, length: int) -> bool:
        assert offset % FOLIO_WINDOW == 0 and length == FOLIO_WINDOW
        self.events.append(("drop", self.path, offset // FOLIO_WINDOW))
        return super().drop_cache(offset, length)


def open_logged(path: str, events: list[tuple[str, str, int]], on: bool = True) -> Engine:
    def opener(p: str, create: bool = False) -> OsFile:
        f = LoggedFile(p, create)
        f.events = events
        return f

    return Engine.open(path, start_destager=False, opener=opener, drop_big_folios=on)


@pytest.fixture(params=["thin", "raw"])
def setup(request, tmp_path):
    """A 64 MiB volume written whole (thin: in place from then on), its model, the log."""
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=16 * MiB, chunk_size=16 << 10)
    events: list[tuple[str, str, int]] = []
    e = open_logged(path, events)
    vol = e.volume_create("v", 64 * MiB, thin=request.param == "thin")
    model = bytearray(os.urandom(64 * MiB))
    for off in range(0, 64 * MiB, MiB):
        e.write(vol, off, model[off : off + MiB])
        e.destage()  # no destager thread: a full journal would wait for ever
    events.clear()
    yield e, vol, model, events
    e.close()


@pytest.fixture
def slow(setup, monkeypatch):
    """setup, plus a destager (no thread) for which every timed batch is slow."""
    monkeypatch.setattr(destager, "SLOW_WRITE", 0.0)
    e, vol, model, events = setup
    return e, vol, model, events, Destager(e.backlog)


def write_random(e: Engine, vol, model: bytearray, n: int, rng: random.Random,  # type: ignore[no-untyped-def]
                 start: int = 0, end: int = 64 * MiB) -> None:
    for _ in range(n):
        off = start + rng.randrange((end - start) // 4096) * 4096
        data = rng.randbytes(4096)
        e.write(vol, off, data)
        model[off : off + 4096] = data


def production(events: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Events on production files (the journal and the snapshot store are not dropped)."""
    return [ev for ev in events if "/data-" in ev[1] or "/vol-" in ev[1]]


def test_slow_batch_drops_its_windows_after_the_sync_then_each_before_its_write(slow):
    e, vol, model, events, d = slow
    rng = random.Random(7)
    write_random(e, vol, model, 3 * MIN_TIMED, rng)  # 768 KiB: the journal holds them
    d.run_batch(MIN_TIMED)  # slow: the episode starts
    ev = production(events)
    first_drop = next(i for i, x in enumerate(ev) if x[0] == "drop")
    last_write = max(i for i, x in enumerate(ev) if x[0] == "write")
    assert last_write < first_drop
    synced = {x[1] for x in ev[last_write:first_drop] if x[0] == "sync"}
    written = {(x[1], x[2]) for x in ev if x[0] == "write"}
    dropped = {(x[1], x[2]) for x in ev if x[0] == "drop"}
    assert written == dropped, "every window the slow batch wrote is dropped"
    assert {p for p, _ in dropped} <= synced, "dropped only once production was synced"

    events.clear()
    d.run_batch(MIN_TIMED)  # in the episode: a window is dropped before its first write
    d.run_batch(MIN_TIMED)
    ev = production(events)
    for kind, p, w in ev:
        if kind == "write":
            assert (p, w) in dropped, f"write into window {w} of {p} before its drop"
        elif kind == "drop":
            assert (p, w) not in dropped, "a window is dropped once per episode"
            dropped.add((p, w))
    assert e.stats()["cache_windows_dropped"] == len(dropped)
    assert e.read(vol, 0, 64 * MiB) == model


def test_fast_batches_drop_nothing_and_end_an_episode(setup, monkeypatch):
    e, vol, model, events = setup
    rng = random.Random(8)
    d = Destager(e.backlog)
    monkeypatch.setattr(destager, "SLOW_WRITE", 1.0)
    write_random(e, vol, model, 2 * MIN_TIMED, rng, end=16 * MiB)
    d.run_batch(MIN_TIMED)
    assert not [x for x in events if x[0] == "drop"], "a fast batch starts no episode"
    monkeypatch.setattr(destager, "SLOW_WRITE", 0.0)
    d.run_batch(MIN_TIMED)
    dropped = {(x[1], x[2]) for x in events if x[0] == "drop"}
    assert dropped, "a slow one does"
    monkeypatch.setattr(destager, "SLOW_WRITE", 1.0)
    write_random(e, vol, model, MIN_TIMED, rng, end=16 * MiB)
    d.run_batch(MIN_TIMED)  # fast: ends the episode (its own drops came before it was timed)
    dropped |= {(x[1], x[2]) for x in events if x[0] == "drop"}
    events.clear()
    write_random(e, vol, model, MIN_TIMED, rng, start=48 * MiB)
    d.run_batch(MIN_TIMED)
    written = {(x[1], x[2]) for x in production(events) if x[0] == "write"}
    assert written - dropped, "the last batch writes windows the episode never dropped"
    assert not [x for x in events if x[0] == "drop"], "the episode ended"
    e.close()
    e2 = Engine.open(e.path, start_destager=False)  # and nothing on disk depends on it
    try:
        assert e2.read(e2.volume("v"), 0, 64 * MiB) == model
    finally:
        e2.close()


def test_small_batches_and_other_records_are_not_timed(slow):
    e, vol, model, events, d = slow
    rng = random.Random(9)
    write_random(e, vol, model, MIN_TIMED - 1, rng)
    d.run_batch()  # too few writes to time
    write_random(e, vol, model, MIN_TIMED, rng)
    e.trim(vol, 0, 4096)
    model[0:4096] = bytes(4096)
    d.run_batch()  # a trim in the batch: its time is not the small writes'
    assert not [x for x in events if x[0] == "drop"]
    assert e.read(vol, 0, 64 * MiB) == model


def test_off_by_default(tmp_path, monkeypatch):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=16 * MiB, chunk_size=16 << 10)
    events: list[tuple[str, str, int]] = []
    e = open_logged(path, events, on=False)
    try:
        vol = e.volume_create("v", 64 * MiB)
        model = bytearray(64 * MiB)
        monkeypatch.setattr(destager, "SLOW_WRITE", 0.0)
        write_random(e, vol, model, 2 * MIN_TIMED, random.Random(10))
        e.destage()
        assert [x for x in production(events) if x[0] == "write"]
        assert not [x for x in events if x[0] == "drop"]
        assert e.read(vol, 0, 64 * MiB) == model
    finally:
        e.close()


def test_serve_flag():
    from jsnap.cli.parser import build_parser

    parse = build_parser().parse_args
    assert parse(["-p", "pool", "serve"]).drop_big_folios is True
    assert parse(["-p", "pool", "serve", "--no-drop-big-folios"]).drop_big_folios is False


def test_windows_that_served_reads_stay_cached(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(files, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    f = OsFile(str(tmp_path / "f"), create=True)
    try:
        f.pwrite(bytes(16 * MiB), 0)  # one large write: every window is ours to drop
        assert f.drop_cache(0, FOLIO_WINDOW) is True  # (its first period starts)
        f.preadinto(memoryview(bytearray(4096)), FOLIO_WINDOW + 8192)  # window 1
        f.preadinto(memoryview(bytearray(2 * FOLIO_WINDOW)), 2 * FOLIO_WINDOW + 4096)  # 2-4
        f.preadinto(memoryview(bytearray(4096)), 5 * FOLIO_WINDOW)  # 5: one window, known
        assert f.drop_cache(5 * FOLIO_WINDOW, 3 * FOLIO_WINDOW) is False  # 5 was read
        assert f.drop_cache(6 * FOLIO_WINDOW, FOLIO_WINDOW) is True
        for w in (1, 2, 3, 4, 5):
            assert f.drop_cache(w * FOLIO_WINDOW, FOLIO_WINDOW) is False, w
        clock[0] += files.READ_MEMORY
        assert f.drop_cache(FOLIO_WINDOW, FOLIO_WINDOW) is False  # read one period ago
        clock[0] += files.READ_MEMORY
        assert f.drop_cache(FOLIO_WINDOW, FOLIO_WINDOW) is True  # two: forgotten
    finally:
        f.close()


def test_only_windows_this_file_wrote_large_are_dropped(tmp_path):
    """Page cache that was there before (reads, another process, a previous run) is never
    dropped; a window this OsFile wrote with a large write is, once; small writes mark none."""
    path = str(tmp_path / "f")
    before = OsFile(path, create=True)
    before.pwrite(bytes(8 * MiB), 0)  # "a previous server run"
    before.close()
    f = OsFile(path)
    try:
        for w in range(4):
            assert f.drop_cache(w * FOLIO_WINDOW, FOLIO_WINDOW) is False, w
        for off in range(0, FOLIO_WINDOW, 16 << 10):  # small writes make small folios
            f.pwrite(bytes(files.LARGE_WRITE // 4), off)
        assert f.drop_cache(0, FOLIO_WINDOW) is False
        f.pwritev([bytes(files.LARGE_WRITE // 2)] * 2, FOLIO_WINDOW - 4096)  # windows 0, 1
        f.copy_from(f, 0, files.LARGE_WRITE, 3 * FOLIO_WINDOW)  # window 3
        assert f.drop_cache(0, 2 * FOLIO_WINDOW) is True
        assert f.drop_cache(0, FOLIO_WINDOW) is False, "dropped once: small folios since"
        assert f.drop_cache(2 * FOLIO_WINDOW, FOLIO_WINDOW) is False
        assert f.drop_cache(3 * FOLIO_WINDOW, FOLIO_WINDOW) is True
    finally:
        f.close()


def test_reads_keep_windows_in_an_episode(slow):
    e, vol, model, events, d = slow
    rng = random.Random(11)
    assert e.read(vol, 0, 64 * MiB) == model  # every window served a read just now
    write_random(e, vol, model, 2 * MIN_TIMED, rng)
    d.run_batch(MIN_TIMED)
    d.run_batch(MIN_TIMED)
    assert [x for x in events if x[0] == "drop"], "the destager asked"
    assert e.stats()["cache_windows_dropped"] == 0, "and every file kept its read windows"
    assert e.read(vol, 0, 64 * MiB) == model



def cached_bytes(path: str) -> int:
    """Bytes of `path` resident in the page cache: mincore(2) over a mapping of it (libc's
    mmap, which neither reads the file nor faults a page in)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE


# `jsnap serve` with every timed destage batch taken as slow (an episode at every batch),
# so that the test does not depend on this machine's folio costs.
SLOW_SERVE = ("import sys; from jsnap.core import destager; destager.SLOW_WRITE = 0.0; "
              "from jsnap.cli import main; sys.exit(main(sys.argv[1:]))")


def admin_status(pool: str) -> dict:
    import http.client
    import json
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(os.path.join(pool, "admin.sock"))
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = sock
    try:
        conn.request("GET", "/v1/status")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_serve_keeps_the_warm_page_cache_of_a_restarted_pool(tmp_path):
    """Issue 19: a pool whose journal holds small writes spread over a volume, its data file
    warm, is served again: replay and destage must not drop the cache that reads will hit."""
    import subprocess
    import sys
    import time

    path = str(tmp_path / "pool")
    init_pool(path, journal_size=32 * MiB, chunk_size=16 << 10)
    e = Engine.open(path, start_destager=False)
    vol = e.volume_create("v", 64 * MiB, thin=True)
    model = bytearray(os.urandom(64 * MiB))
    for off in range(0, 64 * MiB, MiB):
        e.write(vol, off, model[off : off + MiB])
        e.destage()  # no destager thread: a full journal would wait for ever
    write_random(e, vol, model, 2048, random.Random(12))  # over every window, journaled
    assert e.stats()["journal_records"] > 4 * MIN_TIMED
    e.close()  # (no destage at close: the next start replays them)
    data = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.startswith("data-")]
    for p in data:  # warm, as after `cat` or a previous run's reads
        with open(p, "rb") as f:
            while f.read(4 * MiB):
                pass
    before = sum(map(cached_bytes, data))
    assert before >= 64 * MiB

    sock = str(tmp_path / "nbd.sock")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "-p", path, "serve",
                             "--socket", sock], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:  # served, and every replayed record destaged
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "journal not drained in 60 s"
            if os.path.exists(os.path.join(path, "admin.sock")):
                try:
                    st = admin_status(path)
                except OSError:
                    st = {}
                if st.get("journal_records") == 0 and st.get("destaged_records", 0) > 0:
                    break
            time.sleep(0.1)
        after = sum(map(cached_bytes, data))
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
        log.close()
    assert after >= before - 4 * MiB, f"serve dropped {(before - after) >> 20} MiB of cache"
    e2 = Engine.open(path, start_destager=False)
    try:
        assert e2.read(e2.volume("v"), 0, 64 * MiB) == model
    finally:
        e2.close()
