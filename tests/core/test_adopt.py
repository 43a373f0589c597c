"""Volumes on a block device jsnap does not own (`volume create --device`, pool.py P4): the
device's data is the volume's, writes reach it only by destage, snapshots and reopen work
as for any raw volume, and a delete leaves the device holding the volume's content."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest
from loopdev import loop_device

from jsnap.core.check import check_pool
from jsnap.core.engine import Engine
from jsnap.errors import AlreadyExists, InvalidRequest, NotFound, PoolError, ReadOnly

MiB = 1 << 20
SIZE = 8 * MiB


def _device_bytes(backing, offset: int = 0, length: int = SIZE) -> bytes:
    with open(backing, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def device(tmp_path):
    backing = tmp_path / "lun.img"
    with loop_device(backing, SIZE) as dev:
        old = random.Random(1).randbytes(SIZE)  # the LUN's data before jsnap
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, old, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        yield dev, backing, old


def test_an_adopted_device_keeps_its_data_and_gets_writes_only_by_destage(pool_path, device):
    dev, backing, old = device
    want = bytearray(old)
    with Engine.open(pool_path, start_destager=False) as e:
        v = e.volume_create("lun", None, device=dev)
        assert (v.size, v.adopted, v.thin) == (SIZE, True, None)
        assert e.read(v, 0, SIZE) == old
        e.write(v, 4096, b"n" * 8192)
        want[4096:12288] = b"n" * 8192
        e.flush()
        assert _device_bytes(backing, 4096, 8192) == old[4096:12288]  # journaled only
        e.snapshot_create(v, "s")
        snap = bytes(want)
        e.write(v, 0, b"m" * 20000)
        e.trim(v, 65536, 65536)
        want[0:20000] = b"m" * 20000
        want[65536:131072] = bytes(65536)
        e.destage()
        assert e.read(v, 0, SIZE) == want
        assert e.read_snapshot(e.snapshot(v, "s"), 0, SIZE) == snap
        assert check_pool(e) == ([], [])
    os.sync()
    assert _device_bytes(backing) == want  # destaged: the device holds the volume
    with Engine.open(pool_path, start_destager=False) as e:  # adopted across a reopen
        v = e.volume("lun")
        assert v.adopted and v.path == os.path.abspath(dev)
        assert e.read_snapshot(e.snapshot(v, "s"), 0, SIZE) == snap


def test_a_crash_with_pending_writes_replays_them_onto_the_device(pool_path, device):
    dev, backing, old = device
    e = Engine.open(pool_path, start_destager=False)
    v = e.volume_create("lun", None, device=dev)
    e.write(v, MiB, b"x" * 65536)
    e.flush()
    e.abandon()
    with Engine.open(pool_path, start_destager=False) as e:
        v = e.volume("lun")
        assert e.read(v, MiB, 65536) == b"x" * 65536
        e.destage()
    os.sync()
    assert _device_bytes(backing, MiB, 65536) == b"x" * 65536
    assert _device_bytes(backing, 0, MiB) == old[:MiB]


@pytest.mark.parametrize("threaded", [False, True])
def test_delete_destages_first_and_leaves_the_device_with_the_volume(pool_path, device,
                                                                     threaded):
    dev, backing, old = device
    with Engine.open(pool_path, start_destager=threaded) as e:
        v = e.volume_create("lun", None, device=dev)
        e.write(v, 0, b"d" * 4096)
        e.snapshot_create(v, "s")
        e.write(v, 4096, b"e" * 4096)
        e.volume_delete("lun")
        assert e.volume_list() == []
        with pytest.raises(NotFound):
            e.write(v, 0, b"z" * 512)
    os.sync()
    assert os.path.exists(dev)
    assert _device_bytes(backing, 0, 8192) == b"d" * 4096 + b"e" * 4096
    assert _device_bytes(backing, 8192, SIZE - 8192) == old[8192:]
    with Engine.open(pool_path, start_destager=False) as e:  # the device is free again
        assert e.volume_create("again", None, device=dev).size == SIZE


def test_a_retiring_volume_refuses_writes(pool_path, device):
    dev, _, _ = device
    with Engine.open(pool_path, start_destager=False) as e:
        v = e.volume_create("lun", None, device=dev)
        v.retiring = True
        with pytest.raises(ReadOnly, match="being deleted"):
            e.write(v, 0, b"z" * 512)
        with pytest.raises(ReadOnly, match="being deleted"):
            e.snapshot_create(v, "s")


def test_adopting_refuses_what_it_must(pool_path, device, tmp_path):
    dev, _, _ = device
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(4096))
    with Engine.open(pool_path, start_destager=False) as e:
        with pytest.raises(InvalidRequest, match="not a block device"):
            e.volume_create("x", None, device=str(plain))
        with pytest.raises(InvalidRequest, match="at most its size"):
            e.volume_create("x", SIZE + 512, device=dev)
        part = e.volume_create("part", 4 * MiB, device=dev)  # its first 4 MiB
        assert part.size == 4 * MiB
        with pytest.raises(AlreadyExists, match="volume 'part'"):
            e.volume_create("y", None, device=dev)
        with pytest.raises(InvalidRequest, match="does not resize"):
            e.volume_resize("part", SIZE)
        assert e.allocated(part) == 4 * MiB


def test_a_device_another_process_holds_is_refused_with_the_reason(pool_path, device):
    dev, _, _ = device
    claim = os.open(dev, os.O_RDONLY | os.O_EXCL)  # as a mount or another jsnap would
    try:
        with Engine.open(pool_path, start_destager=False) as e:
            with pytest.raises(PoolError, match="busy.*held by another program"):
                e.volume_create("x", None, device=dev)
            assert e.volume_list() == []
    finally:
        os.close(claim)


# -- another server's NBD export as production (`volume create --nbd URI`) ----------------------


def test_an_nbd_export_is_adopted_with_its_data_and_handed_back(pool_path, nbdkit, tmp_path):
    img = tmp_path / "backend.img"
    old = random.Random(2).randbytes(SIZE)
    img.write_bytes(old)
    k = nbdkit("file", str(img))
    want = bytearray(old)
    with Engine.open(pool_path, start_destager=False) as e:
        v = e.volume_create("remote", None, device=k.uri)
        assert (v.size, v.adopted, v.path) == (SIZE, True, k.uri)
        assert e.read(v, 0, SIZE) == old
        e.write(v, 100, b"r" * 5000)
        want[100:5100] = b"r" * 5000
        e.snapshot_create(v, "s")
        snap = bytes(want)
        e.write(v, 0, b"q" * 70000)
        e.write_zeroes(v, MiB, 3 * MiB)
        want[0:70000] = b"q" * 70000
        want[MiB:4 * MiB] = bytes(3 * MiB)
        assert img.read_bytes() == old  # nothing reached the backend before destage
        e.destage()
        assert e.read(v, 0, SIZE) == want
        assert e.read_snapshot(e.snapshot(v, "s"), 0, SIZE) == snap
        assert check_pool(e) == ([], [])
    assert img.read_bytes() == want
    with Engine.open(pool_path, start_destager=True) as e:
        v = e.volume("remote")
        assert e.read_snapshot(e.snapshot(v, "s"), 0, SIZE) == snap
        e.write(v, 2 * MiB, b"z" * 4096)  # pending when the delete comes
        want[2 * MiB:2 * MiB + 4096] = b"z" * 4096
        e.volume_delete("remote")
    assert img.read_bytes() == want


def test_an_nbd_uri_that_is_bad_or_unreachable_is_refused_in_one_line(pool_path, tmp_path):
    with Engine.open(pool_path, start_destager=False) as e:
        with pytest.raises(InvalidRequest, match="invalid NBD URI"):
            e.volume_create("x", None, device="nbd+unix:///nosocket")
        with pytest.raises(PoolError, match="cannot open nbd.*cannot connect"):
            e.volume_create("x", None, device=f"nbd+unix:///?socket={tmp_path}/none.sock")
        assert e.volume_list() == []


def test_a_backend_outage_is_waited_out_and_nothing_acknowledged_is_lost(pool_path, nbdkit,
                                                                         tmp_path):
    """nbdkit's cache filter in writeback mode keeps writes until FLUSH, so a SIGKILL of
    the backend loses what it was not told to flush, as a real array's cache would: the
    destager must find those writes in doubt and write them again (destager "Outages")."""
    img = tmp_path / "backend.img"
    img.write_bytes(bytes(SIZE))
    k = nbdkit("--filter=cache", "file", str(img), "cache=writeback")
    want = bytearray(SIZE)
    with Engine.open(pool_path) as e:
        v = e.volume_create("r", None, device=k.uri)
        rng = random.Random(9)
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                while not stop.is_set():
                    off = rng.randrange(0, SIZE // 4096) * 4096
                    data = rng.randbytes(4096)
                    e.write(v, off, data)
                    want[off:off + 4096] = data
                    time.sleep(0.0005)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        saw_wait = False
        for _ in range(4):  # the backend dies and comes back, again and again
            time.sleep(rng.uniform(0.2, 0.5))
            k.kill()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not saw_wait:
                saw_wait = str(e.stats()["state"]).startswith("waiting for store")
                time.sleep(0.02)
            time.sleep(rng.uniform(0.1, 0.4))
            k.start()
        stop.set()
        t.join()
        assert not errors, errors[0]
        assert saw_wait, "the destager never waited for the store"
        e.flush()
        e.wait_destaged(60)
        st = e.stats()
        assert st["state"] == "ok" and int(st["destage_store_waits"]) > 0, st
        assert e.read(v, 0, SIZE) == want
    k.kill()  # its cache is gone: only what was flushed to the file is left
    assert img.read_bytes() == want


def test_reads_of_data_not_in_the_journal_fail_with_eio_while_the_backend_is_down(
        pool_path, nbdkit, tmp_path):
    img = tmp_path / "backend.img"
    img.write_bytes(b"\1" * SIZE)
    k = nbdkit("file", str(img))
    with Engine.open(pool_path, start_destager=False) as e:
        v = e.volume_create("r", None, device=k.uri)
        k.kill()
        e.write(v, 0, b"j" * 4096)  # writes land in the journal
        assert e.read(v, 0, 4096) == b"j" * 4096  # journaled: served without the backend
        with pytest.raises(OSError) as err:
            e.read(v, 8192, 4096)  # production only: EIO, never wrong data
        assert err.value.errno == errno.EIO
        k.start()
        assert e.read(v, 8192, 4096) == b"\1" * 4096


def test_a_pool_opens_while_a_volumes_backend_is_down(pool_path, nbdkit, tmp_path):
    img = tmp_path / "backend.img"
    img.write_bytes(b"\3" * SIZE)
    k = nbdkit("file", str(img))
    with Engine.open(pool_path, start_destager=False) as e:
        e.volume_create("r", None, device=k.uri)
        e.volume_create("local", MiB)
        e.write(e.volume("r"), 0, b"p" * 4096)  # pending in the journal
    k.kill()
    with Engine.open(pool_path) as e:  # the destager thread too: it waits for the store
        e.write(e.volume("local"), 0, b"l" * 4096)  # the rest of the pool serves
        assert e.read(e.volume("local"), 0, 4096) == b"l" * 4096
        assert e.read(e.volume("r"), 0, 4096) == b"p" * 4096
        with pytest.raises(OSError):
            e.read(e.volume("r"), 4096, 4096)
        k.start()
        e.wait_destaged(30)
        assert e.stats()["state"] == "ok"
    assert img.read_bytes()[:8192] == b"p" * 4096 + b"\3" * 4096
