"""Running out of space (issue 25) on real, small ext4 file systems on loop devices.

A pool that fills its own file system must answer ENOSPC for writes that need new space,
never fail a catalog commit or turn read-only: its data files never grow into the file
system's reserve (stores/thin.py, "fs reserve"). When another program fills the file system,
overwrites of owned chunks keep working, and writes resume by themselves once space comes
back. Needs root (losetup, mount); required in CI (JSNAP_REQUIRE_TOOLS).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from loopdev import need

from jsnap.core.check import check_pool
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.errors import NoSpace
from jsnap.stores.thin import fs_reserve

MiB = 1 << 20
CHUNK = 16 << 10


@contextlib.contextmanager
def small_fs(tmp_path, size: int) -> Iterator[str]:
    """An ext4 file system of `size` bytes on a loop device, mounted under tmp_path."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        need("loop-mounted file systems need root and mkfs.ext4")
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_fs(path: str, block: int = 64 << 10, passes: int = 2) -> None:
    """Another program takes the free blocks of the file system holding `path`: writes of
    `block` bytes until ENOSPC, `passes` times (a second pass after an fsync takes what
    delayed allocation gave back)."""
    with open(path, "ab") as f:
        for _ in range(passes):
            with contextlib.suppress(OSError):
                while True:
                    f.write(bytes(block))
                    f.flush()
            if passes > 1:
                with contextlib.suppress(OSError):
                    os.fsync(f.fileno())


def free_bytes(path: str) -> int:
    v = os.statvfs(path)
    return v.f_bavail * v.f_frsize


def fill_until_enospc(e: Engine, vol, model: dict[int, bytes], rng: random.Random,
                      start: int = 0) -> int:
    """4 KiB writes 64 KiB apart (each maps a new chunk) until ENOSPC; returns the offset
    of the refused one. Everything acknowledged is in `model`."""
    off = start
    while True:
        data = rng.randbytes(4096)
        try:
            e.write(vol, off, data)
        except NoSpace:
            return off
        model[off] = data
        off += 64 << 10


def test_a_pool_filling_its_own_file_system_says_enospc_and_stays_writable(tmp_path):
    with small_fs(tmp_path, 160 * MiB) as fs:
        pool = os.path.join(fs, "pool")
        init_pool(pool, journal_size=32 * MiB, chunk_size=CHUNK)  # pool size: the fs
        model: dict[int, bytes] = {}
        rng = random.Random(25)
        e = Engine.open(pool)
        try:
            vol = e.volume_create("v", 512 * MiB, thin=True)
            refused = fill_until_enospc(e, vol, model, rng)
            e.wait_destaged()
            assert e.failed is None, e.failed  # no catalog commit failed
            st = e.stats()
            assert st["pool_available"] < 64 * CHUNK
            assert st["pool_fs_reserve"] == fs_reserve(os.statvfs(fs).f_blocks
                                                       * os.statvfs(fs).f_frsize)
            assert free_bytes(fs) >= st["pool_fs_reserve"] // 2, "the reserve stayed free"
            with pytest.raises(NoSpace):
                e.write(vol, refused, bytes(4096))  # still a new chunk: ENOSPC, not EIO
            e.write(vol, 0, b"o" * 4096)  # an owned chunk: fine
            model[0] = b"o" * 4096
            e.snapshot_create(vol, "s")  # markers and catalog rows still commit
            e.snapshot_delete(vol, "s")
            e.trim(vol, 64 << 10, 64 << 10)  # trim frees a chunk ...
            model.pop(64 << 10)
            e.wait_destaged()
            e.write(vol, refused, b"n" * 4096)  # ... which a new one may take
            model[refused] = b"n" * 4096
            e.wait_destaged()
            assert e.failed is None
        finally:
            e.close()
        with Engine.open(pool, start_destager=False) as e2:
            v2 = e2.volume("v")
            for off, data in model.items():
                assert bytes(e2.read(v2, off, 4096)) == data, f"lost the write at {off}"
            assert check_pool(e2) == ([], [])


def test_another_program_fills_the_file_system_then_frees_it(tmp_path):
    with small_fs(tmp_path, 128 * MiB) as fs:
        pool = os.path.join(fs, "pool")
        init_pool(pool, journal_size=16 * MiB, chunk_size=CHUNK)
        model: dict[int, bytes] = {}
        rng = random.Random(26)
        e = Engine.open(pool)
        filler = os.path.join(fs, "filler")
        try:
            vol = e.volume_create("v", 1024 * MiB, thin=True)
            for off in range(0, 4 * MiB, 64 << 10):
                data = rng.randbytes(4096)
                e.write(vol, off, data)
                model[off] = data
            e.wait_destaged()
            fill_fs(filler, MiB, passes=1)  # another program takes every free MiB
            os.sync()
            e.wait_destaged()
            # The extents the data file holds already are still the pool's; past them, the
            # file cannot grow: ENOSPC, not EIO, and the pool stays writable.
            refused = fill_until_enospc(e, vol, model, rng, start=4 * MiB)
            assert refused < 1024 * MiB
            e.write(vol, 0, b"o" * 4096)  # an overwrite needs no new space
            model[0] = b"o" * 4096
            e.wait_destaged()
            assert e.failed is None, e.failed
            os.unlink(filler)  # space comes back: writes resume, no restart
            os.sync()
            time.sleep(0.2)  # past the pool's statvfs freshness
            e.write(vol, refused, b"r" * 4096)
            model[refused] = b"r" * 4096
            e.wait_destaged()
            assert e.failed is None
            for off, data in model.items():
                assert bytes(e.read(vol, off, 4096)) == data, f"write at {off}"
        finally:
            e.close()


def test_sigkill_while_full_loses_nothing_and_destages_once_space_returns(tmp_path):
    """A real `jsnap serve` on a full file system (another program filled it): writes to
    new chunks get ENOSPC over NBD, the server is killed with SIGKILL, and after a restart
    every write acknowledged with FUA reads back; once space returns, new writes destage
    and `jsnap check` is clean."""
    import signal
    import sys

    from jsnap.stores.nbd_client import NbdClient, NbdError

    with small_fs(tmp_path, 128 * MiB) as fs:
        pool = os.path.join(fs, "pool")
        init_pool(pool, journal_size=16 * MiB, chunk_size=CHUNK)
        with Engine.open(pool, start_destager=False) as e:
            e.volume_create("v", 1024 * MiB, thin=True)
        sock = str(tmp_path / "nbd.sock")
        log = tmp_path / "serve.log"

        def serve() -> subprocess.Popen[bytes]:
            starts = log.read_text().count("jsnap: serving") if log.exists() else 0
            with open(log, "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "jsnap", "-p", pool, "serve",
                                         "--socket", sock], stdout=out, stderr=out)
            deadline = time.monotonic() + 30
            while log.read_text(errors="replace").count("jsnap: serving") == starts:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            return proc

        model: dict[int, bytes] = {}
        rng = random.Random(27)
        filler = os.path.join(fs, "filler")
        proc = serve()
        try:
            with NbdClient(sock, "v") as c:
                for off in range(0, 64 << 16, 64 << 10):  # 64 chunks before the fs fills
                    data = rng.randbytes(4096)
                    c.pwrite(data, off, fua=True)
                    model[off] = data
            fill_fs(filler, MiB, passes=1)  # fill the file system from outside
            with NbdClient(sock, "v") as c:
                off, refused = 64 << 16, None
                while refused is None:
                    data = rng.randbytes(4096)
                    try:
                        c.pwrite(data, off, fua=True)
                    except NbdError as err:
                        assert err.errno == 28, err  # ENOSPC, not EIO
                        refused = off
                        break
                    model[off] = data
                    off += 64 << 10
                c.pwrite(b"o" * 4096, 0, fua=True)  # an owned chunk: still fine
                model[0] = b"o" * 4096
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            os.unlink(filler)  # space comes back
            proc = serve()
            with NbdClient(sock, "v") as c:
                for o, data in model.items():
                    assert c.pread(4096, o) == data, f"lost the acknowledged write at {o}"
                c.pwrite(b"n" * 4096, refused, fua=True)
                model[refused] = b"n" * 4096
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
        p = subprocess.run([sys.executable, "-m", "jsnap", "-p", pool, "check"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        with Engine.open(pool, start_destager=False) as e:
            e.destage()
            v = e.volume("v")
            for o, data in model.items():
                assert bytes(e.read(v, o, 4096)) == data


def wait_state(e: Engine, prefix: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not str(state := e.stats()["state"]).startswith(prefix):
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return str(state)


def test_a_catalog_without_room_waits_and_pool_release_brings_it_back(tmp_path):
    """The issue's first story, with the file system filled by someone else: the data file
    has preallocated extents to spare, so writes to new chunks are taken, but the catalog
    cannot grow to map them. The destager waits (no read-only pool), writers get ENOSPC
    once the journal is full, and `pool release` (truncating the data file's unused tail)
    gives the catalog room: destage resumes without a restart and nothing is lost."""
    with small_fs(tmp_path, 160 * MiB) as fs:
        pool = os.path.join(fs, "pool")
        init_pool(pool, journal_size=8 * MiB, chunk_size=CHUNK)
        model: dict[int, bytes] = {}
        rng = random.Random(28)
        e = Engine.open(pool)
        try:
            vol = e.volume_create("v", 1024 * MiB, thin=True)
            e.write(vol, 0, b"a" * 4096)  # the data file grows one step (64 MiB)
            model[0] = b"a" * 4096
            e.wait_destaged()
            backed = e.stats()["pool_backed"]
            assert backed >= 32 * MiB
            fill_fs(os.path.join(fs, "filler"))
            off = 64 << 10
            stalled = None
            while stalled is None:  # new chunks, each a new catalog row at destage
                data = rng.randbytes(4096)
                try:
                    e.write(vol, off, data)
                except NoSpace as err:
                    stalled = err
                    break
                model[off] = data
                off += 64 << 10
                assert off < 1024 * MiB, "the catalog never ran out of room"
            state = wait_state(e, "waiting for space")
            assert "full" in state, state
            assert e.failed is None
            for o, data in model.items():  # journaled data still reads back
                assert bytes(e.read(vol, o, 4096)) == data
            released = e.pool_release()
            assert released >= 16 * MiB, released
            wait_state(e, "ok")
            e.wait_destaged()
            assert e.stats()["pool_backed"] == backed - released
            e.write(vol, off, b"n" * 4096)  # new chunks again
            model[off] = b"n" * 4096
            e.wait_destaged()
            for o, data in model.items():
                assert bytes(e.read(vol, o, 4096)) == data, f"write at {o}"
        finally:
            e.close()
        with Engine.open(pool, start_destager=False) as e2:
            v2 = e2.volume("v")
            for o, data in model.items():
                assert bytes(e2.read(v2, o, 4096)) == data, f"lost the write at {o}"
            assert check_pool(e2) == ([], [])
