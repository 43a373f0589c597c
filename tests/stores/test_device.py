"""The journal on a block device (issue 21): the device store (stores/device.py) on real loop
devices, and `jsnap init --journal-path /dev/X` run as the command a user runs: the whole
device by default, never truncated, and nothing that holds data overwritten without
--force (core/layout.py, L3-L5). Needs root and losetup: required in CI."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from loopdev import loop_device, need

from jsnap.core.engine import Engine
from jsnap.stores.catalog import Catalog
from jsnap.stores.device import DeviceFile, known_magic, open_store
from jsnap.stores.files import OsFile

MiB = 1 << 20


def jsnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jsnap", *args], capture_output=True,
                          text=True, timeout=120)


def one_line_error(p: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with one readable line that says each of `words`."""
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jsnap: error: "), p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def mkfs_ext4(dev: str) -> None:
    if not shutil.which("mkfs.ext4"):
        need("mkfs.ext4 is not installed")
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)


# -- the store ---------------------------------------------------------------------------------


def test_a_device_store_says_what_a_device_can_do(tmp_path):
    backing = tmp_path / "dev.img"
    with loop_device(backing, 8 * MiB) as dev:
        f = open_store(dev)
        try:
            assert isinstance(f, DeviceFile)
            assert f.size() == 8 * MiB
            assert f.block_size in (512, 1024, 2048, 4096)
            assert not f.caps.resize and not f.caps.allocate and f.caps.page_cache
            for call in (lambda: f.truncate(MiB), lambda: f.allocate(0, MiB)):
                with pytest.raises(OSError) as e:
                    call()
                assert e.value.errno == errno.EOPNOTSUPP
            with pytest.raises(OSError) as e:  # D1: held exclusively
                DeviceFile(dev)
            assert e.value.errno == errno.EBUSY
            with pytest.raises(OSError) as e:
                f.zero_range(8 * MiB - 4096, 8192)
            assert e.value.errno == errno.ENOSPC
        finally:
            f.close()
        assert os.path.getsize(backing) == 8 * MiB
        plain = open_store(str(tmp_path / "plain"), create=True)
        try:
            assert type(plain) is OsFile and plain.caps.resize
        finally:
            plain.close()


def test_a_forked_child_does_not_hold_the_claim(tmp_path):
    """D1: a child of the process that opened the device (the journal's replay scanner),
    still alive after that process closed it, does not keep the device busy."""
    with loop_device(tmp_path / "dev.img", 8 * MiB) as dev:
        f = DeviceFile(dev)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, b"!")  # past fork's hooks
                time.sleep(30)  # killed below
            finally:
                os._exit(0)
        try:
            assert os.read(r, 1) == b"!"
            f.close()
            DeviceFile(dev).close()
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            os.close(w)


def test_zeroing_a_device_reads_back_as_zeroes_to_the_byte(tmp_path):
    """D3, on unaligned ranges: the kernel zeroes whole logical blocks, the store the edges;
    the page cache and, after sync, the device itself (its backing file) say the same."""
    rng = random.Random(21)
    backing = tmp_path / "dev.img"
    with loop_device(backing, 8 * MiB) as dev:
        f = DeviceFile(dev)
        try:
            data = bytearray(rng.randbytes(4 * MiB))
            f.pwrite(data, 0)
            f.sync()
            for call, off, n in ((f.zero_range, 1000, 10_000),
                                 (f.punch_hole, 20_001, 70_000),
                                 (f.zero_allocated, 200_000, 3 * 4096),
                                 (f.zero_range, 3 * MiB + 7, 300),  # no whole block inside
                                 (f.punch_hole, MiB, 2 * MiB)):
                call(off, n)
                data[off : off + n] = bytes(n)
            assert f.pread(4 * MiB, 0) == data
            f.sync()
        finally:
            f.close()
        with open(backing, "rb") as b:
            assert b.read(4 * MiB) == data


def test_known_magic_names_a_file_system_without_blkid(tmp_path):
    with loop_device(tmp_path / "dev.img", 16 * MiB) as dev:
        f = DeviceFile(dev)
        try:
            assert known_magic(f) is None
        finally:
            f.close()
        mkfs_ext4(dev)
        f = DeviceFile(dev)
        try:
            assert known_magic(f) == "an ext2/3/4 file system"
        finally:
            f.close()


# -- init on a device --------------------------------------------------------------------------


def test_init_takes_the_whole_device_and_never_truncates_it(tmp_path):
    backing = tmp_path / "dev.img"
    with loop_device(backing, 24 * MiB) as dev:
        pool = str(tmp_path / "pool")
        p = jsnap("init", pool, "--journal-path", dev)
        assert p.returncode == 0, p.stderr
        assert "journal 24M" in p.stdout
        assert os.path.getsize(backing) == 24 * MiB
        st = json.loads(jsnap("-p", pool, "status", "--json").stdout)
        assert st["journal_size"] == 24 * MiB
        one_line_error(jsnap("init", str(tmp_path / "big"), "--journal-path", dev,
                             "--journal-size", "32M", "--force"), "larger than", dev)
        typo = "/dev/jsnap-test-no-such-device"
        one_line_error(jsnap("init", str(tmp_path / "typo"), "--journal-path", typo),
                       typo, "not a block device")
        assert not os.path.exists(typo), "no journal file made in /dev"
        small = str(tmp_path / "small")
        p = jsnap("init", small, "--journal-path", dev, "--journal-size", "8M", "--force")
        assert p.returncode == 0, p.stderr
        st = json.loads(jsnap("-p", small, "status", "--json").stdout)
        assert st["journal_size"] == 8 * MiB
        assert os.path.getsize(backing) == 24 * MiB


def test_init_refuses_a_device_with_a_file_system_unless_forced(tmp_path):
    with loop_device(tmp_path / "dev.img", 32 * MiB) as dev:
        mkfs_ext4(dev)
        pool = str(tmp_path / "pool")
        one_line_error(jsnap("init", pool, "--journal-path", dev),
                       dev, "ext4 file system", "--force")
        assert not os.path.exists(os.path.join(pool, "pool.db"))
        probe = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev],
                               capture_output=True, text=True)
        assert probe.stdout.strip() == "ext4", "a refused init wrote nothing"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:  # D1: a mounted device is refused even with --force
            one_line_error(jsnap("init", pool, "--journal-path", dev, "--force"),
                           "busy", "mounted")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        p = jsnap("init", pool, "--journal-path", dev, "--force")
        assert p.returncode == 0, p.stderr
        assert subprocess.run(["blkid", "-p", dev], capture_output=True).returncode == 2
        assert jsnap("-p", pool, "volume", "create", "v", "--size", "4M").returncode == 0
        p = jsnap("-p", pool, "check")
        assert p.returncode == 0 and "pool is consistent" in p.stdout, p.stdout + p.stderr


def test_init_refuses_another_pools_journal_and_forced_replays_none_of_it(tmp_path):
    """L4, then L5: pool B forced onto pool A's journal device must not replay A's records
    (they carry no pool identity and would pass every check of a fresh pool's replay)."""
    with loop_device(tmp_path / "dev.img", 16 * MiB) as dev:
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        assert jsnap("init", a, "--journal-path", dev).returncode == 0
        e = Engine.open(a, start_destager=False)
        try:
            vol = e.volume_create("v", 8 * MiB)
            for off in range(0, 4 * MiB, 64 << 10):
                e.write(vol, off, b"A" * 4096)
            e.flush()
        finally:
            e.abandon()  # a crash: A's records stay in its journal
        cat = Catalog(os.path.join(a, "pool.db"))
        owner = str(cat.get("uuid"))
        cat.close()
        one_line_error(jsnap("init", b, "--journal-path", dev), f"jsnap pool {owner}",
                       "--force")
        assert not os.path.exists(os.path.join(b, "pool.db"))
        p = jsnap("-p", a, "check")  # A is untouched: its records are all still there
        assert p.returncode == 0 and "64 records to destage" in p.stdout, p.stdout + p.stderr
        assert jsnap("init", b, "--journal-path", dev, "--force").returncode == 0
        assert jsnap("-p", b, "volume", "create", "v", "--size", "8M").returncode == 0
        p = jsnap("-p", b, "check")
        assert p.returncode == 0 and "0 records to destage" in p.stdout, p.stdout + p.stderr
        with Engine.open(b, start_destager=False) as e:
            assert bytes(e.read(e.volume("v"), 0, 4 * MiB)) == bytes(4 * MiB)
            journal, data, snaps = e.stats()["stores"]  # status says where each store is
            assert journal == {"role": "journal", "path": dev, "kind": "device",
                               "size": 16 * MiB, "used": 0}
            assert data["role"] == "data" and data["kind"] == "file"
            assert snaps["role"] == "snapshot store" and snaps["kind"] == "file"
        p = jsnap("-p", b, "status")
        assert f"journal        {dev} (device," in p.stdout, p.stdout
