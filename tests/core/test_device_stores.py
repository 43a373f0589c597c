"""A pool's data and snapshot stores on block devices (`init --data-path /dev/X
--snapshot-path /dev/Y`, `pool grow --file /dev/Z`): thin extents on a device, the raw
snapshot store on another, filled to their end, and everything kept across a reopen."""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest
from loopdev import loop_device

from jsnap.core.check import check_pool
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.errors import AlreadyExists, InvalidRequest, NoSpace, PoolError

MiB = 1 << 20
CS = 4096


@pytest.fixture
def devices(tmp_path):
    with loop_device(tmp_path / "data.img", 8 * MiB) as data, \
            loop_device(tmp_path / "snap.img", 2 * MiB) as snap, \
            loop_device(tmp_path / "more.img", 4 * MiB) as more:
        yield data, snap, more


def _pool(tmp_path, data: str, snap: str) -> str:
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=4 * MiB, chunk_size=CS, data_path=data, snapshot_path=snap)
    return path


def test_thin_and_raw_volumes_on_device_stores_survive_reopen(tmp_path, devices):
    data, snap, more = devices
    path = _pool(tmp_path, data, snap)
    rng = random.Random(4)
    want: dict[str, bytearray] = {"t": bytearray(4 * MiB), "r": bytearray(MiB)}
    snaps: dict[str, bytes] = {}
    with Engine.open(path, start_destager=False) as e:
        assert [f.path for f in e.pool.files.values()] == [data]
        assert e.slots.file.path == snap
        kinds = {(s["role"], s["kind"]) for s in e.stats()["stores"]}
        assert {("data", "device"), ("snapshot store", "device")} <= kinds, kinds
        e.volume_create("t", 4 * MiB, thin=True)
        e.volume_create("r", MiB, thin=False)  # its file lives in the pool directory
        for step in range(400):
            name = "t" if step % 2 else "r"
            v = e.volume(name)
            off = rng.randrange(0, v.size - 9000)
            data_ = rng.randbytes(rng.choice([512, 4096, 9000]))
            e.write(v, off, data_)
            want[name][off:off + len(data_)] = data_
            if step == 200:
                for n in want:
                    e.snapshot_create(e.volume(n), "s")
                    snaps[n] = bytes(want[n])
            if step % 50 == 0:
                e.destage()
        e.destage()
        assert check_pool(e) == ([], [])
        assert e.slots.count > 0  # the raw volume's copies went to the snapshot device
        e.pool_grow(None, more)  # a third device, all of it
        assert e.pool.capacity() * CS == 8 * MiB + 4 * MiB
        with pytest.raises(AlreadyExists):
            e.pool_grow(None, more)
        with pytest.raises(InvalidRequest, match="cannot hold more"):
            e.pool_grow(MiB)  # the last data file is a device: it cannot grow
    with Engine.open(path, start_destager=False) as e:
        for n in want:
            v = e.volume(n)
            assert e.read(v, 0, v.size) == want[n], n
            assert e.read_snapshot(e.snapshot(v, "s"), 0, v.size) == snaps[n], n
        assert check_pool(e) == ([], [])
        assert len(e.pool.files) == 2
        # The free list grows with use, not with the devices' size.
        assert len(e.pool.free) < e.pool.capacity() // 2


def test_a_full_data_device_refuses_new_writes_and_keeps_overwrites(tmp_path, devices):
    data, snap, _ = devices
    path = _pool(tmp_path, data, snap)
    with Engine.open(path, start_destager=False) as e:
        v = e.volume_create("big", 16 * MiB, thin=True)  # over-provisioned: 8 MiB device
        written = 0
        with pytest.raises(NoSpace):
            while True:
                e.write(v, written, b"f" * 65536)
                written += 65536
                if written % MiB == 0:
                    e.destage()
        assert 7 * MiB <= written <= 8 * MiB
        e.write(v, 0, b"o" * 65536)  # its own chunk: an overwrite needs no new extent
        e.destage()
        assert e.read(v, 0, 65536) == b"o" * 65536
        assert check_pool(e) == ([], [])


def test_a_full_snapshot_device_makes_destage_wait_never_a_broken_snapshot(tmp_path,
                                                                          devices):
    data, snap, _ = devices
    path = _pool(tmp_path, data, snap)
    with Engine.open(path) as e:  # the destager thread: it waits for space
        v = e.volume_create("r", 4 * MiB, thin=False)
        e.write(v, 0, b"a" * (4 * MiB))
        e.wait_destaged()
        e.snapshot_create(v, "s")
        e.write(v, 0, b"b" * (4 * MiB))  # 4 MiB to preserve, 2 MiB of snapshot store
        e.flush()
        deadline = time.monotonic() + 20
        while "waiting for space" not in str(e.stats()["state"]):
            assert time.monotonic() < deadline, e.stats()["state"]
            time.sleep(0.05)
        assert "snapshot store" in str(e.stats()["state"])
        assert e.read_snapshot(e.snapshot(v, "s"), 0, 4 * MiB) == b"a" * (4 * MiB)
        e.snapshot_delete(v, "s")  # frees the store: destage goes on
        e.wait_destaged()
        assert e.stats()["state"] == "ok"
        assert e.read(v, 0, 4 * MiB) == b"b" * (4 * MiB)


def test_init_refuses_device_stores_that_hold_something_or_are_shared(tmp_path, devices):
    data, snap, _ = devices
    subprocess.run(["mkfs.ext4", "-q", "-F", data], check=True, capture_output=True)
    with pytest.raises(PoolError, match="holds an ext4 file system.*--force"):
        init_pool(str(tmp_path / "p1"), journal_size=MiB, chunk_size=CS, data_path=data)
    assert not os.path.exists(tmp_path / "p1" / "pool.db")
    init_pool(str(tmp_path / "p2"), journal_size=MiB, chunk_size=CS, data_path=data,
              force=True)
    with pytest.raises(InvalidRequest, match="need a device each"):
        init_pool(str(tmp_path / "p3"), journal_size=MiB, chunk_size=CS, data_path=snap,
                  snapshot_path=snap)
    with pytest.raises(InvalidRequest, match="larger than"):
        init_pool(str(tmp_path / "p4"), journal_size=MiB, chunk_size=CS, data_path=snap,
                  pool_size=64 * MiB)
