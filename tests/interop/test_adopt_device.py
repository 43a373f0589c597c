"""jsnap in front of a block device it does not own (`volume create --device`): a loop device
holding an ext4 file system with files is adopted with its data, served, snapshotted and
written by fio, survives a SIGKILL of the server, and after `volume delete` the device
holds the volume's content: e2fsck clean on the volume, the snapshot and the device."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from interop_util import require_tool, run
from loopdev import loop_device
from test_fio import VERIFY, fio

pytestmark = pytest.mark.interop

MiB = 1 << 20
DEV_SIZE = 64 * MiB
FS_SIZE = 40 * MiB  # the file system's end: fio writes the rest of the device


def _fsck_clean(image: str) -> None:
    p = run(["e2fsck", "-fn", image], check=False)
    assert p.returncode == 0, f"e2fsck {image}: {p.returncode}\n{p.stdout}\n{p.stderr}"


def _cat(image: str, path: str) -> bytes:
    p = subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_an_ext4_lun_adopted_served_snapshotted_and_handed_back(jsnap_server, tmp_path):
    for tool in ("mkfs.ext4", "e2fsck", "debugfs", "fio"):
        require_tool(tool)
    files = tmp_path / "files"
    files.mkdir()
    content = {f"f{i}.bin": os.urandom(100_000 + i) for i in range(5)}
    for name, data in content.items():
        (files / name).write_bytes(data)
    with loop_device(tmp_path / "lun.img", DEV_SIZE) as dev:
        run(["mkfs.ext4", "-F", "-q", "-b", "4096", "-d", str(files), dev,
             f"{FS_SIZE // MiB}M"])
        srv = jsnap_server({})
        out = srv.cli("volume", "create", "lun", "--device", dev).stdout
        assert f"on {dev}" in out and "64M" in out, out
        srv.cli("snapshot", "create", "lun", "before")
        fio(srv.uri("lun"), tmp_path, "tail", "--rw=randwrite", "--bs=4k",
            f"--offset={FS_SIZE}", f"--size={DEV_SIZE - FS_SIZE}", "--iodepth=16", *VERIFY)
        srv.kill()  # fio's writes are in the journal, maybe not yet on the device
        srv.start()
        vol_img, snap_img = str(tmp_path / "vol.img"), str(tmp_path / "snap.img")
        srv.cli("export", "lun", vol_img)
        srv.cli("export", "lun@before", snap_img)
        for img in (vol_img, snap_img):
            _fsck_clean(img)
            for name, data in content.items():
                assert _cat(img, f"/{name}") == data, (img, name)
        with open(snap_img, "rb") as f:
            f.seek(FS_SIZE)
            assert not f.read().strip(b"\0"), "the snapshot sees fio's writes"
        with open(vol_img, "rb") as f:
            vol_bytes = f.read()
        # Deleting hands the device back holding the volume: every write destaged.
        out = srv.cli("volume", "delete", "lun").stdout
        assert f"{dev} holds its content" in out, out
        srv.stop()
        with open(dev, "rb") as f:
            dev_bytes = f.read()
        assert hashlib.sha256(dev_bytes).digest() == hashlib.sha256(vol_bytes).digest()
        _fsck_clean(dev)
