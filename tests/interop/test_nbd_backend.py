"""jsnap in front of another server's NBD export (`volume create --nbd URI`): nbdkit and
qemu-nbd as production, real clients through jsnap (nbdcopy, qemu-io, fio with verify),
snapshots exact, a SIGKILL of jsnap losing nothing, and `volume delete` handing the export
back holding the volume."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from interop_util import make_image, require_tool, run
from test_fio import VERIFY, fio

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB


def _copy(uri: str, out: Path) -> bytes:
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()


class QemuNbd:
    """`qemu-nbd` on a raw file and a unix socket; --shared: jsnap opens several
    connections to a backend (stores/remote.py)."""

    def __init__(self, sock: Path, image: Path) -> None:
        exe = require_tool("qemu-nbd")
        self.uri = f"nbd+unix:///?socket={sock}"
        self.proc = subprocess.Popen([exe, "-f", "raw", "-k", str(sock), "--persistent",
                                      "--shared=8", "--cache=writeback", str(image)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert self.proc.poll() is None, "qemu-nbd exited"
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.parametrize("backend", ["nbdkit", "qemu-nbd"])
def test_jsnap_in_front_of_an_nbd_export(jsnap_server, nbdkit, tmp_path, backend):
    require_tool("nbdcopy")
    qemu_io = require_tool("qemu-io")
    img = tmp_path / "backend.img"
    old = make_image(img, SIZE, seed=5)
    qn = None
    if backend == "nbdkit":
        uri = nbdkit("file", str(img)).uri
    else:
        qn = QemuNbd(tmp_path / "qemu-nbd.sock", img)
        uri = qn.uri
    try:
        srv = jsnap_server({})
        assert f"on {uri}" in srv.cli("volume", "create", "vol", "--nbd", uri).stdout
        assert _copy(srv.uri("vol"), tmp_path / "a.img") == old  # the export's data, adopted
        fio(srv.uri("vol"), tmp_path, "through", "--rw=randwrite", "--bs=4k",
            "--size=16M", "--offset=8M", "--iodepth=16", *VERIFY)
        before = _copy(srv.uri("vol"), tmp_path / "b.img")
        srv.cli("snapshot", "create", "vol", "s1")
        run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -z 40M 2M",
             "-c", "flush", srv.uri("vol")])
        assert _copy(srv.uri("vol@s1"), tmp_path / "s1.img") == before
        now = _copy(srv.uri("vol"), tmp_path / "c.img")
        assert now[:MiB] == b"\x5a" * MiB and now[40 * MiB:42 * MiB] == bytes(2 * MiB)
        srv.kill()  # SIGKILL: the flushed writes are in jsnap's journal
        srv.start()
        assert _copy(srv.uri("vol"), tmp_path / "d.img") == now
        assert _copy(srv.uri("vol@s1"), tmp_path / "s1b.img") == before
        out = srv.cli("volume", "delete", "vol").stdout
        assert f"{uri} holds its content" in out, out
        srv.stop()
        assert img.read_bytes() == now  # the export holds the volume, every write destaged
    finally:
        if qn is not None:
            qn.kill()


def test_the_backend_dies_and_returns_under_writes_and_nothing_is_lost(jsnap_server, nbdkit,
                                                                       tmp_path):
    """The backend caches writes until FLUSH (nbdkit's cache filter, writeback), so its
    SIGKILL loses what jsnap had written but not flushed: jsnap waits for it, writes
    again what was in doubt, and every write a client flushed ends up on the backend."""
    qemu_io = require_tool("qemu-io")
    img = tmp_path / "backend.img"
    img.write_bytes(bytes(SIZE))
    k = nbdkit("--filter=cache", "file", str(img), "cache=writeback")
    srv = jsnap_server({})  # a 64M journal: every write of the test fits while it is down
    srv.cli("volume", "create", "vol", "--nbd", k.uri)
    want = bytearray(SIZE)
    for i in range(1, 13):
        off = (i * 5 * MiB) % (SIZE - 2 * MiB)
        run([qemu_io, "-f", "raw", "-c", f"write -P {i} {off} 2M", "-c", "flush",
             srv.uri("vol")])
        want[off:off + 2 * MiB] = bytes([i]) * (2 * MiB)
        if i in (3, 7):
            k.kill()  # writes go on landing in jsnap's journal meanwhile
        if i in (5, 9):
            k.start()
    st = json.loads(srv.cli("status", "--json").stdout)
    assert st["state"] == "ok" or st["state"].startswith("waiting for store"), st["state"]
    assert _copy(srv.uri("vol"), tmp_path / "v.img") == want
    srv.cli("volume", "delete", "vol")  # destages everything to the backend first
    srv.stop()
    k.kill()  # its cache is gone: only what reached the file counts
    assert img.read_bytes() == want
